//! The decision-making core of the daemon: what is known of each socket, its next
//! deadline, per-address counts, the safety budget, and what happens when a deadline
//! comes. The event loop (`daemon`) feeds it; the kernel is reached only through the
//! map and sock_diag handles passed in.
//!
//! Planning (here) sets each socket's deadline from events; [`fire`] acts on the
//! due ones (re-check, protections, destroy); [`record`] logs and counts each
//! decision; [`reconcile`] brings the tracker in line with the kernel's socket table;
//! [`manual`] is the control API's destroy of a named connection.

pub mod audit;
mod batch;
mod block;
pub mod destroy;
mod filter;
mod fire;
mod manual;
pub mod per_ip;
#[cfg(test)]
mod properties;
mod reconcile;
mod record;
#[cfg(test)]
mod reuse_properties;

use std::cell::RefCell;
use std::collections::HashMap;

use connwatch_common::{event_kind, matters, ConnEvent, ConnInfo, Filter};

use crate::conn::{canonical, SockId, TcpState, Tuple};
use crate::kernel::cgroup::Cgroups;
use crate::policy::{Limit, Policy, Protected, RuleId, Subject, Verdict};
use crate::track::{Deadlines, FastMap, Tracked, Tracker};
use audit::Record;
use per_ip::PerIp;

pub use filter::{dump_scope, filter_of};
pub use fire::INTENT;
pub use reconcile::{suggested_max_conns, Pace, Reconciled};

/// One kernel event at trace level: those a batch passes over are told too.
fn trace_event(ev: &ConnEvent) {
    tracing::trace!(
        key = format_args!("{:#x}", ev.key),
        kind = ev.kind,
        from = %TcpState(ev.oldstate),
        to = %TcpState(ev.info.state),
        tuple = ?Tuple::from_info(&ev.info),
        "kernel event"
    );
}

/// Milliseconds, as `tcp_info` counts them, in nanoseconds.
fn ms(n: u32) -> u64 {
    u64::from(n) * 1_000_000
}

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
    /// Destroys tried again after a failure that may pass (no answer from the kernel).
    pub retried: u64,
    /// Reconciles after kernel drops that failed (and were tried again).
    pub reconcile_failures: u64,
    /// Reconciles after kernel drops that ran.
    pub reconciles: u64,
    /// Stats ticks that saw drops but left them to a later reconcile (the back-off
    /// while losses go on, as under a full connection map).
    pub reconciles_put_off: u64,
    /// Destroys and would-destroys by reason (limit kind).
    pub by_reason: HashMap<&'static str, u64>,
    /// Destroys the kernel refused as unsupported, by state.
    pub unsupported: HashMap<TcpState, u64>,
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
        Protected::Cgroup(_) => "cgroup",
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
    /// Cgroup paths by id, where the engine is given the tree to walk.
    cgroups: RefCell<Option<Cgroups>>,
    /// Sockets decided for good under this policy: would-destroyed in a dry run, or
    /// saved by a protection in their current state.
    settled: FastMap<u64, Settled>,
    /// Failures in a row that may pass, by socket: the back-off of the next try.
    retries: FastMap<u64, u32>,
    /// Firewall blocks (`--block-firewall`): opened on first use, and those a round
    /// of destroys asked for.
    firewall: Option<crate::kernel::firewall::Firewall>,
    to_block: Vec<block::ToBlock>,
    /// What the kernel sends, from the policy: see [`Engine::filtered`].
    filter: Box<Filter>,
    /// Whether the kernel sends only what [`Engine::filter`] says matters: the engine
    /// then follows exactly those sockets (the map holds the others).
    filtered: bool,
    /// What [`Engine::on_events`] learns of a batch, kept for the next one's.
    batch: batch::Scratch,
    /// A one-shot run (`sweep`): see [`Engine::one_shot`].
    one_shot: bool,
    /// When each socket older than connwatch (birth unknown) was first seen, as kept
    /// across restarts (`kernel::first_seen`): its age bound counts from then, not from
    /// this start. Reconciles add the sockets they seed and forget the gone ones,
    /// saying which in [`Reconciled`] so the daemon knows to keep them anew.
    pub first_seen: FastMap<SockId, u64>,
}

