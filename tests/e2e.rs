//! End to end: the real daemon binary, the real eBPF program, real loopback
//! connections, and what the peer of each connection sees.
//!
//! These tests need root and a kernel with BPF, tracepoints and SOCK_DESTROY. Without
//! them they fail and say why: they never pass by skipping.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Duration;

use connwatch::conn::{cookie_from_diag, SockId, Tuple};
use connwatch::engine::destroy::{self, Outcome};
use connwatch::kernel::sock_diag::SockDiag;
use connwatch::kernel::{layout, load, netns, pins};

use connwatch::track::{Source, Tracked, Tracker};

mod common;
use common::*;

/// A connection to port 22, which connwatch must never touch: to sshd if it runs,
/// else to a listener of our own on 22.
fn ssh_conn() -> (Option<TcpListener>, Conn) {
    let own = TcpListener::bind("127.0.0.1:22").ok();
    let client = TcpStream::connect("127.0.0.1:22").expect("connect to port 22");
    let server = match &own {
        Some(l) => l.accept().unwrap().0,
        None => client.try_clone().unwrap(),
    };
    (own, Conn::new(client, server))
}

/// The scenario of the issue: with `--max-age 2s`, matching connections die within a
/// second of their deadline, the others live on; a dry run kills nothing and decides
/// the same.
/// Returns the tuples the daemon decided on, and, per matching connection, the tuples
/// of its two ends.
fn max_age_scenario(ip: &str, enforce: bool) -> (BTreeSet<String>, Vec<[String; 2]>) {
    let matching = listen(ip);
    let other = listen(ip);
    let excluded = listen(ip);
    let before = Conn::open(&matching); // exists before the daemon: age unknown
    let mut args = vec!["--max-age", "2s", "--port"];
    let (mp, xp) = (port(&matching), port(&excluded));
    args.extend([
        mp.as_str(),
        "--port",
        xp.as_str(),
        "--exclude-port",
        xp.as_str(),
    ]);
    args.extend(["--port", "22"]);
    if enforce {
        args.push("--enforce");
    }
    let d = Daemon::start(&args);
    // The daemon may take a while to start on a slow machine (a TCG guest): the old
    // connection's deadline counts from then at the latest.
    let ready = before.opened.elapsed();
    let young = Conn::open(&matching);
    let spared = [Conn::open(&other), Conn::open(&excluded)];
    let (_own22, ssh) = if ip == "127.0.0.1" {
        let (l, c) = ssh_conn();
        (l, Some(c))
    } else {
        (None, None)
    };

    thread::sleep(Duration::from_millis(1500));
    assert!(
        !young.is_dead(),
        "a connection younger than the limit was destroyed"
    );

    let deadline = Duration::from_secs(2);
    for (name, c, due) in [
        ("started before the daemon", &before, deadline.max(ready)),
        ("born under the daemon", &young, deadline),
    ] {
        let died = c.died_within(due + Duration::from_secs(if enforce { 1 } else { 3 }));
        if enforce {
            let at = died.unwrap_or_else(|| panic!("{name}: still alive 1 s after its deadline"));
            if name == "born under the daemon" {
                // Its birth is the SYN, a little before `opened`.
                let early = deadline - Duration::from_millis(50);
                assert!(at >= early, "{name}: destroyed early, at {at:?}");
            }
        } else {
            assert_eq!(died, None, "{name}: a dry run destroyed it");
        }
    }
    thread::sleep(Duration::from_millis(500));
    for c in spared.iter().chain(ssh.iter()) {
        assert!(!c.is_dead(), "{} should have lived on", c.tuple());
        (&c.client)
            .write_all(b"x")
            .expect("spared connection still writable");
    }
    let verb = if enforce {
        "destroyed"
    } else {
        "would destroy"
    };
    d.wait_for(verb, Duration::from_secs(1));
    let decided = d.decided(if enforce {
        &["destroyed"]
    } else {
        &["would destroy"]
    });
    // Let a round still due for the other end finish before the stop.
    thread::sleep(Duration::from_millis(200));
    let lines = d.stop();
    for c in spared.iter().chain(ssh.iter()) {
        let t = c.tuple();
        assert!(
            !lines.iter().any(|l| l.contains(&t)),
            "spared {t} appears in the log"
        );
    }
    let ends = |c: &Conn| {
        let (l, r) = (c.local, c.remote);
        [format!("{l} -> {r}"), format!("{r} -> {l}")]
    };
    let conns = vec![ends(&before), ends(&young)];
    if enforce {
        // A destroyed end, each connection; the other end skipped only because that
        // destroy reset it; no other decision.
        assert_each_destroyed(&lines, &conns);
    }
    (decided, conns)
}

