//! connwatch on a host with network namespaces: real namespaces (`ip netns add`), real
//! loopback connections inside them, a real daemon. Each socket is known by the cookie
//! and namespace the kernel recorded: a twin tuple elsewhere is another socket.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

mod common;
use common::*;

/// A connection whose both ends live in `ns`, from `from` (port 0: any) to a listener
/// on 127.0.0.1:`port` made there too.
fn conn_in(ns: &TestNetns, port: u16, from: u16) -> (TcpListener, Conn) {
    ns.enter(|| {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let to = l.local_addr().unwrap();
        let c = connect_from(SocketAddr::from(([127, 0, 0, 1], from)), to);
        let (s, _) = l.accept().unwrap();
        (l, Conn::new(c, s))
    })
}

/// The rows of `list --json` for one client tuple.
fn rows_for(local: SocketAddr, remote: SocketAddr) -> Vec<serde_json::Value> {
    list_rows(&[])
        .into_iter()
        .filter(|r| r["local"] == local.to_string() && r["remote"] == remote.to_string())
        .collect()
}

/// The exact bug of a host with containers: a protected host connection and its twin
/// (the same 4-tuple) in another namespace, younger and unprotected. Only the twin
/// dies, at its own deadline; the host one is judged protected at its own; `list`
/// shows each with its own namespace, age and owner.
#[test]
fn twins_in_two_namespaces_each_meet_their_own_fate() {
    let _x = exclusive();
    let pod = TestNetns::new("twin");
    let host_listener = listen("127.0.0.1");
    let p = port(&host_listener);
    // Client ends only (the accepted ends are this test's, not bash's).
    let d = Daemon::start(&[
        "--max-age",
        "3s",
        "--remote-port",
        &p,
        "--exclude-process",
        "bash",
        "--enforce",
    ]);
    // The host's connection, owned by a protected process.
    let mut bash = Command::new("bash")
        .arg("-c")
        .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{p}; read -t 30 <&3"))
        .spawn()
        .expect("bash");
    let (host_server, _) = host_listener.accept().unwrap();
    let host_client = host_server.peer_addr().unwrap();
    let server_addr = host_listener.local_addr().unwrap();
    thread::sleep(Duration::from_millis(1500));
    // Its twin in the pod: the same tuple, 1.5 s younger, owned by this test.
    let (_pod_listener, twin) = conn_in(&pod, server_addr.port(), host_client.port());
    assert_eq!((twin.local, twin.remote), (host_client, server_addr));

    // Both listed, each with its own namespace, owner and age.
    thread::sleep(Duration::from_millis(300));
    let rows = rows_for(host_client, server_addr);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let host_row = rows
        .iter()
        .find(|r| r["netns"] == host_netns())
        .expect("the host's connection is listed");
    let pod_row = rows
        .iter()
        .find(|r| r["netns"] == pod.inode)
        .expect("the pod's connection is listed");
    assert_eq!(host_row["process"], "bash", "{host_row}");
    assert_eq!(pod_row["pid"], std::process::id(), "{pod_row}");
    assert_ne!(host_row["cookie"], pod_row["cookie"]);
    let host_age = host_row["age_secs"].as_f64().expect("a known age");
    let pod_age = pod_row["age_secs"].as_f64().expect("a known age");
    assert!(
        host_age - pod_age > 1.0 && host_age - pod_age < 2.5,
        "ages {host_age} and {pod_age}"
    );

    // The twin dies at its own deadline: 3 s after its own birth, not the host's.
    let died = twin
        .died_within(Duration::from_secs(8))
        .expect("the pod's connection was destroyed");
    assert!(
        died >= Duration::from_millis(2900),
        "destroyed after {died:?}: another socket's deadline"
    );
    let line = d.wait_for(
        &format!("destroyed {} -> {}", twin.local, twin.remote),
        Duration::from_secs(2),
    );
    assert!(line.contains(&format!("netns={}", pod.inode)), "{line}");
    // The host's was judged at its own deadline and spared for its owner.
    let spared = d.wait_for(
        &format!("protected {host_client} -> {server_addr}"),
        Duration::from_secs(2),
    );
    assert!(
        spared.contains("process bash") && spared.contains(&format!("netns={}", host_netns())),
        "{spared}"
    );
    host_server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1];
    match (&host_server).read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the host's protected connection was touched: {other:?}"),
    }
    let _ = bash.kill();
    let _ = bash.wait();
    d.stop();
}

