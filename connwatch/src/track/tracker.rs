//! What the daemon knows of each socket, fed by the kernel's lifecycle events, the
//! pinned map at start-up and one sock_diag dump for sockets older than the program.

use std::collections::HashMap;

use connwatch_common::{event_kind, ConnEvent, ConnInfo, FLAG_BIRTH_UNKNOWN};

use crate::conn::{Birth, Owner};
use crate::conn::{TcpState, Tuple};
use crate::policy::Subject;

/// Where a tracked socket came from, and so how it is re-checked before a destroy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// In the kernel map under its socket address: re-read there.
    Map,
    /// Found by the start-up dump, never seen changing state: only sock_diag knows it.
    Seeded,
    /// A connection that left the map for TIME_WAIT (a state the kernel keeps in a
    /// separate, smaller socket): only sock_diag knows it now.
    TimeWait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub tuple: Tuple,
    pub state: TcpState,
    pub birth: Birth,
    pub state_since_ns: u64,
    /// The map entry's creation time: tells this socket from a later one at the same key.
    pub generation: u64,
    pub source: Source,
    /// The sock_diag cookie of a seeded socket, which a destroy must find again.
    pub cookie: Option<[u8; 8]>,
    /// Last data in either direction as the kernel program stamped it (coarse); 0 if none.
    pub last_activity_ns: u64,
    pub owner: Option<Owner>,
}

impl Tracked {
    pub fn from_info(info: &ConnInfo) -> Option<Tracked> {
        Some(Tracked {
            tuple: Tuple::from_info(info)?,
            state: TcpState(info.state),
            birth: if info.flags & FLAG_BIRTH_UNKNOWN != 0 {
                Birth::Unknown {
                    seen_ns: info.seen_ns,
                }
            } else {
                Birth::Known(info.birth_ns)
            },
            state_since_ns: info.state_since_ns,
            generation: info.seen_ns,
            source: Source::Map,
            cookie: None,
            last_activity_ns: info.last_rx_ns.max(info.last_tx_ns),
            owner: (info.pid != 0).then_some(Owner {
                pid: info.pid,
                comm: info.comm,
            }),
        })
    }

    pub fn subject(&self) -> Subject {
        Subject {
            tuple: self.tuple,
            state: self.state,
            birth: self.birth,
            state_since_ns: self.state_since_ns,
            last_activity_ns: self.last_activity_ns,
            owner: self.owner,
        }
    }
}

/// Keys of seeded sockets count up from 1; kernel socket addresses, the keys of map
/// sockets, are far above (the kernel half of the address space), so they never meet.
const FIRST_SEED_KEY: u64 = 1;

/// A tuple identifies one connection only once both ports are set and it is not a
/// listener; before that (SYN_SENT has local port 0) it is not indexed.
fn indexable(t: &Tuple) -> bool {
    t.local.port() != 0 && t.remote.port() != 0
}

#[derive(Default)]
pub struct Tracker {
    conns: HashMap<u64, Tracked>,
    by_tuple: HashMap<Tuple, u64>,
    next_seed_key: u64,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker {
            next_seed_key: FIRST_SEED_KEY,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, key: u64) -> Option<&Tracked> {
        self.conns.get(&key)
    }

    pub fn key_of(&self, tuple: &Tuple) -> Option<u64> {
        self.by_tuple.get(tuple).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Tracked)> {
        self.conns.iter().map(|(k, t)| (*k, t))
    }

    /// Records `t` under `key`; returns the keys whose deadlines must be planned again
    /// (this one, and a seeded entry it replaces).
    pub fn upsert(&mut self, key: u64, mut t: Tracked) -> Vec<u64> {
        let mut touched = vec![key];
        if let Some(old) = self.conns.get(&key) {
            if self.by_tuple.get(&old.tuple) == Some(&key) {
                self.by_tuple.remove(&old.tuple);
            }
        }
        if indexable(&t.tuple) {
            if let Some(other) = self.by_tuple.insert(t.tuple, key) {
                if other != key {
                    // The same connection known twice: a seeded entry now seen by the
                    // kernel program. Keep the earlier sighting as the age bound.
                    if let Some(old) = self.conns.remove(&other) {
                        if let (Birth::Unknown { seen_ns: a }, Birth::Unknown { seen_ns: b }) =
                            (old.birth, t.birth)
                        {
                            t.birth = Birth::Unknown { seen_ns: a.min(b) };
                        }
                    }
                    touched.push(other);
                }
            }
        }
        self.conns.insert(key, t);
        touched
    }

    /// Takes in what the map entry says now (state, tuple, activity, owner), keeping what
    /// is known of the birth. Returns false when the entry is another socket's.
    pub fn refresh(&mut self, key: u64, info: &ConnInfo) -> bool {
        let Some(fresh) = Tracked::from_info(info) else {
            return false;
        };
        match self.conns.get(&key) {
            Some(t) if t.generation == info.seen_ns => {
                let merged = Tracked {
                    birth: t.birth,
                    owner: fresh.owner.or(t.owner),
                    last_activity_ns: fresh.last_activity_ns.max(t.last_activity_ns),
                    ..fresh
                };
                if merged != *t {
                    self.upsert(key, merged);
                }
                true
            }
            _ => false,
        }
    }

    /// Records activity learned elsewhere (`tcp_info`).
    pub fn note_activity(&mut self, key: u64, at_ns: u64) {
        if let Some(t) = self.conns.get_mut(&key) {
            t.last_activity_ns = t.last_activity_ns.max(at_ns);
        }
    }

    /// Records an owner learned elsewhere (`/proc`).
    pub fn note_owner(&mut self, key: u64, owner: Owner) {
        if let Some(t) = self.conns.get_mut(&key) {
            t.owner = Some(owner);
        }
    }

