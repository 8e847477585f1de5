//! `connwatch run`: the event loop. Kernel events move each socket's deadline; the loop
//! sleeps until the earliest one. Work follows events and victims, never a periodic walk
//! of every socket (a full reconciliation runs only at start-up and after the kernel
//! reports dropped events).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use connwatch_common::ConnEvent;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::audit::{Action, Age, Record};
use crate::clock::monotonic_ns;
use crate::conn::{TcpState, Tuple};
use crate::deadlines::Deadlines;
use crate::destroy::{self, Outcome};
use crate::diag::{DiagSocket, SockDiag};
use crate::loader::{self, ConnMap, Loaded, Stats};
use crate::policy::{Policy, Verdict};
use crate::tracker::{Source, Tracked, Tracker};

/// An unmatchable map entry (a connect still without a local port) older than this
/// is stale: connect gives up long before.
const UNMATCHABLE_STALE_NS: u64 = 600 * 1_000_000_000;

/// How often the kernel's drop counters are read: a constant cost, whatever the load.
const STATS_EVERY: Duration = Duration::from_secs(2);

pub struct Options {
    pub policy: Policy,
    pub enforce: bool,
    pub max_conns: Option<u32>,
}

/// Counts of what the daemon did, for its closing summary.
#[derive(Default, Debug)]
pub struct Counters {
    pub events: u64,
    pub destroyed: u64,
    pub would_destroy: u64,
    pub skipped: u64,
    pub failed: u64,
}

/// The decision-making core, separate from the I/O loop.
pub struct Engine {
    pub policy: Policy,
    pub enforce: bool,
    pub tracker: Tracker,
    pub deadlines: Deadlines<u64>,
    pub counters: Counters,
}

impl Engine {
    pub fn new(policy: Policy, enforce: bool) -> Self {
        Engine {
            policy,
            enforce,
            tracker: Tracker::new(),
            deadlines: Deadlines::new(),
            counters: Counters::default(),
        }
    }

    /// Sets or clears the deadline of one socket from what is known of it now.
    pub fn plan(&mut self, key: u64) {
        let verdict = self
            .tracker
            .get(key)
            .map_or(Verdict::Never, |t| self.policy.verdict(&t.subject()));
        match verdict {
            Verdict::At { at_ns, .. } => self.deadlines.set(key, at_ns),
            Verdict::Never => self.deadlines.cancel(key),
        }
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
        for key in self.tracker.apply(ev) {
            self.plan(key);
        }
    }

    /// Brings the tracker and the map in line with the kernel's socket table: drops
    /// entries of sockets that are gone, and seeds sockets nothing recorded.
    pub fn reconcile(&mut self, conns: &mut ConnMap, live: &[DiagSocket], now: u64) -> Reconciled {
        let mut done = Reconciled::default();
        let live_tuples: HashMap<Tuple, TcpState> =
            live.iter().map(|s| (s.tuple, s.state)).collect();
        let mut in_map = HashSet::new();
        let mut stale_keys = Vec::new();
        for item in conns.iter() {
            let Ok((key, info)) = item else { continue };
            let Some(t) = Tracked::from_info(&info) else {
                continue;
            };
            // An entry whose socket is not in the dump died while no program watched,
            // unless it was made after the dump began; so did one whose tuple is now in
            // TIME_WAIT, a state the map never holds. An entry without a local port
            // (SYN_SENT) cannot be matched: only its age tells it is stale.
            let made_before_dump = info.seen_ns < now;
            let stale = if t.tuple.local.port() != 0 {
                made_before_dump
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
            if self.tracker.get(key) != Some(&t) {
                self.tracker.upsert(key, t);
            }
            done.from_map += 1;
        }
        for key in &stale_keys {
            let _ = conns.remove(key);
        }
        done.stale = stale_keys.len();
        let lost: Vec<u64> = self
            .tracker
            .iter()
            .filter(|(k, t)| match t.source {
                Source::Map => !in_map.contains(k),
                Source::Seeded => !live_tuples.contains_key(&t.tuple),
            })
            .map(|(k, _)| k)
            .collect();
        for key in lost {
            self.tracker.remove(key);
        }
        for s in live {
            if s.state.is_opening_or_listening() || s.state == TcpState::TIME_WAIT {
                continue;
            }
            if self.tracker.seed(s.tuple, s.state, s.cookie, now).is_some() {
                done.seeded += 1;
            }
        }
        let keys: Vec<u64> = self.tracker.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.plan(key);
        }
        done
    }

