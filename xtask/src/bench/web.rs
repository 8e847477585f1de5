//! Figure 8: a real web server under a stock load generator, as a new user would try
//! it. Debian's nginx serves its default page on loopback inside the bench's network
//! namespace; Debian's `wrk` loads it with keep-alive requests and with a new
//! connection per request (`Connection: close`). connwatch off and on alternate, the
//! order flipped each round; the ratio is the median of the rounds' own ratios (each
//! round's with and without run back to back, so the machine's slow drifts in speed
//! cancel), the rates the medians of the rounds. The daemon runs `--idle 1h`, a policy
//! that needs every hook.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::daemon::{Daemon, NoDaemon};
use super::stats::{count, median, percent};
use super::{Bench, Row};

/// nginx's port: outside the loadgen figures' 21000-27999.
const PORT: u16 = 18080;
/// wrk's concurrent connections and threads.
const CONNS: &str = "16";
const THREADS: &str = "2";

const TESTS: [(&str, &str, bool); 2] = [
    (
        "keepalive",
        "nginx, wrk keep-alive requests (16 connections)",
        false,
    ),
    (
        "close",
        "nginx, wrk a new connection per request (`Connection: close`, 16 at a time)",
        true,
    ),
];

struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(b: &Bench) -> Result<Nginx> {
        let bin = which("nginx").context(
            "nginx is not installed: `apt-get install nginx-light` (figure 8 needs Debian's nginx)",
        )?;
        let root = ["/var/www/html", "/usr/share/nginx/html"]
            .into_iter()
            .find(|d| {
                std::path::Path::new(d)
                    .join("index.nginx-debian.html")
                    .exists()
                    || std::path::Path::new(d).join("index.html").exists()
            })
            .context("no default nginx page in /var/www/html or /usr/share/nginx/html")?;
        let dir = b.dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {pid};\nerror_log {err} error;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n access_log off;\n client_body_temp_path {tmp};\n proxy_temp_path {tmp};\n\
                 fastcgi_temp_path {tmp};\n uwsgi_temp_path {tmp};\n scgi_temp_path {tmp};\n\
                 server {{\n  listen 127.0.0.1:{PORT} backlog=4096;\n  root {root};\n\
                 index index.html index.nginx-debian.html;\n }}\n}}\n",
                pid = dir.join("nginx.pid").display(),
                err = dir.join("error.log").display(),
                tmp = dir.join("tmp").display(),
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start nginx")?;
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", PORT)).is_err() {
            if Instant::now() > end {
                bail!("nginx did not listen on 127.0.0.1:{PORT} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.exists())
}

/// One wrk run: requests a second.
fn wrk(close: bool, secs: f64) -> Result<f64> {
    let bin = which("wrk").context("wrk is not installed: `apt-get install wrk`")?;
    let mut cmd = Command::new(bin);
    cmd.args(["-t", THREADS, "-c", CONNS, "-d"])
        .arg(format!("{}s", secs.round() as u64))
        .arg("--latency");
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{PORT}/"));
    let out = cmd.output().context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed ({}): {text}", out.status);
    }
    if let Some(errors) = text.lines().find(|l| l.contains("Socket errors")) {
        eprintln!("bench: wrk: {}", errors.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))
}

fn start(b: &Bench, log: &str) -> Result<Daemon> {
    Daemon::start(
        &b.connwatch,
        &b.tools,
        &["--idle".to_string(), "1h".to_string()],
        None,
        b.log_path(log),
    )
}

