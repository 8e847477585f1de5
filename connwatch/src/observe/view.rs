//! The view of the connections that `list`, `top`, the control API and the metrics
//! share: a row per connection, the filter and sort a query asks for, and the age
//! buckets. Without a daemon, [`read_local`] builds the same view from one sock_diag
//! dump and the pinned map; nothing here reads `/proc` per socket.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::clock::{human, monotonic_ns, SEC};
use crate::conn::{canonical, cookie_from_diag, Birth, Direction, Owner, SockId, TcpState, Tuple};
use crate::engine::Engine;
use crate::kernel::cgroup::{container_of, Cgroups};
use crate::kernel::netns::Namespaces;
use crate::kernel::pins;
use crate::kernel::sock_diag::{DiagSocket, SockDiag, TcpTraffic};
use crate::policy::{parse_cidr, parse_netns, PortRange};
use crate::track::Tracked;

/// One connection as `list --json` and the control API give it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub local: String,
    pub remote: String,
    pub state: String,
    /// The inode of the connection's network namespace.
    #[serde(default)]
    pub netns: u32,
    /// The kernel's socket cookie: with `netns`, who the connection is.
    #[serde(default)]
    pub cookie: u64,
    /// Seconds since the connection was born; null where its birth is unknown.
    pub age_secs: Option<f64>,
    /// Where the birth is unknown: seconds it has existed at least.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_at_least_secs: Option<f64>,
    /// Seconds since the connection entered its current state; null where unknown.
    pub state_secs: Option<f64>,
    /// Seconds since data last moved either way (since birth if none did); null where
    /// unknown.
    pub idle_secs: Option<f64>,
    /// The process that last used the socket, as the kernel program saw it.
    pub pid: Option<u32>,
    pub process: Option<String>,
    /// `in` (accepted from a peer) or `out` (connected out); null where unknown.
    #[serde(default)]
    pub direction: Option<String>,
    /// The cgroup v2 path of that process, where known.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The container or pod that cgroup names (`docker:<id>`, `k8s:pod=<uid>,...`).
    #[serde(default)]
    pub container: Option<String>,
    /// The rule that will apply next (only while a daemon runs).
    pub next_rule: Option<String>,
    /// Seconds until that rule's deadline; 0 when due.
    pub next_in_secs: Option<f64>,
    /// Why no rule may ever destroy it (`port 22`, `process sshd`), while a daemon runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<String>,
    /// Bytes received (`tcpi_bytes_received`) and sent and acknowledged
    /// (`tcpi_bytes_acked`); null where the kernel gave no `tcp_info` (TIME_WAIT).
    #[serde(default)]
    pub bytes_in: Option<u64>,
    #[serde(default)]
    pub bytes_out: Option<u64>,
    /// Segments received and sent (`tcpi_segs_in`, `tcpi_segs_out`) and retransmitted
    /// (`tcpi_total_retrans`).
    #[serde(default)]
    pub segs_in: Option<u64>,
    #[serde(default)]
    pub segs_out: Option<u64>,
    #[serde(default)]
    pub retrans: Option<u64>,
}

fn secs(ns: u64) -> f64 {
    (ns as f64 / 1e9 * 1000.0).round() / 1000.0
}

/// One connection before it is shown: typed, so filters and sorts cost no parsing.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: SockId,
    pub tuple: Tuple,
    pub state: TcpState,
    /// Nanoseconds since birth: exact, or a lower bound when `age_exact` is false.
    pub age_ns: Option<u64>,
    pub age_exact: bool,
    pub state_ns: Option<u64>,
    pub idle_ns: Option<u64>,
    pub owner: Option<Owner>,
    pub direction: Option<Direction>,
    /// The cgroup path of the process that opened or used it, where known.
    pub cgroup: Option<Arc<str>>,
    /// The daemon's key of the socket, to find its deadline.
    pub key: Option<u64>,
    /// The device the socket is bound to (0: none), which an exact lookup must name.
    pub ifindex: u32,
    /// What it carried, from `tcp_info`, where a dump was read.
    pub traffic: Option<TcpTraffic>,
}

