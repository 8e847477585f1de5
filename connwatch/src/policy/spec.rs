//! What the operator asked for, from flags and the config file, before it becomes a
//! [`Policy`]: flags override the file, and the file's named rules stay.

use std::time::Duration;

use ipnet::IpNet;

use crate::conn::TcpState;
use crate::policy::{
    Budget, Limit, Policy, PortRange, Protection, Rule, Selector, DEFAULT_STATE_TIMEOUTS,
};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySpec {
    pub max_age: Option<Duration>,
    pub idle: Option<Duration>,
    pub state_timeouts: Vec<(TcpState, Duration)>,
    /// The selector the limits above apply within.
    pub selector: Selector,
    pub exclude_ports: Vec<PortRange>,
    pub exclude_addrs: Vec<IpNet>,
    pub exclude_processes: Vec<String>,
    pub exclude_cgroups: Vec<String>,
    pub block: Vec<IpNet>,
    /// Also block, in the firewall, each address whose connection a block rule destroyed.
    pub block_firewall: bool,
    /// For how long (default [`DEFAULT_BLOCK_FOR`]).
    pub block_for: Option<Duration>,
    pub max_conns_per_ip: Option<u32>,
    pub max_kills_per_second: Option<u32>,
    pub max_kill_fraction: Option<f64>,
    pub enforce: bool,
    /// Named rules, each with its own selector.
    pub rules: Vec<Rule>,
}

/// How long `--block-firewall` blocks an address without `--block-for`.
pub const DEFAULT_BLOCK_FOR: Duration = Duration::from_secs(600);

fn pick<T>(over: Vec<T>, base: Vec<T>) -> Vec<T> {
    if over.is_empty() {
        base
    } else {
        over
    }
}

/// `base` and then what `more` adds to it, each once.
fn union<T: PartialEq>(mut base: Vec<T>, more: Vec<T>) -> Vec<T> {
    for x in more {
        if !base.contains(&x) {
            base.push(x);
        }
    }
    base
}

impl PolicySpec {
    /// `over` (the flags) on top of `self` (the file): what the flags set wins.
    pub fn overlay(self, over: PolicySpec) -> PolicySpec {
        let sel = over.selector;
        let base = self.selector;
        PolicySpec {
            max_age: over.max_age.or(self.max_age),
            idle: over.idle.or(self.idle),
            state_timeouts: pick(over.state_timeouts, self.state_timeouts),
            selector: Selector {
                ports: pick(sel.ports, base.ports),
                local_ports: pick(sel.local_ports, base.local_ports),
                remote_ports: pick(sel.remote_ports, base.remote_ports),
                local_addrs: pick(sel.local_addrs, base.local_addrs),
                remote_addrs: pick(sel.remote_addrs, base.remote_addrs),
                netns: pick(sel.netns, base.netns),
                direction: sel.direction.or(base.direction),
                cgroups: pick(sel.cgroups, base.cgroups),
            },
            // Protections only ever add up: a flag never drops the file's.
            exclude_ports: union(self.exclude_ports, over.exclude_ports),
            exclude_addrs: union(self.exclude_addrs, over.exclude_addrs),
            exclude_processes: union(self.exclude_processes, over.exclude_processes),
            exclude_cgroups: union(self.exclude_cgroups, over.exclude_cgroups),
            block: pick(over.block, self.block),
            block_firewall: over.block_firewall || self.block_firewall,
            block_for: over.block_for.or(self.block_for),
            max_conns_per_ip: over.max_conns_per_ip.or(self.max_conns_per_ip),
            max_kills_per_second: over.max_kills_per_second.or(self.max_kills_per_second),
            max_kill_fraction: over.max_kill_fraction.or(self.max_kill_fraction),
            enforce: over.enforce || self.enforce,
            rules: self.rules.into_iter().chain(over.rules).collect(),
        }
    }

    /// True when some limit is asked for; without one the hung-state defaults apply.
    pub fn has_limit(&self) -> bool {
        self.max_age.is_some()
            || self.idle.is_some()
            || !self.state_timeouts.is_empty()
            || !self.block.is_empty()
            || self.max_conns_per_ip.is_some()
            || !self.rules.is_empty()
    }

