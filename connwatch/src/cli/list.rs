//! `connwatch list`: the live connections, their ages, time in state, idle time, owner
//! and, while a daemon runs, the rule that will apply next.
//!
//! With a daemon the list comes from it through the control API: it already knows every
//! socket, filters, sorts and cuts the list where it is, and adds each connection's next
//! deadline. Without one, the view is built here from the kernel
//! ([`crate::observe::view::read_local`]).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

use crate::clock::human;
use crate::control::client::Client;
use crate::control::protocol::list_request;
use crate::kernel::netns;
use crate::observe::view::{read_local, Filter, Item, Query, Row};

/// `4m12s`, `>4m12s` for a lower bound, `-` when unknown.
pub fn show_age(secs: Option<f64>, at_least: Option<f64>) -> String {
    match (secs, at_least) {
        (Some(s), _) => human(Duration::from_secs_f64(s)),
        (None, Some(s)) => format!(">{}", human(Duration::from_secs_f64(s))),
        _ => "-".into(),
    }
}

fn show(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| human(Duration::from_secs_f64(s)))
}

/// A byte count in at most four characters: `512`, `9.7K`, `340K`, `1.2M`, `12G`; `-`
/// when unknown.
pub fn show_bytes(n: Option<u64>) -> String {
    let Some(n) = n else { return "-".into() };
    if n < 1000 {
        return n.to_string();
    }
    let mut v = n as f64;
    for unit in ["K", "M", "G", "T", "P", "E"] {
        v /= 1024.0;
        if v < 9.95 {
            return format!("{v:.1}{unit}");
        }
        if v < 999.5 {
            return format!("{v:.0}{unit}");
        }
    }
    format!("{v:.0}E")
}

/// What the NEXT column says: `max-age in 4m12s`, `idle due`, `never (port 22)`, `-`.
pub fn show_next(r: &Row) -> String {
    match (&r.next_rule, r.next_in_secs, &r.protected) {
        (_, _, Some(p)) => format!("never ({p})"),
        (Some(rule), Some(s), _) if s <= 0.0 => format!("{rule} due"),
        (Some(rule), Some(s), _) => format!("{rule} in {}", show(Some(s))),
        _ => "-".into(),
    }
}

/// The rows as a table for people.
pub fn table(
    rows: &[Row],
    netns_name: &dyn Fn(u32) -> String,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let w = |f: &dyn Fn(&Row) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let namespaces: Vec<String> = rows.iter().map(|r| netns_name(r.netns)).collect();
    let nw = namespaces.iter().map(|n| n.len()).max().unwrap_or(0).max(5);
    let lw = w(&|r| r.local.len(), 5);
    let rw = w(&|r| r.remote.len(), 6);
    let owners: Vec<String> = rows
        .iter()
        .map(|r| match (&r.process, r.pid) {
            (Some(p), Some(pid)) => format!("{p}({pid})"),
            _ => "-".into(),
        })
        .collect();
    let pw = owners.iter().map(|o| o.len()).max().unwrap_or(0).max(7);
    writeln!(
        out,
        "{:<11} {:<nw$} {:<lw$} {:<rw$} {:>8} {:>8} {:>8} {:>5} {:>5} {:<pw$} NEXT",
        "STATE", "NETNS", "LOCAL", "REMOTE", "AGE", "IN-STATE", "IDLE", "IN", "OUT", "PROCESS"
    )?;
    for ((r, owner), ns) in rows.iter().zip(&owners).zip(&namespaces) {
        writeln!(
            out,
            "{:<11} {:<nw$} {:<lw$} {:<rw$} {:>8} {:>8} {:>8} {:>5} {:>5} {:<pw$} {}",
            r.state,
            ns,
            r.local,
            r.remote,
            show_age(r.age_secs, r.age_at_least_secs),
            show(r.state_secs),
            show(r.idle_secs),
            show_bytes(r.bytes_in),
            show_bytes(r.bytes_out),
            owner,
            show_next(r)
        )?;
    }
    Ok(())
}

/// How the NETNS column names a namespace: `host` for connwatch's own, its `ip netns`
/// name where it has one, else its inode.
pub fn netns_namer() -> impl Fn(u32) -> String {
    let host = netns::own().ok();
    let names: HashMap<u32, String> = netns::all()
        .into_iter()
        .filter_map(|n| Some((n.inode, n.name?)))
        .collect();
    move |inode| {
        if Some(inode) == host {
            "host".to_string()
        } else {
            names
                .get(&inode)
                .cloned()
                .unwrap_or_else(|| inode.to_string())
        }
    }
}

