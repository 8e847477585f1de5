//! A destroy an operator asked for by naming a connection (the control API).

use super::audit::{Action, Record};
use super::destroy::{self, Outcome};
use super::fire::Lookups;
use super::{ms, Engine, MANUAL};
use crate::conn::{Birth, Tuple};
use crate::kernel::sock_diag::SockDiag;
use crate::kernel::ConnMap;
use crate::policy::Policy;
use crate::track::{Source, Tracked};

impl Engine {
    /// Destroys one connection an operator named (through the control API): only
    /// protections and the states connwatch never touches refuse it, no rule need
    /// choose it. It is re-checked like any other victim, and a dry run only says it
    /// would. Returns the record, or why nothing was destroyed.
    pub fn destroy_manual(
        &mut self,
        tuple: Tuple,
        now: u64,
        diag: &mut SockDiag,
        conns: Option<&ConnMap>,
    ) -> Result<Record, String> {
        let key = self
            .tracker
            .key_of(&tuple)
            .filter(|k| self.refresh_from_map(*k, conns));
        let chosen = match key.and_then(|k| self.tracker.get(k).copied()) {
            Some(t) => t,
            // Not tracked (a TIME_WAIT no limit follows, say): what the kernel says of it.
            None => {
                let live = diag
                    .get(&tuple)
                    .map_err(|e| format!("cannot look the connection up: {e:#}"))?
                    .ok_or_else(|| format!("no TCP connection {tuple}"))?;
                let activity = live
                    .activity
                    .map_or(0, |a| now.saturating_sub(ms(a.quiet_ms())));
                Tracked {
                    tuple,
                    state: live.state,
                    birth: Birth::Unknown { seen_ns: now },
                    state_since_ns: now,
                    generation: now,
                    source: Source::Seeded,
                    cookie: Some(live.cookie),
                    last_activity_ns: activity,
                    owner: None,
                }
            }
        };
        if !Policy::actionable(chosen.state) {
            return Err(format!(
                "{tuple} is in {}: connwatch never destroys a listening or opening socket",
                chosen.state
            ));
        }
        let refuse = |this: &mut Self, chosen: &Tracked, outcome: Outcome, action| {
            let _ = this.record_as(chosen, MANUAL, MANUAL.into(), now, &outcome, action);
            match outcome {
                Outcome::Skipped(why) => why,
                Outcome::Failed(e) => format!("failed: {e}"),
                _ => String::new(),
            }
        };
        let (live, _) = match destroy::lookup(diag, conns, key.unwrap_or(0), &chosen) {
            Ok(found) => found,
            Err(outcome) => return Err(refuse(self, &chosen, outcome, None)),
        };
        let mut chosen = chosen;
        chosen.owner = self.owner_of(&chosen, &live, &mut Lookups::default());
        if let (Some(k), Some(o)) = (key, chosen.owner) {
            self.tracker.note_owner(k, o);
        }
        if let Some(p) = self.policy.protected(&chosen.subject()) {
            self.counters.protected += 1;
            let outcome = Outcome::Skipped(format!("protected by {p}"));
            return Err(refuse(self, &chosen, outcome, Some(Action::Protected)));
        }
        let outcome = destroy::kill(diag, &live, self.enforce);
        if let (Some(k), Outcome::Destroyed) = (key, &outcome) {
            if chosen.source != Source::Map {
                self.tracker.remove(k);
                self.plan(k);
            }
        }
        if !matches!(outcome, Outcome::Destroyed | Outcome::WouldDestroy) {
            return Err(refuse(self, &chosen, outcome, None));
        }
        Ok(self.record_as(&chosen, MANUAL, MANUAL.into(), now, &outcome, None))
    }
}
