//! A followed socket's record as the tracker stores it: 64 bytes where [`Tracked`] is
//! 160. A policy that follows every socket (`--idle`) keeps one per connection, so
//! this is most of the daemon's memory on a busy host.
//!
//! Only what packs exactly is packed: IPv4 tuples (and IPv4-mapped IPv6 ones, a
//! dual-stack socket talking IPv4) with no flow label or scope, a state that fits a
//! byte, an owner name among the first 65,536 distinct ones and a cgroup among the
//! first 2^32. Anything else is kept whole by the tracker, so unpacking always gives
//! back what was stored.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::tracker::{Source, Tracked};
use super::FastMap;
use crate::conn::{Birth, Direction, Owner, SockId, TcpState, Tuple};

#[derive(Clone, Copy, Debug)]
pub(super) struct Packed {
    /// `Birth::Known`'s time, or `Birth::Unknown`'s `seen_ns` (told apart by a bit).
    birth_ns: u64,
    state_since_ns: u64,
    last_activity_ns: u64,
    cookie: u64,
    local: u32,
    remote: u32,
    netns: u32,
    ifindex: u32,
    pid: u32,
    /// The cgroup id, as an index into [`Names::cgroups`].
    cgroup: u32,
    local_port: u16,
    remote_port: u16,
    /// The owner's name, as an index into [`Names::comms`].
    comm: u16,
    state: u8,
    bits: u8,
}

const BIRTH_KNOWN: u8 = 1;
const MAPPED: u8 = 1 << 1;
const OWNER: u8 = 1 << 2;
const OWNER_FROM_LISTENER: u8 = 1 << 3;
const DIRECTION_SHIFT: u8 = 4;
const SOURCE_SHIFT: u8 = 6;

/// Values many sockets share, each stored once and named by its index: a host runs
/// few distinct process names and cgroups at a time. The tracker builds the tables
/// afresh when they hold many more than its records use.
pub(super) struct Table<T> {
    values: Vec<T>,
    index: FastMap<T, u32>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            values: Vec::new(),
            index: FastMap::default(),
        }
    }
}

impl<T: Copy + Eq + std::hash::Hash> Table<T> {
    /// The index of `v`, below `limit`; None once the table holds `limit` others.
    fn id(&mut self, v: T, limit: usize) -> Option<u32> {
        if let Some(id) = self.index.get(&v) {
            return Some(*id);
        }
        if self.values.len() >= limit {
            return None;
        }
        let id = u32::try_from(self.values.len()).ok()?;
        self.values.push(v);
        self.index.insert(v, id);
        Some(id)
    }

    fn get(&self, id: u32) -> T {
        self.values[id as usize]
    }
}

/// The shared values packed records point into.
#[derive(Default)]
pub(super) struct Names {
    comms: Table<[u8; 16]>,
    cgroups: Table<u64>,
}

impl Names {
    /// How many values are kept.
    pub(super) fn len(&self) -> usize {
        self.comms.values.len() + self.cgroups.values.len()
    }
}

/// An IPv4 endpoint and whether it came IPv4-mapped; None for one that does not pack.
fn v4_of(addr: SocketAddr) -> Option<(Ipv4Addr, u16, bool)> {
    match addr {
        SocketAddr::V4(a) => Some((*a.ip(), a.port(), false)),
        SocketAddr::V6(a) if a.flowinfo() == 0 && a.scope_id() == 0 => {
            a.ip().to_ipv4_mapped().map(|ip| (ip, a.port(), true))
        }
        SocketAddr::V6(_) => None,
    }
}

fn endpoint(ip: u32, port: u16, mapped: bool) -> SocketAddr {
    let ip = Ipv4Addr::from_bits(ip);
    if mapped {
        SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(ip, port))
    }
}

fn source_bits(s: Source) -> u8 {
    match s {
        Source::Map => 0,
        Source::Seeded => 1,
        Source::TimeWait => 2,
    }
}

fn direction_bits(d: Option<Direction>) -> u8 {
    match d {
        None => 0,
        Some(Direction::In) => 1,
        Some(Direction::Out) => 2,
    }
}

impl Packed {
    /// `t` packed, or None when some part of it does not pack exactly.
    pub(super) fn pack(t: &Tracked, names: &mut Names) -> Option<Packed> {
        // The state and addresses, which may refuse the record, come before a name or
        // cgroup is kept for it.
        let state = u8::try_from(t.state.0).ok()?;
        let (local, local_port, l_mapped) = v4_of(t.tuple.local)?;
        let (remote, remote_port, r_mapped) = v4_of(t.tuple.remote)?;
        if l_mapped != r_mapped {
            return None;
        }
        let (birth_ns, known) = match t.birth {
            Birth::Known(ns) => (ns, BIRTH_KNOWN),
            Birth::Unknown { seen_ns } => (seen_ns, 0),
        };
        let (pid, comm, owner) = match t.owner {
            Some(o) => (o.pid, names.comms.id(o.comm, 1 << 16)? as u16, OWNER),
            None => (0, 0, 0),
        };
        let bits = known
            | if l_mapped { MAPPED } else { 0 }
            | owner
            | if t.owner_from_listener {
                OWNER_FROM_LISTENER
            } else {
                0
            }
            | direction_bits(t.direction) << DIRECTION_SHIFT
            | source_bits(t.source) << SOURCE_SHIFT;
        Some(Packed {
            birth_ns,
            state_since_ns: t.state_since_ns,
            last_activity_ns: t.last_activity_ns,
            cookie: t.id.cookie,
            cgroup: names.cgroups.id(t.cgroup_id, u32::MAX as usize)?,
            local: local.to_bits(),
            remote: remote.to_bits(),
            netns: t.id.netns,
            ifindex: t.ifindex,
            pid,
            local_port,
            remote_port,
            comm,
            state,
            bits,
        })
    }

