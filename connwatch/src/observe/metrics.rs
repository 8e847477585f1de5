//! The Prometheus metrics registry (served over HTTP by `control::http` with
//! `run --metrics-addr 127.0.0.1:9752`), in the OpenMetrics text format, written by
//! the `prometheus-client` crate.
//!
//! Counters move as the engine decides (it reports each decision); the gauges and the
//! age histogram describe the tracked sockets at the moment of a scrape, computed then
//! in one pass: nothing walks the sockets between scrapes.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `connwatch_connections` | gauge | `state` |
//! | `connwatch_sockets_tracked` | gauge | |
//! | `connwatch_network_namespaces` | gauge | |
//! | `connwatch_deadlines_pending` | gauge | |
//! | `connwatch_firewall_blocked` | gauge | |
//! | `connwatch_connection_age_seconds` | histogram | |
//! | `connwatch_destroys_total` | counter | `reason`, `outcome` |
//! | `connwatch_protected_total` | counter | `protection` |
//! | `connwatch_deferred_total` | counter | |
//! | `connwatch_events_total` | counter | |
//! | `connwatch_connections_opened_total` | counter | `direction` (`in`, `out`) |
//! | `connwatch_connections_closed_total` | counter | |
//! | `connwatch_kernel_events_total` | counter | |
//! | `connwatch_kernel_drops_total` | counter | `reason` (`map_full`, `ring_full`, `recursion`) |
//! | `connwatch_reconciles_total` | counter | `outcome` (`done`, `put_off`, `failed`) |
//! | `connwatch_deadline_to_destroy_seconds` | histogram | |
//! | `connwatch_policy_reloads_total` | counter | `result` |

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::{Engine, Observed};
use crate::kernel::Stats;
use crate::observe::view::{age_histogram, census_with, AGE_BUCKETS};
use crate::track::Tracked;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestroyLabels {
    reason: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtectionLabels {
    protection: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The age histogram of the tracked connections, as the last scrape found it.
#[derive(Debug, Default)]
struct AgeSnapshot {
    sum: f64,
    count: u64,
    /// Per bucket (not cumulative), the last one +Inf.
    buckets: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Default)]
struct Ages(Arc<Mutex<AgeSnapshot>>);

impl Collector for Ages {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let metric = encoder.encode_descriptor(
            "connection_age",
            "Ages of the tracked connections at the scrape (a lower bound for those born before connwatch watched).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        let mut metric = metric;
        metric.encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None)
    }
}

/// Counter values last taken from the engine and the kernel, to add what is new.
#[derive(Clone, Copy, Default)]
struct LastScrape {
    deferred: u64,
    events: u64,
    /// Reconciles done, put off, failed.
    reconciles: [u64; 3],
    kernel: Stats,
}

pub struct Metrics {
    registry: Registry,
    connections: Family<StateLabels, Gauge>,
    states_seen: RefCell<BTreeSet<&'static str>>,
    tracked: Gauge,
    namespaces: Gauge,
    deadlines: Gauge,
    firewall_blocked: Gauge,
    ages: Ages,
    destroys: Family<DestroyLabels, Counter>,
    protected: Family<ProtectionLabels, Counter>,
    deferred: Counter,
    events: Counter,
    opened: Family<DirectionLabels, Counter>,
    closed: Counter,
    kernel_events: Counter,
    kernel_drops: Family<ReasonLabels, Counter>,
    reconciles: Family<OutcomeLabels, Counter>,
    late: Histogram,
    reloads: Family<ResultLabels, Counter>,
    seen: Cell<LastScrape>,
}

/// Bounds of the deadline-to-destroy histogram, in seconds.
const LATE_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0];

