//! Keeps working and loses nothing: crash and restart, overflow of the kernel's map and
//! ring, least privilege, faults from the kernel. The real daemon, the real eBPF
//! program, real loopback connections.
//!
//! These tests need root and a kernel with BPF, tracepoints and SOCK_DESTROY. Without
//! them they fail and say why: they never pass by skipping. RELIABILITY.md has what
//! each one tried and what survived.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use connwatch::clock::monotonic_ns;
use connwatch::conn::{TcpState, Tuple};
use connwatch::kernel::first_seen::FirstSeenFile;
use connwatch::kernel::privilege;
use connwatch::kernel::sock_diag::{DestroyError, SockDiag};
use connwatch::kernel::{layout, pins};
use connwatch_common::{ConnInfo, FLAG_BIRTH_UNKNOWN};

mod common;
use common::*;

// ---------------------------------------------------------------------------------
// Helpers

/// A forked child that runs `body` (system calls only: it must not allocate, the
/// parent has threads), says it is ready, and holds whatever it opened until released.
struct Forked {
    pid: i32,
    release: i32,
}

impl Forked {
    /// `body` returns 0 when it succeeded, else an errno-like code. The child keeps only
    /// the standard streams, its pipes and the descriptors in `keep`: sockets of ours it
    /// inherited would otherwise outlive our closing them.
    fn spawn(keep: &[i32], body: impl FnOnce() -> i32) -> Forked {
        let mut ready = [0i32; 2];
        let mut release = [0i32; 2];
        // SAFETY: plain pipe and fork; the child only makes system calls and _exits.
        unsafe {
            assert_eq!(libc::pipe(ready.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(release.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                for fd in 3..limit.rlim_cur.min(1 << 20) as i32 {
                    if fd != ready[1] && fd != release[0] && !keep.contains(&fd) {
                        libc::close(fd);
                    }
                }
                let code = body();
                let byte: u8 = if code == 0 { b'R' } else { b'E' };
                libc::write(ready[1], &byte as *const u8 as *const libc::c_void, 1);
                if code != 0 {
                    libc::_exit(code);
                }
                let mut b = 0u8;
                libc::read(release[0], &mut b as *mut u8 as *mut libc::c_void, 1);
                libc::_exit(0);
            }
            libc::close(ready[1]);
            libc::close(release[0]);
            let mut b = 0u8;
            let n = libc::read(ready[0], &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::close(ready[0]);
            let mut child = Forked {
                pid,
                release: release[1],
            };
            if n != 1 || b != b'R' {
                let code = child.wait();
                panic!("the forked child failed (exit status {code})");
            }
            child
        }
    }

    fn wait(&mut self) -> i32 {
        let mut status = 0;
        // SAFETY: closing our end releases the child; then reap it.
        unsafe {
            if self.release >= 0 {
                libc::close(self.release);
                self.release = -1;
            }
            libc::waitpid(self.pid, &mut status, 0);
        }
        libc::WEXITSTATUS(status)
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if self.release >= 0 {
            self.wait();
        }
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes(a.ip().octets()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Connects `n` times to `to` from a forked child: the client descriptors count
/// against its limit (20000 here), not ours.
fn hold_clients(to: SocketAddr, n: usize) -> Forked {
    let SocketAddr::V4(v4) = to else {
        panic!("IPv4 only")
    };
    let addr = sockaddr(v4);
    Forked::spawn(&[], move || {
        for _ in 0..n {
            // SAFETY: socket and connect with a valid sockaddr_in.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    return 10;
                }
                let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                    return 11;
                }
            }
        }
        0
    })
}

/// A listener whose accept queue holds a burst (std's backlog is 128).
fn big_listener() -> TcpListener {
    let l = listen("127.0.0.1");
    // SAFETY: listen again on our own listening socket only raises its backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 4096) }, 0);
    l
}

/// Accepts `n` connections on another thread.
fn accept_n(l: &TcpListener, n: usize) -> thread::JoinHandle<Vec<TcpStream>> {
    let l = l.try_clone().unwrap();
    thread::spawn(move || (0..n).map(|_| l.accept().unwrap().0).collect())
}

fn kill9(d: Daemon) -> Vec<String> {
    let mut d = d;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) };
    let _ = d.child.wait();
    // Every line it wrote before the kill, however many were still in the pipe.
    d.all_lines()
}

fn signal(d: &Daemon, sig: i32) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, sig) }, 0);
}

/// The CPUs the kernel counts per-CPU values over.
fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The hooks the running kernel has: those the daemon attaches and pins.
fn available_hooks() -> impl Iterator<Item = &'static layout::Hook> {
    layout::HOOKS
        .iter()
        .filter(|h| layout::check_hook(h).is_ok())
}

/// The map's entries of this namespace's sockets, by tuple (unique within it).
fn map_entries() -> HashMap<Tuple, ConnInfo> {
    let host = host_netns();
    pins::open_pinned_conns()
        .expect("the pinned map")
        .entries()
        .into_iter()
        .filter(|(_, info)| info.netns == host)
        .filter_map(|(_, info)| Some((Tuple::from_info(&info)?, info)))
        .collect()
}

/// The cookies of the established sockets with `port` at either end, as sock_diag
/// reports them.
fn established_cookies(port: u16) -> Vec<u64> {
    SockDiag::open()
        .unwrap()
        .dump(SockDiag::ALL_STATES)
        .unwrap()
        .into_iter()
        .filter(|s| touches(&s.tuple, port) && s.state == TcpState::ESTABLISHED)
        .map(|s| connwatch::conn::cookie_from_diag(s.cookie))
        .collect()
}

fn touches(t: &Tuple, port: u16) -> bool {
    t.local.port() == port || t.remote.port() == port
}

/// How many `destroyed` lines name each tuple (as `local -> remote`).
fn destroyed_counts(lines: &[String]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for l in lines {
        if let Some(at) = l.find(" destroyed ") {
            let rest = &l[at + " destroyed ".len()..];
            if let Some(t) = rest.split(" state=").next() {
                *n.entry(t.to_string()).or_default() += 1;
            }
        }
    }
    n
}

/// Whether a socket we hold was torn down (reset, aborted, or EOF).
fn dead(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    match (&*s).read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock),
    }
}

fn ends(local: SocketAddr, remote: SocketAddr) -> [String; 2] {
    [
        format!("{local} -> {remote}"),
        format!("{remote} -> {local}"),
    ]
}

/// Removes the pinned objects when dropped, even when the test fails: a test that
/// starts with a tiny `--max-conns` leaves a map of that size pinned until cleanup.
struct CleanupOnDrop;

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        let _ = Command::new(BIN).arg("cleanup").output();
    }
}

/// Starts from no pins (so a map is made at the size the test asks for) and leaves none.
fn fresh_pins() -> CleanupOnDrop {
    cleanup();
    CleanupOnDrop
}

