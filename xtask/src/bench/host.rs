//! The host side of a bench run: /proc readings, sysctls set for the run and restored
//! after it, and the one-shot loadgen tools (rusage, maps, agree, unpin).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// CPU time a process has used, in ns, summed over its threads (schedstat's first
/// field: nanosecond precision, where /proc/<pid>/stat counts 10 ms ticks).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident set size of a process in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:") * 1024
}

/// The anonymous part of a process's resident set (its heap and stacks; not the
/// binary's code pages, which are page cache) in bytes.
pub fn anon_rss_bytes(pid: u32) -> u64 {
    status_kb(pid, "RssAnon:") * 1024
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// Resident bytes of a process that are its own: its RSS less the pages of the BPF maps
/// it has mapped (the event ring, mapped twice over for wrap-around reads). Those pages
/// are the kernel's map memory, counted once already in the maps' memlock.
pub fn own_rss_bytes(pid: u32) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return rss_bytes(pid);
    };
    let mut total_kb = 0;
    let mut map_of_bpf = false;
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Rss:") {
            if !map_of_bpf {
                total_kb += kb
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        } else if line.split_whitespace().next().is_some_and(|first| {
            first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }) {
            // A mapping's first line: `start-end perms offset dev inode [path]`.
            map_of_bpf = line.ends_with("anon_inode:bpf-map");
        }
    }
    total_kb * 1024
}

/// One line describing the machine: cores, kernel, memory.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), Linux {}, {:.1} GiB RAM",
        kernel.trim(),
        mem_kb as f64 / 1024.0 / 1024.0
    )
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The share of the machine's CPU busy over `window`.
pub fn busy(window: Duration) -> f64 {
    let (b0, t0) = cpu_jiffies();
    std::thread::sleep(window);
    let (b1, t1) = cpu_jiffies();
    if t1 == t0 {
        0.0
    } else {
        (b1 - b0) as f64 / (t1 - t0) as f64
    }
}

/// Waits, for up to `limit`, until something else using the machine (a build, another
/// test run) is done: measurements on two cores are only worth anything on a quiet
/// host. Returns the busy share last seen.
pub fn wait_quiet(limit: Duration) -> f64 {
    let end = std::time::Instant::now() + limit;
    let mut said = false;
    loop {
        let b = busy(Duration::from_secs(1));
        if b < 0.10 || std::time::Instant::now() > end {
            if said {
                eprintln!("bench: the machine is {:.0}% busy; going on", b * 100.0);
            }
            return b;
        }
        if !said {
            eprintln!(
                "bench: the machine is {:.0}% busy with something else; waiting for it to calm down",
                b * 100.0
            );
            said = true;
        }
        std::thread::sleep(Duration::from_secs(4));
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sysctls set for the run; the old values come back when this is dropped.
#[derive(Default)]
pub struct Sysctls {
    saved: Vec<(PathBuf, String)>,
}

impl Sysctls {
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let old =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        if old.split_whitespace().collect::<Vec<_>>()
            == value.split_whitespace().collect::<Vec<_>>()
        {
            return Ok(());
        }
        std::fs::write(&path, value).with_context(|| format!("sysctl -w {name}={value}"))?;
        eprintln!("bench: sysctl {name}={value} (was {})", old.trim());
        self.saved.push((path, old));
        Ok(())
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        for (path, old) in self.saved.drain(..).rev() {
            if let Err(e) = std::fs::write(&path, &old) {
                eprintln!("bench: cannot restore {}: {e}", path.display());
            }
        }
    }
}

/// A command's cost, as `loadgen rusage` measures it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall: f64,
    pub cpu: f64,
    pub maxrss_kb: u64,
    pub exit: i32,
    pub timed_out: bool,
}

pub struct Tools {
    pub loadgen: PathBuf,
}

