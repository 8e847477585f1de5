//! `cargo xtask vm-test --kernel 6.1|6.12`: the end-to-end suites on another kernel.
//!
//! Debian's own cloud kernel package for the series is fetched with `apt-get
//! download` and unpacked with `dpkg-deb -x` (never installed), then booted under
//! `qemu-system-x86_64` with an initramfs the xtask writes itself (see cpio.rs):
//! a static `/init` (src/bin/vm-init.rs), the static test binaries, the static
//! `connwatch` at the path the tests were compiled to run it from
//! (`CARGO_BIN_EXE_connwatch`), the modules the daemon needs (kmod.rs), and the
//! tools some tests shell out to, with their shared libraries. The guest prints
//! the tests' output on its serial console and closes with `N passed, N failed`.
//!
//! Everything is cached under `<target>/vm/`: the .deb, the unpacked kernel, the
//! decompressed modules and the image (rewritten only when an input changed).

mod cpio;
mod kmod;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::{cargo_cmd, env, show, target_dir, toolchain, workspace_root};
use cpio::{Archive, Entry};

/// The test binaries of package connwatch, in the order they run.
const SUITES: [&str; 6] = [
    "e2e",
    "policies",
    "reliability",
    "observe",
    "netns",
    "sock_diag",
];
/// The triple the static binaries are built for (static-pie with glibc).
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// Modules the daemon and the tests need (veth: a test joins two namespaces with a
/// pair); those built into a kernel are skipped.
const MODULES: [&str; 5] = ["ipv6", "inet_diag", "tcp_diag", "udp_diag", "veth"];
/// Programs the tests run, and the Debian packages that ship them (fetched with
/// `apt-get download` when the host lacks the program). `systemd-analyze verify`
/// runs `man 8 ss` for the unit's Documentation=, hence man and its groff pipeline.
const GUEST_TOOLS: [(&str, &str); 22] = [
    ("bash", "bash"),
    ("test", "coreutils"),
    ("sleep", "coreutils"),
    ("setpriv", "util-linux"),
    ("tmux", "tmux"),
    ("systemd-analyze", "systemd"),
    ("promtool", "prometheus"),
    ("kill", "procps"),
    ("ss", "iproute2"),
    ("ip", "iproute2"),
    ("man", "man-db"),
    ("gzip", "gzip"),
    ("locale", "libc-bin"),
    ("col", "bsdextrautils"),
    ("groff", "groff-base"),
    ("nroff", "groff-base"),
    ("troff", "groff-base"),
    ("grotty", "groff-base"),
    ("preconv", "groff-base"),
    ("tbl", "groff-base"),
    ("eqn", "groff-base"),
    ("soelim", "groff-base"),
];
/// Files and trees copied from the host when it has them: the units
/// `systemd-analyze verify` resolves dependencies against, what man and groff
/// read, and the C.UTF-8 locale (tmux wants a UTF-8 one).
const GUEST_FILES: [&str; 7] = [
    "/usr/lib/systemd/system",
    "/etc/manpath.config",
    "/usr/share/groff",
    "/etc/groff",
    "/usr/share/man/man8/ss.8.gz",
    "/usr/lib/locale/C.utf8",
    "/usr/share/locale/locale.alias",
];
/// Terminal descriptions tmux and `connwatch top` may ask for.
const TERMINFO: [&str; 8] = [
    "xterm-256color",
    "xterm",
    "screen",
    "screen-256color",
    "tmux",
    "tmux-256color",
    "linux",
    "dumb",
];

#[derive(clap::Args)]
pub struct VmArgs {
    /// Kernel series (6.1, 6.12: the newest Debian cloud kernel of it) or an exact
    /// version as in the package name (6.1.0-57, 6.12.117+deb12).
    #[arg(long)]
    kernel: String,
    /// Test binaries to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = SUITES.map(String::from))]
    tests: Vec<String>,
    /// Run only the tests whose name contains this (libtest's filter).
    #[arg(long)]
    filter: Option<String>,
    /// Skip the tests whose name contains one of these, comma-separated.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Give up on the guest after this many minutes (the whole suite takes about
    /// three under TCG).
    #[arg(long, default_value_t = 20)]
    timeout_mins: u64,
    /// Give up on one test binary after this many minutes (inside the guest).
    #[arg(long, default_value_t = 10)]
    binary_timeout_mins: u64,
    /// kvm, tcg, or auto: KVM if a short probe boot with it works, else TCG.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// A bash script to run in the guest before the tests (to look around in it).
    #[arg(long)]
    guest_script: Option<PathBuf>,
    /// Guest memory, as qemu's -m takes it.
    #[arg(long, default_value = "2G")]
    memory: String,
}

