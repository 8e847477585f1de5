//! Looking up and destroying TCP sockets through netlink `sock_diag`.
//!
//! The eBPF side tells connwatch *which* connections exist; this module is how it asks the
//! kernel for the details it needs to act (the socket cookie above all) and how it acts:
//! `SOCK_DESTROY` aborts a socket from outside its owning process, as `ss -K` does.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::Context;
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NETLINK_HEADER_LEN, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DESTROY, SOCK_DIAG_BY_FAMILY,
};
use netlink_packet_sock_diag::inet::{
    nlas::Nla, ExtensionFlags, InetRequest, InetRequestBuffer, InetResponse, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

use crate::conn::{TcpState, Tuple};

/// The cookie that tells the kernel "match on the tuple alone" (`INET_DIAG_NOCOOKIE`).
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// Receive buffer size. The kernel builds dump datagrams of at most 32 KiB (it sizes them
/// after the largest read it has seen, capped there), so 64 KiB always holds a whole one.
const RECV_BUF_LEN: usize = 64 * 1024;

/// Requests sent in one message by the batched calls. Their replies must fit the
/// socket's receive buffer (the kernel drops what does not), which `open` enlarges.
const BATCH: usize = 256;

/// The receive buffer asked for: room for a batch of replies, each of which costs the
/// buffer far more than its bytes.
const SOCKET_RCVBUF: libc::c_int = 8 << 20;

/// How long to wait for any one reply datagram. The kernel answers at once; the limit only
/// turns a lost reply or a bookkeeping bug into an error instead of a daemon hung forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Local and remote endpoints; `local` is the kernel's "source".
    pub tuple: Tuple,
    pub state: TcpState,
    /// The kernel's socket cookie (`sock_gen_cookie`), in the bytes the kernel sent. It
    /// distinguishes this socket from a later one that reuses the same tuple.
    pub cookie: [u8; 8],
    /// Inode of the socket file; 0 for sockets no process holds (`TIME_WAIT`, orphans).
    pub inode: u32,
    pub uid: u32,
    /// The device the socket is bound to (`sk_bound_dev_if`), 0 if none. Exact lookups match
    /// on it, so it is handed back unchanged when destroying.
    pub ifindex: u32,
    /// The data timers of `tcp_info`, where it was asked for and sent.
    pub activity: Option<TcpActivity>,
}

/// How long ago the socket last sent and received data, from the kernel's `tcp_info`
/// (`tcpi_last_data_sent`, `tcpi_last_data_recv`, in milliseconds). Both start at the
/// connection's establishment, and neither moves for keepalives or pure ACKs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpActivity {
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
}

impl TcpActivity {
    /// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h), stable ABI.
    const LAST_DATA_SENT: usize = 44;
    const LAST_DATA_RECV: usize = 52;

    pub fn parse(tcp_info: &[u8]) -> Option<TcpActivity> {
        let at = |off: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(
                tcp_info.get(off..off + 4)?.try_into().ok()?,
            ))
        };
        Some(TcpActivity {
            last_data_sent_ms: at(Self::LAST_DATA_SENT)?,
            last_data_recv_ms: at(Self::LAST_DATA_RECV)?,
        })
    }

    /// Milliseconds since data last moved in either direction.
    pub fn quiet_ms(&self) -> u32 {
        self.last_data_sent_ms.min(self.last_data_recv_ms)
    }
}

impl DiagSocket {
    fn from_response(response: &InetResponse) -> DiagSocket {
        let id = &response.header.socket_id;
        // The crate decodes AF_INET replies into `IpAddr::V4` and AF_INET6 ones into
        // `IpAddr::V6` (v4-mapped addresses included, as the kernel reports them), so the
        // tuple's family is the socket's own family with no conversion here.
        DiagSocket {
            tuple: Tuple::new(
                SocketAddr::new(id.source_address, id.source_port),
                SocketAddr::new(id.destination_address, id.destination_port),
            ),
            state: TcpState(u32::from(response.header.state)),
            cookie: id.cookie,
            inode: response.header.inode,
            uid: response.header.uid,
            ifindex: id.interface_id,
            activity: response.nlas.iter().find_map(|nla| match nla {
                Nla::TcpInfo(raw) => TcpActivity::parse(raw),
                _ => None,
            }),
        }
    }
}

