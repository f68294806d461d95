//! Named blocklists and their counters. Each list — the inline `xdp.blocklist`, each
//! `xdp.blocklist_files` entry — has a list id that its entries carry in the tries; the
//! program counts drops per id (`PB_LIST_HITS`, per CPU, ids `0..LISTS_MAX`), and the
//! id → name table is a map too (`PB_LIST_NAMES`), pinned with the others, so a restart
//! keeps every name on its id and its counter stays its own.
//!
//! Ids: 0 is never given to a named list (entries written without a list); 1 is always the
//! inline `xdp.blocklist` (as before lists had names); files get the lowest free id from 2
//! on, preferring ids no list had, so a dropped list's counter is not handed on at once.
//! An id given to a new name has its counter zeroed; a list no longer configured loses its
//! entries, its name and its counter. Zeroing races with drops counted at that moment on
//! other CPUs, which a counter reset can afford.

use std::collections::{HashMap, HashSet};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use protobalance_common::{LIST_NAME_LEN, LISTS_MAX, ListName, MAP_LIST_HITS, MAP_LIST_NAMES};

use super::{XdpError, XdpFilter};
use crate::filter::{
    blocklist::{NamedList, fit_name},
    cidr::Cidr,
};

/// The list id of the inline `xdp.blocklist`.
pub const INLINE_LIST_ID: u32 = 1;
/// The first id given to other named lists.
const FIRST_FILE_LIST_ID: u32 = 2;

/// The per-list maps: names and hit counters.
pub struct ListMaps {
    names: Array<MapData, ListName>,
    hits: PerCpuArray<MapData, u64>,
}

/// What [`XdpFilter::replace_named_lists`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListsReplaced {
    /// The id each list got, in the order given.
    pub ids: Vec<(String, u32)>,
    /// Entries removed: no longer in their list, or their list is gone.
    pub removed: usize,
    /// Lists no longer configured, whose entries, names and counters were removed.
    pub dropped: Vec<String>,
}

/// Entries per list id and family, counted in one pass over the tries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListSizes {
    pub v4: usize,
    pub v6: usize,
    pub per_list: HashMap<u32, usize>,
}

impl ListMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, XdpError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(XdpError::Missing(name));
        Ok(Self {
            names: Array::try_from(take(MAP_LIST_NAMES)?)?,
            hits: PerCpuArray::try_from(take(MAP_LIST_HITS)?)?,
        })
    }

    /// Every named list: `(id, name)`, by id.
    pub fn names(&self) -> Result<Vec<(u32, String)>, XdpError> {
        let mut out = Vec::new();
        for id in 0..LISTS_MAX {
            let name = decode(&self.names.get(&id, 0)?);
            if !name.is_empty() {
                out.push((id, name));
            }
        }
        Ok(out)
    }

    /// Drops per list id, summed over CPUs; ids without drops are left out.
    pub fn hits(&self) -> Result<Vec<(u32, u64)>, XdpError> {
        let mut out = Vec::new();
        for id in 0..LISTS_MAX {
            let hits: u64 = self.hits.get(&id, 0)?.iter().sum();
            if hits > 0 {
                out.push((id, hits));
            }
        }
        Ok(out)
    }

    fn set_name(&mut self, id: u32, name: &str) -> Result<(), XdpError> {
        self.names.set(id, encode(name), 0)?;
        let cpus = self.hits.get(&id, 0)?.len();
        let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(|source| XdpError::Io {
            path: MAP_LIST_HITS.into(),
            source,
        })?;
        self.hits.set(id, zeros, 0)?;
        Ok(())
    }
}

fn encode(name: &str) -> ListName {
    let mut out = [0u8; LIST_NAME_LEN];
    let name = fit_name(name);
    out[..name.len()].copy_from_slice(name.as_bytes());
    out
}

fn decode(raw: &ListName) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Which id each wanted list gets, and which named ids are released.
#[derive(Debug, PartialEq, Eq)]
struct IdPlan {
    ids: Vec<u32>,
    /// Ids whose name changes (new lists): their counters restart.
    renamed: Vec<u32>,
    /// Named lists that are not wanted any more.
    released: Vec<(u32, String)>,
}

fn plan_ids(existing: &[(u32, String)], wanted: &[String]) -> Result<IdPlan, XdpError> {
    let by_name: HashMap<&str, u32> = existing.iter().map(|(i, n)| (n.as_str(), *i)).collect();
    let mut taken: HashSet<u32> = HashSet::new();
    let mut ids = Vec::with_capacity(wanted.len());
    let mut renamed = Vec::new();
    for (index, name) in wanted.iter().enumerate() {
        let id = if index == 0 {
            INLINE_LIST_ID
        } else if let Some(id) = by_name
            .get(name.as_str())
            .filter(|id| **id >= FIRST_FILE_LIST_ID)
        {
            *id
        } else {
            0
        };
        taken.insert(id);
        ids.push(id);
    }
    let named: HashSet<u32> = existing.iter().map(|(i, _)| *i).collect();
    // Fresh ids first (never named), then ids of lists that are gone.
    let mut free = (FIRST_FILE_LIST_ID..LISTS_MAX)
        .filter(|id| !named.contains(id))
        .chain((FIRST_FILE_LIST_ID..LISTS_MAX).filter(|id| named.contains(id)))
        .filter(|id| !taken.contains(id));
    for (i, id) in ids.iter_mut().enumerate() {
        if *id == 0 {
            *id = free.next().ok_or(XdpError::TooManyLists(wanted.len()))?;
        }
        let old = existing.iter().find(|(e, _)| e == id).map(|(_, n)| n);
        if old != Some(&wanted[i]) {
            renamed.push(*id);
        }
    }
    // Lists no longer wanted; an id of theirs may have gone to a new list already.
    let released = existing
        .iter()
        .filter(|(_, name)| !wanted.contains(name))
        .cloned()
        .collect();
    Ok(IdPlan {
        ids,
        renamed,
        released,
    })
}