pub fn run(args: VmArgs) -> Result<ExitCode> {
    let began = Instant::now();
    let mut phases: Vec<(&str, Duration)> = Vec::new();
    for t in &args.tests {
        if !SUITES.contains(&t.as_str()) {
            bail!(
                "--tests: no test binary {t:?} (there are {})",
                SUITES.join(", ")
            );
        }
    }
    for (what, value) in [
        ("--filter", args.filter.iter().collect::<Vec<_>>()),
        ("--skip", args.skip.iter().collect()),
    ] {
        if let Some(bad) = value
            .iter()
            .find(|v| v.is_empty() || v.contains(char::is_whitespace) || v.contains(','))
        {
            bail!("{what} {bad:?}: no spaces or commas (it goes on the kernel command line)");
        }
    }
    let accel = match args.accel.as_str() {
        "auto" => None,
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        other => bail!("--accel {other:?}: kvm, tcg or auto"),
    };
    let qemu = ensure_host_tool(
        "qemu-system-x86_64",
        "qemu-system-x86",
        "to boot the test kernel",
    )?;
    let cache = target_dir().join("vm");

    let t = Instant::now();
    let kernel = Kernel::prepare(&cache, &args.kernel)?;
    phases.push(("kernel package", t.elapsed()));
    eprintln!("xtask: kernel {} ({})", kernel.release, kernel.package);

    let t = Instant::now();
    crate::build_ebpf()?;
    let built = build_static(&args.tests)?;
    phases.push(("static build", t.elapsed()));

    let t = Instant::now();
    let modules = kernel.modules(&MODULES)?;
    let image = build_image(
        &cache,
        &kernel,
        &built,
        &modules,
        args.guest_script.as_deref(),
    )?;
    phases.push(("initramfs", t.elapsed()));

    let t = Instant::now();
    let accel = match accel {
        Some(a) => a,
        None => choose_accel(&qemu, &cache, &kernel, &image, &args.memory)?,
    };
    phases.push(("accelerator choice", t.elapsed()));

    let mut cmdline = vec![
        format!("cwvm.tests={}", args.tests.join(",")),
        format!("cwvm.timeout={}", args.binary_timeout_mins * 60),
    ];
    if let Some(f) = &args.filter {
        cmdline.push(format!("cwvm.filter={f}"));
    }
    if !args.skip.is_empty() {
        cmdline.push(format!("cwvm.skip={}", args.skip.join(",")));
    }
    let log_path = kernel.cache.join("console.log");
    let t = Instant::now();
    let console = boot(
        &qemu,
        accel,
        &kernel,
        &image,
        &args.memory,
        &cmdline,
        Duration::from_secs(args.timeout_mins * 60),
        Some(&log_path),
        None,
    )?;
    phases.push(("guest", t.elapsed()));

    let outcomes = test_outcomes(&console.text);
    println!();
    println!(
        "vm-test: kernel {} ({}), {} accelerator",
        kernel.release,
        kernel.package,
        accel.name()
    );
    for suite in &args.tests {
        let of: Vec<&Outcome> = outcomes.iter().filter(|o| &o.binary == suite).collect();
        let passed = of.iter().filter(|o| o.result == "ok").count();
        let failed: Vec<&str> = of
            .iter()
            .filter(|o| o.result == "FAILED")
            .map(|o| o.test.as_str())
            .collect();
        println!("  {suite}: {passed} passed, {} failed", failed.len());
        for f in failed {
            println!("    FAILED {f}");
        }
    }
    let check = check_output(&console.text);
    if !check.is_empty() {
        println!("  connwatch check:");
        for line in check {
            println!("    {line}");
        }
    }
    for (what, took) in &phases {
        println!("  time: {what:<18} {took:.1?}");
    }
    println!("  time: {:<18} {:.1?}", "total", began.elapsed());
    println!("  console log: {}", log_path.display());
    let verdict = closing_line(&console.text);
    match (verdict, console.timed_out) {
        (_, true) => {
            println!(
                "vm-test: FAILED: the guest did not finish within {} minutes",
                args.timeout_mins
            );
            Ok(ExitCode::FAILURE)
        }
        (None, false) => {
            println!(
                "vm-test: FAILED: the guest ended without its closing line (see the console above)"
            );
            Ok(ExitCode::FAILURE)
        }
        (Some((p, f)), false) => {
            println!("vm-test: {p} passed, {f} failed");
            Ok(if f == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Host tools

/// The path of `tool`, installing Debian's `package` with apt-get if it is missing.
fn ensure_host_tool(tool: &str, package: &str, why: &str) -> Result<PathBuf> {
    if let Some(p) = toolchain::find_in_path(tool) {
        return Ok(p);
    }
    if !toolchain::is_root() || toolchain::find_in_path("apt-get").is_none() {
        bail!("{tool} is missing ({why}): run `apt-get install -y --no-install-recommends {package}` as root");
    }
    eprintln!("xtask: installing Debian package {package} ({tool}, {why})");
    apt(&["install", "-y", "--no-install-recommends", package], true)?;
    toolchain::find_in_path(tool)
        .with_context(|| format!("installed {package} but {tool} is still not in PATH"))
}

/// Runs apt-get with `args`; `update_first` runs `apt-get update` before.
fn apt(args: &[&str], update_first: bool) -> Result<()> {
    if update_first {
        run_quiet(Command::new("apt-get").arg("update"), "apt-get update")?;
    }
    run_quiet(
        Command::new("apt-get").args(args),
        &format!("apt-get {}", args.join(" ")),
    )
}

fn run_quiet(cmd: &mut Command, what: &str) -> Result<()> {
    env::scrub(cmd);
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    env::scrub(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Downloads a Debian package into `<cache>/debs` (once) and unpacks it into
/// `<cache>/<subdir>/<package>` (once); returns that directory.
fn fetch_deb(cache: &Path, subdir: &str, package: &str) -> Result<PathBuf> {
    let dir = cache.join(subdir).join(package);
    if dir.join(".unpacked").exists() {
        return Ok(dir);
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let find = || -> Result<Option<PathBuf>> {
        Ok(std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&format!("{package}_")) && f.ends_with(".deb"))
            }))
    };
    let deb = match find()? {
        Some(d) => d,
        None => {
            eprintln!(
                "xtask: apt-get download {package} (into {})",
                debs.display()
            );
            let mut cmd = Command::new("apt-get");
            cmd.args(["download", package]).current_dir(&debs);
            if run_quiet(&mut cmd, &format!("apt-get download {package}")).is_err() {
                // The package lists may be missing or stale on a fresh machine.
                apt(&["update"], false)?;
                let mut cmd = Command::new("apt-get");
                cmd.args(["download", package]).current_dir(&debs);
                run_quiet(&mut cmd, &format!("apt-get download {package}"))?;
            }
            find()?.with_context(|| format!("apt-get download {package} left no .deb"))?
        }
    };
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    std::fs::write(dir.join(".unpacked"), deb.to_string_lossy().as_bytes())?;
    Ok(dir)
}

// ---------------------------------------------------------------------------
// The kernel

struct Kernel {
    package: String,
    /// `uname -r` of the kernel.
    release: String,
    /// The unpacked package.
    root: PathBuf,
    /// Our files for this kernel: decompressed modules, image, console log.
    cache: PathBuf,
    vmlinuz: PathBuf,
}

impl Kernel {
    fn prepare(cache: &Path, wanted: &str) -> Result<Kernel> {
        let names = |update: bool| -> Result<Vec<String>> {
            if update {
                apt(&["update"], false)?;
            }
            let text = output(Command::new("apt-cache").args([
                "search",
                "--names-only",
                "^linux-image-.*-cloud-amd64$",
            ]))?;
            Ok(text
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(String::from)
                .collect())
        };
        let package = match pick_kernel(wanted, &names(false)?) {
            Some(p) => p,
            None => pick_kernel(wanted, &names(true)?).with_context(|| {
                format!("no Debian cloud kernel package for {wanted:?} (apt-cache search linux-image | grep cloud-amd64)")
            })?,
        };
        let root = fetch_deb(cache, "kernels", &package)?;
        let modules = root.join("lib/modules");
        let release = std::fs::read_dir(&modules)
            .with_context(|| format!("{}", modules.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .next()
            .with_context(|| format!("{} is empty", modules.display()))?;
        let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
        if !vmlinuz.is_file() {
            bail!("{} is missing from {package}", vmlinuz.display());
        }
        let cache = cache.join("guest").join(&package);
        std::fs::create_dir_all(&cache)?;
        Ok(Kernel {
            package,
            release,
            root,
            cache,
            vmlinuz,
        })
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// The decompressed module files to load for `wanted`, in load order.
    fn modules(&self, wanted: &[&str]) -> Result<Vec<PathBuf>> {
        let mdir = self.modules_dir();
        let builtin = std::fs::read_to_string(mdir.join("modules.builtin"))
            .map(|t| kmod::parse_builtin(&t))
            .unwrap_or_default();
        let out_dir = self.cache.join("modules");
        std::fs::create_dir_all(&out_dir)?;
        let deps = match std::fs::read_to_string(mdir.join("modules.dep")) {
            Ok(text) => kmod::parse_modules_dep(&text)?,
            Err(_) => self.deps_from_modinfo(wanted, &builtin, &out_dir)?,
        };
        let order = kmod::load_order(wanted, &deps, &builtin)?;
        let mut files = Vec::new();
        for name in order {
            let out = out_dir.join(format!("{name}.ko"));
            if !out.is_file() {
                let src = mdir.join(&deps[&name].path);
                std::fs::write(&out, decompress(&src)?)?;
            }
            files.push(out);
        }
        Ok(files)
    }

    /// The package has no modules.dep: read `depends=` from the modules reachable
    /// from `wanted`, decompressing each into `out_dir`, and keep the result as a
    /// modules.dep beside them.
    fn deps_from_modinfo(
        &self,
        wanted: &[&str],
        builtin: &[String],
        out_dir: &Path,
    ) -> Result<BTreeMap<String, kmod::DepEntry>> {
        let dep_file = self.cache.join("modules.dep");
        if let Ok(text) = std::fs::read_to_string(&dep_file) {
            let deps = kmod::parse_modules_dep(&text)?;
            if kmod::load_order(wanted, &deps, builtin).is_ok() {
                return Ok(deps);
            }
        }
        let mdir = self.modules_dir();
        let index = kmod::index(&mdir)?;
        let mut deps = BTreeMap::new();
        let mut todo: Vec<String> = wanted.iter().map(|w| w.replace('-', "_")).collect();
        while let Some(name) = todo.pop() {
            if deps.contains_key(&name) || builtin.contains(&name) {
                continue;
            }
            let Some(rel) = index.get(&name) else {
                continue; // load_order names it
            };
            let bytes = decompress(&mdir.join(rel))?;
            let needs = kmod::depends(
                &kmod::modinfo(&bytes).with_context(|| format!("{}", rel.display()))?,
            );
            std::fs::write(out_dir.join(format!("{name}.ko")), &bytes)?;
            todo.extend(needs.iter().cloned());
            deps.insert(
                name,
                kmod::DepEntry {
                    path: rel.to_string_lossy().into_owned(),
                    deps: needs,
                },
            );
        }
        std::fs::write(&dep_file, kmod::format_modules_dep(&deps))?;
        Ok(deps)
    }
}

/// The newest `linux-image-<version>-cloud-amd64` among `names` whose version is
/// `wanted` or of the series `wanted` ("6.1" takes 6.1.0-57, not 6.12.x).
fn pick_kernel(wanted: &str, names: &[String]) -> Option<String> {
    let version = |n: &str| -> Option<String> {
        Some(
            n.strip_prefix("linux-image-")?
                .strip_suffix("-cloud-amd64")?
                .to_string(),
        )
    };
    let numbers = |v: &str| -> Vec<u64> {
        v.split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    let exact = names.iter().find(|n| version(n).as_deref() == Some(wanted));
    if let Some(n) = exact {
        // The meta-package "linux-image-6.12-cloud-amd64" is not a kernel.
        if version(n).is_some_and(|v| v.contains(['-', '+'])) {
            return Some(n.clone());
        }
    }
    names
        .iter()
        .filter_map(|n| Some((n, version(n)?)))
        .filter(|(_, v)| {
            v.strip_prefix(wanted)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
                && v.contains(['-', '+'])
        })
        .max_by_key(|(_, v)| numbers(v))
        .map(|(n, _)| n.clone())
}

/// A module file's bytes, decompressed as its name says.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".ko.zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".ko.gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("{name}")),
        Some((tool, package)) => {
            let bin = ensure_host_tool(tool, package, "to decompress the kernel's modules")?;
            let mut cmd = Command::new(bin);
            cmd.arg("-dc").arg(path).stdin(Stdio::null());
            let out = cmd.output().with_context(|| format!("cannot run {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed ({})", out.status);
            }
            Ok(out.stdout)
        }
    }
}

// ---------------------------------------------------------------------------
// The static binaries

struct Built {
    init: PathBuf,
    /// CARGO_BIN_EXE_connwatch of the test binaries: where the guest must have it.
    connwatch: PathBuf,
    tests: BTreeMap<String, PathBuf>,
}

fn static_cargo(args: &[&str]) -> Command {
    let mut cmd = cargo_cmd(args);
    for var in ["RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    // Static glibc (static-pie); no debug info, which would make the image five
    // times larger. With --target, build scripts and proc macros are unaffected.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Ctarget-feature=+crt-static", "-Cstrip=debuginfo"].join("\x1f"),
    );
    cmd
}

fn build_static(tests: &[String]) -> Result<Built> {
    let mut cmd = static_cargo(&[
        "build",
        "-p",
        "xtask",
        "--bin",
        "vm-init",
        "--target",
        HOST_TRIPLE,
        "--message-format=json-render-diagnostics",
    ]);
    let init = artifacts(&mut cmd)?
        .into_iter()
        .find(|a| a.name == "vm-init")
        .context("cargo build produced no vm-init")?
        .path;

    let mut args = vec![
        "test",
        "-p",
        "connwatch",
        "--no-run",
        "--profile",
        "vm",
        "--target",
        HOST_TRIPLE,
        "--message-format=json-render-diagnostics",
    ];
    for t in tests {
        args.extend(["--test", t]);
    }
    let found = artifacts(&mut static_cargo(&args))?;
    let connwatch = found
        .iter()
        .find(|a| a.name == "connwatch" && a.kind == "bin" && !a.test)
        .context("cargo test --no-run built no connwatch binary")?
        .path
        .clone();
    let mut out = BTreeMap::new();
    for t in tests {
        let a = found
            .iter()
            .find(|a| &a.name == t && a.kind == "test")
            .with_context(|| format!("cargo test --no-run built no {t}"))?;
        out.insert(t.clone(), a.path.clone());
    }
    Ok(Built {
        init,
        connwatch,
        tests: out,
    })
}

struct Artifact {
    name: String,
    kind: String,
    test: bool,
    path: PathBuf,
}

/// Runs a cargo build with JSON messages; returns the executables it reports.
fn artifacts(cmd: &mut Command) -> Result<Vec<Artifact>> {
    eprintln!("xtask: {}", show(cmd));
    let out = cmd
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .output()
        .context("cannot run cargo")?;
    if !out.status.success() {
        bail!("{} failed ({})", show(cmd), out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        found.push(Artifact {
            name: msg["target"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            kind: msg["target"]["kind"][0]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            test: msg["profile"]["test"].as_bool().unwrap_or(false),
            path: PathBuf::from(exe),
        });
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// The image

fn build_image(
    cache: &Path,
    kernel: &Kernel,
    built: &Built,
    modules: &[PathBuf],
    script: Option<&Path>,
) -> Result<PathBuf> {
    let mut a = Archive::new();
    if let Some(s) = script {
        let s = s
            .canonicalize()
            .with_context(|| format!("--guest-script {}", s.display()))?;
        a.add(
            "/vm/script.sh",
            Entry::File {
                source: s,
                mode: 0o755,
            },
        );
    }
    let file = |source: &Path, mode: u32| Entry::File {
        source: source.to_path_buf(),
        mode,
    };
    let data = |text: &str, mode: u32| Entry::Data {
        bytes: text.as_bytes().to_vec(),
        mode,
    };
    a.add("/init", file(&built.init, 0o755));
    a.add(
        "/dev/console",
        Entry::CharDev {
            major: 5,
            minor: 1,
            mode: 0o600,
        },
    );
    for dir in ["/proc", "/sys", "/run", "/root", "/dev/pts"] {
        a.add(dir, Entry::Dir { mode: 0o755 });
    }
    a.add("/tmp", Entry::Dir { mode: 0o1777 });
    a.add(&built.connwatch, file(&built.connwatch, 0o755));
    a.add(
        "/vm/connwatch",
        Entry::Symlink {
            target: built.connwatch.clone(),
        },
    );
    for (name, path) in &built.tests {
        a.add(format!("/vm/tests/{name}"), file(path, 0o755));
    }
    let mut order = String::new();
    for m in modules {
        let name = m.file_name().context("module file name")?.to_string_lossy();
        let at = format!("/vm/modules/{name}");
        order.push_str(&at);
        order.push('\n');
        a.add(&at, file(m, 0o644));
    }
    a.add("/vm/modules.order", data(&order, 0o644));
    a.add(
        "/etc/passwd",
        data(
            "root:x:0:0:root:/root:/bin/bash\nman:x:6:12:man:/var/cache/man:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            0o644,
        ),
    );
    a.add(
        "/etc/group",
        data("root:x:0:\nman:x:12:\nnogroup:x:65534:\n", 0o644),
    );
    a.add(
        "/etc/hosts",
        data("127.0.0.1 localhost\n::1 localhost\n", 0o644),
    );
    // Test data read at run time through CARGO_MANIFEST_DIR (connwatch/../dist).
    let root = workspace_root();
    a.add(root.join("connwatch"), Entry::Dir { mode: 0o755 });
    if let Ok(rd) = std::fs::read_dir(root.join("dist")) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                a.add(e.path(), file(&e.path(), 0o644));
            }
        }
    }
    let mut missing = add_tools(&mut a, cache)?;
    for path in GUEST_FILES {
        if !add_tree(&mut a, Path::new(path))? {
            missing.push(path.to_string());
        }
    }
    if !missing.is_empty() {
        eprintln!(
            "xtask: not in the guest (tests that run them will fail): {}",
            missing.join(", ")
        );
    }
    for t in TERMINFO {
        let first = t.chars().next().unwrap_or('x');
        for dir in ["/etc/terminfo", "/lib/terminfo", "/usr/share/terminfo"] {
            let p = Path::new(dir).join(first.to_string()).join(t);
            if p.is_file() {
                a.add(&p, file(&p, 0o644));
                break;
            }
        }
    }

    let image = kernel.cache.join("initramfs.cpio");
    let manifest_path = kernel.cache.join("initramfs.inputs");
    let manifest = manifest(&a)?;
    if image.is_file() && std::fs::read_to_string(&manifest_path).ok().as_deref() == Some(&manifest)
    {
        eprintln!("xtask: initramfs unchanged: {}", image.display());
        return Ok(image);
    }
    let tmp = image.with_extension("partial");
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        a.write_to(&mut out)
            .with_context(|| format!("writing {}", tmp.display()))?;
        out.flush()?;
    }
    std::fs::rename(&tmp, &image)?;
    std::fs::write(&manifest_path, manifest)?;
    let size = std::fs::metadata(&image)?.len();
    eprintln!("xtask: wrote {} ({} MiB)", image.display(), size >> 20);
    Ok(image)
}

/// What the image is made of, with the size and mtime of each source file: the
/// image is rewritten only when this changes.
fn manifest(a: &Archive) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let mut out = String::new();
    for (path, e) in a.entries() {
        let line = match e {
            Entry::File { source, mode } => {
                let m =
                    std::fs::metadata(source).with_context(|| format!("{}", source.display()))?;
                let mtime = m
                    .modified()?
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                format!("file {mode:o} {} {} {mtime}", source.display(), m.len())
            }
            Entry::Data { bytes, mode } => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                format!("data {mode:o} {} {:x}", bytes.len(), h.finish())
            }
            other => format!("{other:?}"),
        };
        out.push_str(&format!("{} {line}\n", path.display()));
    }
    Ok(out)
}

/// Adds the programs the tests run, with their libraries; returns those it
/// could not find.
fn add_tools(a: &mut Archive, cache: &Path) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (tool, package) in GUEST_TOOLS {
        let (source, at) = match toolchain::find_in_path(tool) {
            Some(p) => (p.clone(), p),
            None => match tool_from_deb(cache, tool, package) {
                Ok(found) => found,
                Err(e) => {
                    eprintln!("xtask: {tool}: {e:#}");
                    missing.push(format!("{tool} ({package})"));
                    continue;
                }
            },
        };
        let libs = match output(Command::new("ldd").arg(&source)) {
            Ok(text) => parse_ldd(&text),
            // "not a dynamic executable": a static program.
            Err(_) => Ok(Vec::new()),
        };
        match libs {
            Ok(libs) => {
                a.add(
                    &at,
                    Entry::File {
                        source,
                        mode: 0o755,
                    },
                );
                for lib in libs {
                    if !a.contains(&lib) {
                        a.add(
                            &lib,
                            Entry::File {
                                source: lib.clone(),
                                mode: 0o755,
                            },
                        );
                    }
                }
            }
            Err(not_found) => {
                eprintln!(
                    "xtask: {tool}: libraries not found on this host: {}",
                    not_found.join(", ")
                );
                missing.push(format!("{tool} ({package})"));
            }
        }
    }
    // Programs that run /bin/sh, and the unit's /bin/kill, on a merged-/usr layout.
    for (link, target) in [
        ("/bin", "usr/bin"),
        ("/sbin", "usr/sbin"),
        ("/lib", "usr/lib"),
        ("/lib64", "usr/lib64"),
    ] {
        if Path::new(link).is_symlink() && !a.contains(link) {
            a.add(
                link,
                Entry::Symlink {
                    target: target.into(),
                },
            );
        }
    }
    if !a.contains("/usr/bin/sh") && a.contains("/usr/bin/bash") {
        a.add(
            "/usr/bin/sh",
            Entry::Symlink {
                target: "bash".into(),
            },
        );
    }
    Ok(missing)
}

/// Adds `path` from the host, a directory with all it holds (symbolic links as
/// links); false if the host has no such path.
fn add_tree(a: &mut Archive, path: &Path) -> Result<bool> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(false);
    };
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path)?;
        a.add(path, Entry::Symlink { target });
    } else if meta.is_dir() {
        a.add(path, Entry::Dir { mode: 0o755 });
        for e in std::fs::read_dir(path)? {
            add_tree(a, &e?.path())?;
        }
    } else if meta.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        a.add(
            path,
            Entry::File {
                source: path.to_path_buf(),
                mode,
            },
        );
    }
    Ok(true)
}

