//! Every policy, made to happen for real: the test puts real loopback connections in
//! the state a policy is about, runs the real daemon, and checks what the peers see.
//!
//! These tests need root and a kernel with BPF, tracepoints and SOCK_DESTROY. Without
//! them they fail and say why: they never pass by skipping.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use connwatch::conn::{TcpState, Tuple};
use connwatch::kernel::sock_diag::SockDiag;

mod common;
use common::*;

/// The kernel's view of a tuple: its state, or None once it is gone.
fn state_of(local: SocketAddr, remote: SocketAddr) -> Option<TcpState> {
    SockDiag::open()
        .unwrap()
        .get(&Tuple::new(local, remote))
        .unwrap()
        .map(|s| s.state)
}

/// Waits until the tuple is gone from the kernel; returns how long that took.
fn gone_within(local: SocketAddr, remote: SocketAddr, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if state_of(local, remote).is_none() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Sends a byte each way every 200 ms until stopped: a chatty connection.
fn chatter(mut c: Conn) -> (Arc<AtomicBool>, thread::JoinHandle<Conn>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let h = thread::spawn(move || {
        let mut b = [0u8; 1];
        while !flag.load(Ordering::Relaxed) {
            c.client.write_all(b"x").unwrap();
            c.server.read_exact(&mut b).unwrap();
            c.server.write_all(b"y").unwrap();
            c.client.read_exact(&mut b).unwrap();
            thread::sleep(Duration::from_millis(200));
        }
        c
    });
    (stop, h)
}

fn set_keepalive(s: &TcpStream, every_secs: i32) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a descriptor the stream owns, with int options.
    unsafe {
        for (level, opt, v) in [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, one),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, every_secs),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, every_secs),
        ] {
            let rc = libc::setsockopt(fd, level, opt, &v as *const _ as *const libc::c_void, 4);
            assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
        }
    }
}

fn idle_scenario(ip: &str) {
    let _x = exclusive();
    let l = listen(ip);
    let d = Daemon::start(&["--idle", "2s", "--local-port", &port(&l), "--enforce"]);
    let silent = Conn::open(&l);
    let keepalive = Conn::open(&l);
    set_keepalive(&keepalive.server, 1);
    set_keepalive(&keepalive.client, 1);
    let chatty = Conn::open(&l);
    let chatty_tuple = (chatty.local, chatty.remote);
    let (stop, h) = chatter(chatty);

    for (name, c) in [("silent", &silent), ("keepalive-only", &keepalive)] {
        let died = c
            .died_within(Duration::from_secs(4))
            .unwrap_or_else(|| panic!("the {name} connection outlived --idle 2s by 2 s"));
        assert!(
            died >= Duration::from_millis(1950),
            "{name} died early: {died:?}"
        );
    }
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let chatty = h.join().expect("the chatty connection kept working");
    assert!(!chatty.is_dead(), "the chatty connection was destroyed");
    assert_eq!(
        state_of(chatty_tuple.0, chatty_tuple.1),
        Some(TcpState::ESTABLISHED)
    );
    let line = d.wait_for("reason=idle", Duration::from_secs(1));
    assert!(
        line.contains("destroyed") && line.contains("state=ESTABLISHED"),
        "{line}"
    );
    d.stop();
}

#[test]
fn idle_destroys_silent_and_keepalive_only_connections_and_spares_a_chatty_one() {
    idle_scenario("127.0.0.1");
}

#[test]
fn idle_works_on_ipv6() {
    idle_scenario("[::1]");
}

/// A server that never closes its end: after the client's FIN it sits in CLOSE_WAIT.
#[test]
fn close_wait_is_destroyed_after_its_timeout() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let d = Daemon::start(&[
        "--state-timeout",
        "close-wait=2s",
        "--port",
        &port(&l),
        "--enforce",
    ]);
    let c = Conn::open(&l);
    thread::sleep(Duration::from_millis(500));
    c.client.shutdown(Shutdown::Write).unwrap();
    let since = Instant::now();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(state_of(c.remote, c.local), Some(TcpState::CLOSE_WAIT));
    let gone = gone_within(c.remote, c.local, Duration::from_secs(4))
        .expect("the CLOSE_WAIT socket outlived its timeout");
    let at = since.elapsed();
    assert!(
        at >= Duration::from_millis(1900),
        "destroyed early: {at:?} ({gone:?})"
    );
    assert!(at <= Duration::from_secs(3), "destroyed late: {at:?}");
    let line = d.wait_for("state=CLOSE_WAIT", Duration::from_secs(1));
    assert!(
        line.contains("destroyed") && line.contains("reason=state-timeout rule=close-wait"),
        "{line}"
    );
    // Its peer, half-closed, sees the reset.
    let mut b = [0u8; 1];
    c.client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let err = (&c.client).read(&mut b).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    d.stop();
}

