//! The policy engine: sockets and time in, decisions out. No I/O, no kernel: every
//! rule here is unit-testable, and a dry run and a live run share every line of it.
//!
//! A policy is a list of rules (a selector and a limit) and a set of protections.
//! Protections win over every rule; among the rules that apply, the earliest deadline
//! wins.

mod config;
mod parse;
mod source;
mod spec;

pub use config::{load as load_config, parse as parse_config, ConfigError};
pub use parse::{
    parse_cidr, parse_duration, parse_netns, parse_process_name, parse_state_timeout,
    parse_timeout_state, PortRange, COMM_LEN, TIMEOUT_STATES,
};
pub use source::PolicySource;
pub use spec::PolicySpec;

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use std::sync::Arc;

use crate::conn::{canonical, Birth, Direction, Owner, TcpState, Tuple};
use crate::kernel::cgroup;

/// The default hung-state timeouts, on when no other limit is given.
pub const DEFAULT_STATE_TIMEOUTS: [(TcpState, Duration); 5] = [
    (TcpState::CLOSE_WAIT, Duration::from_secs(60)),
    (TcpState::FIN_WAIT1, Duration::from_secs(120)),
    (TcpState::FIN_WAIT2, Duration::from_secs(120)),
    (TcpState::CLOSING, Duration::from_secs(60)),
    (TcpState::LAST_ACK, Duration::from_secs(60)),
];

/// Processes whose sockets are never destroyed unless the operator says otherwise.
pub const DEFAULT_PROTECTED_PROCESSES: [&str; 7] = [
    "sshd",
    "systemd",
    "init",
    "containerd",
    "dockerd",
    "kubelet",
    "k3s",
];

/// Port 22: an operator's way back in is never cut.
pub const DEFAULT_EXCLUDED_PORT: PortRange = PortRange { lo: 22, hi: 22 };

fn in_any(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

fn port_in(ranges: &[PortRange], port: u16) -> bool {
    ranges.iter().any(|r| r.contains(port))
}

/// Which connections a rule is about. Each non-empty list must match (any of its
/// entries); empty lists match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// Local or remote port.
    pub ports: Vec<PortRange>,
    pub local_ports: Vec<PortRange>,
    pub remote_ports: Vec<PortRange>,
    pub local_addrs: Vec<IpNet>,
    pub remote_addrs: Vec<IpNet>,
    /// Network namespaces, by inode (`--netns host|NAME|INODE`, resolved at load).
    pub netns: Vec<u32>,
    /// Who opened the connection (`--direction in|out`); None for both.
    pub direction: Option<Direction>,
    /// Cgroup paths (`--cgroup PATTERN`: a subtree, or a glob with `*`).
    pub cgroups: Vec<String>,
}

impl Selector {
    /// Whether the socket is one this selector is about.
    pub fn matches(&self, s: &Subject) -> bool {
        (self.netns.is_empty() || self.netns.contains(&s.netns))
            && self.direction.is_none_or(|d| s.direction == Some(d))
            && (self.cgroups.is_empty()
                || s.cgroup
                    .as_deref()
                    .is_some_and(|c| self.cgroups.iter().any(|p| cgroup::matches(p, c))))
            && self.matches_tuple(&s.tuple)
    }

    /// The endpoint part of [`Selector::matches`].
    pub fn matches_tuple(&self, t: &Tuple) -> bool {
        let (lp, rp) = (t.local.port(), t.remote.port());
        (self.ports.is_empty() || port_in(&self.ports, lp) || port_in(&self.ports, rp))
            && (self.local_ports.is_empty() || port_in(&self.local_ports, lp))
            && (self.remote_ports.is_empty() || port_in(&self.remote_ports, rp))
            && (self.local_addrs.is_empty() || in_any(&self.local_addrs, t.local.ip()))
            && (self.remote_addrs.is_empty() || in_any(&self.remote_addrs, t.remote.ip()))
    }
}

/// What a rule limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// Older than this.
    MaxAge(Duration),
    /// No data in either direction for this long (ESTABLISHED only).
    Idle(Duration),
    /// In this state for this long.
    StateTimeout(TcpState, Duration),
    /// Destroyed as soon as it is established.
    Block,
    /// The newest connections of one remote address beyond this many.
    MaxConnsPerIp(u32),
}