/// A program the host lacks, from its Debian package: (file, path in the guest).
fn tool_from_deb(cache: &Path, tool: &str, package: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = fetch_deb(cache, "packages", package)?;
    for sub in ["usr/bin", "usr/sbin", "bin", "sbin"] {
        let p = dir.join(sub).join(tool);
        if p.is_file() {
            return Ok((p, Path::new("/").join(sub).join(tool)));
        }
    }
    bail!("{package} has no {tool}")
}

/// The library files `ldd` lists (the loader included), or the names it could
/// not find.
fn parse_ldd(text: &str) -> std::result::Result<Vec<PathBuf>, Vec<String>> {
    let mut libs = Vec::new();
    let mut missing = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    missing.push(name.trim().to_string());
                    continue;
                }
                rest.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if missing.is_empty() {
        Ok(libs)
    } else {
        Err(missing)
    }
}

// ---------------------------------------------------------------------------
// qemu

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// KVM if this host has it and a short probe boot with it works; else TCG. The
/// probe's answer is kept in `<cache>/accel`.
fn choose_accel(
    qemu: &Path,
    cache: &Path,
    kernel: &Kernel,
    image: &Path,
    memory: &str,
) -> Result<Accel> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm_dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_dev || !virt {
        let why = if !kvm_dev {
            "/dev/kvm cannot be opened"
        } else {
            "no vmx or svm in /proc/cpuinfo"
        };
        eprintln!("xtask: accelerator tcg ({why}; TCG is about ten times slower than KVM)");
        return Ok(Accel::Tcg);
    }
    let remembered = cache.join("accel");
    if let Ok(text) = std::fs::read_to_string(&remembered) {
        match text.trim() {
            "kvm" => return Ok(Accel::Kvm),
            "tcg" => {
                eprintln!(
                    "xtask: accelerator tcg (a KVM probe failed before; remove {} to probe again)",
                    remembered.display()
                );
                return Ok(Accel::Tcg);
            }
            _ => {}
        }
    }
    eprintln!("xtask: probing KVM with a 60 s boot");
    let console = boot(
        qemu,
        Accel::Kvm,
        kernel,
        image,
        memory,
        &["cwvm.probe=1".to_string()],
        Duration::from_secs(60),
        None,
        Some("cwvm: probe ok"),
    )?;
    let works = console.text.contains("cwvm: probe ok");
    let accel = if works { Accel::Kvm } else { Accel::Tcg };
    eprintln!(
        "xtask: accelerator {} (the KVM probe {})",
        accel.name(),
        if works {
            "booted"
        } else if console.timed_out {
            "hung"
        } else {
            "failed"
        }
    );
    std::fs::write(&remembered, accel.name())?;
    Ok(accel)
}

