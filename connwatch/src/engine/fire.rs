//! What happens when deadlines come: the safety budget, a refresh from the map, one
//! batched exact lookup, the re-check against the choice and the kernel's own
//! activity timers, protections judged on the socket itself, then the destroys.

use std::collections::{BTreeMap, HashMap};

use super::destroy::{self, Outcome};
use super::{ms, Engine, SettledAs};
use crate::clock::SEC;
use crate::conn::{Owner, Tuple};
use crate::engine::audit::Action;
use crate::kernel::netns::Namespaces;
use crate::kernel::procfs;
use crate::kernel::sock_diag::{DestroyError, DiagSocket, SockDiag};
use crate::kernel::ConnMap;
use crate::policy::{Decision, Limit, RuleId};
use crate::track::{Source, Tracked};

/// The first wait before a socket whose destroy failed for a reason that may pass is
/// due again; each further failure doubles it, up to [`RETRY_MAX_NS`].
const RETRY_FIRST_NS: u64 = SEC;
const RETRY_MAX_NS: u64 = 300 * SEC;

/// Whether a failure may pass: no answer from the kernel (a time-out, an unreachable
/// namespace), as opposed to a refusal that would be the same next time (no
/// CAP_NET_ADMIN, no SOCK_DESTROY in the kernel), which is never retried in a loop.
fn transient(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed(DestroyError::Other(_)))
}

/// The log target of the intent lines: a log sink that holds lines back to write
/// them together must write these at once, before the destroys they announce.
pub const INTENT: &str = "connwatch::intent";

/// Logs what is about to be destroyed, before the destroys go to the kernel, a line
/// a batch: a daemon killed between a destroy and its record leaves at least this
/// line naming the connection, so the log accounts for every connection it reset.
fn log_intent(socks: &[&DiagSocket]) {
    for chunk in socks.chunks(SockDiag::BATCH) {
        let named: Vec<String> = chunk.iter().map(|s| s.tuple.to_string()).collect();
        tracing::info!(
            target: INTENT,
            action = "destroying",
            count = chunk.len(),
            "destroying {} connections (each is logged again once done): {}",
            chunk.len(),
            named.join(", ")
        );
    }
}

/// What one round of deadlines learns from `/proc`, asked at most once each.
#[derive(Default)]
pub(super) struct Lookups {
    /// Process names by pid.
    names: HashMap<u32, Option<String>>,
    /// Sockets of protected processes, by inode.
    protected_inodes: Option<HashMap<u32, Owner>>,
}

