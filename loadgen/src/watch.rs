//! Connections held open and watched for their end: each pair (client and server end,
//! both in this process) records when it was opened and when either end first saw an
//! error or EOF. Commands arrive as lines on stdin through the same epoll.

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use crate::sys::{self, Epoll};

const STDIN_TOKEN: u64 = u64::MAX;

/// How a socket learned its connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum End {
    /// ECONNRESET: the peer of a destroyed socket.
    Reset = 1,
    /// ECONNABORTED: the destroyed socket itself.
    Aborted = 2,
    /// Orderly EOF.
    Eof = 3,
    Other = 4,
}

struct Pair {
    t_open: u64,
    /// First ECONNRESET seen on either end (the peer of the destroyed socket).
    t_reset: u64,
    /// First end of any kind seen on either end.
    t_end: u64,
    fds: [Option<TcpStream>; 2],
}

pub struct Watch {
    ep: Epoll,
    pairs: Vec<Pair>,
    ended: usize,
    counts: [usize; 5],
    stdin_buf: Vec<u8>,
    stdin_open: bool,
    events: Vec<(u32, u64)>,
}

impl Watch {
    pub fn new() -> io::Result<Watch> {
        let ep = Epoll::new()?;
        ep.add(0, sys::IN, STDIN_TOKEN)?;
        sys::set_nonblocking(&io::stdin())?;
        Ok(Watch {
            ep,
            pairs: Vec::new(),
            ended: 0,
            counts: [0; 5],
            stdin_buf: Vec::new(),
            stdin_open: true,
            events: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Watches a connection opened at `t_open` (monotonic ns).
    pub fn add(&mut self, t_open: u64, client: TcpStream, server: TcpStream) -> io::Result<()> {
        let idx = self.pairs.len() as u64;
        for (side, s) in [&client, &server].into_iter().enumerate() {
            sys::set_nonblocking(s)?;
            self.ep
                .add(s.as_raw_fd(), sys::IN | sys::RDHUP, idx << 1 | side as u64)?;
        }
        self.pairs.push(Pair {
            t_open,
            t_reset: 0,
            t_end: 0,
            fds: [Some(client), Some(server)],
        });
        Ok(())
    }

    /// Handles what happens within `timeout_ms` (-1: until something does); returns the
    /// command lines that arrived. EOF on stdin reads as `quit`.
    pub fn poll(&mut self, timeout_ms: i32) -> io::Result<Vec<String>> {
        let mut cmds = Vec::new();
        let mut events = std::mem::take(&mut self.events);
        self.ep.wait(&mut events, 1024, timeout_ms)?;
        let now = sys::now_ns();
        for &(ev, token) in &events {
            if token == STDIN_TOKEN {
                self.read_stdin(&mut cmds);
                continue;
            }
            self.on_socket(ev, token, now);
        }
        self.events = events;
        Ok(cmds)
    }

    fn read_stdin(&mut self, cmds: &mut Vec<String>) {
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match sys::read_some(&io::stdin(), &mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.stdin_buf.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        while let Some(pos) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=pos).collect();
            cmds.push(String::from_utf8_lossy(&line).trim().to_string());
        }
        if eof && self.stdin_open {
            self.stdin_open = false;
            self.ep.del(0);
            cmds.push("quit".into());
        }
    }

    fn on_socket(&mut self, ev: u32, token: u64, now: u64) {
        let (idx, side) = ((token >> 1) as usize, (token & 1) as usize);
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        let Some(fd) = pair.fds[side].as_ref() else {
            return;
        };
        let end = match sys::so_error(fd) {
            libc::ECONNRESET => End::Reset,
            libc::ECONNABORTED => End::Aborted,
            0 => {
                let mut buf = [0u8; 512];
                match sys::read_some(fd, &mut buf) {
                    Ok(0) => End::Eof,
                    Ok(_) => return,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if ev & (sys::RDHUP | sys::HUP) != 0 {
                            End::Eof
                        } else {
                            return;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => End::Reset,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => End::Aborted,
                    Err(_) => End::Other,
                }
            }
            _ => End::Other,
        };
        self.counts[end as usize] += 1;
        if pair.t_end == 0 {
            pair.t_end = now;
            self.ended += 1;
        }
        if end == End::Reset && pair.t_reset == 0 {
            pair.t_reset = now;
        }
        if let Some(fd) = pair.fds[side].take() {
            self.ep.del(fd.as_raw_fd());
        }
    }

    /// `report <pairs> <ended> <first_end_ns> <last_end_ns> <resets> <aborts> <eofs> <other>`
    pub fn report(&self) -> String {
        let ends = self.pairs.iter().map(|p| p.t_end).filter(|&t| t > 0);
        let first = ends.clone().min().unwrap_or(0);
        let last = ends.max().unwrap_or(0);
        format!(
            "report {} {} {} {} {} {} {} {}",
            self.pairs.len(),
            self.ended,
            first,
            last,
            self.counts[End::Reset as usize],
            self.counts[End::Aborted as usize],
            self.counts[End::Eof as usize],
            self.counts[End::Other as usize]
        )
    }

    /// One `c <t_open> <t_reset> <t_end>` line per pair, then `end`.
    pub fn dump(&self, out: &mut impl Write) -> io::Result<()> {
        for p in &self.pairs {
            writeln!(out, "c {} {} {}", p.t_open, p.t_reset, p.t_end)?;
        }
        writeln!(out, "end")
    }

    /// Closes every socket still open with a RST (no TIME_WAIT left behind).
    pub fn close_all(&mut self) {
        for p in &mut self.pairs {
            for fd in p.fds.iter_mut().filter_map(Option::take) {
                sys::set_linger0(&fd);
                self.ep.del(fd.as_raw_fd());
            }
        }
    }

    /// Answers commands until `quit`: `report`, `dump`.
    pub fn serve(&mut self) -> anyhow::Result<()> {
        loop {
            for cmd in self.poll(-1)? {
                if self.command(&cmd)? {
                    return Ok(());
                }
            }
        }
    }

    /// Runs one command; true for `quit`.
    pub fn command(&mut self, cmd: &str) -> anyhow::Result<bool> {
        let mut out = io::stdout().lock();
        match cmd {
            "report" => writeln!(out, "{}", self.report())?,
            "dump" => self.dump(&mut out)?,
            "quit" => {
                self.close_all();
                return Ok(true);
            }
            "" => {}
            other => writeln!(out, "error unknown command {other:?}")?,
        }
        out.flush()?;
        Ok(false)
    }
}
