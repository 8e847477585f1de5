//! Figures 2, 6 and 7 measure a host full of idle connections, so they share each
//! population: 100k connections in the default map (2, 6, 7), the same in a map sized
//! for 1M (6), and 500k connections filling that map (2, 6). Every loopback connection
//! is two tracked sockets.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::daemon::Daemon;
use super::fleet::{Fleet, Net, PER_WORKER};
use super::host::Usage;
use super::stats::{bytes, count, median, percent, ratio, secs};
use super::{Bench, Row};

/// The daemon's default map size (connwatch-common's DEFAULT_MAX_CONNS).
pub const DEFAULT_MAP: u32 = 262_144;
const MAP_1M: u32 = 1 << 20;
/// Socket events from elsewhere on the host above which a quiet window is taken again.
const QUIET_EVENTS: u64 = 200;

struct Scenario {
    conns: usize,
    map: u32,
    /// The daemon's policy selects these connections (`--max-age 1h` on their ports), so
    /// it follows each; otherwise it runs the default policy, which gives an established
    /// connection no deadline, and follows none of them.
    selected: bool,
    quiet: bool,
    memory: bool,
    query: bool,
}

/// Daemon CPU and the peers' per poll, for the flatness row.
struct Quiet {
    sockets: u64,
    daemon_per_min: f64,
    tan: f64,
}

pub fn run(b: &mut Bench, fig2: bool, fig6: bool, fig7: bool) -> Result<()> {
    let small = b.size(10_000, 100_000);
    let large = b.size(50_000, 500_000);
    let scenarios = [
        Scenario {
            conns: small,
            map: DEFAULT_MAP,
            selected: true,
            quiet: fig2,
            memory: fig6,
            query: fig7,
        },
        Scenario {
            conns: small,
            map: MAP_1M,
            selected: true,
            quiet: false,
            memory: fig6,
            query: false,
        },
        Scenario {
            conns: large,
            map: MAP_1M,
            selected: true,
            quiet: fig2,
            memory: fig6,
            query: false,
        },
        Scenario {
            conns: small,
            map: DEFAULT_MAP,
            selected: false,
            quiet: false,
            memory: fig6,
            query: false,
        },
    ];
    let mut quiet = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        if !(s.quiet || s.memory || s.query) {
            continue;
        }
        if let Some(q) = scenario(b, s, i as u8)? {
            quiet.push(q);
        }
    }
    if let [a, c] = &quiet[..] {
        b.row(Row {
            figure: 2,
            what: format!(
                "growth of the quiet cost, {} to {} sockets",
                count(a.sockets),
                count(c.sockets)
            ),
            connwatch: format!(
                "{} to {} a minute",
                secs(a.daemon_per_min),
                secs(c.daemon_per_min)
            ),
            peer: format!("`ss -tan` {} to {} a poll", secs(a.tan), secs(c.tan)),
            ratio: format!(
                "{} vs {}",
                ratio(c.daemon_per_min, a.daemon_per_min),
                ratio(c.tan, a.tan)
            ),
            goal: "flat as connections grow".into(),
            met: Some(c.daemon_per_min <= 1.5 * a.daemon_per_min + 0.002),
        });
    }
    Ok(())
}

