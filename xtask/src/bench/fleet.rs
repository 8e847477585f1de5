//! Load spread over several loadgen processes (one holds at most 20000 descriptors
//! here). Each worker listens on its own port and connects from its own 127.x.y.z
//! address; the controller talks to it in lines over stdin and stdout.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Connections one worker holds at most: two descriptors each, under the 20000 limit.
pub const PER_WORKER: usize = 9000;

/// The ports and source addresses of one figure's workers: figure `f` uses ports
/// `20000 + 1000 f + 100 group + i` (below the ephemeral range, so a port filter
/// never catches the other end by accident) and sources `127.(100 + f).group.(i + 1)`.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub figure: u8,
    pub group: u8,
}

impl Net {
    pub fn port(&self, i: usize) -> u16 {
        20_000 + 1_000 * u16::from(self.figure) + 100 * u16::from(self.group) + i as u16
    }

    pub fn src(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, 100 + self.figure, self.group, i as u8 + 1)
    }

    /// The port range every worker of this group listens in.
    pub fn ports(&self) -> (u16, u16) {
        (self.port(0), self.port(99))
    }

    /// The `--port` argument that selects this group's connections.
    pub fn port_arg(&self) -> String {
        let (lo, hi) = self.ports();
        format!("{lo}-{hi}")
    }
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

pub struct Fleet {
    workers: Vec<Worker>,
}

impl Fleet {
    /// Starts `n` workers: `loadgen <mode> --src .. --port .. --max-secs .. <extra(i)>`.
    pub fn spawn(
        loadgen: &Path,
        net: Net,
        n: usize,
        mode: &str,
        max_secs: u64,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Result<Fleet> {
        if n > 100 {
            bail!("at most 100 workers per group");
        }
        let mut workers = Vec::new();
        for i in 0..n {
            let mut child = Command::new(loadgen)
                .arg(mode)
                .args(["--src", &net.src(i).to_string()])
                .args(["--port", &net.port(i).to_string()])
                .args(["--max-secs", &max_secs.to_string()])
                .args(extra(i))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("run {}", loadgen.display()))?;
            let stdin = child.stdin.take();
            let out = BufReader::new(child.stdout.take().context("no stdout")?);
            workers.push(Worker { child, stdin, out });
        }
        Ok(Fleet { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// One line from each worker, which must start with `word`; returns the rest.
    pub fn expect(&mut self, word: &str) -> Result<Vec<Vec<String>>> {
        let mut all = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            let mut line = String::new();
            if w.out.read_line(&mut line)? == 0 {
                bail!("worker {i} ended before saying {word:?}");
            }
            let mut f = line.split_whitespace().map(str::to_string);
            if f.next().as_deref() != Some(word) {
                bail!("worker {i} said {:?}, expected {word:?}", line.trim());
            }
            all.push(f.collect());
        }
        Ok(all)
    }

    pub fn send(&mut self, cmd: &str) -> Result<()> {
        for w in &mut self.workers {
            let stdin = w.stdin.as_mut().context("worker stdin closed")?;
            writeln!(stdin, "{cmd}")?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// Summed `report` of every worker.
    pub fn report(&mut self) -> Result<Report> {
        self.send("report")?;
        let mut r = Report::default();
        for f in self.expect("report")? {
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            r.pairs += n(0);
            r.ended += n(1);
            if n(2) > 0 {
                r.first_end = if r.first_end == 0 {
                    n(2)
                } else {
                    r.first_end.min(n(2))
                };
            }
            r.last_end = r.last_end.max(n(3));
            r.resets += n(4);
            r.aborts += n(5);
            r.eofs += n(6);
            r.other += n(7);
        }
        Ok(r)
    }

    /// Polls `report` until `ended >= want` or `limit` passes.
    pub fn wait_ended(&mut self, want: u64, limit: Duration) -> Result<Report> {
        let end = Instant::now() + limit;
        loop {
            let r = self.report()?;
            if r.ended >= want || Instant::now() > end {
                return Ok(r);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every pair's times: (opened, first reset seen, first end seen), monotonic ns.
    pub fn dump(&mut self) -> Result<Vec<(u64, u64, u64)>> {
        self.send("dump")?;
        let mut out = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            loop {
                let mut line = String::new();
                if w.out.read_line(&mut line)? == 0 {
                    bail!("worker {i} ended during dump");
                }
                let f: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                match line.split_whitespace().next() {
                    Some("c") if f.len() == 3 => out.push((f[0], f[1], f[2])),
                    Some("end") => break,
                    _ => bail!("worker {i} said {:?} during dump", line.trim()),
                }
            }
        }
        Ok(out)
    }

    /// Tells every worker to close its connections (with RSTs) and waits for them.
    pub fn quit(mut self) -> Result<()> {
        let _ = self.send("quit");
        self.reap(Duration::from_secs(60));
        Ok(())
    }

    fn reap(&mut self, limit: Duration) {
        for w in &mut self.workers {
            w.stdin = None;
        }
        let end = Instant::now() + limit;
        for w in &mut self.workers {
            loop {
                match w.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > end => {
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.reap(Duration::from_secs(30));
    }
}

/// Workers' `report`s summed: pairs held, pairs that ended, when the first and last
/// ends were seen, and how each socket learned of its end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    pub pairs: u64,
    pub ended: u64,
    pub first_end: u64,
    pub last_end: u64,
    pub resets: u64,
    pub aborts: u64,
    pub eofs: u64,
    pub other: u64,
}
