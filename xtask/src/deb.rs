//! `cargo xtask deb`: the Debian package, `target/debian/connwatch_<version>_amd64.deb`.
//!
//! Built with `dpkg-deb` from a staged tree rather than with cargo-deb: dpkg-deb is part
//! of every Debian system (cargo-deb would be one more `cargo install` from crates.io on
//! each fresh machine and in CI), and what the package needs beyond copying files (man
//! pages and completions generated from the clap definitions, maintainer scripts that
//! run `connwatch cleanup`) is code here either way. `dpkg-shlibdeps` (dpkg-dev) works
//! out the shared-library dependencies, as debhelper would.
//!
//! What goes where:
//!
//! | file | from |
//! | --- | --- |
//! | `/usr/sbin/connwatch` | the release build, the eBPF object embedded, stripped |
//! | `/lib/systemd/system/connwatch.service` | `dist/connwatch.service` (not enabled, not started) |
//! | `/etc/connwatch/connwatch.toml` (conffile, 0600) | `dist/connwatch.toml`, every setting commented |
//! | `/usr/share/man/man8/connwatch*.8.gz` | `connwatch/examples/manpages.rs` (clap_mangen) |
//! | bash, zsh, fish completions | the built binary's `connwatch completions SHELL` |
//! | `/usr/share/doc/connwatch/{copyright,changelog.gz}` | `dist/debian/` |
//! | `DEBIAN/{postinst,prerm,postrm}` | `dist/debian/` |

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::{cargo_cmd, ok, target_dir, toolchain, workspace_root};

pub const PACKAGE: &str = "connwatch";
/// The workspace's version (the xtask shares it), as the package's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const ARCH: &str = "amd64";
/// Where the binary goes; the unit's ExecStart must name it.
pub const BINARY: &str = "/usr/sbin/connwatch";
pub const CONFFILE: &str = "/etc/connwatch/connwatch.toml";
pub const UNIT: &str = "/lib/systemd/system/connwatch.service";
/// Where Debian's shells look for completions, by shell.
pub const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "/usr/share/bash-completion/completions/connwatch"),
    ("zsh", "/usr/share/zsh/vendor-completions/_connwatch"),
    (
        "fish",
        "/usr/share/fish/vendor_completions.d/connwatch.fish",
    ),
];
const MAINTAINER: &str =
    "connwatch maintainers <maintainers@users.noreply.b-seed-c8e4b777.example>";

/// `target/debian/connwatch_<version>_amd64.deb`.
pub fn deb_path() -> PathBuf {
    target_dir()
        .join("debian")
        .join(format!("{PACKAGE}_{VERSION}_{ARCH}.deb"))
}