/// A peer that vanishes after our FIN: we sit in FIN_WAIT2.
#[test]
fn fin_wait2_is_destroyed_after_its_timeout_on_ipv6() {
    let _x = exclusive();
    let l = listen("[::1]");
    let d = Daemon::start(&[
        "--state-timeout",
        "FIN_WAIT2=2s",
        "--port",
        &port(&l),
        "--enforce",
    ]);
    let c = Conn::open(&l);
    c.client.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(state_of(c.local, c.remote), Some(TcpState::FIN_WAIT2));
    gone_within(c.local, c.remote, Duration::from_secs(3))
        .expect("the FIN_WAIT2 socket outlived its timeout");
    let line = d.wait_for("state=FIN_WAIT2", Duration::from_secs(1));
    assert!(
        line.contains("destroyed") && line.contains("rule=fin-wait2"),
        "{line}"
    );
    d.stop();
}

/// Without a limit the hung-state defaults are on, and an ESTABLISHED connection is
/// not touched by them.
#[test]
fn the_defaults_leave_established_connections_alone() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let d = Daemon::start(&["--enforce"]);
    let c = Conn::open(&l);
    let line = d.wait_for("rules:", Duration::from_secs(1));
    for want in [
        "CLOSE_WAIT for 1m",
        "FIN_WAIT1 for 2m",
        "FIN_WAIT2 for 2m",
        "CLOSING for 1m",
        "LAST_ACK for 1m",
    ] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    thread::sleep(Duration::from_secs(1));
    assert!(!c.is_dead());
    d.stop();
}

fn block_scenario(blocked: &str, listen_on: &str, from: SocketAddr, spared_from: SocketAddr) {
    let _x = exclusive();
    let l = listen(listen_on);
    let to = l.local_addr().unwrap();
    let d = Daemon::start(&["--block", blocked, "--enforce"]);
    let hit = Conn::new(connect_from(from, to), l.accept().unwrap().0);
    let spared_l = listen("127.0.0.1");
    let spared_to = spared_l.local_addr().unwrap();
    let spared = Conn::new(
        connect_from(spared_from, spared_to),
        spared_l.accept().unwrap().0,
    );
    hit.died_within(Duration::from_secs(1))
        .expect("a connection from a blocked address lived on");
    let line = d.wait_for("reason=blocked", Duration::from_secs(1));
    assert!(line.contains("destroyed"), "{line}");
    thread::sleep(Duration::from_millis(500));
    assert!(
        !spared.is_dead(),
        "a connection from elsewhere was destroyed"
    );
    d.stop();
}

