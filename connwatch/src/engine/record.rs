//! Each decision counted, logged as an audit record, and handed to the observer.

use super::audit::{Action, Age, Record};
use super::destroy::Outcome;
use super::{protection_kind, Engine, Observed};
use crate::clock::SEC;
use crate::kernel::sock_diag::{DestroyError, TcpTraffic};
use crate::policy::{RuleId, Verdict};
use crate::track::Tracked;

impl Engine {
    pub(super) fn record(
        &mut self,
        chosen: &Tracked,
        rule: RuleId,
        now: u64,
        outcome: &Outcome,
        action: Option<Action>,
    ) {
        let r = self.policy.rule(rule);
        let (reason, name) = (r.limit.kind(), r.name.clone());
        self.record_as(chosen, reason, name, now, outcome, action);
    }

    /// Counts, logs and reports one decision; returns its record.
    pub(super) fn record_as(
        &mut self,
        chosen: &Tracked,
        reason: &'static str,
        rule: String,
        now: u64,
        outcome: &Outcome,
        action: Option<Action>,
    ) -> Record {
        self.record_carried(chosen, reason, rule, now, outcome, action, None)
    }

    /// [`Engine::record_as`], with what the connection carried (from the lookup
    /// before its destroy).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_carried(
        &mut self,
        chosen: &Tracked,
        reason: &'static str,
        rule: String,
        now: u64,
        outcome: &Outcome,
        action: Option<Action>,
        traffic: Option<TcpTraffic>,
    ) -> Record {
        let (action, detail) = match (action, outcome) {
            (Some(a), Outcome::Skipped(why)) => (a, Some(why.clone())),
            (_, Outcome::Destroyed) => (Action::Destroyed, None),
            (_, Outcome::WouldDestroy) => (Action::WouldDestroy, None),
            (_, Outcome::Skipped(why)) => (Action::Skipped, Some(why.clone())),
            (_, Outcome::Failed(e)) => (Action::Failed, Some(e.to_string())),
        };
        let c = &mut self.counters;
        match action {
            Action::Destroyed => c.destroyed += 1,
            Action::WouldDestroy => c.would_destroy += 1,
            Action::Skipped => c.skipped += 1,
            Action::Failed => c.failed += 1,
            Action::Protected | Action::Deferred => {}
        }
        if matches!(action, Action::Destroyed | Action::WouldDestroy) {
            *c.by_reason.entry(reason).or_default() += 1;
        }
        if let Outcome::Failed(DestroyError::NotSupported) = outcome {
            let n = c.unsupported.entry(chosen.state).or_default();
            *n += 1;
            if *n == 1 {
                tracing::warn!(
                    "this kernel cannot destroy sockets in {}: counted, not retried (reported once)",
                    chosen.state
                );
            }
        }
        let subject = self.subject(chosen);
        let record = Record {
            time: std::time::SystemTime::now(),
            action,
            id: chosen.id,
            tuple: chosen.tuple,
            state: chosen.state,
            age: Age::of(chosen.birth, now),
            idle_secs: Some(now.saturating_sub(subject.quiet_since()) / SEC),
            reason,
            rule,
            owner: chosen.owner,
            direction: chosen.direction,
            cgroup: subject.cgroup.clone(),
            dry_run: !self.enforce,
            detail,
            traffic,
        };
        record.emit();
        if let Some(observer) = self.observer.as_mut() {
            // The deadline as the policy sets it; a limit due at once (0) counts from
            // the state change that made the socket due.
            let late_ns = action.is_destroy().then(|| {
                let at = match self.policy.verdict(&subject) {
                    Verdict::At { at_ns, .. } => at_ns,
                    Verdict::Never => 0,
                };
                now.saturating_sub(at.max(chosen.state_since_ns))
            });
            let protection = (action == Action::Protected)
                .then(|| self.policy.protected(&subject).map(|p| protection_kind(&p)))
                .flatten();
            observer(&Observed {
                record: &record,
                late_ns,
                protection,
            });
        }
        record
    }
}