/// With --enforce, destroying one end resets the other, so either end may be the one
/// logged; each matching connection must have at least one.
fn assert_each_decided(decided: &BTreeSet<String>, conns: &[[String; 2]]) {
    for ends in conns {
        assert!(
            ends.iter().any(|t| decided.contains(t)),
            "no decision logged for {ends:?}: {decided:?}"
        );
    }
    let all: BTreeSet<String> = conns.iter().flatten().cloned().collect();
    assert!(decided.is_subset(&all), "decided on others: {decided:?}");
}

#[test]
fn max_age_destroys_matching_connections_and_spares_the_rest_ipv4() {
    let _x = exclusive();
    let (decided, conns) = max_age_scenario("127.0.0.1", true);
    assert_each_decided(&decided, &conns);
}

#[test]
fn max_age_works_on_ipv6() {
    let _x = exclusive();
    let (decided, conns) = max_age_scenario("[::1]", true);
    assert_each_decided(&decided, &conns);
    assert!(
        decided.iter().all(|t| t.starts_with("[::1]")),
        "{decided:?}"
    );
}

#[test]
fn dry_run_destroys_nothing_and_decides_the_same() {
    let _x = exclusive();
    let (decided, conns) = max_age_scenario("127.0.0.1", false);
    // Both ends of both matching connections, and nothing else: what a live run
    // decides on before the first destroy resets the other end.
    let all: BTreeSet<String> = conns.iter().flatten().cloned().collect();
    assert_eq!(decided, all);
}

#[test]
fn log_lines_have_the_documented_form() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    // `--direction out` selects the end this process connect()ed: the one whose owner
    // the kernel program learned at connect(), in this process.
    let d = Daemon::start(&[
        "--max-age",
        "1s",
        "--port",
        &port(&l),
        "--direction",
        "out",
        "--enforce",
    ]);
    let c = Conn::open(&l);
    let line = d.wait_for("destroyed ", Duration::from_secs(4));
    let client_side = format!(
        "destroyed {} state=ESTABLISHED age=1s reason=max-age",
        c.tuple()
    );
    let (_, decided) = line
        .split_once(" INFO ")
        .unwrap_or_else(|| panic!("{line}"));
    let decided = decided.trim_start_matches(|ch: char| !ch.is_ascii_alphabetic());
    assert!(decided.starts_with(&client_side), "{line}");
    // The owner is named: this process, in the host's namespace.
    let owner = format!("({}) netns={}", std::process::id(), host_netns());
    assert!(
        decided.contains(" owner=") && decided.contains(&owner),
        "{line}"
    );
    let lines = d.stop();
    assert_eq!(
        lines.iter().filter(|l| l.contains(" destroyed ")).count(),
        1,
        "only the client end is selected"
    );
}

#[test]
fn json_log_format_carries_the_fields() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let d = Daemon::start(&[
        "--log-format",
        "json",
        "--max-age",
        "1s",
        "--port",
        &port(&l),
    ]);
    let c = Conn::open(&l);
    let line = d.wait_for("would destroy", Duration::from_secs(4));
    assert!(!c.is_dead());
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["action"], "would destroy");
    assert_eq!(v["state"], "ESTABLISHED");
    assert_eq!(v["reason"], "max-age");
    assert_eq!(v["dry_run"], true);
    let local = v["local"].as_str().unwrap().to_string();
    let mine = [c.local, c.remote];
    assert!(mine.iter().any(|a| a.to_string() == local), "{local}");
    d.stop();
}

