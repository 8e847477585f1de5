//! `cargo xtask bench`: connwatch measured beside its peers on this machine. Each
//! figure prints connwatch's number, the peer's, their ratio and the goal; the whole
//! table goes to target/bench/results.md at the end. These are measurements, not
//! tests: nothing here fails because a goal is missed.
//!
//! All load stays on loopback, spread over several loadgen processes, bounded in
//! count and time: every worker ends itself after a hard limit.

mod daemon;
mod figures;
mod fleet;
mod host;
mod population;
mod stats;
mod web;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use host::{Sysctls, Tools};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Run only this figure (1-9; repeatable). Default: all.
    #[arg(long = "figure", value_name = "N", value_parser = clap::value_parser!(u8).range(1..=9))]
    figures: Vec<u8>,
    /// Small sizes and short windows: a smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Measure this connwatch binary instead of building one.
    #[arg(long, value_name = "PATH")]
    connwatch: Option<PathBuf>,
    /// Set when the bench has re-run itself inside its own network namespace.
    #[arg(long, hide = true)]
    in_netns: bool,
}

/// One measured figure, as printed and written to the results table.
pub struct Row {
    pub figure: u8,
    pub what: String,
    pub connwatch: String,
    pub peer: String,
    pub ratio: String,
    pub goal: String,
    /// None where the row only informs.
    pub met: Option<bool>,
}