    /// Acts on every socket whose deadline has come.
    pub fn fire_due(&mut self, now: u64, diag: &mut SockDiag, conns: &ConnMap) {
        for (key, _) in self.deadlines.pop_due(now) {
            let Some(chosen) = self.tracker.get(key).copied() else {
                continue;
            };
            let Some(reason) = self.policy.is_due(&chosen.subject(), now) else {
                self.plan(key);
                continue;
            };
            let outcome = destroy::execute(diag, conns, key, &chosen, self.enforce);
            let (action, detail) = match &outcome {
                Outcome::Destroyed => (Action::Destroyed, None),
                Outcome::WouldDestroy => (Action::WouldDestroy, None),
                Outcome::Skipped(why) => (Action::Skipped, Some(why.clone())),
                Outcome::Failed(e) => (Action::Failed, Some(e.to_string())),
            };
            match action {
                Action::Destroyed => self.counters.destroyed += 1,
                Action::WouldDestroy => self.counters.would_destroy += 1,
                Action::Skipped => self.counters.skipped += 1,
                Action::Failed => self.counters.failed += 1,
            }
            Record {
                action,
                tuple: chosen.tuple,
                state: chosen.state,
                age: Age::of(chosen.birth, now),
                reason,
                dry_run: !self.enforce,
                detail: detail.as_deref(),
            }
            .emit();
            // A skipped socket changed under the decision: learn what it is now from the
            // map; its next kernel event plans it again. A failure is not retried.
            if let Outcome::Skipped(_) = outcome {
                if chosen.source == Source::Map {
                    match conns.get(&key, 0).ok().and_then(|i| Tracked::from_info(&i)) {
                        Some(now_known) if now_known != chosen => {
                            self.tracker.upsert(key, now_known);
                            self.plan(key);
                        }
                        Some(_) => {}
                        None => {
                            self.tracker.remove(key);
                        }
                    }
                }
            }
        }
    }
}

#[derive(Default, Debug)]
pub struct Reconciled {
    pub from_map: usize,
    pub seeded: usize,
    pub stale: usize,
}

fn watch_ring(events: RingBuf<MapData>) -> Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its descriptor and moves into the AsyncFd, which
    // deregisters it before the descriptor is closed.
    unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot watch the event ring: {e}"))
}

fn instant_of(at_ns: u64, now_ns: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_nanos(at_ns.saturating_sub(now_ns))
}

fn drain(ring: &mut RingBuf<MapData>, engine: &mut Engine) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<ConnEvent>() {
            // SAFETY: the kernel program writes whole ConnEvent records; read unaligned
            // because ring records are only 8-byte aligned by contract, not by type.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const ConnEvent) };
            engine.on_event(&ev);
        }
    }
}

fn full_reconcile(
    engine: &mut Engine,
    diag: &mut SockDiag,
    conns: &mut ConnMap,
) -> Result<Reconciled> {
    let now = monotonic_ns();
    let live = diag
        .dump(SockDiag::ALL_STATES)
        .context("sock_diag dump failed")?;
    Ok(engine.reconcile(conns, &live, now))
}

/// Where `run` holds its single-instance lock: two daemons would split the event ring
/// between them and each miss half of the sockets.
pub const LOCK_PATH: &str = "/run/connwatch.lock";

/// Takes the single-instance lock; it is released when the returned file closes.
fn lock_instance() -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(LOCK_PATH)
        .with_context(|| format!("cannot open {LOCK_PATH}"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        anyhow::bail!(
            "another `connwatch run` is active (pid {}, lock {LOCK_PATH}): stop it first",
            pid.trim()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

pub async fn run(opts: Options) -> Result<()> {
    let _lock = lock_instance()?;
    let Loaded {
        ebpf: _ebpf,
        mut conns,
        events,
        stats,
    } = loader::load_and_attach(opts.max_conns)?;
    let mut diag = SockDiag::open().context("cannot open a sock_diag netlink socket")?;
    let mut engine = Engine::new(opts.policy, opts.enforce);
    let done = full_reconcile(&mut engine, &mut diag, &mut conns)?;
    tracing::info!(
        "watching TCP sockets: {} from the pinned map, {} older than connwatch (age unknown), {} stale entries removed; {}",
        done.from_map,
        done.seeded,
        done.stale,
        if engine.enforce { "enforcing" } else { "dry run: nothing will be destroyed (add --enforce to destroy)" }
    );
    let mut ring = watch_ring(events)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(STATS_EVERY);
    let mut last_stats = loader::read_stats(&stats).unwrap_or_default();
    loop {
        let now = monotonic_ns();
        let wake = engine
            .deadlines
            .next_at()
            .map(|at| instant_of(at, now))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("event ring failed")?;
                drain(guard.get_inner_mut(), &mut engine);
                guard.clear_ready();
            }
            _ = tokio::time::sleep_until(wake) => {
                // Events first: a socket may have closed or moved its deadline.
                drain(ring.get_mut(), &mut engine);
                engine.fire_due(monotonic_ns(), &mut diag, &conns);
            }
            _ = tick.tick() => {
                let s = loader::read_stats(&stats).unwrap_or(last_stats);
                if s.map_full > last_stats.map_full || s.ring_full > last_stats.ring_full {
                    report_drops(last_stats, s);
                    drain(ring.get_mut(), &mut engine);
                    let done = full_reconcile(&mut engine, &mut diag, &mut conns)?;
                    tracing::warn!("reconciled with the kernel: {} sockets seeded, {} stale entries removed", done.seeded, done.stale);
                }
                last_stats = s;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let c = &engine.counters;
    tracing::info!(
        "stopping: {} events, {} destroyed, {} would destroy, {} skipped, {} failed; maps stay pinned in {} (`connwatch list` still reads them)",
        c.events, c.destroyed, c.would_destroy, c.skipped, c.failed, loader::PIN_DIR
    );
    Ok(())
}

fn report_drops(before: Stats, after: Stats) {
    tracing::warn!(
        "the kernel side dropped records: {} sockets not recorded (map full), {} events lost (ring full); reconciling with one sock_diag dump",
        after.map_full - before.map_full,
        after.ring_full - before.ring_full
    );
}