/// Builds the eBPF object, the release binary and the package; returns its path.
pub fn build() -> Result<PathBuf> {
    ensure_tools(&[("dpkg-deb", "dpkg"), ("dpkg-shlibdeps", "dpkg-dev")])?;
    crate::build(true)?;
    let bin = target_dir().join("release").join("connwatch");
    let dist = workspace_root().join("dist");
    check_changelog(&dist.join("debian").join("changelog"))?;

    let out = target_dir().join("debian");
    let stage = out.join(format!("{PACKAGE}_{VERSION}_{ARCH}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage)?;
    let at = |path: &str| stage.join(path.trim_start_matches('/'));

    // The binary, stripped (the eBPF object is data in it and stays).
    let sbin = at(BINARY);
    install(&bin, &sbin, 0o755)?;
    ok(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(&sbin),
        "strip",
    )?;

    // The unit, whose ExecStart must be the packaged binary.
    let unit = fs::read_to_string(dist.join("connwatch.service"))?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("dist/connwatch.service has no ExecStart=")?;
    ensure!(
        exec.split_whitespace().next() == Some(BINARY),
        "dist/connwatch.service runs {exec:?}, not {BINARY}: the package installs the binary there"
    );
    ensure!(
        exec.contains(CONFFILE),
        "dist/connwatch.service does not read {CONFFILE}"
    );
    write(&at(UNIT), unit.as_bytes(), 0o644)?;

    // The default policy: a conffile only root reads.
    install(&dist.join("connwatch.toml"), &at(CONFFILE), 0o600)?;
    fs::set_permissions(
        at(CONFFILE).parent().unwrap(),
        fs::Permissions::from_mode(0o755),
    )?;

    // Man pages, from the clap definitions.
    let man_src = out.join("man");
    if man_src.exists() {
        fs::remove_dir_all(&man_src)?;
    }
    let mut cmd = cargo_cmd([
        "run",
        "--quiet",
        "--release",
        "-p",
        "connwatch",
        "--example",
        "manpages",
        "--",
    ]);
    cmd.arg(&man_src);
    ok(&mut cmd, "generating the man pages")?;
    let man8 = at("/usr/share/man/man8");
    let mut pages = 0;
    for entry in fs::read_dir(&man_src)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "8") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            write(
                &man8.join(format!("{name}.gz")),
                &gzip(&fs::read(&path)?)?,
                0o644,
            )?;
            pages += 1;
        }
    }
    ensure!(
        man8.join("connwatch.8.gz").exists() && pages > 1,
        "the man pages were not generated"
    );

    // Completions, from the binary being packaged.
    for (shell, path) in COMPLETIONS {
        let out = Command::new(&bin)
            .args(["completions", shell])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} completions {shell}", bin.display()))?;
        ensure!(
            out.status.success() && !out.stdout.is_empty(),
            "connwatch completions {shell} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        write(&at(path), &out.stdout, 0o644)?;
    }

    // Documentation Debian requires.
    let doc = at("/usr/share/doc/connwatch");
    install(
        &dist.join("debian/copyright"),
        &doc.join("copyright"),
        0o644,
    )?;
    let changelog = fs::read(dist.join("debian/changelog"))?;
    write(&doc.join("changelog.gz"), &gzip(&changelog)?, 0o644)?;

    // The control area.
    let control = stage.join("DEBIAN");
    fs::create_dir_all(&control)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &dist.join("debian").join(script),
            &control.join(script),
            0o755,
        )?;
    }
    write(
        &control.join("conffiles"),
        format!("{CONFFILE}\n").as_bytes(),
        0o644,
    )?;
    let depends = shlib_depends(&stage, &sbin)?;
    let installed_kib = installed_size(&stage)?;
    write(
        &control.join("control"),
        control_file(&depends, installed_kib).as_bytes(),
        0o644,
    )?;
    let sums = md5sums(&stage)?;
    write(&control.join("md5sums"), sums.as_bytes(), 0o644)?;
    dirs_0755(&stage)?;

    let deb = deb_path();
    let _ = fs::remove_file(&deb);
    ok(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
        "dpkg-deb --build",
    )?;
    println!("package: {}", deb.display());
    Ok(deb)
}

fn control_file(depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}
Version: {VERSION}
Architecture: {ARCH}
Maintainer: {MAINTAINER}
Installed-Size: {installed_kib}
Depends: {depends}
Section: net
Priority: optional
Description: watch every TCP socket through eBPF, destroy those a policy chooses
 connwatch follows every TCP socket of the host and of its containers (a
 tracepoint on sock:inet_sock_set_state records each socket's birth, state
 and owner) and destroys, through sock_diag's SOCK_DESTROY, the connections
 a policy chooses: too old, idle too long, stuck in a closing state, from a
 blocked network, or over a per-address limit. Like a cron'd `ss -K`, without
 polling the socket table.
 .
 The package installs the daemon and its command line (list, top, sweep,
 explain) and a hardened systemd unit, not enabled: a dry run of the default
 policy is harmless, but the operator chooses when to start it. The default
 policy in /etc/connwatch/connwatch.toml only logs what it would destroy.
"
    )
}

