//! `Cidr`: an IPv4 or IPv6 network as written in config files and blocklists
//! (`203.0.113.0/24`, `2001:db8::/32`, or a bare address meaning /32 or /128).
//!
//! Hand-written rather than pulling in a crate: the grammar is tiny and we want our own error
//! messages (host bits set is an operator mistake worth naming, not silently masking).

use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error(
        "`{0}` is not an IP address or network (expected e.g. 203.0.113.0/24 or 2001:db8::/32)"
    )]
    Syntax(String),
    #[error("`{input}`: prefix length {prefix_len} is longer than {max} bits")]
    PrefixTooLong {
        input: String,
        prefix_len: u32,
        max: u8,
    },
    #[error("`{input}` has host bits set; did you mean {suggestion}?")]
    HostBits { input: String, suggestion: Cidr },
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let max = max_len(addr);
        if prefix_len > max {
            return Err(CidrError::PrefixTooLong {
                input: format!("{addr}/{prefix_len}"),
                prefix_len: prefix_len.into(),
                max,
            });
        }
        Ok(Self { addr, prefix_len })
    }

    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The network with every host bit cleared.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::from((u32::from(a) & mask32(self.prefix_len)).to_be_bytes()),
            IpAddr::V6(a) => IpAddr::from((u128::from(a) & mask128(self.prefix_len)).to_be_bytes()),
        };
        Cidr {
            addr,
            prefix_len: self.prefix_len,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask32(self.prefix_len);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask128(self.prefix_len);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

const fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(input.to_owned());
        let (addr, prefix_len) = match input.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
                let len: u32 = len.parse().map_err(|_| syntax())?;
                let max = max_len(addr);
                if len > u32::from(max) {
                    return Err(CidrError::PrefixTooLong {
                        input: input.to_owned(),
                        prefix_len: len,
                        max,
                    });
                }
                (addr, len as u8)
            }
            None => {
                let addr: IpAddr = input.parse().map_err(|_| syntax())?;
                (addr, max_len(addr))
            }
        };
        let cidr = Cidr { addr, prefix_len };
        if cidr.network() != cidr {
            return Err(CidrError::HostBits {
                input: input.to_owned(),
                suggestion: cidr.network(),
            });
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks_and_bare_addresses() {
        let v4: Cidr = "203.0.113.0/24".parse().expect("valid");
        assert_eq!(v4.prefix_len(), 24);
        assert!(v4.contains("203.0.113.77".parse().expect("ip")));
        assert!(!v4.contains("203.0.114.1".parse().expect("ip")));
        let host: Cidr = "2001:db8::1".parse().expect("valid");
        assert_eq!(host.prefix_len(), 128);
        let zero: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(zero.contains("198.51.100.1".parse().expect("ip")));
        assert!(!zero.contains("::1".parse().expect("ip")));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { .. })
        ));
        assert!(matches!(
            "banana".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        let err = "203.0.113.5/24".parse::<Cidr>().expect_err("host bits");
        assert_eq!(
            err.to_string(),
            "`203.0.113.5/24` has host bits set; did you mean 203.0.113.0/24?"
        );
    }
}
