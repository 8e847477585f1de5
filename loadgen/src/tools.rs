//! The measuring side: a command's CPU cost, connwatch's maps seen from outside, the
//! end-of-run agreement check, and a polling peer that destroys by age.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use connwatch_common::{stat, tcp_state, AF_INET, MAP_ADDRS6, MAP_CONNS, MAP_EVENTS, MAP_STATS};

use crate::bpf;
use crate::diag::{self, Diag};
use crate::sys;

/// Runs a command with stdout and stderr to `out` (default: stdout to /dev/null) and prints
/// `rusage <wall_ns> <user_us> <sys_us> <maxrss_kb> <exit> <timed_out>`.
pub fn rusage(cmd: &[String], out: Option<&Path>, timeout_secs: f64) -> Result<()> {
    let (prog, args) = cmd.split_first().context("no command")?;
    // With a file, both streams go to it: one tool writes its lines to stdout (ss -K),
    // another to stderr (connwatch's log), and a pipe read by the bench would slow one
    // and not the other. Without, stdout is dropped and errors still show.
    let (stdout, stderr) = match out {
        Some(p) => {
            let f = File::create(p).with_context(|| format!("create {}", p.display()))?;
            let both = f.try_clone().context("duplicate the output file")?;
            (Stdio::from(f), Stdio::from(both))
        }
        None => (Stdio::from(File::create("/dev/null")?), Stdio::inherit()),
    };
    let start = sys::now_ns();
    let child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("run {prog}"))?;
    let pid = child.id() as libc::pid_t;
    let deadline = start + (timeout_secs * 1e9) as u64;
    let mut timed_out = false;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if rc == pid {
            break;
        }
        if rc < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        if !timed_out && sys::now_ns() > deadline {
            timed_out = true;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let wall = sys::now_ns() - start;
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    println!(
        "rusage {wall} {} {} {} {code} {}",
        us(ru.ru_utime),
        us(ru.ru_stime),
        ru.ru_maxrss,
        u8::from(timed_out)
    );
    Ok(())
}

