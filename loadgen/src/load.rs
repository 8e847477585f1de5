//! The load itself. Every worker listens on its own port and connects to itself from
//! its own source address, so workers never share a four-tuple space and each one's
//! connections are told apart by port.

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::sys::{self, Epoll};
use crate::watch::Watch;

/// Where a worker listens and where it connects from.
#[derive(clap::Args, Debug, Clone)]
pub struct Endpoint {
    /// Source address of this worker's client sockets (any 127.0.0.0/8 address).
    #[arg(long)]
    pub src: Ipv4Addr,
    /// Listener address.
    #[arg(long, default_value = "127.0.0.1")]
    pub dst: Ipv4Addr,
    /// Listener port (one per worker).
    #[arg(long)]
    pub port: u16,
    /// Hard limit on this process's life, whatever happens.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u32,
}

impl Endpoint {
    fn listen(&self) -> Result<TcpListener> {
        sys::exit_after(self.max_secs);
        sys::listener(SocketAddrV4::new(self.dst, self.port), 65535)
            .with_context(|| format!("listen on {}:{}", self.dst, self.port))
    }

    fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst, self.port)
    }
}

fn say(line: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Blocks until the controller says `go` (or closes stdin, which is an error).
fn wait_go() -> Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if io::stdin().lock().read_line(&mut line)? == 0 {
            bail!("stdin closed before go");
        }
        if line.trim() == "go" {
            return Ok(());
        }
    }
}

/// Connects once and accepts the same connection: only this process connects to its
/// listener, so the accept queue is in connect order.
fn pair(ep: &Endpoint, l: &TcpListener) -> Result<(TcpStream, TcpStream)> {
    let c = sys::connect_from(ep.src, ep.target()).context("connect")?;
    let (s, _) = l.accept().context("accept")?;
    Ok((c, s))
}

/// Opens `count` connections (at `rate` a second, or as fast as possible) and holds
/// them, watching each for its end, until told to quit.
pub fn conns(ep: &Endpoint, count: usize, rate: f64) -> Result<()> {
    let l = ep.listen()?;
    l.set_nonblocking(true)?;
    let mut watch = Watch::new()?;
    let mut pending: HashMap<u16, (u64, TcpStream)> = HashMap::new();
    let (mut opened, mut errors) = (0usize, 0usize);
    let mut last_error = None;
    let start = sys::now_ns();
    let accept_all =
        |pending: &mut HashMap<u16, (u64, TcpStream)>, watch: &mut Watch| -> Result<()> {
            loop {
                match l.accept() {
                    Ok((s, peer)) => {
                        if let Some((t, c)) = pending.remove(&peer.port()) {
                            watch.add(t, c, s)?;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e).context("accept"),
                }
            }
        };
    while opened + errors < count {
        let due = if rate > 0.0 {
            let elapsed = (sys::now_ns() - start) as f64 / 1e9;
            ((elapsed * rate) as usize + 1).min(count)
        } else {
            (opened + errors + 256).min(count)
        };
        while opened + errors < due {
            let t = sys::now_ns();
            match sys::connect_from(ep.src, ep.target()) {
                Ok(c) => {
                    let port = sys::local_addr(&c)?.port();
                    pending.insert(port, (t, c));
                    opened += 1;
                }
                Err(e) => {
                    errors += 1;
                    last_error = Some(e);
                    if errors > count / 100 + 10 {
                        bail!("too many connect errors ({errors}), last: {:?}", last_error);
                    }
                }
            }
            if pending.len() >= 256 {
                accept_all(&mut pending, &mut watch)?;
            }
        }
        accept_all(&mut pending, &mut watch)?;
        if rate > 0.0 {
            let next = start + ((opened + errors) as f64 / rate * 1e9) as u64;
            let wait_ms = next.saturating_sub(sys::now_ns()) / 1_000_000;
            for cmd in watch.poll(wait_ms as i32)? {
                if watch.command(&cmd)? {
                    return Ok(());
                }
            }
        }
    }
    let settle = sys::now_ns() + 5_000_000_000;
    while !pending.is_empty() && sys::now_ns() < settle {
        std::thread::sleep(Duration::from_millis(1));
        accept_all(&mut pending, &mut watch)?;
    }
    let elapsed_ms = (sys::now_ns() - start) / 1_000_000;
    say(&format!(
        "ready {} {} {elapsed_ms}{}",
        watch.len(),
        errors + pending.len(),
        last_error.map(|e| format!(" {e}")).unwrap_or_default()
    ))?;
    watch.serve()
}

/// Request/response on `conns` persistent connections: each transaction is `size` bytes
/// each way. Prints `result <transactions> <elapsed_ns>`.
pub fn rr(ep: &Endpoint, conns: usize, secs: f64, size: usize) -> Result<()> {
    let l = ep.listen()?;
    let epoll = Epoll::new()?;
    let mut socks = Vec::new();
    for i in 0..conns {
        let (c, s) = pair(ep, &l)?;
        c.set_nodelay(true)?;
        s.set_nodelay(true)?;
        c.set_nonblocking(true)?;
        s.set_nonblocking(true)?;
        epoll.add(c.as_raw_fd(), sys::IN, (i as u64) << 1)?;
        epoll.add(s.as_raw_fd(), sys::IN, (i as u64) << 1 | 1)?;
        socks.push([c, s]);
    }
    say("ready")?;
    wait_go()?;
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = vec![[0usize; 2]; conns];
    let mut done = 0u64;
    let start = sys::now_ns();
    let end = start + (secs * 1e9) as u64;
    for [c, _] in &socks {
        sys::write_some(c, &msg)?;
    }
    let mut events = Vec::new();
    while sys::now_ns() < end {
        epoll.wait(&mut events, 256, 100)?;
        for &(_, token) in &events {
            let (i, side) = ((token >> 1) as usize, (token & 1) as usize);
            let fd = &socks[i][side];
            loop {
                match sys::read_some(fd, &mut buf) {
                    Ok(0) => bail!("a request/response connection closed"),
                    Ok(n) => pending[i][side] += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("read"),
                }
            }
            while pending[i][side] >= size {
                pending[i][side] -= size;
                if side == 0 {
                    done += 1;
                }
                sys::write_some(fd, &msg)?;
            }
        }
    }
    say(&format!("result {done} {}", sys::now_ns() - start))
}

/// Bulk transfer over one connection: prints `result <bytes> <elapsed_ns>`.
pub fn bulk(ep: &Endpoint, secs: f64) -> Result<()> {
    let l = ep.listen()?;
    let (c, s) = pair(ep, &l)?;
    c.set_nonblocking(true)?;
    s.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    epoll.add(c.as_raw_fd(), sys::OUT, 0)?;
    epoll.add(s.as_raw_fd(), sys::IN, 1)?;
    say("ready")?;
    wait_go()?;
    let chunk = vec![0x5au8; 256 * 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let start = sys::now_ns();
    let end = start + (secs * 1e9) as u64;
    let mut events = Vec::new();
    while sys::now_ns() < end {
        epoll.wait(&mut events, 4, 100)?;
        for &(_, token) in &events {
            if token == 0 {
                loop {
                    match sys::write_some(&c, &chunk) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e).context("write"),
                    }
                }
            } else {
                loop {
                    match sys::read_some(&s, &mut buf) {
                        Ok(0) => bail!("the bulk connection closed"),
                        Ok(n) => bytes += n as u64,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e).context("read"),
                    }
                }
            }
        }
    }
    say(&format!("result {bytes} {}", sys::now_ns() - start))
}

