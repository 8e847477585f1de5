//! The events of one drain of the ring, taken in together. On a host that opens a
//! connection per request, most sockets the policy follows open and close within one
//! drain (the daemon drains every 50 ms while events flow): the engine would file each
//! under a deadline and take it out again a few events later. Taken as a batch, such a
//! socket is passed over, and the engine ends in the state event-at-a-time handling
//! would leave it in (the property tests compare the two).

use connwatch_common::{event_kind, ConnEvent};

use super::{trace_event, Engine};
use crate::conn::SockId;
use crate::track::{FastMap, Tracked};

/// What a batch does at one socket address (map key), traced through its events as
/// [`Engine::on_event`] would change the tracker there.
struct AtKey {
    /// No event there reaches past it: no socket of its events is tracked at another
    /// address (found by a dump) or seen at another address in the batch.
    apart: bool,
    /// The socket the tracker would hold there after the events so far.
    holder: Option<SockId>,
    /// The run of events under way there that began with nothing held, if one is.
    run: Option<u32>,
}

/// A batch's bookkeeping, kept between batches so that a busy host's drains do not
/// allocate it each time.
#[derive(Default)]
pub(super) struct Scratch {
    at: FastMap<u64, AtKey>,
    key_of: FastMap<SockId, u64>,
    /// Each event's run ([`NO_RUN`]: none).
    run_of: Vec<u32>,
    /// Each run: whether it ended with nothing held, no close in it handing a
    /// connection on to TIME_WAIT.
    passable: Vec<bool>,
}

const NO_RUN: u32 = u32::MAX;

impl Engine {
    /// Takes in events in the order the kernel sent them, as [`Engine::on_event`] on
    /// each would, except that a run of events at one address that begins and ends
    /// with nothing followed there (a socket that opened and closed, or went to a
    /// state no rule acts in, within the batch) is only counted: what the engine holds
    /// after it is what it held before it.
    ///
    /// Under a per-address limit every connection counts toward the others' limits
    /// while it is open, so each is taken in, however short its life.
    pub fn on_events(&mut self, evs: &[ConnEvent]) {
        if evs.len() < 2 || self.policy.has_per_ip_limits() {
            for ev in evs {
                self.on_event(ev);
            }
            return;
        }
        let mut sc = std::mem::take(&mut self.batch);
        sc.at.clear();
        sc.key_of.clear();
        sc.run_of.clear();
        sc.passable.clear();
        for ev in evs {
            let id = SockId::new(ev.info.netns, ev.info.cookie);
            let elsewhere = sc.key_of.insert(id, ev.key).filter(|k| *k != ev.key);
            let known_elsewhere = self.tracker.key_of(&id).is_some_and(|k| k != ev.key);
            let here = sc.at.entry(ev.key).or_insert_with(|| AtKey {
                apart: true,
                holder: self.tracker.get(ev.key).map(|t| t.id),
                run: None,
            });
            here.apart &= !known_elsewhere && elsewhere.is_none();
            if here.holder.is_none() && here.run.is_none() {
                here.run = Some(sc.passable.len() as u32);
                sc.passable.push(true);
            }
            if ev.kind == event_kind::CLOSED {
                if here.holder == Some(id) {
                    here.holder = None;
                }
            } else {
                if Tracked::takes(&ev.info) {
                    here.holder = Some(id);
                }
                if !self.follows(&ev.info) && here.holder == Some(id) {
                    here.holder = None;
                }
            }
            match here.run {
                Some(run) => {
                    sc.run_of.push(run);
                    if self.to_time_wait(ev) {
                        sc.passable[run as usize] = false;
                    }
                    if here.holder.is_none() {
                        here.run = None;
                    }
                }
                None => sc.run_of.push(NO_RUN),
            }
            if let Some(other) = elsewhere.and_then(|k| sc.at.get_mut(&k)) {
                other.apart = false;
            }
        }
        // A run still holding a socket at the end is taken in.
        for here in sc.at.values() {
            if let Some(run) = here.run {
                sc.passable[run as usize] = false;
            }
        }
        for (ev, run) in evs.iter().zip(&sc.run_of) {
            if *run != NO_RUN && sc.passable[*run as usize] && sc.at[&ev.key].apart {
                self.counters.events += 1;
                trace_event(ev);
            } else {
                self.on_event(ev);
            }
        }
        self.batch = sc;
    }
}

/// Everything the engine holds of the sockets it follows, in key order: what a batch
/// must leave as event-at-a-time handling does (the property tests).
#[cfg(test)]
pub(super) fn followed(e: &Engine) -> Vec<(u64, crate::track::Tracked, Option<u64>)> {
    let mut all: Vec<_> = e
        .tracker
        .iter()
        .map(|(k, t)| (k, t, e.deadlines.get(k)))
        .collect();
    all.sort_by_key(|(k, _, _)| *k);
    all
}

