//! The eBPF toolchain: what it is made of, how to tell whether each piece is
//! present, and how to install what is missing.
//!
//! The rustup toolchains on our machines have no `rust-src` and cannot fetch one,
//! so the eBPF crate builds with Debian's `rustc-web` (rustc 1.96 on LLVM 22)
//! and its `rust-web-src`, linked by `bpf-linker` 0.13 built against Debian's
//! LLVM 22 (see /work/shared/TOOLCHAIN.md). Everything here reaches only
//! Debian's apt repositories and crates.io.
//!
//! The decision of what to install ([`plan`]) and whether this host may install
//! it ([`check_can_install`]) are pure functions of the probe results, so they
//! are unit-tested without touching the machine.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::env;

/// Debian's rustc that can build `core` for bpfel-unknown-none.
pub const RUSTC: &str = "/usr/bin/rustc";
/// The oldest `/usr/bin/rustc` accepted: the 1.96 of bookworm's rustc-web.
pub const MIN_RUSTC: (u32, u32) = (1, 96);
/// Where Debian's rustc finds the source of `core` for `-Z build-std`.
pub const CORE_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
/// Shipped by llvm-22-dev.
pub const LLVM_CONFIG: &str = "/usr/lib/llvm-22/bin/llvm-config";
/// The LLVM prefix bpf-linker is built against.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Shipped by libpolly-22-dev; bpf-linker's build links Polly.
pub const POLLY_HEADER: &str = "/usr/lib/llvm-22/include/polly/Canonicalization.h";
/// Shipped by libzstd-dev; bpf-linker's build links zstd.
pub const ZSTD_HEADER: &str = "/usr/include/zstd.h";
/// The bpf-linker release that matches LLVM 22.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_SERIES: &str = "0.13.";

/// The arguments of the `cargo install` that builds bpf-linker.
pub const BPF_LINKER_INSTALL_ARGS: [&str; 8] = [
    "install",
    "bpf-linker",
    "--version",
    BPF_LINKER_VERSION,
    "--no-default-features",
    "--features",
    "llvm-22",
    "--locked",
];

/// What a look at bpf-linker found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Linker {
    Missing,
    /// Runs, but is another release (its `--version` line).
    WrongVersion {
        path: PathBuf,
        version: String,
    },
    Ok {
        path: PathBuf,
        version: String,
    },
}

/// The state of each piece of the toolchain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// `/usr/bin/rustc --version` as (major, minor), None if it does not run.
    pub rustc: Option<(u32, u32)>,
    pub rustc_line: Option<String>,
    pub core_src: bool,
    pub llvm_dev: bool,
    pub polly_dev: bool,
    pub zstd_dev: bool,
    pub linker: Linker,
}

/// One install action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// `apt-get update` then `apt-get install -y` these packages; `why` says
    /// what each is for.
    Apt {
        packages: Vec<&'static str>,
        why: Vec<&'static str>,
    },
    /// `cargo install bpf-linker` (about 4 minutes on 2 cores).
    BpfLinker { why: String },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Apt { packages, why } => write!(
                f,
                "installing Debian packages {} ({})",
                packages.join(" "),
                why.join("; ")
            ),
            Step::BpfLinker { why } => write!(
                f,
                "installing bpf-linker {BPF_LINKER_VERSION} with cargo install, about 4 minutes ({why})"
            ),
        }
    }
}

impl Probe {
    /// Looks at this machine. Runs `/usr/bin/rustc --version` and each
    /// candidate `bpf-linker --version`; changes nothing.
    pub fn run() -> Probe {
        let rustc_line = version_line(Path::new(RUSTC));
        Probe {
            rustc: rustc_line.as_deref().and_then(parse_rustc_version),
            rustc_line,
            core_src: Path::new(CORE_SRC).join("Cargo.toml").is_file(),
            llvm_dev: Path::new(LLVM_CONFIG).is_file(),
            polly_dev: Path::new(POLLY_HEADER).is_file(),
            zstd_dev: Path::new(ZSTD_HEADER).is_file(),
            linker: find_linker(),
        }
    }

    pub fn rustc_ok(&self) -> bool {
        self.rustc.is_some_and(|v| v >= MIN_RUSTC)
    }

    pub fn linker_ok(&self) -> bool {
        matches!(self.linker, Linker::Ok { .. })
    }

    /// The directory of the bpf-linker to use, once it is there.
    pub fn linker_dir(&self) -> Option<&Path> {
        match &self.linker {
            Linker::Ok { path, .. } => path.parent(),
            _ => None,
        }
    }

