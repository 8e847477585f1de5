//! `cargo xtask soak`: the daemon under churn and kills together, for minutes, on
//! loopback; its memory must stay flat and every decision must be logged.
//!
//! The load, all on 127.0.0.1, bounded in count and time, stopping by itself:
//! - "old" connections on port A, held until the daemon destroys them (rule: max-age 6s);
//! - "quiet" connections on port B that never send, destroyed when idle (rule: idle 2s);
//! - "chatty" connections on port B that send a byte every 500 ms and close themselves
//!   after 8 to 16 s: never idle, so never destroyed;
//! - "churn": short connections on port A (a write, then closed within a second):
//!   younger than the limit, so never destroyed;
//! - "protected" connections on port C, excluded, held for the whole run;
//! - a SIGHUP (policy reload) every 30 s.
//!
//! At the end: every connection that died by a reset must have a `destroyed` line,
//! every `destroyed` line must name an old or quiet connection at its deadline, no
//! chatty, churn or protected connection may have died, and the daemon's resident
//! memory after warm-up must not grow.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct SoakArgs {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Old connections held at once (each destroyed at 6 s).
    #[arg(long, default_value_t = 300)]
    old: usize,
    /// Quiet connections held at once (each destroyed when idle 2 s).
    #[arg(long, default_value_t = 100)]
    quiet: usize,
    /// Short connections opened per second.
    #[arg(long, default_value_t = 100)]
    churn_per_sec: u64,
}

const MAX_AGE: Duration = Duration::from_secs(6);
const IDLE: Duration = Duration::from_secs(2);
const CHATTY: usize = 50;
const PROTECTED: usize = 20;
const TICK: Duration = Duration::from_millis(50);
const RELOAD_EVERY: Duration = Duration::from_secs(30);
const RSS_EVERY: Duration = Duration::from_secs(5);
/// Memory is judged from this point on: start-up allocations and the first fill of
/// the daemon's tables are done by then.
const WARM_UP: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Old,
    Quiet,
    Chatty,
    Churn,
    Protected,
}

struct Held {
    kind: Kind,
    stream: TcpStream,
    local: SocketAddr,
    server: SocketAddr,
    opened: Instant,
    close_at: Option<Instant>,
    next_write: Option<Instant>,
}

/// A connection that ended, and how.
#[derive(Clone, Debug)]
struct Ended {
    kind: Kind,
    lived: Duration,
    /// Reset or aborted (destroyed), rather than closed by its owner.
    reset: bool,
}

/// A tiny xorshift: the load needs spread, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn soak_dir() -> PathBuf {
    crate::target_dir().join("soak")
}

/// Server ends by (listener, client), held until their client goes. A client port
/// freed by a reset is soon reused, towards another listener or the same one.
type Servers = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), TcpStream>>>;

fn accept_loop(listener: TcpListener, servers: Servers, stop: Arc<AtomicBool>) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let me = listener.local_addr().expect("a bound listener");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                let _ = s.set_nonblocking(true);
                servers.lock().unwrap().insert((me, peer), s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(2)),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Drops server ends whose client is gone (EOF or reset); reads what chatty clients
/// send so their buffers never fill.
fn reap_servers(servers: &Servers) {
    let mut buf = [0u8; 256];
    servers.lock().unwrap().retain(|_, s| loop {
        match s.read(&mut buf) {
            Ok(0) => break false,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
            Err(_) => break false,
        }
    });
}

/// Whether a held client end is still alive; None if it ended (Some(reset) says how).
fn probe(stream: &mut TcpStream) -> Option<bool> {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Some(false),
        Ok(_) => None,
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => Some(matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        )),
    }
}

fn open(kind: Kind, to: SocketAddr) -> Result<Held> {
    let stream = TcpStream::connect(to).with_context(|| format!("connect {to}"))?;
    stream.set_nonblocking(true)?;
    Ok(Held {
        kind,
        local: stream.local_addr()?,
        server: to,
        stream,
        opened: Instant::now(),
        close_at: None,
        next_write: None,
    })
}

