//! Figures 1, 3, 4 and 5: the data path, deadlines, mass destroy, churn.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::daemon::{Daemon, NoDaemon};
use super::fleet::{Fleet, Net, PER_WORKER};
use super::stats::{count, median, percent, percentile, ratio, secs};
use super::{Bench, Row};

fn start(b: &Bench, args: &[String], log: &str) -> Result<Daemon> {
    Daemon::start(&b.connwatch, &b.tools, args, None, b.log_path(log))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Figure 1: loopback request/response, connection-per-request and bulk rates with and
/// without connwatch attached, alternating, the order flipped every round.
pub fn data_path(b: &mut Bench) -> Result<()> {
    const TESTS: [(&str, &str); 3] = [
        (
            "rr",
            "request/response on 8 persistent connections (transactions/s)",
        ),
        (
            "crr",
            "connection per request: connect, request, response, close (connections/s)",
        ),
        ("bulk", "bulk throughput on 2 connections (GB/s)"),
    ];
    let rounds = b.size(2, 5);
    let window = b.size(1.5, 4.0);
    let net = Net {
        figure: 1,
        group: 0,
    };
    let mut with = vec![Vec::new(); TESTS.len()];
    let mut without = vec![Vec::new(); TESTS.len()];
    let mut daemon_cpu = vec![Vec::new(); TESTS.len()];
    let mut retried = 0;
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            // Without: the lock keeps daemons of this host's mount namespace away, and
            // the programs of daemons in other namespaces must be gone too.
            let (daemon, _none, expect) = if on {
                let d = start(
                    b,
                    &args(&["--idle", "10m", "--port", &net.port_arg()]),
                    "fig1-daemon.log",
                )?;
                let mine = b.tools.progs()?.len();
                (Some(d), None, mine)
            } else {
                (None, Some(NoDaemon::hold(&b.connwatch, &b.tools)?), 0)
            };
            for (t, (test, _)) in TESTS.iter().enumerate() {
                for attempt in 0.. {
                    b.quiet(1);
                    if daemon.is_none() {
                        b.tools.wait_no_progs(Duration::from_secs(180))?;
                    }
                    let cpu0 = daemon.as_ref().map_or(0, Daemon::cpu_ns);
                    let rate = load_rate(b, net, test, window)?;
                    // Someone else's daemon attached meanwhile: measure again.
                    if b.tools.progs()?.len() > expect && attempt < 3 {
                        retried += 1;
                        continue;
                    }
                    if let Some(d) = &daemon {
                        daemon_cpu[t].push((d.cpu_ns() - cpu0) as f64 / 1e9 / window);
                        with[t].push(rate);
                    } else {
                        without[t].push(rate);
                    }
                    break;
                }
            }
            drop(daemon);
        }
    }
    if retried > 0 {
        b.note(
            1,
            format!("{retried} samples were taken again: another daemon's programs attached during them"),
        );
    }
    for (t, (test, what)) in TESTS.iter().enumerate() {
        let (on, off) = (
            median(&with[t]).unwrap_or(0.0),
            median(&without[t]).unwrap_or(0.0),
        );
        let show = |v: f64| {
            if *test == "bulk" {
                format!("{:.2} GB/s", v / 1e9)
            } else {
                format!("{}/s", count(v as u64))
            }
        };
        b.row(Row {
            figure: 1,
            what: (*what).into(),
            connwatch: show(on),
            peer: format!("{} without connwatch", show(off)),
            ratio: percent(on, off),
            goal: ">= 98% of the rate without".into(),
            met: Some(off > 0.0 && on / off >= 0.98),
        });
        b.note(
            1,
            format!(
                "{test}: {rounds} rounds of {window} s; with {:?}, without {:?}; daemon CPU while on: {:.1}% of a core",
                with[t].iter().map(|v| *v as u64).collect::<Vec<_>>(),
                without[t].iter().map(|v| *v as u64).collect::<Vec<_>>(),
                median(&daemon_cpu[t]).unwrap_or(0.0) * 100.0
            ),
        );
    }
    program_costs(b, net, window)
}

