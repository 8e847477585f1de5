//! The sock_diag client against the real kernel: dumps, exact lookups, batched
//! lookups and destroys, on loopback connections of both families (root only).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use connwatch::conn::{TcpState, Tuple};
use connwatch::kernel::sock_diag::{DestroyError, DiagSocket, End, SockDiag};
use std::io;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::thread::sleep;
use std::time::Instant;

fn require_root() {
    common::require_root("acts on real loopback sockets, and SOCK_DESTROY needs CAP_NET_ADMIN");
}

/// A loopback connection: the listener, the client end and the accepted server end.
struct Conn {
    listener: TcpListener,
    client: TcpStream,
    server: TcpStream,
}

impl Conn {
    fn open(ip: IpAddr) -> Conn {
        let listener = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("cannot listen on {ip}: {e} (is it configured?)"));
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        Conn {
            listener,
            client,
            server,
        }
    }

    /// The client's view: client address -> server address.
    fn client_tuple(&self) -> Tuple {
        Tuple::new(
            self.client.local_addr().unwrap(),
            self.client.peer_addr().unwrap(),
        )
    }

    /// The accepted socket's view: server address -> client address.
    fn server_tuple(&self) -> Tuple {
        Tuple::new(
            self.server.local_addr().unwrap(),
            self.server.peer_addr().unwrap(),
        )
    }
}

fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn find<'a>(sockets: &'a [DiagSocket], tuple: &Tuple) -> Option<&'a DiagSocket> {
    sockets.iter().find(|s| s.tuple == *tuple)
}

fn assert_round_trip(from: &mut TcpStream, to: &mut TcpStream) {
    from.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    to.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"x");
}

fn check_dump(ip: IpAddr) {
    require_root();
    let conn = Conn::open(ip);
    let mut diag = SockDiag::open().unwrap();
    let all = diag.dump(SockDiag::ALL_STATES).unwrap();

    let listen_tuple = Tuple::new(
        conn.listener.local_addr().unwrap(),
        SocketAddr::new(unspecified(ip), 0),
    );
    let listener = find(&all, &listen_tuple).expect("listener missing from the dump");
    assert_eq!(listener.state, TcpState::LISTEN);

    let client = find(&all, &conn.client_tuple()).expect("client end missing");
    let server = find(&all, &conn.server_tuple()).expect("server end missing");
    for s in [listener, client, server] {
        assert_eq!(s.tuple.local.is_ipv4(), ip.is_ipv4(), "{s:?}");
        assert_eq!(s.tuple.remote.is_ipv4(), ip.is_ipv4(), "{s:?}");
        assert_ne!(s.inode, 0, "{s:?}");
        assert_eq!(s.uid, 0, "{s:?}");
        assert_eq!(s.ifindex, 0, "{s:?}");
    }
    assert_eq!(client.state, TcpState::ESTABLISHED);
    assert_eq!(server.state, TcpState::ESTABLISHED);
    assert_ne!(client.cookie, server.cookie);

    // The state mask filters: listeners only.
    let listeners = diag.dump(1 << TcpState::LISTEN.0).unwrap();
    assert!(find(&listeners, &listen_tuple).is_some());
    assert!(find(&listeners, &conn.client_tuple()).is_none());
    assert!(listeners.iter().all(|s| s.state == TcpState::LISTEN));
}

fn check_get(ip: IpAddr) {
    require_root();
    let conn = Conn::open(ip);
    let mut diag = SockDiag::open().unwrap();

    let got = diag.get(&conn.client_tuple()).unwrap().expect("client end");
    assert_eq!(got.tuple, conn.client_tuple());
    assert_eq!(got.state, TcpState::ESTABLISHED);
    assert_ne!(got.cookie, [0; 8]);
    assert_ne!(got.cookie, [0xff; 8]);
    // The same socket the dump reports, cookie and all; only the exact lookup asks
    // for tcp_info.
    assert!(got.activity.is_some(), "the lookup carries tcp_info");
    let all = diag.dump(SockDiag::ALL_STATES).unwrap();
    let plain = DiagSocket {
        activity: None,
        traffic: None,
        ..got.clone()
    };
    assert_eq!(find(&all, &conn.client_tuple()), Some(&plain));

    let mut absent = conn.client_tuple();
    absent.remote.set_port(1);
    assert_eq!(diag.get(&absent).unwrap(), None);
}

