//! A `connwatch run` under measurement: started with its log in a file, waited for until
//! it watches, stopped with SIGTERM. Only one daemon runs on a host at a time, so a
//! start that finds another one waits for it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::host::{self, Tools};

/// How long a start waits for another daemon (someone else's) to finish.
const WAIT_FOR_OTHER: Duration = Duration::from_secs(20 * 60);
/// How long a start may take: reconciling a million sockets takes seconds.
const START_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `connwatch run <args>`. With `map_size`, the pinned connection map is
    /// made that size first (a pinned map is reused as it is, whatever --max-conns
    /// says, so a map of another size is removed while no daemon runs).
    pub fn start(
        bin: &Path,
        tools: &Tools,
        args: &[String],
        map_size: Option<u32>,
        log: PathBuf,
    ) -> Result<Daemon> {
        let give_up = Instant::now() + WAIT_FOR_OTHER;
        loop {
            if let Some(size) = map_size {
                let pinned = tools.maps().map(|m| m.conns_max).unwrap_or(0);
                if pinned != 0 && pinned != u64::from(size) {
                    eprintln!(
                        "bench: the pinned map holds {pinned} entries, {size} wanted: removing it"
                    );
                    tools.cleanup(bin, WAIT_FOR_OTHER)?;
                }
            }
            let mut cmd = Command::new(bin);
            cmd.arg("run").args(args);
            if let Some(size) = map_size {
                cmd.args(["--max-conns", &size.to_string()]);
            }
            let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
            cmd.stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .env_remove("CONNWATCH_LOG");
            eprintln!("bench: {} run {}", bin.display(), args.join(" "));
            let child = cmd
                .spawn()
                .with_context(|| format!("run {}", bin.display()))?;
            let mut d = Daemon {
                pid: child.id(),
                child: Some(child),
                log: log.clone(),
            };
            match d.wait_ready()? {
                Ready::Watching => {}
                Ready::Busy if Instant::now() < give_up => {
                    eprintln!("bench: another connwatch daemon is running; waiting for it");
                    std::thread::sleep(Duration::from_secs(5));
                    continue;
                }
                Ready::Busy => {
                    bail!("another connwatch daemon kept running for {WAIT_FOR_OTHER:?}")
                }
            }
            if let Some(size) = map_size {
                let got = tools.maps()?.conns_max;
                if got != u64::from(size) {
                    // Another daemon made the map between the removal and this start.
                    eprintln!("bench: the map has {got} entries, not {size}: starting again");
                    d.stop()?;
                    continue;
                }
            }
            return Ok(d);
        }
    }

    fn wait_ready(&mut self) -> Result<Ready> {
        let end = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains("watching TCP sockets") {
                return Ok(Ready::Watching);
            }
            let child = self.child.as_mut().context("daemon already stopped")?;
            if let Some(st) = child.try_wait()? {
                self.child = None;
                if text.contains("another `connwatch run` is active") {
                    return Ok(Ready::Busy);
                }
                bail!(
                    "connwatch run exited ({st}) before watching:\n{}",
                    tail(&text, 20)
                );
            }
            if Instant::now() > end {
                bail!(
                    "connwatch run did not start within {START_TIMEOUT:?}:\n{}",
                    tail(&text, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cpu_ns(&self) -> u64 {
        host::cpu_ns(self.pid)
    }

    pub fn rss(&self) -> u64 {
        host::rss_bytes(self.pid)
    }

    /// RSS less the BPF map pages the daemon has mapped (see `host::own_rss_bytes`).
    pub fn own_rss(&self) -> u64 {
        host::own_rss_bytes(self.pid)
    }

    /// The anonymous part of the RSS (see `host::anon_rss_bytes`).
    pub fn anon_rss(&self) -> u64 {
        host::anon_rss_bytes(self.pid)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until the daemon has used no more than `idle_ns` of CPU over `window`
    /// (its event backlog is drained), for at most `limit`.
    pub fn settle(&self, window: Duration, idle_ns: u64, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut last = self.cpu_ns();
        loop {
            std::thread::sleep(window);
            let now = self.cpu_ns();
            if now - last <= idle_ns || start.elapsed() > limit {
                return start.elapsed();
            }
            last = now;
        }
    }

    /// SIGTERM, then up to 60 s for a clean stop.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait()? {
                if !st.success() {
                    eprintln!(
                        "bench: connwatch exited with {st}:\n{}",
                        tail(&self.log_text(), 10)
                    );
                }
                return Ok(());
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                bail!("connwatch did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// No connwatch on the host: the pinned maps and program links are removed (the
/// program stays attached through its pinned link after a daemon stops), then the
/// single-instance lock is held by a loadgen process so no daemon of this mount
/// namespace starts; programs of daemons elsewhere are waited for.
pub struct NoDaemon {
    child: Child,
}

impl NoDaemon {
    pub fn hold(connwatch: &Path, tools: &Tools) -> Result<NoDaemon> {
        use std::io::BufRead;
        tools.cleanup(connwatch, WAIT_FOR_OTHER)?;
        let mut child = Command::new(&tools.loadgen)
            .args(["lock", "--max-secs", "1800"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("run loadgen lock")?;
        let out = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "locked" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("loadgen lock said {:?}", line.trim());
        }
        let none = NoDaemon { child };
        let left = tools.wait_no_progs(Duration::from_secs(180))?;
        if left > 0 {
            eprintln!("bench: {left} connwatch programs stay attached (another daemon's)");
        }
        Ok(none)
    }
}

impl Drop for NoDaemon {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

enum Ready {
    Watching,
    Busy,
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