fn cleanup() -> String {
    let out = Command::new(BIN).arg("cleanup").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cleanup failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn list_json() -> Vec<serde_json::Value> {
    let out = Command::new(BIN).args(["list", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

// ---------------------------------------------------------------------------------
// 1. Restart and crash

/// 10 000 connections of known ages; `kill -9` the daemon, open and close connections
/// while it is down, start it again: every age is the same, the sockets born meanwhile
/// are recorded, those closed meanwhile are gone. Then `kill -9` it in the middle of
/// its wave of destroys and start it once more: every connection is destroyed by its
/// deadline, none twice.
#[test]
fn kill_9_and_restart_keep_every_age_and_every_deadline() {
    let _x = exclusive();
    const HALF: usize = 5000;
    let l = big_listener();
    let p = port(&l);
    // The limit is an hour until the restarted daemon has listed every age, then set
    // by a reload so that the wave of destroys comes a few seconds later: listing
    // 20 000 connections takes a second here and tens of seconds under emulation (a
    // TCG guest), which a limit fixed beforehand would have to guess.
    let config = MaxAgeConfig::new("connwatch-kill9", &p, "1h");
    let args = ["--config", config.path(), "--enforce"];
    let d1 = Daemon::start(&args);

    // Two bursts 2 s apart, so the wave of destroys comes in two steps.
    let started = Instant::now();
    let acc = accept_n(&l, HALF);
    let holder_a = hold_clients(l.local_addr().unwrap(), HALF);
    let mut servers = acc.join().unwrap();
    thread::sleep(Duration::from_secs(2));
    let acc = accept_n(&l, HALF);
    let holder_b = hold_clients(l.local_addr().unwrap(), HALF);
    servers.extend(acc.join().unwrap());
    let opened_in = started.elapsed();
    eprintln!("opened {} connections in {opened_in:?}", servers.len());
    thread::sleep(Duration::from_millis(500));

    let port_n: u16 = p.parse().unwrap();
    let before: HashMap<Tuple, ConnInfo> = map_entries()
        .into_iter()
        .filter(|(t, _)| touches(t, port_n) && t.local.port() != 0)
        .filter(|(_, i)| i.state == TcpState::ESTABLISHED.0)
        .collect();
    assert_eq!(
        before.len(),
        4 * HALF,
        "both ends of every connection are in the map with a known birth"
    );
    assert!(before
        .values()
        .all(|i| i.flags & FLAG_BIRTH_UNKNOWN == 0 && i.birth_ns > 0));

    let lines1 = kill9(d1);

    // While nothing runs: 100 new connections, 50 of the old ones closed.
    let down_from = monotonic_ns();
    let born_down: Vec<Conn> = (0..100).map(|_| Conn::open(&l)).collect();
    let down_to = monotonic_ns();
    let mut closed = Vec::new();
    for s in servers.drain(..50) {
        let (local, remote) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        abort_on_close(&s);
        drop(s);
        closed.push(Tuple::new(local, remote));
        closed.push(Tuple::new(remote, local));
    }
    thread::sleep(Duration::from_millis(500));

    let server_ends: Vec<[String; 2]> = servers
        .iter()
        .map(|s| ends(s.local_addr().unwrap(), s.peer_addr().unwrap()))
        .chain(born_down.iter().map(|c| ends(c.local, c.remote)))
        .collect();
    let last_born = Instant::now();
    let d2 = Daemon::start(&args);
    let kept = d2.wait_for(
        "attached anew in place of the same build's",
        Duration::from_secs(1),
    );
    eprintln!("{kept}");
    let after = map_entries();
    let mut same = 0;
    for (t, was) in &before {
        if closed.contains(t) {
            assert!(
                !after.contains_key(t),
                "{t} closed while down, still mapped"
            );
            continue;
        }
        let now = after
            .get(t)
            .unwrap_or_else(|| panic!("{t} lost by the restart"));
        assert_eq!(now.birth_ns, was.birth_ns, "{t}: age changed");
        assert_eq!(now.seen_ns, was.seen_ns, "{t}: generation changed");
        same += 1;
    }
    assert_eq!(same, 4 * HALF - 100);
    for c in &born_down {
        for t in [Tuple::new(c.local, c.remote), Tuple::new(c.remote, c.local)] {
            let e = after
                .get(&t)
                .unwrap_or_else(|| panic!("{t}, born while down, not recorded"));
            assert_eq!(e.flags & FLAG_BIRTH_UNKNOWN, 0, "{t}: birth unknown");
            assert!(
                (down_from..=down_to).contains(&e.birth_ns),
                "{t}: born at {} outside [{down_from}, {down_to}]",
                e.birth_ns
            );
        }
    }
    // `list` shows the same ages, as of some moment while it ran.
    let list_from = monotonic_ns();
    let rows = list_json();
    // Joined by identity: the namespace and cookie the kernel recorded.
    let listed: HashMap<(u64, u64), f64> = rows
        .iter()
        .filter_map(|r| {
            let key = (r["netns"].as_u64()?, r["cookie"].as_u64()?);
            Some((key, r["age_secs"].as_f64()?))
        })
        .collect();
    let list_to = monotonic_ns();
    let mut checked = 0;
    let mut off = Vec::new();
    for (t, info) in after.iter().filter(|(t, _)| touches(t, port_n)) {
        if let Some(age) = listed.get(&(u64::from(info.netns), info.cookie)) {
            let lo = list_from.saturating_sub(info.birth_ns) as f64 / 1e9 - 0.01;
            let hi = list_to.saturating_sub(info.birth_ns) as f64 / 1e9 + 0.01;
            if !(lo..=hi).contains(age) {
                off.push(format!(
                    "{t}: listed {age} s, the map says {lo:.3} to {hi:.3} s"
                ));
            }
            checked += 1;
        }
    }
    // The map itself was compared exactly above; every listed age must agree with it.
    eprintln!("list: {checked} ages checked, {} off: {off:?}", off.len());
    assert!(off.is_empty(), "{} ages listed wrong: {off:?}", off.len());
    assert!(checked >= 4 * HALF - 100, "only {checked} listed with ages");

    // The limit, counted from the first burst, is reached a few seconds from now.
    let max_age = Duration::from_secs(started.elapsed().as_secs() + 10);
    config.set(&format!("{}s", max_age.as_secs()));
    signal(&d2, libc::SIGHUP);
    d2.wait_for("reloaded the policy", Duration::from_secs(30));

    // The wave: kill -9 once the first step is under way, start again at once.
    let first = Instant::now();
    while destroyed_counts(&d2.lines()).len() < 1000 {
        assert!(
            first.elapsed() < max_age + Duration::from_secs(10),
            "no wave of destroys"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let lines2 = kill9(d2);
    let restarting = Instant::now();
    let d3 = Daemon::start(&args);
    // Deadlines that came while no daemon ran are met as soon as the next has started.
    let restart = restarting.elapsed();
    let deadline = last_born + max_age + restart + Duration::from_secs(5);
    let all_dead = |servers: &[TcpStream], born_down: &[Conn]| {
        servers.iter().all(dead) && born_down.iter().all(|c| dead(&c.server))
    };
    while !all_dead(&servers, &born_down) {
        assert!(
            Instant::now() < deadline,
            "{} of {} connections opened before the restart and {} of {} born while no daemon ran still alive 5 s after their deadline (and the {restart:?} the restart took)",
            servers.iter().filter(|s| !dead(s)).count(),
            servers.len(),
            born_down.iter().filter(|c| !dead(&c.server)).count(),
            born_down.len()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let lines3 = d3.stop();

    // No socket destroyed twice, across the three daemons.
    let mut count: HashMap<String, usize> = HashMap::new();
    for lines in [&lines1, &lines2, &lines3] {
        for (t, n) in destroyed_counts(lines) {
            *count.entry(t).or_default() += n;
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "destroyed twice: {twice:?}");
    // Each connection has a decision on one of its ends, but for destroys the first
    // kill cut off between the destroy and its log line.
    let by_second = destroyed_counts(&lines2).len();
    let by_third = destroyed_counts(&lines3).len();
    // What the daemons said they were about to destroy, before each batch went out:
    // a kill between a destroy and its record leaves the intent naming it.
    let intended: HashSet<String> = [&lines1, &lines2, &lines3]
        .iter()
        .flat_map(|lines| lines.iter())
        .filter_map(|l| l.split_once(" (each is logged again once done): "))
        // The line's fields follow the list (` action="destroying" count=N`).
        .filter_map(|(_, named)| named.split(" action=").next())
        .flat_map(|named| named.split(", ").map(str::to_string))
        .collect();
    let mut unlogged = Vec::new();
    let mut intent_only = 0;
    for e in &server_ends {
        if !e.iter().any(|t| count.contains_key(t)) {
            if e.iter().any(|t| intended.contains(t)) {
                intent_only += 1;
            } else {
                unlogged.push(e[0].clone());
            }
        }
    }
    let unlogged_n = unlogged.len();
    eprintln!(
        "restart: {same} ages kept, 200 sockets born while down recorded, 100 closed while down gone; destroys: {by_second} by the daemon killed mid-wave, {by_third} by its successor; {intent_only} logged by their intent alone (the kill came between), {unlogged_n} with no line at all"
    );
    assert!(by_third > 0, "the successor had nothing left to destroy");
    // Every connection reset is accounted for by a line: its record, or the intent
    // written before its batch went to the kernel.
    assert!(
        unlogged.is_empty(),
        "{unlogged_n} connections died with no line: {:?}",
        &unlogged[..unlogged_n.min(10)]
    );
    drop(holder_a);
    drop(holder_b);
}

/// Sockets older than connwatch (opened while no program was attached: their birth is
/// unknown, the start-up dump finds them) keep the age bound their first sighting gave
/// them across a clean restart and a `kill -9`: with `--max-age` they die at the first
/// sighting + the limit, not at a restart + the limit. Data moves on them between the
/// restarts, so a dump made at a restart alone would date them later.
#[test]
fn restarts_keep_the_first_sighting_of_sockets_older_than_connwatch() {
    let _x = exclusive();
    // No program attached: the connections below predate connwatch.
    cleanup();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let conns: Vec<Conn> = (0..20).map(|_| Conn::open(&l)).collect();
    let opened = Instant::now();
    let port_n: u16 = p.parse().unwrap();
    let ours: HashSet<u64> = established_cookies(port_n).into_iter().collect();
    assert_eq!(ours.len(), 40);
    // The limit is an hour through the first two starts, then set before the third
    // from the time spent so far (a start takes seconds under emulation, a TCG guest),
    // counted from the first sighting: a start that dated them from itself would let
    // them live that many seconds longer.
    let config = MaxAgeConfig::new("connwatch-first-seen", &p, "1h");
    let args = ["--config", config.path(), "--enforce"];
    let d1 = Daemon::start(&args);
    let first_start = Instant::now();
    let watching = d1.wait_for("watching TCP sockets", Duration::from_secs(1));
    assert!(
        watching.contains("40 older than connwatch (age unknown; 0 of them"),
        "{watching}"
    );
    let traffic = |conns: &[Conn]| {
        use std::io::Write;
        for c in conns {
            (&c.client).write_all(b"x").unwrap();
            (&c.server).write_all(b"y").unwrap();
        }
    };
    thread::sleep(Duration::from_millis(2500));
    traffic(&conns);
    thread::sleep(Duration::from_millis(500));
    d1.stop();
    let d2 = Daemon::start(&args);
    let watching = d2.wait_for("watching TCP sockets", Duration::from_secs(1));
    assert!(
        watching.contains(
            "40 older than connwatch (age unknown; 40 of them first seen by an earlier start)"
        ),
        "{watching}"
    );
    thread::sleep(Duration::from_millis(1000));
    traffic(&conns);
    thread::sleep(Duration::from_millis(500));
    kill9(d2);
    let max_age = Duration::from_secs(first_start.elapsed().as_secs() + 10);
    config.set(&format!("{}s", max_age.as_secs()));
    let d3 = Daemon::start(&args);
    let watching = d3.wait_for("watching TCP sockets", Duration::from_secs(1));
    assert!(
        watching.contains(
            "40 older than connwatch (age unknown; 40 of them first seen by an earlier start)"
        ),
        "{watching}"
    );
    // Each dies by the first start + the limit (with a second of slack), and not before
    // its opening + the limit.
    let by = first_start + max_age + Duration::from_millis(1500);
    for c in &conns {
        let left = by.saturating_duration_since(Instant::now());
        c.dies_within(left).unwrap_or_else(|| {
            panic!(
                "{} still alive {:?} after the first start (limit {max_age:?}): a restart pushed its deadline back",
                c.tuple(),
                first_start.elapsed()
            )
        });
        assert!(
            opened.elapsed() + Duration::from_millis(300) >= max_age,
            "{} destroyed early, {:?} after its opening",
            c.tuple(),
            opened.elapsed()
        );
    }
    eprintln!(
        "older than connwatch: 20 connections dead {:?} after the first start, through a clean restart and a kill -9",
        first_start.elapsed()
    );
    // Once they are gone, the next start forgets their first sightings.
    d3.stop();
    let kept = || -> HashSet<u64> {
        FirstSeenFile::host()
            .read()
            .expect("the kept first sightings")
            .into_iter()
            .filter(|(id, _)| id.netns == host_netns())
            .map(|(id, _)| id.cookie)
            .collect()
    };
    let before = kept();
    assert!(ours.is_subset(&before), "the first sightings were not kept");
    let d4 = Daemon::start(&args);
    let after = kept();
    assert!(
        ours.is_disjoint(&after),
        "the first sightings of the destroyed sockets are still kept"
    );
    eprintln!(
        "first sightings on the host: {} before the last start, {} after",
        before.len(),
        after.len()
    );
    d4.stop();
}

/// An upgrade keeps the first sightings of sockets older than connwatch: builds before
/// this one kept them in a pinned map (`CW_FIRST_SEEN`); the first start of this build
/// takes them over into its file and removes that pin, so the sockets keep the age
/// bound the earlier build gave them.
#[test]
fn an_upgrade_takes_over_the_first_sightings_an_earlier_build_pinned() {
    let _x = exclusive();
    cleanup();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let port_n: u16 = p.parse().unwrap();
    let conns: Vec<Conn> = (0..3).map(|_| Conn::open(&l)).collect();
    let ours = established_cookies(port_n);
    assert_eq!(ours.len(), 6);
    // A start makes the pin directory; then it is left as an earlier build left it: no
    // file, the sightings in the pinned map, 30 s before now (a guest just booted
    // waits for its clock to get there).
    Daemon::start(&["--max-age", "1h", "--port", "1"]).stop();
    let file = FirstSeenFile::host();
    file.remove().unwrap();
    const EARLIER: u64 = 30_000_000_000;
    while monotonic_ns() < EARLIER + 1_000_000_000 {
        thread::sleep(Duration::from_millis(200));
    }
    let seen = monotonic_ns() - EARLIER;
    let pin = std::path::Path::new(pins::PIN_DIR.as_str()).join(connwatch_common::MAP_FIRST_SEEN);
    pin_first_seen(
        &pin,
        ours.iter().map(|c| ([*c, u64::from(host_netns())], seen)),
    );

    // Over a limit of 20 s by the sighting taken over, at 30 s; 2 s old by their
    // opening.
    let config = MaxAgeConfig::new("connwatch-upgrade", &p, "20s");
    let d = Daemon::start(&["--config", config.path(), "--enforce"]);
    let said = d.wait_for(
        "first sightings from the pinned map",
        Duration::from_secs(1),
    );
    assert!(said.contains("took over 6 first sightings"), "{said}");
    assert!(!pin.exists(), "the earlier build's pin is still there");
    let kept: HashMap<u64, u64> = file
        .read()
        .unwrap()
        .into_iter()
        .filter(|(id, _)| id.netns == host_netns())
        .map(|(id, at)| (id.cookie, at))
        .collect();
    for c in &ours {
        assert_eq!(kept.get(c), Some(&seen), "cookie {c}: {kept:?}");
    }
    for c in &conns {
        c.dies_within(Duration::from_secs(5)).unwrap_or_else(|| {
            panic!(
                "{} outlived its limit by the sighting taken over",
                c.tuple()
            )
        });
    }
    d.stop();
}

/// Pins a hash map `[cookie, netns inode]` -> ns at `path`, as builds before the
/// first-sightings file did, holding `entries`.
fn pin_first_seen(path: &std::path::Path, entries: impl Iterator<Item = ([u64; 2], u64)>) {
    use connwatch_common::bpf;
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"CW_FIRST_SEEN");
    let mut create = Create {
        map_type: 1, // BPF_MAP_TYPE_HASH
        key_size: 16,
        value_size: 8,
        max_entries: 1024,
        map_flags: 1, // BPF_F_NO_PREALLOC
        inner_map_fd: 0,
        numa_node: 0,
        map_name: name,
    };
    // SAFETY: no pointers in the attribute.
    let fd = unsafe { bpf(0, &mut create) }.expect("BPF_MAP_CREATE") as i32;
    // SAFETY: the kernel just gave it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    #[repr(C)]
    struct Update {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    for (key, at) in entries {
        let mut update = Update {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: std::ptr::addr_of!(at) as u64,
            flags: 0,
        };
        // SAFETY: key and value alive across the call, of the map's sizes.
        unsafe { bpf(2, &mut update) }.expect("BPF_MAP_UPDATE_ELEM");
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = Pin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: the path is NUL-terminated and alive across the call.
    unsafe { bpf(6, &mut pin) }.expect("BPF_OBJ_PIN");
}

/// A clean stop says what it leaves pinned; `connwatch cleanup` removes all of it, and
/// the programs behind the pinned links are gone with it.
#[test]
fn a_clean_stop_says_what_it_leaves_and_cleanup_removes_it_all() {
    let _x = exclusive();
    let d = Daemon::start(&["--max-age", "1h", "--port", "1"]);
    let lines = d.stop();
    let last = lines
        .iter()
        .rev()
        .find(|l| l.contains("stopping:"))
        .expect("a stop line");
    for want in [
        "left pinned in /sys/fs/bpf/connwatch",
        "CW_CONNS",
        "CW_EVENTS",
        "CW_STATS",
        "inet_sock_set_state",
        "still recorded",
        "connwatch cleanup",
    ] {
        assert!(last.contains(want), "{want}: {last}");
    }
    // Still recording while stopped.
    let l = listen("127.0.0.1");
    let c = Conn::open(&l);
    thread::sleep(Duration::from_millis(100));
    let e = map_entries();
    assert!(
        e.contains_key(&Tuple::new(c.local, c.remote)),
        "a socket born while stopped is recorded"
    );

    let mut pinned: HashSet<String> = std::fs::read_dir(pins::PIN_DIR.as_str())
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    // Sockets older than this daemon (any on the host) had their first sighting kept.
    let first_seen = FirstSeenFile::host();
    if first_seen.path().exists() {
        pinned.insert(first_seen.path().display().to_string());
    }
    let mut programs = Vec::new();
    // Each hook this kernel has (6.1 lacks the send/receive ones): the others are
    // never attached, so never pinned.
    for hook in available_hooks() {
        let link = aya::programs::links::PinnedLink::from_pin(pins::link_pin(hook.program))
            .expect("each hook's link is pinned");
        let link: aya::programs::links::FdLink = link.into();
        programs.push(link.info().unwrap().program_id());
    }
    let text = cleanup();
    let removed: HashSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("removed "))
        .map(str::to_string)
        .collect();
    assert_eq!(removed, pinned, "{text}");
    assert!(!std::path::Path::new(pins::PIN_DIR.as_str()).exists());
    assert!(!first_seen.path().exists(), "{text}");
    thread::sleep(Duration::from_millis(200));
    let loaded: HashSet<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect();
    for id in programs {
        assert!(!loaded.contains(&id), "program {id} outlived cleanup");
    }
    // And a fresh start attaches anew.
    let d = Daemon::start(&["--max-age", "1h", "--port", "1"]);
    d.wait_for("attached and pinned", Duration::from_secs(1));
    d.stop();
}

// ---------------------------------------------------------------------------------
// 2. Overflow

/// A map of 64 entries and a ring of 4 KiB, and a burst of 600 sockets while the daemon
/// is stopped (SIGSTOP): the kernel side counts its drops, the daemon notices, logs,
/// and reconciles with one sock_diag dump. In the end every live socket is tracked
/// (each gets its dry-run decision at its deadline), no closed one is (none gets any
/// line), and `list` agrees with the kernel.
#[test]
fn overflow_of_the_map_and_the_ring_is_noticed_and_reconciled() {
    let _x = exclusive();
    let _restore = fresh_pins();
    let l = big_listener();
    let p = port(&l);
    let port_n: u16 = p.parse().unwrap();
    let d = Daemon::start(&[
        "--max-conns",
        "64",
        "--ring-bytes",
        "4096",
        "--max-age",
        "10s",
        "--port",
        &p,
    ]);

    signal(&d, libc::SIGSTOP);
    let mut conns: Vec<Conn> = (0..300).map(|_| Conn::open(&l)).collect();
    let closed_early: Vec<Conn> = conns.drain(..100).collect();
    for c in &closed_early {
        abort_on_close(&c.client);
        abort_on_close(&c.server);
    }
    let closed_early: Vec<[String; 2]> = closed_early
        .into_iter()
        .map(|c| ends(c.local, c.remote))
        .collect();
    thread::sleep(Duration::from_millis(200));
    signal(&d, libc::SIGCONT);

    let drops = d.wait_for("the kernel side dropped records", Duration::from_secs(5));
    let number_before = |text: &str, what: &str| -> u64 {
        text.split(what)
            .next()
            .and_then(|s| s.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count before {what:?} in {text}"))
    };
    let map_full = number_before(&drops, " sockets not recorded (map full)");
    let ring_full = number_before(&drops, " events lost (ring full)");
    assert!(map_full > 0 && ring_full > 0, "{drops}");
    // The kernel program said so itself, through aya-log, once per CPU at most.
    let told = d.wait_for("the connection map is full", Duration::from_secs(2));
    assert!(told.contains("--max-conns"), "{told}");
    assert!(
        d.lines()
            .iter()
            .filter(|l| l.contains("the connection map is full"))
            .count()
            <= num_cpus(),
        "the kernel's diagnostic is not rare"
    );
    d.wait_for("reconciled with the kernel", Duration::from_secs(2));

    // Some more close while it runs; a second burst overflows again.
    let reconciles = |d: &Daemon| {
        d.lines()
            .iter()
            .filter(|l| l.contains("reconciled with the kernel"))
            .count()
    };
    let before = reconciles(&d);
    let mut closed_late = Vec::new();
    for c in conns.drain(..50) {
        abort_on_close(&c.client);
        abort_on_close(&c.server);
        closed_late.push(ends(c.local, c.remote));
    }
    thread::sleep(Duration::from_millis(100));
    conns.extend((0..100).map(|_| Conn::open(&l)));
    let t = Instant::now();
    while reconciles(&d) == before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no reconcile after the second burst"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // `list` and the kernel agree: the same sockets, ages where the map has them.
    let live: HashSet<(String, String)> = SockDiag::open()
        .unwrap()
        .dump(SockDiag::ALL_STATES)
        .unwrap()
        .into_iter()
        .filter(|s| touches(&s.tuple, port_n) && s.state != TcpState::LISTEN)
        .map(|s| (s.tuple.local.to_string(), s.tuple.remote.to_string()))
        .collect();
    let list_from = Instant::now();
    let rows = list_json();
    let list_to = Instant::now();
    let listed: HashSet<(String, String)> = rows
        .iter()
        .filter(|r| {
            let (a, b) = (r["local"].as_str().unwrap(), r["remote"].as_str().unwrap());
            a.ends_with(&format!(":{p}")) || b.ends_with(&format!(":{p}"))
        })
        .map(|r| {
            (
                r["local"].as_str().unwrap().into(),
                r["remote"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(listed, live, "list and the kernel disagree");
    assert_eq!(live.len(), 2 * conns.len());
    // Each end by both its addresses: the server ends all share the listener's.
    let opened: HashMap<(String, String), Instant> = conns
        .iter()
        .flat_map(|c| {
            let (a, b) = (c.local.to_string(), c.remote.to_string());
            [((a.clone(), b.clone()), c.opened), ((b, a), c.opened)]
        })
        .collect();
    for r in &rows {
        let (Some(local), Some(remote), Some(age)) = (
            r["local"].as_str(),
            r["remote"].as_str(),
            r["age_secs"].as_f64(),
        ) else {
            continue;
        };
        if let Some(at) = opened.get(&(local.to_string(), remote.to_string())) {
            // The age is as of some moment while `list` ran, which takes a while under
            // emulation (a TCG guest).
            let lo = list_from.duration_since(*at).as_secs_f64() - 1.0;
            let hi = list_to.duration_since(*at).as_secs_f64() + 1.0;
            assert!(
                (lo..=hi).contains(&age),
                "{local} -> {remote}: listed {age}, opened {lo:.3} + 1 to {hi:.3} - 1 s before and after the list"
            );
        }
    }
    // The map holds no dead socket.
    for (t, _) in map_entries().iter().filter(|(t, _)| touches(t, port_n)) {
        if t.local.port() != port_n || t.remote.port() != 0 {
            assert!(
                live.contains(&(t.local.to_string(), t.remote.to_string())),
                "{t} is dead but still mapped"
            );
        }
    }

    // Every live socket is tracked: each end gets its decision at its deadline.
    let last_open = conns.iter().map(|c| c.opened).max().unwrap();
    thread::sleep((last_open + Duration::from_secs(11)).saturating_duration_since(Instant::now()));
    let decided = d.decided(&["would destroy"]);
    let lines = d.stop();
    let mut missing = Vec::new();
    for c in &conns {
        for t in ends(c.local, c.remote) {
            if !decided.contains(&t) {
                missing.push(t);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} live sockets got no decision: {:?}",
        missing.len(),
        2 * conns.len(),
        &missing[..missing.len().min(5)]
    );
    // And no closed one is: not a single line names it (unless a live connection
    // took its tuple since: ephemeral ports are reused, and a log line names a tuple).
    let live_tuples: HashSet<String> = conns.iter().flat_map(|c| ends(c.local, c.remote)).collect();
    for t in closed_early
        .iter()
        .chain(&closed_late)
        .flatten()
        .filter(|t| !live_tuples.contains(*t))
    {
        assert!(
            !lines.iter().any(|l| l.contains(&format!(" {t} "))),
            "{t} was closed but the daemon still acted on it"
        );
    }
    eprintln!(
        "overflow: {map_full} sockets not recorded, {ring_full} events lost; {} reconciles; {} live sockets all decided, {} closed ones untouched",
        lines.iter().filter(|l| l.contains("reconciled with the kernel")).count(),
        2 * conns.len(),
        2 * (closed_early.len() + closed_late.len())
    );
}

/// A reconcile whose dump fails (most likely when the host is under load) leaves the
/// daemon up: the failure is logged and counted, deadlines still fire, and the next
/// try, once dumps work again, reconciles. The dumps fail through a seam of debug
/// builds (`CONNWATCH_FAULT_DUMP`: while its file exists); the reconciles are made
/// necessary by a full map, as in the test below.
#[test]
fn a_failed_dump_in_a_reconcile_leaves_the_daemon_up_and_is_tried_again() {
    let _x = exclusive();
    let _restore = fresh_pins();
    let fault = std::env::temp_dir().join(format!("connwatch-fault-dump-{}", std::process::id()));
    let _ = std::fs::remove_file(&fault);
    let l = big_listener();
    let p = port(&l);
    let d = Daemon::start_with_env(
        &[
            "--max-conns",
            "64",
            "--max-age",
            "6s",
            "--port",
            &p,
            "--enforce",
        ],
        &[("CONNWATCH_FAULT_DUMP", fault.to_str().unwrap())],
    );
    // In the map before it fills: its deadline must still fire while dumps fail.
    let first = Conn::open(&l);
    std::fs::write(&fault, b"").unwrap();
    // 300 sockets held: more than the map holds, so every stats tick sees drops.
    let held: Vec<Conn> = (0..150).map(|_| Conn::open(&l)).collect();
    let failed = d.wait_for(
        "reconciling with the kernel failed",
        Duration::from_secs(40),
    );
    assert!(failed.contains("fault injected"), "{failed}");
    assert!(
        first.died_within(Duration::from_secs(40)).is_some(),
        "a deadline did not fire while dumps failed"
    );
    let status = api(&serde_json::json!({"cmd": "status"}));
    assert!(
        status["counters"]["reconcile_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{status}"
    );
    // Dumps work again: the next try reconciles.
    std::fs::remove_file(&fault).unwrap();
    d.wait_for("reconciled with the kernel", Duration::from_secs(70));
    let lines = d.stop();
    assert!(
        !lines.iter().any(|l| l.contains("connwatch: error")),
        "the daemon ended with an error: {lines:#?}"
    );
    drop(held);
}

/// A connection map too small for the host's sockets, and churn that keeps it
/// overflowing (every new connection fails to get in): the daemon reconciles at
/// doubling intervals rather than at every stats tick, says once that the map is full
/// and which `--max-conns` to run with, and counts what it put off.
#[test]
fn a_full_map_is_reconciled_with_a_back_off_and_told_once() {
    let _x = exclusive();
    let _restore = fresh_pins();
    let l = big_listener();
    let p = port(&l);
    let d = Daemon::start(&["--max-conns", "64", "--max-age", "1h", "--port", &p]);
    // 400 sockets held: more than the map holds.
    let held: Vec<Conn> = (0..200).map(|_| Conn::open(&l)).collect();
    // Churn: a connection opened and reset every 20 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, l) = (stop.clone(), l.try_clone().unwrap());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = Conn::open(&l);
                abort_on_close(&c.client);
                abort_on_close(&c.server);
                drop(c);
                n += 1;
                thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    const RECONCILED: &str = "reconciled with the kernel";
    let count = |d: &Daemon| d.lines().iter().filter(|l| l.contains(RECONCILED)).count();
    // When each reconcile was seen.
    let from = Instant::now();
    let mut seen = Vec::new();
    let mut last = count(&d);
    while from.elapsed() < Duration::from_secs(32) {
        let n = count(&d);
        if n > last {
            seen.push(from.elapsed());
            last = n;
        }
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let churned = churn.join().unwrap();
    let status = api(&serde_json::json!({"cmd": "status"}));
    let lines = d.stop();
    let gaps: Vec<f64> = seen
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    eprintln!(
        "full map: {churned} connections churned in 32 s, {} reconciles at {seen:?} (gaps {gaps:?}); status counters {}",
        seen.len(),
        status["counters"]
    );
    // A reconcile at every 2 s tick would be 16; doubling waits (2, 4, 8, 16 s) leave 5.
    assert!(
        (3..=5).contains(&seen.len()),
        "{} reconciles in 32 s of a full map: {seen:?}",
        seen.len()
    );
    for w in gaps.windows(2) {
        assert!(
            w[1] >= 1.6 * w[0],
            "the wait between reconciles does not double: {gaps:?}"
        );
    }
    assert!(
        gaps.last().is_some_and(|g| *g >= 7.5),
        "the last wait is not long: {gaps:?}"
    );
    // Said once, with a size that fits.
    let told: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("the kernel's connection map is full ("))
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    let told = told[0];
    let number_after = |what: &str| -> u64 {
        told.split(what)
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {what:?} in {told}"))
    };
    assert_eq!(number_after("full ("), 64, "{told}");
    let sockets = number_after(" entries for ");
    let suggested = number_after("start with --max-conns ");
    // Counted at the first reconcile, which may come while the 400 held sockets are
    // still being opened on a slow machine (a TCG guest counted 313): more than the
    // map holds, at least.
    assert!(sockets > 64, "{told}");
    assert_eq!(
        suggested,
        (2 * sockets).next_power_of_two().max(128),
        "{told}"
    );
    assert!(told.contains("connwatch cleanup"), "{told}");
    // Counted: what ran, and the ticks that saw drops and left them for later.
    let c = &status["counters"];
    assert!(
        c["reconciles"].as_u64().unwrap() >= seen.len() as u64,
        "{c}"
    );
    assert!(c["reconciles_put_off"].as_u64().unwrap() >= 5, "{c}");
    drop(held);
}

/// A sweep of thousands (a dozen batches of destroys) destroys each connection once,
/// announces each before and records each once after, and its summary agrees.
#[test]
fn a_sweep_of_thousands_destroys_and_records_each_once() {
    let _x = exclusive();
    const N: usize = 3000;
    let l = big_listener();
    let p = port(&l);
    let acc = accept_n(&l, N);
    let holder = hold_clients(l.local_addr().unwrap(), N);
    let servers = acc.join().unwrap();
    // Named now: a destroyed socket has no peer address.
    let named: Vec<String> = servers
        .iter()
        .map(|s| ends(s.local_addr().unwrap(), s.peer_addr().unwrap())[0].clone())
        .collect();
    thread::sleep(Duration::from_millis(1500));

    let out = Command::new(BIN)
        .args(["sweep", "--idle", "1s", "--local-port", &p, "--enforce"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{log}");
    assert!(
        text.contains(&format!("matched={N} destroyed={N} skipped=0 failed=0")),
        "{text}"
    );
    let lines: Vec<String> = log.lines().map(str::to_string).collect();
    let counts = destroyed_counts(&lines);
    for (s, server_end) in servers.iter().zip(&named) {
        assert_eq!(
            counts.get(server_end),
            Some(&1),
            "{server_end} is not recorded destroyed exactly once"
        );
        assert!(dead(s), "{server_end} was recorded destroyed but lives");
    }
    assert_eq!(counts.len(), N, "destroyed lines for other connections");
    // Every destroy was announced before it was made.
    let announced: usize = lines
        .iter()
        .filter_map(|l| l.split_once(" (each is logged again once done): "))
        .filter_map(|(head, _)| head.rsplit("destroying ").next()?.split(' ').next())
        .map(|n| n.parse::<usize>().unwrap())
        .sum();
    assert_eq!(announced, N, "intent lines name {announced} destroys");
    drop(holder);
}

// ---------------------------------------------------------------------------------
// 4. Least privilege

fn status_caps(pid: u32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.starts_with("Cap") || *k == "NoNewPrivs")
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// A forked process named `name` (as uid `uid` if given) that connects to its own
/// listener and accepts: both ends are its own. The accepted end's owner is unknown to
/// the kernel program (born in softirq), so the daemon must find it in /proc.
fn protected_pair(listener: &TcpListener, name: &'static [u8], uid: Option<u32>) -> Forked {
    let SocketAddr::V4(v4) = listener.local_addr().unwrap() else {
        panic!("IPv4 only")
    };
    let addr = sockaddr(v4);
    let lfd = listener.as_raw_fd();
    Forked::spawn(&[lfd], move || {
        // SAFETY: system calls on our own process and descriptors.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
            if let Some(uid) = uid {
                if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                    || libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    return 20;
                }
            }
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                return 21;
            }
            if libc::accept(lfd, std::ptr::null_mut(), std::ptr::null_mut()) < 0 {
                return 22;
            }
        }
        0
    })
}

/// After loading, the daemon keeps CAP_NET_ADMIN, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH
/// and nothing else (bounding set included, no_new_privs set), and with them alone it
/// still destroys, reads and cleans its maps, finds the sockets of protected processes
/// of root and of another user in /proc, and reloads its config on SIGHUP.
#[test]
fn after_attaching_the_daemon_keeps_only_what_it_needs_and_it_suffices() {
    let _x = exclusive();
    let victims = listen("127.0.0.1");
    let by_root = listen("127.0.0.1");
    let by_nobody = listen("127.0.0.1");
    let dir = std::env::temp_dir().join(format!("connwatch-priv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("policy.toml");
    std::fs::write(
        &config,
        "exclude-process = [\"cw-protroot\", \"cw-protnobody\"]\n",
    )
    .unwrap();
    let d = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--max-age",
        "2s",
        "--port",
        &port(&victims),
        "--port",
        &port(&by_root),
        "--port",
        &port(&by_nobody),
        "--enforce",
    ]);
    let caps = status_caps(d.child.id());
    let want = format!(
        "{:016x}",
        1u64 << privilege::CAP_NET_ADMIN
            | 1 << privilege::CAP_SYS_ADMIN
            | 1 << privilege::CAP_SYS_PTRACE
            | 1 << privilege::CAP_DAC_READ_SEARCH
    );
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(caps[set], want, "{set}: {caps:?}");
    }
    assert_eq!(caps["CapInh"], "0000000000000000");
    assert_eq!(caps["CapAmb"], "0000000000000000");
    assert_eq!(caps["NoNewPrivs"], "1");

    let root_pair = protected_pair(&by_root, b"cw-protroot\0", None);
    let nobody_pair = protected_pair(&by_nobody, b"cw-protnobody\0", Some(65534));
    let victim = Conn::open(&victims);
    // And one in a network namespace of its own: reached with the kept set alone.
    let pod = TestNetns::new("priv");
    let victim_port = victims.local_addr().unwrap().port();
    let (_pod_listener, in_pod) = pod.enter(|| {
        let l = TcpListener::bind(("127.0.0.1", victim_port)).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (l, Conn::new(c, s))
    });
    let opened = Instant::now();
    // SIGHUP after the drop: the config is read again.
    signal(&d, libc::SIGHUP);
    d.wait_for("reloaded the policy", Duration::from_secs(2));

    assert!(
        victim.died_within(Duration::from_secs(4)).is_some(),
        "CAP_NET_ADMIN alone did not destroy the victim"
    );
    assert!(
        in_pod.died_within(Duration::from_secs(4)).is_some(),
        "the kept set did not reach into another network namespace"
    );
    thread::sleep((opened + Duration::from_secs(4)).saturating_duration_since(Instant::now()));
    let mut diag = SockDiag::open().unwrap();
    let mut alive_on = |l: &TcpListener| {
        let p = l.local_addr().unwrap().port();
        diag.dump(SockDiag::ALL_STATES)
            .unwrap()
            .into_iter()
            .filter(|s| s.tuple.local.port() == p && s.state == TcpState::ESTABLISHED)
            .count()
    };
    assert_eq!(alive_on(&by_root), 1, "root's protected connection died");
    assert_eq!(
        alive_on(&by_nobody),
        1,
        "nobody's protected connection died"
    );
    let lines = d.stop();
    for l in [&by_root, &by_nobody] {
        let p = format!(":{} -> ", l.local_addr().unwrap().port());
        assert!(
            lines
                .iter()
                .any(|x| x.contains(" protected ") && x.contains(&p)),
            "no protection found through /proc for port {p}"
        );
    }
    drop((root_pair, nobody_pair));
}

/// Pinned objects, their directory and the control socket are root's alone.
#[test]
fn pinned_objects_and_the_control_socket_are_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let _x = exclusive();
    let d = Daemon::start(&["--max-age", "1h", "--port", "1"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(std::path::Path::new(pins::PIN_DIR.as_str())), 0o700);
    let mut n = 0;
    for e in std::fs::read_dir(pins::PIN_DIR.as_str()).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p) & 0o077, 0, "{} is open to others", p.display());
        n += 1;
    }
    let hooks = available_hooks().count();
    assert!(n >= 3 + 2 * hooks, "{n} pinned objects for {hooks} hooks");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["test", "-e"])
        .arg(std::path::Path::new(pins::PIN_DIR.as_str()).join("CW_CONNS"))
        .status()
        .expect("setpriv (util-linux)");
    assert!(!out.success(), "nobody can see the pinned map");
    let socket = connwatch::control::protocol::socket_path(None);
    let meta = std::fs::metadata(&socket).expect("the control socket exists");
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.uid(), 0, "{} is not root's", socket.display());
    }
    assert_eq!(mode(&socket), 0o600, "{}", socket.display());
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["test", "-w"])
        .arg(&socket)
        .status()
        .expect("setpriv (util-linux)");
    assert!(!out.success(), "nobody can write to the control socket");
    d.stop();
}

/// The unit in dist/ verifies, names only real capabilities, and the daemon runs with
/// its bounding set and no_new_privs alone: it loads, drops to its three, destroys.
#[test]
fn the_systemd_unit_verifies_and_its_capabilities_suffice() {
    let unit_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/connwatch.service");
    let unit = std::fs::read_to_string(unit_path).unwrap();
    let value = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("the unit has no {key}="))
            .to_string()
    };
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelModules", "yes"),
    ] {
        assert_eq!(value(key), want, "{key}");
    }
    let bounding: Vec<String> = value("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let known: Vec<String> = (0..=40).map(privilege::name).collect();
    for c in &bounding {
        assert!(known.contains(c), "{c} is not a capability");
    }
    for (c, _) in privilege::KEEP {
        assert!(
            bounding.contains(&privilege::name(c)),
            "{} missing",
            privilege::name(c)
        );
    }
    // systemd-analyze checks the unit against the binary we built.
    let dir = std::env::temp_dir().join(format!("connwatch-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("connwatch.service");
    std::fs::write(&copy, unit.replace("/usr/sbin/connwatch", BIN)).unwrap();
    // --man=no: Documentation= names connwatch(8), installed by the package, not here.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian's systemd package) verifies the unit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let about_us: Vec<&str> = err.lines().filter(|l| l.contains("connwatch")).collect();
    assert!(about_us.is_empty(), "systemd-analyze: {about_us:?}");

    // The daemon under the unit's bounding set and no_new_privs, nothing else.
    let _x = exclusive();
    let set = format!(
        "-all,{}",
        bounding
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    );
    let l = listen("127.0.0.1");
    let mut child = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            &format!("--bounding-set={set}"),
            "--no-new-privs",
        ])
        .args([
            BIN,
            "run",
            "--max-age",
            "1s",
            "--port",
            &port(&l),
            "--enforce",
        ])
        .env("CONNWATCH_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let reader = thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("daemon: {l}");
            sink.lock().unwrap().push(l);
        }
    });
    let t = Instant::now();
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("watching TCP sockets"))
    {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "the daemon under the unit's capabilities exited: {st}: {:?}",
                lines.lock().unwrap()
            );
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no start");
        thread::sleep(Duration::from_millis(20));
    }
    let c = Conn::open(&l);
    let died = c.died_within(Duration::from_secs(3));
    // SAFETY: signalling our own child (setpriv exec'd the daemon in place).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    reader.join().unwrap();
    assert!(st.success(), "{st}");
    assert!(
        died.is_some(),
        "not destroyed under the unit's capabilities"
    );
}

// ---------------------------------------------------------------------------------
// 5. Faults from the kernel

/// A daemon without CAP_NET_ADMIN: it says so at start, each refused destroy is logged
/// once with its reason and counted, and nothing is retried in a loop.
#[test]
fn a_refused_destroy_is_logged_once_counted_and_not_retried() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let mut child = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-net_admin"])
        .args([
            BIN,
            "run",
            "--max-age",
            "1s",
            "--port",
            &port(&l),
            "--enforce",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    let stderr = child.stderr.take().unwrap();
    let (tx, started) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .inspect(|l| {
                eprintln!("daemon: {l}");
                if l.contains("watching TCP sockets") {
                    let _ = tx.send(());
                }
            })
            .collect::<Vec<String>>()
    });
    // Started (seconds under emulation), so the stop below is one it handles.
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the daemon did not start");
    let conns: Vec<Conn> = (0..5).map(|_| Conn::open(&l)).collect();
    // Deadlines at 1 s; then 4 s more in which nothing may be tried again.
    thread::sleep(Duration::from_secs(5));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("CAP_NET_ADMIN was not granted")),
        "no warning at start"
    );
    assert!(
        lines.iter().any(|l| l.contains("SOCK_DESTROY was refused")),
        "the start-up probe did not report the refusal"
    );
    let mut failed = 0;
    for c in &conns {
        assert!(!c.is_dead(), "destroyed without CAP_NET_ADMIN?");
        for t in ends(c.local, c.remote) {
            let n = lines
                .iter()
                .filter(|l| l.contains(&format!("failed to destroy {t} ")))
                .count();
            assert_eq!(n, 1, "{t}: {n} failure lines");
            let line = lines
                .iter()
                .find(|l| l.contains(&format!("failed to destroy {t} ")))
                .unwrap();
            assert!(line.contains("permission denied"), "no reason: {line}");
            failed += 1;
        }
    }
    let stop = lines.iter().find(|l| l.contains("stopping:")).unwrap();
    assert!(
        stop.contains(&format!("{failed} failed")),
        "not counted: {stop}"
    );
}