/// A connection whose 4-tuple was reused by a new connection is not the one the policy
/// chose: the destroyer must leave the new one alone, whichever way the old one was
/// known (kernel map or start-up dump).
#[test]
fn a_reused_tuple_survives() {
    let _x = exclusive();
    let mut loaded = load::load_and_attach(load::Sizes::default()).expect("load the eBPF program");
    // No daemon here: the kernel program sends only what a filter asks for.
    load::write_filter(&mut loaded.filter, &connwatch_common::Filter::everything()).unwrap();
    let mut diag = SockDiag::open().unwrap();
    let listener = listen("127.0.0.1");
    let addr = listener.local_addr().unwrap();
    let connect_from_port = |local_port: u16| -> (TcpStream, TcpStream) {
        let local = SocketAddr::from(([127, 0, 0, 1], local_port));
        let c = connect_from(local, addr);
        (c, listener.accept().unwrap().0)
    };

    // The first connection, known to the map and to a start-up dump.
    let (c1, s1) = connect_from_port(0);
    let tuple = Tuple::new(c1.local_addr().unwrap(), addr);
    let mut tracker = Tracker::new();
    drain_into(&mut loaded, &mut tracker);
    let keys = tracker.keys_with_tuple(&tuple);
    assert_eq!(keys.len(), 1, "the map recorded the client end once");
    let key = keys[0];
    let chosen_from_map = tracker.get(key).unwrap();
    assert_eq!(chosen_from_map.source, Source::Map);
    let first = diag.get(&tuple).unwrap().expect("sock_diag sees it");
    let host = netns::own().unwrap();
    assert_eq!(
        chosen_from_map.id,
        SockId::new(host, cookie_from_diag(first.cookie)),
        "the kernel recorded the cookie and namespace sock_diag reports"
    );
    let chosen_from_dump = Tracked {
        source: Source::Seeded,
        ..chosen_from_map
    };

    // Close it without TIME_WAIT (RST), then open a new connection on the same tuple.
    abort_on_close(&c1);
    drop(c1);
    drop(s1);
    thread::sleep(Duration::from_millis(50));
    let (c2, mut s2) = connect_from_port(tuple.local.port());
    assert_eq!(
        c2.local_addr().unwrap(),
        tuple.local,
        "the tuple was reused"
    );

    for chosen in [chosen_from_map, chosen_from_dump] {
        let outcome = destroy::execute(&mut diag, Some(&loaded.conns), key, &chosen, true);
        assert!(
            matches!(outcome, Outcome::Skipped(_)),
            "{:?} decision about the old connection hit the new one: {outcome:?}",
            chosen.source
        );
    }
    (&c2).write_all(b"ok").unwrap();
    let mut buf = [0u8; 2];
    s2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok", "the new connection lives");

    // And the new connection itself, once chosen, is destroyed.
    drain_into(&mut loaded, &mut tracker);
    let key2 = tracker.keys_with_tuple(&tuple)[0];
    let chosen = tracker.get(key2).unwrap();
    let outcome = destroy::execute(&mut diag, Some(&loaded.conns), key2, &chosen, true);
    assert!(matches!(outcome, Outcome::Destroyed), "{outcome:?}");
    let err = s2.read(&mut buf).unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionReset,
        "the peer sees a reset"
    );
}

/// A daemon that found its ring empty for a second sleeps on it and has the kernel wake
/// it at the next event (the filter's `wake_each`); one that polls is woken only once a
/// share of the ring is unread. A reader asleep in poll(2) sees the difference: one
/// connection wakes it in the first case, not in the second.
#[test]
fn one_event_wakes_a_sleeping_reader_not_a_polling_one() {
    use std::os::fd::AsRawFd;
    let _x = exclusive();
    let mut loaded = load::load_and_attach(load::Sizes::default()).expect("load the eBPF program");
    let listener = listen("127.0.0.1");
    let fd = loaded.events.as_raw_fd();
    // Whether poll(2) returned before its timeout: at its timeout it reports the
    // unread data all the same.
    let mut woken_by_one_connection = |wake_each: u32, wait: Duration| -> bool {
        // Only this listener's connections are sent: nothing else on the host counts.
        let mut filter = connwatch_common::Filter::off();
        filter.active = 1;
        filter.states = u32::MAX;
        filter.add_port(listener.local_addr().unwrap().port());
        filter.wake_each = wake_each;
        load::write_filter(&mut loaded.filter, &filter).unwrap();
        // Caught up: poll(2) reports a ring with unread data at once, asleep or not.
        while loaded.events.next().is_some() {}
        let reader = thread::spawn(move || {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let asleep_since = std::time::Instant::now();
            // SAFETY: one pollfd, the ring's descriptor, alive until the join below.
            let ready = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
            assert_eq!(ready, 1, "the ring has the connection's events");
            asleep_since.elapsed()
        });
        thread::sleep(Duration::from_millis(500));
        let conn = Conn::open(&listener);
        let slept = reader.join().unwrap();
        drop(conn);
        slept < wait / 2
    };
    assert!(
        !woken_by_one_connection(0, Duration::from_secs(3)),
        "a polling reader was woken by one connection: the kernel wakes it at every event"
    );
    assert!(
        woken_by_one_connection(1, Duration::from_secs(20)),
        "a sleeping reader was not woken by a connection: its events wait for the next poll"
    );
}