    /// The policy: protections (port 22 and the default processes always, plus what was
    /// asked), the rules from the flags within their selector, and the named rules.
    pub fn build(&self) -> Policy {
        let mut protect = Protection::default();
        protect.ports.extend(self.exclude_ports.iter().copied());
        protect.addrs.extend(self.exclude_addrs.iter().copied());
        protect.cgroups = self.exclude_cgroups.clone();
        for p in &self.exclude_processes {
            if !protect.processes.contains(p) {
                protect.processes.push(p.clone());
            }
        }
        let scoped = |name: &str, limit: Limit| Rule {
            name: name.to_string(),
            selector: self.selector.clone(),
            limit,
        };
        let mut rules = Vec::new();
        if !self.block.is_empty() {
            // A blocked address is blocked on every port: only the namespaces watched
            // narrow it.
            rules.push(Rule {
                name: "blocked".into(),
                selector: Selector {
                    remote_addrs: self.block.clone(),
                    netns: self.selector.netns.clone(),
                    cgroups: self.selector.cgroups.clone(),
                    ..Selector::default()
                },
                limit: Limit::Block,
            });
        }
        if let Some(d) = self.max_age {
            rules.push(scoped("max-age", Limit::MaxAge(d)));
        }
        if let Some(d) = self.idle {
            rules.push(scoped("idle", Limit::Idle(d)));
        }
        if let Some(n) = self.max_conns_per_ip {
            rules.push(scoped("max-conns-per-ip", Limit::MaxConnsPerIp(n)));
        }
        let timeouts: Vec<(TcpState, Duration)> = if self.has_limit() {
            self.state_timeouts.clone()
        } else {
            DEFAULT_STATE_TIMEOUTS.to_vec()
        };
        for (state, d) in timeouts {
            let name = state.name().to_ascii_lowercase().replace('_', "-");
            rules.push(scoped(&name, Limit::StateTimeout(state, d)));
        }
        rules.extend(self.rules.iter().cloned());
        Policy {
            rules,
            protect,
            budget: Budget {
                max_kills_per_second: self.max_kills_per_second,
                max_kill_fraction: self.max_kill_fraction,
            },
            block_firewall: self
                .block_firewall
                .then(|| self.block_for.unwrap_or(DEFAULT_BLOCK_FOR)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_limits_the_hung_state_defaults_apply() {
        let p = PolicySpec::default().build();
        let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "close-wait",
                "fin-wait1",
                "fin-wait2",
                "closing",
                "last-ack"
            ]
        );
        assert!(p.protect.ports.iter().any(|r| r.contains(22)));
        assert!(p.protect.processes.iter().any(|n| n == "sshd"));
    }

    #[test]
    fn a_limit_replaces_the_defaults_and_keeps_the_protections() {
        let spec = PolicySpec {
            idle: Some(Duration::from_secs(60)),
            exclude_ports: vec!["5432".parse().unwrap()],
            exclude_processes: vec!["postgres".into()],
            ..PolicySpec::default()
        };
        let p = spec.build();
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].limit, Limit::Idle(Duration::from_secs(60)));
        assert!(p.protect.ports.iter().any(|r| r.contains(22)));
        assert!(p.protect.ports.iter().any(|r| r.contains(5432)));
        assert!(p.protect.processes.iter().any(|n| n == "sshd"));
        assert!(p.protect.processes.iter().any(|n| n == "postgres"));
    }

    #[test]
    fn flags_override_the_file_and_named_rules_stay() {
        let file = PolicySpec {
            max_age: Some(Duration::from_secs(600)),
            idle: Some(Duration::from_secs(60)),
            selector: Selector {
                ports: vec!["80".parse().unwrap()],
                ..Selector::default()
            },
            rules: vec![Rule {
                name: "db".into(),
                selector: Selector::default(),
                limit: Limit::MaxAge(Duration::from_secs(7200)),
            }],
            ..PolicySpec::default()
        };
        let flags = PolicySpec {
            max_age: Some(Duration::from_secs(30)),
            selector: Selector {
                ports: vec!["8080".parse().unwrap()],
                ..Selector::default()
            },
            ..PolicySpec::default()
        };
        let merged = file.overlay(flags);
        assert_eq!(merged.max_age, Some(Duration::from_secs(30)));
        assert_eq!(merged.idle, Some(Duration::from_secs(60)));
        assert_eq!(merged.selector.ports, vec!["8080".parse().unwrap()]);
        let p = merged.build();
        assert_eq!(p.rules.iter().filter(|r| r.name == "db").count(), 1);
    }

    #[test]
    fn protections_from_flags_add_to_the_file() {
        let file = PolicySpec {
            exclude_processes: vec!["postgres".into()],
            exclude_ports: vec!["5432".parse().unwrap()],
            ..PolicySpec::default()
        };
        let flags = PolicySpec {
            exclude_processes: vec!["haproxy".into(), "postgres".into()],
            exclude_addrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..PolicySpec::default()
        };
        let p = file.overlay(flags).build();
        for name in ["postgres", "haproxy", "sshd"] {
            assert_eq!(
                p.protect.processes.iter().filter(|n| *n == name).count(),
                1,
                "{name}: {:?}",
                p.protect.processes
            );
        }
        assert!(p.protect.ports.contains(&"5432".parse().unwrap()));
        assert!(p.protect.ports.contains(&"22".parse().unwrap()));
        assert_eq!(p.protect.addrs, vec!["10.0.0.0/8".parse().unwrap()]);
    }

    #[test]
    fn block_ignores_the_port_selector() {
        let spec = PolicySpec {
            block: vec!["192.0.2.0/24".parse().unwrap()],
            selector: Selector {
                ports: vec!["80".parse().unwrap()],
                ..Selector::default()
            },
            ..PolicySpec::default()
        };
        let p = spec.build();
        assert_eq!(p.rules[0].limit, Limit::Block);
        assert!(p.rules[0].selector.ports.is_empty());
        assert_eq!(p.block_firewall, None);
        let file = PolicySpec {
            block_firewall: true,
            ..spec.clone()
        };
        assert_eq!(file.build().block_firewall, Some(DEFAULT_BLOCK_FOR));
        let flags = PolicySpec {
            block_for: Some(Duration::from_secs(30)),
            ..PolicySpec::default()
        };
        assert_eq!(
            file.overlay(flags).build().block_firewall,
            Some(Duration::from_secs(30))
        );
    }
}
