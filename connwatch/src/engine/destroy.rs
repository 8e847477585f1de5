//! Destroying exactly the socket the policy chose. Right before the kill the chosen
//! socket is looked up again in its own network namespace, in the kernel map (same
//! identity, same state) and through an exact sock_diag lookup (same cookie, tuple and
//! state); the destroy then names the socket by tuple *and* the cookie the kernel
//! recorded, so a connection that reused the tuple, or its twin in another namespace,
//! survives.

use connwatch_common::ConnInfo;

use crate::conn::{cookie_from_diag, cookie_to_diag, SockId};
use crate::kernel::sock_diag::{DestroyError, DiagSocket, SockDiag};
use crate::kernel::ConnMap;
use crate::track::{Source, Tracked};

#[derive(Debug)]
pub enum Outcome {
    Destroyed,
    /// Dry run: the same checks passed, nothing was destroyed.
    WouldDestroy,
    /// The socket is no longer the one chosen; nothing was destroyed.
    Skipped(String),
    Failed(DestroyError),
}

/// Whether the kernel's view still shows the socket the policy chose. Pure, so each
/// way a socket can change under a decision is unit-tested. The lookup ran in the
/// chosen socket's own namespace; the cookie tells it from any other socket that has
/// (or had) its tuple.
pub fn verify(
    chosen: &Tracked,
    entry: Option<&ConnInfo>,
    live: Option<&DiagSocket>,
) -> Result<(), String> {
    let live = live.ok_or("gone before the destroy")?;
    if cookie_from_diag(live.cookie) != chosen.id.cookie {
        return Err("tuple reused by another socket (the cookie differs)".into());
    }
    if live.tuple != chosen.tuple {
        return Err(format!("tuple is now {}", live.tuple));
    }
    if live.state != chosen.state {
        return Err(format!("state changed to {}", live.state));
    }
    if chosen.source == Source::Map {
        let entry = entry.ok_or("left the connection map")?;
        if SockId::new(entry.netns, entry.cookie) != chosen.id {
            return Err("socket address reused by a newer socket".into());
        }
        if entry.state != chosen.state.0 {
            return Err(format!("map state changed to {}", entry.state));
        }
    }
    Ok(())
}

/// Finds the chosen socket again: the exact sock_diag lookup (with its `tcp_info`),
/// then [`recheck`].
pub fn lookup(
    diag: &mut SockDiag,
    conns: Option<&ConnMap>,
    key: u64,
    chosen: &Tracked,
) -> Result<(DiagSocket, Option<ConnInfo>), Outcome> {
    let found = diag
        .get_many_on(&[(chosen.tuple, chosen.ifindex)])
        .pop()
        .unwrap_or_else(|| Err(anyhow::anyhow!("sock_diag get {}: no answer", chosen.tuple)));
    recheck(conns, key, chosen, found)
}

/// Checks a lookup's answer against the choice, reading the map entry after the lookup:
/// if the chosen socket closed and a new one took its tuple before the lookup, its map
/// entry is already gone or renewed.
pub fn recheck(
    conns: Option<&ConnMap>,
    key: u64,
    chosen: &Tracked,
    looked_up: anyhow::Result<Option<DiagSocket>>,
) -> Result<(DiagSocket, Option<ConnInfo>), Outcome> {
    let live =
        looked_up.map_err(|e| Outcome::Failed(DestroyError::Other(std::io::Error::other(e))))?;
    let entry = match (chosen.source, conns) {
        (Source::Map, Some(conns)) => conns.get(key),
        _ => None,
    };
    verify(chosen, entry.as_ref(), live.as_ref()).map_err(Outcome::Skipped)?;
    Ok((live.expect("verified above"), entry))
}

/// What a destroy's answer means for the record.
pub fn outcome_of(result: Result<(), DestroyError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Destroyed,
        Err(DestroyError::Gone) => Outcome::Skipped("gone before the destroy".into()),
        Err(e) => Outcome::Failed(e),
    }
}

/// What `SOCK_DESTROY` names: the socket [`lookup`] found, by its tuple and bound
/// device, and the cookie the kernel recorded for the chosen socket, so that the
/// kernel itself refuses any other socket.
pub fn target(chosen: &Tracked, live: &DiagSocket) -> DiagSocket {
    DiagSocket {
        cookie: cookie_to_diag(chosen.id.cookie),
        ..live.clone()
    }
}