/// A decision that stands.
#[derive(Clone, Copy, Debug)]
struct Settled {
    id: SockId,
    state: TcpState,
    outcome: SettledAs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SettledAs {
    /// A dry run's would-destroy: a live run destroyed it.
    WouldDestroy,
    /// Saved by a protection (in the state it was in).
    Protected,
}

impl Engine {
    pub fn new(policy: Policy, enforce: bool) -> Self {
        Engine {
            filter: Box::new(filter_of(&policy)),
            filtered: false,
            first_seen: FastMap::default(),
            policy,
            enforce,
            tracker: Tracker::new(),
            deadlines: Deadlines::new(),
            per_ip: PerIp::default(),
            counters: Counters::default(),
            window_start_ns: 0,
            window_used: 0,
            observer: None,
            cgroups: RefCell::new(None),
            settled: FastMap::default(),
            retries: FastMap::default(),
            firewall: None,
            to_block: Vec::new(),
            one_shot: false,
            batch: batch::Scratch::default(),
        }
    }

    /// For a run that acts once on the dump it was just loaded from (`sweep`): that
    /// dump, an instant old, is the confirmation, so a due socket is destroyed by the
    /// tuple and cookie it reported without a second lookup (the kernel refuses any
    /// other socket by the cookie), idle decided on the dump's `tcp_info`. What a
    /// one-shot dump-and-destroy tool does, with the policy's protections kept.
    pub fn one_shot(&mut self) {
        self.one_shot = true;
    }

    /// Room for `n` sockets about to be loaded at once (a one-shot run's dump), so the
    /// tables are sized once. The daemon does not ask: its tables hold the followed
    /// sockets, far fewer than its first dump, and keep their size.
    pub fn expect(&mut self, n: usize) {
        self.tracker.reserve(n);
        self.deadlines.reserve(n);
        self.first_seen.reserve(n);
    }

    /// Names cgroups by walking this tree (the daemon's /sys/fs/cgroup); without it
    /// (tests, pure uses) sockets have no cgroup path and cgroup rules match none.
    pub fn name_cgroups(&mut self, cgroups: Cgroups) {
        self.cgroups = RefCell::new(Some(cgroups));
    }

    /// What the policy looks at for a tracked socket, its cgroup named.
    pub fn subject(&self, t: &Tracked) -> Subject {
        let path = match (t.cgroup_id, self.cgroups.borrow_mut().as_mut()) {
            (0, _) | (_, None) => None,
            (id, Some(c)) => c.path(id),
        };
        t.subject_in(path)
    }

    /// What the policy looks at to decide: as [`Engine::subject`], but the cgroup is
    /// named only under a policy that looks at cgroups (naming one is a map lookup by
    /// id at every event, for nothing under most policies).
    fn deciding(&self, t: &Tracked) -> Subject {
        if self.policy.looks_at_cgroups() {
            self.subject(t)
        } else {
            t.subject_in(None)
        }
    }

    /// From now on the kernel sends only the events [`Engine::filter`] lets through
    /// (the daemon writes it into the filter map): the engine follows only the sockets
    /// that matter, and forgets one when it leaves a state that does.
    pub fn filtered(&mut self) {
        self.filtered = true;
    }

    pub fn is_filtered(&self) -> bool {
        self.filtered
    }

