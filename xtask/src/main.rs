//! connwatch's build tasks: `cargo xtask <command>` (an alias in .cargo/config.toml).
//!
//! The eBPF crate cannot build with the rustup toolchains on our machines (they
//! have no rust-src), so `build-ebpf` drives it with Debian's rustc and
//! bpf-linker, installing them on first use (see toolchain.rs). The userspace
//! crate embeds the object it produces through connwatch/build.rs.

mod bench;
mod deb;
mod env;
mod fuzz;
mod soak;
mod toolchain;
mod vm;

use std::ffi::{OsStr, OsString};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The target the eBPF crate builds for.
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// The eBPF crate's directory and its bin name.
const EBPF_CRATE_DIR: &str = "connwatch-ebpf";
const EBPF_BIN: &str = "connwatch";
/// Where aya resolves tracepoint ids; not mounted on a fresh machine.
const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "connwatch build tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (installing its toolchain first if needed) and print its path.
    BuildEbpf,
    /// Build the eBPF object, then the connwatch daemon.
    Build {
        /// Build the daemon with the release profile (the eBPF object is always release).
        #[arg(long)]
        release: bool,
    },
    /// Build everything (the release profile), then run the daemon as root:
    /// `cargo xtask run [--debug] -- <args>`.
    Run {
        /// Build and run the debug profile instead (faster to build, slow to run).
        #[arg(long)]
        debug: bool,
        /// Arguments for connwatch.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run every check: rustfmt, clippy, the eBPF build, then all the workspace's tests.
    ///
    /// Arguments after `--` go to `cargo test`; to reach the test binaries use a
    /// second `--`, e.g. `cargo xtask test -- --test e2e -- --nocapture`.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy -D warnings`.
        #[arg(long)]
        no_lint: bool,
        /// Arguments for `cargo test`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Report each piece of the eBPF toolchain; exit non-zero if one is missing. Installs nothing.
    CheckToolchain,
    /// Measure connwatch beside its peers (root; loopback load): `cargo xtask bench [--figure N] [--quick]`.
    Bench(bench::BenchArgs),
    /// Fuzz the config, duration, port, CIDR and control-request parsers with cargo-fuzz: `cargo xtask fuzz [--seconds N]` (each target N s).
    Fuzz(fuzz::FuzzArgs),
    /// Churn and kills together on loopback (root; default 10 minutes): memory must stay flat, every decision logged.
    Soak(soak::SoakArgs),
    /// Boot a Debian cloud kernel under qemu and run the end-to-end tests in it: `cargo xtask vm-test --kernel 6.1|6.12`.
    VmTest(vm::VmArgs),
    /// Build the Debian package: target/debian/connwatch_<version>_amd64.deb.
    Deb,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::BuildEbpf => {
            build_ebpf()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Build { release } => {
            build(release)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { debug, args } => run_daemon(!debug, &args),
        Cmd::Test { no_lint, args } => test(no_lint, &args),
        Cmd::CheckToolchain => Ok(check_toolchain()),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Fuzz(args) => fuzz::run(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::VmTest(args) => vm::run(args),
        Cmd::Deb => {
            deb::build()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The workspace root, fixed when the xtask is compiled.
fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// The cargo target dir: CARGO_TARGET_DIR (or CARGO_BUILD_TARGET_DIR), relative
/// to the current directory as cargo reads it, else `<workspace>/target`.
pub(crate) fn target_dir() -> PathBuf {
    let set = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty());
    match set {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()
                    .unwrap_or_else(|_| workspace_root())
                    .join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The cargo that runs us (CARGO, set by `cargo run`), else `cargo` from PATH.
fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// A cargo command for the userspace side, run from the workspace root. An
/// explicit target dir is passed on absolute, so connwatch/build.rs (which
/// runs elsewhere) finds the same one.
fn cargo_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(cargo());
    env::scrub(&mut cmd);
    if std::env::var_os("CARGO_TARGET_DIR").is_some()
        || std::env::var_os("CARGO_BUILD_TARGET_DIR").is_some()
    {
        cmd.env("CARGO_TARGET_DIR", target_dir());
    }
    cmd.current_dir(workspace_root()).args(args);
    cmd
}

/// Runs `cmd` to completion, echoing it first.
fn status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("xtask: {}", show(cmd));
    cmd.status()
        .with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))
}

fn ok(cmd: &mut Command, what: &str) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program());
    let name = prog.file_name().unwrap_or(prog.as_os_str());
    std::iter::once(name)
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The path of the eBPF object `build-ebpf` produces.
fn ebpf_object() -> PathBuf {
    target_dir()
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_BIN)
}