/// Prints `map <name> <max_entries> <memlock_bytes>` for every map connwatch holds in
/// the kernel, each once: those pinned in `pin_dir` (the connection map and its IPv6
/// addresses, the ring, the counters, the listeners, the filter)
/// and those its pinned programs use without a pin (the log ring, read-only data).
/// Then `entries <n>` for the connection map and `stats <events> <map_full>
/// <ring_full>`.
pub fn maps(pin_dir: &Path) -> Result<()> {
    let mut pins: Vec<_> = std::fs::read_dir(pin_dir)
        .with_context(|| format!("read {}", pin_dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("read {}", pin_dir.display()))?;
    pins.sort();
    let mut seen = HashSet::new();
    let mut show = |fd: &std::os::fd::OwnedFd| -> Result<()> {
        let info = bpf::fdinfo(fd)?;
        if seen.insert(bpf::info_u64(&info, "map_id")) {
            println!(
                "map {} {} {}",
                bpf::map_name(fd)?,
                bpf::info_u64(&info, "max_entries"),
                bpf::info_u64(&info, "memlock")
            );
        }
        Ok(())
    };
    for path in &pins {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("link_") {
            continue;
        }
        let fd = bpf::open(path)?;
        if name.starts_with("prog_") {
            for id in bpf::prog_map_ids(&fd).with_context(|| format!("maps of {name}"))? {
                // A map freed meanwhile holds nothing.
                if let Ok(map) = bpf::map_by_id(id) {
                    show(&map)?;
                }
            }
        } else {
            show(&fd)?;
        }
    }
    for name in [MAP_CONNS, MAP_ADDRS6, MAP_EVENTS, MAP_STATS] {
        if !pin_dir.join(name).exists() {
            bail!("{} has no {name}: is connwatch loaded?", pin_dir.display());
        }
    }
    println!("entries {}", bpf::conns(pin_dir)?.len());
    let stats = bpf::open(&pin_dir.join(MAP_STATS))?;
    println!(
        "stats {} {} {}",
        bpf::percpu_sum(&stats, stat::EVENTS)?,
        bpf::percpu_sum(&stats, stat::MAP_FULL)?,
        bpf::percpu_sum(&stats, stat::RING_FULL)?
    );
    Ok(())
}

type Tuple = (SocketAddrV4, SocketAddrV4);

/// The kernel's sockets with a port in `lo..=hi`, without listeners, TIME_WAIT (which
/// the map does not hold by design) and NEW_SYN_RECV (a request, not a socket).
fn kernel_table(lo: u16, hi: u16) -> Result<HashMap<Tuple, u8>> {
    Ok(Diag::open()?
        .dump(diag::ALL_STATES)?
        .into_iter()
        .filter(|s| s.in_ports(lo, hi))
        .filter(|s| ![diag::LISTEN, diag::TIME_WAIT, diag::NEW_SYN_RECV].contains(&s.state))
        .map(|s| ((s.local, s.remote), s.state))
        .collect())
}

/// The tuples `connwatch list --json` shows with a port in `lo..=hi` (TIME_WAIT left
/// out), and how many of them have no age.
fn listed(connwatch: &Path, lo: u16, hi: u16) -> Result<(HashSet<Tuple>, usize)> {
    let out = Command::new(connwatch)
        .args(["list", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {} list --json", connwatch.display()))?;
    if !out.status.success() {
        bail!("connwatch list --json failed ({})", out.status);
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("list --json output")?;
    let mut listed = HashSet::new();
    let mut unknown_age = 0;
    for r in &rows {
        let parse = |k: &str| -> Option<SocketAddrV4> { r.get(k)?.as_str()?.parse().ok() };
        let (Some(local), Some(remote)) = (parse("local"), parse("remote")) else {
            continue;
        };
        let in_range = (lo..=hi).contains(&local.port()) || (lo..=hi).contains(&remote.port());
        if !in_range || r.get("state").and_then(|s| s.as_str()) == Some("TIME_WAIT") {
            continue;
        }
        if r.get("age_secs").is_none_or(|a| a.is_null()) {
            unknown_age += 1;
        }
        listed.insert((local, remote));
    }
    Ok((listed, unknown_age))
}

/// Compares the connection map, and optionally `connwatch list --json`, with the
/// kernel's table for sockets with a port in `lo..=hi`; listeners are left out on
/// every side. The kernel is read before and after the others, so a socket that ends
/// meanwhile is neither missing nor stale: missing means alive in both kernel reads
/// and absent from the map (or list); stale means in the map (or list) and in neither
/// kernel read.
pub fn agree(pin_dir: &Path, lo: u16, hi: u16, connwatch: Option<&Path>) -> Result<()> {
    let before = kernel_table(lo, hi)?;
    let list = connwatch.map(|c| listed(c, lo, hi)).transpose()?;
    let entries = bpf::conns(pin_dir)?;
    let after = kernel_table(lo, hi)?;
    let mut map: HashMap<Tuple, u32> = HashMap::new();
    for (_, info) in &entries {
        if info.family != AF_INET || info.state == tcp_state::LISTEN {
            continue;
        }
        let ip = |b: &[u8; 16]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        let local = SocketAddrV4::new(ip(&info.saddr), info.sport);
        let remote = SocketAddrV4::new(ip(&info.daddr), info.dport);
        let in_range = (lo..=hi).contains(&info.sport) || (lo..=hi).contains(&info.dport);
        if in_range {
            map.insert((local, remote), info.state);
        }
    }
    let steady: HashMap<Tuple, u8> = before
        .iter()
        .filter(|(t, s)| after.get(t) == Some(s))
        .map(|(t, s)| (*t, *s))
        .collect();
    let ever = |t: &Tuple| before.contains_key(t) || after.contains_key(t);
    let missing = steady.keys().filter(|t| !map.contains_key(t)).count();
    let stale = map.keys().filter(|t| !ever(t)).count();
    let state_diff = steady
        .iter()
        .filter(|(t, s)| map.get(t).is_some_and(|m| *m != u32::from(**s)))
        .count();
    let mut line = format!(
        "agree kernel={} map={} missing={missing} stale={stale} state_diff={state_diff}",
        after.len(),
        map.len()
    );
    if let Some((listed, unknown_age)) = list {
        let list_missing = steady.keys().filter(|t| !listed.contains(t)).count();
        let list_extra = listed.iter().filter(|t| !ever(t)).count();
        line.push_str(&format!(
            " list={} list_unknown_age={unknown_age} list_missing={list_missing} list_extra={list_extra}",
            listed.len()
        ));
    }
    println!("{line}");
    Ok(())
}

/// connwatch's programs, by the names the kernel keeps (15 bytes at most).
const CONNWATCH_PROGS: [&str; 4] = [
    "inet_sock_set_s",
    "tcp_probe",
    "sock_send_lengt",
    "sock_recv_lengt",
];

/// Prints `prog <id> <name> <run_cnt> <run_time_ns>` for every loaded program with one
/// of connwatch's names (whoever loaded it), then `progs <count>`.
pub fn progs() -> Result<()> {
    let mine: Vec<_> = bpf::progs()?
        .into_iter()
        .filter(|p| CONNWATCH_PROGS.iter().any(|n| p.name.starts_with(n)))
        .collect();
    for p in &mine {
        println!("prog {} {} {} {}", p.id, p.name, p.run_cnt, p.run_time_ns);
    }
    println!("progs {}", mine.len());
    Ok(())
}

/// Takes connwatch's single-instance lock (waiting for a running daemon to stop), says
/// `locked`, and holds it until stdin closes: while it is held no daemon can attach, so
/// a measurement "without connwatch" is one.
pub fn lock(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; released when the process ends.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    println!("locked");
    std::io::Write::flush(&mut std::io::stdout())?;
    let mut sink = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)?;
    Ok(())
}

/// The polling peer: every `period`, one sock_diag dump of established IPv4 sockets
/// with a port in `lo..=hi`; each socket's age counts from the first dump that showed
/// it, and those past `max_age` are destroyed (tuple and cookie), as a cron'd
/// `ss -K` script or tcp_closer would. Runs for `secs`, then prints
/// `result <destroyed> <polls> <cpu_us>`.
pub fn pollkill(lo: u16, hi: u16, max_age: Duration, period: Duration, secs: f64) -> Result<()> {
    let mut diag = Diag::open()?;
    let mut first_seen: HashMap<u64, u64> = HashMap::new();
    let (mut destroyed, mut polls) = (0u64, 0u64);
    let start = sys::now_ns();
    let end = start + (secs * 1e9) as u64;
    let max_age = max_age.as_nanos() as u64;
    let period_ns = period.as_nanos() as u64;
    while sys::now_ns() < end {
        let now = sys::now_ns();
        polls += 1;
        let socks = diag.dump(1 << diag::ESTABLISHED)?;
        let mut live = HashSet::new();
        for s in socks.iter().filter(|s| s.in_ports(lo, hi)) {
            live.insert(s.cookie);
            let seen = *first_seen.entry(s.cookie).or_insert(now);
            // Half a period of slack: polls run on a fixed grid, give or take scheduling.
            if now - seen + period_ns / 2 >= max_age && diag.destroy(s)? {
                destroyed += 1;
            }
        }
        first_seen.retain(|c, _| live.contains(c));
        let next = start + polls * period_ns;
        let wait = next.saturating_sub(sys::now_ns());
        std::thread::sleep(Duration::from_nanos(wait));
    }
    // SAFETY: rusage is plain data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    println!(
        "result {destroyed} {polls} {}",
        us(ru.ru_utime) + us(ru.ru_stime)
    );
    Ok(())
}
