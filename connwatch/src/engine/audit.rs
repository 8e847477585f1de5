//! The audit record: one per destroy, would-destroy, skip or protection, in the form
//! operators grep for:
//! `destroyed 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=301s reason=max-age`.
//! With `--log-format json` the same record carries its fields as one JSON object a line.
//! Where the lines go (stderr, `--log-file`, the journal) is `observe::log`'s job.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use std::sync::Arc;

use crate::conn::{Birth, Direction, Owner, SockId, TcpState, Tuple};
use crate::kernel::cgroup::container_of;
use crate::kernel::sock_diag::TcpTraffic;

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
    /// The socket, as the kernel recorded it: its namespace and cookie.
    pub id: SockId,
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
    /// Who opened the connection, where the kernel program saw its birth.
    pub direction: Option<Direction>,
    /// The owner's cgroup path, where known.
    pub cgroup: Option<Arc<str>>,
    pub dry_run: bool,
    /// Why a destroy was skipped, failed, or was refused.
    pub detail: Option<String>,
    /// What the connection carried until the lookup right before its destroy.
    pub traffic: Option<TcpTraffic>,
}

/// `2026-11-23T09:41:07.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Record {
    /// The text form of the record.
    pub fn line(&self) -> String {
        use std::fmt::Write;
        // Written into one string: a mass round makes thousands of these.
        let mut line = String::with_capacity(160);
        let _ = write!(
            line,
            "{} {} state={} age={} reason={}",
            self.action.as_str(),
            self.tuple,
            self.state,
            self.age,
            self.reason
        );
        if self.rule != self.reason {
            let _ = write!(line, " rule={}", self.rule);
        }
        if let Some(idle) = self.idle_secs {
            let _ = write!(line, " idle={idle}s");
        }
        if let Some(o) = self.owner {
            let _ = write!(line, " owner={o}");
        }
        let _ = write!(line, " netns={}", self.id.netns);
        if let Some(c) = self.cgroup.as_deref().and_then(container_of) {
            let _ = write!(line, " container={c}");
        }
        if let Some(t) = self.traffic {
            let _ = write!(line, " bytes_in={} bytes_out={}", t.bytes_in, t.bytes_out);
        }
        if let Some(d) = &self.detail {
            let _ = write!(line, " detail=\"{d}\"");
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
            "netns": self.id.netns,
            "cookie": self.id.cookie,
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
            "direction": self.direction.map(Direction::name),
            "cgroup": self.cgroup.as_deref(),
            "container": self.cgroup.as_deref().and_then(container_of),
            "dry_run": self.dry_run,
            "detail": self.detail,
            "bytes_in": self.traffic.map(|t| t.bytes_in),
            "bytes_out": self.traffic.map(|t| t.bytes_out),
            "segs_in": self.traffic.map(|t| t.segs_in),
            "segs_out": self.traffic.map(|t| t.segs_out),
            "retrans": self.traffic.map(|t| t.retrans),
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
                        netns = self.id.netns,
                        cookie = self.id.cookie,
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
                        bytes_in = self.traffic.map(|t| t.bytes_in),
                        bytes_out = self.traffic.map(|t| t.bytes_out),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            action: Action::Destroyed,
            id: crate::conn::SockId::new(4026531840, 1),
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
            direction: None,
            cgroup: None,
            dry_run: false,
            detail: None,
            traffic: None,
        }
    }

    #[test]
    fn line_matches_the_seed_tools_form() {
        let r = record();
        assert_eq!(
            r.line(),
            "destroyed 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=301s reason=max-age netns=4026531840"
        );
        let dry = Record {
            action: Action::WouldDestroy,
            id: crate::conn::SockId::new(4026531840, 1),
            age: Age::of(Birth::Unknown { seen_ns: 0 }, 61_000_000_000),
            dry_run: true,
            ..r.clone()
        };
        assert_eq!(
            dry.line(),
            "would destroy 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=>61s reason=max-age netns=4026531840 (dry run)"
        );
        let named = Record {
            rule: "old-db".into(),
            owner: Some(Owner::new(812, "postgres")),
            direction: None,
            cgroup: None,
            idle_secs: Some(40),
            ..r
        };
        assert!(named
            .line()
            .ends_with("reason=max-age rule=old-db idle=40s owner=postgres(812) netns=4026531840"));
    }

    #[test]
    fn json_form_carries_every_field() {
        let r = Record {
            owner: Some(Owner::new(812, "postgres")),
            direction: None,
            cgroup: None,
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
        assert_eq!(v["bytes_in"], Value::Null);
        let carried = Record {
            traffic: Some(TcpTraffic {
                bytes_in: 10,
                bytes_out: 20,
                ..TcpTraffic::default()
            }),
            ..record()
        };
        assert_eq!(carried.to_json()["bytes_out"], 20);
        assert!(carried.line().ends_with(" bytes_in=10 bytes_out=20"));
    }
}