/// Splits `evs` into batches of the sizes in `sizes`, taken in turn (all at once if
/// there are none).
#[cfg(test)]
pub(super) fn batches<'a>(evs: &'a [ConnEvent], sizes: &[usize]) -> Vec<&'a [ConnEvent]> {
    let mut out = Vec::new();
    let mut rest = evs;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = sizes
            .next()
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        let (now, later) = rest.split_at(n);
        out.push(now);
        rest = later;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use connwatch_common::{tcp_state, ConnInfo};

    use super::*;
    use crate::conn::{TcpState, Tuple};
    use crate::policy::{Limit, Policy, Rule, Selector};
    use crate::testing::loopback_info;
    use crate::track::Seed;

    const NETNS: u32 = 4026531840;

    fn idle_policy() -> Policy {
        Policy {
            rules: vec![Rule {
                name: "idle".into(),
                selector: Selector::default(),
                limit: Limit::Idle(Duration::from_secs(60)),
            }],
            ..Policy::default()
        }
    }

    fn info(cookie: u64, state: u32, sport: u16) -> ConnInfo {
        loopback_info(NETNS, state, sport, cookie)
    }

    fn ev(key: u64, kind: u32, oldstate: u32, info: ConnInfo) -> ConnEvent {
        ConnEvent {
            key,
            kind,
            oldstate,
            info,
        }
    }

    /// Two engines, one fed a batch, one an event at a time; both filtered.
    fn both(evs: &[ConnEvent], prepare: impl Fn(&mut Engine)) -> (Engine, Engine) {
        let mut one = Engine::new(idle_policy(), false);
        let mut batched = Engine::new(idle_policy(), false);
        for e in [&mut one, &mut batched] {
            e.filtered();
            prepare(e);
        }
        for ev in evs {
            one.on_event(ev);
        }
        batched.on_events(evs);
        (one, batched)
    }

    /// A socket a dump found (tracked under a key of its own) whose first event
    /// leaves the states that matter: the engine forgets it, batch or not.
    #[test]
    fn a_socket_found_by_a_dump_is_forgotten_in_a_batch_too() {
        let found = info(7, tcp_state::FIN_WAIT1, 40000);
        let seed = |e: &mut Engine| {
            e.tracker.seed(Seed {
                id: SockId::new(NETNS, 7),
                tuple: Tuple::from_info(&found).unwrap(),
                state: TcpState::ESTABLISHED,
                ifindex: 0,
                seen_ns: 1,
                last_activity_ns: 0,
            });
        };
        let evs = [
            ev(0xa000, event_kind::STATE, tcp_state::ESTABLISHED, found),
            ev(
                0xb000,
                event_kind::OPENED,
                tcp_state::CLOSE,
                info(8, tcp_state::ESTABLISHED, 40001),
            ),
        ];
        let (one, batched) = both(&evs, seed);
        assert_eq!(one.tracker.len(), 1, "only the new socket is followed");
        assert_eq!(followed(&batched), followed(&one));
    }

    /// A socket that opens and closes within the batch is only counted; one opened
    /// in it and still open, and one followed before it that closes in it, are
    /// taken in.
    #[test]
    fn a_batch_passes_over_what_opens_and_closes_in_it() {
        let before = info(1, tcp_state::ESTABLISHED, 40000);
        let open = |e: &mut Engine| e.on_event(&ev(0xa000, event_kind::OPENED, 0, before));
        let short = info(2, tcp_state::ESTABLISHED, 40001);
        let mut short_closed = short;
        short_closed.state = tcp_state::CLOSE;
        let mut before_closed = before;
        before_closed.state = tcp_state::CLOSE;
        let evs = [
            ev(0xb000, event_kind::OPENED, tcp_state::CLOSE, short),
            ev(
                0xa000,
                event_kind::CLOSED,
                tcp_state::ESTABLISHED,
                before_closed,
            ),
            ev(
                0xb000,
                event_kind::CLOSED,
                tcp_state::ESTABLISHED,
                short_closed,
            ),
            // The address of the closed one, a new socket now.
            ev(
                0xa000,
                event_kind::OPENED,
                tcp_state::CLOSE,
                info(3, tcp_state::ESTABLISHED, 40002),
            ),
        ];
        let (one, batched) = both(&evs, open);
        assert_eq!(followed(&batched), followed(&one));
        let ids: Vec<u64> = followed(&batched)
            .iter()
            .map(|(_, t, _)| t.id.cookie)
            .collect();
        assert_eq!(ids, [3]);
        assert_eq!(batched.counters.events, one.counters.events);
        // Passed over: run the batch's own bookkeeping again and look.
        let runs = &batched.batch.passable;
        assert_eq!(
            runs,
            &[true, false],
            "the short socket's run passes, the new one's is open"
        );
    }

    /// Only a value with its final identity (a cookie) and a family a tuple is made of
    /// makes an entry: a run that sees another does not think it holds a socket.
    #[test]
    fn only_a_final_identity_of_a_known_family_makes_an_entry() {
        assert!(Tracked::takes(&info(5, tcp_state::ESTABLISHED, 40000)));
        let pending = info(0, tcp_state::SYN_RECV, 40000);
        assert!(!Tracked::takes(&pending));
        assert!(Tracked::from_info(&pending).is_none());
        let mut unknown = info(5, tcp_state::ESTABLISHED, 40000);
        unknown.family = 99;
        assert!(!Tracked::takes(&unknown));
        assert!(Tracked::from_info(&unknown).is_none());
    }
}