impl XdpFilter {
    /// Makes the blocklists exactly `lists`: the first is the inline list (id 1), the others
    /// get ids by name (see the module comment). Entries are inserted first, then stale ones
    /// removed, so an entry kept across the change never disappears in between. A CIDR in
    /// two lists belongs to the later one. Names must be distinct (`blocklist::name_lists`
    /// makes them so); entries of ids no list is named for are left alone.
    pub fn replace_named_lists(&mut self, lists: &[NamedList]) -> Result<ListsReplaced, XdpError> {
        let wanted_names: Vec<String> = lists.iter().map(|l| fit_name(&l.name)).collect();
        let plan = plan_ids(&self.list_maps().names()?, &wanted_names)?;
        for id in &plan.renamed {
            let index = plan.ids.iter().position(|i| i == id).unwrap_or_default();
            self.list_maps().set_name(*id, &wanted_names[index])?;
        }
        let mut wanted: HashMap<Cidr, u32> = HashMap::new();
        for (list, id) in lists.iter().zip(&plan.ids) {
            for cidr in &list.entries {
                self.stage_block(*cidr, *id)?;
                wanted.insert(cidr.network(), *id);
            }
        }
        let managed: HashSet<u32> = plan
            .ids
            .iter()
            .copied()
            .chain(plan.released.iter().map(|(id, _)| *id))
            .collect();
        let stale =
            self.entries_where(|cidr, id| managed.contains(&id) && !wanted.contains_key(&cidr))?;
        for cidr in &stale {
            self.stage_unblock(*cidr)?;
        }
        self.publish()?;
        for (id, _) in plan
            .released
            .iter()
            .filter(|(id, _)| !plan.ids.contains(id))
        {
            self.list_maps().set_name(*id, "")?;
        }
        Ok(ListsReplaced {
            ids: wanted_names.into_iter().zip(plan.ids).collect(),
            removed: stale.len(),
            dropped: plan.released.into_iter().map(|(_, name)| name).collect(),
        })
    }

    /// Every named list: `(id, name)`, by id.
    pub fn list_names(&self) -> Result<Vec<(u32, String)>, XdpError> {
        self.list_maps().names()
    }

    /// Drops per list id since the maps were created (pinned maps: across restarts).
    pub fn list_hits(&self) -> Result<Vec<(u32, u64)>, XdpError> {
        self.list_maps().hits()
    }

    /// Blocklist entries per family and per list id.
    pub fn list_sizes(&mut self) -> Result<ListSizes, XdpError> {
        let mut sizes = ListSizes::default();
        for (cidr, id) in &self.mirror.block {
            if cidr.addr().is_ipv4() {
                sizes.v4 += 1;
            } else {
                sizes.v6 += 1;
            }
            *sizes.per_list.entry(*id).or_default() += 1;
        }
        Ok(sizes)
    }

    /// Blocklist entries (both families) for which `select(cidr, list_id)` holds.
    fn entries_where(&mut self, select: impl Fn(Cidr, u32) -> bool) -> Result<Vec<Cidr>, XdpError> {
        Ok(self
            .mirror
            .block
            .iter()
            .filter(|(cidr, id)| select(**cidr, **id))
            .map(|(cidr, _)| *cidr)
            .collect())
    }

    fn list_maps(&self) -> std::sync::MutexGuard<'_, ListMaps> {
        self.lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn ids_stay_with_their_names() {
        let first = plan_ids(&[], &names(&["xdp.blocklist", "a.txt", "b.txt"])).expect("plan");
        assert_eq!(first.ids, [1, 2, 3]);
        assert_eq!(first.renamed, [1, 2, 3]);
        let existing = vec![
            (1, "xdp.blocklist".to_owned()),
            (2, "a.txt".to_owned()),
            (3, "b.txt".to_owned()),
        ];
        // b.txt moved first, a.txt gone, c.txt new: c gets a fresh id, not a's.
        let next = plan_ids(&existing, &names(&["xdp.blocklist", "b.txt", "c.txt"])).expect("plan");
        assert_eq!(next.ids, [1, 3, 4]);
        assert_eq!(next.renamed, [4]);
        assert_eq!(next.released, [(2, "a.txt".to_owned())]);
    }

    #[test]
    fn released_ids_are_reused_last_and_the_space_is_bounded() {
        let existing: Vec<(u32, String)> = (2..LISTS_MAX).map(|i| (i, format!("{i}"))).collect();
        let plan = plan_ids(&existing, &names(&["xdp.blocklist", "new"])).expect("plan");
        assert_eq!(
            plan.ids,
            [1, 2],
            "every id was named once: the lowest released"
        );
        assert_eq!(plan.released.len(), existing.len());
        let too_many: Vec<String> = (0..=LISTS_MAX).map(|i| format!("{i}.txt")).collect();
        assert!(matches!(
            plan_ids(&[], &too_many),
            Err(XdpError::TooManyLists(n)) if n == too_many.len()
        ));
    }

    #[test]
    fn names_fit_the_map() {
        let long = "é".repeat(40);
        let fitted = fit_name(&long);
        assert!(fitted.len() <= LIST_NAME_LEN && fitted.chars().all(|c| c == 'é'));
        assert_eq!(decode(&encode("drop.txt")), "drop.txt");
        assert_eq!(decode(&encode(&long)), fitted);
        assert_eq!(decode(&[0u8; LIST_NAME_LEN]), "");
    }
}