pub fn real_server(b: &mut Bench) -> Result<()> {
    // Eleven: on a shared 2-core machine single rounds range from half to twice the
    // rate without connwatch, even where the program never runs (keep-alive).
    let rounds = b.size(2, 11);
    let secs = b.size(3.0, 5.0);
    let _nginx = Nginx::start(b)?;
    // Warm up: nginx's first requests open files and fill caches.
    wrk(false, 1.0)?;
    let mut with = vec![Vec::new(); TESTS.len()];
    let mut without = vec![Vec::new(); TESTS.len()];
    let mut daemon_cpu = vec![Vec::new(); TESTS.len()];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            let (daemon, _none) = if on {
                (Some(start(b, "fig8-daemon.log")?), None)
            } else {
                (None, Some(NoDaemon::hold(&b.connwatch, &b.tools)?))
            };
            for (t, (_, _, close)) in TESTS.iter().enumerate() {
                b.quiet(8);
                let cpu0 = daemon.as_ref().map_or(0, Daemon::cpu_ns);
                let t0 = Instant::now();
                let rate = wrk(*close, secs)?;
                let wall = t0.elapsed().as_secs_f64();
                if let Some(d) = &daemon {
                    daemon_cpu[t].push((d.cpu_ns() - cpu0) as f64 / 1e9 / wall);
                    with[t].push(rate);
                } else {
                    without[t].push(rate);
                }
            }
            drop(daemon);
        }
    }
    for (t, (name, what, close)) in TESTS.iter().enumerate() {
        let (on, off) = (
            median(&with[t]).unwrap_or(0.0),
            median(&without[t]).unwrap_or(0.0),
        );
        let paired: Vec<f64> = with[t]
            .iter()
            .zip(&without[t])
            .filter(|(_, off)| **off > 0.0)
            .map(|(on, off)| on / off)
            .collect();
        let ratio = median(&paired).unwrap_or(0.0);
        let goal = if *close { 0.95 } else { 0.98 };
        b.row(Row {
            figure: 8,
            what: (*what).into(),
            connwatch: format!("{} requests/s", count(on as u64)),
            peer: format!("{} without connwatch", count(off as u64)),
            ratio: percent(ratio, 1.0),
            goal: format!(
                ">= {:.0}% of the rate without (median of the rounds' ratios)",
                goal * 100.0
            ),
            met: Some(ratio >= goal),
        });
        let cpu = median(&daemon_cpu[t]).unwrap_or(0.0);
        b.note(
            8,
            format!(
                "{name}: {rounds} rounds of {secs} s; with {:?}, without {:?}, ratios {:?}; daemon CPU while on: {:.1}% of a core{}",
                with[t].iter().map(|v| *v as u64).collect::<Vec<_>>(),
                without[t].iter().map(|v| *v as u64).collect::<Vec<_>>(),
                paired.iter().map(|r| format!("{:.1}%", r * 100.0)).collect::<Vec<_>>(),
                cpu * 100.0,
                if *close && on > 0.0 {
                    format!(" ({:.1}% of a core per 10k connections a second)", cpu * 100.0 * 10_000.0 / on)
                } else {
                    String::new()
                }
            ),
        );
        if *close && on > 0.0 {
            let per_10k = cpu * 10_000.0 / on;
            b.row(Row {
                figure: 8,
                what: "daemon CPU at 10k new connections a second (nginx, wrk `Connection: close`)"
                    .into(),
                connwatch: format!("{:.1}% of a core", per_10k * 100.0),
                peer: String::new(),
                ratio: String::new(),
                goal: "<= 5% of a core".into(),
                met: Some(per_10k <= 0.05),
            });
        }
    }
    program_costs(b, secs)
}

/// One more pass with the kernel's BPF run statistics on: each program's runs and
/// nanoseconds a run, per request.
fn program_costs(b: &mut Bench, secs: f64) -> Result<()> {
    let mut sysctls = super::host::Sysctls::default();
    sysctls.set("kernel.bpf_stats_enabled", "1")?;
    let d = start(b, "fig8-stats-daemon.log")?;
    for (name, _, close) in TESTS {
        b.quiet(8);
        let before = b.tools.progs()?;
        let t0 = Instant::now();
        let rate = wrk(close, secs)?;
        let wall = t0.elapsed().as_secs_f64();
        let after = b.tools.progs()?;
        let requests = rate * wall;
        let mut parts = Vec::new();
        for (prog, runs, ns) in &after {
            let (r0, n0) = before
                .iter()
                .find(|(n, _, _)| n == prog)
                .map_or((0, 0), |(_, r, t)| (*r, *t));
            let (runs, ns) = (runs.saturating_sub(r0) as f64, ns.saturating_sub(n0) as f64);
            if runs == 0.0 {
                continue;
            }
            parts.push(format!(
                "{prog} {:.1} runs x {:.0} ns",
                runs / requests,
                ns / runs
            ));
            if prog.starts_with("inet_sock_set") && close {
                let per_run = ns / runs;
                b.row(Row {
                    figure: 8,
                    what: "set-state program, a run (nginx, wrk `Connection: close`)".into(),
                    connwatch: format!("{per_run:.0} ns"),
                    peer: String::new(),
                    ratio: String::new(),
                    goal: "<= 400 ns".into(),
                    met: Some(per_run <= 400.0),
                });
            }
        }
        b.note(
            8,
            format!(
                "{name}, BPF run statistics on: per request, {}",
                parts.join(", ")
            ),
        );
    }
    drop(d);
    drop(sysctls);
    Ok(())
}