/// Why a destroy did not happen.
#[derive(Debug)]
pub enum DestroyError {
    /// `ENOENT`: no socket with that tuple and cookie (closed, or the tuple was reused).
    Gone,
    /// `EOPNOTSUPP`: the kernel cannot destroy this socket (no `CONFIG_INET_DIAG_DESTROY`, or
    /// a state it refuses to abort).
    NotSupported,
    /// `EPERM`/`EACCES`: the caller lacks `CAP_NET_ADMIN` in the socket's network namespace.
    PermissionDenied,
    /// Anything else, including failures to talk to the kernel at all.
    Other(io::Error),
}

impl DestroyError {
    fn from_errno(errno: i32) -> DestroyError {
        match errno {
            libc::ENOENT => DestroyError::Gone,
            libc::EOPNOTSUPP => DestroyError::NotSupported,
            libc::EPERM | libc::EACCES => DestroyError::PermissionDenied,
            _ => DestroyError::Other(io::Error::from_raw_os_error(errno)),
        }
    }
}

impl fmt::Display for DestroyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestroyError::Gone => f.write_str("gone"),
            DestroyError::NotSupported => f.write_str("not supported by the kernel"),
            DestroyError::PermissionDenied => f.write_str("permission denied"),
            DestroyError::Other(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl std::error::Error for DestroyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DestroyError::Other(e) => Some(e),
            _ => None,
        }
    }
}

/// A `NETLINK_SOCK_DIAG` socket for TCP lookups and destroys. Requests are synchronous: each
/// call sends one request and reads its replies before returning.
pub struct SockDiag {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl SockDiag {
    /// Every TCP state, `TIME_WAIT` and `NEW_SYN_RECV` included (bits 1 to 12 of the
    /// `1 << state` mask).
    ///
    /// Bit 13 is deliberately left out: since Linux 6.8 it selects the `TCP_BOUND_INACTIVE`
    /// pseudo-state, which makes a dump add sockets that are merely bound (no listen, no
    /// connect), which are not connections.
    pub const ALL_STATES: u32 = ((1 << 13) - 1) & !1;

