//! Bringing the tracker and the map in line with the kernel's socket table: at
//! start-up and after the kernel reports dropped records.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::per_ip::PerIp;
use super::{ms, Engine};
use crate::conn::{cookie_from_diag, Birth, SockId, TcpState};
use crate::kernel::netns::Dump;
use crate::kernel::ConnMap;
use crate::policy::Policy;
use crate::track::{Seed, Source, Tracked};
use connwatch_common::ConnInfo;

/// How long an accepted child may wait for its identity (`ConnInfo::identity_pending`):
/// longer than any handshake lasts (SYN-ACKs are retried for about three minutes at
/// most with Linux's defaults).
const PENDING_FOR_NS: u64 = 10 * 60 * 1_000_000_000;

#[derive(Default, Debug)]
pub struct Reconciled {
    pub from_map: usize,
    pub seeded: usize,
    pub stale: usize,
    /// Sockets the dump found that the kernel map would hold (every state but
    /// TIME_WAIT, which lives outside it), all namespaces together.
    pub sockets: usize,
    /// Sockets seeded with a first sighting an earlier start kept.
    pub seen_before: usize,
    /// First sightings [`Engine::first_seen`] learned or lowered: to be kept.
    pub first_seen_set: Vec<(SockId, u64)>,
    /// First sightings of sockets now gone: to be forgotten.
    pub first_seen_gone: Vec<SockId>,
}

/// When the daemon reconciles after the kernel reports dropped records. The first
/// stats tick that shows a loss reconciles at once; while every tick shows more (a
/// full connection map fails again at each state change of a socket it could not
/// hold), the next reconcile waits twice as long as the last wait, up to `max`; a
/// tick with no loss brings it back to `base`. A full map thus costs a dump and a map
/// walk every `max` at most, not at every tick.
#[derive(Debug)]
pub struct Pace {
    base: Duration,
    max: Duration,
    /// Reconciles since the last tick without loss.
    streak: u32,
    next: Option<Instant>,
}

impl Pace {
    pub fn new(base: Duration, max: Duration) -> Pace {
        Pace {
            base,
            max,
            streak: 0,
            next: None,
        }
    }

    /// Whether a tick at `now` that saw a loss reconciles (else it is put off).
    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|next| now >= next)
    }

    /// A reconcile ran at `now`: the next one waits longer if losses go on.
    pub fn reconciled(&mut self, now: Instant) {
        self.streak = self.streak.saturating_add(1);
        self.next = Some(now + self.every());
    }

    /// A tick without loss: the next loss is reconciled at once.
    pub fn quiet(&mut self) {
        self.streak = 0;
        self.next = None;
    }

    /// How long after the last reconcile the next one may come.
    pub fn every(&self) -> Duration {
        let doublings = self.streak.saturating_sub(1).min(16);
        (self.base * (1u32 << doublings)).min(self.max)
    }
}

/// The `--max-conns` to suggest when the connection map is full: the next power of
/// two above twice the sockets it must hold, and at least twice its size now.
pub fn suggested_max_conns(sockets: usize, capacity: u32) -> u32 {
    let want = (sockets.saturating_mul(2) as u64).next_power_of_two();
    want.max(u64::from(capacity) * 2)
        .min(u64::from(u32::MAX / 2 + 1)) as u32
}

impl Engine {
    /// Brings the tracker and the map in line with the kernel's socket tables: drops
    /// entries of sockets that are gone, and seeds sockets nothing recorded. Each
    /// socket is judged by its own namespace's dump: a namespace that could not be
    /// dumped loses nothing, one that no longer exists loses everything.
    ///
    /// Returns the keys of stale map entries: the caller that owns the map removes them.
    pub fn reconcile(
        &mut self,
        conns: Option<&ConnMap>,
        dump: &Dump,
        now: u64,
    ) -> (Reconciled, Vec<u64>) {
        let entries = conns.map(ConnMap::entries).unwrap_or_default();
        self.reconcile_with(entries.into_iter(), dump, now)
    }

