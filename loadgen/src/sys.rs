//! Thin wrappers over the socket, epoll and clock calls the load needs and std lacks:
//! a chosen source address without a chosen port, a listen backlog, SO_LINGER, SO_ERROR.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns` and so of the
/// daemon's deadlines.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(sa.sin_port),
    )
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a c_int option value of the right size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::addr_of!(v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listener with SO_REUSEADDR and the given backlog (std's is fixed at 128).
pub fn listener(addr: SocketAddrV4, backlog: i32) -> io::Result<TcpListener> {
    let fd = tcp_socket()?;
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let sa = sockaddr(addr);
    // SAFETY: sa is a valid sockaddr_in of the size passed.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    // SAFETY: listen on a bound socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(TcpListener::from(fd))
}

/// A blocking connect from `src` (any port, chosen at connect time so only the
/// four-tuple must be unique) to `dst`. On loopback the handshake completes inside
/// the call.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    let fd = tcp_socket()?;
    setsockopt_int(
        fd.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1,
    )?;
    let sa = sockaddr(SocketAddrV4::new(src, 0));
    // SAFETY: sa is a valid sockaddr_in of the size passed.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    let da = sockaddr(dst);
    loop {
        // SAFETY: da is a valid sockaddr_in of the size passed.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::addr_of!(da).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        match cvt(rc) {
            Ok(_) => return Ok(TcpStream::from(fd)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

pub fn local_addr(fd: &impl AsRawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; getsockname fills at most len bytes.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), std::ptr::addr_of_mut!(sa).cast(), &mut len) })?;
    Ok(from_sockaddr(&sa))
}

/// Closing after this sends a RST and leaves no TIME_WAIT behind.
pub fn set_linger0(fd: &impl AsRawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// The socket's pending error (and clears it): ECONNRESET for a peer that was reset,
/// ECONNABORTED for a socket destroyed under its owner.
pub fn so_error(fd: &impl AsRawFd) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a c_int out value of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        v
    }
}

pub struct Epoll(OwnedFd);

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const HUP: u32 = libc::EPOLLHUP as u32;

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 returns a fresh descriptor we own.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: a valid event struct; fd stays open while registered (callers
        // remove it before closing).
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    pub fn del(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in add.
        unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Waits up to `timeout_ms` (-1: forever); returns (events, token) pairs.
    pub fn wait(&self, out: &mut Vec<(u32, u64)>, max: usize, timeout_ms: i32) -> io::Result<()> {
        out.clear();
        let mut buf: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; max];
        // SAFETY: buf holds max events.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                buf.as_mut_ptr(),
                max as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        for ev in &buf[..n as usize] {
            let (events, token) = (ev.events, ev.u64);
            out.push((events, token));
        }
        Ok(())
    }
}

/// Exits the process after `secs`, whatever it is doing: load stops by itself.
pub fn exit_after(secs: u32) {
    // SAFETY: alarm has no preconditions; SIGALRM's default action ends the process.
    unsafe { libc::alarm(secs) };
}

pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Reads what is available on a non-blocking descriptor: Ok(0) is EOF, WouldBlock
/// means nothing now.
pub fn read_some(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn write_some(fd: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