/// The connection map read in batches (`BPF_MAP_LOOKUP_BATCH`) holds what reading it
/// key by key holds: every one of a listener's connections, both ends, with the same
/// entry. More connections than one batch, so the read spans batches. IPv6 connections
/// among them, whose addresses the kernel keeps apart: each end read either way has its
/// own addresses and ports, as the socket itself says.
#[test]
fn the_map_read_in_batches_holds_what_reading_key_by_key_holds() {
    let _x = exclusive();
    let loaded = load::load_and_attach(load::Sizes::default()).expect("load the eBPF program");
    let listener = listen("127.0.0.1");
    let port = listener.local_addr().unwrap().port();
    let listener6 = listen("[::1]");
    let port6 = listener6.local_addr().unwrap().port();
    let n = load::BATCH_ENTRIES / 2 + 100;
    let conns: Vec<Conn> = (0..n).map(|_| Conn::open(&listener)).collect();
    let conns6: Vec<Conn> = (0..100).map(|_| Conn::open(&listener6)).collect();
    type Row = (u64, u64, std::net::SocketAddr, std::net::SocketAddr);
    let ours = |entries: Vec<(u64, connwatch_common::ConnInfo)>| -> BTreeSet<Row> {
        entries
            .into_iter()
            .filter(|(_, i)| [port, port6].contains(&i.sport) || [port, port6].contains(&i.dport))
            .filter_map(|(k, i)| {
                let t = Tuple::from_info(&i)?;
                Some((k, i.cookie, t.local, t.remote))
            })
            .collect()
    };
    let batched = ours(
        loaded
            .conns
            .entries_batched()
            .expect("the kernel reads the map in batches"),
    );
    let one_by_one = ours(loaded.conns.entries_one_by_one());
    // The listeners and both ends of each connection.
    assert_eq!(
        one_by_one.len(),
        2 * n + 1 + 2 * 100 + 1,
        "the map holds each end"
    );
    assert!(
        loaded.conns.entries().len() > load::BATCH_ENTRIES,
        "the read spans more than one batch"
    );
    assert_eq!(batched, one_by_one);
    let ends: BTreeSet<(std::net::SocketAddr, std::net::SocketAddr)> = conns
        .iter()
        .chain(&conns6)
        .flat_map(|c| [(c.local, c.remote), (c.remote, c.local)])
        .collect();
    let read: BTreeSet<_> = batched.iter().map(|(_, _, l, r)| (*l, *r)).collect();
    for end in &ends {
        assert!(read.contains(end), "{end:?} is read with its own addresses");
    }
    drop(conns);
    drop(conns6);
}

fn drain_into(loaded: &mut load::Loaded, tracker: &mut Tracker) {
    thread::sleep(Duration::from_millis(50));
    while let Some(item) = loaded.events.next() {
        assert!(item.len() >= std::mem::size_of::<connwatch_common::EntryEvent>());
        // SAFETY: the program writes whole EntryEvent records (checked above).
        let record = unsafe {
            std::ptr::read_unaligned(item.as_ptr() as *const connwatch_common::EntryEvent)
        };
        tracker.apply(&connwatch_common::ConnEvent::from_record(&record));
    }
}

#[test]
fn list_reports_ages_of_connections_opened_at_known_times() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let d = Daemon::start(&["--max-age", "1h", "--port", &port(&l)]);
    let old = Conn::open(&l);
    thread::sleep(Duration::from_secs(2));
    let new = Conn::open(&l);
    thread::sleep(Duration::from_millis(300));
    let out = Command::new(BIN).args(["list", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let age_of = |c: &Conn| -> f64 {
        let local = c.client.local_addr().unwrap().to_string();
        let row = rows
            .iter()
            .find(|r| r["local"] == local.as_str())
            .unwrap_or_else(|| panic!("{local} not listed"));
        assert_eq!(row["state"], "ESTABLISHED");
        assert!(row["state_secs"].is_number());
        row["age_secs"].as_f64().expect("a known age")
    };
    let (a_old, a_new) = (age_of(&old), age_of(&new));
    let want_old = old.opened.elapsed().as_secs_f64();
    let want_new = new.opened.elapsed().as_secs_f64();
    assert!(
        (a_old - want_old).abs() < 1.0,
        "old: listed {a_old}, opened {want_old} s ago"
    );
    assert!(
        (a_new - want_new).abs() < 1.0,
        "new: listed {a_new}, opened {want_new} s ago"
    );
    // The table form shows the same connection.
    let table = Command::new(BIN).arg("list").output().unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("STATE"), "{text}");
    assert!(
        text.contains(&old.client.local_addr().unwrap().to_string()),
        "{text}"
    );
    d.stop();
}