#[test]
fn a_blocked_address_is_destroyed_once_established() {
    block_scenario(
        "127.0.0.2/32",
        "127.0.0.1",
        "127.0.0.2:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    );
}

#[test]
fn a_blocked_ipv6_address_is_destroyed_once_established() {
    block_scenario(
        "::1/128",
        "[::1]",
        "[::1]:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    );
}

/// N+1 connections from one address: the newest goes.
fn per_ip_scenario(listen_on: &str, from: &str) {
    let _x = exclusive();
    let l = listen(listen_on);
    let to = l.local_addr().unwrap();
    let d = Daemon::start(&[
        "--max-conns-per-ip",
        "2",
        "--local-port",
        &port(&l),
        "--enforce",
    ]);
    let mut conns = Vec::new();
    for _ in 0..3 {
        let c = connect_from(format!("{from}:0").parse().unwrap(), to);
        conns.push(Conn::new(c, l.accept().unwrap().0));
        thread::sleep(Duration::from_millis(100));
    }
    conns[2]
        .died_within(Duration::from_secs(1))
        .expect("the third connection from one address lived on");
    thread::sleep(Duration::from_millis(500));
    assert!(
        !conns[0].is_dead() && !conns[1].is_dead(),
        "an older one was destroyed"
    );
    let line = d.wait_for("reason=max-conns-per-ip", Duration::from_secs(1));
    assert!(line.contains(&conns[2].local.to_string()), "{line}");
    // One leaves: there is room again, and a new one stays.
    drop(conns.remove(0));
    thread::sleep(Duration::from_millis(200));
    let c = connect_from(format!("{from}:0").parse().unwrap(), to);
    let again = Conn::new(c, l.accept().unwrap().0);
    thread::sleep(Duration::from_millis(500));
    assert!(
        !again.is_dead(),
        "a connection within the limit was destroyed"
    );
    d.stop();
}

/// After a quiet second the daemon stops polling its event ring and sleeps until the
/// kernel wakes it at the next event: a limit that acts at once still does then.
#[test]
fn after_a_quiet_spell_the_next_connection_is_acted_on_at_once() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let to = l.local_addr().unwrap();
    let d = Daemon::start(&[
        "--max-conns-per-ip",
        "1",
        "--local-port",
        &port(&l),
        "--enforce",
    ]);
    // Asleep by now: twenty empty polls, 50 ms apart.
    thread::sleep(Duration::from_millis(2500));
    let open = || {
        let c = connect_from("127.0.0.1:0".parse().unwrap(), to);
        Conn::new(c, l.accept().unwrap().0)
    };
    let first = open();
    thread::sleep(Duration::from_millis(100));
    let second = open();
    second
        .died_within(Duration::from_secs(1))
        .expect("the connection over the limit lived on: the sleeping daemon was not woken");
    assert!(
        !first.is_dead(),
        "the connection within the limit was destroyed"
    );
    d.stop();
}

/// A dry run of `--max-conns-per-ip` logs what a live run would do, once: each
/// connection over the limit is a `would destroy` line once, however its group changes
/// after, and it no longer counts (as a destroyed one would not).
#[test]
fn a_dry_run_of_the_per_address_limit_decides_each_connection_once() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let to = l.local_addr().unwrap();
    let d = Daemon::start(&["--max-conns-per-ip", "1", "--local-port", &port(&l)]);
    let open = || {
        let c = connect_from("127.0.0.5:0".parse().unwrap(), to);
        Conn::new(c, l.accept().unwrap().0)
    };
    let first = open();
    thread::sleep(Duration::from_millis(100));
    let over: Vec<Conn> = (0..3)
        .map(|_| {
            let c = open();
            thread::sleep(Duration::from_millis(100));
            c
        })
        .collect();
    // The group changes again and again: more join, some leave.
    for _ in 0..5 {
        drop(open());
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    let lines = d.stop();
    let would = |c: &Conn| {
        let server_side = format!("would destroy {} -> {} ", c.remote, c.local);
        lines.iter().filter(|l| l.contains(&server_side)).count()
    };
    assert_eq!(would(&first), 0, "the first is within the limit");
    for c in &over {
        assert_eq!(would(c), 1, "{}: {lines:#?}", c.tuple());
        assert!(!c.is_dead(), "a dry run destroyed {}", c.tuple());
    }
}

#[test]
fn the_newest_connection_over_the_per_address_limit_goes() {
    per_ip_scenario("127.0.0.1", "127.0.0.3");
}

#[test]
fn the_per_address_limit_works_on_ipv6() {
    per_ip_scenario("[::1]", "[::1]");
}

/// A protected process's socket under a matching rule survives, and the log says so;
/// an unprotected one beside it does not.
#[test]
fn a_protected_process_keeps_its_connections() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let mut bash = Command::new("bash")
        .arg("-c")
        .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{p}; read -t 30 <&3"))
        .spawn()
        .expect("bash");
    let (from_bash, _) = l.accept().unwrap();
    let bash_end = from_bash.peer_addr().unwrap();
    let d = Daemon::start(&[
        "--max-age",
        "1s",
        "--remote-port",
        &p,
        "--exclude-process",
        "bash",
        "--enforce",
    ]);
    let mine = Conn::open(&l);
    mine.died_within(Duration::from_secs(3))
        .expect("an unprotected connection lived on");
    let line = d.wait_for(&format!("protected {bash_end} -> "), Duration::from_secs(2));
    assert!(
        line.contains(&format!("{bash_end} -> 127.0.0.1:{p}")) && line.contains("process bash"),
        "{line}"
    );
    assert_eq!(
        state_of(bash_end, l.local_addr().unwrap()),
        Some(TcpState::ESTABLISHED),
        "bash's connection survives"
    );
    let _ = bash.kill();
    let _ = bash.wait();
    d.stop();
}

