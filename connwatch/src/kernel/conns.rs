//! The connection map as userspace reads it: each entry joined with the addresses kept
//! apart for IPv6 sockets (`CW_ADDRS6`) and its owner's name from /proc, as one
//! [`ConnInfo`].

use std::collections::HashSet;
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::maps::{HashMap, IterableMap, Map, MapData};
use connwatch_common::{ConnEntry, ConnInfo, FLAG_ADDRS6};

use crate::kernel::procfs::name_owners;

type Entries = HashMap<MapData, u64, ConnEntry>;
type Addrs6 = HashMap<MapData, u64, [u8; 32]>;

/// What [`ConnMap::remove_unclaimed`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unclaimed {
    /// Addresses that no entry claimed, removed.
    pub removed: usize,
    /// Of those, the ones a socket born at the same address claimed the moment after.
    pub lost: usize,
}

/// The pinned connection map and the addresses beside it.
pub struct ConnMap {
    entries: Entries,
    /// None only for an object without the map, where no entry is flagged.
    addrs6: Option<Addrs6>,
}

impl ConnMap {
    pub fn new(entries: Map, addrs6: Option<Map>) -> Result<ConnMap> {
        Ok(ConnMap {
            entries: Entries::try_from(entries).context("the connection map")?,
            addrs6: addrs6
                .map(Addrs6::try_from)
                .transpose()
                .context("the map of IPv6 addresses")?,
        })
    }

    /// The socket at `key`, if the map holds one.
    pub fn get(&self, key: u64) -> Option<ConnInfo> {
        let e = self.entries.get(&key, 0).ok()?;
        let addrs = (e.flags as u32 & FLAG_ADDRS6 != 0)
            .then(|| self.addrs6.as_ref()?.get(&key, 0).ok())
            .flatten();
        let mut info = ConnInfo::from_entry(&e, addrs.as_ref());
        name_owners([&mut info]);
        Some(info)
    }

    /// Removes the socket at `key` and its addresses.
    pub fn remove(&mut self, key: u64) {
        let _ = self.entries.remove(&key);
        if let Some(a) = self.addrs6.as_mut() {
            let _ = a.remove(&key);
        }
    }

    /// Removes the addresses no entry claims (a socket at a reused address whose close
    /// went unseen can leave them). The addresses are read before the entries: the
    /// kernel program stores a socket's addresses just before its entry, so by the time
    /// the entries are read every live socket claims its own. A socket born at an
    /// orphan's address since is found by looking its entry up again just before each
    /// removal, which leaves microseconds, not the whole read, for one to be born.
    pub fn remove_unclaimed(&mut self) -> Unclaimed {
        let mut done = Unclaimed::default();
        let Some(a) = self.addrs6.as_mut() else {
            return done;
        };
        let kept: Vec<(u64, [u8; 32])> =
            connwatch_common::entries_batched(a.map().fd().as_fd()).unwrap_or_default();
        if kept.is_empty() {
            return done;
        }
        let Ok(entries) =
            connwatch_common::entries_batched::<u64, ConnEntry>(self.entries.map().fd().as_fd())
        else {
            return done;
        };
        let claims = |e: &ConnEntry| e.flags as u32 & FLAG_ADDRS6 != 0;
        let claimed: HashSet<u64> = entries
            .iter()
            .filter(|(_, e)| claims(e))
            .map(|(k, _)| *k)
            .collect();
        let claimed_now = |k: &u64| self.entries.get(k, 0).is_ok_and(|e| claims(&e));
        for (key, _) in kept.iter().filter(|(k, _)| !claimed.contains(k)) {
            if claimed_now(key) || a.remove(key).is_err() {
                continue;
            }
            done.removed += 1;
            // Born in the microseconds between the look and the removal: it claims
            // addresses that are gone until its next state change. (One born after the
            // removal stored its own before its entry.)
            if claimed_now(key) && a.get(key, 0).is_err() {
                done.lost += 1;
            }
        }
        done
    }

    pub fn max_entries(&self) -> u32 {
        self.entries
            .map()
            .info()
            .map(|i| i.max_entries())
            .unwrap_or(0)
    }

    /// Every socket the map holds, read in batches
    /// ([`connwatch_common::conn_entries_batched`]: 200,000 sockets read key by key took
    /// most of a second to list); key by key where the kernel refuses a batch.
    pub fn entries(&self) -> Vec<(u64, ConnInfo)> {
        self.entries_batched()
            .unwrap_or_else(|_| self.entries_one_by_one())
    }

    /// [`ConnMap::entries`] by batches only: the kernel's error where it refuses one.
    pub fn entries_batched(&self) -> std::io::Result<Vec<(u64, ConnInfo)>> {
        let mut all = connwatch_common::conn_entries_batched(
            self.entries.map().fd().as_fd(),
            self.addrs6.as_ref().map(|a| a.map().fd().as_fd()),
        )?;
        name_owners(all.iter_mut().map(|(_, info)| info));
        Ok(all)
    }

    /// [`ConnMap::entries`] key by key.
    pub fn entries_one_by_one(&self) -> Vec<(u64, ConnInfo)> {
        let keys: Vec<u64> = self.entries.keys().filter_map(Result::ok).collect();
        keys.into_iter()
            .filter_map(|k| Some((k, self.get(k)?)))
            .collect()
    }
}
