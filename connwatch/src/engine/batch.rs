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
    /// No event there reaches past it: nothing was tracked there before the batch, no
    /// socket of its events is tracked elsewhere (found by a dump) or seen at another
    /// address in the batch, and no close hands a connection on to TIME_WAIT.
    apart: bool,
    /// The socket the tracker would hold there after the events so far.
    holder: Option<SockId>,
}

impl Engine {
    /// Takes in events in the order the kernel sent them, as [`Engine::on_event`] on
    /// each would, except that the events at an address the engine knows nothing of,
    /// after which it would follow nothing there (the socket closed, or went to a state
    /// no rule acts in), are only counted.
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
        let mut at: FastMap<u64, AtKey> = FastMap::default();
        let mut key_of: FastMap<SockId, u64> = FastMap::default();
        at.reserve(evs.len());
        key_of.reserve(evs.len());
        for ev in evs {
            let id = SockId::new(ev.info.netns, ev.info.cookie);
            let elsewhere = key_of.insert(id, ev.key).filter(|k| *k != ev.key);
            let known = self.tracker.key_of(&id).is_some();
            let to_time_wait = self.to_time_wait(ev);
            let here = at.entry(ev.key).or_insert_with(|| AtKey {
                apart: self.tracker.get(ev.key).is_none(),
                holder: None,
            });
            here.apart &= !known && elsewhere.is_none() && !to_time_wait;
            if ev.kind == event_kind::CLOSED {
                if here.holder == Some(id) {
                    here.holder = None;
                }
            } else {
                if Tracked::from_info(&ev.info).is_some() {
                    here.holder = Some(id);
                }
                if !self.follows(&ev.info) && here.holder == Some(id) {
                    here.holder = None;
                }
            }
            if let Some(other) = elsewhere.and_then(|k| at.get_mut(&k)) {
                other.apart = false;
            }
        }
        for ev in evs {
            let here = &at[&ev.key];
            if here.apart && here.holder.is_none() {
                self.counters.events += 1;
                trace_event(ev);
            } else {
                self.on_event(ev);
            }
        }
    }
}

/// Everything the engine holds of the sockets it follows, in key order: what a batch
/// must leave as event-at-a-time handling does (the property tests).
#[cfg(test)]
pub(super) fn followed(e: &Engine) -> Vec<(u64, crate::track::Tracked, Option<u64>)> {
    let mut all: Vec<_> = e
        .tracker
        .iter()
        .map(|(k, t)| (k, *t, e.deadlines.get(k)))
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