/// The kernel sends the daemon only what its policy can act on. A connection no rule
/// can select crosses no ring buffer, yet `list` shows it with its true age (read from
/// the map); a reload that selects it makes the daemon follow it and act on it.
#[test]
fn an_unselected_connection_is_listed_with_its_age_and_followed_after_a_reload() {
    let _x = exclusive();
    let dir = std::env::temp_dir().join(format!("connwatch-filter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("connwatch.toml");
    let selected = listen("127.0.0.1");
    let other = listen("127.0.0.1");
    let (ps, po) = (port(&selected), port(&other));
    std::fs::write(&path, format!("max-age = \"1h\"\nremote-port = [{ps}]\n")).unwrap();
    let d = Daemon::start(&["--config", path.to_str().unwrap(), "--enforce"]);
    let events_before = api(&serde_json::json!({"cmd": "status"}))["counters"]["events"]
        .as_u64()
        .unwrap();
    let quiet = Conn::open(&other);
    thread::sleep(Duration::from_secs(2));
    let followed = Conn::open(&selected);
    thread::sleep(Duration::from_millis(300));
    let status = api(&serde_json::json!({"cmd": "status"}));
    let events = status["counters"]["events"].as_u64().unwrap() - events_before;
    let rows = list_rows(&[]);
    let row_of = |c: &Conn| {
        let local = c.client.local_addr().unwrap().to_string();
        let remote = c.client.peer_addr().unwrap().to_string();
        rows.iter()
            .find(|r| r["local"] == local.as_str() && r["remote"] == remote.as_str())
            .unwrap_or_else(|| panic!("{local} not listed: {rows:?}"))
            .clone()
    };
    let q = row_of(&quiet);
    assert_eq!(q["state"], "ESTABLISHED");
    let age = q["age_secs"].as_f64().expect("a known age");
    let want = quiet.opened.elapsed().as_secs_f64();
    assert!(
        (age - want).abs() < 1.0,
        "listed {age}, opened {want} s ago"
    );
    assert!(q["next_rule"].is_null(), "no rule selects it: {q}");
    assert!(row_of(&followed)["next_rule"].is_string());
    // The followed connection's client end became established (its server end is
    // on another port, unselected): the unselected one sent nothing at all.
    assert!(
        events <= 3,
        "{events} events for one followed connection and one unselected"
    );

    // Widened: the unselected connection is followed from the map, with its true
    // birth, and destroyed when it is older than the new limit.
    std::fs::write(
        &path,
        format!("max-age = \"1h\"\nremote-port = [{ps}]\n\n[[rule]]\nname = \"wide\"\nmax-age = \"3s\"\nremote-port = [{po}]\n"),
    )
    .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    d.wait_for("reloaded the policy", Duration::from_secs(2));
    let after = quiet
        .died_within(Duration::from_secs(5))
        .expect("the widened policy did not act on the connection");
    let age_at_death = quiet.opened.elapsed().as_secs_f64();
    assert!(
        age_at_death >= 3.0,
        "destroyed at {age_at_death} s, before its 3 s ({after:?} after the reload)"
    );
    assert!(
        !followed.is_dead(),
        "the 1h rule's connection was destroyed"
    );
    d.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// IPv6 addresses that no entry claims are removed when a daemon starts; a live IPv6
/// connection keeps its own. A socket can leave its addresses unclaimed when its close
/// went unseen and a new socket took its address. The test writes such an element
/// itself, at a key no socket has.
#[test]
fn addresses_no_entry_claims_are_removed_and_a_live_sockets_kept() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    let _x = exclusive();
    let loaded = load::load_and_attach(load::Sizes::default()).expect("load the eBPF program");
    drop(loaded);
    let l = listen("[::1]");
    let c = Conn::open(&l);
    let path = std::path::Path::new(pins::PIN_DIR.as_str()).join(connwatch_common::MAP_ADDRS6);
    let open = || -> BpfHashMap<MapData, u64, [u8; 32]> {
        BpfHashMap::try_from(Map::HashMap(MapData::from_pin(&path).unwrap())).unwrap()
    };
    // Kernel socket addresses are 8-aligned kernel pointers: never 1.
    const ORPHAN: u64 = 1;
    open().insert(ORPHAN, [7u8; 32], 0).unwrap();
    let ours = |m: &BpfHashMap<MapData, u64, [u8; 32]>| -> usize {
        let mine: [u8; 16] = std::net::Ipv6Addr::LOCALHOST.octets();
        m.iter()
            .filter_map(Result::ok)
            .filter(|(_, a)| a[..16] == mine && a[16..] == mine)
            .count()
    };
    let live_before = ours(&open());
    assert!(
        live_before >= 2,
        "both ends of the connection keep their addresses"
    );
    let d = Daemon::start(&["--max-age", "1h", "--port", &port(&l)]);
    d.wait_for(
        "removed the IPv6 addresses of 1 sockets whose close went unseen",
        Duration::from_secs(10),
    );
    let after = open();
    assert!(
        after.get(&ORPHAN, 0).is_err(),
        "the unclaimed element is gone"
    );
    assert_eq!(
        ours(&after),
        live_before,
        "the live sockets' addresses stay"
    );
    // And the connection is listed with them.
    let out = Command::new(BIN).args(["list", "--json"]).output().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        rows.iter()
            .any(|r| r["local"] == c.local.to_string() && r["remote"] == c.remote.to_string()),
        "{rows:#?}"
    );
    d.stop();
}

#[test]
fn a_restarted_daemon_keeps_the_ages() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let d = Daemon::start(&["--max-age", "1h", "--port", &port(&l)]);
    let c = Conn::open(&l);
    let gone = Conn::open(&l);
    thread::sleep(Duration::from_millis(200));
    d.stop();
    // Closed while the daemon is stopped: the program, still attached through its
    // pinned link, sees the close and removes both ends from the map.
    let gone_ends = [
        Tuple::new(gone.local, gone.remote),
        Tuple::new(gone.remote, gone.local),
    ];
    drop(gone);
    thread::sleep(Duration::from_secs(1));
    let d = Daemon::start(&["--max-age", "1h", "--port", &port(&l)]);
    let map = pins::open_pinned_conns().unwrap();
    let in_map: Vec<Tuple> = map
        .entries()
        .into_iter()
        .filter_map(|(_, info)| Tuple::from_info(&info))
        .collect();
    for t in &gone_ends {
        assert!(!in_map.contains(t), "{t} closed but is still in the map");
    }
    let out = Command::new(BIN).args(["list", "--json"]).output().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let local = c.local.to_string();
    let row = rows
        .iter()
        .find(|r| r["local"] == local.as_str())
        .expect("listed");
    let age = row["age_secs"].as_f64().expect("age survived the restart");
    assert!(
        (age - c.opened.elapsed().as_secs_f64()).abs() < 1.0,
        "{age}"
    );
    d.stop();
}

