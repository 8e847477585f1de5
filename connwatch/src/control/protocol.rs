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
//! {"cmd":"blocked"}                                 addresses blocked in the firewall, and until when
//! ```
//!
//! Replies are `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A malformed request
//! gets an error reply and the connection stays open; the daemon carries on.
//!
//! This module is the protocol both ends share: typed requests, their parser, and
//! the replies.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::conn::Tuple;
use crate::observe::journal::RECENT;
use crate::observe::view::{Query, Row};
use crate::policy::parse_netns;

pub const DEFAULT_SOCKET: &str = "/run/connwatch.sock";
/// The longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

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
        /// The network namespace (inode) the tuple is in, where it is in several.
        netns: Option<u32>,
    },
    Reload,
    /// What `--block-firewall` blocks now.
    Blocked,
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
    /// `host`, an `ip netns` name, or an inode number.
    netns: Option<String>,
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
        "blocked" => fields::<NoFields>(&cmd, rest).map(|_| Request::Blocked),
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
            let netns = f
                .netns
                .as_deref()
                .map(|n| parse_netns(n).map_err(|e| format!("netns: {e}")))
                .transpose()?;
            Ok(Request::Destroy { tuple, netns })
        }
        other => Err(format!(
            "unknown cmd '{other}' (one of: status, policy, list, destroys, destroy, reload, blocked)"
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

/// The reply to `{"cmd":"status"}`, typed at both ends: the daemon writes it, `top`
/// and scripts read it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub ok: bool,
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub enforce: bool,
    /// Sockets tracked, listeners included.
    pub tracked: u64,
    /// Sockets with a deadline set.
    pub deadlines: u64,
    /// Network namespaces holding tracked sockets.
    #[serde(default)]
    pub namespaces: u64,
    pub counters: Counters,
    /// Destroys and would-destroys by reason.
    pub by_reason: BTreeMap<String, u64>,
    pub kernel: KernelCounts,
    pub by_state: BTreeMap<String, u64>,
    pub ages: Vec<AgeBucket>,
    /// Destroys (or would-destroys) in the last minute, by reason.
    pub last_minute: BTreeMap<String, u64>,
    pub api_socket: String,
    pub metrics_addr: Option<String>,
}

/// What the daemon did, since it started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub events: u64,
    pub destroyed: u64,
    pub would_destroy: u64,
    pub skipped: u64,
    pub failed: u64,
    pub protected: u64,
    pub deferred: u64,
    /// Destroys tried again after a failure that may pass.
    #[serde(default)]
    pub retried: u64,
    /// Reconciles after the kernel dropped records: run, put off (the back-off while
    /// drops go on, as under a full connection map), failed.
    #[serde(default)]
    pub reconciles: u64,
    #[serde(default)]
    pub reconciles_put_off: u64,
    #[serde(default)]
    pub reconcile_failures: u64,
}

/// The kernel side's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelCounts {
    pub events: u64,
    /// Sockets not recorded: the connection map was full.
    pub map_full: u64,
    /// Events lost: the ring was full.
    pub ring_full: u64,
    /// Runs of the set-state program the kernel skipped (a run nested in another on
    /// the same CPU): each a state change not recorded.
    #[serde(default)]
    pub recursion_misses: u64,
}

/// One bucket of the age histogram.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgeBucket {
    /// `<10s`, `<1m`, ..., `>=1w`.
    pub bucket: String,
    /// The bucket's upper bound in seconds; null for the last.
    pub le_secs: Option<u64>,
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let Ok(Request::Destroy { tuple, netns: None }) =
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
}
