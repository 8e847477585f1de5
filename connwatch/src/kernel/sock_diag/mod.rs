//! The sock_diag client: looking up and destroying TCP sockets through netlink.
//!
//! The eBPF side tells connwatch *which* connections exist; this module is how it asks the
//! kernel for the details it needs to act (the socket cookie above all) and how it acts:
//! `SOCK_DESTROY` aborts a socket from outside its owning process, as `ss -K` does.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

use crate::conn::Tuple;

mod bytecode;
mod probe;
mod wire;

pub use bytecode::{End, PortTerm};
pub use probe::{probe_destroy, DestroySupport};
use wire::{invalid_data, same_endpoints, socket_id};
pub use wire::{DestroyError, DiagSocket, TcpActivity, TcpTraffic};

/// The cookie that tells the kernel "match on the tuple alone" (`INET_DIAG_NOCOOKIE`).
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// Receive buffer size. The kernel builds dump datagrams of at most 32 KiB (it sizes them
/// after the largest read it has seen, capped there), so 64 KiB always holds a whole one.
/// The buffer is allocated once and reused for every datagram.
const RECV_BUF_LEN: usize = 64 * 1024;

/// The receive buffer asked for: room for a batch of replies, each of which costs the
/// buffer far more than its bytes.
const SOCKET_RCVBUF: libc::c_int = 8 << 20;

/// How long to wait for any one reply datagram. The kernel answers at once; the limit only
/// turns a lost reply or a bookkeeping bug into an error instead of a daemon hung forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `NETLINK_SOCK_DIAG` socket for TCP lookups and destroys. Requests are synchronous: each
/// call sends one request and reads its replies before returning.
/// The fault-injection seam at the sock_diag boundary, in debug builds only (what the
/// tests run): with `CONNWATCH_FAULT_DESTROY=unsupported` every `SOCK_DESTROY` answers
/// as a kernel without `CONFIG_INET_DIAG_DESTROY` does (EOPNOTSUPP), since no kernel
/// here lacks it; with `transient:N` the first N batched destroy requests (the
/// deadlines' path, not the start-up probe's) fail as unanswered ones would. Release builds ignore the variable.
fn destroy_unsupported() -> bool {
    fault() == Some(Fault::Unsupported)
}

/// What the seam injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Every destroy answers EOPNOTSUPP.
    Unsupported,
    /// The first N destroy requests get no answer (a transient failure).
    Transient(u32),
}

fn fault() -> Option<Fault> {
    static SET: std::sync::OnceLock<Option<Fault>> = std::sync::OnceLock::new();
    if !cfg!(debug_assertions) {
        return None;
    }
    *SET.get_or_init(|| {
        let v = std::env::var("CONNWATCH_FAULT_DESTROY").ok()?;
        match v.split_once(':') {
            Some(("transient", n)) => n.parse().ok().map(Fault::Transient),
            _ if v == "unsupported" => Some(Fault::Unsupported),
            _ => None,
        }
    })
}

/// A second seam of debug builds: with `CONNWATCH_FAULT_DUMP=FILE`, every dump fails (as
/// one the kernel never answers) while FILE exists, so a test can make dumps fail in a
/// running daemon and let them work again.
fn dump_fails() -> bool {
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    if !cfg!(debug_assertions) {
        return false;
    }
    FILE.get_or_init(|| std::env::var_os("CONNWATCH_FAULT_DUMP").map(Into::into))
        .as_ref()
        .is_some_and(|f| f.exists())
}

/// With `CONNWATCH_FAULT_DESTROY=transient:N`: whether this destroy is one of the
/// first N, which fail as an unanswered request would.
fn destroy_fails_transiently() -> bool {
    static SO_FAR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    match fault() {
        Some(Fault::Transient(n)) => SO_FAR.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n,
        _ => false,
    }
}

pub struct SockDiag {
    sock: Socket,
    seq: u32,
    /// Holds the datagram last received, and nothing else: its length is the datagram's.
    buf: BytesMut,
}

