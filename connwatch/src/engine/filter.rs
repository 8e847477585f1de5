//! What the kernel program sends the daemon: the states and ports the policy can act
//! on, as the filter map holds them (`connwatch_common::Filter`). Everything else
//! stays in the map (so `list` loses nothing) and never crosses the ring buffer.
//!
//! The filter may say "matters" of a socket no rule selects (it is coarse: a union of
//! states and a union of ports), never the reverse: every socket a rule can choose is
//! followed, so a filtered engine decides exactly what an unfiltered one does (the
//! property test in `properties.rs`).

use connwatch_common::Filter;

use crate::conn::TcpState;
use crate::kernel::sock_diag::{End, PortTerm};
use crate::policy::{Limit, Policy, PortRange};

/// The states in which a limit can give a socket a deadline.
fn states_of(limit: &Limit) -> Vec<TcpState> {
    // Every state a connection can be destroyed in (TIME_WAIT is never in the map).
    const OPEN: [TcpState; 6] = [
        TcpState::ESTABLISHED,
        TcpState::FIN_WAIT1,
        TcpState::FIN_WAIT2,
        TcpState::CLOSE_WAIT,
        TcpState::LAST_ACK,
        TcpState::CLOSING,
    ];
    match limit {
        Limit::MaxAge(_) | Limit::Block => OPEN.to_vec(),
        Limit::Idle(_) | Limit::MaxConnsPerIp(_) => vec![TcpState::ESTABLISHED],
        // A TIME_WAIT limit follows a connection through the states it enters TIME_WAIT
        // from: the engine takes it over from the map when it closes from one of them.
        Limit::StateTimeout(s, _) if *s == TcpState::TIME_WAIT => vec![
            TcpState::TIME_WAIT,
            TcpState::FIN_WAIT1,
            TcpState::FIN_WAIT2,
            TcpState::CLOSING,
        ],
        Limit::StateTimeout(s, _) => vec![*s],
    }
}

/// The filter a daemon running `policy` writes: which states and ports can matter.
pub fn filter_of(policy: &Policy) -> Filter {
    let mut f = Filter::off();
    f.active = 1;
    for rule in &policy.rules {
        for s in states_of(&rule.limit) {
            f.add_state(s.0);
        }
        // A rule selects a socket only if each of its non-empty port lists matches:
        // any one of them bounds the ports it can select (the narrowest is not needed).
        let sel = &rule.selector;
        let ranges: &[PortRange] = [&sel.local_ports, &sel.remote_ports, &sel.ports]
            .into_iter()
            .find(|l| !l.is_empty())
            .map_or(&[], |l| l.as_slice());
        if ranges.is_empty() {
            f.any_port = 1;
        }
        for r in ranges {
            for p in r.lo..=r.hi {
                f.add_port(p);
            }
        }
    }
    f
}

/// What a one-shot dump needs to read under `policy`: the states its rules act in
/// (`1 << state`, as [`filter_of`]), and the port ranges the kernel keeps, each on its
/// own end (none: every socket). A rule selects a socket only if each of its
/// non-empty port lists matches, so any one of them bounds it: the local list if it
/// has one, else the remote, else either end.
pub fn dump_scope(policy: &Policy) -> (u32, Vec<PortTerm>) {
    let states = filter_of(policy).states;
    let mut terms = Vec::new();
    for rule in &policy.rules {
        let sel = &rule.selector;
        let ends: &[End] = if !sel.local_ports.is_empty() {
            &[End::Local]
        } else if !sel.remote_ports.is_empty() {
            &[End::Remote]
        } else if !sel.ports.is_empty() {
            &[End::Local, End::Remote]
        } else {
            // A rule on every port: every socket in its states.
            return (states, Vec::new());
        };
        let ranges = [&sel.local_ports, &sel.remote_ports, &sel.ports]
            .into_iter()
            .find(|l| !l.is_empty())
            .map_or(&[][..], |l| l.as_slice());
        for r in ranges {
            terms.extend(ends.iter().map(|&end| (end, r.lo, r.hi)));
        }
    }
    terms.sort_unstable();
    terms.dedup();
    (states, terms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Rule, Selector};
    use connwatch_common::{matters, tcp_state};
    use std::time::Duration;

    fn rule(limit: Limit, selector: Selector) -> Rule {
        Rule {
            name: limit.kind().into(),
            selector,
            limit,
        }
    }

    #[test]
    fn the_default_policy_wants_only_the_hung_states() {
        let f = filter_of(&Policy::default_hung_states());
        assert_eq!(f.active, 1);
        assert_eq!(f.any_port, 1);
        for st in [
            tcp_state::CLOSE_WAIT,
            tcp_state::FIN_WAIT1,
            tcp_state::FIN_WAIT2,
            tcp_state::CLOSING,
            tcp_state::LAST_ACK,
        ] {
            assert!(matters(&f, st, 1, 2), "{st}");
        }
        for st in [
            tcp_state::ESTABLISHED,
            tcp_state::SYN_SENT,
            tcp_state::SYN_RECV,
            tcp_state::LISTEN,
            tcp_state::CLOSE,
        ] {
            assert!(!matters(&f, st, 1, 2), "{st}");
        }
    }

    #[test]
    fn ports_bound_what_matters() {
        let p = Policy {
            rules: vec![rule(
                Limit::Idle(Duration::from_secs(1)),
                Selector {
                    local_ports: vec![PortRange { lo: 8080, hi: 8081 }],
                    ..Selector::default()
                },
            )],
            ..Policy::default()
        };
        let f = filter_of(&p);
        assert_eq!(f.any_port, 0);
        assert!(matters(&f, tcp_state::ESTABLISHED, 8081, 50000));
        assert!(!matters(&f, tcp_state::ESTABLISHED, 8082, 50000));
        assert!(!matters(&f, tcp_state::CLOSE_WAIT, 8080, 50000));
        assert_eq!(filter_of(&Policy::default()).states, 0, "no rule, nothing");
    }

    #[test]
    fn a_dump_reads_the_selectable_states_and_ports() {
        let idle = |selector: Selector| rule(Limit::Idle(Duration::from_secs(1)), selector);
        let p = Policy {
            rules: vec![
                idle(Selector {
                    local_ports: vec![PortRange { lo: 80, hi: 81 }],
                    remote_ports: vec![PortRange { lo: 1, hi: 1 }],
                    ..Selector::default()
                }),
                idle(Selector {
                    remote_ports: vec![PortRange { lo: 5432, hi: 5432 }],
                    ..Selector::default()
                }),
                idle(Selector {
                    ports: vec![PortRange { lo: 9000, hi: 9000 }],
                    ..Selector::default()
                }),
            ],
            ..Policy::default()
        };
        let (states, terms) = dump_scope(&p);
        assert_eq!(states, 1 << tcp_state::ESTABLISHED);
        assert_eq!(
            terms,
            vec![
                (End::Local, 80, 81),
                (End::Local, 9000, 9000),
                (End::Remote, 5432, 5432),
                (End::Remote, 9000, 9000),
            ]
        );
        let (_, every) = dump_scope(&Policy::default_hung_states());
        assert!(every.is_empty(), "a rule on every port reads every port");
    }
}
