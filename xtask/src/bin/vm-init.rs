//! `/init` of the guest `cargo xtask vm-test` boots: mounts what the tests need,
//! loads the kernel modules listed in /vm/modules.order, brings `lo` up, runs the
//! test binaries in /vm/tests one after the other, and powers off. Before the tests it
//! prints what `connwatch check` says of the kernel.
//!
//! Its plan comes from the kernel command line: `cwvm.tests=e2e,policies`,
//! `cwvm.timeout=SECONDS` (per test binary), `cwvm.filter=NAME` and `cwvm.skip=A,B`
//! (passed to libtest), `cwvm.probe=1` (only say "cwvm: probe ok"). Its last line is
//! `N passed, N failed`, which the xtask reads; a test binary that crashes or runs
//! out of time counts as one failure.
//!
//! It is built statically (`-C target-feature=+crt-static`) and only ever runs as
//! pid 1 of that guest.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let start = Instant::now();
    setup();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let plan = Plan::from_cmdline(&cmdline);
    if plan.probe {
        say("probe ok");
    } else {
        run_check();
        if std::path::Path::new(SCRIPT).is_file() {
            run_script();
        }
        let (passed, failed) = run_all(&plan);
        say(&format!("finished in {:.0?}", start.elapsed()));
        // The closing line the xtask parses, alone on its line.
        println!("\n{passed} passed, {failed} failed");
    }
    power_off();
}

/// A script `cargo xtask vm-test --guest-script` puts in the image, run first.
const SCRIPT: &str = "/vm/script.sh";
/// The `connwatch` the tests run (a link to it).
const CONNWATCH: &str = "/vm/connwatch";
/// The open-file limit of the test binaries: the hard limit of the project's
/// machines (the kernel gives pid 1 only 1024/4096, too few for the tests that
/// hold thousands of connections).
const NOFILE: u64 = 20000;

fn say(msg: &str) {
    println!("cwvm: {msg}");
    let _ = std::io::stdout().flush();
}

#[derive(Default)]
struct Plan {
    tests: Vec<String>,
    timeout: Duration,
    filter: Option<String>,
    skip: Vec<String>,
    probe: bool,
}

impl Plan {
    fn from_cmdline(cmdline: &str) -> Plan {
        let mut p = Plan {
            timeout: Duration::from_secs(900),
            ..Plan::default()
        };
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let list = || value.split(',').filter(|s| !s.is_empty()).map(String::from);
            match key {
                "cwvm.tests" => p.tests = list().collect(),
                "cwvm.timeout" => {
                    if let Ok(s) = value.parse() {
                        p.timeout = Duration::from_secs(s);
                    }
                }
                "cwvm.filter" => p.filter = Some(value.to_string()),
                "cwvm.skip" => p.skip = list().collect(),
                "cwvm.probe" => p.probe = value == "1",
                _ => {}
            }
        }
        p
    }
}

fn mkdir(path: &str) {
    let _ = std::fs::create_dir_all(path);
}

