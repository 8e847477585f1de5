//! A destroy an operator asked for by naming a connection (the control API).

use super::audit::{Action, Record};
use super::destroy::{self, Outcome};
use super::fire::Lookups;
use super::{ms, Engine, MANUAL};
use crate::conn::{cookie_from_diag, Birth, SockId, Tuple};
use crate::kernel::netns::Namespaces;
use crate::kernel::ConnMap;
use crate::policy::Policy;
use crate::track::{Source, Tracked};

impl Engine {
    /// Destroys one connection an operator named (through the control API): only
    /// protections and the states connwatch never touches refuse it, no rule need
    /// choose it. A tuple that exists in several network namespaces must be named with
    /// its namespace (`netns`); without one, the host's is meant when nothing is known
    /// of the tuple elsewhere. It is re-checked like any other victim, and a dry run
    /// only says it would. Returns the record, or why nothing was destroyed.
    pub fn destroy_manual(
        &mut self,
        tuple: Tuple,
        netns: Option<u32>,
        now: u64,
        namespaces: &mut Namespaces,
        conns: Option<&ConnMap>,
    ) -> Result<Record, String> {
        // A filtered engine does not follow sockets no rule selects: the map knows
        // them (with their ages), so they are taken in for this destroy, and let go of
        // after it.
        let mut adopted = Vec::new();
        if self.is_filtered() {
            for (key, info) in conns.into_iter().flat_map(|c| c.entries()) {
                if Tuple::from_info(&info) != Some(tuple) {
                    continue;
                }
                if let Some(t) = Tracked::from_info(&info) {
                    if self.tracker.key_of(&t.id).is_none() {
                        self.tracker.upsert(key, t);
                        adopted.push(key);
                    }
                }
            }
        }
        let done = self.destroy_named(tuple, netns, now, namespaces, conns);
        for key in adopted {
            self.tracker.remove(key);
            self.plan(key);
        }
        done
    }

    fn destroy_named(
        &mut self,
        tuple: Tuple,
        netns: Option<u32>,
        now: u64,
        namespaces: &mut Namespaces,
        conns: Option<&ConnMap>,
    ) -> Result<Record, String> {
        let mut keys = Vec::new();
        for k in self.tracker.keys_with_tuple(&tuple) {
            let in_ns = |t: &Tracked| netns.is_none_or(|ns| t.id.netns == ns);
            if self.refresh_from_map(k, conns) && self.tracker.get(k).as_ref().is_some_and(in_ns) {
                keys.push(k);
            }
        }
        if keys.len() > 1 {
            let mut names: Vec<String> = keys
                .iter()
                .filter_map(|k| self.tracker.get(*k))
                .map(|t| t.id.netns.to_string())
                .collect();
            names.sort();
            return Err(format!(
                "{tuple} exists in {} network namespaces ({}): name the one meant with \"netns\"",
                keys.len(),
                names.join(", ")
            ));
        }
        let key = keys.first().copied();
        let chosen = match key.and_then(|k| self.tracker.get(k)) {
            Some(t) => t,
            // Not tracked (a TIME_WAIT no limit follows, say): what the kernel says of it.
            None => {
                let ns = netns.unwrap_or(namespaces.host);
                let live = namespaces
                    .diag(ns, None)
                    .map_err(|e| format!("{e:#}"))?
                    .get(&tuple)
                    .map_err(|e| format!("cannot look the connection up: {e:#}"))?
                    .ok_or_else(|| {
                        format!("no TCP connection {tuple} in network namespace {ns}")
                    })?;
                let activity = live
                    .activity
                    .map_or(0, |a| now.saturating_sub(ms(a.quiet_ms())));
                Tracked {
                    tuple,
                    state: live.state,
                    birth: Birth::Unknown { seen_ns: now },
                    state_since_ns: now,
                    id: SockId::new(ns, cookie_from_diag(live.cookie)),
                    source: Source::Seeded,
                    cgroup_id: 0,
                    direction: None,
                    ifindex: live.ifindex,
                    last_activity_ns: activity,
                    owner: None,
                    owner_from_listener: false,
                }
            }
        };
        let diag = namespaces
            .diag(chosen.id.netns, chosen.owner.map(|o| o.pid))
            .map_err(|e| format!("{e:#}"))?;
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
        if let Some(o) = self.owner_of(&chosen, &live, &mut Lookups::default()) {
            chosen.owner = Some(o);
            chosen.owner_from_listener = false;
            if let Some(k) = key {
                self.tracker.note_owner(k, o);
            }
        }
        if let Some(p) = self.policy.protected(&self.subject(&chosen)) {
            self.counters.protected += 1;
            let outcome = Outcome::Skipped(format!("protected by {p}"));
            return Err(refuse(self, &chosen, outcome, Some(Action::Protected)));
        }
        let outcome = destroy::kill(diag, &chosen, &live, self.enforce);
        if let (Some(k), Outcome::Destroyed) = (key, &outcome) {
            if chosen.source != Source::Map {
                self.tracker.remove(k);
                self.plan(k);
            }
        }
        if !matches!(outcome, Outcome::Destroyed | Outcome::WouldDestroy) {
            return Err(refuse(self, &chosen, outcome, None));
        }
        Ok(self.record_carried(
            &chosen,
            MANUAL,
            MANUAL.into(),
            now,
            &outcome,
            None,
            live.traffic,
        ))
    }
}