fn check_destroy(ip: IpAddr) {
    require_root();
    let mut conn = Conn::open(ip);
    // Taken now: a destroyed socket no longer reports its peer.
    let (client_tuple, server_tuple) = (conn.client_tuple(), conn.server_tuple());
    let mut diag = SockDiag::open().unwrap();
    let server = diag.get(&server_tuple).unwrap().expect("server end");

    diag.destroy(&server).unwrap();

    // Observed on Linux 6.18 (tcp_abort): the destroyed socket's owner gets ECONNABORTED
    // once (sk_err), then plain EOF; the peer was sent a RST and reads ECONNRESET.
    let mut buf = [0u8; 16];
    let owner = conn.server.read(&mut buf);
    assert_eq!(
        owner.as_ref().map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::ECONNABORTED)),
        "owner read after destroy: {owner:?}"
    );
    assert_eq!(
        conn.server.read(&mut buf).unwrap(),
        0,
        "owner's second read"
    );
    let peer = conn.client.read(&mut buf);
    assert_eq!(
        peer.as_ref().map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::ECONNRESET)),
        "peer read after destroy: {peer:?}"
    );

    // Both ends are gone from the kernel's tables (the kernel's own answer for the server
    // tuple is now the listener, which `get` does not pass off as the connection), and a
    // second destroy finds nothing: the listener's cookie differs.
    assert_eq!(diag.get(&server_tuple).unwrap(), None);
    assert_eq!(diag.get(&client_tuple).unwrap(), None);
    assert!(matches!(diag.destroy(&server), Err(DestroyError::Gone)));
}

fn check_wrong_cookie(ip: IpAddr) {
    require_root();
    let mut conn = Conn::open(ip);
    let mut diag = SockDiag::open().unwrap();
    let mut server = diag.get(&conn.server_tuple()).unwrap().expect("server end");
    server.cookie[0] ^= 1;
    assert_ne!(server.cookie, [0xff; 8]);

    let err = diag.destroy(&server).unwrap_err();
    assert!(matches!(err, DestroyError::Gone), "{err:?}");
    assert_eq!(err.to_string(), "gone");

    assert_round_trip(&mut conn.client, &mut conn.server);
    assert_round_trip(&mut conn.server, &mut conn.client);
    let still = diag.get(&conn.server_tuple()).unwrap().expect("server end");
    assert_eq!(still.state, TcpState::ESTABLISHED);
}

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[test]
fn dump_finds_listener_and_both_ends_v4() {
    check_dump(V4);
}

#[test]
fn dump_finds_listener_and_both_ends_v6() {
    check_dump(V6);
}

#[test]
fn get_by_tuple_v4() {
    check_get(V4);
}

#[test]
fn get_by_tuple_v6() {
    check_get(V6);
}

#[test]
fn destroy_aborts_owner_and_resets_peer_v4() {
    check_destroy(V4);
}

#[test]
fn destroy_aborts_owner_and_resets_peer_v6() {
    check_destroy(V6);
}

#[test]
fn destroy_with_wrong_cookie_is_gone_v4() {
    check_wrong_cookie(V4);
}

#[test]
fn destroy_with_wrong_cookie_is_gone_v6() {
    check_wrong_cookie(V6);
}

/// Enough sockets that the dump spans several datagrams (about 370 sockets fit in one).
#[test]
fn dump_spans_many_datagrams() {
    require_root();
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let mut tuples = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..600 {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        tuples.push(Tuple::new(
            client.local_addr().unwrap(),
            client.peer_addr().unwrap(),
        ));
        tuples.push(Tuple::new(
            server.local_addr().unwrap(),
            server.peer_addr().unwrap(),
        ));
        streams.push((client, server));
    }
    let mut diag = SockDiag::open().unwrap();
    let all = diag.dump(SockDiag::ALL_STATES).unwrap();
    assert!(all.len() >= tuples.len());
    for t in &tuples {
        assert_eq!(
            find(&all, t).map(|s| s.state),
            Some(TcpState::ESTABLISHED),
            "{t}"
        );
    }
}

