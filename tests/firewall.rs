//! Blocking that holds: `--block-firewall` puts a blocked address in connwatch's own
//! nftables set, in the network namespace where its connection lived, for
//! `--block-for`. Root, the real eBPF program, `nft` (Debian's `nftables`; `cargo
//! xtask test` installs it) and a network namespace of the test's own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

mod common;
use common::*;

/// Whether a connection from `local` to `to` is accepted within `within`: a
/// non-blocking connect, polled.
fn connects_from(local: SocketAddr, to: SocketAddr, within: Duration) -> bool {
    // SAFETY: plain socket calls on a descriptor closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0);
        let sin = |a: SocketAddr| {
            let SocketAddr::V4(v4) = a else {
                panic!("IPv4 only")
            };
            libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes(v4.ip().octets()).to_be(),
                },
                sin_zero: [0; 8],
            }
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let me = sin(local);
        assert_eq!(
            libc::bind(fd, &me as *const _ as *const libc::sockaddr, len),
            0
        );
        let them = sin(to);
        libc::connect(fd, &them as *const _ as *const libc::sockaddr, len);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ready = libc::poll(&mut pfd, 1, within.as_millis() as i32);
        let mut err: libc::c_int = 0;
        let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut elen,
        );
        libc::close(fd);
        ready == 1 && err == 0
    }
}

/// `nft ARGS` inside the namespace.
fn nft(ns: &TestNetns, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft"])
        .args(args)
        .output()
        .expect("ip netns exec nft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn metrics(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn a_blocked_address_stays_out_until_its_block_expires() {
    let _x = exclusive();
    let ns = TestNetns::new("fw");
    let l: TcpListener = ns.enter(|| listen("127.0.0.1"));
    let to = l.local_addr().unwrap();
    let bad: SocketAddr = "127.0.0.2:0".parse().unwrap();
    let good: SocketAddr = "127.0.0.3:0".parse().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", {
        let p = TcpListener::bind("127.0.0.1:0").unwrap();
        p.local_addr().unwrap().port()
    });
    let d = Daemon::start_when_free(&[
        "--block",
        "127.0.0.2/32",
        "--block-firewall",
        "--block-for",
        "5s",
        "--netns",
        &ns.name,
        "--enforce",
        "--metrics-addr",
        &metrics_addr,
    ]);
    assert!(
        d.lines()
            .iter()
            .any(|l| l.contains("blocked in the firewall for 5s")),
        "the policy says so: {:#?}",
        d.lines()
    );

    // The first connection from the blocked address gets through, and is destroyed.
    let client = ns.enter(|| connect_from(bad, to));
    let (server, _) = l.accept().unwrap();
    let first = Conn::new(client, server);
    assert!(
        first.dies_within(Duration::from_secs(3)).is_some(),
        "the blocked connection lived on"
    );
    let line = d.wait_for("blocked 127.0.0.2 in the firewall", Duration::from_secs(3));
    assert!(line.contains(&ns.inode.to_string()), "{line}");
    let blocked_at = Instant::now();

    // It is in connwatch's set, in the namespace of the connection, and only there.
    let (ok, set) = nft(&ns, &["list", "set", "inet", "connwatch", "blocked4"]);
    assert!(
        ok && set.contains("127.0.0.2") && set.contains("expires"),
        "{set}"
    );
    let host = Command::new("nft")
        .args(["list", "table", "inet", "connwatch"])
        .output()
        .unwrap();
    assert!(!host.status.success(), "the host's firewall was left alone");

    // The API, list --blocked and the gauge show it, with its expiry.
    let reply = api(&json!({"cmd": "blocked"}));
    let blocked = reply["blocked"].as_array().unwrap();
    assert_eq!(blocked.len(), 1, "{reply}");
    assert_eq!(blocked[0]["addr"], "127.0.0.2");
    assert_eq!(blocked[0]["netns"], ns.inode);
    let left = blocked[0]["expires_in_secs"].as_f64().unwrap();
    assert!(left > 3.0 && left <= 5.0, "{reply}");
    let out = Command::new(BIN)
        .args(["list", "--blocked"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("127.0.0.2") && text.contains(&ns.name),
        "{text}"
    );
    assert!(
        metrics(&metrics_addr).contains("connwatch_firewall_blocked 1\n"),
        "the gauge"
    );

    // Its new SYNs get no connection; another client connects, and stays.
    assert!(
        !ns.enter(|| connects_from(bad, to, Duration::from_millis(1500))),
        "the blocked address connected again"
    );
    let other = Conn::new(ns.enter(|| connect_from(good, to)), l.accept().unwrap().0);
    thread::sleep(Duration::from_millis(500));
    assert!(!other.is_dead(), "another client's connection was touched");

    // After the expiry the set is empty and the address connects again.
    let expiry = Duration::from_secs(5) + Duration::from_millis(700);
    thread::sleep(expiry.saturating_sub(blocked_at.elapsed()));
    let (_, set) = nft(&ns, &["list", "set", "inet", "connwatch", "blocked4"]);
    assert!(!set.contains("127.0.0.2"), "the set still holds it: {set}");
    assert!(api(&json!({"cmd": "blocked"}))["blocked"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(ns.enter(|| connects_from(bad, to, Duration::from_secs(2))));

    // A clean stop removes connwatch's table.
    d.stop();
    let (_, tables) = nft(&ns, &["list", "tables"]);
    assert!(!tables.contains("connwatch"), "{tables}");
}
