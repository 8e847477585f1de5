//! Bringing the tracker and the map in line with the kernel's socket table: at
//! start-up and after the kernel reports dropped records.

use std::collections::{HashMap, HashSet};

use super::per_ip::PerIp;
use super::{ms, Engine};
use crate::conn::{cookie_from_diag, SockId, TcpState};
use crate::kernel::netns::Dump;
use crate::kernel::ConnMap;
use crate::policy::Policy;
use crate::track::{Seed, Source, Tracked};
use connwatch_common::ConnInfo;

#[derive(Default, Debug)]
pub struct Reconciled {
    pub from_map: usize,
    pub seeded: usize,
    pub stale: usize,
}

impl Engine {
    /// Brings the tracker and the map in line with the kernel's socket tables: drops
    /// entries of sockets that are gone, and seeds sockets nothing recorded. Each
    /// socket is judged by its own namespace's dump: a namespace that could not be
    /// dumped loses nothing, one that no longer exists loses everything.
    ///
    /// Returns the keys of stale map entries: the caller that owns the map removes them.
    pub fn reconcile(
        &mut self,
        conns: Option<&ConnMap>,
        dump: &Dump,
        now: u64,
    ) -> (Reconciled, Vec<u64>) {
        let entries = conns
            .into_iter()
            .flat_map(|c| c.iter())
            .filter_map(Result::ok);
        self.reconcile_with(entries, dump, now)
    }

    /// [`Engine::reconcile`] with the map's entries given.
    pub fn reconcile_with(
        &mut self,
        entries: impl Iterator<Item = (u64, ConnInfo)>,
        dump: &Dump,
        now: u64,
    ) -> (Reconciled, Vec<u64>) {
        let mut done = Reconciled::default();
        let live: HashMap<SockId, TcpState> = dump
            .sockets
            .iter()
            .map(|(ns, s)| (SockId::new(*ns, cookie_from_diag(s.cookie)), s.state))
            .collect();
        // Whether a socket is known to be gone: its namespace was dumped without it (or
        // with it in another state than TIME_WAIT, for a TIME_WAIT socket followed, and
        // the reverse), or the namespace itself is gone.
        let gone = |id: &SockId, time_wait: bool| {
            if dump.dumped.contains(&id.netns) {
                match live.get(id) {
                    None => true,
                    Some(s) => (*s == TcpState::TIME_WAIT) != time_wait,
                }
            } else {
                !dump.existing.contains(&id.netns)
            }
        };
        let mut in_map = HashSet::new();
        // Every socket the map holds, followed or not: none is seeded from the dump.
        let mut map_ids = HashSet::new();
        let mut stale_keys = Vec::new();
        for (key, info) in entries {
            let Some(t) = Tracked::from_info(&info) else {
                continue;
            };
            // An entry whose socket is not in its namespace's dump died while no
            // program watched, unless it was made after the dump began; so did one
            // now in TIME_WAIT, a state the map never holds.
            if info.seen_ns < now && gone(&t.id, false) {
                stale_keys.push(key);
                continue;
            }
            map_ids.insert(t.id);
            // Filtered, only what can matter is followed; the map holds the rest.
            if !self.follows(&info) {
                continue;
            }
            in_map.insert(key);
            if !self.tracker.refresh(key, &info) {
                self.tracker.upsert(key, t);
            }
            done.from_map += 1;
        }
        done.stale = stale_keys.len();
        let lost: Vec<u64> = self
            .tracker
            .iter()
            .filter(|(k, t)| match t.source {
                Source::Map => !in_map.contains(k),
                Source::Seeded => gone(&t.id, false),
                Source::TimeWait => gone(&t.id, true),
            })
            .map(|(k, _)| k)
            .collect();
        for key in lost {
            self.tracker.remove(key);
        }
        // The dump's tcp_info says when data last moved, exactly: what the kernel
        // program's activity stamps say coarsely, or not at all on a kernel without
        // those hooks.
        for (netns, s) in &dump.sockets {
            let Some(a) = s.activity else { continue };
            let id = SockId::new(*netns, cookie_from_diag(s.cookie));
            if let Some(key) = self.tracker.key_of(&id) {
                self.tracker
                    .note_activity(key, now.saturating_sub(ms(a.quiet_ms())));
            }
        }
        let time_wait_limited = self.policy.limits_state(TcpState::TIME_WAIT);
        for (netns, s) in &dump.sockets {
            if !Policy::actionable(s.state)
                || (s.state == TcpState::TIME_WAIT && !time_wait_limited)
            {
                continue;
            }
            if map_ids.contains(&SockId::new(*netns, cookie_from_diag(s.cookie))) {
                continue;
            }
            // tcp_info's data timers start at the connection's establishment, so the
            // larger is a lower bound on its age, the smaller on its quiet time.
            let (born_by, active_at) = match s.activity {
                Some(a) => (
                    now.saturating_sub(ms(a.last_data_sent_ms.max(a.last_data_recv_ms))),
                    now.saturating_sub(ms(a.quiet_ms())),
                ),
                None => (now, 0),
            };
            let seed = Seed {
                id: SockId::new(*netns, cookie_from_diag(s.cookie)),
                tuple: s.tuple,
                state: s.state,
                ifindex: s.ifindex,
                seen_ns: born_by,
                last_activity_ns: active_at,
            };
            if self.tracker.seed(seed).is_some() {
                done.seeded += 1;
            }
        }
        self.per_ip = PerIp::default();
        self.replan_all();
        (done, stale_keys)
    }
}