/// Short connections: connect, a 64-byte request, a 64-byte response, the server
/// closes, the client reads EOF and closes. `rate` (per second, 0 = as fast as
/// possible) paces them; every `keep_every`-th one is held open and watched instead.
/// Prints `result <completed> <elapsed_ns> <errors> <kept>`, then answers commands
/// about the kept ones until `quit`.
pub fn crr(ep: &Endpoint, secs: f64, rate: f64, keep_every: u64) -> Result<()> {
    let l = ep.listen()?;
    say("ready")?;
    wait_go()?;
    // After `go`: the watch reads stdin without blocking from here on.
    let mut watch = Watch::new()?;
    let req = [1u8; 64];
    let mut resp = [0u8; 64];
    let (mut done, mut errors, mut kept) = (0u64, 0u64, 0u64);
    let mut last_error = None;
    let start = sys::now_ns();
    let end = start + (secs * 1e9) as u64;
    let mut k = 0u64;
    loop {
        let now = sys::now_ns();
        if now >= end {
            break;
        }
        if rate > 0.0 {
            let target = start + (k as f64 / rate * 1e9) as u64;
            if now < target {
                let ms = ((target - now) / 1_000_000) as i32;
                for cmd in watch.poll(ms)? {
                    if watch.command(&cmd)? {
                        return Ok(());
                    }
                }
                if sys::now_ns() < target {
                    continue;
                }
            }
        }
        k += 1;
        let t = sys::now_ns();
        let c = match sys::connect_from(ep.src, ep.target()) {
            Ok(c) => c,
            Err(e) => {
                errors += 1;
                last_error = Some(e);
                continue;
            }
        };
        let keep = keep_every > 0 && k.is_multiple_of(keep_every);
        let one = (|| -> io::Result<Option<TcpStream>> {
            (&c).write_all(&req)?;
            let (mut s, _) = l.accept()?;
            s.read_exact(&mut resp)?;
            s.write_all(&resp)?;
            if keep {
                (&c).read_exact(&mut resp)?;
                return Ok(Some(s));
            }
            drop(s);
            (&c).read_exact(&mut resp)?;
            let n = (&c).read(&mut resp)?;
            if n != 0 {
                return Err(io::Error::other("data after the response"));
            }
            Ok(None)
        })();
        match one {
            Ok(Some(s)) => {
                watch.add(t, c, s)?;
                kept += 1;
            }
            Ok(None) => done += 1,
            Err(e) => {
                errors += 1;
                last_error = Some(e);
            }
        }
        if keep_every > 0 && k.is_multiple_of(64) {
            for cmd in watch.poll(0)? {
                if watch.command(&cmd)? {
                    return Ok(());
                }
            }
        }
    }
    say(&format!(
        "result {done} {} {errors} {kept}{}",
        sys::now_ns() - start,
        last_error.map(|e| format!(" {e}")).unwrap_or_default()
    ))?;
    watch.serve()
}
