//! `sweep` and `explain`: the daemon's engine applied once to the connections that
//! exist now, for cron, systemd timers and curious operators.

use std::fmt;
use std::io::Write;
use std::time::Duration;

use anyhow::Result;

use crate::clock::{human, monotonic_ns};
use crate::engine::{dump_scope, Engine};
use crate::kernel::cgroup::Cgroups;
use crate::kernel::netns::Namespaces;
use crate::kernel::pins;
use crate::kernel::sock_diag::SockDiag;
use crate::observe::log;
use crate::policy::{Policy, Verdict};

/// What one sweep did, printed as its last line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub scanned: usize,
    pub matched: usize,
    pub destroyed: u64,
    pub skipped: u64,
    pub failed: u64,
    pub deferred: u64,
    pub dry_run: bool,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scanned={} matched={} {}={} skipped={} failed={}",
            self.scanned,
            self.matched,
            if self.dry_run {
                "would_destroy"
            } else {
                "destroyed"
            },
            self.destroyed,
            self.skipped,
            self.failed
        )?;
        if self.deferred > 0 {
            write!(f, " deferred={}", self.deferred)?;
        }
        if self.dry_run {
            f.write_str(" (dry run: add --enforce to destroy)")?;
        }
        Ok(())
    }
}

/// The engine, loaded with the connections that exist now: ages from the pinned map
/// where a daemon recorded them, the rest bounded by sock_diag's tcp_info. `scope`:
/// read only the states and ports a rule can select (the kernel filters the dump),
/// else every socket.
fn load(
    policy: Policy,
    enforce: bool,
    scope: Scope,
) -> Result<(Engine, Namespaces, Option<crate::kernel::ConnMap>, usize)> {
    let conns = match pins::open_pinned_conns() {
        Ok(map) => Some(map),
        Err(e) => {
            tracing::info!(
                "{e:#}: ages and times in state are unknown, idle time comes from tcp_info"
            );
            None
        }
    };
    let mut namespaces = Namespaces::open()?;
    let now = monotonic_ns();
    let dump = match scope {
        Scope::Selectable => {
            let (states, ports) = dump_scope(&policy);
            namespaces.dump_all_ports(states, &ports)
        }
        Scope::Every => namespaces.dump_all(SockDiag::ALL_STATES),
    };
    for (inode, e) in &dump.failed {
        if *inode == namespaces.host {
            anyhow::bail!("sock_diag dump of the host's sockets failed: {e:#}");
        }
        tracing::warn!("cannot dump network namespace {inode}: {e:#}; its sockets are left alone");
    }
    let mut engine = Engine::new(policy, enforce);
    engine.expect(dump.sockets.len());
    engine.name_cgroups(Cgroups::default());
    // Stale entries are the daemon's to remove: a one-shot run only reads the map.
    let _ = engine.reconcile(conns.as_ref(), &dump, now);
    Ok((engine, namespaces, conns, dump.sockets.len()))
}

/// Which sockets a one-shot run reads.
#[derive(Clone, Copy)]
enum Scope {
    /// Those some rule can select: a sweep acts on nothing else.
    Selectable,
    /// All of them: `explain` says why each is left alone too.
    Every,
}

pub fn sweep(policy: Policy, enforce: bool) -> Result<Summary> {
    let (mut engine, mut namespaces, conns, scanned) = load(policy, enforce, Scope::Selectable)?;
    engine.one_shot();
    let now = monotonic_ns();
    let matched = engine
        .tracker
        .iter()
        .filter(|(k, _)| engine.deadlines.get(*k).is_some_and(|at| at <= now))
        .count();
    // The records are written together (the intents at once, before the destroys).
    let held = log::hold();
    engine.fire_due(now, &mut namespaces, conns.as_ref());
    drop(held);
    let c = &engine.counters;
    Ok(Summary {
        scanned,
        matched,
        destroyed: c.destroyed + c.would_destroy,
        skipped: c.skipped + c.protected,
        failed: c.failed,
        deferred: c.deferred,
        dry_run: !enforce,
    })
}

pub fn explain(policy: Policy) -> Result<()> {
    let (engine, _, _, _) = load(policy, false, Scope::Every)?;
    let now = monotonic_ns();
    let mut rows: Vec<(Option<u64>, [String; 5])> = engine
        .tracker
        .iter()
        .map(|(key, t)| {
            let s = engine.subject(&t);
            let age = Duration::from_nanos(now.saturating_sub(s.birth.no_later_than()));
            let age = format!(
                "{}{}",
                if s.birth.is_known() { "" } else { ">" },
                human(age)
            );
            let at = engine.deadlines.get(key);
            let verdict = engine.policy.verdict(&s);
            let what = match (engine.policy.protected(&s), at, verdict) {
                (Some(p), _, _) => format!("never: protected ({p})"),
                (None, Some(at), v) => {
                    let rule = match v {
                        Verdict::At { rule, at_ns } if at_ns == at => {
                            engine.policy.rule(rule).name.clone()
                        }
                        _ => "max-conns-per-ip".to_string(),
                    };
                    if at <= now {
                        format!("{rule}: due now")
                    } else {
                        format!("{rule}: due in {}", human(Duration::from_nanos(at - now)))
                    }
                }
                (None, None, _) => "never: no rule applies".to_string(),
            };
            (
                at,
                [
                    t.tuple.local.to_string(),
                    t.tuple.remote.to_string(),
                    t.state.to_string(),
                    age,
                    what,
                ],
            )
        })
        .collect();
    rows.sort_by_key(|(at, _)| at.unwrap_or(u64::MAX));
    let mut out = std::io::stdout().lock();
    let w = |i: usize| {
        rows.iter()
            .map(|(_, r)| r[i].len())
            .max()
            .unwrap_or(0)
            .max(6)
    };
    let (lw, rw) = (w(0), w(1));
    writeln!(
        out,
        "{:<lw$} {:<rw$} {:<12} {:>8}  DECISION",
        "LOCAL", "REMOTE", "STATE", "AGE"
    )?;
    for (_, r) in &rows {
        writeln!(
            out,
            "{:<lw$} {:<rw$} {:<12} {:>8}  {}",
            r[0], r[1], r[2], r[3], r[4]
        )?;
    }
    Ok(())
}