fn build_ebpf() -> Result<PathBuf> {
    let cargo = cargo();
    let probe = toolchain::ensure(&cargo)?;

    let mut cmd = Command::new(&cargo);
    env::scrub(&mut cmd);
    for var in env::EBPF_REMOVED {
        cmd.env_remove(var);
    }
    cmd.current_dir(workspace_root().join(EBPF_CRATE_DIR))
        .args(["build", "--release", "--target", EBPF_TARGET])
        .args(["-Z", "build-std=core"])
        // Debian's rustc, whatever rustc the calling cargo or rustup chose: it
        // is the one with the core source for -Z build-std.
        .env("RUSTC", toolchain::RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .env("CARGO_TARGET_DIR", target_dir())
        // The workspace's release LTO is for the daemon: bpf-linker links the eBPF
        // object's bitcode itself, as it always has.
        .env("CARGO_PROFILE_RELEASE_LTO", "false");
    // rustc finds its linker through PATH; CI may not have $CARGO_HOME/bin there.
    if let Some(dir) = probe.linker_dir() {
        cmd.env("PATH", env::path_with(dir));
    }
    eprintln!(
        "xtask: RUSTC={} RUSTC_BOOTSTRAP=1 {} (in {EBPF_CRATE_DIR}/)",
        toolchain::RUSTC,
        show(&cmd)
    );
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {}", cargo.display()))?;
    if !st.success() {
        bail!("the eBPF build failed ({st})");
    }

    let object = ebpf_object();
    let len = std::fs::metadata(&object)
        .with_context(|| {
            format!(
                "the eBPF build succeeded but {} is missing",
                object.display()
            )
        })?
        .len();
    if len == 0 {
        bail!("the eBPF build produced an empty {}", object.display());
    }
    println!("eBPF object: {}", object.display());
    Ok(object)
}

fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut cmd = cargo_cmd(["build", "-p", "connwatch"]);
    if release {
        cmd.arg("--release");
    }
    ok(&mut cmd, "cargo build -p connwatch")
}

fn run_daemon(release: bool, args: &[OsString]) -> Result<ExitCode> {
    build(release)?;
    let bin = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("connwatch");
    let mut cmd = if toolchain::is_root() {
        Command::new(&bin)
    } else {
        let Some(sudo) = toolchain::find_in_path("sudo") else {
            bail!(
                "connwatch needs root to load its eBPF programs, and sudo is not in PATH: run {} as root",
                bin.display()
            );
        };
        eprintln!("xtask: not root; running connwatch through sudo");
        let mut c = Command::new(sudo);
        c.arg("-E").arg("--").arg(&bin);
        c
    };
    env::scrub(&mut cmd);
    cmd.args(args);
    eprintln!("xtask: {}", show(&cmd));
    // Replace the xtask, so signals (Ctrl-C, SIGTERM) reach the daemon itself.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", bin.display()))
}