/// What `SOCK_DESTROY` names for a socket known from the map alone (no lookup): its
/// tuple, bound device and the cookie the kernel recorded. The kernel finds the socket
/// by tuple and device and refuses it unless the cookie is the same.
pub fn recorded(chosen: &Tracked) -> DiagSocket {
    DiagSocket {
        tuple: chosen.tuple,
        state: chosen.state,
        cookie: cookie_to_diag(chosen.id.cookie),
        inode: 0,
        uid: 0,
        ifindex: chosen.ifindex,
        activity: None,
        traffic: None,
    }
}

/// Destroys the chosen socket [`lookup`] found (or, in a dry run, says it would).
pub fn kill(diag: &mut SockDiag, chosen: &Tracked, live: &DiagSocket, enforce: bool) -> Outcome {
    if !enforce {
        return Outcome::WouldDestroy;
    }
    outcome_of(diag.destroy(&target(chosen, live)))
}

/// Re-checks the chosen socket and destroys it (or, in a dry run, says it would).
pub fn execute(
    diag: &mut SockDiag,
    conns: Option<&ConnMap>,
    key: u64,
    chosen: &Tracked,
    enforce: bool,
) -> Outcome {
    match lookup(diag, conns, key, chosen) {
        Ok((live, _)) => kill(diag, chosen, &live, enforce),
        Err(outcome) => outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Birth, TcpState, Tuple};
    use crate::testing::diag_socket;
    use connwatch_common::{tcp_state, AF_INET};

    const NS: u32 = 4026531840;

    fn tuple() -> Tuple {
        Tuple::new(
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
        )
    }

    fn chosen(source: Source) -> Tracked {
        Tracked {
            tuple: tuple(),
            state: TcpState::ESTABLISHED,
            birth: Birth::Known(1),
            state_since_ns: 1,
            id: SockId::new(NS, 1),
            source,
            cgroup_id: 0,
            direction: None,
            ifindex: 0,
            last_activity_ns: 0,
            owner: None,
            owner_from_listener: false,
        }
    }

    fn entry(cookie: u64, state: u32) -> ConnInfo {
        let mut i = ConnInfo::zeroed();
        i.family = AF_INET;
        i.netns = NS;
        i.cookie = cookie;
        i.state = state;
        i
    }

    fn live(state: TcpState, cookie: u64) -> DiagSocket {
        diag_socket(tuple(), state, cookie)
    }

    #[test]
    fn the_same_socket_passes() {
        let e = entry(1, tcp_state::ESTABLISHED);
        let l = live(TcpState::ESTABLISHED, 1);
        assert_eq!(verify(&chosen(Source::Map), Some(&e), Some(&l)), Ok(()));
        assert_eq!(verify(&chosen(Source::Seeded), None, Some(&l)), Ok(()));
        assert_eq!(
            target(&chosen(Source::Map), &l).cookie,
            cookie_to_diag(1),
            "the destroy names the recorded cookie"
        );
    }

    #[test]
    fn every_change_is_refused() {
        let c = chosen(Source::Map);
        let ok_entry = entry(1, tcp_state::ESTABLISHED);
        let ok_live = live(TcpState::ESTABLISHED, 1);
        let mut other_ns = entry(1, tcp_state::ESTABLISHED);
        other_ns.netns = NS + 1;
        let cases = [
            (Some(ok_entry), None, "gone"),
            (None, Some(ok_live.clone()), "left the connection map"),
            (
                Some(entry(2, tcp_state::ESTABLISHED)),
                Some(ok_live.clone()),
                "reused by a newer socket",
            ),
            (
                Some(other_ns),
                Some(ok_live.clone()),
                "reused by a newer socket",
            ),
            (
                Some(ok_entry),
                Some(live(TcpState::CLOSE_WAIT, 1)),
                "CLOSE_WAIT",
            ),
            (
                Some(entry(1, tcp_state::CLOSE_WAIT)),
                Some(ok_live),
                "map state",
            ),
            (
                Some(ok_entry),
                Some(live(TcpState::ESTABLISHED, 2)),
                "cookie differs",
            ),
        ];
        for (e, l, want) in cases {
            let err = verify(&c, e.as_ref(), l.as_ref()).unwrap_err();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        for source in [Source::Seeded, Source::TimeWait] {
            let other = live(TcpState::ESTABLISHED, 2);
            assert!(verify(&chosen(source), None, Some(&other))
                .unwrap_err()
                .contains("cookie differs"));
        }
    }
}