    /// Records a connection that entered TIME_WAIT at `since_ns`, keeping what was known
    /// of it; only done when a policy has a TIME_WAIT limit.
    pub fn time_wait(&mut self, was: &Tracked, since_ns: u64) -> Option<u64> {
        self.insert_outside_map(Tracked {
            state: TcpState::TIME_WAIT,
            state_since_ns: since_ns,
            source: Source::TimeWait,
            cookie: None,
            ..*was
        })
    }

    /// Records a socket the map does not hold, under a key of its own, unless its
    /// connection is known already.
    fn insert_outside_map(&mut self, t: Tracked) -> Option<u64> {
        if !indexable(&t.tuple) || self.by_tuple.contains_key(&t.tuple) {
            return None;
        }
        let key = self.next_seed_key;
        self.next_seed_key += 1;
        self.upsert(key, t);
        Some(key)
    }

    pub fn remove(&mut self, key: u64) -> Option<Tracked> {
        let t = self.conns.remove(&key)?;
        if self.by_tuple.get(&t.tuple) == Some(&key) {
            self.by_tuple.remove(&t.tuple);
        }
        Some(t)
    }

    /// Applies one kernel event; returns the keys to plan again.
    pub fn apply(&mut self, ev: &ConnEvent) -> Vec<u64> {
        if ev.kind == event_kind::CLOSED {
            // Only if it is the same socket: a CLOSED for an entry we never had is moot.
            if self
                .conns
                .get(&ev.key)
                .is_some_and(|t| t.generation == ev.info.seen_ns)
            {
                self.remove(ev.key);
            }
            return vec![ev.key];
        }
        match Tracked::from_info(&ev.info) {
            Some(t) => self.upsert(ev.key, t),
            None => Vec::new(),
        }
    }

    /// Records a socket found by a sock_diag dump that nothing else knows; its birth is
    /// unknown, so it counts as born no later than `seen_ns`, and as active last at
    /// `last_activity_ns` (0 if unknown).
    pub fn seed(
        &mut self,
        tuple: Tuple,
        state: TcpState,
        cookie: [u8; 8],
        seen_ns: u64,
        last_activity_ns: u64,
    ) -> Option<u64> {
        self.insert_outside_map(Tracked {
            tuple,
            state,
            birth: Birth::Unknown { seen_ns },
            state_since_ns: seen_ns,
            generation: seen_ns,
            source: Source::Seeded,
            cookie: Some(cookie),
            last_activity_ns,
            owner: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connwatch_common::{tcp_state, AF_INET};

    const SK: u64 = 0xffff_8880_0000_1000;

    fn info(state: u32, sport: u16, seen: u64, flags: u32) -> ConnInfo {
        let mut i = ConnInfo::zeroed();
        i.family = AF_INET;
        i.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        i.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        i.sport = sport;
        i.dport = 8080;
        i.state = state;
        i.seen_ns = seen;
        i.birth_ns = if flags == 0 { seen } else { 0 };
        i.state_since_ns = seen;
        i.flags = flags;
        i
    }

    fn ev(kind: u32, info: ConnInfo) -> ConnEvent {
        ConnEvent {
            key: SK,
            kind,
            oldstate: 0,
            info,
        }
    }

    #[test]
    fn lifecycle_open_establish_close() {
        let mut t = Tracker::new();
        t.apply(&ev(event_kind::OPENED, info(tcp_state::SYN_SENT, 0, 5, 0)));
        assert_eq!(t.len(), 1);
        let est = info(tcp_state::ESTABLISHED, 40000, 5, 0);
        assert_eq!(t.apply(&ev(event_kind::STATE, est)), vec![SK]);
        let tuple = Tuple::from_info(&est).unwrap();
        assert_eq!(t.key_of(&tuple), Some(SK));
        assert_eq!(t.get(SK).unwrap().birth, Birth::Known(5));
        t.apply(&ev(event_kind::CLOSED, est));
        assert!(t.is_empty() && t.key_of(&tuple).is_none());
    }

    #[test]
    fn a_stale_close_does_not_remove_a_new_socket_at_the_same_address() {
        let mut t = Tracker::new();
        t.apply(&ev(
            event_kind::OPENED,
            info(tcp_state::ESTABLISHED, 40000, 9, 0),
        ));
        // A CLOSED for the socket that held this address before (generation 3).
        t.apply(&ev(event_kind::CLOSED, info(tcp_state::CLOSE, 40000, 3, 0)));
        assert_eq!(t.get(SK).unwrap().generation, 9);
    }

    #[test]
    fn discovery_replaces_a_seed_and_keeps_the_earlier_sighting() {
        let mut t = Tracker::new();
        let est = info(tcp_state::ESTABLISHED, 40000, 0, 0);
        let tuple = Tuple::from_info(&est).unwrap();
        let seed = t
            .seed(tuple, TcpState::ESTABLISHED, [7; 8], 100, 0)
            .unwrap();
        assert_eq!(
            t.seed(tuple, TcpState::ESTABLISHED, [7; 8], 100, 0),
            None,
            "seeded twice"
        );
        let touched = t.apply(&ev(
            event_kind::DISCOVERED,
            info(tcp_state::CLOSE_WAIT, 40000, 500, FLAG_BIRTH_UNKNOWN),
        ));
        assert_eq!(touched, vec![SK, seed]);
        assert!(t.get(seed).is_none());
        let now = t.get(SK).unwrap();
        assert_eq!(now.birth, Birth::Unknown { seen_ns: 100 });
        assert_eq!(now.source, Source::Map);
        assert_eq!(t.len(), 1);
    }
}
