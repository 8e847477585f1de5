//! `connwatch run`: the event loop. Kernel events move each socket's deadline; the loop
//! sleeps until the earliest one. Work follows events and victims, never a periodic walk
//! of every socket (a full reconciliation runs only at start-up and after the kernel
//! reports dropped events).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use connwatch_common::{ConnEvent, EntryEvent};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::clock::monotonic_ns;
use crate::conn::SockId;
use crate::control::answer::{self, Ctx};
use crate::control::protocol::{error, Reply, Request};
use crate::control::{http, server};
use crate::engine::{suggested_max_conns, Engine, Pace, Reconciled};
use crate::kernel::cgroup::Cgroups;
use crate::kernel::first_seen::{self, FirstSeenFile};
use crate::kernel::netns::Namespaces;
use crate::kernel::sock_diag::{DestroySupport, SockDiag};
use crate::kernel::{self, pins, privilege, ConnMap, FilterMap, Loaded, Stats};
use crate::observe::journal::Journal;
use crate::observe::log::{self, reopen_log_file};
use crate::observe::metrics::Metrics;
use crate::policy::{Policy, PolicySource};
use crate::track::FastMap;

/// How often the kernel's drop counters are read: a constant cost, whatever the load.
const STATS_EVERY: Duration = Duration::from_secs(2);

/// The longest a reconcile after kernel drops is put off while the drops go on (the
/// wait doubles from [`STATS_EVERY`] up to this; see `engine::Pace`).
const RECONCILE_MAX_EVERY: Duration = Duration::from_secs(64);

/// How often the event ring is drained when the kernel has not woken the daemon: it
/// wakes it only once a share of the ring is unread (`kernel::load::WAKEUP_SHARE`), so
/// an event waits at most this long (a deadline drains the ring before it fires).
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// After this many drains in a row find the ring empty (a second), the daemon stops
/// polling and has the kernel wake it at the next event: twenty wake-ups a second were
/// most of a quiet host's cost.
const QUIET_DRAINS: u32 = 20;

/// Whether the daemon polls the event ring or sleeps until the kernel wakes it (the
/// filter's `wake_each`).
#[derive(Default)]
struct Polling {
    asleep: bool,
    empty_drains: u32,
}

impl Polling {
    /// Counts a drain of the ring by the poll: after [`QUIET_DRAINS`] empty ones, the
    /// kernel is told to wake the daemon at each event, and the ring is drained once
    /// more for what was sent before it knew.
    fn drained(
        &mut self,
        events: usize,
        map: &mut FilterMap,
        ring: &mut RingBuf<MapData>,
        engine: &mut Engine,
    ) {
        if events > 0 {
            self.empty_drains = 0;
            return;
        }
        self.empty_drains += 1;
        if self.empty_drains < QUIET_DRAINS {
            return;
        }
        let mut filter = *engine.filter();
        filter.wake_each = 1;
        if let Err(e) = kernel::write_filter(map, &filter) {
            // Polling goes on: nothing is late, it only costs the wake-ups.
            tracing::debug!("{e:#}: the ring stays polled");
            self.empty_drains = 0;
            return;
        }
        self.asleep = true;
        drain(ring, engine);
    }

    /// The kernel woke the daemon, or the policy's filter was written anew (which
    /// polls): polled from now on, the kernel waking it only for a full share.
    fn awake(&mut self, map: &mut FilterMap, engine: &Engine, filter_written: bool) {
        self.empty_drains = 0;
        if !self.asleep {
            return;
        }
        if !filter_written {
            if let Err(e) = kernel::write_filter(map, engine.filter()) {
                // Still woken at each event: nothing is late, it costs the wake-ups.
                tracing::debug!("{e:#}: the kernel goes on waking the daemon at each event");
                return;
            }
        }
        self.asleep = false;
    }
}

pub struct Options {
    pub policy: Policy,
    pub enforce: bool,
    pub sizes: kernel::Sizes,
    /// Where the policy came from: read again on SIGHUP and on a control-API reload.
    pub source: PolicySource,
    /// The control socket.
    pub api_socket: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
}

