//! Properties of the engine under lost, repeated and reloaded input: no kernel needed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::conn::{TcpState, Tuple};
use crate::engine::Engine;
use crate::kernel::sock_diag::DiagSocket;
use crate::policy::{Limit, Policy, Rule, Selector, Verdict};
use connwatch_common::{event_kind, tcp_state, ConnEvent, ConnInfo, AF_INET};
use proptest::prelude::*;

use crate::clock::SEC;

/// One socket's life: born, perhaps half-closed by its peer, perhaps closed.
#[derive(Clone, Debug)]
struct Life {
    born_s: u64,
    close_wait_after_s: Option<u64>,
    closed_after_s: Option<u64>,
}

fn key(i: usize) -> u64 {
    0xffff_8880_0000_0000 + (i as u64) * 0x1000
}

fn tuple(i: usize) -> Tuple {
    Tuple::new(
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 10_000 + i as u16),
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 8000 + (i % 3) as u16),
    )
}

fn info(i: usize, state: u32, born: u64, since: u64) -> ConnInfo {
    let t = tuple(i);
    let mut info = ConnInfo::zeroed();
    info.family = AF_INET;
    info.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    info.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    info.sport = t.local.port();
    info.dport = t.remote.port();
    info.birth_ns = born;
    info.seen_ns = born;
    info.state_since_ns = since;
    info.state = state;
    info
}

/// Every event of every life, in time order, and the sockets alive at the end.
fn events(lives: &[Life]) -> (Vec<ConnEvent>, Vec<DiagSocket>) {
    let mut evs: Vec<(u64, ConnEvent)> = Vec::new();
    let mut live = Vec::new();
    for (i, l) in lives.iter().enumerate() {
        let born = l.born_s * SEC;
        let ev = |kind, oldstate, info| ConnEvent {
            key: key(i),
            kind,
            oldstate,
            info,
        };
        evs.push((
            born,
            ev(
                event_kind::OPENED,
                tcp_state::CLOSE,
                info(i, tcp_state::ESTABLISHED, born, born),
            ),
        ));
        let mut state = tcp_state::ESTABLISHED;
        let mut since = born;
        if let Some(d) = l.close_wait_after_s {
            since = born + d * SEC;
            evs.push((
                since,
                ev(
                    event_kind::STATE,
                    state,
                    info(i, tcp_state::CLOSE_WAIT, born, since),
                ),
            ));
            state = tcp_state::CLOSE_WAIT;
        }
        match l.closed_after_s {
            Some(d) => {
                let at = since + d * SEC;
                evs.push((
                    at,
                    ev(
                        event_kind::CLOSED,
                        state,
                        info(i, tcp_state::CLOSE, born, at),
                    ),
                ));
            }
            None => live.push(DiagSocket {
                tuple: tuple(i),
                state: TcpState(state),
                cookie: [i as u8; 8],
                inode: i as u32 + 1,
                uid: 0,
                ifindex: 0,
                activity: None,
            }),
        }
    }
    evs.sort_by_key(|(at, e)| (*at, e.key));
    (evs.into_iter().map(|(_, e)| e).collect(), live)
}

fn arb_lives() -> impl Strategy<Value = Vec<Life>> {
    prop::collection::vec(
        (
            0u64..100,
            prop::option::of(1u64..50),
            prop::option::of(1u64..50),
        )
            .prop_map(|(born_s, close_wait_after_s, closed_after_s)| Life {
                born_s,
                close_wait_after_s,
                closed_after_s,
            }),
        0..40,
    )
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    let limit = prop_oneof![
        (1u64..200).prop_map(|s| Limit::MaxAge(Duration::from_secs(s))),
        (1u64..200).prop_map(|s| Limit::Idle(Duration::from_secs(s))),
        (1u64..200).prop_map(|s| Limit::StateTimeout(TcpState::CLOSE_WAIT, Duration::from_secs(s))),
        Just(Limit::Block),
    ];
    let rule = (limit, prop::option::of(8000u16..8003)).prop_map(|(limit, port)| Rule {
        name: limit.kind().into(),
        selector: Selector {
            remote_ports: port
                .map(|p| vec![crate::policy::PortRange { lo: p, hi: p }])
                .unwrap_or_default(),
            ..Selector::default()
        },
        limit,
    });
    prop::collection::vec(rule, 0..4).prop_map(|rules| Policy {
        rules,
        ..Policy::default()
    })
}

/// Every tracked socket, with the deadline the engine holds for it.
fn state(e: &Engine) -> Vec<(u64, String, Option<u64>)> {
    let mut v: Vec<_> = e
        .tracker
        .iter()
        .map(|(k, t)| (k, format!("{t:?}"), e.deadlines.get(k)))
        .collect();
    v.sort();
    v
}

/// The engine holds exactly the deadline the policy gives each tracked socket.
fn deadlines_follow_the_policy(e: &Engine) -> Result<(), TestCaseError> {
    for (k, t) in e.tracker.iter() {
        let want = match e.policy.verdict(&t.subject()) {
            Verdict::At { at_ns, .. } => Some(at_ns),
            Verdict::Never => None,
        };
        prop_assert_eq!(e.deadlines.get(k), want, "{:?}", t);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever events the ring lost, one reconcile with the kernel's dump leaves
    /// exactly the live sockets tracked, each with the deadline its policy gives.
    #[test]
    fn one_reconcile_repairs_any_loss(
        lives in arb_lives(),
        policy in arb_policy(),
        lost in prop::collection::vec(any::<bool>(), 200),
    ) {
        let (evs, live) = events(&lives);
        let mut e = Engine::new(policy, false);
        for (ev, lost) in evs.iter().zip(lost.iter().cycle()) {
            if !lost {
                e.on_event(ev);
            }
        }
        let now = 200 * SEC;
        let _ = e.reconcile(None, &live, now);
        let mut tracked: Vec<Tuple> = e.tracker.iter().map(|(_, t)| t.tuple).collect();
        let mut want: Vec<Tuple> = live.iter().map(|s| s.tuple).collect();
        tracked.sort_by_key(|t| t.local.port());
        want.sort_by_key(|t| t.local.port());
        prop_assert_eq!(tracked, want);
        deadlines_follow_the_policy(&e)?;
    }

    /// A policy reload keeps every socket and gives each the deadline a daemon
    /// started with the new policy would.
    #[test]
    fn a_reload_loses_no_deadline(
        lives in arb_lives(),
        before in arb_policy(),
        after in arb_policy(),
    ) {
        let (evs, _) = events(&lives);
        let mut reloaded = Engine::new(before, false);
        let mut fresh = Engine::new(after.clone(), false);
        for ev in &evs {
            reloaded.on_event(ev);
            fresh.on_event(ev);
        }
        reloaded.set_policy(after);
        prop_assert_eq!(state(&reloaded), state(&fresh));
        deadlines_follow_the_policy(&reloaded)?;
    }

    /// Events delivered twice (a ring read again after a crash) change nothing.
    #[test]
    fn repeated_events_change_nothing(
        lives in arb_lives(),
        policy in arb_policy(),
    ) {
        let (evs, _) = events(&lives);
        let mut once = Engine::new(policy.clone(), false);
        let mut twice = Engine::new(policy, false);
        for ev in &evs {
            once.on_event(ev);
        }
        for ev in evs.iter().chain(&evs) {
            twice.on_event(ev);
        }
        prop_assert_eq!(state(&once), state(&twice));
        deadlines_follow_the_policy(&once)?;
    }
}