struct Console {
    text: String,
    timed_out: bool,
}

/// Boots the kernel with the image; prints the serial console as it comes (and
/// keeps it in `log`). Stops at `limit`, or as soon as a line contains `until`.
#[allow(clippy::too_many_arguments)]
fn boot(
    qemu: &Path,
    accel: Accel,
    kernel: &Kernel,
    image: &Path,
    memory: &str,
    cmdline: &[String],
    limit: Duration,
    log: Option<&Path>,
    until: Option<&str>,
) -> Result<Console> {
    let append = format!("console=ttyS0 panic=-1 quiet {}", cmdline.join(" "));
    let mut cmd = Command::new(qemu);
    env::scrub(&mut cmd);
    cmd.args(accel.args())
        .args([
            "-m",
            memory,
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(image)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("xtask: {}", show(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", qemu.display()))?;
    let stdout = child.stdout.take().context("qemu's output")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(|l| l.ok()) {
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = match log {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("{}", p.display()))?),
        None => None,
    };
    let deadline = Instant::now() + limit;
    let mut text = String::new();
    let mut timed_out = false;
    let mut stdout = std::io::stdout();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                let _ = writeln!(stdout, "{line}");
                if let Some(f) = log.as_mut() {
                    writeln!(f, "{line}")?;
                }
                let stop = until.is_some_and(|u| line.contains(u));
                text.push_str(&line);
                text.push('\n');
                if stop {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    timed_out = true;
                    break;
                }
            }
        }
    }
    if timed_out || until.is_some() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let _ = reader.join();
    if !timed_out && until.is_none() && !status.success() {
        eprintln!("xtask: qemu exited with {status}");
    }
    Ok(Console { text, timed_out })
}