/// An accepted socket is shown with its listener's owner (the kernel learns owners
/// at connect and listen, never per packet), but only the process that holds it can
/// protect it: here the listener is this test, and the accepted end was handed to a
/// protected `sleep`. Trusting the listener's owner would destroy it.
#[test]
fn an_accepted_socket_shows_its_listener_but_is_protected_by_its_holder() {
    use std::os::fd::OwnedFd;
    let _x = exclusive();
    // The port is chosen first, so the rule can name it before the listener exists.
    let p = port(&listen("127.0.0.1"));
    let d = Daemon::start(&[
        "--max-age",
        "3s",
        "--local-port",
        &p,
        "--exclude-process",
        "sleep",
        "--enforce",
    ]);
    // Listened to after the program is attached: the listener's owner is recorded.
    let l = std::net::TcpListener::bind(format!("127.0.0.1:{p}")).unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (accepted, _) = l.accept().unwrap();
    let server_end = accepted.local_addr().unwrap();
    let client_end = client.local_addr().unwrap();
    let rows = list_rows(&["--port", &p]);
    let row = rows
        .iter()
        .find(|r| r["local"] == server_end.to_string() && r["remote"] == client_end.to_string())
        .unwrap_or_else(|| panic!("the accepted end is listed: {rows:#?}"));
    // The process's name, as /proc shows it for its main thread (and `ss -p`).
    let me = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(row["process"], me.trim_end(), "the listener's owner: {row}");
    assert_eq!(row["pid"], std::process::id(), "{row}");
    // The accepted end goes to `sleep` (as its stdin); this process keeps none of it.
    let mut sleep = Command::new("sleep")
        .arg("30")
        .stdin(std::process::Stdio::from(OwnedFd::from(accepted)))
        .spawn()
        .expect("sleep");
    let line = d.wait_for(
        &format!("protected {server_end} -> {client_end}"),
        Duration::from_secs(8),
    );
    assert!(line.contains("process sleep"), "{line}");
    assert_eq!(
        state_of(client_end, server_end),
        Some(TcpState::ESTABLISHED),
        "the accepted end was not destroyed"
    );
    let _ = sleep.kill();
    let _ = sleep.wait();
    d.stop();
}

