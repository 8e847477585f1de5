//! Properties of the engine under lost, repeated and reloaded input: no kernel needed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use std::collections::HashSet;

use crate::conn::{cookie_from_diag, Birth, SockId, TcpState, Tuple};
use crate::engine::Engine;
use crate::kernel::netns::Dump;
use crate::kernel::sock_diag::DiagSocket;
use crate::policy::{Limit, Policy, Rule, Selector, Verdict};
use crate::testing::diag_socket;
use connwatch_common::{event_kind, tcp_state, ConnEvent, ConnInfo, AF_INET, AF_INET6};
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

/// How many network namespaces the lives are spread over.
const NAMESPACES: usize = 3;

/// Life `i` lives in namespace `i % NAMESPACES`: lives `3k`, `3k+1` and `3k+2` are
/// twins, the same tuple in three namespaces.
fn netns(i: usize) -> u32 {
    4026531840 + (i % NAMESPACES) as u32
}

fn id(i: usize) -> SockId {
    SockId::new(netns(i), 1000 + i as u64)
}

/// The address of twin group `j`: IPv4, IPv6, or IPv4-mapped (a dual-stack socket
/// talking IPv4), so that the tracker's packed and whole records are both exercised.
fn ip(j: usize) -> IpAddr {
    match j % 3 {
        0 => IpAddr::from([127, 0, 0, 1]),
        1 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
    }
}

fn tuple(i: usize) -> Tuple {
    let j = i / NAMESPACES;
    Tuple::new(
        SocketAddr::new(ip(j), 10_000 + j as u16),
        SocketAddr::new(ip(j), 8000 + (j % 3) as u16),
    )
}

fn info(i: usize, state: u32, born: u64, since: u64) -> ConnInfo {
    let t = tuple(i);
    let mut info = ConnInfo::zeroed();
    match t.local.ip() {
        IpAddr::V4(v4) => {
            info.family = AF_INET;
            info.saddr[..4].copy_from_slice(&v4.octets());
            info.daddr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            info.family = AF_INET6;
            info.saddr = v6.octets();
            info.daddr = v6.octets();
        }
    }
    info.sport = t.local.port();
    info.dport = t.remote.port();
    info.birth_ns = born;
    info.seen_ns = born;
    info.state_since_ns = since;
    info.state = state;
    info.netns = netns(i);
    info.cookie = id(i).cookie;
    info
}

/// Every event of every life, in time order, and the sockets alive at the end.
fn events(lives: &[Life]) -> (Vec<ConnEvent>, Dump) {
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
            None => live.push((
                netns(i),
                DiagSocket {
                    inode: i as u32 + 1,
                    ..diag_socket(tuple(i), TcpState(state), id(i).cookie)
                },
            )),
        }
    }
    evs.sort_by_key(|(at, e)| (*at, e.key));
    let all: HashSet<u32> = (0..NAMESPACES).map(netns).collect();
    let dump = Dump {
        sockets: live,
        dumped: all.clone(),
        existing: all,
        failed: Vec::new(),
    };
    (evs.into_iter().map(|(_, e)| e).collect(), dump)
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

/// How many lives are still open at the end.
fn before_len(lives: &[Life]) -> usize {
    lives.iter().filter(|l| l.closed_after_s.is_none()).count()
}