impl Item {
    /// The row, without what only the daemon knows.
    pub fn row(&self) -> Row {
        let age = self.age_ns.map(secs);
        Row {
            local: self.tuple.local.to_string(),
            remote: self.tuple.remote.to_string(),
            state: self.state.to_string(),
            netns: self.id.netns,
            cookie: self.id.cookie,
            age_secs: age.filter(|_| self.age_exact),
            age_at_least_secs: age.filter(|_| !self.age_exact),
            state_secs: self.state_ns.map(secs),
            idle_secs: self.idle_ns.map(secs),
            pid: self.owner.map(|o| o.pid),
            process: self.owner.map(|o| o.name().to_string()),
            direction: self.direction.map(|d| d.name().to_string()),
            cgroup: self.cgroup.as_deref().map(str::to_string),
            container: self.cgroup.as_deref().and_then(container_of),
            next_rule: None,
            next_in_secs: None,
            protected: None,
            bytes_in: self.traffic.map(|t| t.bytes_in),
            bytes_out: self.traffic.map(|t| t.bytes_out),
            segs_in: self.traffic.map(|t| u64::from(t.segs_in)),
            segs_out: self.traffic.map(|t| u64::from(t.segs_out)),
            retrans: self.traffic.map(|t| u64::from(t.retrans)),
        }
    }
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SortKey {
    /// Oldest first.
    #[default]
    Age,
    /// Longest idle first.
    Idle,
    /// By state, then oldest first.
    State,
    /// By remote address and port.
    Remote,
    /// Most bytes (received and sent) first.
    Bytes,
}

/// Which connections to list and in what order; the same for the CLI and the API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub states: Vec<TcpState>,
    pub direction: Option<Direction>,
    /// Network namespaces, by inode.
    pub netns: Vec<u32>,
    /// Local or remote port.
    pub ports: Vec<PortRange>,
    pub remote_addrs: Vec<IpNet>,
    /// Owner process names (the kernel's 15-character command name).
    pub processes: Vec<String>,
    pub older_than: Option<Duration>,
    pub idle_longer_than: Option<Duration>,
    pub sort: SortKey,
    pub limit: Option<usize>,
}

/// The filter as a control request carries it (`{"cmd":"list", ...}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_addr: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub process: Vec<String>,
    /// Network namespaces: `host`, `ip netns` names or inodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub netns: Vec<String>,
    /// `in` or `out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_longer_than_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<SortKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

fn duration_secs(field: &str, v: Option<f64>) -> Result<Option<Duration>, String> {
    v.map(|s| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| format!("{field}: {s} is not a duration in seconds"))
    })
    .transpose()
}

impl Query {
    pub fn from_filter(f: &Filter) -> Query {
        Query {
            state: f.states.iter().map(|s| s.to_string()).collect(),
            port: f.ports.iter().map(|p| p.to_string()).collect(),
            remote_addr: f.remote_addrs.iter().map(|n| n.to_string()).collect(),
            process: f.processes.clone(),
            netns: f.netns.iter().map(|n| n.to_string()).collect(),
            direction: f.direction.map(|d| d.name().to_string()),
            older_than_secs: f.older_than.map(|d| d.as_secs_f64()),
            idle_longer_than_secs: f.idle_longer_than.map(|d| d.as_secs_f64()),
            sort: Some(f.sort),
            limit: f.limit,
        }
    }

