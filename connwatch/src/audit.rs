//! The audit trail: one record per destroy, would-destroy, skip or protection, in the
//! form operators grep for:
//! `destroyed 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=301s reason=max-age`.
//! With `--log-format json` the same record carries its fields as one JSON object a line.
//!
//! Records (and every other log line) go to stderr, or to `--log-file`, which SIGHUP
//! reopens so logrotate can move it. Under systemd, journald captures stderr: connwatch
//! sees `JOURNAL_STREAM`, drops its own timestamps and prefixes each line with its
//! syslog priority (`<4>` for a warning) so the journal files it at the right level.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::conn::{TcpState, Tuple};
use crate::policy::{Birth, Owner};

static JSON: AtomicBool = AtomicBool::new(false);

/// Chooses the record format; set once at start-up from `--log-format`.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Destroyed,
    WouldDestroy,
    Skipped,
    Failed,
    /// A protection (a process, found only at the last moment) saved the socket.
    Protected,
    /// The safety budget put the destroy off.
    Deferred,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Destroyed => "destroyed",
            Action::WouldDestroy => "would destroy",
            Action::Skipped => "skipped",
            Action::Failed => "failed to destroy",
            Action::Protected => "protected",
            Action::Deferred => "deferred",
        }
    }

    /// The outcome as a metric label: one word, lower case.
    pub fn label(self) -> &'static str {
        match self {
            Action::Destroyed => "destroyed",
            Action::WouldDestroy => "would_destroy",
            Action::Skipped => "skipped",
            Action::Failed => "failed",
            Action::Protected => "protected",
            Action::Deferred => "deferred",
        }
    }

    /// A destroy, real or dry-run.
    pub fn is_destroy(self) -> bool {
        matches!(self, Action::Destroyed | Action::WouldDestroy)
    }
}

/// A socket's age as connwatch knows it: exact, or a lower bound for a socket born
/// before connwatch saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Age {
    pub secs: u64,
    pub exact: bool,
}

impl Age {
    pub fn of(birth: Birth, now_ns: u64) -> Age {
        Age {
            secs: Duration::from_nanos(now_ns.saturating_sub(birth.no_later_than())).as_secs(),
            exact: birth.is_known(),
        }
    }
}

impl std::fmt::Display for Age {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let more = if self.exact { "" } else { ">" };
        write!(f, "{more}{}s", self.secs)
    }
}

/// One decision about one socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// When it was decided (wall clock).
    pub time: SystemTime,
    pub action: Action,
    pub tuple: Tuple,
    pub state: TcpState,
    pub age: Age,
    /// Seconds without data in either direction (from birth if none was seen).
    pub idle_secs: Option<u64>,
    /// The kind of limit (`max-age`, `idle`, ...), or `manual`.
    pub reason: &'static str,
    /// The rule's name, shown where it differs from the reason.
    pub rule: String,
    pub owner: Option<Owner>,
    pub dry_run: bool,
    /// Why a destroy was skipped, failed, or was refused.
    pub detail: Option<String>,
}