impl Limit {
    /// The reason a destroy names.
    pub fn kind(&self) -> &'static str {
        match self {
            Limit::MaxAge(_) => "max-age",
            Limit::Idle(_) => "idle",
            Limit::StateTimeout(..) => "state-timeout",
            Limit::Block => "blocked",
            Limit::MaxConnsPerIp(_) => "max-conns-per-ip",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = |d: &Duration| humantime::format_duration(*d).to_string();
        match self {
            Limit::MaxAge(d) => write!(f, "max-age {}", h(d)),
            Limit::Idle(d) => write!(f, "idle {}", h(d)),
            Limit::StateTimeout(s, d) => write!(f, "{s} for {}", h(d)),
            Limit::Block => f.write_str("blocked"),
            Limit::MaxConnsPerIp(n) => write!(f, "max {n} connections per address"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    pub selector: Selector,
    pub limit: Limit,
}

/// The index of a rule in its policy: what a decision records.
pub type RuleId = usize;

/// Things never destroyed, whatever the rules say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    /// Local or remote ports.
    pub ports: Vec<PortRange>,
    /// Local or remote addresses.
    pub addrs: Vec<IpNet>,
    /// Owning process names (the kernel's 15-character command name).
    pub processes: Vec<String>,
    /// Cgroup paths of the owning process (a subtree, or a glob with `*`).
    pub cgroups: Vec<String>,
}

impl Default for Protection {
    fn default() -> Self {
        Protection {
            ports: vec![DEFAULT_EXCLUDED_PORT],
            addrs: Vec::new(),
            processes: DEFAULT_PROTECTED_PROCESSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            cgroups: Vec::new(),
        }
    }
}

/// Why a socket is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protected {
    Port(u16),
    Addr(IpAddr),
    Process(String),
    Cgroup(String),
}

impl fmt::Display for Protected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protected::Port(p) => write!(f, "port {p}"),
            Protected::Addr(a) => write!(f, "address {a}"),
            Protected::Process(p) => write!(f, "process {p}"),
            Protected::Cgroup(p) => write!(f, "cgroup {p}"),
        }
    }
}

/// Bounds on how much is destroyed at once, against a bad rule or a clock jump.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Budget {
    pub max_kills_per_second: Option<u32>,
    /// Of the sockets tracked, the share that may be destroyed in one second.
    pub max_kill_fraction: Option<f64>,
}

impl Budget {
    /// How many destroys one second allows with `tracked` sockets known; None when the
    /// budget is off.
    pub fn per_second(&self, tracked: usize) -> Option<usize> {
        let rate = self.max_kills_per_second.map(|n| n as usize);
        // At least one, so a small host is slowed, not stopped.
        let share = self
            .max_kill_fraction
            .map(|f| ((tracked as f64 * f).floor() as usize).max(1));
        match (rate, share) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn is_on(&self) -> bool {
        self.max_kills_per_second.is_some() || self.max_kill_fraction.is_some()
    }
}

/// What the policy looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The inode of the socket's network namespace.
    pub netns: u32,
    pub direction: Option<Direction>,
    /// The cgroup path of the process that opened or used it, where known.
    pub cgroup: Option<Arc<str>>,
    pub tuple: Tuple,
    pub state: TcpState,
    pub birth: Birth,
    pub state_since_ns: u64,
    /// Last data in either direction; 0 when none was seen.
    pub last_activity_ns: u64,
    pub owner: Option<Owner>,
}

impl Subject {
    /// When the connection last did something: its last data, or its birth.
    pub fn quiet_since(&self) -> u64 {
        self.last_activity_ns.max(self.birth.no_later_than())
    }
}

/// The policy's answer for one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Never chosen as things stand (protected, not selected, or no limit applies).
    Never,
    /// Chosen once the monotonic clock reaches `at_ns`, by `rule`, unless something
    /// changes first.
    At { at_ns: u64, rule: RuleId },
}

impl Verdict {
    fn earliest(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Never, v) | (v, Verdict::Never) => v,
            (Verdict::At { at_ns: a, .. }, Verdict::At { at_ns: b, .. }) => {
                if b < a {
                    other
                } else {
                    self
                }
            }
        }
    }
}

