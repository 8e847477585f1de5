//! Answering requests in the event loop, with the engine in hand. Reloads and metrics
//! scrapes are the daemon's own to answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use std::collections::BTreeMap;

use super::protocol::{error, AgeBucket, Counters, KernelCounts, Reply, Request, Status};
use crate::clock::monotonic_ns;
use crate::engine::Engine;
use crate::kernel::netns::Namespaces;
use crate::kernel::{ConnMap, Stats};
use crate::observe::journal::Journal;
use crate::observe::view::{self, Query, SortKey};
use crate::track::{Source, Tracked};

/// What answering needs from the event loop.
pub struct Ctx<'a> {
    pub engine: &'a mut Engine,
    pub namespaces: &'a mut Namespaces,
    pub conns: Option<&'a ConnMap>,
    pub journal: &'a std::cell::RefCell<Journal>,
    pub kernel: Stats,
    pub started: Instant,
    pub api_socket: &'a Path,
    pub metrics_addr: Option<SocketAddr>,
}

/// The map entries of sockets the engine does not follow (a filtered engine follows
/// only what its policy can act on; the map holds every socket, with its age).
pub fn unfollowed(engine: &Engine, conns: Option<&ConnMap>) -> HashMap<u64, Tracked> {
    if !engine.is_filtered() {
        return HashMap::new();
    }
    let Some(conns) = conns else {
        return HashMap::new();
    };
    conns
        .entries()
        .into_iter()
        .filter(|(key, _)| {
            engine
                .tracker
                .get(*key)
                .is_none_or(|t| t.source != Source::Map)
        })
        .filter_map(|(key, info)| {
            let t = Tracked::from_info(&info)?;
            (engine.tracker.key_of(&t.id).is_none()).then_some((key, t))
        })
        .collect()
}

fn rows(
    engine: &Engine,
    conns: Option<&ConnMap>,
    namespaces: &mut Namespaces,
    query: &Query,
    now: u64,
) -> Result<Reply, String> {
    let filter = query.filter()?;
    let others = unfollowed(engine, conns);
    let items = engine
        .tracker
        .iter()
        .chain(others.iter().map(|(k, t)| (*k, *t)))
        .filter(|(_, t)| view::listed(t))
        .map(|(k, t)| view::item_of(engine, k, &t, now));
    // Traffic and idle times come from one dump per namespace: of every candidate when
    // they order or select the list, else only of the rows kept.
    let needs_dump =
        matches!(filter.sort, SortKey::Bytes | SortKey::Idle) || filter.idle_longer_than.is_some();
    let (kept, matched) = if needs_dump {
        let mut candidates: Vec<_> = items.collect();
        view::join_dump(&mut candidates, namespaces);
        filter.apply(candidates.into_iter())
    } else {
        let (mut kept, matched) = filter.apply(items);
        view::join_dump(&mut kept, namespaces);
        (kept, matched)
    };
    let rows = kept
        .iter()
        .map(|it| {
            let mut row = it.row();
            let key = it.key.expect("tracked items have keys");
            if let Some(next) = engine.next(key) {
                row.next_rule = Some(next.rule);
                row.next_in_secs = Some(next.at_ns.saturating_sub(now) as f64 / 1e9)
                    .map(|s| (s * 1000.0).round() / 1000.0);
            }
            let t = engine
                .tracker
                .get(key)
                .or_else(|| others.get(&key).copied());
            if let Some(t) = t {
                row.protected = engine
                    .policy
                    .protected(&engine.subject(&t))
                    .map(|p| p.to_string());
            }
            row
        })
        .collect();
    Ok(Reply::Rows { rows, matched })
}