// ---------------------------------------------------------------------------
// The guest's output

/// The guest's closing `N passed, N failed` line (the last one alone on its line).
fn closing_line(console: &str) -> Option<(u64, u64)> {
    console.lines().rev().find_map(|line| {
        let (p, rest) = line.trim().split_once(" passed, ")?;
        let f = rest.strip_suffix(" failed")?;
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        Some((num(p)?, num(f)?))
    })
}

/// What `connwatch check` printed in the guest, before the tests.
fn check_output(console: &str) -> Vec<&str> {
    console
        .lines()
        .skip_while(|l| l.trim() != "cwvm: connwatch check")
        .skip(1)
        .take_while(|l| !l.starts_with("cwvm: connwatch check exited"))
        .map(|l| l.trim_end_matches('\r'))
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    binary: String,
    test: String,
    result: String,
}

/// Each `test NAME ... ok|FAILED|ignored` line, with the binary of the last
/// `cwvm: running BINARY` before it.
fn test_outcomes(console: &str) -> Vec<Outcome> {
    let mut binary = String::new();
    let mut out = Vec::new();
    for line in console.lines() {
        let line = line.trim();
        if let Some(b) = line.strip_prefix("cwvm: running ") {
            binary = b.trim().to_string();
            continue;
        }
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((test, result)) = rest.rsplit_once(" ... ") else {
            continue;
        };
        let result = result.trim();
        let result = if result.starts_with("ignored") {
            "ignored"
        } else {
            result
        };
        if ["ok", "FAILED", "ignored"].contains(&result) {
            out.push(Outcome {
                binary: binary.clone(),
                test: test.to_string(),
                result: result.to_string(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_line_is_the_last_one_alone_on_its_line() {
        let console = "\
cwvm: running e2e
test result: ok. 12 passed; 0 failed; 0 ignored
cwvm: finished in 300s

14 passed, 2 failed\r
[  301.2] reboot: Power down
";
        assert_eq!(closing_line(console), Some((14, 2)));
        assert_eq!(closing_line("0 passed, 0 failed\n"), Some((0, 0)));
        assert_eq!(closing_line("  3 passed, 0 failed  \n"), Some((3, 0)));
        assert_eq!(
            closing_line("1 passed, 1 failed\nlater: 2 passed, 0 failed\n"),
            Some((1, 1))
        );
        assert_eq!(closing_line("test result: ok. 12 passed; 0 failed\n"), None);
        assert_eq!(
            closing_line("x passed, 0 failed\n2 passed, 0 failedd\n"),
            None
        );
        assert_eq!(closing_line(""), None);
    }

    #[test]
    fn the_check_is_what_comes_between_its_two_lines() {
        let console = "\
cwvm: lo is up
cwvm: connwatch check
ok   privileges     running as root\r
ok   BTF            /sys/kernel/btf/vmlinux present
cwvm: connwatch check exited with exit status: 0
cwvm: running e2e
";
        assert_eq!(
            check_output(console),
            [
                "ok   privileges     running as root",
                "ok   BTF            /sys/kernel/btf/vmlinux present"
            ]
        );
        assert!(check_output("cwvm: running e2e\n").is_empty());
    }

    #[test]
    fn outcomes_carry_their_binary() {
        let console = "\
cwvm: running e2e
running 3 tests
test max_age_works_on_ipv6 ... ok
test a_reused_tuple_survives ... FAILED
test slow ... ignored, needs a day
cwvm: running policies
test idle_works_on_ipv6 ... ok
test result: FAILED. 1 passed; 1 failed; 1 ignored
";
        let o = test_outcomes(console);
        let short: Vec<(&str, &str, &str)> = o
            .iter()
            .map(|o| (o.binary.as_str(), o.test.as_str(), o.result.as_str()))
            .collect();
        assert_eq!(
            short,
            [
                ("e2e", "max_age_works_on_ipv6", "ok"),
                ("e2e", "a_reused_tuple_survives", "FAILED"),
                ("e2e", "slow", "ignored"),
                ("policies", "idle_works_on_ipv6", "ok"),
            ]
        );
    }

    #[test]
    fn picks_the_newest_kernel_of_a_series() {
        let names: Vec<String> = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-48-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12.99+deb12-cloud-amd64",
            "linux-image-6.12-cloud-amd64",
            "linux-image-cloud-amd64",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            pick_kernel("6.1", &names).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(
            pick_kernel("6.12", &names).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(
            pick_kernel("6.1.0-48", &names).as_deref(),
            Some("linux-image-6.1.0-48-cloud-amd64")
        );
        assert_eq!(
            pick_kernel("6.12.99+deb12", &names).as_deref(),
            Some("linux-image-6.12.99+deb12-cloud-amd64")
        );
        assert_eq!(pick_kernel("5.10", &names), None);
        // A major alone takes the newest of all.
        assert_eq!(
            pick_kernel("6", &names).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(pick_kernel("6.2", &names), None);
    }

    #[test]
    fn ldd_output() {
        let text = "\
\tlinux-vdso.so.1 (0x00007ffd5e3f1000)
\tlibtinfo.so.6 => /lib/x86_64-linux-gnu/libtinfo.so.6 (0x00007f57291e5000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5728eda000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f572932e000)
";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libtinfo.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let missing = "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        assert_eq!(parse_ldd(missing).unwrap_err(), ["libfoo.so.1"]);
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }
}