fn scenario(b: &mut Bench, s: &Scenario, group: u8) -> Result<Option<Quiet>> {
    let net = Net { figure: 2, group };
    b.quiet(2);
    let policy: Vec<String> = if s.selected {
        vec![
            "--max-age".into(),
            "1h".into(),
            "--port".into(),
            net.port_arg(),
        ]
    } else {
        Vec::new()
    };
    let mut d = Daemon::start(
        &b.connwatch,
        &b.tools,
        &policy,
        Some(s.map),
        b.log_path(&format!("pop{group}-daemon.log")),
    )?;
    let m0 = b.tools.maps()?;
    let t = Instant::now();
    let workers = s.conns.div_ceil(PER_WORKER);
    let per = s.conns.div_ceil(workers);
    let mut fleet = Fleet::spawn(b.loadgen(), net, workers, "conns", 3600, |i| {
        vec!["--count".into(), per.min(s.conns - per * i).to_string()]
    })?;
    let ready = fleet.expect("ready")?;
    let opened: u64 = ready
        .iter()
        .filter_map(|f| f.first()?.parse::<u64>().ok())
        .sum();
    let open_time = t.elapsed();
    let settled = d.settle(Duration::from_secs(2), 20_000_000, Duration::from_secs(300));
    let m = b.tools.maps()?;
    let sockets = m.entries;
    b.note(
        2,
        format!(
            "population {group}: {} connections on {} workers in {:.1} s, daemon settled {:.1} s later; map of {} holds {} entries; {} events lost, {} unrecorded, {} reconciles",
            count(opened),
            fleet.len(),
            open_time.as_secs_f64(),
            settled.as_secs_f64(),
            count(m.conns_max),
            count(sockets),
            m.ring_full - m0.ring_full,
            m.map_full - m0.map_full,
            d.count("reconciled with the kernel")
        ),
    );

    let mut out = None;
    if s.quiet {
        out = Some(quiet(b, &d, sockets)?);
    }
    if s.memory {
        // The ring's pages the daemon has mapped are in the maps' memlock already.
        let rss = d.own_rss();
        // The first sightings of sockets older than the daemon live in a file on tmpfs:
        // memory too.
        let kept = std::fs::metadata("/run/connwatch.first-seen").map_or(0, |f| f.len());
        let total = (m.memlock + rss + kept) as f64;
        let per = total / sockets.max(1) as f64;
        b.row(Row {
            figure: 6,
            what: format!(
                "memory per tracked socket, {} sockets, map sized {}, {}",
                count(sockets),
                count(m.conns_max),
                if s.selected {
                    "every one followed (`--max-age 1h` on their ports)"
                } else {
                    "none followed (the default policy)"
                }
            ),
            connwatch: format!(
                "{per:.0} B (maps {} + RSS {})",
                bytes(m.memlock as f64),
                bytes(rss as f64)
            ),
            peer: "-".into(),
            ratio: "-".into(),
            goal: "<= 256 B a socket".into(),
            met: Some(per <= 256.0),
        });
        b.note(
            6,
            format!(
                "{} sockets: connection map {} ({:.0} B a socket it holds: allocated as used, its bucket array sized by capacity), the other maps {} (the event ring, the listeners, the counters, the filter, the log ring), the first sightings file {} B, daemon RSS {} ({:.0} B a socket) without the ring pages it maps, which the maps count already (with them {}); of it anonymous {} (the rest the binary's code and libraries, page cache)",
                count(sockets),
                bytes(m.conns_memlock as f64),
                m.conns_memlock as f64 / sockets.max(1) as f64,
                bytes((m.memlock - m.conns_memlock) as f64),
                kept,
                bytes(rss as f64),
                rss as f64 / sockets.max(1) as f64,
                bytes(d.rss() as f64),
                bytes(d.anon_rss() as f64)
            ),
        );
    }
    if s.query {
        query(b, &d, sockets)?;
    }
    fleet.quit()?;
    d.settle(Duration::from_secs(1), 5_000_000, Duration::from_secs(120));
    d.stop()?;
    Ok(out)
}

/// Figure 2: daemon CPU over the window while `ss -tan` and `ss -tanp` poll twice.
fn quiet(b: &mut Bench, d: &Daemon, sockets: u64) -> Result<Quiet> {
    let window = b.size(10.0, 60.0);
    b.quiet(2);
    let tanp_limit = Duration::from_secs(b.size(60, 150));
    // The kernel program sees every TCP socket on the host, other namespaces'
    // included: socket events from other work are counted, and a window that had
    // many is measured again (up to three times; the quietest counts).
    let ev0 = b.tools.maps()?.events;
    let cpu0 = d.cpu_ns();
    let t0 = Instant::now();
    let mut tan = Vec::new();
    let mut tanp: Vec<Usage> = Vec::new();
    for k in 0..2 {
        let at = Duration::from_secs_f64(window / 2.0 * k as f64);
        if let Some(rest) = at.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
        tan.push(
            b.tools
                .rusage(&["ss", "-tan"], None, Duration::from_secs(120))?,
        );
        // A poll that had to be stopped at the limit is not run again: the second
        // one would be stopped too.
        if !tanp.iter().any(|u| u.timed_out) {
            tanp.push(b.tools.rusage(&["ss", "-tanp"], None, tanp_limit)?);
        }
    }
    if let Some(rest) = Duration::from_secs_f64(window).checked_sub(t0.elapsed()) {
        std::thread::sleep(rest);
    }
    let mut elapsed = t0.elapsed().as_secs_f64();
    let mut daemon = (d.cpu_ns() - cpu0) as f64 / 1e9;
    let mut events = b.tools.maps()?.events - ev0;
    let mut windows = 1;
    while events > QUIET_EVENTS && windows < 3 {
        b.quiet(2);
        let ev0 = b.tools.maps()?.events;
        let cpu0 = d.cpu_ns();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(window));
        let ev = b.tools.maps()?.events - ev0;
        windows += 1;
        if ev < events {
            events = ev;
            elapsed = t0.elapsed().as_secs_f64();
            daemon = (d.cpu_ns() - cpu0) as f64 / 1e9;
        }
    }
    let per_min = daemon / elapsed * 60.0;
    let tan_poll = median(&tan.iter().map(|u| u.cpu).collect::<Vec<_>>()).unwrap_or(0.0);
    let tanp_poll = median(&tanp.iter().map(|u| u.cpu).collect::<Vec<_>>()).unwrap_or(0.0);
    let tanp_cut = tanp.iter().any(|u| u.timed_out);
    // Polled every 30 s: two polls a minute.
    let (tan_min, tanp_min) = (2.0 * tan_poll, 2.0 * tanp_poll);
    b.row(Row {
        figure: 2,
        what: format!("quiet host, {} idle sockets: CPU a minute", count(sockets)),
        connwatch: secs(per_min),
        peer: format!(
            "`ss -tan` {}, `ss -tanp` {}{} (polled every 30 s)",
            secs(tan_min),
            if tanp_cut { "> " } else { "" },
            secs(tanp_min)
        ),
        ratio: format!("{} of ss -tan", percent(per_min, tan_min)),
        goal: "< 1% of ss -tan".into(),
        met: Some(per_min < 0.01 * tan_min),
    });
    b.note(
        2,
        format!(
            "{} sockets: daemon {:.2} ms of CPU in {elapsed:.1} s ({events} socket events elsewhere on the host in that window; {windows} windows measured); ss -tan a poll {} CPU ({} wall); ss -tanp a poll {}{} CPU ({} wall{})",
            count(sockets),
            daemon * 1e3,
            secs(tan_poll),
            secs(tan[0].wall),
            if tanp_cut { "> " } else { "" },
            secs(tanp_poll),
            secs(tanp[0].wall),
            if tanp_cut { ", stopped at the limit" } else { "" }
        ),
    );
    Ok(Quiet {
        sockets,
        daemon_per_min: per_min,
        tan: tan_poll,
    })
}