/// Where the data-path cost goes: one more pass with connwatch attached and the
/// kernel's BPF run statistics on, giving each program's runs and time per
/// transaction. (The statistics cost a little themselves, so this pass is kept out
/// of the rates above.)
fn program_costs(b: &mut Bench, net: Net, window: f64) -> Result<()> {
    let mut sysctls = super::host::Sysctls::default();
    sysctls.set("kernel.bpf_stats_enabled", "1")?;
    let d = start(
        b,
        &args(&["--idle", "10m", "--port", &net.port_arg()]),
        "fig1-stats-daemon.log",
    )?;
    for test in ["rr", "crr", "bulk"] {
        b.quiet(1);
        let before = b.tools.progs()?;
        let cpu0 = d.cpu_ns();
        let rate = load_rate(b, net, test, window)?;
        let cpu = (d.cpu_ns() - cpu0) as f64 / 1e9 / window;
        let after = b.tools.progs()?;
        let units = rate * window;
        let unit = match test {
            "bulk" => "GB",
            "rr" => "transaction",
            _ => "connection",
        };
        let scale = if test == "bulk" { units / 1e9 } else { units };
        let mut parts = Vec::new();
        let mut total_ns = 0.0;
        for (name, runs, ns) in &after {
            let (r0, n0) = before
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or((0, 0), |(_, r, t)| (*r, *t));
            let (runs, ns) = (runs.saturating_sub(r0) as f64, ns.saturating_sub(n0) as f64);
            if runs == 0.0 {
                continue;
            }
            total_ns += ns;
            parts.push(format!(
                "{name} {:.1} runs x {:.0} ns",
                runs / scale,
                ns / runs
            ));
        }
        b.note(
            1,
            format!(
                "{test}, BPF run statistics on: per {unit}, {} = {:.2} us of program time; daemon CPU {:.1}% of a core",
                parts.join(", "),
                total_ns / scale / 1e3,
                cpu * 100.0
            ),
        );
    }
    drop(d);
    drop(sysctls);
    Ok(())
}

/// One timed load: two workers, started together; their summed rate.
fn load_rate(b: &Bench, net: Net, test: &str, window: f64) -> Result<f64> {
    let w = window.to_string();
    let mut fleet = Fleet::spawn(b.loadgen(), net, 2, test, 600, |_| match test {
        "rr" => args(&["--secs", &w, "--conns", "4"]),
        _ => args(&["--secs", &w]),
    })?;
    fleet.expect("ready")?;
    fleet.send("go")?;
    let results = fleet.expect("result")?;
    let mut rate = 0.0;
    for f in results {
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        rate += n(0) / (n(1) / 1e9);
        if test == "crr" && n(2) > 0.0 {
            eprintln!(
                "bench: crr worker had {} connect errors: {}",
                n(2),
                f[4..].join(" ")
            );
        }
    }
    fleet.quit()?;
    Ok(rate)
}

/// Opens `n` connections over `spread` seconds on `workers` workers, waits for all
/// of them to end, and returns each one's delay from its deadline (open + max_age) to
/// its peer seeing the reset, plus how many never ended.
fn deadline_run(
    b: &Bench,
    net: Net,
    n: usize,
    spread: f64,
    max_age: f64,
) -> Result<(Vec<f64>, u64)> {
    let workers = 4;
    let per = n / workers;
    let rate = (per as f64 / spread).to_string();
    let mut fleet = Fleet::spawn(b.loadgen(), net, workers, "conns", 600, |_| {
        args(&["--count", &per.to_string(), "--rate", &rate])
    })?;
    let ready = fleet.expect("ready")?;
    let errors: u64 = ready
        .iter()
        .filter_map(|f| f.get(1)?.parse::<u64>().ok())
        .sum();
    if errors > 0 {
        eprintln!("bench: {errors} connections failed to open: {ready:?}");
    }
    let want = (per * workers) as u64;
    fleet.wait_ended(want, Duration::from_secs_f64(max_age + 10.0))?;
    let pairs = fleet.dump()?;
    fleet.quit()?;
    let age_ns = (max_age * 1e9) as u64;
    let mut lat = Vec::new();
    let mut never = 0;
    for (open, reset, end) in pairs {
        let seen = if reset > 0 { reset } else { end };
        if seen == 0 {
            never += 1;
            continue;
        }
        lat.push((seen as f64 - (open + age_ns) as f64) / 1e9);
    }
    Ok((lat, never))
}

