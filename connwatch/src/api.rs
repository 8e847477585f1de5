//! The control API: JSON lines over a Unix socket (`/run/connwatch.sock`, mode 0600,
//! root's). One request object a line, one reply object a line, as many as the client
//! likes on one connection:
//!
//! ```text
//! {"cmd":"status"}                                  counts, kernel drops, states, ages
//! {"cmd":"policy"}                                  the rules and protections in force
//! {"cmd":"list","state":["ESTABLISHED"],"sort":"idle","limit":10}
//! {"cmd":"destroys","limit":50}                     the latest decisions, oldest first
//! {"cmd":"destroy","local":"127.0.0.1:8080","remote":"127.0.0.1:40000"}
//! {"cmd":"reload"}                                  read the policy again (as SIGHUP)
//! ```
//!
//! Replies are `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A malformed request
//! gets an error reply and the connection stays open; the daemon carries on.
//!
//! Connection tasks only parse and write: each request goes to the event loop as a
//! [`Job`], answered there with the engine in hand, between kernel events.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::audit::Record;
use crate::cli::PolicyArgs;
use crate::clock::monotonic_ns;
use crate::conn::{TcpState, Tuple};
use crate::diag::SockDiag;
use crate::engine::Engine;
use crate::list::{self, Item, Query, Row};
use crate::loader::{ConnMap, Stats};
use crate::tracker::Tracked;

pub const DEFAULT_SOCKET: &str = "/run/connwatch.sock";
/// The longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How many decisions `destroys` can return.
pub const RECENT: usize = 1000;
const SEC: u64 = 1_000_000_000;

/// A parsed request.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Status,
    Policy,
    List(Query),
    Destroys {
        limit: usize,
    },
    Destroy {
        tuple: Tuple,
    },
    Reload,
    /// A Prometheus scrape (from the metrics listener, not the socket).
    Metrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroysFields {
    limit: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyFields {
    local: String,
    remote: String,
}

fn fields<T: for<'de> Deserialize<'de>>(cmd: &str, rest: Value) -> Result<T, String> {
    serde_json::from_value(rest).map_err(|e| format!("bad {cmd} request: {e}"))
}

fn addr(field: &str, text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("{field}: '{text}' is not an address:port (e.g. 10.0.0.1:443, [::1]:80)")
    })
}

/// Parses one request line; the error names what is wrong.
pub fn parse(line: &str) -> Result<Request, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| format!("malformed request: not JSON ({e})"))?;
    let Value::Object(mut map) = value else {
        return Err("malformed request: not a JSON object".into());
    };
    let cmd = match map.remove("cmd") {
        Some(Value::String(c)) => c,
        Some(_) => return Err("malformed request: \"cmd\" is not a string".into()),
        None => return Err("malformed request: no \"cmd\" field".into()),
    };
    let rest = Value::Object(map);
    match cmd.as_str() {
        "status" => fields::<NoFields>(&cmd, rest).map(|_| Request::Status),
        "policy" => fields::<NoFields>(&cmd, rest).map(|_| Request::Policy),
        "reload" => fields::<NoFields>(&cmd, rest).map(|_| Request::Reload),
        "list" => {
            let q: Query = fields(&cmd, rest)?;
            q.filter().map_err(|e| format!("bad list request: {e}"))?;
            Ok(Request::List(q))
        }
        "destroys" => fields::<DestroysFields>(&cmd, rest).map(|f| Request::Destroys {
            limit: f.limit.unwrap_or(50).min(RECENT),
        }),
        "destroy" => {
            let f: DestroyFields = fields(&cmd, rest)?;
            let tuple = Tuple::new(addr("local", &f.local)?, addr("remote", &f.remote)?);
            Ok(Request::Destroy { tuple })
        }
        other => Err(format!(
            "unknown cmd '{other}' (one of: status, policy, list, destroys, destroy, reload)"
        )),
    }
}

/// What the event loop answers.
#[derive(Debug)]
pub enum Reply {
    Json(Value),
    /// A list, written out by the connection task rather than the event loop.
    Rows {
        rows: Vec<Row>,
        matched: usize,
    },
    /// The metrics exposition.
    Text(String),
}

pub fn error(msg: impl Into<String>) -> Reply {
    Reply::Json(json!({"ok": false, "error": msg.into()}))
}