fn status(ctx: &Ctx, now: u64) -> Status {
    let e = &*ctx.engine;
    let c = &e.counters;
    let others = unfollowed(e, ctx.conns);
    let (by_state, ages) = view::census_with(e, others.values(), now);
    let hist = view::age_histogram(ages.into_iter());
    let owned = |m: BTreeMap<&'static str, u64>| -> BTreeMap<String, u64> {
        m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    Status {
        ok: true,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: ctx.started.elapsed().as_secs(),
        enforce: e.enforce,
        tracked: e.tracker.len() as u64,
        deadlines: e.deadlines.len() as u64,
        namespaces: e.tracker.namespaces() as u64,
        counters: Counters {
            events: c.events,
            destroyed: c.destroyed,
            would_destroy: c.would_destroy,
            skipped: c.skipped,
            failed: c.failed,
            protected: c.protected,
            deferred: c.deferred,
            retried: c.retried,
            reconciles: c.reconciles,
            reconciles_put_off: c.reconciles_put_off,
            reconcile_failures: c.reconcile_failures,
        },
        by_reason: owned(c.by_reason.iter().map(|(k, v)| (*k, *v)).collect()),
        kernel: KernelCounts {
            events: ctx.kernel.events,
            map_full: ctx.kernel.map_full,
            ring_full: ctx.kernel.ring_full,
            recursion_misses: ctx.kernel.recursion_misses,
        },
        by_state: owned(by_state),
        ages: hist
            .iter()
            .enumerate()
            .map(|(i, n)| AgeBucket {
                bucket: view::bucket_label(i),
                le_secs: view::AGE_BUCKETS.get(i).copied(),
                count: *n,
            })
            .collect(),
        last_minute: owned(ctx.journal.borrow().last_minute(now)),
        api_socket: ctx.api_socket.display().to_string(),
        metrics_addr: ctx.metrics_addr.map(|a| a.to_string()),
    }
}

fn policy(engine: &Engine) -> Value {
    let p = &engine.policy;
    let strs = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<String>>();
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            let s = &r.selector;
            json!({
                "name": r.name,
                "kind": r.limit.kind(),
                "limit": r.limit.to_string(),
                "ports": strs(&mut s.ports.iter().map(|x| x.to_string())),
                "local_ports": strs(&mut s.local_ports.iter().map(|x| x.to_string())),
                "remote_ports": strs(&mut s.remote_ports.iter().map(|x| x.to_string())),
                "local_addrs": strs(&mut s.local_addrs.iter().map(|x| x.to_string())),
                "remote_addrs": strs(&mut s.remote_addrs.iter().map(|x| x.to_string())),
            })
        })
        .collect();
    json!({
        "ok": true,
        "enforce": engine.enforce,
        "description": p.describe(),
        "rules": rules,
        "protect": {
            "ports": strs(&mut p.protect.ports.iter().map(|x| x.to_string())),
            "addrs": strs(&mut p.protect.addrs.iter().map(|x| x.to_string())),
            "processes": p.protect.processes,
        },
        "budget": {
            "max_kills_per_second": p.budget.max_kills_per_second,
            "max_kill_fraction": p.budget.max_kill_fraction,
        },
    })
}

/// What the firewall blocks: each address, its namespace, and until when (wall
/// clock, and seconds from now).
fn blocked(engine: &mut Engine) -> Value {
    let now = std::time::SystemTime::now();
    let blocked: Vec<Value> = engine
        .blocked()
        .into_iter()
        .map(|b| {
            let unix = b
                .until
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let left = b.until.duration_since(now).unwrap_or_default();
            json!({
                "addr": b.addr.to_string(),
                "netns": b.netns,
                "until": crate::engine::audit::rfc3339(b.until),
                "unix_until": (unix * 1000.0).round() / 1000.0,
                "expires_in_secs": (left.as_secs_f64() * 1000.0).round() / 1000.0,
            })
        })
        .collect();
    json!({
        "ok": true,
        "firewall": engine.policy.block_firewall.is_some(),
        "block_for_secs": engine.policy.block_firewall.map(|d| d.as_secs()),
        "blocked": blocked,
    })
}

/// Answers one request, in the event loop.
pub fn answer(req: Request, ctx: &mut Ctx) -> Reply {
    let now = monotonic_ns();
    match req {
        Request::Status => match serde_json::to_value(status(ctx, now)) {
            Ok(v) => Reply::Json(v),
            Err(e) => error(format!("cannot encode the status: {e}")),
        },
        Request::Policy => Reply::Json(policy(ctx.engine)),
        Request::List(q) => {
            rows(ctx.engine, ctx.conns, ctx.namespaces, &q, now).unwrap_or_else(error)
        }
        Request::Blocked => Reply::Json(blocked(ctx.engine)),
        Request::Destroys { limit } => {
            Reply::Json(json!({"ok": true, "records": ctx.journal.borrow().recent(limit)}))
        }
        Request::Destroy { tuple, netns } => {
            match ctx
                .engine
                .destroy_manual(tuple, netns, now, ctx.namespaces, ctx.conns)
            {
                Ok(r) => Reply::Json(json!({
                    "ok": true,
                    "outcome": r.action.as_str(),
                    "dry_run": r.dry_run,
                    "record": r.to_json(),
                })),
                Err(why) => error(why),
            }
        }
        // The daemon answers these itself, before asking here.
        Request::Reload | Request::Metrics => error("not answered here"),
    }
}
