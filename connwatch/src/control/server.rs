//! The control socket's server: binds it root-only, accepts connections, and hands
//! each request line to the event loop as a [`Job`]; connection tasks only parse and
//! write, the event loop answers between kernel events.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
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

/// Accepts control connections for as long as the daemon runs.
pub async fn serve(listener: UnixListener, jobs: mpsc::Sender<Job>) {
    accept_each("control socket", listener, |stream| {
        tokio::spawn(connection(stream, jobs.clone()));
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

async fn connection(stream: UnixStream, jobs: mpsc::Sender<Job>) {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let too_long = n > MAX_REQUEST && buf.last() != Some(&b'\n');
        let reply = if too_long {
            error(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match std::str::from_utf8(&buf) {
                Err(_) => error("malformed request: not UTF-8"),
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => match parse(line.trim()) {
                    Ok(req) => ask(&jobs, req).await,
                    Err(e) => error(e),
                },
            }
        };
        let mut line = reply.to_line();
        line.push('\n');
        if write.write_all(line.as_bytes()).await.is_err() {
            return;
        }
        if too_long {
            // The rest of the line cannot be told from the next request.
            return;
        }
    }
}