impl Reply {
    /// The reply as one line (without its newline).
    pub fn to_line(&self) -> String {
        match self {
            Reply::Json(v) => v.to_string(),
            Reply::Rows { rows, matched } => {
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    ok: bool,
                    matched: usize,
                    rows: &'a [Row],
                }
                serde_json::to_string(&Out {
                    ok: true,
                    matched: *matched,
                    rows,
                })
                .unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}).to_string())
            }
            Reply::Text(t) => json!({"ok": true, "text": t}).to_string(),
        }
    }
}

/// A request on its way to the event loop, with where its answer goes.
pub struct Job {
    pub req: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// The decisions of late: the last [`RECENT`] records, and destroys per second over the
/// last minute by reason.
#[derive(Default)]
pub struct Journal {
    recent: VecDeque<Record>,
    seconds: VecDeque<(u64, BTreeMap<&'static str, u64>)>,
}

impl Journal {
    pub fn note(&mut self, r: &Record, now_ns: u64) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(r.clone());
        if r.action.is_destroy() {
            let sec = now_ns / SEC;
            if self.seconds.back().is_none_or(|(s, _)| *s != sec) {
                self.seconds.push_back((sec, BTreeMap::new()));
            }
            if let Some((_, counts)) = self.seconds.back_mut() {
                *counts.entry(r.reason).or_default() += 1;
            }
            while self.seconds.front().is_some_and(|(s, _)| s + 60 <= sec) {
                self.seconds.pop_front();
            }
        }
    }

    /// Destroys (or would-destroys) in the last 60 seconds, by reason.
    pub fn last_minute(&self, now_ns: u64) -> BTreeMap<&'static str, u64> {
        let sec = now_ns / SEC;
        let mut out = BTreeMap::new();
        for (s, counts) in &self.seconds {
            if s + 60 > sec {
                for (reason, n) in counts {
                    *out.entry(*reason).or_default() += n;
                }
            }
        }
        out
    }

    /// The last `limit` records, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<Value> {
        let skip = self.recent.len().saturating_sub(limit);
        self.recent.iter().skip(skip).map(Record::to_json).collect()
    }
}

/// What answering needs from the event loop.
pub struct Ctx<'a> {
    pub engine: &'a mut Engine,
    pub diag: &'a mut SockDiag,
    pub conns: Option<&'a ConnMap>,
    pub journal: &'a std::cell::RefCell<Journal>,
    pub metrics: Option<&'a crate::metrics::Metrics>,
    pub kernel: Stats,
    pub started: Instant,
    pub source: &'a PolicyArgs,
    pub api_socket: &'a Path,
    pub metrics_addr: Option<SocketAddr>,
}

/// A tracked socket as `list` shows it, at `now`.
pub fn item_of(key: u64, t: &Tracked, now: u64) -> Item {
    let s = t.subject();
    Item {
        tuple: t.tuple,
        state: t.state,
        age_ns: Some(now.saturating_sub(t.birth.no_later_than())),
        age_exact: t.birth.is_known(),
        state_ns: Some(now.saturating_sub(t.state_since_ns)),
        idle_ns: Some(now.saturating_sub(s.quiet_since())),
        owner: t.owner,
        key: Some(key),
    }
}

/// Whether a tracked socket is a connection `list` shows.
pub fn listed(t: &Tracked) -> bool {
    t.state != TcpState::LISTEN && t.state != TcpState::CLOSE
}

fn rows(engine: &Engine, query: &Query, now: u64) -> Result<Reply, String> {
    let filter = query.filter()?;
    let items = engine
        .tracker
        .iter()
        .filter(|(_, t)| listed(t))
        .map(|(k, t)| item_of(k, t, now));
    let (kept, matched) = filter.apply(items);
    let rows = kept
        .iter()
        .map(|it| {
            let mut row = it.row();
            let key = it.key.expect("tracked items have keys");
            if let Some(next) = engine.next(key) {
                row.next_rule = Some(next.rule);
                row.next_in_secs = Some(next.at_ns.saturating_sub(now) as f64 / 1e9)
                    .map(|s| (s * 1000.0).round() / 1000.0);
            }
            if let Some(t) = engine.tracker.get(key) {
                row.protected = engine.policy.protected(&t.subject()).map(|p| p.to_string());
            }
            row
        })
        .collect();
    Ok(Reply::Rows { rows, matched })
}