    /// Opens a sock_diag socket. Needs no privilege; destroying needs `CAP_NET_ADMIN`.
    pub fn open() -> io::Result<SockDiag> {
        let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
        sock.bind_auto()?;
        sock.connect(&NetlinkAddr::new(0, 0))?;
        set_recv_timeout(&sock, REPLY_TIMEOUT)?;
        set_rcvbuf(&sock, SOCKET_RCVBUF);
        Ok(SockDiag {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Every TCP socket of both families (IPv4 then IPv6) in the given states (bitmask
    /// `1 << state`; pass [`SockDiag::ALL_STATES`]).
    pub fn dump(&mut self, states: u32) -> anyhow::Result<Vec<DiagSocket>> {
        self.dump_ext(states, ExtensionFlags::empty())
    }

    /// Like [`SockDiag::dump`], with each socket's [`TcpActivity`].
    pub fn dump_with_activity(&mut self, states: u32) -> anyhow::Result<Vec<DiagSocket>> {
        self.dump_ext(states, ExtensionFlags::INFO)
    }

    fn dump_ext(
        &mut self,
        states: u32,
        extensions: ExtensionFlags,
    ) -> anyhow::Result<Vec<DiagSocket>> {
        let mut sockets = Vec::new();
        for (family, name) in [(AF_INET, "IPv4"), (AF_INET6, "IPv6")] {
            self.dump_family(family, states, extensions, &mut sockets)
                .with_context(|| format!("sock_diag dump of {name} TCP sockets"))?;
        }
        Ok(sockets)
    }

    fn dump_family(
        &mut self,
        family: u8,
        states: u32,
        extensions: ExtensionFlags,
        sockets: &mut Vec<DiagSocket>,
    ) -> io::Result<()> {
        let id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        let seq = self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            states,
            extensions,
            id,
        )?;
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
        let interface = match tuple.local {
            SocketAddr::V6(local) => local.scope_id(),
            SocketAddr::V4(_) => 0,
        };
        let answer = self.get_inner(tuple, interface);
        answer.with_context(|| format!("sock_diag get {tuple}"))
    }

    fn get_inner(&mut self, tuple: &Tuple, interface: u32) -> io::Result<Option<DiagSocket>> {
        let (family, id) = socket_id(tuple, interface, NO_COOKIE)?;
        let seq = self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST,
            family,
            Self::ALL_STATES,
            ExtensionFlags::INFO,
            id,
        )?;
        // Without NLM_F_ACK the kernel sends exactly one message: the socket or an error.
        self.replies(seq, |payload| match payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                let found = DiagSocket::from_response(&response);
                // The kernel's lookup is the one incoming packets use: with no connection on
                // the tuple it falls back to the listener on the local port and reports that.
                // A listener is not the socket asked for.
                Some(Ok(same_endpoints(&found.tuple, tuple).then_some(found)))
            }
            NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => Some(Ok(None)),
            NetlinkPayload::Error(e) if e.code.is_some() => Some(Err(e.to_io())),
            NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the kernel acknowledged the lookup without reporting a socket",
            ))),
            _ => None,
        })?
    }

    /// `SOCK_DESTROY` of exactly this socket: tuple plus cookie (the kernel refuses with
    /// `ENOENT` if the cookie no longer matches), requesting an ACK and mapping its error
    /// code.
    ///
    /// For an open TCP socket the kernel runs `tcp_abort`: the owner's next call fails with
    /// `ECONNABORTED` and the peer is sent a RST.
    pub fn destroy(&mut self, sock: &DiagSocket) -> Result<(), DestroyError> {
        let (family, id) =
            socket_id(&sock.tuple, sock.ifindex, sock.cookie).map_err(DestroyError::Other)?;
        let seq = self
            .send(
                SOCK_DESTROY,
                NLM_F_REQUEST | NLM_F_ACK,
                family,
                Self::ALL_STATES,
                ExtensionFlags::empty(),
                id,
            )
            .map_err(DestroyError::Other)?;
        let code = self
            .replies(seq, |payload| match payload {
                NetlinkPayload::Error(e) => Some(e.raw_code()),
                _ => None,
            })
            .map_err(DestroyError::Other)?;
        match code {
            0 => Ok(()),
            code => Err(DestroyError::from_errno(code.saturating_neg())),
        }
    }

    /// Sends one inet_diag request for TCP and returns its sequence number.
    fn send(
        &mut self,
        message_type: u16,
        flags: u16,
        family: u8,
        states: u32,
        extensions: ExtensionFlags,
        socket_id: SocketId,
    ) -> io::Result<u32> {
        let mut bytes = Vec::new();
        let seq = self.encode(
            &mut bytes,
            message_type,
            flags,
            family,
            states,
            extensions,
            socket_id,
        );
        self.send_bytes(&bytes)?;
        Ok(seq)
    }

    /// Appends one inet_diag request for TCP to `out`; returns its sequence number.
    #[allow(clippy::too_many_arguments)]
    fn encode(
        &mut self,
        out: &mut Vec<u8>,
        message_type: u16,
        flags: u16,
        family: u8,
        states: u32,
        extensions: ExtensionFlags,
        socket_id: SocketId,
    ) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions,
            states: StateFlags::empty(),
            socket_id,
        });
        let mut packet = NetlinkMessage::new(header, request.into());
        packet.finalize();
        // finalize() always stamps SOCK_DIAG_BY_FAMILY; SOCK_DESTROY carries the same body.
        packet.header.message_type = message_type;
        let start = out.len();
        out.resize(start + packet.buffer_len(), 0);
        packet.serialize(&mut out[start..]);
        // `StateFlags` has no NEW_SYN_RECV bit and `from_bits_truncate` would drop it, so the
        // mask goes into the encoded request through the crate's own field setter instead.
        InetRequestBuffer::new(&mut out[start + NETLINK_HEADER_LEN..]).set_states(states);
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
        self.batched(
            tuples,
            |tuple| {
                let interface = match tuple.local {
                    SocketAddr::V6(local) => local.scope_id(),
                    SocketAddr::V4(_) => 0,
                };
                let (family, id) = socket_id(tuple, interface, NO_COOKIE)?;
                Ok((
                    SOCK_DIAG_BY_FAMILY,
                    NLM_F_REQUEST,
                    family,
                    ExtensionFlags::INFO,
                    id,
                ))
            },
            |tuple, payload| match payload {
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
            |tuple, why| Err(anyhow::anyhow!("sock_diag get {tuple}: {why}")),
        )
    }

    /// `SOCK_DESTROY` of many sockets, batched like [`SockDiag::get_many`]; each by
    /// tuple plus cookie, as [`SockDiag::destroy`]. Answers are in `socks` order.
    pub fn destroy_many(&mut self, socks: &[&DiagSocket]) -> Vec<Result<(), DestroyError>> {
        self.batched(
            socks,
            |sock| {
                let (family, id) = socket_id(&sock.tuple, sock.ifindex, sock.cookie)?;
                let flags = NLM_F_REQUEST | NLM_F_ACK;
                Ok((SOCK_DESTROY, flags, family, ExtensionFlags::empty(), id))
            },
            |_, payload| match payload {
                NetlinkPayload::Error(e) => Some(match e.raw_code() {
                    0 => Ok(()),
                    code => Err(DestroyError::from_errno(code.saturating_neg())),
                }),
                _ => None,
            },
            |_, why| Err(DestroyError::Other(io::Error::other(why))),
        )
    }

    /// Sends one request per item, [`BATCH`] to a message, and gathers the answer to
    /// each, in order: `answer` reads a reply (None for one that is not an answer),
    /// `failed` stands in for an answer that never came.
    fn batched<I, T>(
        &mut self,
        items: &[I],
        request: impl Fn(&I) -> io::Result<(u16, u16, u8, ExtensionFlags, SocketId)>,
        mut answer: impl FnMut(&I, NetlinkPayload<SockDiagMessage>) -> Option<T>,
        failed: impl Fn(&I, String) -> T,
    ) -> Vec<T> {
        let mut answers = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            let mut bytes = Vec::with_capacity(chunk.len() * 80);
            let mut results: Vec<Option<T>> = (0..chunk.len()).map(|_| None).collect();
            let mut by_seq = std::collections::HashMap::with_capacity(chunk.len());
            for (i, item) in chunk.iter().enumerate() {
                match request(item) {
                    Ok((kind, flags, family, ext, id)) => {
                        let seq =
                            self.encode(&mut bytes, kind, flags, family, Self::ALL_STATES, ext, id);
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
        while answered < expected {
            let len = match self.sock.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.reopen();
                    return Err(e);
                }
            };
            if len > self.buf.len() {
                self.reopen();
                return Err(invalid_data(format!(
                    "a {len}-byte sock_diag datagram did not fit the {}-byte buffer",
                    self.buf.len()
                )));
            }
            let mut offset = 0;
            while offset < len {
                let rest = &self.buf[offset..len];
                let raw = NetlinkBuffer::new_checked(rest).map_err(invalid_data)?;
                let msg_len = raw.length() as usize;
                let msg_seq = raw.sequence_number();
                offset += (msg_len + 3) & !3;
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&rest[..msg_len])
                    .map_err(invalid_data)?;
                if take(msg_seq, message.payload) {
                    answered += 1;
                }
            }
        }
        Ok(())
    }

    /// Starts over on a fresh socket after a failed exchange, so that stray replies of
    /// the abandoned one are not read as answers to the next.
    fn reopen(&mut self) {
        if let Ok(fresh) = SockDiag::open() {
            self.sock = fresh.sock;
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
        loop {
            // MSG_TRUNC makes recv report the datagram's real length, so a datagram larger
            // than the buffer is an error rather than silently cut messages.
            let len = match self.sock.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
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
            while offset < len {
                let rest = &self.buf[offset..len];
                let raw = NetlinkBuffer::new_checked(rest).map_err(invalid_data)?;
                let msg_len = raw.length() as usize;
                let msg_seq = raw.sequence_number();
                let message = &rest[..msg_len];
                // Messages start on 4-byte boundaries (NLMSG_ALIGN).
                offset += (msg_len + 3) & !3;
                if msg_seq != seq {
                    continue;
                }
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(message)
                    .map_err(invalid_data)?;
                if let Some(done) = on_reply(message.payload) {
                    return Ok(done);
                }
            }
        }
    }
}

