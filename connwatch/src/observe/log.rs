//! Where log lines go: stderr, or `--log-file` (which SIGHUP reopens so logrotate can
//! move it). Under systemd, journald captures stderr: connwatch sees `JOURNAL_STREAM`,
//! drops its own timestamps and prefixes each line with its syslog priority (`<4>` for
//! a warning) so the journal files it at the right level.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};

use crate::engine::audit;
use crate::engine::INTENT;

/// The format of log lines, `--log-format`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The file `--log-file` names, reopened by SIGHUP.
struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Sends every log line to `path` (appending) instead of stderr. Called once, before
/// logging starts.
pub fn log_to_file(path: &Path) -> Result<()> {
    let file = open_append(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    let _ = LOG_FILE.set(LogFile {
        path: path.to_path_buf(),
        file: Mutex::new(file),
    });
    Ok(())
}

/// Opens the log file again under its name, after logrotate moved it. Returns the
/// path, or None when logging goes to stderr.
pub fn reopen_log_file() -> Result<Option<PathBuf>> {
    let Some(log) = LOG_FILE.get() else {
        return Ok(None);
    };
    let fresh = open_append(&log.path)
        .with_context(|| format!("cannot reopen the log file {}", log.path.display()))?;
    *log.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    Ok(Some(log.path.clone()))
}

/// Where log lines go: the log file if one is set, else stderr.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter {
    /// Written at once even while lines are held ([`Held`]).
    at_once: bool,
}

/// Lines held back while a round of decisions is recorded ([`hold`]), written in one
/// go when it ends: thousands of records then cost a few writes, not one each.
static HELD: Mutex<Option<Vec<u8>>> = Mutex::new(None);

/// Held lines are written out once they reach this size, whatever the round.
const HELD_MAX: usize = 256 * 1024;

/// While this lives, log lines are gathered and written out together when it is
/// dropped (or when they fill [`HELD_MAX`]): a round of deadlines records thousands
/// of decisions. A line of [`INTENT`] (the connections about to be destroyed) is
/// never held: it goes out at once, with the lines before it, ahead of the destroys.
#[must_use]
pub struct Held {
    outer: bool,
}

/// Holds log lines until the returned guard is dropped (see [`Held`]).
pub fn hold() -> Held {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let outer = held.is_none();
    if outer {
        *held = Some(Vec::new());
    }
    Held { outer }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.outer {
            let lines = HELD.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(lines) = lines.filter(|l| !l.is_empty()) {
                let _ = emit(&lines);
            }
        }
    }
}

/// Writes whole lines where logs go: the log file if one is set, else stderr. One call
/// per buffer, so lines and a reopen never interleave.
fn emit(buf: &[u8]) -> io::Result<()> {
    match LOG_FILE.get() {
        Some(log) => log
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(buf),
        None => io::stderr().lock().write_all(buf),
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        match held.as_mut() {
            Some(lines) => {
                lines.extend_from_slice(buf);
                if self.at_once || lines.len() >= HELD_MAX {
                    let full = std::mem::take(lines);
                    drop(held);
                    return emit(&full);
                }
                Ok(())
            }
            None => {
                drop(held);
                emit(buf)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match LOG_FILE.get() {
            Some(log) => log.file.lock().unwrap_or_else(|e| e.into_inner()).flush(),
            None => io::stderr().flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter::default()
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogWriter {
        LogWriter {
            at_once: meta.target() == INTENT,
        }
    }
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to the
/// `device:inode` of the stream it connected, which a child may have inherited while
/// its own stderr went elsewhere, so the two are compared.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    journal_stream_matches(&value, 2)
}

fn journal_stream_matches(value: &str, fd: i32) -> bool {
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat fills a plain struct for a descriptor number; a bad one fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_dev == dev && st.st_ino == ino
}

/// Prefixes each line with its syslog priority, which journald reads off stderr.
pub struct SyslogPriority<F>(pub F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for SyslogPriority<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority of a log level.
pub fn priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// Sets up logging: to stderr or `--log-file`, as text or JSON. Under systemd (stderr
/// is the journal's stream) lines carry their syslog priority and no timestamp, which
/// the journal adds. Returns a note to log once logging runs.
pub fn init(format: LogFormat, log_file: Option<&Path>) -> Result<Option<String>> {
    use tracing_subscriber::fmt::format::JsonFields;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, Layer, Registry};

    let filter = tracing_subscriber::EnvFilter::try_from_env("CONNWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let mut note = None;
    if let Some(path) = log_file {
        log_to_file(path)?;
    }
    let journal = log_file.is_none() && stderr_is_journal();
    if journal {
        note = Some("logging to the systemd journal (stderr is its JOURNAL_STREAM)".to_string());
    }
    // Colour only for a person at a terminal, never into files or the journal.
    let ansi = log_file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = LogWriter::default();
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match (format, journal) {
        (LogFormat::Text, false) => fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .with_target(false)
            .boxed(),
        (LogFormat::Text, true) => fmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .event_format(SyslogPriority(
                tracing_subscriber::fmt::format::format()
                    .with_target(false)
                    .with_ansi(false)
                    .without_time(),
            ))
            .boxed(),
        (LogFormat::Json, false) => fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_target(false)
            .boxed(),
        (LogFormat::Json, true) => fmt::layer()
            .with_writer(writer)
            .fmt_fields(JsonFields::new())
            .event_format(SyslogPriority(
                tracing_subscriber::fmt::format::format()
                    .json()
                    .flatten_event(true)
                    .with_target(false),
            ))
            .boxed(),
    };
    let _ = Registry::default()
        .with(layer.with_filter(filter))
        .try_init();
    audit::set_json(format == LogFormat::Json);
    Ok(note)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_matched_by_device_and_inode() {
        let file = tempfile_in_tmp();
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().unwrap();
        let fd = file.as_raw_fd();
        let value = format!("{}:{}", meta.dev(), meta.ino());
        assert!(journal_stream_matches(&value, fd));
        let other = format!("{}:{}", meta.dev(), meta.ino() + 1);
        assert!(!journal_stream_matches(&other, fd));
        assert!(!journal_stream_matches("garbage", fd));
        assert!(!journal_stream_matches("1:2", -1));
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("connwatch-audit-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }

    /// Held lines wait for the round's end; an intent line goes out at once, after
    /// everything held before it. The only test that sets the process's log file.
    #[test]
    fn held_lines_wait_but_an_intent_goes_out_at_once_in_order() {
        let path = std::env::temp_dir().join(format!("connwatch-held-{}", std::process::id()));
        log_to_file(&path).unwrap();
        let read = || std::fs::read_to_string(&path).unwrap();
        let held = hold();
        LogWriter::default().write_all(b"record 1\n").unwrap();
        assert_eq!(read(), "", "a record is held");
        let nested = hold();
        drop(nested);
        assert_eq!(read(), "", "only the outer hold writes");
        LogWriter { at_once: true }.write_all(b"intent\n").unwrap();
        assert_eq!(read(), "record 1\nintent\n", "an intent flushes, in order");
        LogWriter::default().write_all(b"record 2\n").unwrap();
        assert_eq!(read(), "record 1\nintent\n");
        drop(held);
        assert_eq!(read(), "record 1\nintent\nrecord 2\n");
        LogWriter::default().write_all(b"unheld\n").unwrap();
        assert!(
            read().ends_with("record 2\nunheld\n"),
            "nothing held: at once"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(tracing::Level::ERROR), 3);
        assert_eq!(priority(tracing::Level::WARN), 4);
        assert_eq!(priority(tracing::Level::INFO), 6);
        assert_eq!(priority(tracing::Level::DEBUG), 7);
    }
}