impl Metrics {
    /// The metrics, counting kernel-side events from `kernel` (the counters the pinned
    /// map holds when the daemon starts).
    pub fn new(kernel: Stats) -> Metrics {
        let mut registry = Registry::with_prefix("connwatch");
        let m = Metrics {
            connections: Family::default(),
            states_seen: RefCell::default(),
            tracked: Gauge::default(),
            namespaces: Gauge::default(),
            deadlines: Gauge::default(),
            firewall_blocked: Gauge::default(),
            ages: Ages::default(),
            destroys: Family::default(),
            protected: Family::default(),
            deferred: Counter::default(),
            events: Counter::default(),
            opened: Family::default(),
            closed: Counter::default(),
            kernel_events: Counter::default(),
            kernel_drops: Family::default(),
            reconciles: Family::default(),
            late: Histogram::new(LATE_BUCKETS),
            reloads: Family::default(),
            seen: Cell::new(LastScrape {
                kernel,
                ..LastScrape::default()
            }),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Tracked connections by TCP state.",
            m.connections.clone(),
        );
        registry.register(
            "sockets_tracked",
            "Sockets the daemon tracks (listeners included).",
            m.tracked.clone(),
        );
        registry.register(
            "network_namespaces",
            "Network namespaces holding tracked sockets.",
            m.namespaces.clone(),
        );
        registry.register(
            "deadlines_pending",
            "Sockets with a deadline set.",
            m.deadlines.clone(),
        );
        registry.register(
            "firewall_blocked",
            "Addresses blocked in the firewall now (--block-firewall), all network namespaces together.",
            m.firewall_blocked.clone(),
        );
        registry.register_collector(Box::new(m.ages.clone()));
        registry.register(
            "destroys",
            "Decisions to destroy by reason (the rule's kind, or manual) and outcome (destroyed, would_destroy, skipped, failed, protected).",
            m.destroys.clone(),
        );
        registry.register(
            "protected",
            "Sockets a protection saved when they were due, by kind (port, address, process).",
            m.protected.clone(),
        );
        registry.register(
            "deferred",
            "Destroys the safety budget put off.",
            m.deferred.clone(),
        );
        registry.register(
            "events",
            "Lifecycle events the daemon read from the kernel's ring buffer.",
            m.events.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections born, by direction: in (accepted from a peer), out (connect() calls, refused ones included); of the sockets the daemon follows.",
            m.opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections that closed (listeners not counted), counted by the kernel program.",
            m.closed.clone(),
        );
        registry.register(
            "kernel_events",
            "TCP state changes the kernel program saw.",
            m.kernel_events.clone(),
        );
        registry.register(
            "kernel_drops",
            "Records the kernel program could not keep since the daemon started: map_full (a socket not recorded), ring_full (an event lost), recursion (a state change the kernel did not run the program for).",
            m.kernel_drops.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles with the kernel after it dropped records, by outcome: done, put_off (a stats tick that saw drops and left them to a later reconcile, the back-off while drops go on, as under a full connection map), failed.",
            m.reconciles.clone(),
        );
        registry.register_with_unit(
            "deadline_to_destroy",
            "Time from a socket's deadline to its destroy (or would-destroy).",
            Unit::Seconds,
            m.late.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy reloads by result (ok, refused).",
            m.reloads.clone(),
        );
        for reason in ["map_full", "ring_full", "recursion"] {
            let _ = m.kernel_drops.get_or_create(&ReasonLabels { reason });
        }
        for direction in ["in", "out"] {
            let _ = m.opened.get_or_create(&DirectionLabels { direction });
        }
        for outcome in ["done", "put_off", "failed"] {
            let _ = m.reconciles.get_or_create(&OutcomeLabels { outcome });
        }
        Metrics { registry, ..m }
    }

    /// Takes in one decision of the engine.
    pub fn observe(&self, o: &Observed) {
        let r = o.record;
        self.destroys
            .get_or_create(&DestroyLabels {
                reason: r.reason,
                outcome: r.action.label(),
            })
            .inc();
        if let Some(protection) = o.protection {
            self.protected
                .get_or_create(&ProtectionLabels { protection })
                .inc();
        }
        if let Some(ns) = o.late_ns {
            self.late.observe(Duration::from_nanos(ns).as_secs_f64());
        }
    }

    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The exposition, with the gauges and the age histogram taken now.
    pub fn scrape(&self, engine: &Engine, kernel: Stats, now: u64) -> String {
        self.scrape_with(engine, &[], kernel, now)
    }