/// TCP sockets allocated on the whole host, every network namespace included
/// (`alloc` in /proc/net/sockstat is a global counter): the kernel program sees them all.
fn host_tcp_sockets() -> Option<u64> {
    let text = fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut words = tcp.split_whitespace();
    while let Some(w) = words.next() {
        if w == "alloc" {
            return words.next()?.parse().ok();
        }
    }
    None
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User plus system CPU seconds of a process.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .context("cannot run kill")?;
    if !st.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

/// One decision line of the daemon's text log.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub reason: String,
}

/// Parses `... INFO destroyed 127.0.0.1:A -> 127.0.0.1:E state=ESTABLISHED age=6s reason=max-age ...`.
pub fn decision(line: &str) -> Option<Decision> {
    for action in [
        "destroyed",
        "would destroy",
        "skipped",
        "failed to destroy",
        "protected",
    ] {
        let Some(at) = line.find(&format!(" {action} ")) else {
            continue;
        };
        let rest = &line[at + action.len() + 2..];
        let (local, rest) = rest.split_once(" -> ")?;
        let (remote, rest) = rest.split_once(' ')?;
        let reason = rest
            .split_whitespace()
            .find_map(|w| w.strip_prefix("reason="))
            .unwrap_or("")
            .to_string();
        return Some(Decision {
            action: action.to_string(),
            local: local.parse().ok()?,
            remote: remote.parse().ok()?,
            reason,
        });
    }
    None
}

