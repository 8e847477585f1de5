//! A minimal NETLINK_SOCK_DIAG client for IPv4 TCP: a dump and SOCK_DESTROY, as `ss`
//! and tcp_closer use them. Used by the polling peer and by the end-of-run checks, so
//! the benchmarks judge connwatch with code that is not connwatch's.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

/// Every state but the TCP_BOUND_INACTIVE pseudo-state (bit 13).
pub const ALL_STATES: u32 = ((1 << 13) - 1) & !1;
pub const ESTABLISHED: u8 = 1;
pub const TIME_WAIT: u8 = 6;
pub const LISTEN: u8 = 10;
pub const NEW_SYN_RECV: u8 = 12;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// One IPv4 TCP socket as the kernel reports it.
#[derive(Clone, Copy, Debug)]
pub struct Sock {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub state: u8,
    pub cookie: u64,
    id: SockId,
}

impl Sock {
    fn from_msg(m: &DiagMsg) -> Sock {
        let ip = |b: &[u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        Sock {
            local: SocketAddrV4::new(ip(&m.id.src), u16::from_be_bytes(m.id.sport)),
            remote: SocketAddrV4::new(ip(&m.id.dst), u16::from_be_bytes(m.id.dport)),
            state: m.state,
            cookie: u64::from(m.id.cookie[0]) | u64::from(m.id.cookie[1]) << 32,
            id: m.id,
        }
    }

    /// Whether either port is in `lo..=hi`.
    pub fn in_ports(&self, lo: u16, hi: u16) -> bool {
        (lo..=hi).contains(&self.local.port()) || (lo..=hi).contains(&self.remote.port())
    }
}

pub struct Diag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Diag {
    pub fn open() -> io::Result<Diag> {
        // SAFETY: plain socket(2); owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Diag {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&mut self, ty: u16, flags: u16, req: ReqV2) -> io::Result<u32> {
        self.seq += 1;
        #[repr(C)]
        struct Msg {
            hdr: NlHdr,
            req: ReqV2,
        }
        let msg = Msg {
            hdr: NlHdr {
                len: size_of::<Msg>() as u32,
                ty,
                flags,
                seq: self.seq,
                pid: 0,
            },
            req,
        };
        // SAFETY: sockaddr_nl is plain data; zero is pid 0 (the kernel), no groups.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and sa are valid for the sizes passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::addr_of!(msg).cast(),
                size_of::<Msg>(),
                0,
                std::ptr::addr_of!(sa).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads datagrams, handing each message of sequence `seq` to `f` (type, payload)
    /// until it returns Some.
    fn read<T>(
        &mut self,
        seq: u32,
        mut f: impl FnMut(u16, &[u8]) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            let mut off = 0;
            while off + size_of::<NlHdr>() <= n {
                // SAFETY: at least a header's bytes remain; read unaligned.
                let hdr: NlHdr =
                    unsafe { std::ptr::read_unaligned(self.buf[off..].as_ptr().cast()) };
                let len = hdr.len as usize;
                if len < size_of::<NlHdr>() || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink message",
                    ));
                }
                let payload = &self.buf[off + size_of::<NlHdr>()..off + len];
                off += (len + 3) & !3;
                if hdr.seq != seq {
                    continue;
                }
                if let Some(r) = f(hdr.ty, payload) {
                    return r;
                }
            }
        }
    }

    fn error_code(payload: &[u8]) -> i32 {
        i32::from_ne_bytes(payload[..4].try_into().unwrap_or([0; 4]))
    }

    /// Every IPv4 TCP socket in `states` (a `1 << state` mask).
    pub fn dump(&mut self, states: u32) -> io::Result<Vec<Sock>> {
        let req = ReqV2 {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states,
            ..Default::default()
        };
        let seq = self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req)?;
        let mut out = Vec::new();
        self.read(seq, |ty, payload| match ty {
            NLMSG_DONE => Some(Ok(())),
            NLMSG_ERROR => {
                let code = Self::error_code(payload);
                Some(if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                })
            }
            SOCK_DIAG_BY_FAMILY if payload.len() >= size_of::<DiagMsg>() => {
                // SAFETY: a whole inet_diag_msg; read unaligned.
                let m: DiagMsg = unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
                out.push(Sock::from_msg(&m));
                None
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// SOCK_DESTROY of exactly this socket (tuple and cookie). Ok(false): already gone.
    pub fn destroy(&mut self, s: &Sock) -> io::Result<bool> {
        let req = ReqV2 {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states: ALL_STATES,
            id: s.id,
            ..Default::default()
        };
        let seq = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)?;
        let code = self.read(seq, |ty, payload| {
            (ty == NLMSG_ERROR).then(|| Ok(Self::error_code(payload)))
        })?;
        match -code {
            0 => Ok(true),
            libc::ENOENT => Ok(false),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}
