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

/// How text lines write an event's fields: as tracing's own format does (the message,
/// then `name=value` for each other field, a space between), and with the message's
/// control characters escaped as it escapes them (`\x1b`, a C1 code as `\u{9b}`), but
/// plain text written a run at a time. tracing's own escaping writes the message a
/// character at a time through a formatter: a fifth of what a sweep's 20,000 records
/// cost to write.
pub struct TextFields;

impl<'w> tracing_subscriber::field::MakeVisitor<tracing_subscriber::fmt::format::Writer<'w>>
    for TextFields
{
    type Visitor = TextVisitor<'w>;

    fn make_visitor(&self, writer: tracing_subscriber::fmt::format::Writer<'w>) -> TextVisitor<'w> {
        TextVisitor {
            writer,
            padded: false,
            result: Ok(()),
        }
    }
}

pub struct TextVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    padded: bool,
    result: std::fmt::Result,
}

impl tracing::field::Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let name = field.name();
        // Fields of records bridged from the `log` crate: already in the line's header.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        if self.padded {
            self.result = self.writer.write_char(' ');
        }
        self.padded = true;
        self.result = self.result.and_then(|()| match name {
            "message" if self.writer.sanitizes_ansi_escapes() => {
                write!(Escaping(&mut self.writer), "{value:?}")
            }
            "message" => write!(self.writer, "{value:?}"),
            name => write!(
                self.writer,
                "{}={value:?}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        });
    }
}

impl tracing_subscriber::field::VisitOutput<std::fmt::Result> for TextVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.result
    }
}

impl tracing_subscriber::field::VisitFmt for TextVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.writer
    }
}

/// Writes text with the characters a terminal could act on escaped (see [`TextFields`]).
struct Escaping<'a, W>(&'a mut W);