/// A dump filtered by port keeps exactly the sockets with the port on the end asked
/// for: the kernel runs the filter program (and accepts it: a malformed one is refused
/// with EINVAL).
#[test]
fn dump_filtered_by_port_keeps_each_end_asked_for() {
    require_root();
    let a = Conn::open(V4);
    let b = Conn::open(V6);
    let c = Conn::open(V4);
    let port = |conn: &Conn| conn.listener.local_addr().unwrap().port();
    let mut diag = SockDiag::open().unwrap();
    let established = 1 << TcpState::ESTABLISHED.0;
    let terms = [
        (End::Local, port(&a), port(&a)),
        (End::Remote, port(&b), port(&b)),
    ];
    let got = diag.dump_ports_with_activity(established, &terms).unwrap();
    let want = [a.server_tuple(), b.client_tuple()];
    for t in &want {
        let s = find(&got, t).unwrap_or_else(|| panic!("{t} left out of {got:?}"));
        assert!(s.activity.is_some(), "tcp_info asked for");
    }
    for t in [
        a.client_tuple(),
        b.server_tuple(),
        c.client_tuple(),
        c.server_tuple(),
    ] {
        assert!(find(&got, &t).is_none(), "{t} kept");
    }
    assert!(
        got.iter()
            .all(|s| (s.tuple.local.port() == port(&a)) || (s.tuple.remote.port() == port(&b))),
        "{got:?}"
    );
    let every = diag.dump_ports_with_activity(established, &[]).unwrap();
    assert!(
        find(&every, &c.server_tuple()).is_some(),
        "no ranges: every socket"
    );
}

/// `n` connections to `listener`: the (client, server) streams, and the server ends'
/// tuples.
fn accepted(listener: &TcpListener, n: usize) -> (Vec<(TcpStream, TcpStream)>, Vec<Tuple>) {
    let mut conns = Vec::new();
    for _ in 0..n {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        conns.push((client, server));
    }
    let tuples = conns
        .iter()
        .map(|(_, s)| Tuple::new(s.local_addr().unwrap(), s.peer_addr().unwrap()))
        .collect();
    (conns, tuples)
}