/// The `Depends` dpkg-shlibdeps works out for the binary.
fn shlib_depends(stage: &Path, bin: &Path) -> Result<String> {
    // dpkg-shlibdeps wants to run in a source tree: give it a minimal one.
    let tree = stage.with_extension("shlibdeps");
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("debian"))?;
    fs::write(
        tree.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let out = Command::new("dpkg-shlibdeps")
        .arg("-O")
        .arg(format!("-e{}", bin.display()))
        .current_dir(&tree)
        .stdin(Stdio::null())
        .output()
        .context("running dpkg-shlibdeps")?;
    fs::remove_dir_all(&tree)?;
    ensure!(
        out.status.success(),
        "dpkg-shlibdeps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let depends = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_string();
    ensure!(!depends.is_empty(), "dpkg-shlibdeps found no dependency");
    Ok(depends)
}

/// The top changelog entry must be this version: lintian and dpkg read it.
fn check_changelog(path: &Path) -> Result<()> {
    let text = fs::read_to_string(path)?;
    let first = text.lines().next().unwrap_or_default();
    let want = format!("{PACKAGE} ({VERSION}) ");
    ensure!(
        first.starts_with(&want),
        "{} starts with {first:?}: add an entry for {VERSION} (the workspace's version) first",
        path.display()
    );
    Ok(())
}

/// Installed-Size in KiB, as dpkg-gencontrol counts it: each file rounded up, each
/// directory one.
fn installed_size(stage: &Path) -> Result<u64> {
    let mut kib = 0;
    for (path, meta) in walk(stage)? {
        if path.starts_with(stage.join("DEBIAN")) {
            continue;
        }
        kib += if meta.is_dir() {
            1
        } else {
            meta.len().div_ceil(1024)
        };
    }
    Ok(kib)
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = walk(stage)?
        .into_iter()
        .filter(|(p, m)| m.is_file() && !p.starts_with(stage.join("DEBIAN")))
        .map(|(p, _)| p)
        .collect();
    files.sort();
    // Conffiles are not listed: dpkg keeps their sums itself.
    files.retain(|p| !p.starts_with(stage.join("etc")));
    let rel: Vec<PathBuf> = files
        .iter()
        .map(|p| p.strip_prefix(stage).unwrap().to_path_buf())
        .collect();
    let out = Command::new("md5sum")
        .args(&rel)
        .current_dir(stage)
        .output()
        .context("running md5sum")?;
    ensure!(out.status.success(), "md5sum failed");
    Ok(String::from_utf8(out.stdout)?)
}

fn dirs_0755(stage: &Path) -> Result<()> {
    for (path, meta) in walk(stage)? {
        if meta.is_dir() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// Every path below `dir` (not `dir` itself), directories included.
fn walk(dir: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut all = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let meta = fs::symlink_metadata(entry.path())?;
            if meta.is_dir() {
                todo.push(entry.path());
            }
            all.push((entry.path(), meta));
        }
    }
    Ok(all)
}

/// gzip -9n: no name, no time stamp, as Debian's tools write it.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-9nc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running gzip")?;
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    writer.join().expect("gzip writer")?;
    ensure!(out.status.success(), "gzip failed");
    Ok(out.stdout)
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &data, mode)
}