/// The life a map key belongs to.
fn lives_index(key: u64) -> usize {
    ((key - 0xffff_8880_0000_0000) / 0x1000) as usize
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
        let want = match e.policy.verdict(&e.subject(&t)) {
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
        let mut tracked: Vec<(SockId, Tuple)> =
            e.tracker.iter().map(|(_, t)| (t.id, t.tuple)).collect();
        let mut want: Vec<(SockId, Tuple)> = live
            .sockets
            .iter()
            .map(|(ns, s)| (SockId::new(*ns, cookie_from_diag(s.cookie)), s.tuple))
            .collect();

        want.sort_by_key(|(id, _)| *id);
        tracked.sort_by_key(|(id, _)| *id);
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

    /// Twins (the same tuple in other namespaces, born and closed at other times)
    /// never stand in for each other: each tracked socket is its own life's, with its
    /// own birth and state, and a namespace's dump never removes another's sockets.
    #[test]
    fn twins_never_stand_in_for_each_other(
        lives in arb_lives(),
        policy in arb_policy(),
    ) {
        let (evs, mut live) = events(&lives);
        let mut e = Engine::new(policy, false);
        for ev in &evs {
            e.on_event(ev);
        }
        let check = |e: &Engine| -> Result<(), TestCaseError> {
            for (k, t) in e.tracker.iter() {
                let i = lives_index(k);
                prop_assert_eq!(t.id, id(i));
                prop_assert_eq!(t.tuple, tuple(i));
                prop_assert_eq!(t.birth, Birth::Known(lives[i].born_s * SEC));
                prop_assert_eq!(e.tracker.key_of(&t.id), Some(k));
            }
            Ok(())
        };
        check(&e)?;
        deadlines_follow_the_policy(&e)?;
        // Known from dumps alone: one namespace could not be dumped the second time;
        // its sockets stay, and the others' dumps remove none of them.
        let mut seeded = Engine::new(e.policy.clone(), false);
        let _ = seeded.reconcile(None, &live, 200 * SEC);
        let spared = netns(1);
        live.dumped.remove(&spared);
        live.sockets.retain(|(ns, _)| *ns != spared);
        let before: Vec<(SockId, Tuple)> =
            seeded.tracker.iter().map(|(_, t)| (t.id, t.tuple)).collect();
        let _ = seeded.reconcile(None, &live, 201 * SEC);
        for (id, tuple) in before {
            let k = seeded.tracker.key_of(&id);
            prop_assert!(k.is_some(), "{} was dropped", id);
            prop_assert_eq!(seeded.tracker.get(k.unwrap()).map(|t| t.tuple), Some(tuple));
        }
        prop_assert_eq!(seeded.tracker.len(), before_len(&lives));
        deadlines_follow_the_policy(&seeded)?;
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

/// The event filter: a richer life than above, as the kernel reports it (born in
/// SYN_SENT or SYN_RECV, established, then one of the ways a connection ends), over
/// ports that rules may or may not select.
mod filtered {
    use super::*;
    use crate::engine::batch::{batches, followed};
    use crate::engine::filter_of;
    use crate::policy::PortRange;
    use connwatch_common::{sends, Filter};
    use std::collections::BTreeMap;

    /// How a connection ends, if it does.
    #[derive(Clone, Copy, Debug)]
    enum End {
        /// Still established.
        Open,
        /// Its peer closed: CLOSE_WAIT, perhaps then LAST_ACK, perhaps closed.
        Passive { last_ack: bool, closed: bool },
        /// It closed: FIN_WAIT1, perhaps FIN_WAIT2, perhaps TIME_WAIT (leaves the map).
        Active { fin_wait2: bool, closed: bool },
        /// Reset while established.
        Reset,
    }

    #[derive(Clone, Debug)]
    struct Life {
        born_s: u64,
        inbound: bool,
        lport: u16,
        rport: u16,
        remote: u8,
        steps_s: [u64; 3],
        end: End,
    }

    fn arb_life() -> impl Strategy<Value = Life> {
        let end = prop_oneof![
            Just(End::Open),
            (any::<bool>(), any::<bool>())
                .prop_map(|(last_ack, closed)| End::Passive { last_ack, closed }),
            (any::<bool>(), any::<bool>())
                .prop_map(|(fin_wait2, closed)| End::Active { fin_wait2, closed }),
            Just(End::Reset),
        ];
        (
            0u64..100,
            any::<bool>(),
            8000u16..8004,
            40000u16..40004,
            0u8..3,
            [1u64..40, 1u64..40, 1u64..40],
            end,
        )
            .prop_map(
                |(born_s, inbound, lport, rport, remote, steps_s, end)| Life {
                    born_s,
                    inbound,
                    lport,
                    rport,
                    remote,
                    steps_s,
                    end,
                },
            )
    }

    fn ports() -> impl Strategy<Value = Vec<PortRange>> {
        prop::collection::vec(
            prop_oneof![
                (8000u16..8005).prop_map(|p| PortRange { lo: p, hi: p }),
                (40000u16..40005).prop_map(|p| PortRange { lo: p, hi: p + 1 }),
            ],
            0..2,
        )
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        let limit = prop_oneof![
            (1u64..200).prop_map(|s| Limit::MaxAge(Duration::from_secs(s))),
            (1u64..200).prop_map(|s| Limit::Idle(Duration::from_secs(s))),
            (0usize..6, 1u64..200).prop_map(|(i, s)| Limit::StateTimeout(
                crate::policy::TIMEOUT_STATES[i],
                Duration::from_secs(s)
            )),
            Just(Limit::Block),
            (1u32..3).prop_map(Limit::MaxConnsPerIp),
        ];
        let rule = (limit, ports(), ports(), ports()).prop_map(
            |(limit, ports, local_ports, remote_ports)| Rule {
                name: limit.kind().into(),
                selector: Selector {
                    ports,
                    local_ports,
                    remote_ports,
                    ..Selector::default()
                },
                limit,
            },
        );
        prop::collection::vec(rule, 0..4).prop_map(|rules| Policy {
            rules,
            ..Policy::default()
        })
    }

    fn life_info(i: usize, l: &Life, state: u32, since: u64) -> ConnInfo {
        let mut info = ConnInfo::zeroed();
        info.family = AF_INET;
        info.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        info.daddr[..4].copy_from_slice(&[10, 0, 0, l.remote]);
        // The local port is 0 until the connection is established (SYN_SENT).
        info.sport = if state == tcp_state::SYN_SENT {
            0
        } else {
            l.lport
        };
        info.dport = l.rport;
        info.birth_ns = l.born_s * SEC;
        info.seen_ns = l.born_s * SEC;
        info.state_since_ns = since;
        info.state = state;
        info.netns = netns(i);
        info.cookie = id(i).cookie;
        info
    }

    /// Every event of every life in time order, as the kernel program sees them.
    fn events(lives: &[Life]) -> Vec<ConnEvent> {
        let mut evs: Vec<(u64, ConnEvent)> = Vec::new();
        for (i, l) in lives.iter().enumerate() {
            let mut at = l.born_s * SEC;
            let first = if l.inbound {
                tcp_state::SYN_RECV
            } else {
                tcp_state::SYN_SENT
            };
            let mut states = vec![first, tcp_state::ESTABLISHED];
            match l.end {
                End::Open => {}
                End::Reset => states.push(tcp_state::CLOSE),
                End::Passive { last_ack, closed } => {
                    states.push(tcp_state::CLOSE_WAIT);
                    if last_ack {
                        states.push(tcp_state::LAST_ACK);
                    }
                    if closed {
                        states.push(tcp_state::CLOSE);
                    }
                }
                End::Active { fin_wait2, closed } => {
                    states.push(tcp_state::FIN_WAIT1);
                    if fin_wait2 {
                        states.push(tcp_state::FIN_WAIT2);
                    }
                    if closed {
                        states.push(tcp_state::CLOSE);
                    }
                }
            }
            let mut old = tcp_state::CLOSE;
            for (n, st) in states.into_iter().enumerate() {
                if n > 0 {
                    at += l.steps_s[(n - 1).min(2)] * SEC;
                }
                let kind = match (n, st) {
                    (0, _) => event_kind::OPENED,
                    (_, tcp_state::CLOSE) => event_kind::CLOSED,
                    _ => event_kind::STATE,
                };
                evs.push((
                    at,
                    ConnEvent {
                        key: key(i),
                        kind,
                        oldstate: old,
                        info: life_info(i, l, st, at),
                    },
                ));
                old = st;
            }
        }
        evs.sort_by_key(|(at, e)| (*at, e.key));
        evs.into_iter().map(|(_, e)| e).collect()
    }

    /// What the kernel program sends under `f`, exactly as it decides.
    fn sent(evs: &[ConnEvent], f: &Filter) -> Vec<ConnEvent> {
        evs.iter()
            .filter(|e| {
                sends(
                    f,
                    e.kind,
                    e.oldstate,
                    e.info.state,
                    e.info.sport,
                    e.info.dport,
                )
            })
            .copied()
            .collect()
    }

    /// Each socket's deadline and the rule due at it, by identity.
    fn decisions(e: &Engine) -> BTreeMap<SockId, (u64, Option<String>)> {
        e.tracker
            .iter()
            .filter_map(|(k, t)| {
                let at = e.deadlines.get(k)?;
                let rule = e.due_rule(k, at).map(|r| e.policy.rule(r).name.clone());
                Some((t.id, (at, rule)))
            })
            .collect()
    }

    /// The map at the end: the last entry of each life still in it.
    fn map_of(evs: &[ConnEvent]) -> Vec<(u64, ConnInfo)> {
        let mut m: BTreeMap<u64, ConnInfo> = BTreeMap::new();
        for e in evs {
            if e.kind == event_kind::CLOSED {
                m.remove(&e.key);
            } else {
                m.insert(e.key, e.info);
            }
        }
        m.into_iter().collect()
    }

    fn dump_of(map: &[(u64, ConnInfo)]) -> Dump {
        let all: HashSet<u32> = (0..NAMESPACES).map(netns).collect();
        Dump {
            sockets: map
                .iter()
                .map(|(_, info)| {
                    (
                        info.netns,
                        diag_socket(
                            Tuple::from_info(info).unwrap(),
                            TcpState(info.state),
                            info.cookie,
                        ),
                    )
                })
                .collect(),
            dumped: all.clone(),
            existing: all,
            failed: Vec::new(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// An engine fed only what the kernel's filter lets through makes exactly
        /// the decisions of one fed every event, after every event: the same
        /// deadline for every socket, under the same rule.
        #[test]
        fn the_filter_changes_no_decision(
            lives in prop::collection::vec(arb_life(), 0..30),
            policy in arb_policy(),
        ) {
            let evs = events(&lives);
            let f = filter_of(&policy);
            let mut all = Engine::new(policy.clone(), false);
            let mut some = Engine::new(policy, false);
            some.filtered();
            for ev in &evs {
                all.on_event(ev);
                if sends(&f, ev.kind, ev.oldstate, ev.info.state, ev.info.sport, ev.info.dport) {
                    some.on_event(ev);
                }
                prop_assert_eq!(decisions(&some), decisions(&all), "after {:?}", ev);
            }
            // The filtered engine follows nothing the filter says cannot matter.
            for (_, t) in some.tracker.iter() {
                prop_assert!(t.source != crate::track::Source::Map
                    || connwatch_common::matters(&f, t.state.0, t.tuple.local.port(), t.tuple.remote.port()));
            }
        }

        /// A filtered engine fed the daemon's batches (each drain of the ring at once,
        /// sockets that come and go within one passed over, sockets that leave the
        /// states that matter forgotten) follows, after every batch, the sockets one
        /// fed an event at a time follows, with the same deadlines.
        #[test]
        fn batches_leave_what_single_events_leave(
            lives in prop::collection::vec(arb_life(), 0..30),
            policy in arb_policy(),
            sizes in prop::collection::vec(1usize..16, 0..8),
        ) {
            let evs = sent(&events(&lives), &filter_of(&policy));
            let mut one = Engine::new(policy.clone(), false);
            let mut batched = Engine::new(policy, false);
            one.filtered();
            batched.filtered();
            for batch in batches(&evs, &sizes) {
                for ev in batch {
                    one.on_event(ev);
                }
                batched.on_events(batch);
                prop_assert_eq!(followed(&batched), followed(&one));
                prop_assert_eq!(decisions(&batched), decisions(&one));
            }
        }

        /// A reload, then one reconcile with the map, leaves a filtered engine with
        /// the decisions of an unfiltered one reloaded the same way: a policy that
        /// widens picks up the sockets nothing sent before, one that narrows forgets.
        #[test]
        fn a_reload_then_the_map_catches_up(
            lives in prop::collection::vec(arb_life(), 0..30),
            before in arb_policy(),
            after in arb_policy(),
        ) {
            let evs = events(&lives);
            let mut all = Engine::new(before.clone(), false);
            let mut some = Engine::new(before.clone(), false);
            some.filtered();
            let _ = some.reconcile_with(std::iter::empty(), &dump_of(&[]), 0);
            for ev in sent(&evs, &filter_of(&before)) {
                some.on_event(&ev);
            }
            for ev in &evs {
                all.on_event(ev);
            }
            all.set_policy(after.clone());
            some.set_policy(after.clone());
            let map = map_of(&evs);
            let _ = some.reconcile_with(map.iter().copied(), &dump_of(&map), 1000 * SEC);
            // Sockets in the map (TIME_WAIT ones live only in the engine that followed
            // them when they closed).
            let in_map: HashSet<SockId> = map
                .iter()
                .map(|(_, i)| SockId::new(i.netns, i.cookie))
                .collect();
            let mut want = decisions(&all);
            want.retain(|id, _| in_map.contains(id));
            let mut got = decisions(&some);
            got.retain(|id, _| in_map.contains(id));
            prop_assert_eq!(got, want);
        }
    }
}