impl Tools {
    fn output(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.loadgen)
            .args(args)
            .output()
            .with_context(|| format!("run {}", self.loadgen.display()))?;
        if !out.status.success() {
            bail!(
                "loadgen {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `cmd` with its stdout to `out` (or /dev/null) and measures it.
    pub fn rusage(&self, cmd: &[&str], out: Option<&Path>, timeout: Duration) -> Result<Usage> {
        let timeout = timeout.as_secs_f64().to_string();
        let mut args = vec!["rusage", "--timeout-secs", &timeout];
        let out_s;
        if let Some(p) = out {
            out_s = p.display().to_string();
            args.extend(["--out", &out_s]);
        }
        args.push("--");
        args.extend_from_slice(cmd);
        let text = self.output(&args)?;
        let f: Vec<&str> = text
            .lines()
            .find_map(|l| l.strip_prefix("rusage "))
            .context("no rusage line")?
            .split_whitespace()
            .collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        Ok(Usage {
            wall: n(0) / 1e9,
            cpu: (n(1) + n(2)) / 1e6,
            maxrss_kb: n(3) as u64,
            exit: n(4) as i32,
            timed_out: n(5) != 0.0,
        })
    }

    /// Loaded programs with connwatch's names, anyone's: (name, runs, ns spent).
    pub fn progs(&self) -> Result<Vec<(String, u64, u64)>> {
        let text = self.output(&["progs"])?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.first() != Some(&"prog") || f.len() < 5 {
                    return None;
                }
                Some((f[2].to_string(), f[3].parse().ok()?, f[4].parse().ok()?))
            })
            .collect())
    }

    /// Waits up to `limit` until no program with connwatch's names is loaded (tests
    /// elsewhere on the host run daemons in their own mount namespaces, out of reach
    /// of the lock). Returns how many are still loaded.
    pub fn wait_no_progs(&self, limit: Duration) -> Result<usize> {
        let end = std::time::Instant::now() + limit;
        let mut said = false;
        loop {
            let n = self.progs()?.len();
            if n == 0 || std::time::Instant::now() > end {
                return Ok(n);
            }
            if !said {
                eprintln!("bench: {n} connwatch programs of another daemon are attached; waiting for them to go");
                said = true;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The pinned maps: sizes, connection-map entries, drop counters.
    pub fn maps(&self) -> Result<Maps> {
        let text = self.output(&["maps"])?;
        let mut m = Maps::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match f.first() {
                Some(&"map") => {
                    m.memlock += n(3);
                    if f.get(1) == Some(&"CW_CONNS") {
                        m.conns_max = n(2);
                        m.conns_memlock += n(3);
                    }
                    // The IPv6 addresses kept beside the entries are the map's too.
                    if f.get(1) == Some(&"CW_ADDRS6") {
                        m.conns_memlock += n(3);
                    }
                }
                Some(&"entries") => m.entries = n(1),
                Some(&"stats") => {
                    m.events = n(1);
                    m.map_full = n(2);
                    m.ring_full = n(3);
                }
                _ => {}
            }
        }
        Ok(m)
    }

    /// `connwatch cleanup`: removes the pinned maps (the only way to resize them),
    /// retrying while a daemon (someone else's) holds the lock, for up to `wait`.
    pub fn cleanup(&self, connwatch: &Path, wait: Duration) -> Result<()> {
        let end = std::time::Instant::now() + wait;
        loop {
            let out = Command::new(connwatch).arg("cleanup").output()?;
            if out.status.success() {
                return Ok(());
            }
            let why = String::from_utf8_lossy(&out.stderr);
            if !why.contains("another") || std::time::Instant::now() > end {
                bail!("connwatch cleanup failed ({}): {}", out.status, why.trim());
            }
            std::thread::sleep(Duration::from_secs(5));
        }
    }

    /// `agree` for a port range: the kernel's table against the map (and against
    /// `connwatch list --json` when the binary is given).
    pub fn agree(&self, lo: u16, hi: u16, connwatch: Option<&Path>) -> Result<Agree> {
        let (lo, hi) = (lo.to_string(), hi.to_string());
        let mut args = vec!["agree", "--lo", &lo, "--hi", &hi];
        let cw;
        if let Some(p) = connwatch {
            cw = p.display().to_string();
            args.extend(["--connwatch", &cw]);
        }
        let text = self.output(&args)?;
        let line = text
            .lines()
            .find(|l| l.starts_with("agree "))
            .context("no agree line")?
            .to_string();
        let get = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Agree {
            kernel: get("kernel"),
            missing: get("missing"),
            stale: get("stale"),
            state_diff: get("state_diff"),
            list_unknown_age: get("list_unknown_age"),
            list_missing: get("list_missing"),
            list_extra: get("list_extra"),
            line,
        })
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Maps {
    /// Bytes all three pinned maps hold in kernel memory.
    pub memlock: u64,
    pub conns_memlock: u64,
    pub conns_max: u64,
    pub entries: u64,
    pub events: u64,
    pub map_full: u64,
    pub ring_full: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Agree {
    pub kernel: u64,
    pub missing: u64,
    pub stale: u64,
    pub state_diff: u64,
    pub list_unknown_age: u64,
    pub list_missing: u64,
    pub list_extra: u64,
    pub line: String,
}