fn test(no_lint: bool, args: &[OsString]) -> Result<ExitCode> {
    if !no_lint {
        // Cheapest first, before a first-run toolchain install.
        ok(
            &mut cargo_cmd(["fmt", "--all", "--", "--check"]),
            "cargo fmt --check (run `cargo fmt --all`)",
        )?;
    }
    build_ebpf()?;
    if !no_lint {
        ok(
            &mut cargo_cmd([
                "clippy",
                "--workspace",
                "--exclude",
                "connwatch-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "cargo clippy",
        )?;
    }
    mount_tracefs()?;
    toolchain::ensure_test_tools()?;
    clear_pins()?;
    let mut cmd = cargo_cmd(["test", "--workspace", "--exclude", "connwatch-ebpf"]);
    cmd.args(args);
    run_and_total(cmd)
}

/// Runs `cargo test`, passing its output through, and closes with the totals of all
/// its test binaries on one line: the last binary alone (often doc tests, with none)
/// says nothing of the run.
fn run_and_total(mut cmd: Command) -> Result<ExitCode> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().context("cargo test's output")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        if let Some((p, f)) = totals(&line) {
            passed += p;
            failed += f;
        }
    }
    let st = child.wait()?;
    writeln!(out, "tests: {passed} passed, {failed} failed")?;
    Ok(exit_code(st))
}

/// `test result: ok. 12 passed; 0 failed; ...` -> (12, 0).
fn totals(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

/// Where connwatch pins its maps and links, every layout version below it.
const PIN_ROOT: &str = "/sys/fs/bpf/connwatch";

/// The suites start from a host with nothing of connwatch pinned: pins left by an
/// earlier build (another layout, whose daemon refuses to start beside them) or an
/// interrupted run would make the tests about the machine's past. Removed with the
/// build's own `connwatch cleanup`, which refuses while a daemon runs.
fn clear_pins() -> Result<()> {
    if !Path::new(PIN_ROOT).exists() {
        return Ok(());
    }
    ok(
        &mut cargo_cmd(["build", "-p", "connwatch", "--bin", "connwatch"]),
        "cargo build -p connwatch",
    )?;
    let bin = target_dir().join("debug").join("connwatch");
    eprintln!(
        "xtask: {PIN_ROOT} holds pins of an earlier run: removing them with `connwatch cleanup`"
    );
    let out = Command::new(&bin)
        .arg("cleanup")
        .stdin(Stdio::null())
        .output()
        .context("cannot run connwatch cleanup")?;
    if !out.status.success() {
        // A daemon runs (a benchmark, another checkout's tests): its pins are its own,
        // and the suites wait for its lock.
        eprintln!(
            "xtask: left the pins alone: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn mount_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let by_hand = format!("mount -t tracefs nodev {TRACEFS}");
    if !toolchain::is_root() {
        bail!("tracefs is not mounted on {TRACEFS} and this is not root: run `{by_hand}` as root");
    }
    eprintln!("xtask: mounting tracefs on {TRACEFS} (aya resolves tracepoint ids through it)");
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "tracefs", "nodev", TRACEFS])
        .stdin(Stdio::null());
    ok(&mut cmd, &by_hand)?;
    if !Path::new(TRACEFS).join("events").is_dir() {
        bail!("mounted tracefs on {TRACEFS} but {TRACEFS}/events is still missing");
    }
    Ok(())
}

fn check_toolchain() -> ExitCode {
    let probe = toolchain::Probe::run();
    for (ok, name, detail) in probe.report() {
        let state = if ok { "ok" } else { "MISSING" };
        println!("{state:<8} {name:<16} {detail}");
    }
    let steps = toolchain::plan(&probe);
    if steps.is_empty() {
        return ExitCode::SUCCESS;
    }
    for step in &steps {
        println!("would be {step}");
    }
    println!("`cargo xtask build-ebpf` installs these (as root on Debian)");
    ExitCode::FAILURE
}

/// A child's exit status as ours: its code, or 128 + the signal that killed it.
fn exit_code(st: ExitStatus) -> ExitCode {
    match (st.code(), st.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::totals;

    #[test]
    fn totals_of_a_cargo_test_line() {
        assert_eq!(
            totals("test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 17.68s"),
            Some((12, 0))
        );
        assert_eq!(
            totals(
                "test result: FAILED. 11 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((11, 1))
        );
        assert_eq!(totals("running 3 tests"), None);
    }
}