fn mount(source: &str, target: &str, fstype: &str, data: &str) {
    mkdir(target);
    let c = |s: &str| CString::new(s).unwrap();
    let (source, ctarget, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            ctarget.as_ptr(),
            fstype_c.as_ptr(),
            0,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        say(&format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn setup() {
    mount("proc", "/proc", "proc", "");
    mount("sysfs", "/sys", "sysfs", "");
    mount("devtmpfs", "/dev", "devtmpfs", "mode=0755");
    reopen_console();
    mount("devpts", "/dev/pts", "devpts", "ptmxmode=0666,mode=0620");
    mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777");
    // /tmp is the image's own (writable, mode 1777), not a tmpfs over it: a checkout
    // under /tmp puts the daemon and the tests' data there, at the paths the test
    // binaries were built with.
    mount("tmpfs", "/run", "tmpfs", "mode=0755");
    mount("bpf", "/sys/fs/bpf", "bpf", "mode=0700");
    mount("tracefs", "/sys/kernel/tracing", "tracefs", "");
    mount("debugfs", "/sys/kernel/debug", "debugfs", "");
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", "");
    mkdir("/root");
    let limit = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: setrlimit with a valid struct; children inherit the limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        say(&format!(
            "setrlimit NOFILE {NOFILE}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    say(&format!("kernel {}", release.trim()));
    load_modules();
    lo_up();
}

/// Makes stdin, stdout and stderr the console, whatever the kernel gave us.
fn reopen_console() {
    let path = CString::new("/dev/console").unwrap();
    // SAFETY: open and dup2 on descriptors this process owns.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd >= 0 {
            for target in 0..3 {
                libc::dup2(fd, target);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

fn load_modules() {
    let order = std::fs::read_to_string("/vm/modules.order").unwrap_or_default();
    for path in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                say(&format!("module {path}: {e}"));
                continue;
            }
        };
        let params = CString::new("").unwrap();
        // SAFETY: finit_module with an open descriptor and an empty parameter string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        let err = std::io::Error::last_os_error();
        if rc == 0 {
            say(&format!("loaded {path}"));
        } else if err.raw_os_error() == Some(libc::EEXIST) {
            say(&format!("{path}: already loaded"));
        } else {
            say(&format!("module {path}: {err}"));
        }
    }
}

fn lo_up() {
    // SAFETY: an ioctl on a socket we own, with an ifreq we initialise.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            say(&format!("socket: {}", std::io::Error::last_os_error()));
            return;
        }
        let _sock = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            say(&format!(
                "SIOCGIFFLAGS lo: {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
            say(&format!(
                "SIOCSIFFLAGS lo: {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
    }
    say("lo is up");
}

fn guest_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("TERM", "linux")
        .env("LANG", "C.UTF-8")
        .env("RUST_BACKTRACE", "1")
        .current_dir("/root")
        .stdin(Stdio::null())
}

/// `connwatch check` before the tests, between two lines the xtask finds it by: what
/// this kernel offers connwatch, as a user would see it.
fn run_check() {
    say("connwatch check");
    match guest_env(Command::new(CONNWATCH).arg("check")).status() {
        Ok(st) => say(&format!("connwatch check exited with {st}")),
        Err(e) => say(&format!(
            "connwatch check exited: cannot run {CONNWATCH}: {e}"
        )),
    }
}

fn run_script() {
    say(&format!("running {SCRIPT}"));
    match guest_env(Command::new("/bin/bash").arg(SCRIPT)).status() {
        Ok(st) => say(&format!("{SCRIPT} exited with {st}")),
        Err(e) => say(&format!("cannot run {SCRIPT}: {e}")),
    }
}

/// Runs every test binary of the plan; returns the totals.
fn run_all(plan: &Plan) -> (u64, u64) {
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut failures = Vec::new();
    for name in &plan.tests {
        let (p, f, names) = run_one(name, plan);
        passed += p;
        failed += f;
        failures.extend(names.into_iter().map(|n| format!("{name}::{n}")));
    }
    for f in &failures {
        say(&format!("FAILED {f}"));
    }
    (passed, failed)
}

/// Runs one test binary, its output to the console; returns passed, failed and
/// the names of the failed tests.
fn run_one(name: &str, plan: &Plan) -> (u64, u64, Vec<String>) {
    let path = format!("/vm/tests/{name}");
    say(&format!("running {name}"));
    let mut cmd = Command::new(&path);
    cmd.arg("--test-threads=1");
    if let Some(f) = &plan.filter {
        cmd.arg(f);
    }
    for s in &plan.skip {
        cmd.args(["--skip", s]);
    }
    let (read, write) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            say(&format!("pipe: {e}"));
            return (0, 1, vec!["(could not start)".into()]);
        }
    };
    let write2 = write.try_clone().expect("dup");
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("TERM", "linux")
        .env("LANG", "C.UTF-8")
        .env("RUST_BACKTRACE", "1")
        .current_dir("/root")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2))
        .process_group(0);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            say(&format!("cannot run {path}: {e}"));
            return (0, 1, vec!["(could not start)".into()]);
        }
    };
    drop(cmd);
    let pgid = child.id() as i32;
    let reader = std::thread::spawn(move || {
        let file = std::fs::File::from(read);
        let (mut p, mut f, mut results, mut failed) = (0u64, 0u64, 0u32, Vec::new());
        let mut out = std::io::stdout();
        for line in BufReader::new(file).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            if let Some((lp, lf)) = totals(&line) {
                p += lp;
                f += lf;
                results += 1;
            }
            if let Some(t) = line
                .strip_prefix("test ")
                .and_then(|r| r.strip_suffix(" ... FAILED"))
            {
                failed.push(t.to_string());
            }
        }
        (p, f, results, failed)
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if started.elapsed() > plan.timeout => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => {
                say(&format!("wait {name}: {e}"));
                break None;
            }
        }
    };
    // The test binary's daemons and helpers go with it: they would hold the
    // instance lock or the pinned maps for the next binary.
    // SAFETY: signalling the process group we created.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (p, mut f, results, mut failed) = reader.join().unwrap_or_default();
    let took = started.elapsed();
    match status {
        None => {
            say(&format!("{name} TIMED OUT after {took:.0?}"));
            f += 1;
            failed.push("(timed out)".into());
        }
        Some(st) if results == 0 || (!st.success() && f == 0) => {
            say(&format!(
                "{name} exited with {st} without a test result, after {took:.0?}"
            ));
            f += 1;
            failed.push(format!("(exited with {st})"));
        }
        Some(st) => say(&format!("{name} exited with {st} after {took:.0?}")),
    }
    (p, f, failed)
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `test result: ok. 12 passed; 0 failed; ...` -> (12, 0).
fn totals(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim_end().strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            let part = part.trim();
            let part = part
                .strip_prefix("ok. ")
                .or_else(|| part.strip_prefix("FAILED. "))
                .unwrap_or(part);
            part.strip_suffix(word)?.trim().parse().ok()
        })
    };
    Some((count(" passed")?, count(" failed")?))
}

fn power_off() -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot take no pointers; as pid 1 we may power off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Returning from pid 1 panics the kernel, which (panic=-1, -no-reboot) also ends qemu.
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_from_the_kernel_command_line() {
        let p = Plan::from_cmdline(
            "console=ttyS0 panic=-1 quiet cwvm.tests=e2e,policies cwvm.timeout=600 cwvm.filter=idle cwvm.skip=a,b\n",
        );
        assert_eq!(p.tests, ["e2e", "policies"]);
        assert_eq!(p.timeout, Duration::from_secs(600));
        assert_eq!(p.filter.as_deref(), Some("idle"));
        assert_eq!(p.skip, ["a", "b"]);
        assert!(!p.probe);
        let p = Plan::from_cmdline("cwvm.probe=1 cwvm.timeout=x");
        assert!(p.probe && p.tests.is_empty());
        assert_eq!(p.timeout, Duration::from_secs(900));
    }

    #[test]
    fn totals_of_libtest_lines() {
        assert_eq!(
            totals("test result: FAILED. 13 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 51.94s"),
            Some((13, 2))
        );
        assert_eq!(
            totals("test result: ok. 0 passed; 0 failed; 0 ignored\r"),
            Some((0, 0))
        );
        assert_eq!(totals("test foo ... ok"), None);
    }
}
