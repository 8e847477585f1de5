//! Loopback load and measuring tools for `cargo xtask bench`. Each subcommand is one
//! worker process (the benchmarks spread connections over many, since one process
//! holds at most 20000 descriptors here) or one measurement. Every worker stops by
//! itself after `--max-secs`.

mod bpf;
mod diag;
mod load;
mod sys;
mod tools;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Loopback load and measuring tools for cargo xtask bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open connections (at --rate a second, or at once) and hold them, watching each
    /// for its end; answers `report`, `dump` and `quit` on stdin.
    Conns {
        #[command(flatten)]
        ep: load::Endpoint,
        #[arg(long)]
        count: usize,
        /// Connections a second; 0 opens them as fast as possible.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// Request/response on persistent connections; starts on `go`.
    Rr {
        #[command(flatten)]
        ep: load::Endpoint,
        #[arg(long, default_value_t = 4)]
        conns: usize,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// A connection per request (connect, request, response, close); starts on `go`.
    Crr {
        #[command(flatten)]
        ep: load::Endpoint,
        #[arg(long)]
        secs: f64,
        /// Connections a second; 0 is as fast as possible.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Hold every Nth connection open and watch it (0: none).
        #[arg(long, default_value_t = 0)]
        keep_every: u64,
    },
    /// Bulk transfer over one connection; starts on `go`.
    Bulk {
        #[command(flatten)]
        ep: load::Endpoint,
        #[arg(long)]
        secs: f64,
    },
    /// Run a command and report its wall time and CPU (user, system).
    Rusage {
        /// Where the command's stdout and stderr go (default: stdout to /dev/null,
        /// stderr inherited).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 600.0)]
        timeout_secs: f64,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Sizes, entry count and drop counters of connwatch's pinned maps.
    Maps {
        /// Where the maps are pinned (default: this build's layout under /sys/fs/bpf/connwatch).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Compare the connection map (and `connwatch list --json`) with the kernel's table.
    Agree {
        /// Where the maps are pinned (default: this build's layout under /sys/fs/bpf/connwatch).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        #[arg(long)]
        lo: u16,
        #[arg(long)]
        hi: u16,
        /// The connwatch binary whose `list --json` is checked too.
        #[arg(long)]
        connwatch: Option<PathBuf>,
    },
    /// List loaded programs with connwatch's names (anyone's), with their run statistics.
    Progs,
    /// Hold connwatch's single-instance lock until stdin closes (no daemon attaches meanwhile).
    Lock {
        #[arg(long, default_value = "/run/connwatch.lock")]
        path: PathBuf,
        #[arg(long, default_value_t = 3600)]
        max_secs: u32,
    },
    /// The polling peer: destroy sockets in a port range once a dump has shown them
    /// for --max-age-ms, polling every --period-ms.
    Pollkill {
        #[arg(long)]
        lo: u16,
        #[arg(long)]
        hi: u16,
        #[arg(long)]
        max_age_ms: u64,
        #[arg(long, default_value_t = 1000)]
        period_ms: u64,
        #[arg(long)]
        secs: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Conns { ep, count, rate } => load::conns(&ep, count, rate),
        Cmd::Rr {
            ep,
            conns,
            secs,
            size,
        } => load::rr(&ep, conns, secs, size),
        Cmd::Crr {
            ep,
            secs,
            rate,
            keep_every,
        } => load::crr(&ep, secs, rate, keep_every),
        Cmd::Bulk { ep, secs } => load::bulk(&ep, secs),
        Cmd::Rusage {
            out,
            timeout_secs,
            cmd,
        } => tools::rusage(&cmd, out.as_deref(), timeout_secs),
        Cmd::Maps { pin_dir } => tools::maps(&pin_dir.unwrap_or_else(default_pin_dir)),
        Cmd::Agree {
            pin_dir,
            lo,
            hi,
            connwatch,
        } => tools::agree(
            &pin_dir.unwrap_or_else(default_pin_dir),
            lo,
            hi,
            connwatch.as_deref(),
        ),
        Cmd::Progs => tools::progs(),
        Cmd::Lock { path, max_secs } => {
            sys::exit_after(max_secs);
            tools::lock(&path)
        }
        Cmd::Pollkill {
            lo,
            hi,
            max_age_ms,
            period_ms,
            secs,
        } => tools::pollkill(
            lo,
            hi,
            Duration::from_millis(max_age_ms),
            Duration::from_millis(period_ms),
            secs,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where the daemon pins its maps: one directory per layout of the shared types.
fn default_pin_dir() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/connwatch/layout-{}",
        connwatch_common::LAYOUT_VERSION
    ))
}