impl Engine {
    /// Makes a socket due again after a back-off that doubles with each failure, and
    /// counts it: a failure that may pass must not lose the socket's deadline for good.
    pub(super) fn retry_later(&mut self, key: u64, now: u64) {
        if self.tracker.get(key).is_none() {
            return;
        }
        let n = self.retries.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        let wait = RETRY_FIRST_NS
            .saturating_mul(1 << (*n - 1).min(20))
            .min(RETRY_MAX_NS);
        self.deadlines.set(key, now.saturating_add(wait));
        self.counters.retried += 1;
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

    /// Acts on every socket whose deadline has come, each in its own network namespace.
    pub fn fire_due(&mut self, now: u64, namespaces: &mut Namespaces, conns: Option<&ConnMap>) {
        let mut due = self.deadlines.pop_due(now);
        if due.is_empty() {
            return;
        }
        let mut put_off = Vec::new();
        if let Some(left) = self.budget_left(now) {
            if due.len() > left {
                put_off = due.split_off(left);
                tracing::warn!(
                    "safety budget: {} sockets due at once, destroying {} now and putting off {} (--max-kills-per-second {:?}, --max-kill-fraction {:?})",
                    put_off.len() + due.len(),
                    due.len(),
                    put_off.len(),
                    self.policy.budget.max_kills_per_second,
                    self.policy.budget.max_kill_fraction,
                );
                self.counters.deferred += put_off.len() as u64;
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
        // One exchange per namespace: a sock_diag socket sees only its own.
        let mut by_ns: BTreeMap<u32, Vec<(u64, Tracked, RuleId)>> = BTreeMap::new();
        for c in chosen {
            by_ns.entry(c.1.id.netns).or_default().push(c);
        }
        let mut lookups = Lookups::default();
        for (netns, group) in by_ns {
            let pid = group.iter().find_map(|(_, t, _)| t.owner.map(|o| o.pid));
            let own = netns == namespaces.host;
            match namespaces.diag(netns, pid) {
                Ok(diag) => self.fire_in(diag, own, group, now, conns, &mut lookups),
                Err(e) => {
                    let why = format!("cannot reach network namespace {netns}: {e:#}");
                    for (key, chosen, rule) in group {
                        let outcome = Outcome::Failed(DestroyError::Other(std::io::Error::other(
                            why.clone(),
                        )));
                        self.record(&chosen, rule, now, &outcome, None);
                        self.retry_later(key, now);
                    }
                }
            }
        }
        // Due when the window this round used has passed: a second after its first
        // destroy, which lookups on a loaded host may have put well after `now`.
        let next_window = self.window_start_ns + SEC;
        for (key, _) in put_off {
            self.deadlines.set(key, next_window);
        }
        self.apply_blocks(namespaces);
    }

    /// Looks up, re-checks and destroys the due sockets of one namespace through its
    /// sock_diag socket.
    #[allow(clippy::too_many_arguments)]
    fn fire_in(
        &mut self,
        diag: &mut SockDiag,
        own_netns: bool,
        chosen: Vec<(u64, Tracked, RuleId)>,
        now: u64,
        conns: Option<&ConnMap>,
        lookups: &mut Lookups,
    ) {
        let started = std::time::Instant::now();
        let n_due = chosen.len();
        // Only a mass round skips the lookup: an ordinary one looks each socket up, so
        // its audit record carries the traffic tcp_info counts.
        let mass = n_due >= SPREAD_FROM || self.one_shot;
        let mut kills = Vec::with_capacity(chosen.len());
        // A socket the map holds, just re-read there, needs no lookup unless the
        // decision needs what only the kernel's socket says: tcp_info for an idle
        // limit, the inode for protection by process when the owner is unknown. The
        // destroy names the cookie the kernel recorded, so the kernel itself refuses
        // any other socket.
        // Whether any protected process holds a socket at all (read once a round, as
        // the inodes are): if none does, an unknown owner needs no inode either.
        let none_protected = chosen.iter().any(|(_, t, _)| t.trusted_owner().is_none())
            && !self.policy.protect.processes.is_empty()
            && lookups
                .protected_inodes
                .get_or_insert_with(|| procfs::sockets_of(&self.policy.protect.processes))
                .is_empty();
        let (direct, looked): (Vec<_>, Vec<_>) = chosen
            .into_iter()
            .partition(|(_, t, rule)| mass && self.needs_no_lookup(t, *rule, none_protected));
        for (key, chosen, rule) in direct {
            if let Some(target) = self.vet_direct(key, &chosen, rule, now, lookups) {
                kills.push((key, rule, target));
            }
        }
        let tuples: Vec<Tuple> = looked.iter().map(|(_, t, _)| t.tuple).collect();
        // Each with the device it is bound to, which the kernel's lookup must be given.
        let wanted: Vec<(Tuple, u32)> = looked
            .iter()
            .map(|(_, t, _)| (t.tuple, t.ifindex))
            .collect();
        let found = diag.get_many_on(&wanted);
        let looked_up = started.elapsed();
        for ((key, chosen, rule), found) in looked.into_iter().zip(found) {
            if let Some(live) = self.vet(key, &chosen, rule, found, now, conns, lookups) {
                // Named by the cookie the kernel recorded: it refuses any other socket.
                kills.push((key, rule, destroy::target(&chosen, &live)));
            }
        }
        if self.window_used == 0 && !kills.is_empty() {
            // The budget's second starts at its first destroy, not at the round's start.
            self.window_start_ns = now.saturating_add(started.elapsed().as_nanos() as u64);
        }
        let results: Vec<Outcome> = if self.enforce {
            let socks: Vec<&DiagSocket> = kills.iter().map(|(_, _, live)| live).collect();
            log_intent(&socks);
            destroy_spread(diag, &socks, own_netns)
                .into_iter()
                .map(destroy::outcome_of)
                .collect()
        } else {
            kills.iter().map(|_| Outcome::WouldDestroy).collect()
        };
        let killed = started.elapsed();
        let n = kills.len();
        for ((key, rule, live), outcome) in kills.into_iter().zip(results) {
            let Some(chosen) = self.tracker.get(key) else {
                continue;
            };
            if matches!(outcome, Outcome::Destroyed | Outcome::WouldDestroy) {
                self.window_used += 1;
            }
            if matches!(outcome, Outcome::WouldDestroy) {
                // As a live run's destroy would: out of its groups, never due again.
                self.settle(key, SettledAs::WouldDestroy);
                self.plan(key);
            }
            // No kernel event will say a socket outside the map is gone.
            if chosen.source != Source::Map && matches!(outcome, Outcome::Destroyed) {
                self.tracker.remove(key);
                self.plan(key);
            }
            self.note_block(&chosen, rule, &outcome);
            let r = self.policy.rule(rule);
            let (reason, name) = (r.limit.kind(), r.name.clone());
            self.record_carried(&chosen, reason, name, now, &outcome, None, live.traffic);
            if transient(&outcome) {
                self.retry_later(key, now);
            } else {
                self.retries.remove(&key);
            }
        }
        tracing::debug!(
            "round of {n_due} deadlines ({} looked up): lookups took {:?}, {n} kills ended at {:?}, records at {:?}",
            tuples.len(),
            looked_up,
            killed,
            started.elapsed()
        );
    }

    /// Takes in what the map says of a tracked socket now. False when it is no longer
    /// tracked: closed, or its address now holds another socket (whose events follow).
    pub(super) fn refresh_from_map(&mut self, key: u64, conns: Option<&ConnMap>) -> bool {
        let Some(before) = self.tracker.get(key) else {
            return false;
        };
        if let (Source::Map, Some(conns)) = (before.source, conns) {
            match conns.get(key) {
                Some(info) if self.tracker.refresh(key, &info) => {}
                _ => {
                    self.tracker.remove(key);
                    self.plan(key);
                    return false;
                }
            }
        }
        true
    }

    /// Refreshes a socket whose deadline came; returns it with the rule it is due under,
    /// or plans it again if it is not due any more.
    fn still_due(
        &mut self,
        key: u64,
        now: u64,
        conns: Option<&ConnMap>,
    ) -> Option<(u64, Tracked, RuleId)> {
        if !self.refresh_from_map(key, conns) {
            return None;
        }
        let Some(rule) = self.due_rule(key, now) else {
            self.plan(key);
            return None;
        };
        Some((key, self.tracker.get(key)?, rule))
    }

    /// Whether a due socket can be destroyed on what the map (in a one-shot run, the
    /// dump) just said of it.
    fn needs_no_lookup(&self, t: &Tracked, rule: RuleId, none_protected: bool) -> bool {
        let confirmed = self.one_shot
            || (t.source == Source::Map && !matches!(self.policy.rule(rule).limit, Limit::Idle(_)));
        confirmed
            && (t.trusted_owner().is_some()
                || self.policy.protect.processes.is_empty()
                || none_protected)
    }

    /// [`Engine::vet`] for a socket the map holds and just confirmed (same identity,
    /// same state): protections judged on its owner's current name; returns what the
    /// destroy names.
    fn vet_direct(
        &mut self,
        key: u64,
        chosen: &Tracked,
        rule: RuleId,
        now: u64,
        lookups: &mut Lookups,
    ) -> Option<DiagSocket> {
        let target = destroy::recorded(chosen);
        if let Some(o) = self.owner_of(chosen, &target, lookups) {
            self.tracker.note_owner(key, o);
        }
        let chosen = self.tracker.get(key)?;
        match self.policy.judge(&self.subject(&chosen), rule) {
            Decision::Destroy(_) => Some(target),
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

    /// Checks a looked-up socket against the choice, the kernel's own activity timers,
    /// and the protections; returns it if it is to be destroyed.
    #[allow(clippy::too_many_arguments)]
    fn vet(
        &mut self,
        key: u64,
        chosen: &Tracked,
        rule: RuleId,
        found: anyhow::Result<Option<DiagSocket>>,
        now: u64,
        conns: Option<&ConnMap>,
        lookups: &mut Lookups,
    ) -> Option<DiagSocket> {
        let live = match destroy::recheck(conns, key, chosen, found) {
            Ok((live, _)) => live,
            Err(outcome) => {
                self.record(chosen, rule, now, &outcome, None);
                if transient(&outcome) {
                    // The lookup got no answer: the socket may well still be there.
                    self.retry_later(key, now);
                    return None;
                }
                // Only sock_diag knew this socket; no close event will come for it.
                if chosen.source != Source::Map {
                    self.tracker.remove(key);
                    self.plan(key);
                }
                return None;
            }
        };
        // Only tcp_info knows when data last moved: a socket that spoke since is
        // planned again from then.
        if let (Limit::Idle(d), Some(act)) = (self.policy.rule(rule).limit, live.activity) {
            let quiet_since = now.saturating_sub(ms(act.quiet_ms()));
            if quiet_since.saturating_add(d.as_nanos() as u64) > now {
                self.tracker.note_activity(key, quiet_since);
                self.plan(key);
                return None;
            }
        }
        if let Some(o) = self.owner_of(chosen, &live, lookups) {
            self.tracker.note_owner(key, o);
        }
        let chosen = self.tracker.get(key)?;
        match self.policy.judge(&self.subject(&chosen), rule) {
            Decision::Destroy(_) => Some(live),
            Decision::Protected(_, p) => {
                self.counters.protected += 1;
                let outcome = Outcome::Skipped(format!("protected by {p}"));
                self.record(&chosen, rule, now, &outcome, Some(Action::Protected));
                self.settle(key, SettledAs::Protected);
                None
            }
            Decision::NotDue => {
                self.plan(key);
                None
            }
        }
    }

    /// The owner to judge protection by: the process's own name now where the kernel saw
    /// it connect or listen (the name it had when read, if it has exited since), else
    /// whoever of the protected processes holds the socket's inode (an accepted socket's
    /// listener may have handed it to another process).
    pub(super) fn owner_of(
        &self,
        chosen: &Tracked,
        live: &DiagSocket,
        lookups: &mut Lookups,
    ) -> Option<Owner> {
        if let Some(o) = chosen.trusted_owner() {
            let name = lookups
                .names
                .entry(o.pid)
                .or_insert_with(|| procfs::process_name(o.pid));
            return Some(name.as_deref().map_or(o, |n| Owner::new(o.pid, n)));
        }
        if live.inode == 0 || self.policy.protect.processes.is_empty() {
            return None;
        }
        lookups
            .protected_inodes
            .get_or_insert_with(|| procfs::sockets_of(&self.policy.protect.processes))
            .get(&live.inode)
            .copied()
    }
}

/// Destroys at or above this many at once run on two threads.
const SPREAD_FROM: usize = 4096;

/// A second destroy thread is used only on a machine of at least this many CPUs: it
/// takes a whole core, and the processes whose sockets are reset need CPU to wake and
/// close them. On two cores, one thread ended 100k connections as fast as two
/// (figure 4) and left the other core to them.
const SPREAD_CPUS: usize = 4;

/// Destroys `socks`, many at once on two threads (a sock_diag socket each) so that the
/// kernel's abort work (the reset, waking the owners) uses two cores. Only in the
/// daemon's own namespace, where a second socket is one `socket(2)` away, and with
/// [`SPREAD_CPUS`]; results come back in the order asked.
fn destroy_spread(
    diag: &mut SockDiag,
    socks: &[&DiagSocket],
    own_netns: bool,
) -> Vec<Result<(), DestroyError>> {
    // Asked once: the answer reads the process's affinity and cgroup CPU limits.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = || *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if !own_netns || socks.len() < SPREAD_FROM || cpus() < SPREAD_CPUS {
        return diag.destroy_many(socks);
    }
    let (first, second) = socks.split_at(socks.len() / 2);
    std::thread::scope(|s| {
        let other = s.spawn(|| SockDiag::open().ok().map(|mut d| d.destroy_many(second)));
        let mut done = diag.destroy_many(first);
        match other.join().ok().flatten() {
            Some(rest) => done.extend(rest),
            // No second socket: this one does the rest.
            None => done.extend(diag.destroy_many(second)),
        }
        done
    })
}
