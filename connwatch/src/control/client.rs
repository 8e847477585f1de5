//! A blocking client of the control socket, for `list` and `top`.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// A blocking client, for `list` and `top`.
pub struct Client {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Client {
    /// Connects to a running daemon; None when none listens there.
    pub fn connect(path: &Path) -> Result<Option<Client>> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                Ok(Some(Client {
                    writer: s.try_clone()?,
                    reader: BufReader::new(s),
                }))
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                Ok(None)
            }
            Err(e) => bail!("cannot reach the daemon at {}: {e}", path.display()),
        }
    }

    /// Sends one request; returns the reply, or its error as an error.
    pub fn request(&mut self, req: &Value) -> Result<Value> {
        self.request_as(req)
    }

    /// Sends one request; reads the reply straight into `T` (one pass, however long
    /// the reply), or returns its error as an error.
    pub fn request_as<T: for<'de> Deserialize<'de>>(&mut self, req: &Value) -> Result<T> {
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            bail!("the daemon closed the control connection");
        }
        #[derive(Deserialize)]
        struct Answer {
            ok: bool,
            #[serde(default)]
            error: Option<String>,
        }
        // A refusal is short; read it as one before reading the body as T.
        if !reply.starts_with("{\"ok\":true") {
            let v: Answer =
                serde_json::from_str(&reply).context("the daemon's reply is not JSON")?;
            if !v.ok {
                bail!(
                    "{}",
                    v.error
                        .as_deref()
                        .unwrap_or("the daemon refused the request")
                );
            }
        }
        serde_json::from_str(&reply).context("the daemon's reply is malformed")
    }
}