impl SockDiag {
    /// Requests sent in one message by the batched calls. Their replies must fit the
    /// socket's receive buffer (the kernel drops what does not), which `open` enlarges.
    pub const BATCH: usize = 256;

    /// Every TCP state, `TIME_WAIT` and `NEW_SYN_RECV` included (bits 1 to 12 of the
    /// `1 << state` mask).
    ///
    /// Bit 13 is deliberately left out: since Linux 6.8 it selects the `TCP_BOUND_INACTIVE`
    /// pseudo-state, which makes a dump add sockets that are merely bound (no listen, no
    /// connect), which are not connections.
    pub const ALL_STATES: u32 = ((1 << 13) - 1) & !1;

    /// Opens a sock_diag socket. Needs no privilege; destroying needs `CAP_NET_ADMIN`.
    pub fn open() -> io::Result<SockDiag> {
        Ok(SockDiag {
            sock: connect()?,
            seq: 0,
            buf: BytesMut::with_capacity(RECV_BUF_LEN),
        })
    }

    /// Every TCP socket of both families (IPv4 then IPv6) in the given states (bitmask
    /// `1 << state`; pass [`SockDiag::ALL_STATES`]).
    pub fn dump(&mut self, states: u32) -> anyhow::Result<Vec<DiagSocket>> {
        self.dump_ext(states, ExtensionFlags::empty(), None)
    }

    /// Like [`SockDiag::dump`], with each socket's [`TcpActivity`].
    pub fn dump_with_activity(&mut self, states: u32) -> anyhow::Result<Vec<DiagSocket>> {
        self.dump_ext(states, ExtensionFlags::INFO, None)
    }

    /// Like [`SockDiag::dump_with_activity`], of the sockets with a port in one of
    /// `ports`, each on its own end: the kernel leaves the others out. With no ranges,
    /// or too many to encode, every socket.
    pub fn dump_ports_with_activity(
        &mut self,
        states: u32,
        ports: &[PortTerm],
    ) -> anyhow::Result<Vec<DiagSocket>> {
        let program = bytecode::any_port_in(ports);
        self.dump_ext(states, ExtensionFlags::INFO, program.as_deref())
    }

    fn dump_ext(
        &mut self,
        states: u32,
        extensions: ExtensionFlags,
        program: Option<&[u8]>,
    ) -> anyhow::Result<Vec<DiagSocket>> {
        if dump_fails() {
            anyhow::bail!("sock_diag dump: no reply (fault injected)");
        }
        let mut sockets = Vec::new();
        for (family, name) in [(AF_INET, "IPv4"), (AF_INET6, "IPv6")] {
            self.dump_family(family, states, extensions.clone(), program, &mut sockets)
                .with_context(|| format!("sock_diag dump of {name} TCP sockets"))?;
        }
        Ok(sockets)
    }

