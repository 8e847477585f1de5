//! inet_diag bytecode (`INET_DIAG_REQ_BYTECODE`): a dump the kernel filters by port
//! before it copies a socket out, as `ss` does with a filter expression. A one-shot
//! run reads only the sockets a rule could select, not the whole table.
//!
//! The kernel audits a program by walking it along its `yes` offsets, so every op's
//! `yes` leads to the next op and the branches are the `no` offsets; a `JMP` (always
//! "no") jumps over the remaining terms once one has matched. Reaching the end exactly
//! accepts a socket; jumping 4 bytes past it rejects it.

/// The op codes used (`include/uapi/linux/inet_diag.h`); the port comparisons exist
/// in every kernel with sock_diag.
const JMP: u8 = 1;
const S_GE: u8 = 2;
const S_LE: u8 = 3;
const D_GE: u8 = 4;
const D_LE: u8 = 5;

/// One op (`struct inet_diag_bc_op`: code, yes, no) is 4 bytes; a port comparison is
/// two, the second carrying the port in its `no`.
const OP: usize = 4;
const COMPARE: usize = 2 * OP;

/// More terms than this would not fit the 16-bit jump offsets; such a filter is not
/// worth the kernel's time either, so the caller dumps everything instead.
pub const MAX_RANGES: usize = 1024;

/// Which end of a connection a port range is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum End {
    Local,
    Remote,
}

/// A port range (inclusive) on one end: a socket matches when that end's port is in it.
pub type PortTerm = (End, u16, u16);

/// The program that keeps a socket matching any of `terms`; None when there are none
/// or too many to encode (dump unfiltered).
pub fn any_port_in(terms: &[PortTerm]) -> Option<Vec<u8>> {
    if terms.is_empty() || terms.len() > MAX_RANGES {
        return None;
    }
    // Each term is "port >= lo and port <= hi" on its end.
    let terms: Vec<[(u8, u16); 2]> = terms
        .iter()
        .map(|&(end, lo, hi)| match end {
            End::Local => [(S_GE, lo), (S_LE, hi)],
            End::Remote => [(D_GE, lo), (D_LE, hi)],
        })
        .collect();
    let term_len = |last: bool| 2 * COMPARE + if last { 0 } else { OP };
    let total: usize = (0..terms.len())
        .map(|i| term_len(i + 1 == terms.len()))
        .sum();
    let mut out = Vec::with_capacity(total);
    for (i, term) in terms.iter().enumerate() {
        let last = i + 1 == terms.len();
        // A failed comparison goes on to the next term; after the last, to rejection.
        let next = out.len() + term_len(last);
        let miss = if last { total + OP } else { next };
        for (code, port) in term {
            let here = out.len();
            op(&mut out, *code, COMPARE, miss - here);
            op(&mut out, 0, 0, usize::from(*port));
        }
        if !last {
            // Matched: jump to the end (accept), over the terms still to come.
            let here = out.len();
            op(&mut out, JMP, OP, total - here);
        }
    }
    debug_assert_eq!(out.len(), total);
    Some(out)
}

fn op(out: &mut Vec<u8>, code: u8, yes: usize, no: usize) {
    out.push(code);
    out.push(yes as u8);
    out.extend_from_slice(&(no as u16).to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(bc: &[u8], i: usize) -> (u8, usize, usize) {
        let no = u16::from_ne_bytes([bc[i + 2], bc[i + 3]]);
        (bc[i], bc[i + 1] as usize, no as usize)
    }

    /// The kernel's `inet_diag_bc_run`, for the ops used here.
    fn run(bc: &[u8], sport: u16, dport: u16) -> bool {
        let mut len = bc.len() as isize;
        let mut i = 0usize;
        while len > 0 {
            let (code, yes, no) = at(bc, i);
            let port = || at(bc, i + OP).2 as u16;
            let hit = match code {
                JMP => false,
                S_GE => sport >= port(),
                S_LE => sport <= port(),
                D_GE => dport >= port(),
                D_LE => dport <= port(),
                other => panic!("unexpected op {other}"),
            };
            let step = if hit { yes } else { no };
            len -= step as isize;
            i += step;
        }
        len == 0
    }

    /// The kernel's `inet_diag_bc_audit`: offsets in bounds and 4-aligned, a `no`
    /// target on the chain of `yes` offsets, the chain ending exactly at the end.
    fn audit(bc: &[u8]) -> bool {
        let valid_cc = |cc: usize| {
            let (mut len, mut i) = (bc.len() as isize, 0usize);
            while len >= 0 {
                if cc as isize > len {
                    return false;
                }
                if cc as isize == len {
                    return true;
                }
                let yes = at(bc, i).1;
                if yes < OP || !yes.is_multiple_of(4) {
                    return false;
                }
                len -= yes as isize;
                i += yes;
            }
            false
        };
        let (mut len, mut i) = (bc.len(), 0usize);
        while len > 0 {
            let (code, yes, no) = at(bc, i);
            let min = if code == JMP { OP } else { COMPARE };
            if code != JMP && len < COMPARE {
                return false;
            }
            if no < min || no > len + 4 || !no.is_multiple_of(4) {
                return false;
            }
            if no < len && !valid_cc(len - no) {
                return false;
            }
            if yes < min || yes > len + 4 || !yes.is_multiple_of(4) {
                return false;
            }
            if yes > len {
                return false;
            }
            len -= yes;
            i += yes;
        }
        len == 0
    }

    #[test]
    fn each_range_is_about_its_own_end() {
        let bc = any_port_in(&[(End::Local, 8000, 8099), (End::Remote, 53, 53)]).unwrap();
        assert!(audit(&bc));
        assert!(run(&bc, 8000, 40000), "local port at the low end");
        assert!(run(&bc, 8099, 40000), "local port at the high end");
        assert!(run(&bc, 40000, 53), "remote port");
        assert!(
            !run(&bc, 40000, 8000),
            "a local range says nothing of the remote end"
        );
        assert!(!run(&bc, 53, 40000), "nor a remote one of the local end");
        assert!(!run(&bc, 7999, 8100));
    }

    #[test]
    fn nothing_to_encode_is_no_filter() {
        assert_eq!(any_port_in(&[]), None);
        assert_eq!(any_port_in(&vec![(End::Local, 1, 1); MAX_RANGES + 1]), None);
        let widest = any_port_in(&vec![(End::Remote, 1, 1); MAX_RANGES]).unwrap();
        assert!(audit(&widest), "the largest program passes the audit");
    }

    proptest! {
        #[test]
        fn keeps_exactly_the_sockets_in_a_range(
            terms in prop::collection::vec((any::<bool>(), any::<u16>(), any::<u16>()), 1..20),
            sport in any::<u16>(),
            dport in any::<u16>(),
        ) {
            let terms: Vec<PortTerm> = terms
                .into_iter()
                .map(|(local, a, b)| {
                    (if local { End::Local } else { End::Remote }, a.min(b), a.max(b))
                })
                .collect();
            let bc = any_port_in(&terms).unwrap();
            prop_assert!(audit(&bc));
            let want = terms.iter().any(|&(end, lo, hi)| {
                let p = if end == End::Local { sport } else { dport };
                lo <= p && p <= hi
            });
            prop_assert_eq!(run(&bc, sport, dport), want);
        }
    }
}
