//! One line per destroy or would-destroy, in the form operators grep for:
//! `destroyed 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=301s reason=max-age`.
//! With `--log-format json` the same record carries its fields as JSON.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

pub struct Record<'a> {
    pub action: Action,
    pub tuple: Tuple,
    pub state: TcpState,
    pub age: Age,
    /// The kind of limit (`max-age`, `idle`, ...).
    pub reason: &'a str,
    /// The rule's name, shown where it differs from the reason.
    pub rule: &'a str,
    pub owner: Option<Owner>,
    pub dry_run: bool,
    /// Why a destroy was skipped or failed.
    pub detail: Option<&'a str>,
}

impl Record<'_> {
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
        if let Some(o) = self.owner {
            line.push_str(&format!(" owner={o}"));
        }
        if let Some(d) = self.detail {
            line.push_str(&format!(" detail=\"{d}\""));
        }
        if self.dry_run && self.action == Action::WouldDestroy {
            line.push_str(" (dry run)");
        }
        line
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
                        reason = self.reason,
                        rule = self.rule,
                        owner = self.owner.map(|o| o.to_string()),
                        dry_run = self.dry_run,
                        detail = self.detail,
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

    #[test]
    fn line_matches_the_seed_tools_form() {
        let r = Record {
            action: Action::Destroyed,
            tuple: Tuple::new(
                "10.0.15.73:18443".parse().unwrap(),
                "174.201.120.36:64119".parse().unwrap(),
            ),
            state: TcpState::ESTABLISHED,
            age: Age::of(Birth::Known(0), 301_500_000_000),
            reason: "max-age",
            rule: "max-age",
            owner: None,
            dry_run: false,
            detail: None,
        };
        assert_eq!(
            r.line(),
            "destroyed 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=301s reason=max-age"
        );
        let dry = Record {
            action: Action::WouldDestroy,
            age: Age::of(Birth::Unknown { seen_ns: 0 }, 61_000_000_000),
            dry_run: true,
            ..r
        };
        assert_eq!(
            dry.line(),
            "would destroy 10.0.15.73:18443 -> 174.201.120.36:64119 state=ESTABLISHED age=>61s reason=max-age (dry run)"
        );
        let named = Record {
            rule: "old-db",
            owner: Some(Owner::new(812, "postgres")),
            ..r
        };
        assert!(named
            .line()
            .ends_with("reason=max-age rule=old-db owner=postgres(812)"));
    }
}
