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