    /// The filter, or an error naming the field and value.
    pub fn filter(&self) -> Result<Filter, String> {
        Ok(Filter {
            states: self
                .state
                .iter()
                .map(|s| {
                    TcpState::parse(s).ok_or_else(|| format!("state: '{s}' is not a TCP state"))
                })
                .collect::<Result<_, _>>()?,
            ports: self
                .port
                .iter()
                .map(|p| p.parse().map_err(|e| format!("port: {e}")))
                .collect::<Result<_, _>>()?,
            remote_addrs: self
                .remote_addr
                .iter()
                .map(|a| parse_cidr(a).map_err(|e| format!("remote_addr: {e}")))
                .collect::<Result<_, _>>()?,
            processes: self.process.clone(),
            netns: self
                .netns
                .iter()
                .map(|n| parse_netns(n).map_err(|e| format!("netns: {e}")))
                .collect::<Result<_, _>>()?,
            direction: self
                .direction
                .as_deref()
                .map(|d| Direction::parse(d).map_err(|e| format!("direction: {e}")))
                .transpose()?,
            older_than: duration_secs("older_than_secs", self.older_than_secs)?,
            idle_longer_than: duration_secs("idle_longer_than_secs", self.idle_longer_than_secs)?,
            sort: self.sort.unwrap_or_default(),
            limit: self.limit,
        })
    }
}

impl Filter {
    pub fn matches(&self, it: &Item) -> bool {
        let (lp, rp) = (it.tuple.local.port(), it.tuple.remote.port());
        let at_least = |have: Option<u64>, want: Option<Duration>| match want {
            None => true,
            Some(d) => have.is_some_and(|ns| ns >= d.as_nanos() as u64),
        };
        (self.states.is_empty() || self.states.contains(&it.state))
            && (self.netns.is_empty() || self.netns.contains(&it.id.netns))
            && self.direction.is_none_or(|d| it.direction == Some(d))
            && (self.ports.is_empty()
                || self.ports.iter().any(|r| r.contains(lp) || r.contains(rp)))
            && (self.remote_addrs.is_empty() || {
                let ip = canonical(it.tuple.remote.ip());
                self.remote_addrs.iter().any(|n| n.contains(&ip))
            })
            && (self.processes.is_empty()
                || it
                    .owner
                    .is_some_and(|o| self.processes.iter().any(|p| p == o.name())))
            // An age known only as a lower bound is older than D when the bound is.
            && at_least(it.age_ns, self.older_than)
            && at_least(it.idle_ns, self.idle_longer_than)
    }

    fn order(&self, a: &Item, b: &Item) -> std::cmp::Ordering {
        let desc = |x: Option<u64>, y: Option<u64>| y.cmp(&x);
        let addr = |s: &SocketAddr| (canonical(s.ip()), s.port());
        let then = || addr(&a.tuple.local).cmp(&addr(&b.tuple.local));
        match self.sort {
            SortKey::Age => desc(a.age_ns, b.age_ns).then_with(then),
            SortKey::Idle => desc(a.idle_ns, b.idle_ns).then_with(then),
            SortKey::State => a
                .state
                .name()
                .cmp(b.state.name())
                .then_with(|| desc(a.age_ns, b.age_ns))
                .then_with(then),
            SortKey::Remote => addr(&a.tuple.remote)
                .cmp(&addr(&b.tuple.remote))
                .then_with(then),
            SortKey::Bytes => {
                let bytes = |i: &Item| i.traffic.map(|t| t.bytes());
                desc(bytes(a), bytes(b)).then_with(then)
            }
        }
    }

    /// Keeps the matching items, sorted, the first `limit` of them; returns how many
    /// matched before the cut. With a limit only the kept ones are fully sorted.
    pub fn apply(&self, items: impl Iterator<Item = Item>) -> (Vec<Item>, usize) {
        let mut kept: Vec<Item> = items.filter(|i| self.matches(i)).collect();
        let matched = kept.len();
        if let Some(n) = self.limit {
            if n < kept.len() {
                if n > 0 {
                    kept.select_nth_unstable_by(n - 1, |a, b| self.order(a, b));
                }
                kept.truncate(n);
            }
        }
        kept.sort_by(|a, b| self.order(a, b));
        (kept, matched)
    }
}

/// Upper bounds of the age buckets that `top`, `status` and the metrics use, in seconds.
pub const AGE_BUCKETS: [u64; 6] = [10, 60, 600, 3_600, 86_400, 604_800];