    /// One line per piece, for `check-toolchain`: (ok, name, detail).
    pub fn report(&self) -> Vec<(bool, &'static str, String)> {
        let need_build_deps = !self.linker_ok();
        let build_dep = |present: bool, file: &str| {
            if present {
                file.to_string()
            } else if need_build_deps {
                format!("{file} not found")
            } else {
                format!("{file} not found (needed only to build bpf-linker, which is installed)")
            }
        };
        vec![
            (
                self.rustc_ok(),
                "rustc-web",
                match (&self.rustc_line, self.rustc) {
                    (Some(line), _) if self.rustc_ok() => format!("{RUSTC}: {line}"),
                    (Some(line), _) => format!(
                        "{RUSTC}: {line}: need {}.{} or newer",
                        MIN_RUSTC.0, MIN_RUSTC.1
                    ),
                    (None, _) => format!("{RUSTC} not found or does not run"),
                },
            ),
            (
                self.core_src,
                "rust-web-src",
                if self.core_src {
                    CORE_SRC.to_string()
                } else {
                    format!("{CORE_SRC} not found")
                },
            ),
            (
                self.llvm_dev,
                "llvm-22-dev",
                if self.llvm_dev {
                    LLVM_CONFIG.to_string()
                } else {
                    format!("{LLVM_CONFIG} not found")
                },
            ),
            (
                self.polly_dev || !need_build_deps,
                "libpolly-22-dev",
                build_dep(self.polly_dev, POLLY_HEADER),
            ),
            (
                self.zstd_dev || !need_build_deps,
                "libzstd-dev",
                build_dep(self.zstd_dev, ZSTD_HEADER),
            ),
            (
                self.linker_ok(),
                "bpf-linker",
                match &self.linker {
                    Linker::Ok { path, version } => format!("{}: {version}", path.display()),
                    Linker::WrongVersion { path, version } => {
                        format!("{}: {version}: need {BPF_LINKER_SERIES}x", path.display())
                    }
                    Linker::Missing => "not found in PATH or $CARGO_HOME/bin".to_string(),
                },
            ),
        ]
    }
}

/// What to install, in order, given what the probe found. Empty when the
/// toolchain is complete.
pub fn plan(p: &Probe) -> Vec<Step> {
    let mut packages = Vec::new();
    let mut why = Vec::new();
    if !p.rustc_ok() {
        packages.push("rustc-web");
        why.push(
            "the eBPF build needs Debian's rustc 1.96, whose core library source Debian ships",
        );
    }
    if !p.core_src {
        packages.push("rust-web-src");
        why.push("the eBPF build needs rustc with the core library source, to build core for bpfel-unknown-none");
    }
    let linker_needed = !p.linker_ok();
    if !p.llvm_dev {
        packages.push("llvm-22-dev");
        why.push("bpf-linker links against LLVM 22, the LLVM of Debian's rustc");
    }
    if linker_needed && !p.polly_dev {
        packages.push("libpolly-22-dev");
    }
    if linker_needed && !p.zstd_dev {
        packages.push("libzstd-dev");
    }
    if linker_needed && !(p.polly_dev && p.zstd_dev) {
        why.push("building bpf-linker against LLVM 22 links Polly and zstd");
    }

    let mut steps = Vec::new();
    if !packages.is_empty() {
        steps.push(Step::Apt { packages, why });
    }
    if linker_needed {
        let why = match &p.linker {
            Linker::WrongVersion { version, .. } => format!(
                "found {version}, but rustc's LLVM 22 needs {BPF_LINKER_SERIES}x to link eBPF objects"
            ),
            _ => "rustc links eBPF objects through it".to_string(),
        };
        steps.push(Step::BpfLinker { why });
    }
    steps
}

/// The facts about the host that decide whether it can run the steps itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub root: bool,
    pub debian: bool,
    pub apt_get: bool,
}

impl Host {
    pub fn run() -> Host {
        Host {
            root: is_root(),
            debian: Path::new("/etc/debian_version").is_file(),
            apt_get: find_in_path("apt-get").is_some(),
        }
    }
}