/// `2026-11-23T09:41:07.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Record {
    /// The text form of the record.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} {} state={} age={} reason={}",
            self.action.as_str(),
            self.tuple,
            self.state,
            self.age,
            self.reason
        );
        if self.rule != self.reason {
            line.push_str(&format!(" rule={}", self.rule));
        }
        if let Some(idle) = self.idle_secs {
            line.push_str(&format!(" idle={idle}s"));
        }
        if let Some(o) = self.owner {
            line.push_str(&format!(" owner={o}"));
        }
        if let Some(d) = &self.detail {
            line.push_str(&format!(" detail=\"{d}\""));
        }
        if self.dry_run && self.action == Action::WouldDestroy {
            line.push_str(" (dry run)");
        }
        line
    }

    /// The record as the control API and `--log-format json` give its fields.
    pub fn to_json(&self) -> Value {
        let unix = self
            .time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        json!({
            "time": rfc3339(self.time),
            "unix_time": (unix * 1000.0).round() / 1000.0,
            "action": self.action.as_str(),
            "local": self.tuple.local.to_string(),
            "remote": self.tuple.remote.to_string(),
            "state": self.state.to_string(),
            "age_secs": self.age.secs,
            "age_exact": self.age.exact,
            "idle_secs": self.idle_secs,
            "reason": self.reason,
            "rule": self.rule,
            "owner": self.owner.map(|o| o.name().to_string()),
            "pid": self.owner.map(|o| o.pid),
            "dry_run": self.dry_run,
            "detail": self.detail,
        })
    }

    /// Logs the record: failures as warnings, skips (a socket that changed under the
    /// decision, a normal race) at debug level, the rest at info.
    pub fn emit(&self) {
        let json = JSON.load(Ordering::Relaxed);
        macro_rules! emit_at {
            ($level:expr) => {
                if json {
                    tracing::event!(
                        $level,
                        action = self.action.as_str(),
                        local = %self.tuple.local,
                        remote = %self.tuple.remote,
                        state = %self.state,
                        age_secs = self.age.secs,
                        age_exact = self.age.exact,
                        idle_secs = self.idle_secs,
                        reason = self.reason,
                        rule = self.rule.as_str(),
                        owner = self.owner.map(|o| o.name().to_string()),
                        pid = self.owner.map(|o| o.pid),
                        dry_run = self.dry_run,
                        detail = self.detail.as_deref(),
                        "{}",
                        self.line()
                    )
                } else {
                    tracing::event!($level, "{}", self.line())
                }
            };
        }
        match self.action {
            Action::Failed => emit_at!(tracing::Level::WARN),
            Action::Skipped => emit_at!(tracing::Level::DEBUG),
            Action::Deferred => emit_at!(tracing::Level::DEBUG),
            _ => emit_at!(tracing::Level::INFO),
        }
    }
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
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match LOG_FILE.get() {
            Some(log) => log
                .file
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // One call per log line, so lines from the file and a reopen never interleave.
        match LOG_FILE.get() {
            Some(log) => log
                .file
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(buf),
            None => io::stderr().lock().write_all(buf),
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
        LogWriter
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            action: Action::Destroyed,
            tuple: Tuple::new(
                "10.0.15.73:18443".parse().unwrap(),
                "174.201.120.36:64119".parse().unwrap(),
            ),
            state: TcpState::ESTABLISHED,
            age: Age::of(Birth::Known(0), 301_500_000_000),
            idle_secs: None,
            reason: "max-age",
            rule: "max-age".into(),
            owner: None,
            dry_run: false,
            detail: None,
        }
    }

    #[test]
    fn line_matches_the_seed_tools_form() {
        let r = record();
        assert_eq!(
            r.line(),
            "destroyed 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=301s reason=max-age"
        );
        let dry = Record {
            action: Action::WouldDestroy,
            age: Age::of(Birth::Unknown { seen_ns: 0 }, 61_000_000_000),
            dry_run: true,
            ..r.clone()
        };
        assert_eq!(
            dry.line(),
            "would destroy 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=>61s reason=max-age (dry run)"
        );
        let named = Record {
            rule: "old-db".into(),
            owner: Some(Owner::new(812, "postgres")),
            idle_secs: Some(40),
            ..r
        };
        assert!(named
            .line()
            .ends_with("reason=max-age rule=old-db idle=40s owner=postgres(812)"));
    }

    #[test]
    fn json_form_carries_every_field() {
        let r = Record {
            owner: Some(Owner::new(812, "postgres")),
            idle_secs: Some(7),
            ..record()
        };
        let v = r.to_json();
        assert_eq!(v["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["unix_time"], 1_700_000_000.0);
        assert_eq!(v["local"], "10.0.15.73:18443");
        assert_eq!(v["remote"], "174.201.120.36:64119");
        assert_eq!(v["age_secs"], 301);
        assert_eq!(v["age_exact"], true);
        assert_eq!(v["idle_secs"], 7);
        assert_eq!(v["owner"], "postgres");
        assert_eq!(v["pid"], 812);
        assert_eq!(v["rule"], "max-age");
        assert_eq!(v["detail"], Value::Null);
    }

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

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(tracing::Level::ERROR), 3);
        assert_eq!(priority(tracing::Level::WARN), 4);
        assert_eq!(priority(tracing::Level::INFO), 6);
        assert_eq!(priority(tracing::Level::DEBUG), 7);
    }
}
