//! The decision-making core of the daemon: what is known of each socket, its next
//! deadline, per-address counts, the safety budget, and what happens when a deadline
//! comes. The event loop (`daemon`) feeds it; the kernel is reached only through the
//! map and sock_diag handles passed in.

use std::collections::{HashMap, HashSet};

use connwatch_common::{event_kind, ConnEvent};

use crate::audit::{Action, Age, Record};
use crate::conn::{TcpState, Tuple};
use crate::deadlines::Deadlines;
use crate::destroy::{self, Outcome};
use crate::diag::{DestroyError, DiagSocket, SockDiag};
use crate::limits::PerIp;
use crate::loader::ConnMap;
use crate::owner;
use crate::policy::{canonical, Birth, Decision, Limit, Owner, Policy, Protected, RuleId, Verdict};
use crate::tracker::{Source, Tracked, Tracker};

const SEC: u64 = 1_000_000_000;

fn ms(n: u32) -> u64 {
    u64::from(n) * 1_000_000
}

/// An unmatchable map entry (a connect still without a local port) older than this
/// is stale: connect gives up long before.
const UNMATCHABLE_STALE_NS: u64 = 600 * SEC;

/// Counts of what the daemon did.
#[derive(Default, Debug, Clone)]
pub struct Counters {
    pub events: u64,
    pub destroyed: u64,
    pub would_destroy: u64,
    pub skipped: u64,
    pub failed: u64,
    pub protected: u64,
    /// Destroys put off by the safety budget.
    pub deferred: u64,
    /// Destroys and would-destroys by reason (limit kind).
    pub by_reason: HashMap<&'static str, u64>,
    /// Destroys the kernel refused as unsupported, by state.
    pub unsupported: HashMap<TcpState, u64>,
}

/// What one round of deadlines learns from `/proc`, asked at most once each.
#[derive(Default)]
struct Batch {
    /// Process names by pid.
    names: HashMap<u32, Option<String>>,
    /// Sockets of protected processes, by inode.
    protected_inodes: Option<HashMap<u32, Owner>>,
}

#[derive(Default, Debug)]
pub struct Reconciled {
    pub from_map: usize,
    pub seeded: usize,
    pub stale: usize,
}

/// One decision as it happens, for whoever watches the engine (metrics, the control
/// API's recent destroys): the audit record, and what the record does not say.
pub struct Observed<'a> {
    pub record: &'a Record,
    /// For a destroy or would-destroy: how long after its deadline it came (a limit due
    /// at once counts from the socket's last state change).
    pub late_ns: Option<u64>,
    /// For a socket a protection saved: which kind (`port`, `address`, `process`).
    pub protection: Option<&'static str>,
}

/// A callback given each decision.
pub type Observer = Box<dyn FnMut(&Observed)>;

/// The kind of a protection, as a metric label.
pub fn protection_kind(p: &Protected) -> &'static str {
    match p {
        Protected::Port(_) => "port",
        Protected::Addr(_) => "address",
        Protected::Process(_) => "process",
    }
}

/// The rule that will apply next to a socket and when (monotonic ns; due if past).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    pub rule: String,
    pub at_ns: u64,
}

/// The reason and rule a manual destroy records.
pub const MANUAL: &str = "manual";

pub struct Engine {
    pub policy: Policy,
    pub enforce: bool,
    pub tracker: Tracker,
    pub deadlines: Deadlines<u64>,
    pub per_ip: PerIp,
    pub counters: Counters,
    /// The safety budget's current one-second window and what it has used.
    window_start_ns: u64,
    window_used: usize,
    observer: Option<Observer>,
}

impl Engine {
    pub fn new(policy: Policy, enforce: bool) -> Self {
        Engine {
            policy,
            enforce,
            tracker: Tracker::new(),
            deadlines: Deadlines::new(),
            per_ip: PerIp::default(),
            counters: Counters::default(),
            window_start_ns: 0,
            window_used: 0,
            observer: None,
        }
    }

    /// Calls `f` with every decision from now on.
    pub fn observe(&mut self, f: Observer) {
        self.observer = Some(f);
    }