/// Ok if `host` can carry out `steps`; otherwise a one-line message naming what
/// stops it and the commands to run by hand.
pub fn check_can_install(steps: &[Step], host: &Host) -> Result<(), String> {
    let apt: Option<&Vec<&str>> = steps.iter().find_map(|s| match s {
        Step::Apt { packages, .. } => Some(packages),
        _ => None,
    });
    let Some(packages) = apt else {
        // cargo install needs neither root nor apt.
        return Ok(());
    };
    let mut blockers = Vec::new();
    if !host.debian {
        blockers.push("this is not Debian (no /etc/debian_version)");
    }
    if !host.apt_get {
        blockers.push("apt-get is not in PATH");
    }
    if !host.root {
        blockers.push("not running as root");
    }
    if blockers.is_empty() {
        return Ok(());
    }
    let missing: Vec<String> = steps
        .iter()
        .flat_map(|s| match s {
            Step::Apt { packages, .. } => packages.iter().map(|p| p.to_string()).collect(),
            Step::BpfLinker { .. } => vec![format!("bpf-linker {BPF_LINKER_VERSION}")],
        })
        .collect();
    Err(format!(
        "the eBPF toolchain lacks {}, which xtask cannot install here: {}; as root on Debian 12 run: {}",
        missing.join(", "),
        blockers.join(", "),
        manual_commands(
            packages,
            steps.iter().any(|s| matches!(s, Step::BpfLinker { .. }))
        )
    ))
}

/// The install commands, as one shell line.
pub fn manual_commands(packages: &[&str], linker: bool) -> String {
    let mut cmds = Vec::new();
    if !packages.is_empty() {
        cmds.push("apt-get update".to_string());
        cmds.push(format!("apt-get install -y {}", packages.join(" ")));
    }
    if linker {
        cmds.push(format!(
            "LLVM_PREFIX={LLVM_PREFIX} cargo {}",
            BPF_LINKER_INSTALL_ARGS.join(" ")
        ));
    }
    cmds.join(" && ")
}

/// Makes the toolchain complete, installing what is missing. Prints nothing
/// when it already is. Returns the final probe.
pub fn ensure(cargo: &Path) -> Result<Probe> {
    let probe = Probe::run();
    let steps = plan(&probe);
    if steps.is_empty() {
        return Ok(probe);
    }
    check_can_install(&steps, &Host::run()).map_err(anyhow::Error::msg)?;
    for step in &steps {
        eprintln!("xtask: {step}");
        match step {
            Step::Apt { packages, .. } => apt_install(packages)?,
            Step::BpfLinker { .. } => install_linker(cargo)?,
        }
    }
    let probe = Probe::run();
    let left = plan(&probe);
    if !left.is_empty() {
        let missing: Vec<&str> = probe
            .report()
            .into_iter()
            .filter(|(ok, _, _)| !ok)
            .map(|(_, name, _)| name)
            .collect();
        bail!(
            "the eBPF toolchain is still incomplete after installing: {} (see `cargo xtask check-toolchain`)",
            missing.join(", ")
        );
    }
    Ok(probe)
}

/// Tools the tests use besides the build, and the Debian packages that ship them:
/// `top` is driven in tmux, metrics are checked by Prometheus's promtool.
pub const TEST_TOOLS: [(&str, &str); 3] = [
    ("tmux", "tmux"),
    ("promtool", "prometheus"),
    ("nft", "nftables"),
];

/// Installs the test tools that are missing (without recommended packages: the
/// `prometheus` package is wanted only for promtool).
pub fn ensure_test_tools() -> Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || find_in_path("apt-get").is_none() {
        bail!(
            "the tests need tmux, promtool and nft: run `apt-get install -y --no-install-recommends {}` as root",
            missing.join(" ")
        );
    }
    eprintln!(
        "xtask: installing Debian packages {} (the tests drive `connwatch top` in tmux, check metrics with promtool and blocks with nft)",
        missing.join(" ")
    );
    let mut update = Command::new("apt-get");
    update.arg("update");
    run_quietly_stdin(update, "apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing);
    run_quietly_stdin(install, "apt-get install")
}

