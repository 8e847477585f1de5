//! `connwatch run`: the event loop. Kernel events move each socket's deadline; the loop
//! sleeps until the earliest one. Work follows events and victims, never a periodic walk
//! of every socket (a full reconciliation runs only at start-up and after the kernel
//! reports dropped events).

use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use connwatch_common::ConnEvent;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::app::describe;
use crate::cli::PolicyArgs;
use crate::clock::monotonic_ns;
use crate::diag::SockDiag;
use crate::engine::{Engine, Reconciled};
use crate::loader::{self, ConnMap, Loaded, Stats};
use crate::policy::Policy;
use crate::privilege;

/// How often the kernel's drop counters are read: a constant cost, whatever the load.
const STATS_EVERY: Duration = Duration::from_secs(2);

pub struct Options {
    pub policy: Policy,
    pub enforce: bool,
    pub sizes: loader::Sizes,
    /// Where the policy came from: read again on SIGHUP.
    pub source: PolicyArgs,
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
        .dump_with_activity(SockDiag::ALL_STATES)
        .context("sock_diag dump failed")?;
    let (done, stale) = engine.reconcile(Some(conns), &live, now);
    for key in &stale {
        let _ = conns.remove(key);
    }
    Ok(done)
}

/// Where `run` holds its single-instance lock: two daemons would split the event ring
/// between them and each miss half of the sockets.
pub const LOCK_PATH: &str = "/run/connwatch.lock";

/// Takes the single-instance lock; it is released when the returned file closes.
pub fn lock_instance() -> Result<std::fs::File> {
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
    } = loader::load_and_attach(opts.sizes)?;
    privilege::drop_after_load()?;
    let mut diag = SockDiag::open().context("cannot open a sock_diag netlink socket")?;
    tracing::info!("policy: {}", describe(&opts.policy));
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
    let mut sighup = signal(SignalKind::hangup())?;
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
                engine.fire_due(monotonic_ns(), &mut diag, Some(&conns));
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
            _ = sighup.recv() => {
                match opts.source.spec(engine.enforce) {
                    Ok(spec) => {
                        let policy = spec.build();
                        tracing::info!("reloaded the policy: {}", describe(&policy));
                        engine.set_policy(policy);
                    }
                    Err(e) => tracing::error!("reload refused, keeping the last good policy: {e:#}"),
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let c = &engine.counters;
    tracing::info!(
        "stopping: {} events, {} destroyed, {} would destroy, {} skipped, {} failed; {}",
        c.events,
        c.destroyed,
        c.would_destroy,
        c.skipped,
        c.failed,
        loader::left_behind()
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