/// The rows, from the daemon when one answers, else from the kernel.
pub fn fetch(filter: &Filter, socket: &std::path::Path) -> Result<(Vec<Row>, bool)> {
    if let Some(mut client) = Client::connect(socket)? {
        #[derive(Deserialize)]
        struct Listed {
            rows: Vec<Row>,
        }
        let reply: Listed = client.request_as(&list_request(&Query::from_filter(filter)))?;
        return Ok((reply.rows, true));
    }
    let (items, _) = filter.apply(read_local()?.into_iter());
    Ok((items.iter().map(Item::row).collect(), false))
}

pub fn run(filter: &Filter, json: bool, socket: &std::path::Path) -> Result<()> {
    let (rows, _) = fetch(filter, socket)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    if let Err(e) = table(&rows, &netns_namer(), &mut out) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            bail!(e);
        }
    }
    Ok(())
}

/// `list --blocked`: what the daemon's `--block-firewall` blocks, and until when.
pub fn blocked(json: bool, socket: &std::path::Path) -> Result<()> {
    let Some(mut client) = Client::connect(socket)? else {
        bail!(
            "no daemon answers on {}: firewall blocks are the daemon's",
            socket.display()
        );
    };
    let reply = client.request(&serde_json::json!({"cmd": "blocked"}))?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &reply["blocked"])?;
        writeln!(out)?;
        return Ok(());
    }
    if reply["firewall"] != true {
        writeln!(out, "firewall blocks are off (run with --block-firewall)")?;
    }
    let name = netns_namer();
    writeln!(
        out,
        "{:<39} {:<12} {:<24} EXPIRES IN",
        "ADDRESS", "NETNS", "UNTIL"
    )?;
    for b in reply["blocked"].as_array().into_iter().flatten() {
        let netns = b["netns"].as_u64().map_or("-".into(), |n| name(n as u32));
        writeln!(
            out,
            "{:<39} {:<12} {:<24} {}",
            b["addr"].as_str().unwrap_or("-"),
            netns,
            b["until"].as_str().unwrap_or("-"),
            show(b["expires_in_secs"].as_f64())
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reads_as_people_write_durations() {
        let mut row = Row {
            local: "127.0.0.1:2".into(),
            remote: "127.0.0.1:9000".into(),
            state: "ESTABLISHED".into(),
            netns: 4026531840,
            cookie: 1,
            age_secs: Some(60.0),
            age_at_least_secs: None,
            state_secs: Some(60.0),
            idle_secs: Some(5.0),
            direction: Some("in".into()),
            cgroup: None,
            container: None,
            pid: Some(77),
            process: Some("nginx".into()),
            next_rule: None,
            next_in_secs: None,
            protected: None,
            bytes_in: Some(2048),
            bytes_out: Some(5_000_000),
            segs_in: Some(3),
            segs_out: Some(4000),
            retrans: Some(0),
        };
        row.next_rule = Some("max-age".into());
        row.next_in_secs = Some(252.0);
        let mut out = Vec::new();
        let name = |n: u32| {
            if n == 4026531840 {
                "host".into()
            } else {
                n.to_string()
            }
        };
        table(&[row.clone()], &name, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("nginx(77)") && text.contains("max-age in 4m12s"),
            "{text}"
        );
        assert!(text.contains("NETNS") && text.contains(" host "), "{text}");
        assert!(text.contains("  2.0K  4.8M "), "{text}");
        row.protected = Some("port 22".into());
        assert_eq!(show_next(&row), "never (port 22)");
        assert_eq!(show_age(None, Some(7_380.0)), ">2h3m");
        for (n, want) in [
            (0, "0"),
            (999, "999"),
            (1000, "1.0K"),
            (10_188, "9.9K"),
            (10_189, "10K"),
            (1_023_487, "999K"),
            (1_023_488, "1.0M"),
            (u64::MAX, "16E"),
        ] {
            assert_eq!(show_bytes(Some(n)), want, "{n}");
        }
        assert_eq!(show_bytes(None), "-");
    }
}