/// The request's socket id for `tuple`: local is the kernel's source, remote its destination.
fn socket_id(tuple: &Tuple, interface: u32, cookie: [u8; 8]) -> io::Result<(u8, SocketId)> {
    let family = match (tuple.local, tuple.remote) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tuple {tuple} mixes IPv4 and IPv6"),
            ))
        }
    };
    let id = SocketId {
        source_port: tuple.local.port(),
        destination_port: tuple.remote.port(),
        source_address: tuple.local.ip(),
        destination_address: tuple.remote.ip(),
        interface_id: interface,
        cookie,
    };
    Ok((family, id))
}

/// Whether two tuples name the same endpoints, ignoring IPv6 scope ids (the kernel's replies
/// carry the interface separately, in `ifindex`).
fn same_endpoints(a: &Tuple, b: &Tuple) -> bool {
    let key = |t: &Tuple| (t.local.ip(), t.local.port(), t.remote.ip(), t.remote.port());
    key(a) == key(b)
}

fn invalid_data(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
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
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
    use std::os::fd::FromRawFd;
    use std::thread::sleep;
    use std::time::Instant;

    /// These tests act on real loopback sockets and SOCK_DESTROY needs CAP_NET_ADMIN: without
    /// root they must fail loudly, never pass without having checked anything.
    fn require_root() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the sock_diag tests need root (CAP_NET_ADMIN): run them as root, e.g. \
             `sudo -E cargo test -p connwatch --lib diag`"
        );
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
        assert_ne!(got.cookie, NO_COOKIE);
        // The same socket the dump reports, cookie and all; only the exact lookup asks
        // for tcp_info.
        assert!(got.activity.is_some(), "the lookup carries tcp_info");
        let all = diag.dump(SockDiag::ALL_STATES).unwrap();
        let plain = DiagSocket {
            activity: None,
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
        assert_ne!(server.cookie, NO_COOKIE);

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

    /// More than a batch: lookups answer in order, absent tuples are None, and a
    /// batched destroy resets every peer; destroying again finds them gone.
    #[test]
    fn batched_lookups_and_destroys() {
        require_root();
        let listener = TcpListener::bind((V4, 0)).unwrap();
        let mut conns = Vec::new();
        for _ in 0..(BATCH * 2 + 50) {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            conns.push((client, server));
        }
        let server_tuples: Vec<Tuple> = conns
            .iter()
            .map(|(_, s)| Tuple::new(s.local_addr().unwrap(), s.peer_addr().unwrap()))
            .collect();
        let mut asked = server_tuples.clone();
        let mut absent = server_tuples[0];
        absent.remote.set_port(1);
        asked.insert(BATCH, absent);
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
    }

    #[test]
    fn mixed_family_tuple_is_rejected() {
        let mut diag = SockDiag::open().unwrap();
        let tuple = Tuple::new((V4, 1).into(), (V6, 2).into());
        let err = diag.get(&tuple).unwrap_err();
        assert!(format!("{err:#}").starts_with("sock_diag get 127.0.0.1:1 -> [::1]:2: "));
    }

    /// The client end of a connection it closed first lingers in TIME_WAIT; on Linux 6.18
    /// SOCK_DESTROY removes it (tcp_abort deschedules the timewait socket). Older kernels
    /// refuse non-full sockets with EOPNOTSUPP, which `NotSupported` reports.
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

    #[test]
    fn stale_replies_are_skipped() {
        require_root();
        let conn = Conn::open(V4);
        let mut diag = SockDiag::open().unwrap();
        let (family, id) = socket_id(&conn.server_tuple(), 0, NO_COOKIE).unwrap();
        diag.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST,
            family,
            SockDiag::ALL_STATES,
            ExtensionFlags::empty(),
            id,
        )
        .unwrap();
        let got = diag.get(&conn.client_tuple()).unwrap().expect("client end");
        assert_eq!(got.tuple, conn.client_tuple());
    }
}