    /// What the kernel should send under the current policy.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Whether the engine follows a socket the map describes so: always, unless
    /// filtered.
    pub fn follows(&self, info: &ConnInfo) -> bool {
        !self.filtered || matters(&self.filter, info.state, info.sport, info.dport)
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
        let rule = match self.policy.verdict(&self.deciding(&t)) {
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
            self.settled.remove(&key);
            self.retries.remove(&key);
            return;
        };
        // A decision already made stands until the policy or the socket changes: a
        // dry run decides each socket once, as a live run would.
        let settled = match self.settled.get(&key) {
            Some(s) if s.id == t.id => Some(*s),
            Some(_) => {
                self.settled.remove(&key);
                None
            }
            None => None,
        };
        if let Some(Settled {
            outcome: SettledAs::WouldDestroy,
            ..
        }) = settled
        {
            // A live run destroyed it: it counts in no group and is never due again.
            self.deadlines.cancel(key);
            self.per_ip.remove(key);
            return;
        }
        let protected_already = settled.is_some_and(|s| s.state == t.state);
        let s = self.deciding(&t);
        let mut verdict = self.policy.verdict(&s);
        if self.policy.has_per_ip_limits() {
            let ip = canonical(s.tuple.remote.ip());
            let groups = self
                .policy
                .per_ip_limits(&s)
                .map(|(id, _)| (id, s.netns, ip))
                .collect();
            self.per_ip.set(key, s.birth.no_later_than(), groups);
            for (k, rule) in self
                .per_ip
                .over_limit(key, Self::per_ip_limit(&self.policy))
            {
                if k == key {
                    verdict = Verdict::At { at_ns: 0, rule };
                } else if !self.settled.contains_key(&k) {
                    self.deadlines.set(k, 0);
                }
            }
        }
        if protected_already {
            verdict = Verdict::Never;
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

    /// Remembers a final decision about a socket, so it is not decided again.
    pub(super) fn settle(&mut self, key: u64, outcome: SettledAs) {
        if let Some(t) = self.tracker.get(key) {
            let settled = Settled {
                id: t.id,
                state: t.state,
                outcome,
            };
            self.settled.insert(key, settled);
        }
    }

    /// Replaces the policy, keeping everything known of the sockets; every socket is
    /// decided afresh under it.
    pub fn set_policy(&mut self, policy: Policy) {
        *self.filter = filter_of(&policy);
        self.policy = policy;
        self.settled.clear();
        self.per_ip = PerIp::default();
        self.replan_all();
    }

    pub fn on_event(&mut self, ev: &ConnEvent) {
        self.counters.events += 1;
        trace_event(ev);
        let to_time_wait = self.to_time_wait(ev);
        // What the tracker held before, read only when a TIME_WAIT follow-up needs it.
        let was = to_time_wait.then(|| self.tracker.get(ev.key)).flatten();
        for key in self.tracker.apply(ev) {
            self.plan(key);
        }
        if let (true, Some(was)) = (to_time_wait, was) {
            if was.id == SockId::new(ev.info.netns, ev.info.cookie) {
                if let Some(key) = self.tracker.time_wait(&was, ev.info.state_since_ns) {
                    self.plan(key);
                }
            }
        }
        // Filtered, the kernel says no more of a socket that left the states that
        // matter until it enters one again: forget it (the map still holds it).
        if ev.kind != event_kind::CLOSED && !self.follows(&ev.info) {
            let id = SockId::new(ev.info.netns, ev.info.cookie);
            if self.tracker.get(ev.key).is_some_and(|t| t.id == id) {
                self.tracker.remove(ev.key);
                self.plan(ev.key);
            }
        }
    }

    /// Whether a close hands the connection on to TIME_WAIT, which the map does not
    /// hold: only from these states, and only when a limit asks for it.
    fn to_time_wait(&self, ev: &ConnEvent) -> bool {
        ev.kind == event_kind::CLOSED
            && matches!(
                TcpState(ev.oldstate),
                TcpState::FIN_WAIT1 | TcpState::FIN_WAIT2 | TcpState::CLOSING
            )
            && self.policy.limits_state(TcpState::TIME_WAIT)
    }

    /// The rule under which a socket is due now, if it still is (protection by
    /// process is judged after, with the owner's current name).
    pub fn due_rule(&self, key: u64, now: u64) -> Option<RuleId> {
        let t = self.tracker.get(key)?;
        self.policy.due(&self.deciding(&t), now).or_else(|| {
            self.per_ip
                .breaks(key, Self::per_ip_limit(&self.policy))
                .filter(|_| self.policy.protected_endpoint(&t.tuple).is_none())
        })
    }
}