/// A policy reaches into other namespaces (the peer there sees the reset), and
/// `--netns host` keeps it to the host.
#[test]
fn rules_reach_other_namespaces_unless_narrowed_to_the_host() {
    let _x = exclusive();
    let pod = TestNetns::new("reach");
    let l = listen("127.0.0.1");
    let p = l.local_addr().unwrap().port();

    // Client ends only: the accepted end is the peer that must see the reset.
    let d = Daemon::start(&[
        "--max-age",
        "1s",
        "--remote-port",
        &p.to_string(),
        "--netns",
        "host",
        "--enforce",
    ]);
    let (_pl, in_pod) = conn_in(&pod, p, 0);
    let on_host = Conn::open(&l);
    on_host
        .died_within(Duration::from_secs(4))
        .expect("the host's connection was destroyed");
    thread::sleep(Duration::from_millis(1500));
    assert!(
        !in_pod.is_dead(),
        "--netns host destroyed a pod's connection"
    );
    d.stop();

    let d = Daemon::start(&[
        "--max-age",
        "1s",
        "--remote-port",
        &p.to_string(),
        "--enforce",
    ]);
    let mut server = in_pod.server.try_clone().unwrap();
    in_pod
        .dies_within(Duration::from_secs(6))
        .expect("the pod's connection was destroyed");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 1];
    let err = server.read(&mut buf).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "the peer in the pod sees a reset"
    );
    let line = d.wait_for(
        &format!("destroyed {}", in_pod.tuple()),
        Duration::from_secs(2),
    );
    assert!(line.contains(&format!("netns={}", pod.inode)), "{line}");
    d.stop();
}

/// `--max-conns-per-ip` counts an address per namespace: 127.0.0.1 in the pod is not
/// 127.0.0.1 on the host.
#[test]
fn the_per_address_limit_counts_per_namespace() {
    let _x = exclusive();
    let pod = TestNetns::new("perip");
    let l = listen("127.0.0.1");
    let p = l.local_addr().unwrap().port();
    let d = Daemon::start(&[
        "--max-conns-per-ip",
        "1",
        "--local-port",
        &p.to_string(),
        "--enforce",
    ]);
    let on_host = Conn::open(&l);
    let (pod_listener, in_pod) = conn_in(&pod, p, 0);
    thread::sleep(Duration::from_millis(1500));
    assert!(
        !on_host.is_dead() && !in_pod.is_dead(),
        "one each is within the limit"
    );
    // A second one in the pod is over its namespace's limit.
    let second = pod.enter(|| {
        let c = TcpStream::connect(pod_listener.local_addr().unwrap()).unwrap();
        let (s, _) = pod_listener.accept().unwrap();
        Conn::new(c, s)
    });
    second
        .died_within(Duration::from_secs(4))
        .expect("the newest connection over the pod's limit was destroyed");
    assert!(
        !on_host.is_dead() && !in_pod.is_dead(),
        "the older ones live"
    );
    d.stop();
}

/// A namespace deleted while it holds connections leaves nothing behind: neither the
/// daemon's list nor the kernel map keeps its sockets.
#[test]
fn a_deleted_namespace_leaves_no_ghosts() {
    let _x = exclusive();
    let d = Daemon::start(&["--max-age", "1h", "--port", "1"]);
    let inode;
    {
        let pod = TestNetns::new("ghost");
        inode = pod.inode;
        let conns: Vec<(TcpListener, Conn)> = (0..5).map(|_| conn_in(&pod, 0, 0)).collect();
        thread::sleep(Duration::from_millis(300));
        let listed = list_rows(&[])
            .into_iter()
            .filter(|r| r["netns"] == inode)
            .count();
        assert_eq!(listed, 10, "both ends of 5 connections");
        // The namespace goes with its sockets (no process holds it any more).
        drop(conns);
    }
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = list_rows(&[]);
        let ghosts_listed = rows.iter().filter(|r| r["netns"] == inode).count();
        let ghosts_mapped = connwatch::kernel::pins::open_pinned_conns()
            .unwrap()
            .entries()
            .into_iter()
            .filter(|(_, info)| info.netns == inode)
            .count();
        if ghosts_listed == 0 && ghosts_mapped == 0 {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "{ghosts_listed} listed, {ghosts_mapped} in the map, of a deleted namespace"
        );
        thread::sleep(Duration::from_millis(200));
    }
    d.stop();
}

/// A manual destroy of a tuple that exists in two namespaces is refused as ambiguous;
/// naming the namespace destroys that one only.
#[test]
fn a_manual_destroy_of_twins_names_the_namespace() {
    let _x = exclusive();
    let pod = TestNetns::new("manual");
    let l = listen("127.0.0.1");
    let p = l.local_addr().unwrap().port();
    let d = Daemon::start(&["--max-age", "1h", "--port", "1", "--enforce"]);
    let on_host = Conn::open(&l);
    let (_pl, twin) = conn_in(&pod, p, on_host.local.port());
    assert_eq!(twin.tuple(), on_host.tuple());
    thread::sleep(Duration::from_millis(300));
    let ask = |netns: Option<String>| {
        let mut req = json!({
            "cmd": "destroy",
            "local": on_host.local.to_string(),
            "remote": on_host.remote.to_string(),
        });
        if let Some(n) = netns {
            req["netns"] = json!(n);
        }
        api(&req)
    };
    let refused = ask(None);
    assert_eq!(refused["ok"], false, "{refused}");
    let why = refused["error"].as_str().unwrap();
    assert!(
        why.contains("2 network namespaces")
            && why.contains(&pod.inode.to_string())
            && why.contains("netns"),
        "{why}"
    );
    assert!(!on_host.is_dead() && !twin.is_dead());

    let done = ask(Some(pod.name.clone()));
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(done["outcome"], "destroyed", "{done}");
    assert_eq!(done["record"]["netns"], pod.inode, "{done}");
    twin.dies_within(Duration::from_secs(3))
        .expect("the named twin was destroyed");
    assert!(!on_host.is_dead(), "the host's twin lives");
    d.stop();
}