/// Counts by state and the age histogram of the tracked connections: one pass.
pub fn census(engine: &Engine, now: u64) -> (BTreeMap<&'static str, u64>, Vec<u64>) {
    let mut by_state = BTreeMap::new();
    let mut ages = Vec::with_capacity(engine.tracker.len());
    for (_, t) in engine.tracker.iter() {
        *by_state.entry(t.state.name()).or_default() += 1;
        if listed(t) {
            ages.push(now.saturating_sub(t.birth.no_later_than()));
        }
    }
    (by_state, ages)
}

fn status(ctx: &Ctx, now: u64) -> Value {
    let e = &*ctx.engine;
    let c = &e.counters;
    let (by_state, ages) = census(e, now);
    let hist = list::age_histogram(ages.into_iter());
    let ages: Vec<Value> = hist
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "bucket": list::bucket_label(i),
                "le_secs": list::AGE_BUCKETS.get(i),
                "count": n,
            })
        })
        .collect();
    json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_secs": ctx.started.elapsed().as_secs(),
        "enforce": e.enforce,
        "tracked": e.tracker.len(),
        "deadlines": e.deadlines.len(),
        "counters": {
            "events": c.events,
            "destroyed": c.destroyed,
            "would_destroy": c.would_destroy,
            "skipped": c.skipped,
            "failed": c.failed,
            "protected": c.protected,
            "deferred": c.deferred,
        },
        "by_reason": c.by_reason,
        "kernel": {
            "events": ctx.kernel.events,
            "map_full": ctx.kernel.map_full,
            "ring_full": ctx.kernel.ring_full,
        },
        "by_state": by_state,
        "ages": ages,
        "last_minute": ctx.journal.borrow().last_minute(now),
        "api_socket": ctx.api_socket.display().to_string(),
        "metrics_addr": ctx.metrics_addr.map(|a| a.to_string()),
    })
}

fn policy(engine: &Engine) -> Value {
    let p = &engine.policy;
    let strs = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<String>>();
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            let s = &r.selector;
            json!({
                "name": r.name,
                "kind": r.limit.kind(),
                "limit": r.limit.to_string(),
                "ports": strs(&mut s.ports.iter().map(|x| x.to_string())),
                "local_ports": strs(&mut s.local_ports.iter().map(|x| x.to_string())),
                "remote_ports": strs(&mut s.remote_ports.iter().map(|x| x.to_string())),
                "local_addrs": strs(&mut s.local_addrs.iter().map(|x| x.to_string())),
                "remote_addrs": strs(&mut s.remote_addrs.iter().map(|x| x.to_string())),
            })
        })
        .collect();
    json!({
        "ok": true,
        "enforce": engine.enforce,
        "description": crate::app::describe(p),
        "rules": rules,
        "protect": {
            "ports": strs(&mut p.protect.ports.iter().map(|x| x.to_string())),
            "addrs": strs(&mut p.protect.addrs.iter().map(|x| x.to_string())),
            "processes": p.protect.processes,
        },
        "budget": {
            "max_kills_per_second": p.budget.max_kills_per_second,
            "max_kill_fraction": p.budget.max_kill_fraction,
        },
    })
}