/// How many ages fall in each bucket of [`AGE_BUCKETS`], plus one for older ones.
pub fn age_histogram(ages_ns: impl Iterator<Item = u64>) -> [u64; AGE_BUCKETS.len() + 1] {
    let mut counts = [0u64; AGE_BUCKETS.len() + 1];
    for ns in ages_ns {
        let s = ns / SEC;
        let i = AGE_BUCKETS
            .iter()
            .position(|b| s < *b)
            .unwrap_or(AGE_BUCKETS.len());
        counts[i] += 1;
    }
    counts
}

/// A bucket's label: `<10s`, `<1m`, ..., `>=1w`.
pub fn bucket_label(i: usize) -> String {
    match AGE_BUCKETS.get(i) {
        Some(b) => format!("<{}", human_bucket(*b)),
        None => format!(">={}", human_bucket(AGE_BUCKETS[AGE_BUCKETS.len() - 1])),
    }
}

fn human_bucket(s: u64) -> String {
    if s == 604_800 {
        "1w".into()
    } else {
        human(Duration::from_secs(s))
    }
}

/// Joins the kernel's sockets with what the map says of them, listeners left out:
/// what `list` knows without a daemon.
pub fn local_items(
    live: &[(u32, DiagSocket)],
    entries: &HashMap<SockId, Tracked>,
    cgroups: &mut dyn FnMut(u64) -> Option<Arc<str>>,
    now: u64,
) -> Vec<Item> {
    let ms = |n: u32| u64::from(n) * 1_000_000;
    live.iter()
        .filter(|(_, s)| s.state != TcpState::LISTEN)
        .map(|(netns, s)| {
            let id = SockId::new(*netns, cookie_from_diag(s.cookie));
            let entry = entries.get(&id);
            let (age_ns, age_exact) = match (entry.map(|e| e.birth), s.activity) {
                (Some(Birth::Known(at)), _) => (Some(now.saturating_sub(at)), true),
                (Some(Birth::Unknown { seen_ns }), _) => (Some(now.saturating_sub(seen_ns)), false),
                // tcp_info's data timers start at establishment: the larger bounds the age.
                (None, Some(a)) => (
                    Some(ms(a.last_data_sent_ms.max(a.last_data_recv_ms))),
                    false,
                ),
                (None, None) => (None, false),
            };
            // The map's state may lag the dump's by an event; its times stay valid only
            // while both agree on the state.
            let state_ns = entry
                .filter(|e| e.state == s.state)
                .map(|e| now.saturating_sub(e.state_since_ns));
            // Only tcp_info knows when data moved; without it, the tracker's last word.
            let idle_ns = match (s.activity, entry) {
                (Some(a), _) => Some(ms(a.quiet_ms())),
                (None, Some(e)) => Some(now.saturating_sub(e.quiet_since())),
                (None, None) => None,
            };
            Item {
                id,
                tuple: s.tuple,
                state: s.state,
                age_ns,
                age_exact,
                state_ns,
                idle_ns,
                owner: entry.and_then(|e| e.owner),
                direction: entry.and_then(|e| e.direction),
                cgroup: entry.and_then(|e| cgroups(e.cgroup_id)),
                key: None,
                ifindex: s.ifindex,
                traffic: s.traffic,
            }
        })
        .collect()
}

/// Every connection, from the pinned map and one sock_diag dump.
pub fn read_local() -> Result<Vec<Item>> {
    let mut entries = HashMap::new();
    match pins::open_pinned_conns() {
        Ok(map) => {
            for (_, info) in map.entries() {
                if let Some(t) = Tracked::from_info(&info) {
                    entries.insert(t.id, t);
                }
            }
        }
        Err(e) => eprintln!("connwatch: ages unknown: {e:#}"),
    }
    let dump = Namespaces::open()?.dump_all(SockDiag::ALL_STATES);
    for (inode, e) in &dump.failed {
        eprintln!("connwatch: network namespace {inode} not listed: {e:#}");
    }
    let mut cgroups = Cgroups::default();
    Ok(local_items(
        &dump.sockets,
        &entries,
        &mut |id| cgroups.path(id),
        monotonic_ns(),
    ))
}