fn write(to: &Path, data: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(to, data).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Installs the Debian packages of the tools that are missing (as root), or says how.
pub fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| toolchain::find_in_path(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !toolchain::is_root() || toolchain::find_in_path("apt-get").is_none() {
        bail!(
            "missing tools: run `apt-get install -y --no-install-recommends {}` as root",
            missing.join(" ")
        );
    }
    toolchain::apt_install_no_recommends(&missing)
}

#[cfg(test)]
mod tests {
    //! The package on this machine, for real.

    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    /// What the test runs besides the package: lintian and man check it, bpftool
    /// finds the programs it leaves attached.
    const TOOLS: [(&str, &str); 3] = [
        ("lintian", "lintian"),
        ("man", "man-db"),
        ("bpftool", "bpftool"),
    ];

    fn run(cmd: &mut Command) -> (bool, String) {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn must(cmd: &mut Command) -> String {
        let (ok, text) = run(cmd);
        assert!(ok, "{cmd:?} failed:\n{text}");
        text
    }

    /// Purges the package when the test ends, passed or not: the machine is left as
    /// it was found.
    struct Purge;
    impl Drop for Purge {
        fn drop(&mut self) {
            let (_, text) = run(Command::new("dpkg").args(["--purge", PACKAGE]));
            eprintln!("dpkg --purge {PACKAGE}: {}", text.trim());
        }
    }

    /// The daemon suites' host-wide lock (tests/common/mod.rs `exclusive()`): held
    /// while the package's binary runs and while its prerm removes the pins.
    fn exclusive() -> std::fs::File {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::create("/tmp/connwatch-tests.lock").unwrap();
        // SAFETY: flock on a descriptor we own; released when the file closes.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
        file
    }

    /// Programs of connwatch's (by name) that no process holds: attached through pins.
    fn pinned_programs() -> Vec<String> {
        let text = must(Command::new("bpftool").args(["-j", "prog", "show"]));
        let progs: serde_json::Value = serde_json::from_str(&text).unwrap();
        progs
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                let name = p["name"].as_str().unwrap_or_default();
                !name.is_empty()
                    && "inet_sock_set_state".starts_with(name)
                    && p.get("pids").is_none()
            })
            .map(|p| format!("{} (id {})", p["name"], p["id"]))
            .collect()
    }

    /// Waits (up to 5 minutes) until no `connwatch run` holds the daemon's single-instance
    /// lock: one started by something that does not take the suites' lock (a benchmark,
    /// say) would refuse ours and keep its pins while the package's are checked.
    fn wait_for_no_daemon() {
        use std::os::fd::AsRawFd;
        let end = Instant::now() + Duration::from_secs(300);
        loop {
            let Ok(file) = std::fs::File::open("/run/connwatch.lock") else {
                return;
            };
            // SAFETY: flock on a descriptor we own; released when the file closes.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
                return;
            }
            assert!(
                Instant::now() < end,
                "another `connwatch run` held /run/connwatch.lock for 5 minutes"
            );
            eprintln!("waiting for another `connwatch run` to stop (it holds /run/connwatch.lock)");
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Starts the installed daemon (dry run of the installed default policy) and stops
    /// it once it watches: it leaves its programs attached through pins, as a stopped
    /// service does, for the removal to take away.
    fn run_installed_daemon() {
        wait_for_no_daemon();
        let mut child: Child = Command::new(BINARY)
            .args(["run", "--config", CONFFILE])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the installed connwatch runs");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("daemon: {line}");
                let _ = tx.send(line);
            }
        });
        let end = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let watching = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let done = line.contains("watching TCP sockets");
                    seen.push(line);
                    if done {
                        break true;
                    }
                }
                Err(_) if Instant::now() > end => break false,
                Err(_) => {
                    if let Ok(Some(_)) = child.try_wait() {
                        break false;
                    }
                }
            }
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = child.wait().unwrap();
        assert!(
            watching,
            "the installed daemon did not start watching with the installed policy ({st}):\n{}",
            seen.join("\n")
        );
    }

    /// Builds the package (`cargo xtask deb`), checks it with lintian (no errors), installs
    /// it on this machine with `dpkg -i`, runs the installed binary (`connwatch check`,
    /// the daemon on the installed default policy, `man -w connwatch`), checks where the
    /// unit and the completions are, removes it with `dpkg -r` and checks that nothing of
    /// connwatch stays pinned or attached, then purges it (also when the test fails).
    ///
    /// Root only, and real: it builds the eBPF object and the release binary (a few
    /// minutes in a fresh target dir, seconds after), installs lintian, man-db and
    /// bpftool with apt-get if they are missing, and takes the daemon suites' lock
    /// (/tmp/connwatch-tests.lock) while the package's binary runs. A connwatch package
    /// installed beforehand is refused rather than replaced.
    #[test]
    fn the_package_installs_runs_and_leaves_nothing_behind() {
        assert!(
            toolchain::is_root(),
            "this test installs a Debian package: run it as root"
        );
        let (installed, status) =
            run(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]));
        assert!(
            !(installed && status.contains("installed")),
            "a {PACKAGE} package is installed on this machine ({status}): this test would replace it"
        );
        ensure_tools(&TOOLS).expect("lintian, man-db and bpftool");
        let t = Instant::now();
        let deb = build().expect("cargo xtask deb");
        eprintln!("built {} in {:?}", deb.display(), t.elapsed());

        // lintian: no errors (warnings are fine; they are printed).
        let (_, text) = run(Command::new("lintian")
            .args(["--tag-display-limit", "0"])
            .arg(&deb));
        eprintln!("lintian:\n{text}");
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
        assert!(errors.is_empty(), "lintian errors: {errors:#?}");

        let _lock = exclusive();
        let _purge = Purge;
        must(Command::new("dpkg").arg("-i").arg(&deb));

        // The files, where Debian expects them.
        for path in [BINARY, UNIT, CONFFILE]
            .into_iter()
            .chain(COMPLETIONS.iter().map(|(_, p)| *p))
        {
            assert!(Path::new(path).is_file(), "{path} is not installed");
        }
        let mode = fs::metadata(CONFFILE).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "{CONFFILE}");
        let conffiles = must(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]));
        assert!(conffiles.contains(CONFFILE), "conffiles: {conffiles}");
        let unit = fs::read_to_string(UNIT).unwrap();
        assert!(
            unit.lines()
                .any(|l| l.starts_with(&format!("ExecStart={BINARY} "))),
            "{unit}"
        );
        for (shell, path) in COMPLETIONS {
            let text = fs::read_to_string(path).unwrap();
            assert!(text.contains("connwatch"), "{shell} completions");
            let from_binary = must(Command::new(BINARY).args(["completions", shell]));
            assert_eq!(
                text, from_binary,
                "{shell}: the packaged file is `connwatch completions {shell}`"
            );
        }
        // Not enabled, not started.
        assert!(
            !Path::new("/etc/systemd/system/multi-user.target.wants/connwatch.service").exists()
        );

        // The installed man pages and binary.
        let page = must(Command::new("man").args(["-w", "connwatch"]));
        assert_eq!(page.trim(), "/usr/share/man/man8/connwatch.8.gz");
        let page = must(Command::new("man").args(["-w", "8", "connwatch-run"]));
        assert_eq!(page.trim(), "/usr/share/man/man8/connwatch-run.8.gz");
        let check = must(Command::new(BINARY).arg("check"));
        eprintln!("connwatch check:\n{check}");
        run_installed_daemon();
        assert!(
            Path::new("/sys/fs/bpf/connwatch").exists() && !pinned_programs().is_empty(),
            "a stopped daemon leaves its programs pinned and attached"
        );

        // Removal stops and cleans up: nothing pinned, nothing attached.
        wait_for_no_daemon();
        must(Command::new("dpkg").args(["-r", PACKAGE]));
        assert!(!Path::new(BINARY).exists(), "{BINARY} stays after dpkg -r");
        assert!(
            !Path::new("/sys/fs/bpf/connwatch").exists(),
            "/sys/fs/bpf/connwatch stays after dpkg -r"
        );
        let left = pinned_programs();
        assert!(left.is_empty(), "programs left attached: {left:?}");
        assert!(
            Path::new(CONFFILE).exists(),
            "dpkg -r keeps the configuration"
        );
        must(Command::new("dpkg").args(["--purge", PACKAGE]));
        assert!(
            !Path::new("/etc/connwatch").exists(),
            "purge removes /etc/connwatch"
        );
    }
}