/// What to do with a socket whose deadline came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    NotDue,
    Destroy(RuleId),
    /// A rule chose it, a protection saves it.
    Protected(RuleId, Protected),
}

/// The whole policy. Its decisions depend only on the socket and the clock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub protect: Protection,
    pub budget: Budget,
    /// With `--block-firewall`: how long an address whose connection a block rule
    /// destroyed stays blocked in the firewall (`--block-for`).
    pub block_firewall: Option<Duration>,
}

impl Policy {
    /// The default: the hung-state timeouts, nothing else.
    pub fn default_hung_states() -> Policy {
        Policy {
            rules: DEFAULT_STATE_TIMEOUTS
                .iter()
                .map(|(s, d)| Rule {
                    name: s.name().to_ascii_lowercase().replace('_', "-"),
                    selector: Selector::default(),
                    limit: Limit::StateTimeout(*s, *d),
                })
                .collect(),
            ..Policy::default()
        }
    }

    /// The policy in one line, for the start-up and reload logs.
    pub fn describe(&self) -> String {
        let rules: Vec<String> = self
            .rules
            .iter()
            .map(|r| {
                if r.name == r.limit.kind() {
                    r.limit.to_string()
                } else {
                    format!("{} ({})", r.name, r.limit)
                }
            })
            .collect();
        let ports: Vec<String> = self.protect.ports.iter().map(|p| p.to_string()).collect();
        let firewall = self.block_firewall.map_or(String::new(), |d| {
            format!(
                "; blocked addresses also blocked in the firewall for {}",
                crate::clock::human(d)
            )
        });
        format!(
            "rules: {}; protected ports: {}; protected processes: {}{firewall}",
            rules.join(", "),
            ports.join(","),
            self.protect.processes.join(",")
        )
    }

    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id]
    }

    /// Why this socket may never be destroyed, if it may not. The owner is checked
    /// only where known: the destroyer asks `/proc` for the rest before a kill.
    pub fn protected(&self, s: &Subject) -> Option<Protected> {
        self.protected_endpoint(&s.tuple)
            .or_else(|| self.protected_owner(s.owner.as_ref()))
            .or_else(|| self.protected_cgroup(s.cgroup.as_deref()))
    }

    /// Protection by the owner's cgroup (`--exclude-cgroup`), where it is known.
    pub fn protected_cgroup(&self, cgroup: Option<&str>) -> Option<Protected> {
        let path = cgroup?;
        self.protect
            .cgroups
            .iter()
            .find(|p| cgroup::matches(p, path))
            .map(|_| Protected::Cgroup(path.to_string()))
    }

    /// Protection by port or address: known from the tuple alone.
    pub fn protected_endpoint(&self, t: &Tuple) -> Option<Protected> {
        let (l, r) = (t.local, t.remote);
        for p in [l.port(), r.port()] {
            if port_in(&self.protect.ports, p) {
                return Some(Protected::Port(p));
            }
        }
        for a in [l.ip(), r.ip()] {
            if in_any(&self.protect.addrs, a) {
                return Some(Protected::Addr(canonical(a)));
            }
        }
        None
    }

    pub fn protected_owner(&self, owner: Option<&Owner>) -> Option<Protected> {
        let name = owner?.name();
        self.protect
            .processes
            .iter()
            .find(|p| p.as_str() == name)
            .map(|p| Protected::Process(p.clone()))
    }

    /// Whether any rule can ever act on a socket in this state.
    pub fn actionable(state: TcpState) -> bool {
        !state.is_opening_or_listening() && state != TcpState::CLOSE
    }

    /// When, if ever, this socket is due under its own rules (per-address limits,
    /// which depend on other sockets, are the engine's to count). Protection by process
    /// is judged by [`Policy::decide`] when the deadline comes, from the owner's name
    /// then, so that the log can say protection saved the socket.
    pub fn verdict(&self, s: &Subject) -> Verdict {
        if !Self::actionable(s.state) || self.protected_endpoint(&s.tuple).is_some() {
            return Verdict::Never;
        }
        let mut best = Verdict::Never;
        for (id, rule) in self.rules.iter().enumerate() {
            if !rule.selector.matches(s) {
                continue;
            }
            let at = |ns: u64, d: &Duration| ns.saturating_add(d.as_nanos() as u64);
            let at_ns = match &rule.limit {
                Limit::MaxAge(d) if s.state != TcpState::TIME_WAIT => {
                    at(s.birth.no_later_than(), d)
                }
                Limit::Idle(d) if s.state == TcpState::ESTABLISHED => at(s.quiet_since(), d),
                Limit::StateTimeout(st, d) if *st == s.state => at(s.state_since_ns, d),
                Limit::Block if s.state != TcpState::TIME_WAIT => 0,
                _ => continue,
            };
            best = best.earliest(Verdict::At { at_ns, rule: id });
        }
        best
    }

    /// The rule under which the socket is due at `now_ns`: what the destroyer re-checks.
    pub fn due(&self, s: &Subject, now_ns: u64) -> Option<RuleId> {
        match self.verdict(s) {
            Verdict::At { at_ns, rule } if at_ns <= now_ns => Some(rule),
            _ => None,
        }
    }

    /// The final word when a deadline comes: destroy under a rule, protected, or not
    /// due (any more).
    pub fn decide(&self, s: &Subject, now_ns: u64) -> Decision {
        match self.due(s, now_ns) {
            None => Decision::NotDue,
            Some(rule) => self.judge(s, rule),
        }
    }

    /// Whether a socket a rule chose may be destroyed.
    pub fn judge(&self, s: &Subject, rule: RuleId) -> Decision {
        match self.protected(s) {
            Some(p) => Decision::Protected(rule, p),
            None if Self::actionable(s.state) => Decision::Destroy(rule),
            None => Decision::NotDue,
        }
    }

    /// The per-address limits that apply to this socket, with their rules.
    pub fn per_ip_limits<'a>(&'a self, s: &'a Subject) -> impl Iterator<Item = (RuleId, u32)> + 'a {
        let eligible =
            s.state == TcpState::ESTABLISHED && self.protected_endpoint(&s.tuple).is_none();
        self.rules
            .iter()
            .enumerate()
            .filter(move |(_, r)| eligible && r.selector.matches(s))
            .filter_map(|(id, r)| match r.limit {
                Limit::MaxConnsPerIp(n) => Some((id, n)),
                _ => None,
            })
    }

    /// True when a rule has a timeout for this state.
    pub fn limits_state(&self, state: TcpState) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.limit, Limit::StateTimeout(s, _) if s == state))
    }

    /// True when a rule selects by cgroup or a cgroup is protected: only then does a
    /// decision need the socket's cgroup named.
    pub fn looks_at_cgroups(&self) -> bool {
        !self.protect.cgroups.is_empty()
            || self.rules.iter().any(|r| !r.selector.cgroups.is_empty())
    }

    /// True when a rule limits connections per address.
    pub fn has_per_ip_limits(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.limit, Limit::MaxConnsPerIp(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use crate::clock::SEC;

    fn subject(local: &str, remote: &str, state: TcpState, birth: Birth) -> Subject {
        Subject {
            netns: 1,
            direction: None,
            cgroup: None,
            tuple: Tuple::new(
                local.parse::<SocketAddr>().unwrap(),
                remote.parse::<SocketAddr>().unwrap(),
            ),
            state,
            birth,
            state_since_ns: birth.no_later_than(),
            last_activity_ns: 0,
            owner: None,
        }
    }

    fn est(local: &str, remote: &str) -> Subject {
        subject(local, remote, TcpState::ESTABLISHED, Birth::Known(0))
    }

    fn rule(limit: Limit) -> Rule {
        Rule {
            name: limit.kind().into(),
            selector: Selector::default(),
            limit,
        }
    }

    fn policy(rules: Vec<Rule>) -> Policy {
        Policy {
            rules,
            ..Policy::default()
        }
    }

    #[test]
    fn cgroups_are_looked_at_only_where_a_rule_or_protection_names_one() {
        assert!(!max_age(10).looks_at_cgroups());
        let mut selecting = max_age(10);
        selecting.rules[0].selector.cgroups = vec!["/kubepods.slice".into()];
        assert!(selecting.looks_at_cgroups());
        let mut protecting = max_age(10);
        protecting.protect.cgroups = vec!["/system.slice/sshd.service".into()];
        assert!(protecting.looks_at_cgroups());
    }

    fn max_age(secs: u64) -> Policy {
        policy(vec![rule(Limit::MaxAge(Duration::from_secs(secs)))])
    }

    #[test]
    fn max_age_deadline_is_birth_plus_limit() {
        let p = max_age(300);
        let mut s = est("10.0.0.1:443", "10.0.0.2:50000");
        s.birth = Birth::Known(7 * SEC);
        assert_eq!(
            p.verdict(&s),
            Verdict::At {
                at_ns: 307 * SEC,
                rule: 0
            }
        );
        assert_eq!(p.due(&s, 306 * SEC), None);
        assert_eq!(p.due(&s, 307 * SEC), Some(0));
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
        assert_eq!(p.due(&s, 159 * SEC), None);
        assert_eq!(p.due(&s, 160 * SEC), Some(0));
    }

    #[test]
    fn idle_counts_from_the_last_data_or_birth() {
        let p = policy(vec![rule(Limit::Idle(Duration::from_secs(10)))]);
        let mut s = est("10.0.0.1:443", "10.0.0.2:50000");
        s.birth = Birth::Known(5 * SEC);
        assert_eq!(
            p.verdict(&s),
            Verdict::At {
                at_ns: 15 * SEC,
                rule: 0
            }
        );
        s.last_activity_ns = 40 * SEC;
        assert_eq!(
            p.verdict(&s),
            Verdict::At {
                at_ns: 50 * SEC,
                rule: 0
            }
        );
        s.state = TcpState::CLOSE_WAIT;
        assert_eq!(
            p.verdict(&s),
            Verdict::Never,
            "idle is about open connections"
        );
    }

    #[test]
    fn state_timeouts_count_from_the_state_change() {
        let p = Policy::default_hung_states();
        let mut s = est("10.0.0.1:443", "10.0.0.2:50000");
        assert_eq!(p.verdict(&s), Verdict::Never);
        s.state = TcpState::CLOSE_WAIT;
        s.state_since_ns = 100 * SEC;
        let Verdict::At { at_ns, rule } = p.verdict(&s) else {
            panic!("CLOSE_WAIT has a default timeout")
        };
        assert_eq!(at_ns, 160 * SEC);
        assert_eq!(p.rule(rule).name, "close-wait");
        s.state = TcpState::FIN_WAIT2;
        assert!(matches!(p.verdict(&s), Verdict::At { at_ns, .. } if at_ns == 220 * SEC));
        s.state = TcpState::TIME_WAIT;
        assert_eq!(p.verdict(&s), Verdict::Never, "TIME_WAIT is off by default");
    }

    #[test]
    fn the_earliest_rule_wins() {
        let p = policy(vec![
            rule(Limit::MaxAge(Duration::from_secs(100))),
            rule(Limit::Idle(Duration::from_secs(30))),
        ]);
        let s = est("10.0.0.1:443", "10.0.0.2:50000");
        assert_eq!(
            p.verdict(&s),
            Verdict::At {
                at_ns: 30 * SEC,
                rule: 1
            }
        );
    }

    #[test]
    fn block_is_due_at_once_and_only_for_its_addresses() {
        let p = policy(vec![Rule {
            name: "blocked".into(),
            selector: Selector {
                remote_addrs: vec![parse_cidr("192.0.2.0/24").unwrap()],
                ..Selector::default()
            },
            limit: Limit::Block,
        }]);
        assert_eq!(
            p.verdict(&est("10.0.0.1:443", "192.0.2.7:50000")),
            Verdict::At { at_ns: 0, rule: 0 }
        );
        assert_eq!(
            p.verdict(&est("10.0.0.1:443", "[::ffff:192.0.2.7]:50000")),
            Verdict::At { at_ns: 0, rule: 0 },
            "an IPv4-mapped address is its IPv4 address"
        );
        assert_eq!(
            p.verdict(&est("192.0.2.7:443", "10.0.0.1:50000")),
            Verdict::Never
        );
    }

    #[test]
    fn selectors_match_sides_addresses_and_ports() {
        let sel = Selector {
            local_ports: vec!["8080".parse().unwrap()],
            remote_addrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            ..Selector::default()
        };
        let t = |l: &str, r: &str| Tuple::new(l.parse().unwrap(), r.parse().unwrap());
        assert!(sel.matches_tuple(&t("1.1.1.1:8080", "10.9.9.9:5")));
        assert!(
            !sel.matches_tuple(&t("1.1.1.1:5", "10.9.9.9:8080")),
            "remote port is not local"
        );
        assert!(!sel.matches_tuple(&t("1.1.1.1:8080", "11.9.9.9:5")));
        let either = Selector {
            ports: vec!["8080".parse().unwrap()],
            ..Selector::default()
        };
        assert!(either.matches_tuple(&t("[::1]:40000", "[::1]:8080")));
        assert!(either.matches_tuple(&t("[::1]:8080", "[::1]:40000")));
        assert!(!either.matches_tuple(&t("[::1]:9090", "[::1]:40000")));
    }

    #[test]
    fn protections_win_over_every_rule() {
        let mut p = max_age(1);
        p.protect.addrs = vec![parse_cidr("10.9.0.0/16").unwrap()];
        for (l, r) in [("10.0.0.1:22", "10.0.0.2:5"), ("10.0.0.1:5", "10.0.0.2:22")] {
            assert_eq!(p.verdict(&est(l, r)), Verdict::Never, "{l} {r}");
        }
        assert_eq!(p.verdict(&est("10.0.0.1:80", "10.9.1.1:5")), Verdict::Never);
        let mut s = est("10.0.0.1:80", "10.0.0.2:5");
        assert!(matches!(p.verdict(&s), Verdict::At { .. }));
        assert_eq!(p.decide(&s, 10 * SEC), Decision::Destroy(0));
        s.owner = Some(Owner::new(1, "sshd"));
        assert_eq!(p.protected(&s), Some(Protected::Process("sshd".into())));
        assert_eq!(
            p.decide(&s, 10 * SEC),
            Decision::Protected(0, Protected::Process("sshd".into()))
        );
        s.owner = Some(Owner::new(1, "nginx"));
        assert_eq!(p.decide(&s, 10 * SEC), Decision::Destroy(0));
    }

    #[test]
    fn opening_and_listening_sockets_are_never_chosen() {
        let p = policy(vec![
            rule(Limit::MaxAge(Duration::from_secs(1))),
            rule(Limit::Block),
        ]);
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
    fn budget_per_second() {
        assert_eq!(Budget::default().per_second(10), None);
        let rate = Budget {
            max_kills_per_second: Some(100),
            max_kill_fraction: None,
        };
        assert_eq!(rate.per_second(10_000), Some(100));
        let frac = Budget {
            max_kills_per_second: None,
            max_kill_fraction: Some(0.1),
        };
        assert_eq!(frac.per_second(2000), Some(200));
        assert_eq!(
            frac.per_second(3),
            Some(1),
            "never stops a small host entirely"
        );
        let both = Budget {
            max_kills_per_second: Some(50),
            max_kill_fraction: Some(0.1),
        };
        assert_eq!(both.per_second(2000), Some(50));
        assert_eq!(both.per_second(200), Some(20));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn arb_limit() -> impl Strategy<Value = Limit> {
            prop_oneof![
                (1u64..1000).prop_map(|s| Limit::MaxAge(Duration::from_secs(s))),
                (1u64..1000).prop_map(|s| Limit::Idle(Duration::from_secs(s))),
                (0usize..6, 1u64..1000).prop_map(|(i, s)| Limit::StateTimeout(
                    TIMEOUT_STATES[i],
                    Duration::from_secs(s)
                )),
                Just(Limit::Block),
                (1u32..5).prop_map(Limit::MaxConnsPerIp),
            ]
        }

        fn arb_ports() -> impl Strategy<Value = Vec<PortRange>> {
            prop::collection::vec(
                (0u16..100, 0u16..20).prop_map(|(lo, w)| PortRange { lo, hi: lo + w }),
                0..3,
            )
        }

        fn arb_nets() -> impl Strategy<Value = Vec<IpNet>> {
            prop::collection::vec(
                (0u8..4, 24u8..=32).prop_map(|(b, len)| {
                    IpNet::new(IpAddr::from([10, 0, b, 0]), len)
                        .unwrap()
                        .trunc()
                }),
                0..2,
            )
        }

        fn arb_rule() -> impl Strategy<Value = Rule> {
            (arb_ports(), arb_ports(), arb_nets(), arb_limit()).prop_map(
                |(ports, local_ports, remote_addrs, limit)| Rule {
                    name: limit.kind().into(),
                    selector: Selector {
                        ports,
                        local_ports,
                        remote_addrs,
                        ..Selector::default()
                    },
                    limit,
                },
            )
        }

        fn arb_subject() -> impl Strategy<Value = Subject> {
            let states = [
                TcpState::ESTABLISHED,
                TcpState::CLOSE_WAIT,
                TcpState::FIN_WAIT1,
                TcpState::FIN_WAIT2,
                TcpState::LAST_ACK,
                TcpState::CLOSING,
                TcpState::TIME_WAIT,
                TcpState::LISTEN,
                TcpState::SYN_SENT,
            ];
            (
                0u8..4,
                0u8..255,
                0u16..120,
                0u16..120,
                0usize..states.len(),
                0u64..1000,
                0u64..1000,
                prop::option::of(prop::sample::select(vec![
                    "sshd", "nginx", "kubelet", "app",
                ])),
            )
                .prop_map(move |(b, h, lp, rp, st, birth, act, owner)| Subject {
                    netns: 1,
                    direction: None,
                    cgroup: None,
                    tuple: Tuple::new(
                        SocketAddr::new(IpAddr::from([192, 168, 0, 1]), lp),
                        SocketAddr::new(IpAddr::from([10, 0, b, h]), rp),
                    ),
                    state: states[st],
                    birth: Birth::Known(birth * SEC),
                    state_since_ns: birth * SEC,
                    last_activity_ns: act * SEC,
                    owner: owner.map(|n| Owner::new(7, n)),
                })
        }

        proptest! {
            #[test]
            fn protected_and_excluded_sockets_are_never_chosen(
                rules in prop::collection::vec(arb_rule(), 0..6),
                protect_ports in arb_ports(),
                protect_addrs in arb_nets(),
                s in arb_subject(),
                now in 0u64..5000,
            ) {
                let mut p = Policy { rules, ..Policy::default() };
                p.protect.ports.extend(protect_ports);
                p.protect.addrs = protect_addrs;
                let (l, r) = (s.tuple.local.port(), s.tuple.remote.port());
                let by_endpoint = p.protect.ports.iter().any(|x| x.contains(l) || x.contains(r))
                    || p.protect.addrs.iter().any(|n| n.contains(&s.tuple.remote.ip()) || n.contains(&s.tuple.local.ip()))
                    || s.state.is_opening_or_listening();
                let by_owner = s.owner.is_some_and(|o| p.protect.processes.iter().any(|n| n == o.name()));
                if by_endpoint {
                    prop_assert_eq!(p.verdict(&s), Verdict::Never);
                    prop_assert_eq!(p.due(&s, now * SEC), None);
                    prop_assert_eq!(p.per_ip_limits(&s).count(), 0);
                }
                let decision = p.decide(&s, now * SEC);
                if by_endpoint || by_owner {
                    prop_assert!(!matches!(decision, Decision::Destroy(_)), "{:?}", decision);
                }
                // Every rule the engine might name, per-address ones included.
                for id in 0..p.rules.len() {
                    if by_endpoint || by_owner {
                        prop_assert!(!matches!(p.judge(&s, id), Decision::Destroy(_)));
                    }
                }
            }

            #[test]
            fn a_due_rule_selects_the_socket_and_applies_to_its_state(
                rules in prop::collection::vec(arb_rule(), 1..6),
                s in arb_subject(),
                now in 0u64..5000,
            ) {
                let p = Policy { rules, ..Policy::default() };
                if let Some(id) = p.due(&s, now * SEC) {
                    let r = p.rule(id);
                    prop_assert!(r.selector.matches(&s));
                    let applies = match r.limit {
                        Limit::Idle(_) => s.state == TcpState::ESTABLISHED,
                        Limit::StateTimeout(st, _) => st == s.state,
                        Limit::MaxConnsPerIp(_) => false,
                        _ => s.state != TcpState::TIME_WAIT,
                    };
                    prop_assert!(applies, "{:?} chose a socket in {}", r.limit, s.state);
                }
            }
        }
    }
}