    /// [`Metrics::scrape`] with the sockets the map holds that the engine does not
    /// follow counted too.
    pub fn scrape_with(
        &self,
        engine: &Engine,
        others: &[Tracked],
        kernel: Stats,
        now: u64,
    ) -> String {
        let (by_state, ages) = census_with(engine, others.iter(), now);
        let mut seen_states = self.states_seen.borrow_mut();
        for state in seen_states.iter() {
            if !by_state.contains_key(state) {
                self.connections
                    .get_or_create(&StateLabels { state })
                    .set(0);
            }
        }
        for (state, n) in &by_state {
            seen_states.insert(state);
            self.connections
                .get_or_create(&StateLabels { state })
                .set(*n as i64);
        }
        self.tracked
            .set((engine.tracker.len() + others.len()) as i64);
        self.namespaces.set(engine.tracker.namespaces() as i64);
        self.deadlines.set(engine.deadlines.len() as i64);
        self.firewall_blocked.set(engine.blocked_count() as i64);
        {
            let sum = ages.iter().map(|ns| *ns as f64 / 1e9).sum();
            let counts = age_histogram(ages.iter().copied());
            let bounds = AGE_BUCKETS
                .iter()
                .map(|b| *b as f64)
                .chain(std::iter::once(f64::INFINITY));
            let mut snap = self.ages.0.lock().unwrap_or_else(|e| e.into_inner());
            *snap = AgeSnapshot {
                sum,
                count: ages.len() as u64,
                buckets: bounds.zip(counts).collect(),
            };
        }
        let before = self.seen.get();
        let c = &engine.counters;
        self.deferred
            .inc_by(c.deferred.saturating_sub(before.deferred));
        self.events.inc_by(c.events.saturating_sub(before.events));
        for (outcome, now, was) in [
            ("done", c.reconciles, before.reconciles[0]),
            ("put_off", c.reconciles_put_off, before.reconciles[1]),
            ("failed", c.reconcile_failures, before.reconciles[2]),
        ] {
            self.reconciles
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(now.saturating_sub(was));
        }
        // Counted in the kernel: the event filter lets few of these events through.
        for (direction, now, was) in [
            ("in", kernel.opened_in, before.kernel.opened_in),
            ("out", kernel.opened_out, before.kernel.opened_out),
        ] {
            self.opened
                .get_or_create(&DirectionLabels { direction })
                .inc_by(now.saturating_sub(was));
        }
        self.closed
            .inc_by(kernel.closed.saturating_sub(before.kernel.closed));
        self.kernel_events
            .inc_by(kernel.events.saturating_sub(before.kernel.events));
        self.kernel_drops
            .get_or_create(&ReasonLabels { reason: "map_full" })
            .inc_by(kernel.map_full.saturating_sub(before.kernel.map_full));
        self.kernel_drops
            .get_or_create(&ReasonLabels {
                reason: "ring_full",
            })
            .inc_by(kernel.ring_full.saturating_sub(before.kernel.ring_full));
        self.kernel_drops
            .get_or_create(&ReasonLabels {
                reason: "recursion",
            })
            .inc_by(
                kernel
                    .recursion_misses
                    .saturating_sub(before.kernel.recursion_misses),
            );
        self.seen.set(LastScrape {
            deferred: c.deferred,
            events: c.events,
            reconciles: [c.reconciles, c.reconciles_put_off, c.reconcile_failures],
            kernel: Stats {
                events: kernel.events.max(before.kernel.events),
                map_full: kernel.map_full.max(before.kernel.map_full),
                ring_full: kernel.ring_full.max(before.kernel.ring_full),
                recursion_misses: kernel.recursion_misses.max(before.kernel.recursion_misses),
                opened_in: kernel.opened_in.max(before.kernel.opened_in),
                opened_out: kernel.opened_out.max(before.kernel.opened_out),
                closed: kernel.closed.max(before.kernel.closed),
            },
        });
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("cannot encode the metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{TcpState, Tuple};
    use crate::engine::audit::{Action, Age, Record};
    use crate::policy::Policy;

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new(Stats::default());
        let r = Record {
            time: std::time::SystemTime::now(),
            action: Action::Destroyed,
            id: crate::conn::SockId::new(4026531840, 1),
            tuple: Tuple::new(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ),
            state: TcpState::ESTABLISHED,
            age: Age {
                secs: 3,
                exact: true,
            },
            idle_secs: None,
            reason: "max-age",
            rule: "max-age".into(),
            owner: None,
            direction: None,
            cgroup: None,
            dry_run: false,
            detail: None,
            traffic: None,
        };
        m.observe(&Observed {
            record: &r,
            late_ns: Some(2_000_000),
            protection: None,
        });
        let mut engine = Engine::new(Policy::default_hung_states(), false);
        engine.counters.reconciles = 2;
        engine.counters.reconciles_put_off = 5;
        let kernel = Stats {
            events: 10,
            map_full: 1,
            ring_full: 0,
            recursion_misses: 3,
            opened_in: 4,
            opened_out: 4,
            closed: 2,
        };
        let text = m.scrape(&engine, kernel, 0);
        for want in [
            "connwatch_destroys_total{reason=\"max-age\",outcome=\"destroyed\"} 1",
            "connwatch_deadline_to_destroy_seconds_count 1",
            "connwatch_deadline_to_destroy_seconds_bucket{le=\"0.005\"} 1",
            "connwatch_kernel_events_total 10",
            "connwatch_kernel_drops_total{reason=\"map_full\"} 1",
            "connwatch_kernel_drops_total{reason=\"ring_full\"} 0",
            "connwatch_kernel_drops_total{reason=\"recursion\"} 3",
            "connwatch_connection_age_seconds_count 0",
            "connwatch_connection_age_seconds_bucket{le=\"+Inf\"} 0",
            "connwatch_sockets_tracked 0",
            "connwatch_network_namespaces 0",
            "connwatch_firewall_blocked 0",
            "connwatch_connections_opened_total{direction=\"in\"} 4",
            "connwatch_connections_opened_total{direction=\"out\"} 4",
            "connwatch_connections_closed_total 2",
            "connwatch_reconciles_total{outcome=\"done\"} 2",
            "connwatch_reconciles_total{outcome=\"put_off\"} 5",
            "connwatch_reconciles_total{outcome=\"failed\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // The kernel's counters are added once, not again on the next scrape.
        let text = m.scrape(&engine, kernel, 0);
        assert!(text.contains("connwatch_kernel_events_total 10"), "{text}");
        assert!(
            text.contains("connwatch_reconciles_total{outcome=\"put_off\"} 5"),
            "{text}"
        );
    }
}
