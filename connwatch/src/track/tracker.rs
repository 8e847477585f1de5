//! What the daemon knows of each socket, fed by the kernel's lifecycle events, the
//! pinned map at start-up and one sock_diag dump for sockets older than the program.

use super::packed::{Names, Packed};
use super::FastMap;
use hashbrown::HashTable;
use std::hash::BuildHasher;
use std::sync::Arc;

use connwatch_common::{
    event_kind, ConnEvent, ConnInfo, AF_INET, AF_INET6, FLAG_BIRTH_UNKNOWN, FLAG_OWNER_LISTENER,
};

use crate::conn::{Birth, Direction, Owner, SockId};
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
    /// Who the socket is: its cookie and network namespace, as the kernel recorded
    /// them (the map) or reported them (a dump). Every join and destroy uses it.
    pub id: SockId,
    pub source: Source,
    /// The cgroup v2 id of the process that opened or used it; 0 when unknown.
    pub cgroup_id: u64,
    /// Who opened it, where the kernel program saw its birth.
    pub direction: Option<Direction>,
    /// The device the socket is bound to (`SO_BINDTODEVICE`, an IPv6 scope); 0 if none.
    pub ifindex: u32,
    /// Last data in either direction, as `tcp_info` last told it; 0 if not yet asked.
    pub last_activity_ns: u64,
    pub owner: Option<Owner>,
    /// `owner` is the listener's, inherited by an accepted socket: shown, but never
    /// trusted to protect it (the accepting process may be another).
    pub owner_from_listener: bool,
}

impl Tracked {
    /// What a map entry says of its socket; None for an entry with no usable tuple, or
    /// one whose identity is not final yet (`ConnInfo::identity_pending`: an accepted
    /// child between its birth and its next state change, on kernels before 6.15).
    /// Whether [`Tracked::from_info`] makes an entry of this map value: its identity is
    /// final and its family one a tuple is made of.
    pub fn takes(info: &ConnInfo) -> bool {
        !info.identity_pending() && matches!(info.family, AF_INET | AF_INET6)
    }

    pub fn from_info(info: &ConnInfo) -> Option<Tracked> {
        if !Self::takes(info) {
            return None;
        }
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
            id: SockId::new(info.netns, info.cookie),
            source: Source::Map,
            cgroup_id: info.cgroup_id,
            direction: Direction::from_flags(info.flags),
            ifindex: info.bound_dev_if,
            last_activity_ns: 0,
            owner: (info.pid != 0).then_some(Owner {
                pid: info.pid,
                comm: info.comm,
            }),
            owner_from_listener: info.pid != 0 && info.flags & FLAG_OWNER_LISTENER != 0,
        })
    }

    /// The owner protections may be judged by: one the kernel saw use the socket
    /// (connect, listen) or /proc found holding it, never a listener's. Not one without
    /// a name: the kernel keeps the pid alone, and a process gone when the socket was
    /// read may have left it to another (a child), whose name only its inode tells.
    pub fn trusted_owner(&self) -> Option<Owner> {
        self.owner
            .filter(|o| !self.owner_from_listener && !o.name().is_empty())
    }

    /// When the connection last did something: its last data, or its birth.
    pub fn quiet_since(&self) -> u64 {
        self.last_activity_ns.max(self.birth.no_later_than())
    }

    /// What the policy looks at, the socket's cgroup path given by the caller (who
    /// knows the cgroup tree).
    pub fn subject_in(&self, cgroup: Option<Arc<str>>) -> Subject {
        Subject {
            netns: self.id.netns,
            direction: self.direction,
            cgroup,
            tuple: self.tuple,
            state: self.state,
            birth: self.birth,
            state_since_ns: self.state_since_ns,
            last_activity_ns: self.last_activity_ns,
            owner: self.trusted_owner(),
        }
    }
}

/// A socket a sock_diag dump found, as [`Tracker::seed`] takes it.
#[derive(Clone, Copy, Debug)]
pub struct Seed {
    pub id: SockId,
    pub tuple: Tuple,
    pub state: TcpState,
    pub ifindex: u32,
    /// First seen then: it is at least this old.
    pub seen_ns: u64,
    /// Last data either way, from tcp_info; 0 if unknown.
    pub last_activity_ns: u64,
}