/// A destroy the kernel does not answer (made here through the seam at the sock_diag
/// boundary: `CONNWATCH_FAULT_DESTROY=transient:2`, honoured by debug builds) does not
/// lose the socket's deadline: it is tried again after 1 s, then 2 s, and destroyed at
/// the third try; each failure logged, the retries counted.
#[test]
fn a_destroy_that_gets_no_answer_is_tried_again_with_a_back_off() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let d = Daemon::start_with_env(
        &["--max-age", "1s", "--remote-port", &p, "--enforce"],
        &[("CONNWATCH_FAULT_DESTROY", "transient:2")],
    );
    let c = Conn::open(&l);
    let died = c
        .died_within(Duration::from_secs(10))
        .expect("the deadline was lost after a failure that could pass");
    assert!(
        died >= Duration::from_millis(3800),
        "destroyed at {died:?}: sooner than 1 s + 1 s + 2 s of back-off"
    );
    let failed = format!("failed to destroy {}", c.tuple());
    let lines = d.lines();
    assert_eq!(
        lines.iter().filter(|l| l.contains(&failed)).count(),
        2,
        "{lines:#?}"
    );
    d.wait_for(&format!("destroyed {}", c.tuple()), Duration::from_secs(1));
    let status = api(&serde_json::json!({"cmd": "status"}));
    assert_eq!(status["counters"]["retried"], 2, "{status}");
    d.stop();
}