    fn dump_family(
        &mut self,
        family: u8,
        states: u32,
        extensions: ExtensionFlags,
        program: Option<&[u8]>,
        sockets: &mut Vec<DiagSocket>,
    ) -> io::Result<()> {
        let id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        let mut bytes = Vec::new();
        let seq = self.encode(
            &mut bytes,
            NLM_F_REQUEST | NLM_F_DUMP,
            inet_request(family, states, extensions, id),
        );
        if let Some(program) = program {
            append_attribute(&mut bytes, INET_DIAG_REQ_BYTECODE, program);
        }
        self.send_bytes(&bytes)?;
        self.replies(seq, |payload| match payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                sockets.push(DiagSocket::from_response(&response));
                None
            }
            // A dump ends with DONE; its code is negative if the kernel gave up part way.
            NetlinkPayload::Done(done) if done.code < 0 => {
                Some(Err(io::Error::from_raw_os_error(-done.code)))
            }
            NetlinkPayload::Done(_) => Some(Ok(())),
            NetlinkPayload::Error(e) if e.code.is_some() => Some(Err(e.to_io())),
            NetlinkPayload::Error(_) => Some(Ok(())),
            _ => None,
        })?
    }

    /// Exact lookup of one socket by tuple (`NLM_F_REQUEST` without `NLM_F_DUMP`, all
    /// states); `Ok(None)` on `ENOENT`.
    ///
    /// The kernel matches on the bound device too: an IPv6 tuple's local scope id is sent as
    /// the interface, and a socket bound to a device is found only when that matches.
    pub fn get(&mut self, tuple: &Tuple) -> anyhow::Result<Option<DiagSocket>> {
        self.get_many(std::slice::from_ref(tuple))
            .pop()
            .unwrap_or_else(|| Err(anyhow::anyhow!("sock_diag get {tuple}: no answer")))
    }

    /// `SOCK_DESTROY` of exactly this socket: tuple plus cookie (the kernel refuses with
    /// `ENOENT` if the cookie no longer matches), requesting an ACK and mapping its error
    /// code.
    ///
    /// For an open TCP socket the kernel runs `tcp_abort`: the owner's next call fails with
    /// `ECONNABORTED` and the peer is sent a RST.
    pub fn destroy(&mut self, sock: &DiagSocket) -> Result<(), DestroyError> {
        if destroy_unsupported() {
            return Err(DestroyError::NotSupported);
        }
        let (family, id) =
            socket_id(&sock.tuple, sock.ifindex, sock.cookie).map_err(DestroyError::Other)?;
        let request = inet_request(family, Self::ALL_STATES, ExtensionFlags::empty(), id);
        let seq = self
            .send(NLM_F_REQUEST | NLM_F_ACK, SockDiagDestroy::new(request))
            .map_err(DestroyError::Other)?;
        let code = self
            .replies(seq, |payload| match payload {
                NetlinkPayload::Error(e) => Some(e.raw_code()),
                _ => None,
            })
            .map_err(DestroyError::Other)?;
        destroy_answer(code)
    }

    /// Sends one request and returns its sequence number.
    fn send<M>(&mut self, flags: u16, message: M) -> io::Result<u32>
    where
        M: NetlinkSerializable + Into<NetlinkPayload<M>>,
    {
        let mut bytes = Vec::new();
        let seq = self.encode(&mut bytes, flags, message);
        self.send_bytes(&bytes)?;
        Ok(seq)
    }

    /// Appends one request to `out`; returns its sequence number. The message type is
    /// the payload's own: `SOCK_DIAG_BY_FAMILY` for a [`SockDiagMessage`], `SOCK_DESTROY`
    /// for a [`SockDiagDestroy`].
    fn encode<M>(&mut self, out: &mut Vec<u8>, flags: u16, message: M) -> u32
    where
        M: NetlinkSerializable + Into<NetlinkPayload<M>>,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, message.into());
        packet.finalize();
        let start = out.len();
        out.resize(start + packet.buffer_len(), 0);
        packet.serialize(&mut out[start..]);
        // The next message starts on a 4-byte boundary (NLMSG_ALIGN).
        out.resize((out.len() + 3) & !3, 0);
        self.seq
    }

    fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = self.sock.send(bytes, 0)?;
        if sent != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} request bytes", bytes.len()),
            ));
        }
        Ok(())
    }

    /// Exact lookups of many sockets: the requests of a batch go to the kernel in one
    /// message and their replies come back together, so a mass destroy pays a few
    /// system calls per batch rather than two per socket. Answers are in `tuples` order.
    pub fn get_many(&mut self, tuples: &[Tuple]) -> Vec<anyhow::Result<Option<DiagSocket>>> {
        let wanted: Vec<(Tuple, u32)> = tuples.iter().map(|t| (*t, 0)).collect();
        self.get_many_on(&wanted)
    }

    /// [`SockDiag::get_many`] for sockets bound to a device (`SO_BINDTODEVICE`, or an
    /// IPv6 link-local scope): each tuple with the interface it is bound to, which the
    /// kernel's lookup must be given to find it (0: none, or the IPv6 scope id).
    pub fn get_many_on(
        &mut self,
        wanted: &[(Tuple, u32)],
    ) -> Vec<anyhow::Result<Option<DiagSocket>>> {
        self.batched(
            wanted,
            |(tuple, bound)| {
                let interface = match (bound, tuple.local) {
                    (0, SocketAddr::V6(local)) => local.scope_id(),
                    (bound, _) => *bound,
                };
                let (family, id) = socket_id(tuple, interface, NO_COOKIE)?;
                let request = inet_request(family, Self::ALL_STATES, ExtensionFlags::INFO, id);
                Ok((NLM_F_REQUEST, request))
            },
            |(tuple, _), payload| match payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let found = DiagSocket::from_response(&r);
                    Some(Ok(same_endpoints(&found.tuple, tuple).then_some(found)))
                }
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => Some(Ok(None)),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    Some(Err(anyhow::anyhow!("sock_diag get {tuple}: {}", e.to_io())))
                }
                _ => None,
            },
            |(tuple, _), why| Err(anyhow::anyhow!("sock_diag get {tuple}: {why}")),
        )
    }

    /// `SOCK_DESTROY` of many sockets, batched like [`SockDiag::get_many`]; each by
    /// tuple plus cookie, as [`SockDiag::destroy`]. Answers are in `socks` order.
    pub fn destroy_many(&mut self, socks: &[&DiagSocket]) -> Vec<Result<(), DestroyError>> {
        if destroy_unsupported() {
            return socks
                .iter()
                .map(|_| Err(DestroyError::NotSupported))
                .collect();
        }
        if socks.iter().any(|_| destroy_fails_transiently()) {
            return socks
                .iter()
                .map(|_| {
                    Err(DestroyError::Other(io::Error::other(
                        "no reply (fault injected)",
                    )))
                })
                .collect();
        }
        let mut answers = Vec::with_capacity(socks.len());
        for chunk in socks.chunks(Self::BATCH) {
            answers.extend(self.destroy_batch(chunk));
        }
        answers
    }

    /// One message of destroys. Only the last request asks for an acknowledgement: the
    /// kernel answers a request without `NLM_F_ACK` only if it fails, and handles the
    /// requests of a message in order, so once the last one is acknowledged every
    /// earlier failure has been queued before it, and a request with no answer was
    /// carried out. One read per batch then, not one per socket.
    fn destroy_batch(&mut self, chunk: &[&DiagSocket]) -> Vec<Result<(), DestroyError>> {
        let mut results: Vec<Option<Result<(), DestroyError>>> =
            (0..chunk.len()).map(|_| None).collect();
        let mut requests = Vec::with_capacity(chunk.len());
        for (i, sock) in chunk.iter().enumerate() {
            match socket_id(&sock.tuple, sock.ifindex, sock.cookie) {
                Ok((family, id)) => requests.push((i, family, id)),
                Err(e) => results[i] = Some(Err(DestroyError::Other(e))),
            }
        }
        let mut bytes = Vec::with_capacity(requests.len() * 80);
        let mut by_seq = std::collections::HashMap::with_capacity(requests.len());
        let mut last_seq = None;
        let n = requests.len();
        for (k, (i, family, id)) in requests.into_iter().enumerate() {
            let request = inet_request(family, Self::ALL_STATES, ExtensionFlags::empty(), id);
            let flags = if k + 1 == n {
                NLM_F_REQUEST | NLM_F_ACK
            } else {
                NLM_F_REQUEST
            };
            let seq = self.encode(&mut bytes, flags, SockDiagDestroy::new(request));
            by_seq.insert(seq, i);
            last_seq = Some(seq);
        }
        let exchanged = match last_seq {
            None => Ok(()),
            Some(last) => self.send_bytes(&bytes).and_then(|()| {
                self.collect(1, |seq, payload| {
                    let (Some(&i), NetlinkPayload::Error(e)) = (by_seq.get(&seq), payload) else {
                        return false;
                    };
                    results[i] = Some(destroy_answer(e.raw_code()));
                    seq == last
                })
            }),
        };
        results
            .into_iter()
            .map(|r| match (r, &exchanged) {
                (Some(r), _) => r,
                // Not refused before the last acknowledgement: destroyed.
                (None, Ok(())) => Ok(()),
                (None, Err(e)) => Err(DestroyError::Other(io::Error::other(e.to_string()))),
            })
            .collect()
    }

    /// Sends one request per item, [`SockDiag::BATCH`] to a message, and gathers the answer to
    /// each, in order: `answer` reads a reply (None for one that is not an answer),
    /// `failed` stands in for an answer that never came.
    fn batched<I, M, T>(
        &mut self,
        items: &[I],
        request: impl Fn(&I) -> io::Result<(u16, M)>,
        mut answer: impl FnMut(&I, NetlinkPayload<SockDiagMessage>) -> Option<T>,
        failed: impl Fn(&I, String) -> T,
    ) -> Vec<T>
    where
        M: NetlinkSerializable + Into<NetlinkPayload<M>>,
    {
        let mut answers = Vec::with_capacity(items.len());
        for chunk in items.chunks(Self::BATCH) {
            let mut bytes = Vec::with_capacity(chunk.len() * 80);
            let mut results: Vec<Option<T>> = (0..chunk.len()).map(|_| None).collect();
            let mut by_seq = std::collections::HashMap::with_capacity(chunk.len());
            for (i, item) in chunk.iter().enumerate() {
                match request(item) {
                    Ok((flags, message)) => {
                        let seq = self.encode(&mut bytes, flags, message);
                        by_seq.insert(seq, i);
                    }
                    Err(e) => results[i] = Some(failed(item, e.to_string())),
                }
            }
            let exchanged = self.send_bytes(&bytes).and_then(|()| {
                self.collect(by_seq.len(), |seq, payload| {
                    let Some(&i) = by_seq.get(&seq) else {
                        return false;
                    };
                    match answer(&chunk[i], payload) {
                        Some(a) => {
                            results[i] = Some(a);
                            true
                        }
                        None => false,
                    }
                })
            });
            for (item, r) in chunk.iter().zip(results) {
                answers.push(r.unwrap_or_else(|| match &exchanged {
                    Err(e) => failed(item, e.to_string()),
                    Ok(()) => failed(item, "no reply".into()),
                }));
            }
        }
        answers
    }

    /// Reads replies until `expected` of them were taken by `take` (which gets each
    /// message's sequence number and payload, and says whether it answered a request).
    fn collect(
        &mut self,
        expected: usize,
        mut take: impl FnMut(u32, NetlinkPayload<SockDiagMessage>) -> bool,
    ) -> io::Result<()> {
        let mut answered = 0;
        if expected == 0 {
            return Ok(());
        }
        let result = self.receive(|seq, payload| {
            if take(seq, payload) {
                answered += 1;
            }
            answered == expected
        });
        if result.is_err() {
            self.reopen();
        }
        result
    }

    /// Starts over on a fresh socket after a failed exchange, so that stray replies of
    /// the abandoned one are not read as answers to the next.
    fn reopen(&mut self) {
        if let Ok(fresh) = connect() {
            self.sock = fresh;
        }
    }

    /// Reads the replies to request `seq`, handing each payload to `on_reply` until it
    /// returns `Some`. Messages with another sequence number are leftovers of an earlier
    /// exchange that was abandoned part way, and are skipped.
    fn replies<T>(
        &mut self,
        seq: u32,
        on_reply: impl FnMut(NetlinkPayload<SockDiagMessage>) -> Option<T>,
    ) -> io::Result<T> {
        let result = self.read_replies(seq, on_reply);
        if result.is_err() {
            // A half-read dump keeps the kernel's dump state busy (the next dump would fail
            // with EBUSY) and leaves stray datagrams queued: start over on a fresh socket.
            // If even that fails, the old one stays and the next call reports its own error.
            self.reopen();
        }
        result
    }

    fn read_replies<T>(
        &mut self,
        seq: u32,
        mut on_reply: impl FnMut(NetlinkPayload<SockDiagMessage>) -> Option<T>,
    ) -> io::Result<T> {
        let mut done = None;
        self.receive(|msg_seq, payload| {
            // Another sequence number is a leftover of an abandoned exchange.
            if msg_seq == seq {
                done = on_reply(payload);
            }
            done.is_some()
        })?;
        done.ok_or_else(|| invalid_data("the reply loop ended without an answer"))
    }

    /// The one receive loop: reads datagrams and hands each message's sequence number
    /// and payload to `take` until it says the exchange is complete.
    fn receive(
        &mut self,
        mut take: impl FnMut(u32, NetlinkPayload<SockDiagMessage>) -> bool,
    ) -> io::Result<()> {
        loop {
            self.buf.clear();
            self.buf.reserve(RECV_BUF_LEN);
            // MSG_TRUNC makes recv report the datagram's real length, so a datagram larger
            // than the buffer is an error rather than silently cut messages. What fits is
            // appended to the buffer, so its length is what was received.
            let len = match self.sock.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no sock_diag reply within {REPLY_TIMEOUT:?}"),
                    ))
                }
                Err(e) => return Err(e),
            };
            if len > self.buf.len() {
                return Err(invalid_data(format!(
                    "a {len}-byte sock_diag datagram did not fit the {}-byte buffer",
                    self.buf.len()
                )));
            }
            let mut offset = 0;
            while offset < self.buf.len() {
                let rest = &self.buf[offset..];
                let raw = NetlinkBuffer::new_checked(rest).map_err(invalid_data)?;
                let msg_len = raw.length() as usize;
                let msg_seq = raw.sequence_number();
                // Messages start on 4-byte boundaries (NLMSG_ALIGN).
                offset += (msg_len + 3) & !3;
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&rest[..msg_len])
                    .map_err(invalid_data)?;
                if take(msg_seq, message.payload) {
                    return Ok(());
                }
            }
        }
    }
}

