//! Bringing the tracker and the map in line with the kernel's socket table: at
//! start-up and after the kernel reports dropped records.

use std::collections::{HashMap, HashSet};

use super::per_ip::PerIp;
use super::{ms, Engine};
use crate::clock::SEC;
use crate::conn::{TcpState, Tuple};
use crate::kernel::sock_diag::DiagSocket;
use crate::kernel::ConnMap;
use crate::policy::Policy;
use crate::track::{Source, Tracked};

/// An unmatchable map entry (a connect still without a local port) older than this
/// is stale: connect gives up long before.
const UNMATCHABLE_STALE_NS: u64 = 600 * SEC;

#[derive(Default, Debug)]
pub struct Reconciled {
    pub from_map: usize,
    pub seeded: usize,
    pub stale: usize,
}

impl Engine {
    /// Brings the tracker and the map in line with the kernel's socket table: drops
    /// entries of sockets that are gone, and seeds sockets nothing recorded.
    ///
    /// Returns the keys of stale map entries: the caller that owns the map removes them.
    pub fn reconcile(
        &mut self,
        conns: Option<&ConnMap>,
        live: &[DiagSocket],
        now: u64,
    ) -> (Reconciled, Vec<u64>) {
        let mut done = Reconciled::default();
        let live_tuples: HashMap<Tuple, TcpState> =
            live.iter().map(|s| (s.tuple, s.state)).collect();
        let mut in_map = HashSet::new();
        let mut stale_keys = Vec::new();
        for item in conns.into_iter().flat_map(|c| c.iter()) {
            let Ok((key, info)) = item else { continue };
            let Some(t) = Tracked::from_info(&info) else {
                continue;
            };
            // An entry whose socket is not in the dump died while no program watched,
            // unless it was made after the dump began; so did one whose tuple is now in
            // TIME_WAIT, a state the map never holds. An entry without a local port
            // (SYN_SENT) cannot be matched: only its age tells it is stale.
            let stale = if t.tuple.local.port() != 0 {
                info.seen_ns < now
                    && live_tuples
                        .get(&t.tuple)
                        .is_none_or(|s| *s == TcpState::TIME_WAIT)
            } else {
                now.saturating_sub(info.seen_ns) > UNMATCHABLE_STALE_NS
            };
            if stale {
                stale_keys.push(key);
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
                Source::Seeded => !live_tuples.contains_key(&t.tuple),
                Source::TimeWait => live_tuples.get(&t.tuple) != Some(&TcpState::TIME_WAIT),
            })
            .map(|(k, _)| k)
            .collect();
        for key in lost {
            self.tracker.remove(key);
        }
        let time_wait_limited = self.policy.limits_state(TcpState::TIME_WAIT);
        for s in live {
            if !Policy::actionable(s.state)
                || (s.state == TcpState::TIME_WAIT && !time_wait_limited)
            {
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
            if self
                .tracker
                .seed(s.tuple, s.state, s.cookie, born_by, active_at)
                .is_some()
            {
                done.seeded += 1;
            }
        }
        self.per_ip = PerIp::default();
        self.replan_all();
        (done, stale_keys)
    }
}
