//! The control socket's server: binds it root-only, accepts connections, and hands
//! each request line to the event loop as a [`Job`]; connection tasks only parse and
//! write, the event loop answers between kernel events.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::protocol::{error, parse, Reply, Request, MAX_REQUEST};

/// A request on its way to the event loop, with where its answer goes.
pub struct Job {
    pub req: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// Binds the control socket, readable and writable by its owner only. A file already
/// there is removed if it is a socket (the instance lock says no daemon uses it).
pub fn bind(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        // A socket something still listens on is another program's: never taken over
        // (the instance lock says no connwatch daemon uses it).
        Ok(m)
            if m.file_type().is_socket()
                && std::os::unix::net::UnixStream::connect(path).is_ok() =>
        {
            bail!(
                "{} is a socket another program listens on: choose another --api-socket",
                path.display()
            )
        }
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a socket: remove it or choose another --api-socket",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => bail!("cannot look at {}: {e}", path.display()),
    }
    // Created without group or other access from the start, then made exactly 0600.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener =
        bound.with_context(|| format!("cannot listen on the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// A listener whose connections are served one task each.
pub trait Accept {
    type Stream;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>>;
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Hands each accepted connection to `serve` for as long as the daemon runs; a failed
/// accept (out of descriptors, say) is logged and retried after a pause.
pub async fn accept_each<L: Accept>(what: &str, listener: L, mut serve: impl FnMut(L::Stream)) {
    loop {
        match listener.accept_one().await {
            Ok(stream) => serve(stream),
            Err(e) => {
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The most control connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a control connection may stay without a whole request line before it is
/// closed, and the longest a reply may take to be written.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts control connections for as long as the daemon runs: at most
/// [`MAX_CONNECTIONS`] at once, none idle longer than [`IDLE_TIMEOUT`]. Connections
/// only parse and write; the event loop answers, so no client can hold it up.
pub async fn serve(listener: UnixListener, jobs: mpsc::Sender<Job>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    accept_each("control socket", listener, |stream| {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "control socket: {MAX_CONNECTIONS} connections already open, closing a new one"
            );
            return;
        };
        let jobs = jobs.clone();
        tokio::spawn(async move {
            connection(stream, jobs).await;
            drop(slot);
        });
    })
    .await
}

/// Sends a request to the event loop and waits for its answer.
pub async fn ask(jobs: &mpsc::Sender<Job>, req: Request) -> Reply {
    let (tx, rx) = oneshot::channel();
    if jobs.send(Job { req, reply: tx }).await.is_err() {
        return error("the daemon is stopping");
    }
    rx.await.unwrap_or_else(|_| error("the daemon is stopping"))
}

/// What a connection sent next.
enum Line {
    /// A request line, with its newline if it had one (the last line of a stream may not).
    Request(BytesMut),
    /// More than [`MAX_REQUEST`] bytes without a newline.
    TooLong,
    /// The end of the stream, or a failed read.
    End,
}

/// The room made in the buffer for each read.
const READ_CHUNK: usize = 8 * 1024;

/// A connection's request lines: what was read and not yet handed out, in one buffer
/// reused for the life of the connection.
struct Lines {
    buf: BytesMut,
    /// How much of `buf` is known to hold no newline, so that a long line arriving in
    /// pieces is searched once.
    scanned: usize,
}

impl Lines {
    fn new() -> Lines {
        Lines {
            buf: BytesMut::with_capacity(READ_CHUNK),
            scanned: 0,
        }
    }

    /// Splits the next line off the buffer, reading from `read` until it holds a whole one.
    async fn next(&mut self, read: &mut (impl AsyncRead + Unpin)) -> Line {
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + at;
                self.scanned = 0;
                if end > MAX_REQUEST {
                    return Line::TooLong;
                }
                return Line::Request(self.buf.split_to(end + 1));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_REQUEST {
                return Line::TooLong;
            }
            self.buf.reserve(READ_CHUNK);
            match read.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Line::End,
                Ok(0) => {
                    self.scanned = 0;
                    return Line::Request(self.buf.split());
                }
                Ok(_) => {}
                Err(_) => return Line::End,
            }
        }
    }
}

async fn connection(stream: UnixStream, jobs: mpsc::Sender<Job>) {
    let (mut read, mut write) = stream.into_split();
    let mut lines = Lines::new();
    loop {
        let next = tokio::time::timeout(IDLE_TIMEOUT, lines.next(&mut read)).await;
        let Ok(next) = next else {
            return; // idle, or a request dribbled in too slowly
        };
        let (reply, too_long) = match next {
            Line::End => return,
            Line::TooLong => (
                error(format!("request longer than {MAX_REQUEST} bytes")),
                true,
            ),
            Line::Request(line) => match std::str::from_utf8(&line) {
                Err(_) => (error("malformed request: not UTF-8"), false),
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => match parse(line.trim()) {
                    Ok(req) => (ask(&jobs, req).await, false),
                    Err(e) => (error(e), false),
                },
            },
        };
        let mut line = reply.to_line();
        line.push('\n');
        match tokio::time::timeout(IDLE_TIMEOUT, write.write_all(line.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => return, // gone, or not reading its replies
        }
        if too_long {
            // The rest of the line cannot be told from the next request.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Writes `input` to a connection served by [`connection`] (closing the write side
    /// after it if `close` says so) and returns every reply line up to the server's end
    /// of the stream. Each request is answered with its own debug form.
    async fn exchange(input: Vec<u8>, close: bool) -> Vec<String> {
        exchange_in_pieces(input, usize::MAX, close).await
    }

    /// [`exchange`], writing `input` `piece` bytes at a time and letting the server read
    /// each before the next.
    async fn exchange_in_pieces(input: Vec<u8>, piece: usize, close: bool) -> Vec<String> {
        let (client, server) = UnixStream::pair().unwrap();
        let (jobs, mut queue) = mpsc::channel::<Job>(4);
        tokio::spawn(async move {
            while let Some(job) = queue.recv().await {
                let _ = job.reply.send(Reply::Json(
                    json!({"ok": true, "req": format!("{:?}", job.req)}),
                ));
            }
        });
        let served = tokio::spawn(connection(server, jobs));
        let (mut read, mut write) = client.into_split();
        let writer = tokio::spawn(async move {
            // The server may close first (a request too long): a failed write is expected.
            for piece in input.chunks(piece) {
                if write.write_all(piece).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            if close {
                let _ = write.shutdown().await;
            } else {
                // Keep the write side open until the server has closed its end.
                std::future::pending::<()>().await;
            }
        });
        let mut out = String::new();
        read.read_to_string(&mut out).await.unwrap();
        writer.abort();
        served.await.unwrap();
        out.lines().map(str::to_owned).collect()
    }

    fn error_of(line: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["ok"], false, "{line}");
        v["error"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn requests_are_answered_in_order_and_blank_lines_skipped() {
        let input = b"{\"cmd\":\"status\"}\n\n  \r\n{\"cmd\":\"reload\"}\r\n{\"cmd\":\"policy\"}";
        let replies = exchange(input.to_vec(), true).await;
        assert_eq!(
            replies,
            [
                r#"{"ok":true,"req":"Status"}"#,
                r#"{"ok":true,"req":"Reload"}"#,
                r#"{"ok":true,"req":"Policy"}"#,
            ]
        );
    }

    #[tokio::test]
    async fn requests_arriving_in_pieces_are_put_together() {
        let input = b"{\"cmd\":\"status\"}\n\n{\"cmd\":\"reload\"}\n{\"cmd\":\"policy\"}";
        for piece in [1, 3, 17] {
            let replies = exchange_in_pieces(input.to_vec(), piece, true).await;
            assert_eq!(
                replies,
                [
                    r#"{"ok":true,"req":"Status"}"#,
                    r#"{"ok":true,"req":"Reload"}"#,
                    r#"{"ok":true,"req":"Policy"}"#,
                ],
                "{piece}-byte pieces"
            );
        }
    }

    #[tokio::test]
    async fn malformed_requests_are_answered_and_the_connection_kept() {
        let input = b"\xff\xfe\nnope\n{\"cmd\":\"status\"}\n";
        let replies = exchange(input.to_vec(), true).await;
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert_eq!(error_of(&replies[0]), "malformed request: not UTF-8");
        assert!(
            error_of(&replies[1]).starts_with("malformed request: not JSON"),
            "{}",
            replies[1]
        );
        assert_eq!(replies[2], r#"{"ok":true,"req":"Status"}"#);
    }

    #[tokio::test]
    async fn a_request_of_the_longest_length_is_read() {
        let mut line = br#"{"cmd":"status"}"#.to_vec();
        line.resize(MAX_REQUEST, b' ');
        line.push(b'\n');
        line.extend_from_slice(b"{\"cmd\":\"reload\"}\n");
        let replies = exchange(line, true).await;
        assert_eq!(
            replies,
            [
                r#"{"ok":true,"req":"Status"}"#,
                r#"{"ok":true,"req":"Reload"}"#
            ]
        );
    }

    #[tokio::test]
    async fn a_request_too_long_is_refused_and_the_connection_closed() {
        for (close, newline) in [(true, true), (false, false), (true, false)] {
            let mut input = b"{\"cmd\":\"status\"}\n".to_vec();
            input.resize(input.len() + MAX_REQUEST + 1, b' ');
            if newline {
                input.extend_from_slice(b"\n{\"cmd\":\"reload\"}\n");
            }
            let replies = exchange(input, close).await;
            assert_eq!(replies.len(), 2, "{replies:?}");
            assert_eq!(replies[0], r#"{"ok":true,"req":"Status"}"#);
            assert_eq!(
                error_of(&replies[1]),
                format!("request longer than {MAX_REQUEST} bytes")
            );
        }
    }
}
