//! The policy engine: sockets and time in, decisions out. No I/O, no kernel: every
//! rule here is unit-testable, and a dry run and a live run share every line of it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::conn::{TcpState, Tuple};

/// An inclusive range of ports, parsed from `P` or `LO-HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("'{p}' is not a port number (0-65535)"))
        };
        let range = match text.split_once('-') {
            None => {
                let p = port(text)?;
                PortRange { lo: p, hi: p }
            }
            Some((lo, hi)) => {
                let range = PortRange {
                    lo: port(lo)?,
                    hi: port(hi)?,
                };
                if range.lo > range.hi {
                    return Err(format!(
                        "port range {text} is reversed: write the low port first ({}-{})",
                        range.hi, range.lo
                    ));
                }
                range
            }
        };
        Ok(range)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Parses `90s`, `5m`, `1h30m`; zero is refused because it would choose every socket.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}' is not a duration ({e}); write e.g. 90s, 5m, 1h30m"))?;
    if d.is_zero() {
        return Err(format!("'{text}' is zero: a limit must be positive"));
    }
    Ok(d)
}

/// Why a socket was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    MaxAge,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MaxAge => "max-age",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known of a socket's birth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Birth {
    /// Born at this monotonic time, seen by the kernel program.
    Known(u64),
    /// Existed before connwatch saw it, first seen at this time: it is at least this old.
    Unknown { seen_ns: u64 },
}

impl Birth {
    /// The latest time the socket can have been born: exact when known, a bound otherwise.
    pub fn no_later_than(self) -> u64 {
        match self {
            Birth::Known(ns) | Birth::Unknown { seen_ns: ns } => ns,
        }
    }

    pub fn is_known(self) -> bool {
        matches!(self, Birth::Known(_))
    }
}

/// What the policy looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject {
    pub tuple: Tuple,
    pub state: TcpState,
    pub birth: Birth,
    pub state_since_ns: u64,
}

/// The policy's answer for one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Never chosen as things stand (excluded, not selected, or no limit applies).
    Never,
    /// Chosen once the monotonic clock reaches `at`, unless something changes first.
    At { at_ns: u64, reason: Reason },
}

/// The whole policy. Its decisions depend only on the socket and the clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub max_age: Option<Duration>,
    /// Ports of interest (local or remote); empty means every port.
    pub ports: Vec<PortRange>,
    /// Ports never touched, local or remote, whatever else matches.
    pub exclude_ports: Vec<PortRange>,
}

/// Port 22: an operator's way back in is never cut.
pub const DEFAULT_EXCLUDED_PORT: PortRange = PortRange { lo: 22, hi: 22 };

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_age: None,
            ports: Vec::new(),
            exclude_ports: vec![DEFAULT_EXCLUDED_PORT],
        }
    }
}

impl Policy {
    /// True when some limit is set: a policy without one chooses nothing.
    pub fn has_limit(&self) -> bool {
        self.max_age.is_some()
    }

    /// Whether the socket may be acted on at all: not protected, and selected.
    pub fn selects(&self, tuple: &Tuple, state: TcpState) -> bool {
        if state.is_opening_or_listening() || state == TcpState::CLOSE {
            return false;
        }
        let (l, r) = (tuple.local.port(), tuple.remote.port());
        if self
            .exclude_ports
            .iter()
            .any(|p| p.contains(l) || p.contains(r))
        {
            return false;
        }
        self.ports.is_empty() || self.ports.iter().any(|p| p.contains(l) || p.contains(r))
    }

    /// When, if ever, this socket is due.
    pub fn verdict(&self, s: &Subject) -> Verdict {
        if !self.selects(&s.tuple, s.state) {
            return Verdict::Never;
        }
        match self.max_age {
            Some(max) => Verdict::At {
                at_ns: s
                    .birth
                    .no_later_than()
                    .saturating_add(max.as_nanos() as u64),
                reason: Reason::MaxAge,
            },
            None => Verdict::Never,
        }
    }