/// The characters escaped: the C0 codes that start or act in terminal sequences, DEL,
/// and the C1 codes (8-bit sequence introducers). Lines are scanned for them as bytes
/// ([`first_acting`]); this is the definition the scan is tested against.
#[cfg(test)]
fn acts_on_a_terminal(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// Where the first character a terminal acts on starts (`acts_on_a_terminal`). A scan
/// of bytes, not of decoded characters (the message is most of a record's length):
/// each such character is one ASCII byte or, for a C1 code, 0xC2 then 0x80..=0x9F.
fn first_acting(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    b.iter().enumerate().position(|(i, &c)| match c {
        0x1b | 0x07 | 0x08 | 0x0c | 0x7f => true,
        0xc2 => matches!(b.get(i + 1), Some(0x80..=0x9f)),
        _ => false,
    })
}

impl<W: std::fmt::Write> std::fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut rest = s;
        while let Some(at) = first_acting(rest) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            // The ASCII ones as `\x1b`, the C1 codes as `\u{9b}`, as tracing writes them.
            if c.is_ascii() {
                write!(self.0, "\\x{:02x}", c as u32)?
            } else {
                write!(self.0, "\\u{{{:x}}}", c as u32)?
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Line timestamps as tracing's own (`2026-12-01T12:00:44.608309Z`, UTC), with the
/// part up to the second formatted once a second: a round of thousands of records
/// shares a few seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct LineTime;

thread_local! {
    /// The last second formatted: its UNIX time and its text up to the seconds.
    static SECOND: std::cell::RefCell<(u64, String)> =
        const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

impl tracing_subscriber::fmt::time::FormatTime for LineTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        use std::time::{Duration, UNIX_EPOCH};
        let since = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        SECOND.with_borrow_mut(|(cached, text)| {
            if *cached != secs {
                // The calendar part, as `audit::rfc3339` writes it; its `Z` goes after
                // the microseconds.
                let second = UNIX_EPOCH + Duration::from_secs(secs);
                text.clear();
                write!(text, "{}", humantime::format_rfc3339_seconds(second))?;
                text.pop();
                *cached = secs;
            }
            write!(w, "{text}.{:06}Z", since.subsec_micros())
        })
    }
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
            .with_timer(LineTime)
            .fmt_fields(TextFields)
            .with_ansi(ansi)
            .with_target(false)
            .boxed(),
        (LogFormat::Text, true) => fmt::layer()
            .with_writer(writer)
            .fmt_fields(TextFields)
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
            .with_timer(LineTime)
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

    /// A subscriber's text lines (no time, no colour) into a buffer, with tracing's own
    /// field format or with [`TextFields`].
    fn lines_of(ours: bool, emit: impl Fn()) -> String {
        use tracing_subscriber::prelude::*;
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || buf.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false);
        let subscriber = tracing_subscriber::registry().with(if ours {
            layer.fmt_fields(TextFields).boxed()
        } else {
            layer.boxed()
        });
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn text_fields_write_what_tracing_writes_escapes_included() {
        let emit = || {
            let addr = std::net::Ipv4Addr::LOCALHOST;
            tracing::info!("destroyed 10.0.0.1:80 -> 10.0.0.2:5000 state=ESTABLISHED");
            tracing::warn!("owner=\x1b[31mred\x07 bell \u{9b}c1 del\x7f tab\tend \u{e9}t\u{e9}");
            tracing::info!(n = 5, s = "quoted", d = %addr, "with fields {}", 7);
            tracing::info!(r#type = "raw", "a raw name");
            tracing::info!(message = "a str \x1b message", after = 1);
        };
        let theirs = lines_of(false, emit);
        assert_eq!(lines_of(true, emit), theirs);
        assert!(
            theirs.contains("owner=\\x1b[31mred\\x07 bell \\u{9b}c1 del\\x7f"),
            "{theirs}"
        );
        assert!(
            theirs.contains("with fields 7 n=5 s=\"quoted\" d=127.0.0.1"),
            "{theirs}"
        );
        assert_eq!(theirs.lines().count(), 5);
    }

    #[test]
    fn the_byte_scan_finds_what_the_character_test_finds() {
        let samples = [
            "plain 10.0.0.1:80 -> 10.0.0.2:5000",
            "\u{e9}t\u{e9} \u{9b} \u{80}\u{9f}\u{a0}\u{7e}",
            "\x1b[31m",
            "tab\tnl\ncr\r",
            "\u{100}\u{c2}\u{c29f}x\x7f",
            "\u{1f600}\x07",
        ];
        for s in samples {
            for start in s.char_indices().map(|(i, _)| i) {
                let t = &s[start..];
                assert_eq!(first_acting(t), t.find(acts_on_a_terminal), "{t:?}");
            }
        }
        // Every character up to U+0800 (all one- and two-byte encodings), alone and
        // between two letters.
        for c in (0..0x800u32).filter_map(char::from_u32) {
            let t = format!("a{c}b");
            assert_eq!(first_acting(&t), t.find(acts_on_a_terminal), "{c:?}");
        }
    }

    /// A timestamp of [`LineTime`] reads as tracing's own does, and the two agree to
    /// the second (taken one after the other, they may differ in the microseconds).
    #[test]
    fn line_time_writes_what_tracing_writes() {
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        let shape = |t: &str| {
            t.len() == 27
                && t.bytes().enumerate().all(|(i, b)| match i {
                    4 | 7 => b == b'-',
                    10 => b == b'T',
                    13 | 16 => b == b':',
                    19 => b == b'.',
                    26 => b == b'Z',
                    _ => b.is_ascii_digit(),
                })
        };
        let mut agreed = 0;
        for _ in 0..2000 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            LineTime.format_time(&mut Writer::new(&mut ours)).unwrap();
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            assert!(shape(&ours), "{ours:?}");
            assert!(shape(&theirs), "{theirs:?}");
            if ours[..19] == theirs[..19] {
                agreed += 1;
            }
        }
        assert!(agreed >= 1990, "only {agreed} of 2000 in the same second");
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(tracing::Level::ERROR), 3);
        assert_eq!(priority(tracing::Level::WARN), 4);
        assert_eq!(priority(tracing::Level::INFO), 6);
        assert_eq!(priority(tracing::Level::DEBUG), 7);
    }
}