    /// [`Engine::reconcile`] with the map's entries given.
    pub fn reconcile_with(
        &mut self,
        entries: impl Iterator<Item = (u64, ConnInfo)>,
        dump: &Dump,
        now: u64,
    ) -> (Reconciled, Vec<u64>) {
        let mut done = Reconciled {
            sockets: dump
                .sockets
                .iter()
                .filter(|(_, s)| s.state != TcpState::TIME_WAIT)
                .count(),
            ..Reconciled::default()
        };
        let live: HashMap<SockId, TcpState> = dump
            .sockets
            .iter()
            .map(|(ns, s)| (SockId::new(*ns, cookie_from_diag(s.cookie)), s.state))
            .collect();
        // Whether a socket is known to be gone: its namespace was dumped without it (or
        // with it in another state than TIME_WAIT, for a TIME_WAIT socket followed, and
        // the reverse), or the namespace itself is gone.
        let gone = |id: &SockId, time_wait: bool| {
            if dump.dumped.contains(&id.netns) {
                match live.get(id) {
                    None => true,
                    Some(s) => (*s == TcpState::TIME_WAIT) != time_wait,
                }
            } else {
                !dump.existing.contains(&id.netns)
            }
        };
        let mut in_map = HashSet::new();
        // Every socket the map holds, followed or not: none is seeded from the dump.
        let mut map_ids = HashSet::new();
        let mut stale_keys = Vec::new();
        for (key, info) in entries {
            if info.identity_pending() {
                // An accepted child whose next change has not come yet: a moment on a
                // loopback, a round trip or a few lost handshakes (Fast Open) elsewhere.
                // One still waiting long after no child stays in SYN_RECV is a dead
                // socket's whose close went unseen.
                if info.seen_ns.saturating_add(PENDING_FOR_NS) < now {
                    stale_keys.push(key);
                }
                continue;
            }
            let Some(mut t) = Tracked::from_info(&info) else {
                continue;
            };
            // Seen first by an earlier start's dump, then by the kernel program: the
            // earlier sighting bounds its age.
            if let (Birth::Unknown { seen_ns }, Some(first)) = (t.birth, self.first_seen.get(&t.id))
            {
                t.birth = Birth::Unknown {
                    seen_ns: seen_ns.min(*first),
                };
            }
            // An entry whose socket is not in its namespace's dump died while no
            // program watched, unless it was made after the dump began; so did one
            // now in TIME_WAIT, a state the map never holds.
            if info.seen_ns < now && gone(&t.id, false) {
                stale_keys.push(key);
                continue;
            }
            map_ids.insert(t.id);
            // Filtered, only what can matter is followed; the map holds the rest.
            if !self.follows(&info) {
                continue;
            }
            in_map.insert(key);
            if !self.tracker.refresh(key, &info) {
                self.tracker.upsert(key, t);
            }
            done.from_map += 1;
        }
        done.stale = stale_keys.len();
        let lost: Vec<u64> = self
            .tracker
            .iter()
            .filter(|(k, t)| match t.source {
                Source::Map => !in_map.contains(k),
                Source::Seeded => gone(&t.id, false),
                Source::TimeWait => gone(&t.id, true),
            })
            .map(|(k, _)| k)
            .collect();
        for key in lost {
            self.tracker.remove(key);
        }
        // The dump's tcp_info says when data last moved: the kernel program does not
        // watch data at all.
        for (netns, s) in &dump.sockets {
            let Some(a) = s.activity else { continue };
            let id = SockId::new(*netns, cookie_from_diag(s.cookie));
            if let Some(key) = self.tracker.key_of(&id) {
                self.tracker
                    .note_activity(key, now.saturating_sub(ms(a.quiet_ms())));
            }
        }
        let time_wait_limited = self.policy.limits_state(TcpState::TIME_WAIT);
        for (netns, s) in &dump.sockets {
            if !Policy::actionable(s.state)
                || (s.state == TcpState::TIME_WAIT && !time_wait_limited)
            {
                continue;
            }
            if map_ids.contains(&SockId::new(*netns, cookie_from_diag(s.cookie))) {
                continue;
            }
            // tcp_info's data timers start at the connection's establishment, so the
            // larger is a lower bound on its age, the smaller on its quiet time.
            let (born_by, active_at) = match s.activity {
                Some(a) => (
                    now.saturating_sub(ms(a.last_data_sent_ms.max(a.last_data_recv_ms))),
                    now.saturating_sub(ms(a.quiet_ms())),
                ),
                None => (now, 0),
            };
            let id = SockId::new(*netns, cookie_from_diag(s.cookie));
            // First seen by this dump, or earlier (by an earlier start): kept, so a
            // restart does not push its age bound back.
            let mut before = false;
            let seen_ns = match self.first_seen.get(&id) {
                Some(first) if *first <= born_by => {
                    before = true;
                    *first
                }
                _ => {
                    self.first_seen.insert(id, born_by);
                    done.first_seen_set.push((id, born_by));
                    born_by
                }
            };
            let seed = Seed {
                id,
                tuple: s.tuple,
                state: s.state,
                ifindex: s.ifindex,
                seen_ns,
                last_activity_ns: active_at,
            };
            if self.tracker.seed(seed).is_some() {
                done.seeded += 1;
                done.seen_before += usize::from(before);
            }
        }
        // The first sightings of sockets gone (their namespace dumped without them, or
        // gone itself) are forgotten.
        let first_gone: Vec<SockId> = self
            .first_seen
            .keys()
            .filter(|id| {
                if dump.dumped.contains(&id.netns) {
                    !live.contains_key(id)
                } else {
                    !dump.existing.contains(&id.netns)
                }
            })
            .copied()
            .collect();
        for id in &first_gone {
            self.first_seen.remove(id);
        }
        done.first_seen_gone = first_gone;
        self.per_ip = PerIp::default();
        self.replan_all();
        (done, stale_keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SEC;
    use crate::conn::Tuple;
    use crate::kernel::sock_diag::{DiagSocket, TcpActivity};
    use crate::testing::diag_socket;
    use connwatch_common::{tcp_state, AF_INET, FLAG_INBOUND};
    use std::net::{IpAddr, SocketAddr};

    const HOST: u32 = 4026531840;

    /// A dump of the host alone holding these established sockets, each with data
    /// sent `quiet_ms` ago.
    fn dump(socks: &[(u64, u16, u32)]) -> Dump {
        let sockets = socks
            .iter()
            .map(|(cookie, port, quiet_ms)| {
                let tuple = Tuple::new(
                    format!("127.0.0.1:{port}").parse().unwrap(),
                    "127.0.0.1:8080".parse().unwrap(),
                );
                let activity = TcpActivity {
                    last_data_sent_ms: *quiet_ms,
                    last_data_recv_ms: *quiet_ms,
                };
                let s = DiagSocket {
                    activity: Some(activity),
                    ..diag_socket(tuple, TcpState::ESTABLISHED, *cookie)
                };
                (HOST, s)
            })
            .collect();
        let host: HashSet<u32> = [HOST].into();
        Dump {
            sockets,
            dumped: host.clone(),
            existing: host,
            failed: Vec::new(),
        }
    }

    #[test]
    fn a_first_sighting_kept_from_an_earlier_start_bounds_the_age() {
        let mut e = Engine::new(Policy::default_hung_states(), false);
        // Kept by an earlier start: socket 7 first seen at 100 s, socket 8 (gone since)
        // at 50 s.
        e.first_seen = [
            (SockId::new(HOST, 7), 100 * SEC),
            (SockId::new(HOST, 8), 50 * SEC),
        ]
        .into_iter()
        .collect();
        // Now, at 300 s, a dump finds 7 (data moved 1 s ago) and 9 (new to connwatch).
        let (done, _) = e.reconcile_with(
            std::iter::empty(),
            &dump(&[(7, 40000, 1000), (9, 40001, 5000)]),
            300 * SEC,
        );
        assert_eq!((done.seeded, done.seen_before), (2, 1));
        let birth = |cookie| {
            let key = e.tracker.key_of(&SockId::new(HOST, cookie)).unwrap();
            e.tracker.get(key).unwrap().birth
        };
        assert_eq!(birth(7), Birth::Unknown { seen_ns: 100 * SEC });
        assert_eq!(birth(9), Birth::Unknown { seen_ns: 295 * SEC });
        assert_eq!(done.first_seen_set, vec![(SockId::new(HOST, 9), 295 * SEC)]);
        assert_eq!(done.first_seen_gone, vec![SockId::new(HOST, 8)]);
        let mut kept: Vec<_> = e
            .first_seen
            .iter()
            .map(|(id, at)| (id.cookie, *at))
            .collect();
        kept.sort();
        assert_eq!(kept, vec![(7, 100 * SEC), (9, 295 * SEC)]);
        // The kernel program sees 7 change state later: the map's entry says first seen
        // then, the kept sighting is earlier and stands.
        let mut info = connwatch_common::ConnInfo::zeroed();
        info.family = connwatch_common::AF_INET;
        info.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        info.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        info.sport = 40000;
        info.dport = 8080;
        info.state = connwatch_common::tcp_state::CLOSE_WAIT;
        info.flags = connwatch_common::FLAG_BIRTH_UNKNOWN;
        info.seen_ns = 310 * SEC;
        info.netns = HOST;
        info.cookie = 7;
        let mut fresh = Engine::new(Policy::default_hung_states(), false);
        fresh.first_seen = e.first_seen.clone();
        let mut d = dump(&[(7, 40000, 1000)]);
        d.sockets[0].1.state = TcpState::CLOSE_WAIT;
        let _ = fresh.reconcile_with([(0xffff_8880_0000_1000, info)].into_iter(), &d, 320 * SEC);
        assert_eq!(
            fresh.tracker.get(0xffff_8880_0000_1000).unwrap().birth,
            Birth::Unknown { seen_ns: 100 * SEC }
        );
    }

    #[test]
    fn losses_that_go_on_are_reconciled_less_and_less_often() {
        let base = Duration::from_secs(2);
        let mut p = Pace::new(base, Duration::from_secs(64));
        let t0 = Instant::now();
        assert!(p.due(t0));
        // A tick every 2 s, each with a loss: reconciles at 0, 2, 6, 14, 30, 62, 126 s.
        let mut at = Vec::new();
        for tick in 0..80u64 {
            let now = t0 + base * tick as u32;
            if p.due(now) {
                p.reconciled(now);
                at.push(tick * 2);
            }
        }
        assert_eq!(at, vec![0, 2, 6, 14, 30, 62, 126]);
        assert_eq!(p.every(), Duration::from_secs(64), "bounded");
        // One tick without loss: the next loss is reconciled at once.
        p.quiet();
        assert!(p.due(t0 + base * 81));
        p.reconciled(t0 + base * 81);
        assert_eq!(p.every(), base);
    }

    #[test]
    fn the_suggested_size_holds_twice_the_sockets() {
        assert_eq!(suggested_max_conns(600, 64), 2048);
        assert_eq!(suggested_max_conns(512, 64), 1024);
        assert_eq!(suggested_max_conns(10, 64), 128, "at least twice the map");
        assert_eq!(suggested_max_conns(0, 262_144), 524_288);
        assert_eq!(suggested_max_conns(usize::MAX / 4, 64), 1 << 31);
    }

    /// An accepted child's entry as a kernel before 6.15 makes it at the birth: the
    /// listener's tuple, no peer, no cookie.
    fn pending(born: u64) -> ConnInfo {
        let mut i = ConnInfo::zeroed();
        i.family = AF_INET;
        i.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        i.sport = 8080;
        i.state = tcp_state::SYN_RECV;
        i.flags = FLAG_INBOUND;
        i.birth_ns = born;
        i.seen_ns = born;
        i.state_since_ns = born;
        i.netns = HOST;
        i
    }

    fn dump_with(cookie: u64) -> Dump {
        let lo = IpAddr::from([127, 0, 0, 1]);
        Dump {
            sockets: vec![(
                HOST,
                diag_socket(
                    Tuple::new(SocketAddr::new(lo, 8080), SocketAddr::new(lo, 40000)),
                    TcpState::ESTABLISHED,
                    cookie,
                ),
            )],
            dumped: HashSet::from([HOST]),
            existing: HashSet::from([HOST]),
            failed: Vec::new(),
        }
    }

    #[test]
    fn an_entry_waiting_for_its_identity_is_neither_a_socket_nor_stale_until_long_after() {
        let mut e = Engine::new(Policy::default(), false);
        let now = 1000 * SEC;
        let entry = pending(now - SEC);
        assert!(entry.identity_pending());
        let (done, stale) = e.reconcile_with([(7, entry)].into_iter(), &dump_with(5), now);
        assert!(
            stale.is_empty(),
            "a child a second into its handshake is kept"
        );
        assert_eq!(done.from_map, 0, "and not followed: it has no identity yet");
        assert!(e.tracker.get(7).is_none());

        let old = pending(now - PENDING_FOR_NS - SEC);
        let (done, stale) = e.reconcile_with([(7, old)].into_iter(), &dump_with(5), now);
        assert_eq!(
            stale,
            [7],
            "no handshake lasts that long: its close went unseen"
        );
        assert_eq!(done.stale, 1);
    }
}