    pub(super) fn unpack(&self, names: &Names) -> Tracked {
        let mapped = self.bits & MAPPED != 0;
        Tracked {
            tuple: Tuple::new(
                endpoint(self.local, self.local_port, mapped),
                endpoint(self.remote, self.remote_port, mapped),
            ),
            state: TcpState(u32::from(self.state)),
            birth: if self.bits & BIRTH_KNOWN != 0 {
                Birth::Known(self.birth_ns)
            } else {
                Birth::Unknown {
                    seen_ns: self.birth_ns,
                }
            },
            state_since_ns: self.state_since_ns,
            id: self.id(),
            source: match (self.bits >> SOURCE_SHIFT) & 3 {
                0 => Source::Map,
                1 => Source::Seeded,
                _ => Source::TimeWait,
            },
            cgroup_id: names.cgroups.get(self.cgroup),
            direction: match (self.bits >> DIRECTION_SHIFT) & 3 {
                0 => None,
                1 => Some(Direction::In),
                _ => Some(Direction::Out),
            },
            ifindex: self.ifindex,
            last_activity_ns: self.last_activity_ns,
            owner: (self.bits & OWNER != 0).then(|| Owner {
                pid: self.pid,
                comm: names.comms.get(u32::from(self.comm)),
            }),
            owner_from_listener: self.bits & OWNER_FROM_LISTENER != 0,
        }
    }

    pub(super) fn id(&self) -> SockId {
        SockId::new(self.netns, self.cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(local: SocketAddr, remote: SocketAddr) -> Tracked {
        Tracked {
            tuple: Tuple::new(local, remote),
            state: TcpState::ESTABLISHED,
            birth: Birth::Known(1_000),
            state_since_ns: 2_000,
            id: SockId::new(4026531840, 0xdead_beef),
            source: Source::Map,
            cgroup_id: 77,
            direction: Some(Direction::Out),
            ifindex: 3,
            last_activity_ns: 5_000,
            owner: Some(Owner::new(42, "nginx")),
            owner_from_listener: true,
        }
    }

    #[test]
    fn a_record_is_64_bytes() {
        assert_eq!(std::mem::size_of::<Packed>(), 64);
    }

    #[test]
    fn every_field_comes_back() {
        let mut names = Names::default();
        let v4 = tracked(
            "10.0.0.1:40000".parse().unwrap(),
            "192.168.1.9:443".parse().unwrap(),
        );
        let mapped = tracked(
            "[::ffff:10.0.0.1]:8080".parse().unwrap(),
            "[::ffff:10.0.0.2]:51000".parse().unwrap(),
        );
        let others = [
            Tracked {
                birth: Birth::Unknown { seen_ns: 9 },
                source: Source::Seeded,
                direction: None,
                owner: None,
                owner_from_listener: false,
                ..v4
            },
            Tracked {
                source: Source::TimeWait,
                direction: Some(Direction::In),
                state: TcpState::TIME_WAIT,
                owner: Some(Owner::new(7, "sshd")),
                ..mapped
            },
        ];
        for t in [v4, mapped].iter().chain(others.iter()) {
            let p = Packed::pack(t, &mut names).expect("packs");
            assert_eq!(p.unpack(&names), *t);
            assert_eq!(p.id(), t.id);
        }
        assert_eq!(names.comms.values.len(), 2, "each name kept once");
        assert_eq!(names.cgroups.values, vec![77], "each cgroup kept once");
    }

    #[test]
    fn a_full_table_refuses_a_new_value_and_keeps_the_old() {
        let mut table = Table::default();
        assert_eq!(table.id(5u64, 2), Some(0));
        assert_eq!(table.id(6, 2), Some(1));
        assert_eq!(table.id(7, 2), None, "full");
        assert_eq!(table.id(5, 2), Some(0));
        assert_eq!(table.get(1), 6);
    }

    #[test]
    fn what_does_not_pack_exactly_is_refused() {
        let mut names = Names::default();
        let v6 = tracked(
            "[2001:db8::1]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        assert!(Packed::pack(&v6, &mut names).is_none());
        let scoped = tracked(
            SocketAddr::V6(SocketAddrV6::new(
                Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped(),
                1,
                0,
                2,
            )),
            "[::ffff:10.0.0.2]:2".parse().unwrap(),
        );
        assert!(Packed::pack(&scoped, &mut names).is_none());
        let mixed = tracked(
            "10.0.0.1:1".parse().unwrap(),
            "[::ffff:10.0.0.2]:2".parse().unwrap(),
        );
        assert!(Packed::pack(&mixed, &mut names).is_none());
        let odd_state = Tracked {
            state: TcpState(300),
            ..tracked("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap())
        };
        assert!(Packed::pack(&odd_state, &mut names).is_none());
    }
}