/// A sock_diag socket, bound, connected to the kernel and set up for [`SockDiag`].
fn connect() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&NetlinkAddr::new(0, 0))?;
    set_recv_timeout(&sock, REPLY_TIMEOUT)?;
    set_rcvbuf(&sock, SOCKET_RCVBUF);
    Ok(sock)
}

/// What the kernel's answer to a `SOCK_DESTROY` (an error message, code 0 for success)
/// means.
fn destroy_answer(code: i32) -> Result<(), DestroyError> {
    match code {
        0 => Ok(()),
        code => Err(DestroyError::from_errno(code.saturating_neg())),
    }
}

/// The request attribute that carries a filter program ([`bytecode`]).
const INET_DIAG_REQ_BYTECODE: u16 = 1;

/// Appends a netlink attribute to the one message in `message` and grows the message's
/// length to hold it (the crate's `InetRequest` has no attributes).
fn append_attribute(message: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    message.extend_from_slice(&(len as u16).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(value);
    message.resize((message.len() + 3) & !3, 0);
    let total = message.len() as u32;
    message[..4].copy_from_slice(&total.to_ne_bytes());
}

/// An inet_diag request for TCP sockets of `family` in `states` (bitmask `1 << state`).
///
/// `StateFlags` has no bit for `NEW_SYN_RECV` (12), so the mask is kept as given
/// (`from_bits_retain`) rather than cut down to the states the crate names.
fn inet_request(
    family: u8,
    states: u32,
    extensions: ExtensionFlags,
    socket_id: SocketId,
) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions,
        states: StateFlags::from_bits_retain(states),
        socket_id,
    })
}