/// Figure 7: `connwatch list --sort age --limit 100` against `ss -tan`, three runs each,
/// medians. While a daemon runs, `list` asks it through its control socket, so the
/// daemon's CPU during the call is counted with the client's.
fn query(b: &mut Bench, d: &Daemon, sockets: u64) -> Result<()> {
    let cw = b.connwatch.display().to_string();
    let limit = Duration::from_secs(300);
    b.quiet(7);
    let runs = |cmd: &[&str], daemon: Option<&Daemon>| -> Result<(f64, f64, u64)> {
        let mut wall = Vec::new();
        let mut cpu = Vec::new();
        let mut rss = 0;
        for _ in 0..3 {
            let d0 = daemon.map_or(0, Daemon::cpu_ns);
            let u = b.tools.rusage(cmd, None, limit)?;
            let served = daemon.map_or(0, |d| d.cpu_ns() - d0) as f64 / 1e9;
            if u.exit != 0 {
                eprintln!("bench: {} exited with status {}", cmd.join(" "), u.exit);
            }
            wall.push(u.wall);
            cpu.push(u.cpu + served);
            rss = rss.max(u.maxrss_kb);
        }
        Ok((
            median(&wall).unwrap_or(0.0),
            median(&cpu).unwrap_or(0.0),
            rss,
        ))
    };
    let (top_wall, top_cpu, _) = runs(&[&cw, "list", "--sort", "age", "--limit", "100"], Some(d))?;
    let (json_wall, json_cpu, json_rss) = runs(&[&cw, "list", "--json"], Some(d))?;
    let (table_wall, table_cpu, _) = runs(&[&cw, "list"], Some(d))?;
    let (ss_wall, ss_cpu, ss_rss) = runs(&["ss", "-tan"], None)?;
    b.row(Row {
        figure: 7,
        what: format!(
            "`connwatch list --sort age --limit 100`, {} sockets tracked",
            count(sockets)
        ),
        connwatch: format!(
            "{} ({} CPU, daemon's included)",
            secs(top_wall),
            secs(top_cpu)
        ),
        peer: format!("{} ({} CPU) `ss -tan`", secs(ss_wall), secs(ss_cpu)),
        ratio: ratio(top_wall, ss_wall),
        goal: "< 1 s, < 2x ss -tan".into(),
        met: Some(top_wall < 1.0 && top_wall < 2.0 * ss_wall),
    });
    b.note(
        7,
        format!(
            "every connection: `connwatch list --json` {} wall ({} CPU), `connwatch list` (table) {} wall ({} CPU); peak RSS of the client: list --json {}, ss -tan {}",
            secs(json_wall),
            secs(json_cpu),
            secs(table_wall),
            secs(table_cpu),
            bytes(json_rss as f64 * 1024.0),
            bytes(ss_rss as f64 * 1024.0)
        ),
    );
    Ok(())
}