/// Reads the policy again from where it came from and puts it in force, for SIGHUP
/// and the control API alike: logs and counts the outcome. On error the engine keeps
/// its policy. Returns the new policy's description.
fn reload(
    engine: &mut Engine,
    source: &PolicySource,
    metrics: Option<&Metrics>,
    via: &str,
) -> Result<String> {
    let done = source.read().map(|spec| {
        let policy = spec.build();
        let description = policy.describe();
        engine.set_policy(policy);
        if spec.enforce != engine.enforce {
            engine.enforce = spec.enforce;
            if spec.enforce {
                tracing::warn!("the reloaded policy enforces: connections it chooses are destroyed from now on");
            } else {
                tracing::warn!("the reloaded policy is a dry run: nothing is destroyed from now on (`enforce = false` in the file, and no --enforce)");
            }
        }
        description
    });
    if let Some(m) = metrics {
        m.reloaded(done.is_ok());
    }
    match &done {
        Ok(description) => tracing::info!("reloaded the policy{via}: {description}"),
        Err(e) => tracing::error!("reload refused, keeping the last good policy: {e:#}"),
    }
    done
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

/// Events handed to the engine at once ([`Engine::on_events`]): half a drain's worth
/// on a busy host (20k connections a second send about 4000 in 50 ms).
const EVENT_BATCH: usize = 2048;

thread_local! {
    /// The events of a batch, kept between drains.
    static BATCH: std::cell::RefCell<Vec<ConnEvent>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Names the batch's owners (the kernel program records the pid, not the name) and
/// hands the batch to the engine.
fn hand_over(batch: &mut Vec<ConnEvent>, engine: &mut Engine) {
    kernel::procfs::name_owners(batch.iter_mut().map(|ev| &mut ev.info));
    engine.on_events(batch);
    batch.clear();
}

/// Hands the engine every event in the ring, a batch at a time; returns how many there
/// were.
fn drain(ring: &mut RingBuf<MapData>, engine: &mut Engine) -> usize {
    BATCH.with_borrow_mut(|batch| {
        let mut n = 0;
        batch.clear();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<EntryEvent>() {
                // SAFETY: the kernel program writes whole EntryEvent records; read
                // unaligned: ring records are only 8-byte aligned by contract.
                let record =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const EntryEvent) };
                batch.push(ConnEvent::from_record(&record));
                n += 1;
            }
            // The record's ring space is free again before the batch's work.
            drop(item);
            if batch.len() == EVENT_BATCH {
                hand_over(batch, engine);
            }
        }
        hand_over(batch, engine);
        n
    })
}

/// Puts the engine's filter in force in the kernel, then follows what it newly lets
/// through: the events already in the ring first, then one reconcile with the map
/// (which holds every socket) and a dump, so a reload that widens the policy picks up
/// sockets nothing sent before, and one that narrows it forgets those that no longer
/// matter.
fn refilter(
    engine: &mut Engine,
    filter: &mut FilterMap,
    ring: &mut RingBuf<MapData>,
    namespaces: &mut Namespaces,
    conns: &mut ConnMap,
    first_seen: &FirstSeenFile,
) {
    // Failures are logged, not fatal: the daemon stays up with the new policy, and the
    // next stats tick's reconcile (after any loss) or the next reload tries again.
    if let Err(e) = kernel::write_filter(filter, engine.filter()) {
        tracing::error!("{e:#}: the kernel goes on sending what the previous policy asked for");
    }
    drain(ring, engine);
    match full_reconcile(engine, namespaces, conns, first_seen) {
        Ok(done) => tracing::info!(
            "following the sockets the policy can act on: {} from the map, {} from the dump, {} stale entries removed",
            done.from_map,
            done.seeded,
            done.stale
        ),
        Err(e) => tracing::error!(
            "cannot reconcile after the reload: {e:#}; sockets the new policy selects are followed as their next state change is seen"
        ),
    }
}

/// One dump of every network namespace, and the tracker and map brought in line with
/// it. A namespace that cannot be dumped keeps what is known of it; the host's must be
/// dumped.
fn full_reconcile(
    engine: &mut Engine,
    namespaces: &mut Namespaces,
    conns: &mut ConnMap,
    first_seen: &FirstSeenFile,
) -> Result<Reconciled> {
    let now = monotonic_ns();
    let dump = namespaces.dump_all(SockDiag::ALL_STATES);
    for (inode, e) in &dump.failed {
        if *inode == namespaces.host {
            anyhow::bail!("sock_diag dump of the host's sockets failed: {e:#}");
        }
        tracing::warn!(
            "cannot dump network namespace {inode}: {e:#}; what is known of its sockets is kept"
        );
    }
    let (done, stale) = engine.reconcile(Some(conns), &dump, now);
    for key in &stale {
        conns.remove(*key);
    }
    let unclaimed = conns.remove_unclaimed();
    if unclaimed.removed > 0 {
        tracing::info!(
            "removed the IPv6 addresses of {} sockets whose close went unseen",
            unclaimed.removed
        );
    }
    if unclaimed.lost > 0 {
        tracing::warn!(
            "{} IPv6 sockets were born at a dead socket's address while its addresses were removed: they show no addresses, and cannot be destroyed, until their next state change",
            unclaimed.lost
        );
    }
    if !done.first_seen_set.is_empty() || !done.first_seen_gone.is_empty() {
        if let Err(e) = first_seen.write(&engine.first_seen) {
            tracing::warn!(
                "{e:#}: a restart counts the age of sockets older than connwatch from then"
            );
        }
    }
    namespaces.retain(|ns| engine.tracker.in_netns(ns) > 0);
    drop(dump);
    give_back_freed_memory();
    Ok(done)
}