/// Figure 3: 10k connections whose deadlines fall over 10 s; from each deadline to the
/// peer seeing the reset. The peer is a sock_diag poll every second (tcp_closer's way).
pub fn deadline(b: &mut Bench) -> Result<()> {
    let n = b.size(1_000, 10_000);
    let spread = b.size(2.0, 10.0);
    let max_age = 3.0;
    let net = Net {
        figure: 3,
        group: 0,
    };
    b.quiet(3);
    let mut d = start(
        b,
        &args(&[
            "--max-age",
            "3s",
            "--local-port",
            &net.port_arg(),
            "--enforce",
        ]),
        "fig3-daemon.log",
    )?;
    let (cw, cw_never) = deadline_run(b, net, n, spread, max_age)?;
    let destroyed = d.count("destroyed ");
    d.stop()?;

    let peer_net = Net {
        figure: 3,
        group: 1,
    };
    let (lo, hi) = peer_net.ports();
    b.quiet(3);
    let _none = NoDaemon::hold(&b.connwatch, &b.tools)?;
    let poller = std::process::Command::new(b.loadgen())
        .args(["pollkill", "--lo", &lo.to_string(), "--hi", &hi.to_string()])
        .args(["--max-age-ms", "3000", "--period-ms", "1000"])
        .args(["--secs", &(spread + max_age + 6.0).to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run loadgen pollkill")?;
    let (peer, peer_never) = deadline_run(b, peer_net, n, spread, max_age)?;
    let poll_out = poller.wait_with_output()?;
    let poll_line = String::from_utf8_lossy(&poll_out.stdout).trim().to_string();

    let p = |v: &[f64], q: f64| percentile(v, q).unwrap_or(f64::NAN);
    let cw99 = p(&cw, 99.0);
    b.row(Row {
        figure: 3,
        what: format!(
            "{} connections, deadlines over {spread} s: deadline to peer's reset, p99",
            count(n as u64)
        ),
        connwatch: secs(cw99),
        peer: format!("{} (sock_diag poll every 1 s)", secs(p(&peer, 99.0))),
        ratio: ratio(cw99, p(&peer, 99.0)),
        goal: "p99 < 50 ms".into(),
        met: Some(cw_never == 0 && cw99 < 0.050),
    });
    b.note(
        3,
        format!(
            "connwatch: p50 {}, p99 {}, max {}, {} never reset, {destroyed} destroy lines; peer: p50 {}, max {}, {peer_never} never reset ({poll_line})",
            secs(p(&cw, 50.0)),
            secs(cw99),
            secs(p(&cw, 100.0)),
            cw_never,
            secs(p(&peer, 50.0)),
            secs(p(&peer, 100.0)),
        ),
    );
    Ok(())
}

/// Opens `n` idle connections on enough workers.
fn hold(b: &Bench, net: Net, n: usize) -> Result<(Fleet, u64)> {
    let workers = n.div_ceil(PER_WORKER);
    let per = n.div_ceil(workers);
    let mut fleet = Fleet::spawn(b.loadgen(), net, workers, "conns", 1800, |i| {
        let c = per.min(n - per * i);
        args(&["--count", &c.to_string()])
    })?;
    let ready = fleet.expect("ready")?;
    let opened: u64 = ready
        .iter()
        .filter_map(|f| f.first()?.parse::<u64>().ok())
        .sum();
    Ok((fleet, opened))
}

/// Figure 4: 100k connections due at once (born before the daemon, so all are seeded
/// with the same first sighting), against `ss -K` on an identical set.
pub fn mass_destroy(b: &mut Bench) -> Result<()> {
    let n = b.size(10_000, 100_000);
    let net = Net {
        figure: 4,
        group: 0,
    };
    b.quiet(4);
    // A fresh host: no map, no program (a pinned link would record the births).
    b.tools
        .cleanup(&b.connwatch, Duration::from_secs(20 * 60))?;
    let (mut fleet, opened) = hold(b, net, n)?;
    // Every connection is past its max-age when the daemon starts, so all are due
    // at once, whether their births are known or not.
    std::thread::sleep(Duration::from_secs(6));
    let mut d = start(
        b,
        &args(&[
            "--max-age",
            "5s",
            "--local-port",
            &net.port_arg(),
            "--enforce",
        ]),
        "fig4-daemon.log",
    )?;
    let cpu0 = d.cpu_ns();
    let r = fleet.wait_ended(opened, Duration::from_secs(180))?;
    d.settle(Duration::from_secs(1), 5_000_000, Duration::from_secs(60));
    let cpu = (d.cpu_ns() - cpu0) as f64 / 1e9;
    let destroyed = d.count("destroyed ");
    let failed = d.count("failed to destroy");
    d.stop()?;
    fleet.quit()?;
    let span = (r.last_end.saturating_sub(r.first_end)) as f64 / 1e9;

    let peer_net = Net {
        figure: 4,
        group: 1,
    };
    b.quiet(4);
    let _none = NoDaemon::hold(&b.connwatch, &b.tools)?;
    let (mut fleet, peer_opened) = hold(b, peer_net, n)?;
    let (lo, hi) = peer_net.ports();
    let filter = format!("dport >= :{lo} and dport <= :{hi}");
    let usage = b.tools.rusage(
        &["ss", "-K", "-tn", &filter],
        None,
        Duration::from_secs(600),
    )?;
    if usage.exit != 0 {
        eprintln!("bench: ss -K exited with status {}", usage.exit);
    }
    let pr = fleet.wait_ended(peer_opened, Duration::from_secs(60))?;
    fleet.quit()?;
    let peer_span = (pr.last_end.saturating_sub(pr.first_end)) as f64 / 1e9;

    let rate = r.ended as f64 / span;
    let peer_rate = pr.ended as f64 / peer_span;
    b.row(Row {
        figure: 4,
        what: format!(
            "{} connections due at once: first to last reset",
            count(opened)
        ),
        connwatch: format!("{} ({}/s)", secs(span), count(rate as u64)),
        peer: format!(
            "{} ({}/s) `ss -K`",
            secs(peer_span),
            count(peer_rate as u64)
        ),
        ratio: ratio(span, peer_span),
        goal: "< 0.7 s, twice ss -K's rate".into(),
        met: Some(r.ended == opened && span < 0.7 && rate >= 2.0 * peer_rate),
    });
    b.note(
        4,
        format!(
            "connwatch: {} of {} ended ({} resets seen), {destroyed} destroyed, {failed} failed, daemon CPU {cpu:.2} s; ss -K: {} of {} ended, wall {}, CPU {:.2} s",
            r.ended,
            opened,
            r.resets,
            pr.ended,
            peer_opened,
            secs(usage.wall),
            usage.cpu
        ),
    );
    Ok(())
}

/// Figure 9: `connwatch sweep` (one dump, the policy, the destroys, exit) against
/// `ss -K` (one dump destroying what its filter matches: the one-shot inet_diag
/// dump-and-destroy tools such as tcp_closer work so) on identical sets of idle
/// connections; each tool's own run time.
pub fn sweep(b: &mut Bench) -> Result<()> {
    let n = b.size(5_000, 20_000);
    // Eleven: single rounds' ratios range from 0.8x to 1.5x on a shared machine.
    let rounds = b.size(2, 11);
    // Wall and CPU seconds of each round, ours then the peer's; who goes first flips
    // each round, so a machine slowing down or speeding up favours neither.
    let mut walls: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpus: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut ended_all = [true; 2];
    let mut rss = [0u64; 2];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for ours in order {
            let group = u8::from(!ours);
            let net = Net { figure: 9, group };
            b.quiet(9);
            // A fresh host, and no daemon: the sweep alone reads the kernel.
            let _none = NoDaemon::hold(&b.connwatch, &b.tools)?;
            let (mut fleet, opened) = hold(b, net, n)?;
            std::thread::sleep(Duration::from_secs(2));
            let (lo, hi) = net.ports();
            let cw = b.connwatch.display().to_string();
            let port = net.port_arg();
            let filter = format!("dport >= :{lo} and dport <= :{hi}");
            let cmd: Vec<&str> = if ours {
                vec![
                    &cw,
                    "sweep",
                    "--idle",
                    "1s",
                    "--local-port",
                    &port,
                    "--enforce",
                ]
            } else {
                vec!["ss", "-K", "-tn", &filter]
            };
            let out = b.dir.join(format!("fig9-{group}.out"));
            let usage = b.tools.rusage(&cmd, Some(&out), Duration::from_secs(600))?;
            let ended = fleet.wait_ended(opened, Duration::from_secs(60))?;
            fleet.quit()?;
            if usage.exit != 0 {
                eprintln!("bench: {} exited with status {}", cmd[0], usage.exit);
            }
            let i = usize::from(group);
            if ended.ended != opened {
                eprintln!(
                    "bench: round {round}: {} of {opened} connections ended after {}",
                    ended.ended,
                    if ours { "connwatch sweep" } else { "ss -K" }
                );
                ended_all[i] = false;
            }
            walls[i].push(usage.wall);
            cpus[i].push(usage.cpu);
            rss[i] = rss[i].max(usage.maxrss_kb);
        }
    }
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    let (ours, peer) = (med(&walls[0]), med(&walls[1]));
    // Each round's own ratio (its two runs back to back): the machine's speed drifts
    // by a third between rounds, which a ratio of medians takes in.
    let paired: Vec<f64> = walls[0]
        .iter()
        .zip(&walls[1])
        .filter(|(_, p)| **p > 0.0)
        .map(|(o, p)| o / p)
        .collect();
    let paired_median = med(&paired);
    let ms = |v: &[f64]| {
        v.iter()
            .map(|w| format!("{:.0}", w * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    b.row(Row {
        figure: 9,
        what: format!(
            "sweep of {} idle connections: run time, median of {rounds} rounds (ratio: median of the rounds' own)",
            count(n as u64)
        ),
        connwatch: format!("{} (CPU {:.2} s)", secs(ours), med(&cpus[0])),
        peer: format!("{} (CPU {:.2} s) `ss -K`", secs(peer), med(&cpus[1])),
        ratio: format!("{paired_median:.2}x"),
        goal: "no slower than a one-shot dump-and-destroy".into(),
        met: Some(ended_all[0] && paired_median <= 1.0),
    });
    b.note(
        9,
        format!(
            "rounds (ms): connwatch sweep [{}], ss -K [{}], ratios [{}]; every connection ended in every round: {} and {}; max RSS {} KiB and {} KiB",
            ms(&walls[0]),
            ms(&walls[1]),
            paired
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            ended_all[0],
            ended_all[1],
            rss[0],
            rss[1]
        ),
    );
    Ok(())
}

/// Figure 5: short connections at a fixed rate, every 200th held open until the
/// daemon's max-age destroys it. At the end the map and `list` must match the kernel,
/// and every held connection must have been destroyed.
pub fn churn(b: &mut Bench) -> Result<()> {
    let rate = b.size(5_000.0, 20_000.0);
    let window = b.size(10.0, 60.0);
    let max_age = b.size(5.0, 20.0);
    let workers = 4;
    let keep_every = 200;
    let net = Net {
        figure: 5,
        group: 0,
    };
    b.quiet(5);
    let (lo, hi) = net.ports();
    let mut d = start(
        b,
        &args(&[
            "--max-age",
            &format!("{max_age}s"),
            "--local-port",
            &net.port_arg(),
            "--enforce",
        ]),
        "fig5-daemon.log",
    )?;
    let m0 = b.tools.maps()?;
    let per_rate = (rate / workers as f64).to_string();
    let mut fleet = Fleet::spawn(b.loadgen(), net, workers, "crr", 1200, |_| {
        args(&[
            "--secs",
            &window.to_string(),
            "--rate",
            &per_rate,
            "--keep-every",
            &keep_every.to_string(),
        ])
    })?;
    fleet.expect("ready")?;
    let cpu0 = d.cpu_ns();
    fleet.send("go")?;
    let t0 = Instant::now();
    let results = fleet.expect("result")?;
    let cpu = (d.cpu_ns() - cpu0) as f64 / 1e9;
    let (mut done, mut errors, mut kept) = (0u64, 0u64, 0u64);
    for f in &results {
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        done += n(0);
        errors += n(2);
        kept += n(3);
    }
    let reached = (done + kept) as f64 / window;

    // The short connections are gone; the held ones younger than max-age are live.
    std::thread::sleep(Duration::from_secs(2));
    let list_path = b.log_path("fig5-list.json");
    let cw = b.connwatch.display().to_string();
    let list = b.tools.rusage(
        &[&cw, "list", "--json"],
        Some(&list_path),
        Duration::from_secs(120),
    )?;
    let live = b.tools.agree(lo, hi, Some(&b.connwatch))?;

    // Every held connection is due by now plus a margin.
    let due = Duration::from_secs_f64(window + max_age + 3.0);
    if let Some(rest) = due.checked_sub(t0.elapsed()) {
        std::thread::sleep(rest);
    }
    let r = fleet.wait_ended(kept, Duration::from_secs(10))?;
    let pairs = fleet.dump()?;
    let age_ns = (max_age * 1e9) as u64;
    let lat: Vec<f64> = pairs
        .iter()
        .filter(|p| p.2 > 0)
        .map(|&(open, reset, end)| {
            let seen = if reset > 0 { reset } else { end };
            (seen as f64 - (open + age_ns) as f64) / 1e9
        })
        .collect();
    let after = b.tools.agree(lo, hi, None)?;
    let m1 = b.tools.maps()?;
    let drop_reports = d.count("dropped records");
    let reconciles = d.count("reconciled with the kernel");
    let destroyed = d.count("destroyed ");
    d.stop()?;
    fleet.quit()?;

    let ring_full = m1.ring_full - m0.ring_full;
    let map_full = m1.map_full - m0.map_full;
    b.row(Row {
        figure: 5,
        what: format!("churn: new short connections a second for {window} s"),
        connwatch: format!("{}/s reached ({errors} errors)", count(reached as u64)),
        peer: "-".into(),
        ratio: "-".into(),
        goal: format!("{}/s", count(rate as u64)),
        met: Some(reached >= 0.98 * rate),
    });
    let agree_ok = live.missing == 0
        && live.stale == 0
        && live.state_diff == 0
        && live.list_missing == 0
        && live.list_extra == 0
        && live.list_unknown_age == 0
        && after.missing == 0
        && after.stale == 0;
    b.row(Row {
        figure: 5,
        what: "after churn: map and `list` against the kernel; held connections destroyed".into(),
        connwatch: format!(
            "{} live: {} missing, {} stale; list {} missing, {} extra; {} of {} held destroyed",
            live.kernel,
            live.missing,
            live.stale,
            live.list_missing,
            live.list_extra,
            r.ended,
            kept
        ),
        peer: "-".into(),
        ratio: "-".into(),
        goal: "none lost, none stale".into(),
        met: Some(agree_ok && r.ended == kept),
    });
    b.row(Row {
        figure: 5,
        what: "kernel-side drops during churn".into(),
        connwatch: format!(
            "{ring_full} events lost (ring full), {map_full} sockets unrecorded (map full); {drop_reports} reported, {reconciles} reconciles"
        ),
        peer: "-".into(),
        ratio: "-".into(),
        goal: "reported and recovered".into(),
        met: Some((ring_full == 0 && map_full == 0) || (drop_reports > 0 && agree_ok)),
    });
    b.note(
        5,
        format!(
            "{done} short + {kept} held connections; daemon CPU {cpu:.1} s over {window} s ({:.0}% of a core); held ones destroyed {} after their deadline at p99 (max {}), {destroyed} destroy lines; list took {}; live check: {}; after: {}",
            cpu / window * 100.0,
            secs(percentile(&lat, 99.0).unwrap_or(f64::NAN)),
            secs(percentile(&lat, 100.0).unwrap_or(f64::NAN)),
            secs(list.wall),
            live.line,
            after.line
        ),
    );
    Ok(())
}