/// Whether memory stayed flat: the last sample no more than 5% + 1 MiB over the
/// first one after warm-up.
pub fn flat(after_warm_up: u64, last: u64) -> bool {
    last <= after_warm_up + after_warm_up / 20 + 1024
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

pub fn run(args: SoakArgs) -> Result<std::process::ExitCode> {
    crate::build(true)?;
    let bin = crate::target_dir().join("release").join("connwatch");
    let dir = soak_dir();
    fs::create_dir_all(&dir)?;

    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()?;
    let (a, b, c) = (addrs[0], addrs[1], addrs[2]);
    let config = dir.join("soak.toml");
    fs::write(
        &config,
        format!(
            "exclude-port = [{}]\n\n[[rule]]\nname = \"old\"\nlocal-port = [{}]\nmax-age = \"{}s\"\n\n[[rule]]\nname = \"quiet\"\nlocal-port = [{}]\nidle = \"{}s\"\n",
            c.port(),
            a.port(),
            MAX_AGE.as_secs(),
            b.port(),
            IDLE.as_secs()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600))?;
    }
    let log_path = dir.join("daemon.log");
    let log = fs::File::create(&log_path)?;
    let mut cmd = Command::new(&bin);
    crate::env::scrub(&mut cmd);
    // Debug level: skipped decisions are logged there.
    cmd.env("CONNWATCH_LOG", "debug");
    cmd.args(["run", "--enforce", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    eprintln!(
        "xtask: {} (log: {}, for {} s)",
        crate::show(&cmd),
        log_path.display(),
        args.seconds
    );
    let mut daemon: Child = cmd.spawn().context("cannot start connwatch")?;
    let pid = daemon.id();
    let started = Instant::now();
    loop {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("watching TCP sockets") {
            break;
        }
        if let Some(st) = daemon.try_wait()? {
            bail!("connwatch exited at start ({st}):\n{text}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = daemon.kill();
            bail!("connwatch did not start within 30 s:\n{text}");
        }
        thread::sleep(Duration::from_millis(50));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let servers: Servers = Arc::default();
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let (s, st) = (servers.clone(), stop.clone());
            thread::spawn(move || accept_loop(l, s, st))
        })
        .collect();

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut held: Vec<Held> = Vec::new();
    // Each ended connection by (server, client): a tuple can be used again later.
    let mut ended: Vec<(SocketAddr, SocketAddr, Ended)> = Vec::new();
    let mut cpu = None;
    let mut opened: HashMap<Kind, u64> = HashMap::new();
    // (when, daemon VmRSS KiB, host-wide TCP sockets)
    let mut rss: Vec<(Duration, u64, u64)> = Vec::new();
    let mut next_rss = Instant::now();
    let mut next_reload = Instant::now() + RELOAD_EVERY;
    let mut reloads = 0u32;
    let mut churn_debt = 0.0f64;
    let load_start = Instant::now();
    let load_end = load_start + Duration::from_secs(args.seconds);
    // After the load: the daemon stops first, then one last look records the ends.
    let mut daemon_stopped = false;
    let mut failure: Option<String> = None;
    loop {
        let now = Instant::now();
        if now >= load_end && !daemon_stopped {
            cpu = cpu_secs(pid).or(cpu);
            signal(pid, "-TERM")?;
            let st = daemon.wait()?;
            if !st.success() {
                failure = Some(format!("connwatch exited with {st} when stopped"));
            }
            daemon_stopped = true;
            thread::sleep(Duration::from_secs(1));
            continue;
        }
        if !daemon_stopped {
            if let Some(st) = daemon.try_wait()? {
                failure = Some(format!("connwatch died during the soak: {st}"));
                break;
            }
            if now >= next_rss {
                if let Some(kib) = rss_kib(pid) {
                    let host = host_tcp_sockets().unwrap_or(0);
                    rss.push((now - load_start, kib, host));
                }
                cpu = cpu_secs(pid).or(cpu);
                next_rss += RSS_EVERY;
            }
            if now >= next_reload {
                signal(pid, "-HUP")?;
                reloads += 1;
                next_reload += RELOAD_EVERY;
            }
        }
        // Look at every held client end.
        let mut keep = Vec::with_capacity(held.len());
        for mut h in held.drain(..) {
            let end = match probe(&mut h.stream) {
                Some(reset) => Some(reset),
                None if h.close_at.is_some_and(|t| now >= t) => Some(false),
                None => None,
            };
            if let Some(reset) = end {
                let e = Ended {
                    kind: h.kind,
                    lived: h.opened.elapsed(),
                    reset,
                };
                ended.push((h.server, h.local, e));
                continue;
            }
            if let Some(t) = h.next_write.filter(|t| now >= *t) {
                let _ = h.stream.write(b"x");
                h.next_write = Some(t + Duration::from_millis(500));
            }
            keep.push(h);
        }
        held = keep;
        reap_servers(&servers);
        if daemon_stopped {
            break;
        }
        // Top up every kind.
        let count = |k: Kind, held: &[Held]| held.iter().filter(|h| h.kind == k).count();
        let mut want = vec![
            (Kind::Old, a, args.old),
            (Kind::Quiet, b, args.quiet),
            (Kind::Chatty, b, CHATTY),
            (Kind::Protected, c, PROTECTED),
        ];
        churn_debt += args.churn_per_sec as f64 * TICK.as_secs_f64();
        let churn_now = churn_debt.floor() as usize;
        churn_debt -= churn_now as f64;
        want.push((Kind::Churn, a, count(Kind::Churn, &held) + churn_now));
        for (kind, to, n) in want {
            for _ in count(kind, &held)..n {
                let mut h = open(kind, to)?;
                match kind {
                    Kind::Churn => {
                        let _ = h.stream.write(b"hello");
                        h.close_at = Some(h.opened + Duration::from_millis(rng.below(1000)));
                    }
                    Kind::Chatty => {
                        h.next_write = Some(h.opened);
                        h.close_at = Some(h.opened + Duration::from_millis(8000 + rng.below(8000)));
                    }
                    _ => {}
                }
                *opened.entry(kind).or_default() += 1;
                held.push(h);
            }
        }
        thread::sleep(TICK);
    }
    stop.store(true, Ordering::Relaxed);
    for t in acceptors {
        let _ = t.join();
    }
    let _ = daemon.kill();
    let _ = daemon.wait();

    // What the daemon said.
    let text = fs::read_to_string(&log_path)?;
    let decisions: Vec<Decision> = text.lines().filter_map(decision).collect();
    let stop_line = text
        .lines()
        .rev()
        .find(|l| l.contains("stopping:"))
        .unwrap_or("(no stop line)")
        .to_string();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    let destroyed: Vec<&Decision> = decisions
        .iter()
        .filter(|d| d.action == "destroyed")
        .collect();
    // Per connection tuple: resets the load saw, `destroyed` lines the daemon wrote.
    let mut per_tuple: HashMap<(SocketAddr, SocketAddr), (usize, usize)> = HashMap::new();
    for d in &destroyed {
        per_tuple.entry((d.local, d.remote)).or_default().1 += 1;
    }

    let mut problems: Vec<String> = failure.into_iter().collect();
    problems.extend(errors.iter().map(|l| format!("error logged: {l}")));
    // Only old and quiet connections may be reset, each with its decision.
    let mut wrong = HashMap::<Kind, usize>::new();
    let mut lateness: HashMap<Kind, Vec<f64>> = HashMap::new();
    for (server, client, e) in &ended {
        if !e.reset {
            continue;
        }
        match e.kind {
            Kind::Old | Kind::Quiet => {
                per_tuple.entry((*server, *client)).or_default().0 += 1;
                let limit = if e.kind == Kind::Old { MAX_AGE } else { IDLE };
                lateness
                    .entry(e.kind)
                    .or_default()
                    .push(e.lived.as_secs_f64() - limit.as_secs_f64());
            }
            other => *wrong.entry(other).or_default() += 1,
        }
    }
    let undecided: usize = per_tuple
        .values()
        .map(|(resets, lines)| resets.saturating_sub(*lines))
        .sum();
    let unexplained: usize = per_tuple
        .values()
        .map(|(resets, lines)| lines.saturating_sub(*resets))
        .sum();
    if undecided > 0 {
        problems.push(format!(
            "{undecided} connections were reset with no `destroyed` line"
        ));
    }
    for (kind, n) in &wrong {
        problems.push(format!("{n} {kind:?} connections were destroyed"));
    }
    if unexplained > 0 {
        problems.push(format!(
            "{unexplained} `destroyed` lines name no old or quiet connection that died"
        ));
    }
    for (kind, v) in &lateness {
        if let Some(early) = v.iter().copied().find(|l| *l < -0.1) {
            problems.push(format!(
                "a {kind:?} connection was destroyed {:.2} s before its limit",
                -early
            ));
        }
    }
    let protected_lines = decisions
        .iter()
        .filter(|d| d.local.port() == c.port())
        .count();
    if protected_lines > 0 {
        problems.push(format!(
            "{protected_lines} decisions name the protected port"
        ));
    }
    // Memory: after warm-up, and over the second half of the run. Hash tables keep
    // their high-water size, so a one-off burst of sockets on the host (the kernel
    // program sees every namespace's) raises the plateau once; a leak keeps climbing,
    // through the second half too, which is what fails the run.
    let warm: Vec<&(Duration, u64, u64)> = rss.iter().filter(|s| s.0 >= WARM_UP).collect();
    let half = WARM_UP + (Duration::from_secs(args.seconds).saturating_sub(WARM_UP)) / 2;
    let second: Vec<&(Duration, u64, u64)> = rss.iter().filter(|s| s.0 >= half).collect();
    let (rss_warm, rss_last, rss_max) = match (warm.first(), warm.last()) {
        (Some(f), Some(l)) => (f.1, l.1, warm.iter().map(|s| s.1).max().unwrap_or(0)),
        _ => (0, 0, 0),
    };
    let rss_half = second.first().map_or(0, |s| s.1);
    if second.len() >= 2 && !flat(rss_half, rss_last) {
        problems.push(format!(
            "memory grew through the second half: {rss_half} KiB at {} s, {rss_last} KiB at the end",
            half.as_secs()
        ));
    }
    let host_peak = rss
        .iter()
        .max_by_key(|s| s.2)
        .map_or((0, 0), |s| (s.2, s.0.as_secs()));
    let host_warm = warm.first().map_or(0, |s| s.2);
    let mut out = String::new();
    let mut say = |s: String| {
        println!("{s}");
        out.push_str(&s);
        out.push('\n');
    };
    say(format!(
        "soak: {} s of load on 127.0.0.1 (old {} held, max-age {} s; quiet {} held, idle {} s; chatty {CHATTY}; churn {}/s; protected {PROTECTED}); {reloads} reloads",
        args.seconds,
        args.old,
        MAX_AGE.as_secs(),
        args.quiet,
        IDLE.as_secs(),
        args.churn_per_sec
    ));
    for kind in [
        Kind::Old,
        Kind::Quiet,
        Kind::Chatty,
        Kind::Churn,
        Kind::Protected,
    ] {
        let resets = ended
            .iter()
            .filter(|(_, _, e)| e.kind == kind && e.reset)
            .count();
        let closed = ended
            .iter()
            .filter(|(_, _, e)| e.kind == kind && !e.reset)
            .count();
        say(format!(
            "  {:<10} opened {:>7}  destroyed {:>7}  closed by their owner {:>7}",
            format!("{kind:?}").to_lowercase(),
            opened.get(&kind).copied().unwrap_or(0),
            resets,
            closed
        ));
    }
    for (kind, v) in lateness.iter_mut() {
        v.sort_by(f64::total_cmp);
        say(format!(
            "  {:<10} destroyed after the limit by: median {:.3} s, p99 {:.3} s, max {:.3} s",
            format!("{kind:?}").to_lowercase(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        ));
    }
    say(format!(
        "  decisions logged: {} destroyed, {} skipped, {} failed",
        destroyed.len(),
        decisions.iter().filter(|d| d.action == "skipped").count(),
        decisions
            .iter()
            .filter(|d| d.action == "failed to destroy")
            .count()
    ));
    say(format!("  daemon's last line: {stop_line}"));
    say(format!(
        "  daemon memory (VmRSS): {} KiB after {} s warm-up, {} KiB at {} s (half-way), {} KiB at most, {} KiB at the end ({} samples, every {} s); CPU {}",
        rss_warm,
        WARM_UP.as_secs(),
        rss_half,
        half.as_secs(),
        rss_max,
        rss_last,
        rss.len(),
        RSS_EVERY.as_secs(),
        cpu.map_or("unknown".into(), |s| format!("{s:.1} s"))
    ));
    say(format!(
        "  TCP sockets on the whole host (all namespaces, which the kernel program sees): {host_warm} after warm-up, at most {} (at {} s)",
        host_peak.0, host_peak.1
    ));
    let rss_csv: String = rss
        .iter()
        .map(|(t, k, h)| format!("{},{k},{h}\n", t.as_secs()))
        .collect();
    fs::write(
        dir.join("rss.csv"),
        format!("seconds,rss_kib,host_tcp_sockets\n{rss_csv}"),
    )?;
    if problems.is_empty() {
        say("soak: PASSED".into());
    } else {
        for p in &problems {
            say(format!("  problem: {p}"));
        }
        say("soak: FAILED".into());
    }
    fs::write(dir.join("summary.txt"), &out)?;
    eprintln!(
        "xtask: summary in {}, daemon log in {}",
        dir.join("summary.txt").display(),
        log_path.display()
    );
    Ok(if problems.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_decision_lines() {
        let l = "2026-11-23T10:00:00Z  INFO destroyed 127.0.0.1:4000 -> 127.0.0.1:51234 state=ESTABLISHED age=6s reason=max-age rule=old";
        let d = decision(l).unwrap();
        assert_eq!(d.action, "destroyed");
        assert_eq!(d.local.port(), 4000);
        assert_eq!(d.remote.port(), 51234);
        assert_eq!(d.reason, "max-age");
        let l = "x  INFO would destroy [::1]:80 -> [::1]:5000 state=CLOSE_WAIT age=>3s reason=state-timeout (dry run)";
        assert_eq!(decision(l).unwrap().action, "would destroy");
        assert_eq!(decision("INFO watching TCP sockets: 3 from the map"), None);
    }

    #[test]
    fn memory_is_flat_within_five_percent_and_a_mebibyte() {
        assert!(flat(10_000, 10_000));
        assert!(flat(10_000, 11_500));
        assert!(!flat(10_000, 12_000));
        assert!(flat(100_000, 104_000));
        assert!(!flat(100_000, 107_000));
    }
}