/// A socket gone between the lookup and the destroy: ENOENT, reported as gone.
#[test]
fn a_socket_gone_before_the_destroy_is_reported_as_gone() {
    common::require_root("destroys sockets through sock_diag");
    let l = listen("127.0.0.1");
    let c = Conn::open(&l);
    let mut diag = SockDiag::open().unwrap();
    let sock = diag
        .get(&Tuple::new(c.local, c.remote))
        .unwrap()
        .expect("sock_diag finds it");
    abort_on_close(&c.client);
    drop(c);
    thread::sleep(Duration::from_millis(50));
    match diag.destroy(&sock) {
        Err(DestroyError::Gone) => {}
        other => panic!("destroying a closed socket gave {other:?}"),
    }
}

/// The control socket cannot be used against the daemon: at most 64 connections at
/// once (the rest are closed), idle ones closed after 30 s, and neither idle clients,
/// a request that never ends nor a client that reads no replies delay a deadline.
/// A socket at `--api-socket` that another program listens on is never taken over.
#[test]
fn control_clients_cannot_hold_up_the_daemon_or_take_a_socket() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let _x = exclusive();

    // Another program's socket.
    let dir = std::env::temp_dir().join(format!("connwatch-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let theirs = dir.join("theirs.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--api-socket", theirs.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("another program listens on") && err.contains("theirs.sock"),
        "{err}"
    );
    assert!(theirs.exists(), "another program's socket was removed");

    let l = listen("127.0.0.1");
    let p = port(&l);
    let d = Daemon::start(&["--max-age", "1s", "--remote-port", &p, "--enforce"]);
    let socket = "/run/connwatch.sock";
    // Idle clients up to the limit, and beyond it.
    let idle: Vec<UnixStream> = (0..80)
        .map(|_| UnixStream::connect(socket).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(300));
    let closed = idle
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut b = [0u8; 1];
            matches!((&**s).read(&mut b), Ok(0))
        })
        .count();
    assert_eq!(closed, 80 - 64, "the connections over the limit are closed");
    drop(idle);
    thread::sleep(Duration::from_millis(200));
    // A request that never ends, and a client that asks and never reads.
    let mut dribble = UnixStream::connect(socket).unwrap();
    dribble.write_all(b"{\"cmd\":").unwrap();
    let mut deaf = UnixStream::connect(socket).unwrap();
    for _ in 0..200 {
        deaf.write_all(b"{\"cmd\":\"list\"}\n").unwrap();
    }
    let c = Conn::open(&l);
    c.died_within(Duration::from_secs(3))
        .expect("a deadline was held up by control clients");
    let status = api(&serde_json::json!({"cmd": "status"}));
    assert_eq!(status["ok"], true, "{status}");
    d.stop();
}