/// More than a batch: lookups answer in order, absent tuples are None, and a
/// batched destroy resets every peer; destroying again finds them gone.
#[test]
fn batched_lookups_and_destroys() {
    require_root();
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let (mut conns, server_tuples) = accepted(&listener, SockDiag::BATCH * 2 + 50);
    let mut asked = server_tuples.clone();
    let mut absent = server_tuples[0];
    absent.remote.set_port(1);
    asked.insert(SockDiag::BATCH, absent);
    let mut diag = SockDiag::open().unwrap();
    let found = diag.get_many(&asked);
    assert_eq!(found.len(), asked.len());
    for (t, f) in asked.iter().zip(&found) {
        let f = f.as_ref().unwrap();
        if *t == absent {
            assert_eq!(f, &None);
        } else {
            let s = f.as_ref().unwrap_or_else(|| panic!("{t} not found"));
            assert_eq!(s.tuple, *t);
            assert!(s.activity.is_some());
        }
    }
    let socks: Vec<DiagSocket> = found.into_iter().filter_map(|f| f.unwrap()).collect();
    let refs: Vec<&DiagSocket> = socks.iter().collect();
    let done = diag.destroy_many(&refs);
    assert_eq!(done.len(), refs.len());
    assert!(done.iter().all(|r| r.is_ok()), "{done:?}");
    for (client, _) in &mut conns {
        let mut b = [0u8; 1];
        let err = client.read(&mut b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
    let again = diag.destroy_many(&refs);
    assert!(
        again.iter().all(|r| matches!(r, Err(DestroyError::Gone))),
        "{again:?}"
    );
    // Live and gone sockets in the same batches: each answer is its own socket's
    // (only failures are answered before a batch's last request).
    let (mut live, live_tuples) = accepted(&listener, SockDiag::BATCH);
    let live_socks: Vec<DiagSocket> = diag
        .get_many(&live_tuples)
        .into_iter()
        .map(|f| f.unwrap().unwrap())
        .collect();
    let mixed: Vec<&DiagSocket> = live_socks
        .iter()
        .zip(&socks)
        .flat_map(|(l, g)| [l, g])
        .collect();
    let done = diag.destroy_many(&mixed);
    assert_eq!(done.len(), mixed.len());
    for (i, r) in done.iter().enumerate() {
        if i % 2 == 0 {
            assert!(r.is_ok(), "live socket {i}: {r:?}");
        } else {
            assert!(
                matches!(r, Err(DestroyError::Gone)),
                "gone socket {i}: {r:?}"
            );
        }
    }
    for (client, _) in &mut live {
        let mut b = [0u8; 1];
        let err = client.read(&mut b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}

#[test]
fn destroy_time_wait() {
    require_root();
    let conn = Conn::open(V4);
    let tuple = conn.client_tuple();
    let Conn {
        client, mut server, ..
    } = conn;
    drop(client);
    let mut buf = [0u8; 1];
    assert_eq!(server.read(&mut buf).unwrap(), 0);
    drop(server);

    let mut diag = SockDiag::open().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let tw = loop {
        match diag.get(&tuple).unwrap() {
            Some(s) if s.state == TcpState::TIME_WAIT => break s,
            _ if Instant::now() > deadline => panic!("{tuple} never reached TIME_WAIT"),
            _ => sleep(Duration::from_millis(10)),
        }
    };
    assert_eq!(tw.inode, 0);
    let dumped = diag.dump(1 << TcpState::TIME_WAIT.0).unwrap();
    assert_eq!(find(&dumped, &tuple), Some(&tw));

    match diag.destroy(&tw) {
        Ok(()) => assert_eq!(diag.get(&tuple).unwrap(), None),
        Err(DestroyError::NotSupported) => {
            eprintln!("this kernel refuses to destroy TIME_WAIT sockets (EOPNOTSUPP)")
        }
        Err(e) => panic!("destroying a TIME_WAIT socket: {e:?}"),
    }
}

/// A socket that is only bound (no listen, no connect) is not a connection. Linux 6.8+
/// dumps such sockets, reported as CLOSE, when bit 13 (TCP_BOUND_INACTIVE) is in the
/// mask, as it is in 0xffff_ffff; `ALL_STATES` leaves that bit out.
#[test]
fn all_states_leaves_out_bound_only_sockets() {
    require_root();
    // std has no bind-without-listen for TCP, so the socket is made by hand.
    // SAFETY: plain socket(2); the fd is owned by `fd` from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "{}", io::Error::last_os_error());
    // SAFETY: fd is a fresh socket nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    let mut len = std::mem::size_of_val(&addr) as libc::socklen_t;
    // SAFETY: addr and len describe a valid sockaddr_in for both calls.
    unsafe {
        assert_eq!(
            libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len),
            0
        );
        assert_eq!(
            libc::getsockname(
                fd.as_raw_fd(),
                std::ptr::addr_of_mut!(addr).cast(),
                &mut len
            ),
            0
        );
    }
    let port = u16::from_be(addr.sin_port);
    let bound_only = |sockets: &[DiagSocket]| {
        sockets
            .iter()
            .any(|s| s.tuple.local == SocketAddr::new(V4, port))
    };

    let mut diag = SockDiag::open().unwrap();
    assert!(!bound_only(&diag.dump(SockDiag::ALL_STATES).unwrap()));
    // The kernel does report it for the pseudo-state (on kernels older than 6.8 this
    // dump is simply empty, hence no assertion on it).
    let inactive = diag.dump(1 << 13).unwrap();
    if let Some(s) = inactive.iter().find(|s| s.tuple.local.port() == port) {
        assert_eq!(s.state, TcpState::CLOSE);
    }
}

/// A reply to an earlier request that was never read is skipped, not taken for the
/// answer to the current one.
#[test]
fn tcp_info_tells_when_data_last_moved() {
    require_root();
    let mut conn = Conn::open(V4);
    let mut diag = SockDiag::open().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let quiet = diag.get(&conn.client_tuple()).unwrap().unwrap();
    let a = quiet.activity.expect("tcp_info");
    // No data yet: both timers count from the establishment.
    assert!(a.quiet_ms() >= 350, "{a:?}");
    conn.client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.server.read_exact(&mut buf).unwrap();
    let client = diag.get(&conn.client_tuple()).unwrap().unwrap();
    let server = diag.get(&conn.server_tuple()).unwrap().unwrap();
    assert!(
        client.activity.unwrap().last_data_sent_ms < 100,
        "{client:?}"
    );
    assert!(
        client.activity.unwrap().last_data_recv_ms >= 350,
        "{client:?}"
    );
    assert!(
        server.activity.unwrap().last_data_recv_ms < 100,
        "{server:?}"
    );
    let dumped = diag.dump_with_activity(SockDiag::ALL_STATES).unwrap();
    let d = find(&dumped, &conn.server_tuple()).unwrap();
    assert!(d.activity.unwrap().quiet_ms() < 200, "{d:?}");
}
