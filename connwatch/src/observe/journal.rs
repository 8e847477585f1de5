//! The decisions of late, for the control API's `destroys` and `status`: the last
//! [`RECENT`] records, and destroys per second over the last minute by reason.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

use crate::clock::SEC;
use crate::engine::audit::Record;

/// How many decisions `destroys` can return.
pub const RECENT: usize = 1000;

/// The decisions of late: the last [`RECENT`] records, and destroys per second over the
/// last minute by reason.
#[derive(Default)]
pub struct Journal {
    recent: VecDeque<Record>,
    seconds: VecDeque<(u64, BTreeMap<&'static str, u64>)>,
}

impl Journal {
    pub fn note(&mut self, r: &Record, now_ns: u64) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(r.clone());
        if r.action.is_destroy() {
            let sec = now_ns / SEC;
            if self.seconds.back().is_none_or(|(s, _)| *s != sec) {
                self.seconds.push_back((sec, BTreeMap::new()));
            }
            if let Some((_, counts)) = self.seconds.back_mut() {
                *counts.entry(r.reason).or_default() += 1;
            }
            while self.seconds.front().is_some_and(|(s, _)| s + 60 <= sec) {
                self.seconds.pop_front();
            }
        }
    }

    /// Destroys (or would-destroys) in the last 60 seconds, by reason.
    pub fn last_minute(&self, now_ns: u64) -> BTreeMap<&'static str, u64> {
        let sec = now_ns / SEC;
        let mut out = BTreeMap::new();
        for (s, counts) in &self.seconds {
            if s + 60 > sec {
                for (reason, n) in counts {
                    *out.entry(*reason).or_default() += n;
                }
            }
        }
        out
    }

    /// The last `limit` records, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<Value> {
        let skip = self.recent.len().saturating_sub(limit);
        self.recent.iter().skip(skip).map(Record::to_json).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SEC;
    use crate::conn::{TcpState, Tuple};
    use crate::engine::audit::{Action, Age};
    use std::time::SystemTime;

    fn record(action: Action, reason: &'static str) -> Record {
        Record {
            time: SystemTime::now(),
            action,
            id: crate::conn::SockId::new(4026531840, 1),
            tuple: Tuple::new(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ),
            state: TcpState::ESTABLISHED,
            age: Age {
                secs: 1,
                exact: true,
            },
            idle_secs: None,
            reason,
            rule: reason.into(),
            owner: None,
            direction: None,
            cgroup: None,
            dry_run: false,
            detail: None,
            traffic: None,
        }
    }

    #[test]
    fn the_journal_keeps_the_latest_and_a_minute_of_rates() {
        let mut j = Journal::default();
        for i in 0..(RECENT as u64 + 5) {
            j.note(&record(Action::Destroyed, "max-age"), i * SEC / 10);
        }
        // Ten a second for 100.5 s: seconds 41 to 100 hold 59 * 10 + 5.
        assert_eq!(j.last_minute(100 * SEC).get("max-age"), Some(&595));
        j.note(&record(Action::Skipped, "idle"), 200 * SEC);
        j.note(&record(Action::WouldDestroy, "idle"), 200 * SEC);
        assert_eq!(j.recent(5).len(), 5);
        assert_eq!(j.recent(5)[4]["action"], "would destroy");
        assert_eq!(j.recent(RECENT * 2).len(), RECENT);
        let m = j.last_minute(200 * SEC);
        assert_eq!(m.get("idle"), Some(&1), "only destroys count");
        assert_eq!(m.get("max-age"), None, "older than a minute");
    }
}
