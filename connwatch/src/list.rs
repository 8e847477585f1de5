//! `connwatch list`: the live connections and their ages. The socket table comes from
//! one sock_diag dump (the kernel's truth), the ages from the pinned map; a connection
//! the map does not know shows its age as unknown rather than a guess.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use connwatch_common::{ConnInfo, FLAG_BIRTH_UNKNOWN};
use serde::Serialize;

use crate::clock::{human, monotonic_ns};
use crate::conn::{TcpState, Tuple};
use crate::diag::{DiagSocket, SockDiag};
use crate::loader;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub local: String,
    pub remote: String,
    pub state: String,
    /// Seconds since the connection was born; None where its birth is unknown.
    pub age_secs: Option<f64>,
    /// Seconds since the connection entered its current state; None where unknown.
    pub state_secs: Option<f64>,
}

fn secs(ns: u64) -> f64 {
    (ns as f64 / 1e9 * 1000.0).round() / 1000.0
}

/// Joins the kernel's sockets with the map's entries, oldest first, listeners left out.
pub fn rows(live: &[DiagSocket], entries: &HashMap<Tuple, ConnInfo>, now: u64) -> Vec<Row> {
    let mut rows: Vec<Row> = live
        .iter()
        .filter(|s| s.state != TcpState::LISTEN)
        .map(|s| {
            // The map's state may lag the dump's by an event; its times stay valid only
            // while both agree on the state.
            let entry = entries.get(&s.tuple);
            let age = entry
                .filter(|e| e.flags & FLAG_BIRTH_UNKNOWN == 0)
                .map(|e| secs(now.saturating_sub(e.birth_ns)));
            let in_state = entry
                .filter(|e| e.state == s.state.0)
                .map(|e| secs(now.saturating_sub(e.state_since_ns)));
            Row {
                local: s.tuple.local.to_string(),
                remote: s.tuple.remote.to_string(),
                state: s.state.to_string(),
                age_secs: age,
                state_secs: in_state,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.age_secs
            .unwrap_or(-1.0)
            .total_cmp(&a.age_secs.unwrap_or(-1.0))
            .then_with(|| a.local.cmp(&b.local))
    });
    rows
}

fn show(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| human(Duration::from_secs_f64(s)))
}

pub fn run(json: bool) -> Result<()> {
    let mut entries = HashMap::new();
    match loader::open_pinned_conns() {
        Ok(map) => {
            for (_, info) in map.iter().flatten() {
                if let Some(t) = Tuple::from_info(&info) {
                    entries.insert(t, info);
                }
            }
        }
        Err(e) => eprintln!("connwatch: ages unknown: {e:#}"),
    }
    let live = SockDiag::open()?.dump(SockDiag::ALL_STATES)?;
    let rows = rows(&live, &entries, monotonic_ns());
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    let lw = rows.iter().map(|r| r.local.len()).max().unwrap_or(5).max(5);
    let rw = rows
        .iter()
        .map(|r| r.remote.len())
        .max()
        .unwrap_or(6)
        .max(6);
    writeln!(
        out,
        "{:<12} {:<lw$} {:<rw$} {:>8} {:>8}",
        "STATE", "LOCAL", "REMOTE", "AGE", "IN-STATE"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<12} {:<lw$} {:<rw$} {:>8} {:>8}",
            r.state,
            r.local,
            r.remote,
            show(r.age_secs),
            show(r.state_secs)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use connwatch_common::AF_INET;

    const SEC: u64 = 1_000_000_000;

    fn sock(lport: u16, state: TcpState) -> DiagSocket {
        DiagSocket {
            tuple: Tuple::new(
                format!("127.0.0.1:{lport}").parse().unwrap(),
                "127.0.0.1:9000".parse().unwrap(),
            ),
            state,
            cookie: [0; 8],
            inode: 0,
            uid: 0,
            ifindex: 0,
            activity: None,
        }
    }

    fn entry(lport: u16, birth: u64, flags: u32) -> ConnInfo {
        let mut i = ConnInfo::zeroed();
        i.family = AF_INET;
        i.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        i.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        i.sport = lport;
        i.dport = 9000;
        i.birth_ns = birth;
        i.state_since_ns = birth;
        i.state = TcpState::ESTABLISHED.0;
        i.flags = flags;
        i
    }

    #[test]
    fn joins_ages_and_leaves_unknown_ones_unknown() {
        let live = [
            sock(1, TcpState::ESTABLISHED),
            sock(2, TcpState::ESTABLISHED),
            sock(3, TcpState::ESTABLISHED),
            sock(4, TcpState::LISTEN),
        ];
        let mut map = HashMap::new();
        for e in [
            entry(1, 90 * SEC, 0),
            entry(2, 40 * SEC, 0),
            entry(3, 0, FLAG_BIRTH_UNKNOWN),
        ] {
            map.insert(Tuple::from_info(&e).unwrap(), e);
        }
        let rows = rows(&live, &map, 100 * SEC);
        assert_eq!(rows.len(), 3, "listeners are left out");
        assert_eq!(rows[0].local, "127.0.0.1:2");
        assert_eq!(rows[0].age_secs, Some(60.0));
        assert_eq!(rows[1].age_secs, Some(10.0));
        assert_eq!(rows[2].age_secs, None);
        assert_eq!(rows[2].state_secs, Some(100.0));
    }
}