/// The first sightings of sockets older than connwatch that earlier starts kept: in
/// `file`, and in the pinned map of a build before it (taken over once, the earlier of
/// two times kept; its pin goes only once the file holds them). A file that cannot be
/// read is started afresh, and said so: those sockets then count their age from this
/// start, later, never earlier.
fn kept_first_sightings(file: &FirstSeenFile) -> FastMap<SockId, u64> {
    let mut kept: FastMap<SockId, u64> = match file.read() {
        Ok(all) => all.into_iter().collect(),
        Err(e) => {
            tracing::warn!("{e:#}: sockets older than connwatch count their age from this start");
            FastMap::default()
        }
    };
    match first_seen::read_pinned() {
        None => {}
        Some(Ok(pinned)) => {
            let n = pinned.len();
            for (id, at) in pinned {
                let t = kept.entry(id).or_insert(at);
                *t = (*t).min(at);
            }
            match file.write(&kept).and_then(|()| first_seen::forget_pinned()) {
                Ok(()) => tracing::info!(
                    "took over {n} first sightings from the pinned map of an earlier build into {}",
                    file.path().display()
                ),
                Err(e) => tracing::warn!("{e:#}: the {n} first sightings an earlier build pinned stay in its map, read again at the next start"),
            }
        }
        Some(Err(e)) => {
            tracing::warn!("{e:#}: the first sightings an earlier build pinned are not taken over")
        }
    }
    kept
}

/// Hands the memory a full reconcile used (the dump and the map read: tens of MiB on a
/// busy host) back to the system. glibc keeps freed heap for reuse, and the daemon's
/// resident size would otherwise stay at its start-up peak for good.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages; it is given no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
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

/// Gives freed tables back to the system. The tracker's tables double as a busy host
/// opens connections, and glibc, by default, raises its mmap threshold to the size of
/// each large block freed, so the next tables come from the heap and their freed
/// predecessors stay resident: at 200,000 followed sockets, 35 bytes a socket
/// (BENCHMARKS.md). A fixed threshold keeps every large table in its own mapping.
fn return_freed_tables() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator, at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