/// The most shared names and cgroups kept beyond four per packed record before they
/// are built afresh ([`Tracker::repack`]).
const REPACK_AT: usize = 4096;

/// The identity of the socket under `key` in the tracker's two stores.
fn id_in(conns: &FastMap<u64, Packed>, wide: &FastMap<u64, Tracked>, key: u64) -> Option<SockId> {
    match conns.get(&key) {
        Some(p) => Some(p.id()),
        None => wide.get(&key).map(|t| t.id),
    }
}

/// Where an indexed key goes when the index grows: by the identity its record holds.
/// Every indexed key has a record (it is stored before it is indexed, and unindexed
/// before it goes).
fn rehash(
    conns: &FastMap<u64, Packed>,
    wide: &FastMap<u64, Tracked>,
    h: &foldhash::fast::RandomState,
    key: u64,
) -> u64 {
    let id = id_in(conns, wide, key);
    debug_assert!(id.is_some(), "key {key} is indexed without a record");
    id.map_or(0, |id| h.hash_one(id))
}

/// Keys of seeded sockets count up from 1; kernel socket addresses, the keys of map
/// sockets, are far above (the kernel half of the address space), so they never meet.
const FIRST_SEED_KEY: u64 = 1;

#[derive(Default)]
pub struct Tracker {
    /// The sockets whose record packs (IPv4, and IPv4-mapped), 64 bytes each.
    conns: FastMap<u64, Packed>,
    /// The others (IPv6 addresses; anything that does not pack exactly), whole.
    wide: FastMap<u64, Tracked>,
    /// The owner names and cgroups the packed records point into.
    names: Names,
    /// Each socket's key by its identity: one socket is known once, however it was
    /// learned (the map, a dump, a TIME_WAIT follow-up). Only the keys are stored,
    /// hashed by the identity their record holds (9 bytes a slot, where a map from
    /// identity to key took 25).
    by_id: HashTable<u64>,
    /// How identities are hashed into `by_id`.
    id_hash: foldhash::fast::RandomState,
    /// How many sockets each network namespace holds: a namespace with none is one
    /// the daemon need not keep a sock_diag socket in.
    per_netns: FastMap<u32, usize>,
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
        self.conns.len() + self.wide.len()
    }

    /// Room for `n` more sockets, for a one-shot run that loads a whole dump at once.
    pub fn reserve(&mut self, n: usize) {
        self.conns.reserve(n);
        let (conns, wide, h) = (&self.conns, &self.wide, &self.id_hash);
        self.by_id.reserve(n, |&k| rehash(conns, wide, h, k));
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty() && self.wide.is_empty()
    }

    /// What is known of the socket under `key` (a copy: records are stored packed).
    pub fn get(&self, key: u64) -> Option<Tracked> {
        match self.conns.get(&key) {
            Some(p) => Some(p.unpack(&self.names)),
            None => self.wide.get(&key).copied(),
        }
    }

    /// The identity of the socket under `key`, without unpacking the rest.
    fn id_at(&self, key: u64) -> Option<SockId> {
        id_in(&self.conns, &self.wide, key)
    }

    /// Indexes `key` under the identity its record holds (stored already).
    fn index(&mut self, id: SockId, key: u64) {
        let (conns, wide, h) = (&self.conns, &self.wide, &self.id_hash);
        self.by_id
            .insert_unique(h.hash_one(id), key, |&k| rehash(conns, wide, h, k));
    }

    /// Drops `key` from the index, where it is under `id`.
    fn unindex(&mut self, id: SockId, key: u64) {
        if let Ok(e) = self
            .by_id
            .find_entry(self.id_hash.hash_one(id), |&k| k == key)
        {
            e.remove();
        }
    }

    /// Stores `t` under `key`, packed where it packs.
    fn put(&mut self, key: u64, t: Tracked) {
        self.store(key, t);
        if self.names.len() > REPACK_AT + 4 * self.conns.len() {
            self.repack();
        }
    }

    fn store(&mut self, key: u64, t: Tracked) {
        match Packed::pack(&t, &mut self.names) {
            Some(p) => {
                self.conns.insert(key, p);
                self.wide.remove(&key);
            }
            None => {
                self.wide.insert(key, t);
                self.conns.remove(&key);
            }
        }
    }

    /// Builds the shared names and cgroups afresh from the records that use them.
    /// Cgroups come and go with containers: one no socket uses is not kept forever.
    /// Done when the tables hold far more values than records use, so its cost is
    /// spread over many stores.
    fn repack(&mut self) {
        let names = std::mem::take(&mut self.names);
        for (key, p) in std::mem::take(&mut self.conns) {
            self.store(key, p.unpack(&names));
        }
    }

    fn take(&mut self, key: u64) -> Option<Tracked> {
        match self.conns.remove(&key) {
            Some(p) => Some(p.unpack(&self.names)),
            None => self.wide.remove(&key),
        }
    }

    /// How many network namespaces hold tracked sockets.
    pub fn namespaces(&self) -> usize {
        self.per_netns.len()
    }

    /// How many tracked sockets live in namespace `netns`.
    pub fn in_netns(&self, netns: u32) -> usize {
        self.per_netns.get(&netns).copied().unwrap_or(0)
    }

    fn count_in(&mut self, netns: u32, up: bool) {
        let n = self.per_netns.entry(netns).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_netns.remove(&netns);
            }
        }
    }

    pub fn key_of(&self, id: &SockId) -> Option<u64> {
        self.by_id
            .find(self.id_hash.hash_one(id), |&k| self.id_at(k) == Some(*id))
            .copied()
    }

    /// The keys of the tracked sockets with this tuple: one per network namespace that
    /// has such a connection. A walk: only a manual destroy asks.
    pub fn keys_with_tuple(&self, tuple: &Tuple) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .iter()
            .filter(|(_, t)| t.tuple == *tuple)
            .map(|(k, _)| k)
            .collect();
        keys.sort_unstable();
        keys
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, Tracked)> + '_ {
        self.conns
            .iter()
            .map(|(k, p)| (*k, p.unpack(&self.names)))
            .chain(self.wide.iter().map(|(k, t)| (*k, *t)))
    }

    /// Records `t` under `key`; returns the keys whose deadlines must be planned again
    /// (this one, and a seeded entry it replaces).
    pub fn upsert(&mut self, key: u64, mut t: Tracked) -> Vec<u64> {
        let mut touched = vec![key];
        let old_id = self.id_at(key);
        if let Some(old_id) = old_id {
            self.unindex(old_id, key);
        }
        if let Some(other) = self.key_of(&t.id) {
            // The same connection known twice: a seeded entry now seen by the kernel
            // program. Keep the earlier sighting as the age bound.
            self.unindex(t.id, other);
            if let Some(old) = self.take(other) {
                self.count_in(old.id.netns, false);
                if let (Birth::Unknown { seen_ns: a }, Birth::Unknown { seen_ns: b }) =
                    (old.birth, t.birth)
                {
                    t.birth = Birth::Unknown { seen_ns: a.min(b) };
                }
            }
            touched.push(other);
        }
        let id = t.id;
        self.put(key, t);
        self.index(id, key);
        if let Some(old) = old_id {
            self.count_in(old.netns, false);
        }
        self.count_in(id.netns, true);
        touched
    }

    /// Takes in what the map entry says now (state, tuple, activity, owner), keeping what
    /// is known of the birth. Returns false when the entry is another socket's.
    pub fn refresh(&mut self, key: u64, info: &ConnInfo) -> bool {
        let Some(fresh) = Tracked::from_info(info) else {
            return false;
        };
        match self.get(key) {
            Some(t) if t.id == fresh.id => {
                // An owner found holding the socket outranks the listener's.
                let (owner, owner_from_listener) = match (t.trusted_owner(), fresh.owner) {
                    (Some(o), _) => (Some(o), false),
                    (None, Some(o)) => (Some(o), fresh.owner_from_listener),
                    (None, None) => (t.owner, t.owner_from_listener),
                };
                let merged = Tracked {
                    birth: t.birth,
                    owner,
                    owner_from_listener,
                    cgroup_id: if fresh.cgroup_id != 0 {
                        fresh.cgroup_id
                    } else {
                        t.cgroup_id
                    },
                    direction: fresh.direction.or(t.direction),
                    last_activity_ns: fresh.last_activity_ns.max(t.last_activity_ns),
                    ..fresh
                };
                if merged != t {
                    self.upsert(key, merged);
                }
                true
            }
            _ => false,
        }
    }

    /// Records activity learned elsewhere (`tcp_info`).
    pub fn note_activity(&mut self, key: u64, at_ns: u64) {
        if let Some(mut t) = self.get(key) {
            if at_ns > t.last_activity_ns {
                t.last_activity_ns = at_ns;
                self.put(key, t);
            }
        }
    }

    /// Records an owner learned elsewhere (`/proc`).
    pub fn note_owner(&mut self, key: u64, owner: Owner) {
        if let Some(mut t) = self.get(key) {
            t.owner = Some(owner);
            t.owner_from_listener = false;
            self.put(key, t);
        }
    }

    /// Records a connection that entered TIME_WAIT at `since_ns`, keeping what was known
    /// of it; only done when a policy has a TIME_WAIT limit.
    pub fn time_wait(&mut self, was: &Tracked, since_ns: u64) -> Option<u64> {
        self.insert_outside_map(Tracked {
            state: TcpState::TIME_WAIT,
            state_since_ns: since_ns,
            source: Source::TimeWait,
            ..*was
        })
    }

    /// Records a socket the map does not hold, under a key of its own, unless its
    /// connection is known already.
    fn insert_outside_map(&mut self, t: Tracked) -> Option<u64> {
        if self.key_of(&t.id).is_some() {
            return None;
        }
        let key = self.next_seed_key;
        self.next_seed_key += 1;
        self.upsert(key, t);
        Some(key)
    }

    pub fn remove(&mut self, key: u64) -> Option<Tracked> {
        let t = self.take(key)?;
        self.count_in(t.id.netns, false);
        self.unindex(t.id, key);
        Some(t)
    }

    /// Applies one kernel event; returns the keys to plan again.
    pub fn apply(&mut self, ev: &ConnEvent) -> Vec<u64> {
        if ev.kind == event_kind::CLOSED {
            // Only if it is the same socket: a CLOSED for an entry we never had is moot.
            if self.id_at(ev.key) == Some(SockId::new(ev.info.netns, ev.info.cookie)) {
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
    pub fn seed(&mut self, s: Seed) -> Option<u64> {
        self.insert_outside_map(Tracked {
            tuple: s.tuple,
            state: s.state,
            birth: Birth::Unknown { seen_ns: s.seen_ns },
            state_since_ns: s.seen_ns,
            id: s.id,
            source: Source::Seeded,
            cgroup_id: 0,
            direction: None,
            ifindex: s.ifindex,
            last_activity_ns: s.last_activity_ns,
            owner: None,
            owner_from_listener: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::loopback_info;
    use connwatch_common::tcp_state;

    const SK: u64 = 0xffff_8880_0000_1000;
    const HOST: u32 = 4026531840;
    const POD: u32 = 4026532999;

    /// A map entry of socket `cookie` in namespace `netns`.
    fn info_in(netns: u32, state: u32, sport: u16, cookie: u64, flags: u32) -> ConnInfo {
        let mut i = loopback_info(netns, state, sport, cookie);
        i.birth_ns = if flags == 0 { cookie } else { 0 };
        i.flags = flags;
        i
    }

    fn info(state: u32, sport: u16, cookie: u64, flags: u32) -> ConnInfo {
        info_in(HOST, state, sport, cookie, flags)
    }

    fn ev_at(key: u64, kind: u32, info: ConnInfo) -> ConnEvent {
        ConnEvent {
            key,
            kind,
            oldstate: 0,
            info,
        }
    }

    fn ev(kind: u32, info: ConnInfo) -> ConnEvent {
        ev_at(SK, kind, info)
    }

    #[test]
    fn lifecycle_open_establish_close() {
        let mut t = Tracker::new();
        t.apply(&ev(event_kind::OPENED, info(tcp_state::SYN_SENT, 0, 5, 0)));
        assert_eq!(t.len(), 1);
        let est = info(tcp_state::ESTABLISHED, 40000, 5, 0);
        assert_eq!(t.apply(&ev(event_kind::STATE, est)), vec![SK]);
        let id = SockId::new(HOST, 5);
        assert_eq!(t.key_of(&id), Some(SK));
        assert_eq!(t.get(SK).unwrap().birth, Birth::Known(5));
        t.apply(&ev(event_kind::CLOSED, est));
        assert!(t.is_empty() && t.key_of(&id).is_none());
    }

    #[test]
    fn a_stale_close_does_not_remove_a_new_socket_at_the_same_address() {
        let mut t = Tracker::new();
        t.apply(&ev(
            event_kind::OPENED,
            info(tcp_state::ESTABLISHED, 40000, 9, 0),
        ));
        // A CLOSED for the socket that held this address before (cookie 3).
        t.apply(&ev(event_kind::CLOSED, info(tcp_state::CLOSE, 40000, 3, 0)));
        assert_eq!(t.get(SK).unwrap().id.cookie, 9);
    }

    #[test]
    fn twins_in_two_namespaces_are_two_sockets() {
        let mut t = Tracker::new();
        let host = info_in(HOST, tcp_state::ESTABLISHED, 40000, 11, 0);
        let pod = info_in(POD, tcp_state::ESTABLISHED, 40000, 12, 0);
        assert_eq!(Tuple::from_info(&host), Tuple::from_info(&pod));
        t.apply(&ev_at(SK, event_kind::OPENED, host));
        t.apply(&ev_at(SK + 64, event_kind::OPENED, pod));
        assert_eq!(t.len(), 2, "neither evicts the other");
        assert_eq!(t.key_of(&SockId::new(HOST, 11)), Some(SK));
        assert_eq!(t.key_of(&SockId::new(POD, 12)), Some(SK + 64));
        let tuple = Tuple::from_info(&host).unwrap();
        assert_eq!(t.keys_with_tuple(&tuple), vec![SK, SK + 64]);
        assert_eq!((t.in_netns(HOST), t.in_netns(POD)), (1, 1));
        // The pod's close removes the pod's socket only.
        t.apply(&ev_at(SK + 64, event_kind::CLOSED, pod));
        assert_eq!(t.keys_with_tuple(&tuple), vec![SK]);
        assert_eq!((t.in_netns(HOST), t.in_netns(POD)), (1, 0));
    }

    #[test]
    fn a_listeners_owner_is_shown_but_not_trusted_and_never_replaces_a_holder() {
        let mut t = Tracker::new();
        let mut accepted = info(tcp_state::ESTABLISHED, 8080, 7, FLAG_OWNER_LISTENER);
        accepted.pid = 10;
        accepted.comm[..5].copy_from_slice(b"inetd");
        t.apply(&ev_at(SK, event_kind::OPENED, accepted));
        let got = t.get(SK).unwrap();
        assert_eq!(got.owner.map(|o| o.pid), Some(10), "shown");
        assert_eq!(got.trusted_owner(), None, "not trusted");
        assert_eq!(got.subject_in(None).owner, None, "not judged by");
        // /proc found another process holding it: that one counts, and stays.
        t.note_owner(SK, Owner::new(11, "sshd"));
        assert_eq!(t.get(SK).unwrap().trusted_owner().map(|o| o.pid), Some(11));
        assert!(t.refresh(SK, &accepted));
        let got = t.get(SK).unwrap();
        assert_eq!(got.trusted_owner().map(|o| o.pid), Some(11), "{got:?}");
        // A socket that connected is its own process's.
        let mut out = info(tcp_state::ESTABLISHED, 40001, 8, 0);
        out.pid = 12;
        out.comm[..4].copy_from_slice(b"curl");
        t.apply(&ev_at(SK + 64, event_kind::OPENED, out));
        assert_eq!(
            t.get(SK + 64).unwrap().trusted_owner().map(|o| o.pid),
            Some(12)
        );
        // Unless its process had gone when the socket was read (no name): a child may
        // hold it now, which only the socket's inode tells.
        let mut orphan = info(tcp_state::ESTABLISHED, 40002, 9, 0);
        orphan.pid = 13;
        t.apply(&ev_at(SK + 128, event_kind::OPENED, orphan));
        let got = t.get(SK + 128).unwrap();
        assert_eq!(got.owner.map(|o| o.pid), Some(13), "shown");
        assert_eq!(got.trusted_owner(), None, "not trusted");
    }

    #[test]
    fn ipv6_sockets_are_kept_whole_beside_packed_ones_and_move_between() {
        let mut t = Tracker::new();
        let v4 = info(tcp_state::ESTABLISHED, 40000, 21, 0);
        let mut v6 = info(tcp_state::ESTABLISHED, 40001, 22, 0);
        v6.family = AF_INET6;
        v6.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        v6.daddr = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        t.apply(&ev_at(SK, event_kind::OPENED, v4));
        t.apply(&ev_at(SK + 64, event_kind::OPENED, v6));
        assert_eq!((t.conns.len(), t.wide.len(), t.len()), (1, 1, 2));
        for (key, info) in [(SK, v4), (SK + 64, v6)] {
            assert_eq!(t.get(key), Tracked::from_info(&info), "comes back whole");
        }
        let mut keys: Vec<u64> = t.iter().map(|(k, _)| k).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![SK, SK + 64]);
        // The address reused by an IPv4 socket: the record moves to the packed table.
        t.apply(&ev_at(SK + 64, event_kind::CLOSED, v6));
        let v4b = info(tcp_state::ESTABLISHED, 40002, 23, 0);
        t.apply(&ev_at(SK + 64, event_kind::OPENED, v4b));
        assert_eq!((t.conns.len(), t.wide.len()), (2, 0));
        t.note_activity(SK + 64, 99);
        assert_eq!(t.get(SK + 64).unwrap().last_activity_ns, 99);
        assert_eq!(t.remove(SK).map(|r| r.id), Some(SockId::new(HOST, 21)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn cgroups_no_socket_uses_are_not_kept_forever() {
        let mut t = Tracker::new();
        let mut kept = info(tcp_state::ESTABLISHED, 40000, 1, 0);
        kept.cgroup_id = 7;
        t.apply(&ev_at(SK, event_kind::OPENED, kept));
        // Containers come and go, each with a cgroup of its own and one connection.
        for i in 0..20_000u64 {
            let mut c = info(tcp_state::ESTABLISHED, 40001, 100 + i, 0);
            c.cgroup_id = 1000 + i;
            t.apply(&ev_at(SK + 64, event_kind::OPENED, c));
            t.apply(&ev_at(SK + 64, event_kind::CLOSED, c));
        }
        assert!(t.names.len() < 2 * REPACK_AT, "{} kept", t.names.len());
        assert_eq!(
            t.get(SK).map(|r| r.cgroup_id),
            Some(7),
            "the one in use kept"
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn discovery_replaces_a_seed_and_keeps_the_earlier_sighting() {
        let mut t = Tracker::new();
        let est = info(tcp_state::ESTABLISHED, 40000, 500, FLAG_BIRTH_UNKNOWN);
        let seed = Seed {
            id: SockId::new(HOST, 500),
            tuple: Tuple::from_info(&est).unwrap(),
            state: TcpState::ESTABLISHED,
            ifindex: 0,
            seen_ns: 100,
            last_activity_ns: 0,
        };
        let seeded = t.seed(seed).unwrap();
        assert_eq!(t.seed(seed), None, "seeded twice");
        // The same tuple in another namespace is another socket.
        let twin = t
            .seed(Seed {
                id: SockId::new(POD, 501),
                ..seed
            })
            .unwrap();
        let touched = t.apply(&ev(
            event_kind::DISCOVERED,
            info(tcp_state::CLOSE_WAIT, 40000, 500, FLAG_BIRTH_UNKNOWN),
        ));
        assert_eq!(touched, vec![SK, seeded]);
        assert!(t.get(seeded).is_none());
        let now = t.get(SK).unwrap();
        assert_eq!(now.birth, Birth::Unknown { seen_ns: 100 });
        assert_eq!(now.source, Source::Map);
        assert!(t.get(twin).is_some(), "the twin is untouched");
        assert_eq!(t.len(), 2);
    }
}