/// A tracked socket as `list` shows it, at `now`.
pub fn item_of(engine: &Engine, key: u64, t: &Tracked, now: u64) -> Item {
    Item {
        id: t.id,
        tuple: t.tuple,
        state: t.state,
        age_ns: Some(now.saturating_sub(t.birth.no_later_than())),
        age_exact: t.birth.is_known(),
        state_ns: Some(now.saturating_sub(t.state_since_ns)),
        idle_ns: Some(now.saturating_sub(t.quiet_since())),
        owner: t.owner,
        direction: t.direction,
        cgroup: engine.subject(t).cgroup,
        key: Some(key),
        ifindex: t.ifindex,
        traffic: None,
    }
}

/// Up to this many items are joined by exact lookups (one batched exchange a namespace);
/// more by one dump of their namespace: the 100 rows of `list --limit 100` no longer
/// cost a dump of 200,000 sockets' tcp_info.
const LOOKUPS_AT_MOST: usize = 1024;

/// Fills in what each item carried and how long it has been quiet (tcp_info's data
/// timers, exact where the tracker knows only what a deadline last learned), from the
/// kernel's sockets joined by identity (namespace and cookie): exact lookups for a few
/// items, else one sock_diag dump per network namespace the items live in (only the
/// states they are in); never a lookup per socket of a large set. What the daemon's
/// `list` pays on top of its tracker; a namespace that cannot be read leaves its items
/// as they were.
pub fn join_dump(items: &mut [Item], namespaces: &mut Namespaces) {
    if items.len() <= LOOKUPS_AT_MOST {
        return join_lookups(items, namespaces);
    }
    let mut by_ns: BTreeMap<u32, u32> = BTreeMap::new();
    for it in items.iter() {
        *by_ns.entry(it.id.netns).or_default() |= 1 << it.state.0;
    }
    let wanted: HashMap<SockId, usize> =
        items.iter().enumerate().map(|(i, it)| (it.id, i)).collect();
    for (netns, states) in by_ns {
        let dumped = namespaces
            .diag(netns, None)
            .and_then(|d| d.dump_with_activity(states & SockDiag::ALL_STATES));
        match dumped {
            Ok(sockets) => {
                for s in sockets {
                    let id = SockId::new(netns, cookie_from_diag(s.cookie));
                    if let Some(&i) = wanted.get(&id) {
                        items[i].learn(&s);
                    }
                }
            }
            Err(e) => tracing::debug!("no traffic counts for network namespace {netns}: {e:#}"),
        }
    }
}

/// [`join_dump`] for a few items: each looked up by its tuple (and device), kept only
/// where the kernel's socket there is still the item's (its cookie).
fn join_lookups(items: &mut [Item], namespaces: &mut Namespaces) {
    let mut by_ns: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        by_ns.entry(it.id.netns).or_default().push(i);
    }
    for (netns, at) in by_ns {
        let wanted: Vec<(Tuple, u32)> = at
            .iter()
            .map(|&i| (items[i].tuple, items[i].ifindex))
            .collect();
        let found = match namespaces.diag(netns, None) {
            Ok(diag) => diag.get_many_on(&wanted),
            Err(e) => {
                tracing::debug!("no traffic counts for network namespace {netns}: {e:#}");
                continue;
            }
        };
        for (&i, found) in at.iter().zip(found) {
            if let Ok(Some(s)) = found {
                if cookie_from_diag(s.cookie) == items[i].id.cookie {
                    items[i].learn(&s);
                }
            }
        }
    }
}

impl Item {
    /// Takes in what the kernel's socket says: what it carried, how long it has been
    /// quiet.
    fn learn(&mut self, s: &DiagSocket) {
        self.traffic = s.traffic;
        if let Some(a) = s.activity {
            self.idle_ns = Some(u64::from(a.quiet_ms()) * 1_000_000);
        }
    }
}

/// Whether a tracked socket is a connection `list` shows.
pub fn listed(t: &Tracked) -> bool {
    t.state != TcpState::LISTEN && t.state != TcpState::CLOSE
}

/// Counts by state and the age histogram of the tracked connections: one pass.
pub fn census(engine: &Engine, now: u64) -> (BTreeMap<&'static str, u64>, Vec<u64>) {
    census_with(engine, std::iter::empty(), now)
}