pub async fn run(opts: Options) -> Result<()> {
    return_freed_tables();
    let _lock = lock_instance()?;
    // The listeners come first, while this is still root in full: a daemon that later
    // sheds privileges keeps them.
    let listener = server::bind(&opts.api_socket)?;
    let _socket_file = RemoveOnDrop(opts.api_socket.clone());
    let metrics_listener = match opts.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };
    let Loaded {
        ebpf: _ebpf,
        mut conns,
        events,
        stats,
        filter: mut filter_map,
        set_state,
        logger,
    } = kernel::load_and_attach(opts.sizes)?;
    let mut kernel_log = match logger {
        // SAFETY: the logger owns its ring's descriptor and moves into the AsyncFd,
        // which deregisters it before the descriptor is closed.
        Some(l) => {
            Some(unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }?)
        }
        None => None,
    };
    let read_stats = || kernel::read_stats(&stats, set_state.as_ref());
    let dropped = privilege::drop_after_load()?;
    if opts.enforce && dropped.destroy == DestroySupport::NotSupported {
        anyhow::bail!(
            "--enforce needs SOCK_DESTROY, which this kernel lacks (CONFIG_INET_DIAG_DESTROY is not set): run without --enforce to observe and list"
        );
    }
    let mut namespaces = Namespaces::open()?;
    tracing::info!("policy: {}", opts.policy.describe());
    let mut engine = Engine::new(opts.policy, opts.enforce);
    // Sockets older than connwatch keep the age bound an earlier start gave them.
    let first_seen = FirstSeenFile::host();
    engine.first_seen = kept_first_sightings(&first_seen);
    engine.name_cgroups(Cgroups::default());
    if engine.policy.block_firewall.is_some() {
        // After the privilege drop: nft must work with what the daemon keeps.
        engine.open_firewall()?;
    }
    // The kernel sends only what the policy can act on, from now until a clean stop
    // (which sends nothing again); a start after a crash writes it anew.
    engine.filtered();
    kernel::write_filter(&mut filter_map, engine.filter())?;
    // The drop counters' baseline comes before the start-up reconcile: records dropped
    // after it are reconciled again at the next stats tick, none go unnoticed. Drops
    // are reported from here: since this start, not since boot.
    let start_stats = read_stats().unwrap_or_default();
    let mut last_stats = start_stats;
    let capacity = conns.max_entries();
    let mut pace = Pace::new(STATS_EVERY, RECONCILE_MAX_EVERY);
    let mut told_map_full = false;
    let done = full_reconcile(&mut engine, &mut namespaces, &mut conns, &first_seen)?;
    // Before the line that says it runs: a stop right after it must be a clean stop.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    tracing::info!(
        "watching TCP sockets: {} from the pinned map, {} older than connwatch (age unknown; {} of them first seen by an earlier start), {} stale entries removed; {}",
        done.from_map,
        done.seeded,
        done.seen_before,
        done.stale,
        if engine.enforce { "enforcing" } else { "dry run: nothing will be destroyed (add --enforce to destroy)" }
    );
    let started = Instant::now();
    let journal = Rc::new(RefCell::new(Journal::default()));
    let metrics = opts
        .metrics_addr
        .map(|_| Rc::new(Metrics::new(start_stats)));
    {
        let (journal, metrics) = (journal.clone(), metrics.clone());
        engine.observe(Box::new(move |o| {
            journal.borrow_mut().note(o.record, monotonic_ns());
            if let Some(m) = &metrics {
                m.observe(o);
            }
        }));
    }
    let (jobs_tx, mut jobs) = tokio::sync::mpsc::channel::<server::Job>(64);
    tokio::spawn(server::serve(listener, jobs_tx.clone()));
    tracing::info!("control API on {}", opts.api_socket.display());
    if let (Some(listener), Some(addr)) = (metrics_listener, opts.metrics_addr) {
        tokio::spawn(http::serve(listener, jobs_tx.clone()));
        tracing::info!("Prometheus metrics on http://{addr}/metrics");
    }
    drop(jobs_tx);
    let mut ring = watch_ring(events)?;
    let mut tick = tokio::time::interval(STATS_EVERY);
    let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polling = Polling::default();
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
                if polling.asleep {
                    polling.awake(&mut filter_map, &engine, false);
                    drain_tick.reset();
                }
            }
            // The kernel program's rare diagnostics, into this log.
            Some(mut guard) = async {
                match kernel_log.as_mut() {
                    Some(l) => l.readable_mut().await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tokio::time::sleep_until(wake) => {
                // Events first: a socket may have closed or moved its deadline.
                drain(ring.get_mut(), &mut engine);
                // A round's records are written together (its intents at once).
                let _held = log::hold();
                engine.fire_due(monotonic_ns(), &mut namespaces, Some(&conns));
            }
            _ = drain_tick.tick(), if !polling.asleep => {
                let n = drain(ring.get_mut(), &mut engine);
                polling.drained(n, &mut filter_map, ring.get_mut(), &mut engine);
            }
            at = tick.tick() => {
                // Also what an event sent as the daemon went to sleep waits for at most.
                drain(ring.get_mut(), &mut engine);
                let s = read_stats().unwrap_or(last_stats);
                let mut caught_up = true;
                if !s.lost_since(&last_stats) {
                    pace.quiet();
                } else if !pace.due(at.into_std()) {
                    // Losses go on (a full map counts one at each state change of a
                    // socket it cannot hold): the next reconcile takes them all in.
                    engine.counters.reconciles_put_off += 1;
                    caught_up = false;
                } else {
                    report_drops(last_stats, s);
                    drain(ring.get_mut(), &mut engine);
                    match full_reconcile(&mut engine, &mut namespaces, &mut conns, &first_seen) {
                        Ok(done) => {
                            engine.counters.reconciles += 1;
                            pace.reconciled(at.into_std());
                            tracing::warn!("reconciled with the kernel: {} sockets seeded, {} stale entries removed", done.seeded, done.stale);
                            if s.map_full > last_stats.map_full && !told_map_full {
                                told_map_full = true;
                                tracing::warn!(
                                    "the kernel's connection map is full ({capacity} entries for {} TCP sockets): sockets it cannot hold are found only by reconciles, which are put off while it stays full (twice as long each time, up to {RECONCILE_MAX_EVERY:?}); run `connwatch cleanup`, then start with --max-conns {} (the next power of two above twice the sockets now)",
                                    done.sockets,
                                    suggested_max_conns(done.sockets, capacity)
                                );
                            }
                        }
                        // Most likely when the host is under load: the daemon stays up
                        // and tries again at the next tick (the drops still show).
                        Err(e) => {
                            engine.counters.reconcile_failures += 1;
                            caught_up = false;
                            tracing::error!("reconciling with the kernel failed, trying again in {STATS_EVERY:?}: {e:#}");
                        }
                    }
                }
                if caught_up {
                    last_stats = s;
                }
                // A namespace whose sockets are all gone is let go of.
                namespaces.retain(|ns| engine.tracker.in_netns(ns) > 0);
            }
            _ = sighup.recv() => {
                match reopen_log_file() {
                    Ok(Some(path)) => tracing::info!("reopened the log file {}", path.display()),
                    Ok(None) => {}
                    Err(e) => tracing::error!("{e:#}; logging goes on to the file as it was"),
                }
                if reload(&mut engine, &opts.source, metrics.as_deref(), "").is_ok() {
                    refilter(&mut engine, &mut filter_map, ring.get_mut(), &mut namespaces, &mut conns, &first_seen);
                    polling.awake(&mut filter_map, &engine, true);
                    drain_tick.reset();
                }
            }
            Some(job) = jobs.recv() => {
                // Answer with what the kernel has said so far.
                drain(ring.get_mut(), &mut engine);
                let kernel_now = read_stats().unwrap_or(last_stats);
                let reply = match job.req {
                    Request::Reload => {
                        match reload(&mut engine, &opts.source, metrics.as_deref(), " (control API)") {
                            Ok(description) => {
                                refilter(&mut engine, &mut filter_map, ring.get_mut(), &mut namespaces, &mut conns, &first_seen);
                                polling.awake(&mut filter_map, &engine, true);
                                drain_tick.reset();
                                Reply::Json(serde_json::json!({"ok": true, "description": description}))
                            }
                            Err(e) => error(format!("reload refused, keeping the last good policy: {e:#}")),
                        }
                    }
                    Request::Metrics => match &metrics {
                        Some(m) => {
                            let others: Vec<_> = answer::unfollowed(&engine, Some(&conns)).into_values().collect();
                            Reply::Text(m.scrape_with(&engine, &others, kernel_now, monotonic_ns()))
                        }
                        None => error("metrics are off"),
                    },
                    req => answer::answer(req, &mut Ctx {
                        engine: &mut engine,
                        namespaces: &mut namespaces,
                        conns: Some(&conns),
                        journal: &journal,
                        kernel: kernel_now.since(&start_stats),
                        started,
                        api_socket: &opts.api_socket,
                        metrics_addr: opts.metrics_addr,
                    }),
                };
                let _ = job.reply.send(reply);
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // A clean stop leaves no firewall rule behind that no daemon shows or bounds.
    engine.remove_firewall();
    // A clean stop: the programs stay attached to keep the map true, and send nothing
    // while no daemon reads the ring.
    if let Err(e) = kernel::write_filter(&mut filter_map, &connwatch_common::Filter::off()) {
        tracing::warn!("{e:#}: the kernel program goes on sending events no one reads");
    }
    let c = &engine.counters;
    tracing::info!(
        "stopping: {} events, {} destroyed, {} would destroy, {} skipped, {} failed; {}",
        c.events,
        c.destroyed,
        c.would_destroy,
        c.skipped,
        c.failed,
        pins::left_behind()
    );
    Ok(())
}

/// Removes the control socket when the daemon stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn report_drops(before: Stats, after: Stats) {
    tracing::warn!(
        "the kernel side dropped records: {} sockets not recorded (map full), {} events lost (ring full), {} state changes missed (recursion); reconciling with one sock_diag dump",
        after.map_full - before.map_full,
        after.ring_full - before.ring_full,
        after.recursion_misses.saturating_sub(before.recursion_misses)
    );
}
