//! Per-address admission: at most `max_sessions_per_ip` concurrent sessions from one
//! client address, across all listeners. A permit is released when its guard drops.
//! Bounded: entries exist only while their address has open sessions.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
};

#[derive(Clone)]
pub struct Admission {
    /// Changed by a config reload; sessions already open are not cut.
    max_per_ip: Arc<AtomicU32>,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

pub struct Permit {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Admission {
    pub fn new(max_per_ip: u32) -> Self {
        Self {
            max_per_ip: Arc::new(AtomicU32::new(max_per_ip)),
            open: Arc::default(),
        }
    }

    /// A reloaded `limits.max_sessions_per_ip`, for the next admissions.
    pub fn set_max_per_ip(&self, max_per_ip: u32) {
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    pub fn try_admit(&self, ip: IpAddr) -> Option<Permit> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max_per_ip.load(Ordering::Relaxed) {
            return None;
        }
        *count += 1;
        Some(Permit {
            ip,
            open: Arc::clone(&self.open),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_releases_on_drop() {
        let admission = Admission::new(2);
        let ip: IpAddr = "198.51.100.7".parse().expect("ip");
        let other: IpAddr = "198.51.100.8".parse().expect("ip");
        let a = admission.try_admit(ip).expect("first");
        let _b = admission.try_admit(ip).expect("second");
        assert!(admission.try_admit(ip).is_none(), "third refused");
        assert!(
            admission.try_admit(other).is_some(),
            "other address unaffected"
        );
        drop(a);
        assert!(admission.try_admit(ip).is_some(), "slot released");
    }
}