#[test]
fn bad_input_is_one_line_naming_the_value_and_nothing_runs() {
    for (args, needle) in [
        (vec!["run", "--port", "9-3"], "9-3"),
        (vec!["run", "--max-age", "soon"], "soon"),
        (vec!["run", "--max-age", "0s"], "0s"),
        (vec!["run", "--frobnicate"], "--frobnicate"),
        (vec!["run", "--exclude-port", "70000"], "70000"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A bad config file: one line naming the file, line and field; nothing loads.
    let dir = std::env::temp_dir().join(format!("connwatch-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "port = [8080]\nidle = \"forever\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--enforce", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.toml:2: idle:") && err.contains("forever"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn not_root_is_refused_before_anything_loads() {
    require_root("switches to an unprivileged user to check the refusal");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "run",
            "--max-age",
            "1m",
        ])
        .output()
        .expect("setpriv (util-linux) runs the daemon as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn check_passes_on_this_machine() {
    let _x = exclusive();
    let out = Command::new(BIN).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for what in [
        "privileges",
        "BPF",
        "BTF",
        "tracepoint",
        "SOCK_DESTROY",
        "eBPF object",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(what)),
            "{what}: {text}"
        );
    }
}

#[test]
fn a_second_daemon_is_refused() {
    let _x = exclusive();
    let d = Daemon::start(&["--max-age", "1h"]);
    let out = Command::new(BIN)
        .args(["run", "--max-age", "1h"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another `connwatch run` is active"), "{err}");
    d.stop();
}

/// A kernel without `CONFIG_INET_DIAG_DESTROY` (made here through the seam at the
/// sock_diag boundary, `CONNWATCH_FAULT_DESTROY=unsupported`, which debug builds
/// honour: no kernel on this machine lacks it): `check` says so and what still works,
/// `run --enforce` refuses to start with a one-line reason, `run` without it observes
/// and lists.
#[test]
fn without_sock_destroy_enforce_is_refused_and_the_rest_works() {
    let _x = exclusive();
    let fault = [("CONNWATCH_FAULT_DESTROY", "unsupported")];
    let out = Command::new(BIN).arg("check").envs(fault).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("SOCK_DESTROY"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.starts_with("FAIL")
            && line.contains("CONFIG_INET_DIAG_DESTROY")
            && line.contains("can still observe and list"),
        "{line}"
    );

    let l = listen("127.0.0.1");
    let p = port(&l);
    let out = Command::new(BIN)
        .args(["run", "--max-age", "1s", "--port", &p, "--enforce"])
        .envs(fault)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run --enforce started: {err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("--enforce needs SOCK_DESTROY")
            && last.contains("CONFIG_INET_DIAG_DESTROY")
            && last.contains("run without --enforce"),
        "{err}"
    );

    let d = Daemon::start_with_env(&["--max-age", "1s", "--port", &p], &fault);
    let c = Conn::open(&l);
    d.wait_for(
        &format!("would destroy {}", c.tuple()),
        Duration::from_secs(4),
    );
    let rows = list_rows(&["--port", &p]);
    assert!(
        rows.iter().any(|r| r["local"] == c.local.to_string()),
        "{rows:?}"
    );
    assert!(!c.is_dead());
    d.stop();
}

/// `check` reports the one hook connwatch needs present, with its layout checked.
#[test]
fn check_reports_the_hook_present() {
    require_root("reads the tracepoints under tracefs");
    let out = Command::new(BIN).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for hook in &layout::HOOKS {
        let tp = format!("{}:{}", hook.category, hook.name);
        let line = text
            .lines()
            .find(|l| l.contains("tracepoint") && l.contains(&tp))
            .unwrap_or_else(|| panic!("no line for {tp}: {text}"));
        layout::check_hook(hook).unwrap();
        assert!(line.starts_with("ok") && line.contains("present"), "{line}");
    }
}

/// A socket bound to a device (`SO_BINDTODEVICE`) is found by the exact lookup only
/// when the lookup names that device: the kernel recorded it, the destroy uses it.
#[test]
fn a_device_bound_connection_is_destroyed() {
    use std::os::fd::{AsRawFd, FromRawFd};
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let d = Daemon::start(&["--max-age", "1s", "--remote-port", &p, "--enforce"]);
    // SAFETY: a fresh socket, owned by the stream made from it below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let dev = b"lo\0";
    // SAFETY: setsockopt with a NUL-terminated device name on our socket.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            dev.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_BINDTODEVICE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: we own fd; the stream closes it.
    let raw = unsafe { TcpStream::from_raw_fd(fd) };
    let to = l.local_addr().unwrap();
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect with a valid sockaddr_in and its size.
    let rc = unsafe {
        libc::connect(
            raw.as_raw_fd(),
            std::ptr::addr_of!(sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    let c = Conn::new(raw, l.accept().unwrap().0);
    c.died_within(Duration::from_secs(4))
        .expect("the device-bound connection was not destroyed");
    let line = d.wait_for(&format!("destroyed {}", c.tuple()), Duration::from_secs(1));
    assert!(line.contains("reason=max-age"), "{line}");
    d.stop();
}

/// An IPv6 link-local connection (fe80::, scoped to its interface) between two network
/// namespaces joined by a veth pair: both ends are bound to their device by the scope,
/// and the daemon, which records the device, destroys it like any other.
#[test]
fn an_ipv6_link_local_connection_is_destroyed() {
    use std::net::{Ipv6Addr, SocketAddrV6};
    let _x = exclusive();
    let a = TestNetns::new("lla");
    let b = TestNetns::new("llb");
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("ip (iproute2)");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (va, vb) = (
        format!("cwa{}", std::process::id()),
        format!("cwb{}", std::process::id()),
    );
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
    ip(&["link", "set", &va, "netns", &a.name]);
    ip(&["link", "set", &vb, "netns", &b.name]);
    ip(&[
        "-n",
        &a.name,
        "addr",
        "add",
        "fe80::a/64",
        "dev",
        &va,
        "nodad",
    ]);
    ip(&[
        "-n",
        &b.name,
        "addr",
        "add",
        "fe80::b/64",
        "dev",
        &vb,
        "nodad",
    ]);
    ip(&["-n", &a.name, "link", "set", &va, "up"]);
    ip(&["-n", &b.name, "link", "set", &vb, "up"]);
    let server_addr: Ipv6Addr = "fe80::a".parse().unwrap();
    let l = a.enter(|| TcpListener::bind("[::]:0").unwrap());
    let p = port(&l);
    let d = Daemon::start(&["--max-age", "1s", "--port", &p, "--enforce"]);
    let client = b.enter(|| {
        let name = std::ffi::CString::new(vb.clone()).unwrap();
        // SAFETY: a NUL-terminated name; the index is this namespace's.
        let scope = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(scope > 0, "{vb}: {}", std::io::Error::last_os_error());
        let to = SocketAddrV6::new(server_addr, l.local_addr().unwrap().port(), 0, scope);
        // Neighbour discovery on a link just up may take a moment.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect_timeout(&to.into(), Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < end => {
                    eprintln!("connect {to}: {e}; again");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("connect {to}: {e}"),
            }
        }
    });
    let c = Conn::new(client, l.accept().unwrap().0);
    assert!(
        c.local.ip().to_string().starts_with("fe80::"),
        "{}",
        c.tuple()
    );
    c.died_within(Duration::from_secs(5))
        .expect("the link-local connection was not destroyed");
    // Either end's destroy resets the other: one end destroyed, the other at most
    // skipped as gone by then, neither left to fail.
    d.wait_for("destroyed [fe80::", Duration::from_secs(2));
    thread::sleep(Duration::from_millis(300));
    let lines = d.stop();
    // As the log names them: addresses without their scope.
    let bare = |a: SocketAddr| format!("[{}]:{}", a.ip(), a.port());
    let ends = [
        format!("{} -> {}", bare(c.local), bare(c.remote)),
        format!("{} -> {}", bare(c.remote), bare(c.local)),
    ];
    let destroyed = assert_each_destroyed(&lines, &[ends]);
    for t in &destroyed {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("destroyed {t} ")))
            .unwrap();
        assert!(line.contains("reason=max-age"), "{line}");
    }
    let _ = Command::new("ip")
        .args(["-n", &a.name, "link", "del", &va])
        .output();
}

/// Many destroys due at once are spread over two sock_diag sockets: each connection is
/// destroyed once, each logged once, none missed, none of another port touched.
#[test]
fn a_mass_destroy_on_two_threads_destroys_each_connection_once() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let spared = listen("127.0.0.1");
    // Server ends on the selected local port, all older than the limit when the daemon
    // starts, so all due at once: more than the 4096 that go to two threads.
    let conns: Vec<Conn> = (0..4500).map(|_| Conn::open(&l)).collect();
    let other = Conn::open(&spared);
    thread::sleep(Duration::from_millis(1200));
    let d = Daemon::start(&["--max-age", "1s", "--local-port", &port(&l), "--enforce"]);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while conns.iter().any(|c| !c.is_dead()) && std::time::Instant::now() < end {
        thread::sleep(Duration::from_millis(100));
    }
    let alive = conns.iter().filter(|c| !c.is_dead()).count();
    assert_eq!(alive, 0, "{alive} of {} connections survived", conns.len());
    assert!(
        !other.is_dead(),
        "a connection no rule selects was destroyed"
    );
    // The records follow the destroys: on a slow machine they take a while to write.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut lines = d.lines();
    while lines.iter().filter(|l| l.contains(" destroyed ")).count() < conns.len()
        && std::time::Instant::now() < end
    {
        thread::sleep(Duration::from_millis(100));
        lines = d.lines();
    }
    thread::sleep(Duration::from_millis(300));
    let lines = d.lines();
    let destroyed: Vec<&String> = lines.iter().filter(|l| l.contains(" destroyed ")).collect();
    let unique: BTreeSet<&String> = destroyed.iter().copied().collect();
    assert_eq!(
        destroyed.len(),
        conns.len(),
        "one destroy line a connection"
    );
    assert_eq!(unique.len(), destroyed.len());
    // They were due in one round (the debug log says how many), large enough to be
    // spread over two threads.
    let round = lines
        .iter()
        .filter_map(|l| {
            l.split("round of ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(round >= 4096, "the largest round had {round} deadlines");
    d.stop();
}