/// [`census`] of the tracked connections and `others` (those the map holds that a
/// filtered engine does not follow).
pub fn census_with<'a>(
    engine: &'a Engine,
    others: impl Iterator<Item = &'a Tracked>,
    now: u64,
) -> (BTreeMap<&'static str, u64>, Vec<u64>) {
    let mut by_state = BTreeMap::new();
    let mut ages = Vec::with_capacity(engine.tracker.len());
    for t in engine.tracker.iter().map(|(_, t)| t).chain(others.copied()) {
        *by_state.entry(t.state.name()).or_default() += 1;
        if listed(&t) {
            ages.push(now.saturating_sub(t.birth.no_later_than()));
        }
    }
    (by_state, ages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::cookie_to_diag;
    use crate::kernel::sock_diag::TcpActivity;
    use crate::testing::{diag_socket, loopback_info};
    use connwatch_common::{ConnInfo, FLAG_BIRTH_UNKNOWN};

    const NS: u32 = 4026531840;
    const POD: u32 = 4026532999;

    fn sock(lport: u16, state: TcpState) -> (u32, DiagSocket) {
        (
            NS,
            DiagSocket {
                inode: 0,
                ..diag_socket(
                    Tuple::new(
                        format!("127.0.0.1:{lport}").parse().unwrap(),
                        "127.0.0.1:9000".parse().unwrap(),
                    ),
                    state,
                    u64::from(lport),
                )
            },
        )
    }

    fn entry(lport: u16, birth: u64, flags: u32) -> ConnInfo {
        let mut i = loopback_info(NS, TcpState::ESTABLISHED.0, lport, u64::from(lport));
        i.dport = 9000;
        i.birth_ns = birth;
        i.seen_ns = birth;
        i.state_since_ns = birth;
        i.flags = flags;
        i
    }

    fn items() -> Vec<Item> {
        // The twin of port 2's connection in another namespace: same tuple, another
        // socket, nothing recorded of it.
        let (_, mut twin) = sock(2, TcpState::ESTABLISHED);
        twin.cookie = cookie_to_diag(99);
        // tcp_info says port 2's connection last received data 5 s ago.
        let (_, mut chatty) = sock(2, TcpState::ESTABLISHED);
        chatty.activity = Some(TcpActivity {
            last_data_sent_ms: 20_000,
            last_data_recv_ms: 5_000,
        });
        let live = [
            sock(1, TcpState::ESTABLISHED),
            (NS, chatty),
            sock(3, TcpState::ESTABLISHED),
            sock(4, TcpState::LISTEN),
            sock(5, TcpState::CLOSE_WAIT),
            (POD, twin),
        ];
        let mut map = HashMap::new();
        let mut owned = entry(2, 40 * SEC, 0);
        owned.pid = 77;
        owned.comm[..5].copy_from_slice(b"nginx");
        for e in [
            entry(1, 90 * SEC, 0),
            owned,
            entry(3, 30 * SEC, FLAG_BIRTH_UNKNOWN),
        ] {
            let t = Tracked::from_info(&e).unwrap();
            map.insert(t.id, t);
        }
        local_items(&live, &map, &mut |_| None, 100 * SEC)
    }

    #[test]
    fn a_twin_in_another_namespace_gets_nothing_of_the_host_connection() {
        let items = items();
        let twin = items.iter().find(|i| i.id.netns == POD).unwrap();
        assert_eq!(twin.age_ns, None);
        assert_eq!(twin.owner, None);
        let host = items
            .iter()
            .find(|i| i.id.netns == NS && i.tuple == twin.tuple)
            .unwrap();
        assert_eq!(host.owner.map(|o| o.pid), Some(77));
        let only_pod = Filter {
            netns: vec![POD],
            ..Filter::default()
        };
        assert_eq!(only_pod.apply(items.into_iter()).1, 1);
    }

    #[test]
    fn joins_ages_and_leaves_unknown_ones_unknown() {
        let f = Filter {
            netns: vec![NS],
            ..Filter::default()
        };
        let (items, matched) = f.apply(items().into_iter());
        assert_eq!(matched, 4, "listeners are left out");
        let rows: Vec<Row> = items.iter().map(Item::row).collect();
        assert_eq!(
            rows[0].local, "127.0.0.1:3",
            "a lower bound of 70 s sorts first"
        );
        assert_eq!(rows[0].age_secs, None);
        assert_eq!(rows[0].age_at_least_secs, Some(70.0));
        assert_eq!(rows[1].local, "127.0.0.1:2");
        assert_eq!(rows[1].age_secs, Some(60.0));
        assert_eq!(rows[1].idle_secs, Some(5.0));
        assert_eq!(rows[1].process.as_deref(), Some("nginx"));
        assert_eq!(rows[1].pid, Some(77));
        assert_eq!(rows[2].age_secs, Some(10.0));
        assert_eq!(rows[3].local, "127.0.0.1:5");
        assert_eq!(rows[3].age_secs, None);
        assert_eq!(rows[3].state_secs, None);
    }

    #[test]
    fn filters_sorts_and_limits() {
        let run = |f: Filter| -> Vec<String> {
            f.apply(items().into_iter().filter(|i| i.id.netns == NS))
                .0
                .iter()
                .map(|i| i.tuple.local.port().to_string())
                .collect()
        };
        let f = Filter {
            states: vec![TcpState::CLOSE_WAIT],
            ..Filter::default()
        };
        assert_eq!(run(f), ["5"]);
        let f = Filter {
            older_than: Some(Duration::from_secs(50)),
            ..Filter::default()
        };
        assert_eq!(run(f), ["3", "2"], "a lower bound past the limit counts");
        let f = Filter {
            processes: vec!["nginx".into()],
            ..Filter::default()
        };
        assert_eq!(run(f), ["2"]);
        let f = Filter {
            idle_longer_than: Some(Duration::from_secs(6)),
            ..Filter::default()
        };
        assert_eq!(run(f), ["3", "1"]);
        let f = Filter {
            sort: SortKey::Idle,
            limit: Some(2),
            ..Filter::default()
        };
        assert_eq!(run(f), ["3", "1"]);
        let f = Filter {
            sort: SortKey::State,
            ..Filter::default()
        };
        assert_eq!(run(f), ["5", "3", "2", "1"]);
        let f = Filter {
            ports: vec!["2-3".parse().unwrap()],
            ..Filter::default()
        };
        assert_eq!(run(f), ["3", "2"]);
        let f = Filter {
            remote_addrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            ..Filter::default()
        };
        assert!(run(f).is_empty());
    }

    #[test]
    fn queries_round_trip_and_name_bad_fields() {
        let f = Filter {
            states: vec![TcpState::CLOSE_WAIT],
            ports: vec!["80".parse().unwrap()],
            remote_addrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            processes: vec!["nginx".into()],
            netns: vec![4026531840],
            direction: Some(Direction::In),
            older_than: Some(Duration::from_secs(60)),
            idle_longer_than: None,
            sort: SortKey::Remote,
            limit: Some(5),
        };
        assert_eq!(Query::from_filter(&f).filter().unwrap(), f);
        let bad = Query {
            state: vec!["open".into()],
            ..Query::default()
        };
        assert!(bad.filter().unwrap_err().contains("'open'"));
        let bad = Query {
            older_than_secs: Some(-1.0),
            ..Query::default()
        };
        assert!(bad.filter().unwrap_err().contains("older_than_secs"));
        let e = serde_json::from_str::<Query>(r#"{"colour":"red"}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn ages_fall_in_buckets() {
        let h = age_histogram([5 * SEC, 59 * SEC, 60 * SEC, 700_000 * SEC].into_iter());
        assert_eq!(h, [1, 1, 1, 0, 0, 0, 1]);
        assert_eq!(bucket_label(0), "<10s");
        assert_eq!(bucket_label(3), "<1h");
        assert_eq!(bucket_label(6), ">=1w");
    }
}