    /// The rule that will apply next to a tracked socket, and its deadline: the
    /// deadline heap's, named after the policy's verdict (a deadline that is not the
    /// verdict's comes from a per-address limit or the safety budget).
    pub fn next(&self, key: u64) -> Option<Next> {
        let at_ns = self.deadlines.get(key)?;
        let t = self.tracker.get(key)?;
        let rule = match self.policy.verdict(&t.subject()) {
            Verdict::At { rule, at_ns: v } if v == at_ns => self.policy.rule(rule).name.clone(),
            v => self
                .per_ip
                .breaks(key, Self::per_ip_limit(&self.policy))
                .or(match v {
                    Verdict::At { rule, .. } => Some(rule),
                    Verdict::Never => None,
                })
                .map_or_else(|| "-".to_string(), |r| self.policy.rule(r).name.clone()),
        };
        Some(Next { rule, at_ns })
    }

    fn per_ip_limit(policy: &Policy) -> impl Fn(RuleId) -> u32 + '_ {
        |id| match policy.rule(id).limit {
            Limit::MaxConnsPerIp(n) => n,
            _ => u32::MAX,
        }
    }

    /// Sets or clears the deadline of one socket from what is known of it now, and
    /// files it under its per-address limits.
    pub fn plan(&mut self, key: u64) {
        let Some(t) = self.tracker.get(key) else {
            self.deadlines.cancel(key);
            self.per_ip.remove(key);
            return;
        };
        let s = t.subject();
        let mut verdict = self.policy.verdict(&s);
        if self.policy.has_per_ip_limits() {
            let ip = canonical(s.tuple.remote.ip());
            let groups = self
                .policy
                .per_ip_limits(&s)
                .map(|(id, _)| (id, ip))
                .collect();
            self.per_ip.set(key, s.birth.no_later_than(), groups);
            for (k, rule) in self
                .per_ip
                .over_limit(key, Self::per_ip_limit(&self.policy))
            {
                if k == key {
                    verdict = Verdict::At { at_ns: 0, rule };
                } else {
                    self.deadlines.set(k, 0);
                }
            }
        }
        match verdict {
            Verdict::At { at_ns, .. } => self.deadlines.set(key, at_ns),
            Verdict::Never => self.deadlines.cancel(key),
        }
    }

    /// Plans every socket again: after a policy change.
    pub fn replan_all(&mut self) {
        let keys: Vec<u64> = self.tracker.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.plan(key);
        }
    }

    /// Replaces the policy, keeping everything known of the sockets.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
        self.per_ip = PerIp::default();
        self.replan_all();
    }

    pub fn on_event(&mut self, ev: &ConnEvent) {
        self.counters.events += 1;
        tracing::trace!(
            key = format_args!("{:#x}", ev.key),
            kind = ev.kind,
            from = %TcpState(ev.oldstate),
            to = %TcpState(ev.info.state),
            tuple = ?Tuple::from_info(&ev.info),
            "kernel event"
        );
        // A connection closing from these states usually lives on in TIME_WAIT, which
        // the map does not hold: follow it only when a limit asks for it.
        let to_time_wait = ev.kind == event_kind::CLOSED
            && matches!(
                TcpState(ev.oldstate),
                TcpState::FIN_WAIT1 | TcpState::FIN_WAIT2 | TcpState::CLOSING
            )
            && self.policy.limits_state(TcpState::TIME_WAIT);
        let was = self.tracker.get(ev.key).copied();
        for key in self.tracker.apply(ev) {
            self.plan(key);
        }
        if let (true, Some(was)) = (to_time_wait, was) {
            if was.generation == ev.info.seen_ns {
                if let Some(key) = self.tracker.time_wait(&was, ev.info.state_since_ns) {
                    self.plan(key);
                }
            }
        }
    }

    /// The rule under which a socket is due now, if it still is (protection by
    /// process is judged after, with the owner's current name).
    pub fn due_rule(&self, key: u64, now: u64) -> Option<RuleId> {
        let t = self.tracker.get(key)?;
        self.policy.due(&t.subject(), now).or_else(|| {
            self.per_ip
                .breaks(key, Self::per_ip_limit(&self.policy))
                .filter(|_| self.policy.protected_endpoint(&t.tuple).is_none())
        })
    }

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

    /// How many destroys the safety budget allows now.
    fn budget_left(&mut self, now: u64) -> Option<usize> {
        let limit = self.policy.budget.per_second(self.tracker.len())?;
        if now.saturating_sub(self.window_start_ns) >= SEC {
            self.window_start_ns = now;
            self.window_used = 0;
        }
        Some(limit.saturating_sub(self.window_used))
    }

    /// Acts on every socket whose deadline has come.
    pub fn fire_due(&mut self, now: u64, diag: &mut SockDiag, conns: Option<&ConnMap>) {
        let mut due = self.deadlines.pop_due(now);
        if due.is_empty() {
            return;
        }
        if let Some(left) = self.budget_left(now) {
            if due.len() > left {
                let put_off = due.split_off(left);
                let next_window = self.window_start_ns + SEC;
                tracing::warn!(
                    "safety budget: {} sockets due at once, destroying {} now and putting off {} (--max-kills-per-second {:?}, --max-kill-fraction {:?})",
                    put_off.len() + due.len(),
                    due.len(),
                    put_off.len(),
                    self.policy.budget.max_kills_per_second,
                    self.policy.budget.max_kill_fraction,
                );
                self.counters.deferred += put_off.len() as u64;
                for (key, _) in put_off {
                    self.deadlines.set(key, next_window);
                }
            }
        }
        // Refresh each from the map: activity and state may have moved since its
        // deadline was set. Those still due are looked up together.
        let mut chosen = Vec::with_capacity(due.len());
        for (key, _) in due {
            if let Some(c) = self.still_due(key, now, conns) {
                chosen.push(c);
            }
        }
        if chosen.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let tuples: Vec<Tuple> = chosen.iter().map(|(_, t, _)| t.tuple).collect();
        let found = diag.get_many(&tuples);
        let looked_up = started.elapsed();
        let mut batch = Batch::default();
        let mut kills = Vec::with_capacity(chosen.len());
        for ((key, chosen, rule), found) in chosen.into_iter().zip(found) {
            if let Some(live) = self.confirm(key, &chosen, rule, found, now, conns, &mut batch) {
                kills.push((key, rule, live));
            }
        }
        let results: Vec<Outcome> = if self.enforce {
            let socks: Vec<&DiagSocket> = kills.iter().map(|(_, _, live)| live).collect();
            diag.destroy_many(&socks)
                .into_iter()
                .map(destroy::outcome_of)
                .collect()
        } else {
            kills.iter().map(|_| Outcome::WouldDestroy).collect()
        };
        let killed = started.elapsed();
        let n = kills.len();
        for ((key, rule, _), outcome) in kills.into_iter().zip(results) {
            let Some(chosen) = self.tracker.get(key).copied() else {
                continue;
            };
            if matches!(outcome, Outcome::Destroyed | Outcome::WouldDestroy) {
                self.window_used += 1;
            }
            // No kernel event will say a socket outside the map is gone.
            if chosen.source != Source::Map && matches!(outcome, Outcome::Destroyed) {
                self.tracker.remove(key);
                self.plan(key);
            }
            self.record(&chosen, rule, now, &outcome, None);
        }
        tracing::debug!(
            "round of {} deadlines: lookups took {:?}, {n} kills ended at {:?}, records at {:?}",
            tuples.len(),
            looked_up,
            killed,
            started.elapsed()
        );
    }

    /// Refreshes a socket whose deadline came; returns it with the rule it is due under,
    /// or plans it again if it is not due any more.
    fn still_due(
        &mut self,
        key: u64,
        now: u64,
        conns: Option<&ConnMap>,
    ) -> Option<(u64, Tracked, RuleId)> {
        let before = self.tracker.get(key).copied()?;
        if let (Source::Map, Some(conns)) = (before.source, conns) {
            match conns.get(&key, 0) {
                Ok(info) if self.tracker.refresh(key, &info) => {}
                _ => {
                    // Closed, or the address now holds another socket: its events follow.
                    self.tracker.remove(key);
                    self.plan(key);
                    return None;
                }
            }
        }
        let Some(rule) = self.due_rule(key, now) else {
            self.plan(key);
            return None;
        };
        Some((key, *self.tracker.get(key)?, rule))
    }

    /// Checks a looked-up socket against the choice, the kernel's own activity timers,
    /// and the protections; returns it if it is to be destroyed.
    #[allow(clippy::too_many_arguments)]
    fn confirm(
        &mut self,
        key: u64,
        chosen: &Tracked,
        rule: RuleId,
        found: anyhow::Result<Option<DiagSocket>>,
        now: u64,
        conns: Option<&ConnMap>,
        batch: &mut Batch,
    ) -> Option<DiagSocket> {
        let live = match destroy::confirm(conns, key, chosen, found) {
            Ok((live, _)) => live,
            Err(outcome) => {
                self.record(chosen, rule, now, &outcome, None);
                // Only sock_diag knew this socket; no close event will come for it.
                if chosen.source != Source::Map {
                    self.tracker.remove(key);
                    self.plan(key);
                }
                return None;
            }
        };
        // tcp_info is exact where the kernel program's stamps are coarse.
        if let (Limit::Idle(d), Some(act)) = (self.policy.rule(rule).limit, live.activity) {
            let quiet_since = now.saturating_sub(ms(act.quiet_ms()));
            if quiet_since.saturating_add(d.as_nanos() as u64) > now {
                self.tracker.note_activity(key, quiet_since);
                self.plan(key);
                return None;
            }
        }
        if let Some(o) = self.owner_of(chosen, &live, batch) {
            self.tracker.note_owner(key, o);
        }
        let chosen = *self.tracker.get(key)?;
        match self.policy.judge(&chosen.subject(), rule) {
            Decision::Destroy(_) => Some(live),
            Decision::Protected(_, p) => {
                self.counters.protected += 1;
                let outcome = Outcome::Skipped(format!("protected by {p}"));
                self.record(&chosen, rule, now, &outcome, Some(Action::Protected));
                None
            }
            Decision::NotDue => {
                self.plan(key);
                None
            }
        }
    }

    /// The owner to judge protection by: the process's own name where its pid is known
    /// (the kernel program sees thread names), else whoever of the protected processes
    /// holds the socket's inode.
    fn owner_of(&self, chosen: &Tracked, live: &DiagSocket, batch: &mut Batch) -> Option<Owner> {
        if let Some(o) = chosen.owner {
            let name = batch
                .names
                .entry(o.pid)
                .or_insert_with(|| owner::process_name(o.pid));
            return Some(name.as_deref().map_or(o, |n| Owner::new(o.pid, n)));
        }
        if live.inode == 0 || self.policy.protect.processes.is_empty() {
            return None;
        }
        batch
            .protected_inodes
            .get_or_insert_with(|| owner::sockets_of(&self.policy.protect.processes))
            .get(&live.inode)
            .copied()
    }

    fn record(
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
    fn record_as(
        &mut self,
        chosen: &Tracked,
        reason: &'static str,
        rule: String,
        now: u64,
        outcome: &Outcome,
        action: Option<Action>,
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
        let subject = chosen.subject();
        let record = Record {
            time: std::time::SystemTime::now(),
            action,
            tuple: chosen.tuple,
            state: chosen.state,
            age: Age::of(chosen.birth, now),
            idle_secs: Some(now.saturating_sub(subject.quiet_since()) / SEC),
            reason,
            rule,
            owner: chosen.owner,
            dry_run: !self.enforce,
            detail,
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
        let mut key = self.tracker.key_of(&tuple);
        if let (Some(k), Some(conns)) = (key, conns) {
            if self.tracker.get(k).is_some_and(|t| t.source == Source::Map) {
                match conns.get(&k, 0) {
                    Ok(info) if self.tracker.refresh(k, &info) => {}
                    _ => {
                        self.tracker.remove(k);
                        self.plan(k);
                        key = None;
                    }
                }
            }
        }
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
        chosen.owner = match chosen.owner {
            Some(o) => Some(owner::process_name(o.pid).map_or(o, |n| Owner::new(o.pid, &n))),
            None if live.inode != 0 && !self.policy.protect.processes.is_empty() => {
                owner::sockets_of(&self.policy.protect.processes)
                    .get(&live.inode)
                    .copied()
            }
            None => None,
        };
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