/// A cgroup of the test's own in the host's cgroup v2 tree, removed when dropped; its
/// last path part has the shape Docker gives its containers' cgroups.
struct TestCgroup {
    dir: std::path::PathBuf,
    /// As connwatch shows it: the path below the cgroup2 mount.
    path: String,
}

impl TestCgroup {
    fn new() -> TestCgroup {
        let root = connwatch::kernel::cgroup::cgroup2_root();
        let id = format!("{:064x}", std::process::id());
        let rel = format!("cwtest-{}/docker-{id}.scope", std::process::id());
        let dir = root.join(&rel);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make a cgroup at {}: {e}", dir.display()));
        TestCgroup {
            dir,
            path: format!("/{rel}"),
        }
    }

    /// A bash, moved into this cgroup before it connects to `port` and waits.
    fn bash_connecting_to(&self, port: &str) -> std::process::Child {
        let procs = self.dir.join("cgroup.procs");
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}; exec 3<>/dev/tcp/127.0.0.1/{port}; read -t 30 <&3",
                procs.display()
            ))
            .spawn()
            .expect("bash")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Who a connection belongs to: the cgroup of the process that opened it, shown as a
/// path and as the container it names; `--exclude-cgroup` protects it, `--cgroup`
/// selects it alone.
#[test]
fn the_cgroup_names_the_container_and_selects_or_protects() {
    let _x = exclusive();
    let cg = TestCgroup::new();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let d = Daemon::start(&[
        "--max-age",
        "2s",
        "--remote-port",
        &p,
        "--exclude-cgroup",
        &cg.path,
        "--enforce",
    ]);
    let mut bash = cg.bash_connecting_to(&p);
    let (from_bash, _) = l.accept().unwrap();
    let bash_end = from_bash.peer_addr().unwrap();
    let mine = Conn::open(&l);
    thread::sleep(Duration::from_millis(300));
    let row = list_rows(&[])
        .into_iter()
        .find(|r| r["local"] == bash_end.to_string())
        .expect("bash's connection is listed");
    assert_eq!(row["cgroup"], cg.path.as_str(), "{row}");
    let want = format!("docker:{}", &format!("{:064x}", std::process::id())[..12]);
    assert_eq!(row["container"], want.as_str(), "{row}");
    assert_eq!(row["direction"], "out", "{row}");
    mine.dies_within(Duration::from_secs(5))
        .expect("the connection outside the cgroup was destroyed");
    let line = d.wait_for(&format!("protected {bash_end} -> "), Duration::from_secs(3));
    assert!(line.contains(&format!("cgroup {}", cg.path)), "{line}");
    d.stop();

    // Selected alone by --cgroup: bash's dies, one outside lives.
    let d = Daemon::start(&[
        "--max-age",
        "1s",
        "--remote-port",
        &p,
        "--cgroup",
        "*docker-*",
        "--enforce",
    ]);
    let outside = Conn::open(&l);
    from_bash
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    let seen = (&from_bash).read(&mut buf);
    assert!(
        matches!(&seen, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "bash's end was not destroyed: {seen:?}"
    );
    thread::sleep(Duration::from_millis(1500));
    assert!(
        !outside.is_dead(),
        "--cgroup selected a connection outside it"
    );
    let _ = bash.kill();
    let _ = bash.wait();
    d.stop();
}

/// `--direction in` chooses the accepted end of a connection, never the end this host
/// connected from; `--direction out` the reverse. `list` says which is which.
#[test]
fn direction_selects_the_accepted_or_the_connecting_end() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    for (direction, chosen_is_server) in [("in", true), ("out", false)] {
        let d = Daemon::start(&["--max-age", "1s", "--port", &p, "--direction", direction]);
        let c = Conn::open(&l);
        thread::sleep(Duration::from_millis(200));
        let rows = list_rows(&["--port", &p]);
        let dir_of = |local: SocketAddr| {
            rows.iter()
                .find(|r| r["local"] == local.to_string())
                .map(|r| r["direction"].clone())
        };
        assert_eq!(dir_of(c.local), Some(json!("out")), "{rows:?}");
        assert_eq!(dir_of(c.remote), Some(json!("in")), "{rows:?}");
        let (chosen, spared) = if chosen_is_server {
            (format!("{} -> {}", c.remote, c.local), c.tuple())
        } else {
            (c.tuple(), format!("{} -> {}", c.remote, c.local))
        };
        d.wait_for(&format!("would destroy {chosen} "), Duration::from_secs(4));
        thread::sleep(Duration::from_millis(500));
        let lines = d.stop();
        assert!(
            !lines
                .iter()
                .any(|l| l.contains(&format!("destroy {spared} "))),
            "--direction {direction} chose the other end: {lines:?}"
        );
    }
}