/// Enlarges the receive buffer: past the system limit where privileged, else to it.
fn set_rcvbuf(sock: &Socket, bytes: libc::c_int) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with an int option on a descriptor the socket owns.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &bytes as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

fn set_recv_timeout(sock: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is a live socket owned by `sock`, and `tv` is a valid timeval whose size
    // is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    #[test]
    fn mixed_family_tuple_is_rejected() {
        let mut diag = SockDiag::open().unwrap();
        let tuple = Tuple::new((V4, 1).into(), (V6, 2).into());
        let err = diag.get(&tuple).unwrap_err();
        assert!(format!("{err:#}").starts_with("sock_diag get 127.0.0.1:1 -> [::1]:2: "));
    }

    /// The requests as the kernel reads them: lookups are `SOCK_DIAG_BY_FAMILY` (20),
    /// destroys `SOCK_DESTROY` (21), both for TCP with the whole state mask (the
    /// `NEW_SYN_RECV` bit included), each on a 4-byte boundary with its own sequence number.
    #[test]
    fn requests_carry_their_type_and_every_state() {
        let mut diag = SockDiag::open().unwrap();
        let tuple = Tuple::new((V6, 1).into(), (V6, 2).into());
        let (family, id) = socket_id(&tuple, 3, NO_COOKIE).unwrap();
        let lookup = inet_request(
            family,
            SockDiag::ALL_STATES,
            ExtensionFlags::INFO,
            id.clone(),
        );
        let destroy = inet_request(family, SockDiag::ALL_STATES, ExtensionFlags::empty(), id);
        let mut out = Vec::new();
        let first = diag.encode(&mut out, NLM_F_REQUEST, lookup);
        let second = diag.encode(
            &mut out,
            NLM_F_REQUEST | NLM_F_ACK,
            SockDiagDestroy::new(destroy),
        );
        assert_eq!(second, first.wrapping_add(1));
        assert_eq!(out.len(), 2 * 72);
        let u16_at = |at: usize| u16::from_ne_bytes(out[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_ne_bytes(out[at..at + 4].try_into().unwrap());
        for (start, kind, flags, seq, ext) in [
            (0, 20, NLM_F_REQUEST, first, ExtensionFlags::INFO.bits()),
            (72, 21, NLM_F_REQUEST | NLM_F_ACK, second, 0),
        ] {
            assert_eq!(u32_at(start), 72, "length");
            assert_eq!(u16_at(start + 4), kind, "message type");
            assert_eq!(u16_at(start + 6), flags, "flags");
            assert_eq!(u32_at(start + 8), seq, "sequence number");
            assert_eq!(out[start + 16], AF_INET6, "family");
            assert_eq!(out[start + 17], IPPROTO_TCP, "protocol");
            assert_eq!(out[start + 18], ext, "extensions");
            assert_eq!(u32_at(start + 20), SockDiag::ALL_STATES, "states");
            assert_ne!(u32_at(start + 20) & (1 << 12), 0, "NEW_SYN_RECV");
            // The socket id: ports (big-endian), addresses, interface, cookie.
            assert_eq!(out[start + 24..start + 28], [0, 1, 0, 2]);
            assert_eq!(out[start + 28..start + 44], Ipv6Addr::LOCALHOST.octets());
            assert_eq!(out[start + 44..start + 60], Ipv6Addr::LOCALHOST.octets());
            assert_eq!(u32_at(start + 60), 3, "interface");
            assert_eq!(out[start + 64..start + 72], NO_COOKIE);
        }
    }

    /// The client end of a connection it closed first lingers in TIME_WAIT; on Linux 6.18
    /// SOCK_DESTROY removes it (tcp_abort deschedules the timewait socket). Older kernels
    /// refuse non-full sockets with EOPNOTSUPP, which `NotSupported` reports.

    #[test]
    fn stale_replies_are_skipped() {
        crate::testing::require_root("looks up a real loopback connection through sock_diag");
        let listener = TcpListener::bind((V4, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let client_tuple = Tuple::new(client.local_addr().unwrap(), client.peer_addr().unwrap());
        let server_tuple = Tuple::new(server.local_addr().unwrap(), server.peer_addr().unwrap());
        let mut diag = SockDiag::open().unwrap();
        // A request whose reply is never read: the next lookup must skip it.
        let (family, id) = socket_id(&server_tuple, 0, NO_COOKIE).unwrap();
        let request = inet_request(family, SockDiag::ALL_STATES, ExtensionFlags::empty(), id);
        diag.send(NLM_F_REQUEST, request).unwrap();
        let got = diag.get(&client_tuple).unwrap().expect("client end");
        assert_eq!(got.tuple, client_tuple);
    }
}