/// `apt-get update`, then `apt-get install --no-install-recommends` of these packages.
pub fn apt_install_no_recommends(packages: &[&str]) -> Result<()> {
    eprintln!("xtask: installing Debian packages {}", packages.join(" "));
    let mut update = Command::new("apt-get");
    update.arg("update");
    run_quietly_stdin(update, "apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages);
    run_quietly_stdin(install, "apt-get install")
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let mut update = Command::new("apt-get");
    update.arg("update");
    run_quietly_stdin(update, "apt-get update")?;
    let mut install = Command::new("apt-get");
    install.args(["install", "-y"]).args(packages);
    run_quietly_stdin(install, "apt-get install")
}

fn run_quietly_stdin(mut cmd: Command, what: &str) -> Result<()> {
    env::scrub(&mut cmd);
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    let status = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn install_linker(cargo: &Path) -> Result<()> {
    let mut cmd = Command::new(cargo);
    env::scrub(&mut cmd);
    cmd.args(BPF_LINKER_INSTALL_ARGS)
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .stdin(Stdio::null());
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", cargo.display()))?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    Ok(())
}

/// The first line `prog --version` prints, if it runs and succeeds.
fn version_line(prog: &Path) -> Option<String> {
    let mut cmd = Command::new(prog);
    env::scrub(&mut cmd);
    let out = cmd
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

/// "rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)" -> (1, 96).
pub fn parse_rustc_version(line: &str) -> Option<(u32, u32)> {
    let mut words = line.split_whitespace();
    if words.next()? != "rustc" {
        return None;
    }
    let mut parts = words.next()?.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// True for "bpf-linker 0.13.x".
pub fn linker_version_ok(line: &str) -> bool {
    let mut words = line.split_whitespace();
    words.next() == Some("bpf-linker")
        && words
            .next()
            .is_some_and(|v| v.starts_with(BPF_LINKER_SERIES))
}

/// bpf-linker in PATH, then in $CARGO_HOME/bin (where cargo install puts it,
/// and which CI may not have in PATH). The first 0.13.x wins; otherwise the
/// first that runs is reported as the wrong version.
fn find_linker() -> Linker {
    let mut wrong = None;
    for path in linker_candidates() {
        let Some(version) = version_line(&path) else {
            continue;
        };
        if linker_version_ok(&version) {
            return Linker::Ok { path, version };
        }
        wrong.get_or_insert(Linker::WrongVersion { path, version });
    }
    wrong.unwrap_or(Linker::Missing)
}

fn linker_candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(cargo_home().join("bin"));
    let mut seen = Vec::new();
    for dir in dirs {
        let path = dir.join("bpf-linker");
        if path.is_file() && !seen.contains(&path) {
            seen.push(path);
        }
    }
    seen
}

pub fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cargo")
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_uid(&s))
        == Some(0)
}

/// The effective uid from /proc/self/status ("Uid:\treal\teffective\tsaved\tfs").
pub fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete() -> Probe {
        Probe {
            rustc: Some((1, 96)),
            rustc_line: Some("rustc 1.96.0 (ac68faa20 2026-05-25)".into()),
            core_src: true,
            llvm_dev: true,
            polly_dev: true,
            zstd_dev: true,
            linker: Linker::Ok {
                path: "/root/.cargo/bin/bpf-linker".into(),
                version: "bpf-linker 0.13.0".into(),
            },
        }
    }

    fn empty() -> Probe {
        Probe {
            rustc: None,
            rustc_line: None,
            core_src: false,
            llvm_dev: false,
            polly_dev: false,
            zstd_dev: false,
            linker: Linker::Missing,
        }
    }

    const APT_PACKAGES: [&str; 5] = [
        "rustc-web",
        "rust-web-src",
        "llvm-22-dev",
        "libpolly-22-dev",
        "libzstd-dev",
    ];

    fn apt_packages(steps: &[Step]) -> Vec<&'static str> {
        steps
            .iter()
            .flat_map(|s| match s {
                Step::Apt { packages, .. } => packages.clone(),
                _ => vec![],
            })
            .collect()
    }

    fn installs_linker(steps: &[Step]) -> bool {
        steps.iter().any(|s| matches!(s, Step::BpfLinker { .. }))
    }

    const ROOT_DEBIAN: Host = Host {
        root: true,
        debian: true,
        apt_get: true,
    };

    #[test]
    fn complete_toolchain_needs_nothing() {
        assert!(plan(&complete()).is_empty());
        assert!(complete().report().iter().all(|(ok, _, _)| *ok));
    }

    #[test]
    fn fresh_machine_installs_everything_apt_first() {
        let steps = plan(&empty());
        assert_eq!(steps.len(), 2);
        assert_eq!(apt_packages(&steps), APT_PACKAGES.to_vec());
        assert!(matches!(steps[0], Step::Apt { .. }));
        assert!(matches!(steps[1], Step::BpfLinker { .. }));
        assert!(check_can_install(&steps, &ROOT_DEBIAN).is_ok());
    }

    #[test]
    fn old_rustc_is_replaced_by_rustc_web() {
        let p = Probe {
            rustc: Some((1, 63)),
            rustc_line: Some("rustc 1.63.0".into()),
            ..complete()
        };
        let steps = plan(&p);
        assert_eq!(apt_packages(&steps), vec!["rustc-web"]);
        assert!(!installs_linker(&steps));
        let report = p.report();
        assert!(!report[0].0);
        assert!(report[0].2.contains("need 1.96"), "{}", report[0].2);
    }

    #[test]
    fn missing_core_source_alone() {
        let p = Probe {
            core_src: false,
            ..complete()
        };
        let steps = plan(&p);
        assert_eq!(steps.len(), 1);
        assert_eq!(apt_packages(&steps), vec!["rust-web-src"]);
        assert!(steps[0].to_string().starts_with(
            "installing Debian packages rust-web-src (the eBPF build needs rustc with the core library source"
        ));
    }

    #[test]
    fn missing_linker_with_build_deps_present_is_cargo_install_only() {
        let p = Probe {
            linker: Linker::Missing,
            ..complete()
        };
        let steps = plan(&p);
        assert_eq!(steps.len(), 1);
        assert!(installs_linker(&steps));
        // cargo install needs neither root nor Debian.
        let nobody = Host {
            root: false,
            debian: false,
            apt_get: false,
        };
        assert!(check_can_install(&steps, &nobody).is_ok());
    }

    #[test]
    fn missing_linker_pulls_its_build_deps() {
        let p = Probe {
            linker: Linker::Missing,
            polly_dev: false,
            zstd_dev: false,
            ..complete()
        };
        let steps = plan(&p);
        assert_eq!(apt_packages(&steps), vec!["libpolly-22-dev", "libzstd-dev"]);
        assert!(installs_linker(&steps));
        assert!(matches!(steps[0], Step::Apt { .. }));
    }

    #[test]
    fn build_deps_are_not_needed_once_the_linker_is_there() {
        let p = Probe {
            polly_dev: false,
            zstd_dev: false,
            ..complete()
        };
        assert!(plan(&p).is_empty());
        let report = p.report();
        assert!(report.iter().all(|(ok, _, _)| *ok));
        assert!(report[3].2.contains("needed only to build bpf-linker"));
    }

    #[test]
    fn llvm_dev_is_always_required() {
        let p = Probe {
            llvm_dev: false,
            ..complete()
        };
        assert_eq!(apt_packages(&plan(&p)), vec!["llvm-22-dev"]);
    }

    #[test]
    fn wrong_linker_version_is_reinstalled() {
        let p = Probe {
            linker: Linker::WrongVersion {
                path: "/usr/local/bin/bpf-linker".into(),
                version: "bpf-linker 0.9.13".into(),
            },
            ..complete()
        };
        let steps = plan(&p);
        assert_eq!(steps.len(), 1);
        let line = steps[0].to_string();
        assert!(line.contains("found bpf-linker 0.9.13"), "{line}");
    }

    #[test]
    fn not_root_fails_with_the_commands_to_run() {
        let steps = plan(&empty());
        let host = Host {
            root: false,
            ..ROOT_DEBIAN
        };
        let err = check_can_install(&steps, &host).unwrap_err();
        assert!(!err.contains('\n'));
        assert!(err.contains("not running as root"), "{err}");
        assert!(err.contains(
            "apt-get update && apt-get install -y rustc-web rust-web-src llvm-22-dev libpolly-22-dev libzstd-dev && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22 --locked"
        ), "{err}");
    }

    #[test]
    fn non_debian_or_no_apt_fails() {
        let steps = plan(&Probe {
            core_src: false,
            ..complete()
        });
        let err = check_can_install(
            &steps,
            &Host {
                debian: false,
                apt_get: false,
                root: true,
            },
        )
        .unwrap_err();
        assert!(err.contains("not Debian"), "{err}");
        assert!(err.contains("apt-get is not in PATH"), "{err}");
        assert!(err.contains("lacks rust-web-src, which"), "{err}");
        assert!(!err.contains("cargo install"), "{err}");
    }

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_rustc_version(
                "rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)"
            ),
            Some((1, 96))
        );
        assert_eq!(
            parse_rustc_version("rustc 1.97.0-nightly (abc 2026-05-01)"),
            Some((1, 97))
        );
        assert_eq!(parse_rustc_version("rustc 1.63.0"), Some((1, 63)));
        assert_eq!(parse_rustc_version("cargo 1.96.0"), None);
        assert_eq!(parse_rustc_version(""), None);
        assert!(linker_version_ok("bpf-linker 0.13.0"));
        assert!(linker_version_ok("bpf-linker 0.13.7"));
        assert!(!linker_version_ok("bpf-linker 0.9.13"));
        assert!(!linker_version_ok("bpf-linker 0.130.0"));
        assert!(!linker_version_ok("other 0.13.0"));
    }

    #[test]
    fn parses_effective_uid() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }
}