    /// True when the socket is due at `now_ns`: what the destroyer re-checks.
    pub fn is_due(&self, s: &Subject, now_ns: u64) -> Option<Reason> {
        match self.verdict(s) {
            Verdict::At { at_ns, reason } if at_ns <= now_ns => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const SEC: u64 = 1_000_000_000;

    fn subject(local: &str, remote: &str, state: TcpState, birth: Birth) -> Subject {
        Subject {
            tuple: Tuple::new(
                local.parse::<SocketAddr>().unwrap(),
                remote.parse::<SocketAddr>().unwrap(),
            ),
            state,
            birth,
            state_since_ns: 0,
        }
    }

    fn max_age(secs: u64) -> Policy {
        Policy {
            max_age: Some(Duration::from_secs(secs)),
            ..Policy::default()
        }
    }

    #[test]
    fn port_ranges_parse_and_refuse_bad_input() {
        assert_eq!("80".parse::<PortRange>(), Ok(PortRange { lo: 80, hi: 80 }));
        assert_eq!(
            "8000-8100".parse::<PortRange>(),
            Ok(PortRange { lo: 8000, hi: 8100 })
        );
        let err = "9-3".parse::<PortRange>().unwrap_err();
        assert!(err.contains("9-3") && err.contains("reversed"), "{err}");
        let err = "70000".parse::<PortRange>().unwrap_err();
        assert!(err.contains("70000"), "{err}");
        assert!("http".parse::<PortRange>().is_err());
        assert!("1-".parse::<PortRange>().is_err());
    }

    #[test]
    fn durations_parse_and_refuse_bad_input() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("5 parsecs"));
        assert!(parse_duration("0s").unwrap_err().contains("zero"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn max_age_deadline_is_birth_plus_limit() {
        let p = max_age(300);
        let s = subject(
            "10.0.0.1:443",
            "10.0.0.2:50000",
            TcpState::ESTABLISHED,
            Birth::Known(7 * SEC),
        );
        assert_eq!(
            p.verdict(&s),
            Verdict::At {
                at_ns: 307 * SEC,
                reason: Reason::MaxAge
            }
        );
        assert_eq!(p.is_due(&s, 306 * SEC), None);
        assert_eq!(p.is_due(&s, 307 * SEC), Some(Reason::MaxAge));
    }

    #[test]
    fn unknown_birth_counts_from_first_sight() {
        let p = max_age(60);
        let s = subject(
            "10.0.0.1:443",
            "10.0.0.2:50000",
            TcpState::ESTABLISHED,
            Birth::Unknown { seen_ns: 100 * SEC },
        );
        assert_eq!(p.is_due(&s, 159 * SEC), None);
        assert_eq!(p.is_due(&s, 160 * SEC), Some(Reason::MaxAge));
    }

    #[test]
    fn excluded_ports_win_on_either_side() {
        let mut p = max_age(1);
        p.ports = vec!["20-30".parse().unwrap()];
        for (l, r) in [("10.0.0.1:22", "10.0.0.2:5"), ("10.0.0.1:5", "10.0.0.2:22")] {
            let s = subject(l, r, TcpState::ESTABLISHED, Birth::Known(0));
            assert_eq!(p.verdict(&s), Verdict::Never, "{l} {r}");
        }
        let s = subject(
            "10.0.0.1:25",
            "10.0.0.2:5",
            TcpState::ESTABLISHED,
            Birth::Known(0),
        );
        assert!(matches!(p.verdict(&s), Verdict::At { .. }));
    }

    #[test]
    fn port_selector_matches_local_or_remote() {
        let mut p = max_age(1);
        p.ports = vec!["8080".parse().unwrap()];
        let local = subject(
            "[::1]:8080",
            "[::1]:40000",
            TcpState::ESTABLISHED,
            Birth::Known(0),
        );
        let remote = subject(
            "[::1]:40000",
            "[::1]:8080",
            TcpState::ESTABLISHED,
            Birth::Known(0),
        );
        let other = subject(
            "[::1]:9090",
            "[::1]:40000",
            TcpState::ESTABLISHED,
            Birth::Known(0),
        );
        assert!(matches!(p.verdict(&local), Verdict::At { .. }));
        assert!(matches!(p.verdict(&remote), Verdict::At { .. }));
        assert_eq!(p.verdict(&other), Verdict::Never);
    }

    #[test]
    fn opening_and_listening_sockets_are_never_chosen() {
        let p = max_age(1);
        for st in [
            TcpState::LISTEN,
            TcpState::SYN_SENT,
            TcpState::SYN_RECV,
            TcpState::CLOSE,
        ] {
            let s = subject("10.0.0.1:80", "10.0.0.2:5", st, Birth::Known(0));
            assert_eq!(p.verdict(&s), Verdict::Never, "{st}");
        }
    }

    #[test]
    fn no_limit_chooses_nothing() {
        let p = Policy::default();
        assert!(!p.has_limit());
        let s = subject(
            "10.0.0.1:80",
            "10.0.0.2:5",
            TcpState::ESTABLISHED,
            Birth::Known(0),
        );
        assert_eq!(p.verdict(&s), Verdict::Never);
    }
}