/// Answers one request, in the event loop.
pub fn answer(req: Request, ctx: &mut Ctx) -> Reply {
    let now = monotonic_ns();
    match req {
        Request::Status => Reply::Json(status(ctx, now)),
        Request::Policy => Reply::Json(policy(ctx.engine)),
        Request::List(q) => rows(ctx.engine, &q, now).unwrap_or_else(error),
        Request::Destroys { limit } => {
            Reply::Json(json!({"ok": true, "records": ctx.journal.borrow().recent(limit)}))
        }
        Request::Destroy { tuple } => {
            match ctx.engine.destroy_manual(tuple, now, ctx.diag, ctx.conns) {
                Ok(r) => Reply::Json(json!({
                    "ok": true,
                    "outcome": r.action.as_str(),
                    "dry_run": r.dry_run,
                    "record": r.to_json(),
                })),
                Err(why) => error(why),
            }
        }
        Request::Reload => match crate::daemon::reload(ctx.engine, ctx.source) {
            Ok(description) => Reply::Json(json!({"ok": true, "description": description})),
            Err(e) => error(format!(
                "reload refused, keeping the last good policy: {e:#}"
            )),
        },
        Request::Metrics => match ctx.metrics {
            Some(m) => Reply::Text(m.scrape(ctx.engine, ctx.kernel, now)),
            None => error("metrics are off"),
        },
    }
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

/// Accepts control connections for as long as the daemon runs.
pub async fn serve(listener: UnixListener, jobs: mpsc::Sender<Job>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, jobs.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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
        struct Verdict {
            ok: bool,
            #[serde(default)]
            error: Option<String>,
        }
        // A refusal is short; read it as one before reading the body as T.
        if !reply.starts_with("{\"ok\":true") {
            let v: Verdict =
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

/// `{"cmd":"list", ...}` for a query.
pub fn list_request(q: &Query) -> Value {
    let mut v = serde_json::to_value(q).unwrap_or_else(|_| json!({}));
    v["cmd"] = json!("list");
    v
}

/// Where the control socket is: `--api-socket`, else the default.
pub fn socket_path(given: Option<&PathBuf>) -> PathBuf {
    given
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, Age};
    use std::time::SystemTime;

    #[test]
    fn requests_parse() {
        assert_eq!(parse(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse(r#"{"cmd":"reload"}"#), Ok(Request::Reload));
        assert_eq!(
            parse(r#"{"cmd":"destroys"}"#),
            Ok(Request::Destroys { limit: 50 })
        );
        assert_eq!(
            parse(r#"{"cmd":"destroys","limit":100000}"#),
            Ok(Request::Destroys { limit: RECENT })
        );
        let Ok(Request::List(q)) =
            parse(r#"{"cmd":"list","state":["close-wait"],"sort":"idle","limit":3}"#)
        else {
            panic!("list")
        };
        assert_eq!(q.limit, Some(3));
        let Ok(Request::Destroy { tuple }) =
            parse(r#"{"cmd":"destroy","local":"127.0.0.1:80","remote":"[::1]:9"}"#)
        else {
            panic!("destroy")
        };
        assert_eq!(tuple.remote.to_string(), "[::1]:9");
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        for (line, want) in [
            ("{", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"command":"status"}"#, "no \"cmd\""),
            (r#"{"cmd":7}"#, "not a string"),
            (r#"{"cmd":"explode"}"#, "unknown cmd 'explode'"),
            (r#"{"cmd":"status","x":1}"#, "unknown field `x`"),
            (r#"{"cmd":"list","state":["open"]}"#, "'open'"),
            (r#"{"cmd":"list","limit":-1}"#, "bad list request"),
            (
                r#"{"cmd":"destroy","local":"1.2.3.4"}"#,
                "missing field `remote`",
            ),
            (
                r#"{"cmd":"destroy","local":"nowhere","remote":"1.2.3.4:5"}"#,
                "local: 'nowhere'",
            ),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    fn record(action: Action, reason: &'static str) -> Record {
        Record {
            time: SystemTime::now(),
            action,
            tuple: Tuple::new(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ),
            state: TcpState::ESTABLISHED,
            age: Age {
                secs: 1,
                exact: true,
            },
            idle_secs: None,
            reason,
            rule: reason.into(),
            owner: None,
            dry_run: false,
            detail: None,
        }
    }

    #[test]
    fn the_journal_keeps_the_latest_and_a_minute_of_rates() {
        let mut j = Journal::default();
        for i in 0..(RECENT as u64 + 5) {
            j.note(&record(Action::Destroyed, "max-age"), i * SEC / 10);
        }
        // Ten a second for 100.5 s: seconds 41 to 100 hold 59 * 10 + 5.
        assert_eq!(j.last_minute(100 * SEC).get("max-age"), Some(&595));
        j.note(&record(Action::Skipped, "idle"), 200 * SEC);
        j.note(&record(Action::WouldDestroy, "idle"), 200 * SEC);
        assert_eq!(j.recent(5).len(), 5);
        assert_eq!(j.recent(5)[4]["action"], "would destroy");
        assert_eq!(j.recent(RECENT * 2).len(), RECENT);
        let m = j.last_minute(200 * SEC);
        assert_eq!(m.get("idle"), Some(&1), "only destroys count");
        assert_eq!(m.get("max-age"), None, "older than a minute");
    }
}
