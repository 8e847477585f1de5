//! `cargo xtask fuzz`: every cargo-fuzz target in fuzz/ for a fixed time each.
//!
//! cargo-fuzz needs `-Z` flags (sanitizers, coverage instrumentation): the rustup
//! nightly where there is one, else the stable toolchain with RUSTC_BOOTSTRAP=1 (it
//! ships the same sanitizer runtimes). cargo-fuzz itself is installed from crates.io on
//! first use. A crash fails the command and names the input that caused it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{env, show, workspace_root};

/// The cargo-fuzz release known to build with our toolchains.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(Args)]
pub struct FuzzArgs {
    /// How long to fuzz each target, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only these targets (repeatable); default: every target in fuzz/Cargo.toml.
    #[arg(long = "target")]
    targets: Vec<String>,
}

/// How cargo is run for cargo-fuzz: through the nightly, or stable unlocked.
enum Toolchain {
    Nightly,
    StableBootstrap,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cargo_fuzz_installed() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if cargo_fuzz_installed() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io (once)");
    let mut cmd = Command::new(crate::cargo());
    env::scrub(&mut cmd);
    cmd.args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]);
    crate::ok(&mut cmd, "cargo install cargo-fuzz")?;
    if !cargo_fuzz_installed() {
        bail!(
            "cargo-fuzz was installed but `cargo fuzz` does not run: is $CARGO_HOME/bin in PATH?"
        );
    }
    Ok(())
}

fn fuzz_cmd(tc: &Toolchain) -> Command {
    let mut cmd = match tc {
        Toolchain::Nightly => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo", "fuzz"]);
            c
        }
        Toolchain::StableBootstrap => {
            let mut c = Command::new("cargo");
            c.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
            c
        }
    };
    env::scrub(&mut cmd);
    // The workspace's own build settings are not the fuzzer's.
    for var in ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR", "RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd.current_dir(fuzz_dir());
    cmd
}

/// The fuzz targets: the `[[bin]]` names of fuzz/Cargo.toml.
pub fn targets(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
            continue;
        }
        if let (true, Some(rest)) = (in_bin, line.strip_prefix("name")) {
            if let Some(v) = rest.trim().strip_prefix('=') {
                out.push(v.trim().trim_matches('"').to_string());
            }
        }
    }
    out
}

/// libFuzzer's closing "Done N runs in S second(s)".
pub fn runs_done(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

struct Outcome {
    target: String,
    runs: Option<u64>,
    secs: f64,
    corpus: usize,
    crash: Option<String>,
}

pub fn run(args: FuzzArgs) -> Result<std::process::ExitCode> {
    let manifest =
        fs::read_to_string(fuzz_dir().join("Cargo.toml")).context("cannot read fuzz/Cargo.toml")?;
    let all = targets(&manifest);
    let chosen: Vec<String> = if args.targets.is_empty() {
        all.clone()
    } else {
        for t in &args.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t}: the targets are {}", all.join(", "));
            }
        }
        args.targets.clone()
    };
    ensure_cargo_fuzz()?;
    let tc = if has_nightly() {
        Toolchain::Nightly
    } else {
        eprintln!("xtask: no rustup nightly: fuzzing with stable and RUSTC_BOOTSTRAP=1");
        Toolchain::StableBootstrap
    };
    let mut build = fuzz_cmd(&tc);
    build.args(["build", "-O"]);
    crate::ok(&mut build, "cargo fuzz build")?;

    let logs = fuzz_dir().join("target").join("logs");
    fs::create_dir_all(&logs)?;
    let mut outcomes = Vec::new();
    for target in &chosen {
        let corpus = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir().join("seeds").join(target);
        let log_path = logs.join(format!("{target}.log"));
        let log = fs::File::create(&log_path)?;
        let mut cmd = fuzz_cmd(&tc);
        cmd.args(["run", "-O", target]).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--").args([
            format!("-max_total_time={}", args.seconds),
            "-rss_limit_mb=2048".into(),
            "-print_final_stats=1".into(),
        ]);
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        eprintln!(
            "xtask: {} ({} s; log: {})",
            show(&cmd),
            args.seconds,
            log_path.display()
        );
        let start = Instant::now();
        let st = cmd.status().context("cannot run cargo fuzz")?;
        let secs = start.elapsed().as_secs_f64();
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let crash = (!st.success()).then(|| crash_report(&text, &log_path, target));
        outcomes.push(Outcome {
            target: target.clone(),
            runs: runs_done(&text),
            secs,
            corpus: fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0),
            crash,
        });
    }
    println!(
        "{:<16} {:>12} {:>8} {:>8}  result",
        "target", "runs", "seconds", "corpus"
    );
    for o in &outcomes {
        println!(
            "{:<16} {:>12} {:>8.0} {:>8}  {}",
            o.target,
            o.runs.map_or("-".into(), |r| r.to_string()),
            o.secs,
            o.corpus,
            if o.crash.is_some() { "CRASH" } else { "ok" }
        );
    }
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    for o in &crashed {
        eprintln!("{}", o.crash.as_deref().unwrap_or_default());
    }
    Ok(if crashed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// The panic message and the saved input of a failed run.
fn crash_report(log: &str, log_path: &Path, target: &str) -> String {
    let panic = log
        .lines()
        .skip_while(|l| !l.contains("panicked at"))
        .take(3)
        .collect::<Vec<_>>()
        .join("\n");
    let artifact = log
        .lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .unwrap_or("(no input saved)");
    format!(
        "fuzz target {target} failed:\n{panic}\ninput: {artifact}\nreplay: cd fuzz && cargo +nightly fuzz run -O {target} {artifact}\nlog: {}",
        log_path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_targets_and_the_run_count() {
        let manifest = "[package]\nname = \"connwatch-fuzz\"\n\n[[bin]]\nname = \"config\"\npath = \"x\"\n\n[dependencies]\nname = \"no\"\n\n[[bin]]\nname = \"cidr\"\n";
        assert_eq!(targets(manifest), ["config", "cidr"]);
        let log = "#2 INITED\nDone 2583365 runs in 61 second(s)\nstat::number_of_executed_units: 2583365\n";
        assert_eq!(runs_done(log), Some(2_583_365));
        assert_eq!(runs_done("nothing"), None);
    }

    #[test]
    fn the_fuzz_crate_names_its_targets() {
        let text = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let t = targets(&text);
        for want in [
            "config",
            "duration",
            "port_range",
            "cidr",
            "state_timeout",
            "api_request",
        ] {
            assert!(t.iter().any(|x| x == want), "{want} missing from {t:?}");
        }
    }
}