/// `enforce` in the config file, reloaded, turns destroying off and on again; the log
/// warns at each change. (`--enforce` on the command line would hold it on.)
#[test]
fn a_reload_applies_enforce_both_ways() {
    let _x = exclusive();
    let dir = std::env::temp_dir().join(format!("connwatch-enforce-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("connwatch.toml");
    let l = listen("127.0.0.1");
    let p = port(&l);
    let write = |enforce: bool| {
        std::fs::write(
            &path,
            format!("max-age = \"1s\"\nremote-port = [{p}]\nenforce = {enforce}\n"),
        )
        .unwrap()
    };
    write(true);
    let d = Daemon::start(&["--config", path.to_str().unwrap()]);
    let hup = || {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    };
    Conn::open(&l)
        .died_within(Duration::from_secs(4))
        .expect("enforce = true in the file destroys");

    write(false);
    hup();
    d.wait_for("the reloaded policy is a dry run", Duration::from_secs(2));
    let spared = Conn::open(&l);
    let line = d.wait_for(
        &format!("would destroy {}", spared.tuple()),
        Duration::from_secs(4),
    );
    assert!(line.contains("(dry run)"), "{line}");
    thread::sleep(Duration::from_millis(500));
    assert!(!spared.is_dead(), "a dry run destroyed a connection");

    write(true);
    hup();
    d.wait_for("the reloaded policy enforces", Duration::from_secs(2));
    let doomed = Conn::open(&l);
    doomed
        .died_within(Duration::from_secs(4))
        .expect("enforcing again after the reload");
    d.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGHUP: an invalid file is reported with its line and the daemon keeps its policy;
/// a valid one takes effect.
#[test]
fn config_reload_keeps_the_last_good_policy() {
    let _x = exclusive();
    let dir = std::env::temp_dir().join(format!("connwatch-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("connwatch.toml");
    let l = listen("127.0.0.1");
    let p = port(&l);
    std::fs::write(&path, format!("idle = \"1h\"\nport = [{p}]\n")).unwrap();
    let d = Daemon::start(&["--config", path.to_str().unwrap(), "--enforce"]);
    let c = Conn::open(&l);
    let hup = || {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    };

    std::fs::write(
        &path,
        format!("port = [{p}]\n\n[[rule]]\nname = \"quick\"\nidle = \"1x\"\n"),
    )
    .unwrap();
    hup();
    let line = d.wait_for("reload refused", Duration::from_secs(2));
    assert!(
        line.contains("connwatch.toml:5: rule 'quick' idle:"),
        "{line}"
    );
    thread::sleep(Duration::from_millis(1500));
    assert!(!c.is_dead(), "the bad file changed the policy");

    std::fs::write(
        &path,
        format!("port = [{p}]\n\n[[rule]]\nname = \"quick\"\nidle = \"1s\"\n"),
    )
    .unwrap();
    hup();
    d.wait_for("reloaded the policy", Duration::from_secs(2));
    c.died_within(Duration::from_secs(10))
        .expect("the reloaded rule was not applied");
    let line = d.wait_for("rule=quick", Duration::from_secs(1));
    assert!(line.contains("reason=idle"), "{line}");
    d.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `sweep` for cron: once, a summary, the exit code; idle time from tcp_info.
#[test]
fn sweep_applies_the_policy_once_and_summarises() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let silent = Conn::open(&l);
    let mut fresh = Conn::open(&l);
    // `fresh` speaks right before each sweep: a sweep takes a good part of a second
    // under emulation (a TCG guest), so the limit leaves it a few.
    let speak = |c: &mut Conn| {
        c.client.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.server.read_exact(&mut b).unwrap();
    };
    thread::sleep(Duration::from_millis(3500));
    speak(&mut fresh);

    let dry = Command::new(BIN)
        .args(["sweep", "--idle", "3s", "--local-port", &p])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{out}");
    assert!(
        out.contains("matched=1 would_destroy=1") && out.contains("dry run"),
        "{out}"
    );
    assert!(!silent.is_dead(), "a dry sweep destroyed");

    speak(&mut fresh);
    let live = Command::new(BIN)
        .args(["sweep", "--idle", "3s", "--local-port", &p, "--enforce"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&live.stdout);
    let err = String::from_utf8_lossy(&live.stderr);
    assert!(live.status.success(), "{out}{err}");
    assert!(
        out.contains("matched=1 destroyed=1 skipped=0 failed=0"),
        "{out}"
    );
    assert!(
        err.contains(&format!("destroyed {} -> {}", silent.remote, silent.local)),
        "{err}"
    );
    assert!(silent.died_within(Duration::from_secs(3)).is_some());
    assert!(
        !fresh.is_dead(),
        "the connection that just spoke was destroyed"
    );

    // A sweep destroys from its own dump, without a lookup each; a protected process's
    // connection is still spared.
    let mut bash = Command::new("bash")
        .arg("-c")
        .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{p}; read -t 30 <&3"))
        .spawn()
        .expect("bash");
    let (from_bash, _) = l.accept().unwrap();
    let bash_end = from_bash.peer_addr().unwrap();
    thread::sleep(Duration::from_millis(1500));
    let protected = Command::new(BIN)
        .args(["sweep", "--idle", "1s", "--remote-port", &p])
        .args(["--exclude-process", "bash", "--enforce"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&protected.stdout);
    let err = String::from_utf8_lossy(&protected.stderr);
    assert!(
        out.contains("skipped=1") && err.contains(&format!("protected {bash_end} -> ")),
        "{out}{err}"
    );
    assert_eq!(
        state_of(bash_end, l.local_addr().unwrap()),
        Some(TcpState::ESTABLISHED),
        "bash's connection survives the sweep"
    );
    let _ = bash.kill();
    let _ = bash.wait();
}

#[test]
fn explain_says_which_rule_applies_and_when() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let c = Conn::open(&l);
    let out = Command::new(BIN)
        .args(["explain", "--idle", "10m", "--local-port", &p])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&c.remote.to_string()))
        .unwrap_or_else(|| panic!("no row for the server end: {text}"));
    assert!(
        row.contains("idle: due in 9m") || row.contains("idle: due in 10m"),
        "{row}"
    );
    let other = text
        .lines()
        .find(|l| l.starts_with(&c.local.to_string()))
        .unwrap_or_else(|| panic!("no row for the client end: {text}"));
    assert!(other.contains("never: no rule applies"), "{other}");
}

/// TIME_WAIT is off by default; asked for, the connection that closed first is cut
/// short of the kernel's 60 s.
#[test]
fn time_wait_is_shortened_when_asked() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let d = Daemon::start(&[
        "--state-timeout",
        "time-wait=1s",
        "--port",
        &port(&l),
        "--enforce",
    ]);
    let c = Conn::open(&l);
    let (local, remote) = (c.local, c.remote);
    // The client closes first, the server follows: the client end goes to TIME_WAIT.
    let Conn { client, server, .. } = c;
    drop(client);
    thread::sleep(Duration::from_millis(100));
    drop(server);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(state_of(local, remote), Some(TcpState::TIME_WAIT));
    gone_within(local, remote, Duration::from_secs(3))
        .expect("the TIME_WAIT socket outlived its 1 s timeout");
    let line = d.wait_for("state=TIME_WAIT", Duration::from_secs(1));
    assert!(
        line.contains("destroyed") && line.contains("rule=time-wait"),
        "{line}"
    );
    d.stop();
}

/// A rule that would destroy many at once is held to the safety budget: two a second
/// here, the rest put off, loudly, and destroyed in the following seconds.
#[test]
fn the_safety_budget_spreads_a_mass_destroy() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    // All six past the limit before the daemon looks: due together, however long
    // opening them or starting the daemon takes on this machine.
    let conns: Vec<Conn> = (0..6).map(|_| Conn::open(&l)).collect();
    thread::sleep(Duration::from_millis(1200));
    let d = Daemon::start(&[
        "--max-age",
        "1s",
        "--local-port",
        &port(&l),
        "--max-kills-per-second",
        "2",
        "--enforce",
    ]);
    let start = Instant::now();
    // When each connection died, looked at every 10 ms from the daemon's start.
    let mut died: Vec<Option<Duration>> = vec![None; conns.len()];
    while died.iter().any(Option::is_none) && start.elapsed() < Duration::from_secs(6) {
        for (c, at) in conns.iter().zip(died.iter_mut()) {
            if at.is_none() && c.is_dead() {
                *at = Some(start.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let line = d.wait_for("safety budget", Duration::from_secs(1));
    assert!(
        line.contains("6 sockets due at once, destroying 2 now and putting off 4"),
        "{line}"
    );
    let mut died: Vec<Duration> = died
        .into_iter()
        .map(|at| at.expect("a put-off connection was never destroyed"))
        .collect();
    died.sort();
    // Three one-second windows of two each: a pair at the first destroy, a pair a
    // second later, the last pair two seconds later (10 ms polls; some slack for a
    // loaded machine, none for a window that took more than two).
    let first = died[0];
    let after: Vec<f64> = died.iter().map(|d| (*d - first).as_secs_f64()).collect();
    eprintln!("deaths after the first: {after:?}");
    for (i, pair) in after.chunks(2).enumerate() {
        let window = i as f64;
        for at in pair {
            assert!(
                (window - 0.1..window + 0.6).contains(at),
                "destroy {at:.3} s after the first is not in window {i}: {after:?}"
            );
        }
    }
    let status = api(&serde_json::json!({"cmd": "status"}));
    let deferred = status["counters"]["deferred"].as_u64().unwrap();
    assert!(deferred >= 4, "the 4 put off are not counted: {status}");
    let lines = d.stop();
    assert_eq!(
        lines.iter().filter(|l| l.contains(" destroyed ")).count(),
        6,
        "each connection destroyed once"
    );
}
