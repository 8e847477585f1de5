//! Per-address connection counts, kept incrementally: each socket joins or leaves its
//! address's group as events arrive, so finding who is over a limit never means
//! counting every socket. An address is counted per network namespace: the same
//! address in two namespaces is two different peers.

use std::collections::{BTreeSet, HashMap};

use crate::track::FastMap;
use std::net::IpAddr;

use crate::policy::RuleId;

/// A rule, a network namespace (by inode) and a remote address in it.
pub type Group = (RuleId, u32, IpAddr);

#[derive(Default)]
pub struct PerIp {
    /// Members of each (rule, namespace, remote address), oldest first: (birth bound, key).
    groups: HashMap<Group, BTreeSet<(u64, u64)>>,
    /// The groups each socket is in, with the birth it was filed under.
    member: FastMap<u64, (u64, Vec<Group>)>,
}

impl PerIp {
    /// Files `key` under exactly `groups` (none to leave them all).
    pub fn set(&mut self, key: u64, birth: u64, groups: Vec<Group>) {
        if let Some((b, old)) = self.member.get(&key) {
            if *b == birth && *old == groups {
                return;
            }
        }
        self.remove(key);
        if groups.is_empty() {
            return;
        }
        for g in &groups {
            self.groups.entry(*g).or_default().insert((birth, key));
        }
        self.member.insert(key, (birth, groups));
    }

    pub fn remove(&mut self, key: u64) {
        let Some((birth, groups)) = self.member.remove(&key) else {
            return;
        };
        for g in groups {
            if let Some(set) = self.groups.get_mut(&g) {
                set.remove(&(birth, key));
                if set.is_empty() {
                    self.groups.remove(&g);
                }
            }
        }
    }

    /// The sockets over `limit(rule)` in the groups `key` belongs to: the newest
    /// beyond the limit, with the rule they break.
    pub fn over_limit(&self, key: u64, limit: impl Fn(RuleId) -> u32) -> Vec<(u64, RuleId)> {
        let Some((_, groups)) = self.member.get(&key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for g in groups {
            let Some(set) = self.groups.get(g) else {
                continue;
            };
            let n = limit(g.0) as usize;
            out.extend(set.iter().skip(n).map(|(_, k)| (*k, g.0)));
        }
        out
    }

    /// The rule `key` breaks now, if any.
    pub fn breaks(&self, key: u64, limit: impl Fn(RuleId) -> u32) -> Option<RuleId> {
        let (birth, groups) = self.member.get(&key)?;
        groups.iter().find_map(|g| {
            let set = self.groups.get(g)?;
            let older = set.range(..(*birth, key)).count();
            (older >= limit(g.0) as usize).then_some(g.0)
        })
    }

    pub fn count(&self, rule: RuleId, netns: u32, ip: IpAddr) -> usize {
        self.groups.get(&(rule, netns, ip)).map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));
    const NS: u32 = 4026531840;

    #[test]
    fn the_newest_beyond_the_limit_are_over() {
        let mut p = PerIp::default();
        for k in 1..=4u64 {
            p.set(k, k * 10, vec![(0, NS, IP)]);
        }
        p.set(9, 5, vec![(0, NS, OTHER)]);
        let limit = |_| 2;
        assert_eq!(p.over_limit(1, limit), vec![(3, 0), (4, 0)]);
        assert_eq!(p.breaks(1, limit), None);
        assert_eq!(p.breaks(2, limit), None);
        assert_eq!(p.breaks(3, limit), Some(0));
        assert_eq!(p.breaks(9, limit), None);
        // One leaves: the newest is still over, the one before it no longer.
        p.remove(2);
        assert_eq!(p.breaks(3, limit), None);
        assert_eq!(p.breaks(4, limit), Some(0));
        assert_eq!(p.count(0, NS, IP), 3);
    }

    #[test]
    fn leaving_every_group_forgets_the_socket() {
        let mut p = PerIp::default();
        p.set(1, 10, vec![(0, NS, IP), (1, NS, IP)]);
        p.set(1, 10, vec![]);
        assert_eq!(p.count(0, NS, IP), 0);
        assert!(p.groups.is_empty() && p.member.is_empty());
    }

    #[test]
    fn an_address_counts_per_namespace() {
        let mut p = PerIp::default();
        p.set(1, 10, vec![(0, NS, IP)]);
        p.set(2, 20, vec![(0, NS + 1, IP)]);
        let limit = |_| 1;
        assert_eq!(p.breaks(2, limit), None, "another namespace's peer");
        assert_eq!(p.count(0, NS, IP), 1);
        p.set(3, 30, vec![(0, NS, IP)]);
        assert_eq!(p.breaks(3, limit), Some(0));
    }
}