pub struct Bench {
    pub quick: bool,
    pub connwatch: PathBuf,
    pub tools: Tools,
    pub dir: PathBuf,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Bench {
    pub fn loadgen(&self) -> &Path {
        &self.tools.loadgen
    }

    /// Pick the quick or the full size.
    pub fn size<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    pub fn row(&mut self, row: Row) {
        let met = match row.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        println!(
            "fig {} | {} | connwatch {} | peer {} | ratio {} | goal {} {met}",
            row.figure, row.what, row.connwatch, row.peer, row.ratio, row.goal
        );
        let _ = std::io::stdout().flush();
        self.rows.push(row);
    }

    /// A line of context printed now and kept under the table.
    pub fn note(&mut self, figure: u8, text: impl Into<String>) {
        let text = text.into();
        println!("fig {figure} | note: {text}");
        let _ = std::io::stdout().flush();
        self.notes.push(format!("{figure}: {text}"));
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Waits for other work on the machine to end before a measurement; notes it if
    /// it never did.
    pub fn quiet(&mut self, figure: u8) {
        let busy = host::wait_quiet(std::time::Duration::from_secs(3 * 60));
        if busy >= 0.10 {
            self.note(
                figure,
                format!(
                    "the machine was {:.0}% busy with other work when this was measured",
                    busy * 100.0
                ),
            );
        }
    }
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if !crate::toolchain::is_root() {
        bail!("the benchmarks load eBPF, destroy sockets and set sysctls: run `cargo xtask bench` as root");
    }
    let connwatch = match args.connwatch {
        Some(p) => p,
        None => {
            crate::build(true)?;
            crate::target_dir().join("release").join("connwatch")
        }
    };
    if !args.in_netns {
        crate::ok(
            &mut crate::cargo_cmd(["build", "--release", "-p", "loadgen"]),
            "cargo build -p loadgen",
        )?;
        crate::mount_tracefs()?;
        // Figure 8's server and load generator come from Debian: installed here, as the
        // tests install theirs, since the figures run in a namespace with no network.
        if args.figures.is_empty() || args.figures.contains(&8) {
            crate::deb::ensure_tools(&[("nginx", "nginx-light"), ("wrk", "wrk")])?;
        }
        return in_own_netns(&connwatch, args.quick, &args.figures);
    }
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("run ip link set lo up")?;
    if !up.success() {
        bail!("cannot bring up loopback in the bench's network namespace");
    }
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut bench = Bench {
        quick: args.quick,
        connwatch,
        tools: Tools {
            loadgen: crate::target_dir().join("release").join("loadgen"),
        },
        dir,
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let figures: Vec<u8> = if args.figures.is_empty() {
        (1..=9).collect()
    } else {
        args.figures
    };
    let started = Instant::now();
    let date = std::process::Command::new("date")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "bench: {date}; {}; load {}",
        host::machine(),
        host::loadavg()
    );

    let mut sysctls = Sysctls::default();
    // Bursts of connects must not meet a full accept or SYN queue: a dropped SYN is
    // retried after a second and would read as a second of latency.
    sysctls.set("net.core.somaxconn", "65535")?;
    sysctls.set("net.ipv4.tcp_max_syn_backlog", "65535")?;

    let mut failed = Vec::new();
    let want = |f: u8| figures.contains(&f);
    // No daemon of ours runs between figures: the daemons of a previous run's figures
    // are stopped, and the next one starts after the machine is quiet.
    if want(1) {
        if let Err(e) = figures::data_path(&mut bench) {
            failed.push((1, e));
        }
    }
    if want(2) || want(6) || want(7) {
        if let Err(e) = population::run(&mut bench, want(2), want(6), want(7)) {
            failed.push((2, e));
        }
    }
    if want(3) {
        if let Err(e) = figures::deadline(&mut bench) {
            failed.push((3, e));
        }
    }
    if want(4) {
        if let Err(e) = figures::mass_destroy(&mut bench) {
            failed.push((4, e));
        }
    }
    if want(5) {
        if let Err(e) = figures::churn(&mut bench) {
            failed.push((5, e));
        }
    }
    if want(8) {
        if let Err(e) = web::real_server(&mut bench) {
            failed.push((8, e));
        }
    }
    if want(9) {
        if let Err(e) = figures::sweep(&mut bench) {
            failed.push((9, e));
        }
    }
    drop(sysctls);
    // Leave no map and no program attached behind (the program stays attached
    // through its pinned link after the daemon stops).
    if let Err(e) = bench
        .tools
        .cleanup(&bench.connwatch, std::time::Duration::from_secs(600))
    {
        eprintln!("bench: {e:#}");
    }

    let elapsed = started.elapsed();
    let table = table(&bench.rows);
    println!("\n{table}");
    for n in &bench.notes {
        println!("- {n}");
    }
    let out = bench.dir.join("results.md");
    let mut text = format!(
        "# connwatch bench{}\n\n{date}\n\n{}\n\n`cargo xtask bench{}` in {:.0} s\n\n{table}\n",
        if bench.quick { " (quick)" } else { "" },
        host::machine(),
        if bench.quick { " --quick" } else { "" },
        elapsed.as_secs_f64()
    );
    for n in &bench.notes {
        text.push_str(&format!("- {n}\n"));
    }
    std::fs::write(&out, text).with_context(|| format!("write {}", out.display()))?;
    println!(
        "bench: results in {} ({:.0} s)",
        out.display(),
        elapsed.as_secs_f64()
    );
    for (f, e) in &failed {
        eprintln!("bench: figure {f} could not be measured: {e:#}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the bench again inside a network namespace of its own. Its sockets are then
/// out of reach of anyone else's daemon and sock_diag (tests on this host run daemons
/// in private mount namespaces, beyond the single-instance lock), its loopback carries
/// nothing else, and its sysctls (somaxconn and the like are per namespace) vanish with
/// it. The maps, the lock and the eBPF programs stay the host's, as in production.
fn in_own_netns(connwatch: &Path, quick: bool, figures: &[u8]) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let mut cmd = std::process::Command::new("unshare");
    cmd.arg("--net")
        .arg("--")
        .arg(exe)
        .args(["bench", "--in-netns", "--connwatch"])
        .arg(connwatch);
    if quick {
        cmd.arg("--quick");
    }
    for f in figures {
        cmd.args(["--figure", &f.to_string()]);
    }
    let st = crate::status(&mut cmd)?;
    Ok(crate::exit_code(st))
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| # | figure | connwatch | peer | ratio | goal | met |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {met} |\n",
            r.figure, r.what, r.connwatch, r.peer, r.ratio, r.goal
        ));
    }
    t
}
