//! Blocking that holds (`--block-firewall`): when a block rule destroys a connection,
//! its remote address also goes into connwatch's nftables set in the connection's own
//! network namespace, for `--block-for`, so the peer cannot simply connect again.
//!
//! It happens at the destroy, not at start for every configured CIDR: the address
//! blocked is the peer that actually came (not a whole range, nor every namespace on
//! the host, new ones included), in the namespace where it came, and each new offence
//! starts its timeout again. A dry run blocks nothing and says what it would block.

use std::net::IpAddr;
use std::time::Duration;

use super::destroy::Outcome;
use super::Engine;
use crate::conn::canonical;
use crate::kernel::firewall::{Blocked, Firewall};
use crate::kernel::netns::Namespaces;
use crate::policy::{Limit, RuleId};
use crate::track::Tracked;

/// A block asked for by a destroy, applied after the round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ToBlock {
    netns: u32,
    addr: IpAddr,
    pid: Option<u32>,
}

impl Engine {
    /// Finds `nft` and checks it works with the daemon's capabilities: called at
    /// start when the policy asks for firewall blocks, so a missing or unusable nft
    /// stops the start rather than the first block.
    pub fn open_firewall(&mut self) -> anyhow::Result<()> {
        if self.firewall.is_none() {
            self.firewall = Some(Firewall::open()?);
        }
        Ok(())
    }

    /// Notes the block a destroy under `rule` calls for, if any.
    pub(super) fn note_block(&mut self, chosen: &Tracked, rule: RuleId, outcome: &Outcome) {
        let Some(for_) = self.policy.block_firewall else {
            return;
        };
        if self.policy.rule(rule).limit != Limit::Block {
            return;
        }
        let addr = canonical(chosen.tuple.remote.ip());
        match outcome {
            Outcome::Destroyed => {
                let b = ToBlock {
                    netns: chosen.id.netns,
                    addr,
                    pid: chosen.owner.map(|o| o.pid),
                };
                if !self.to_block.contains(&b) {
                    self.to_block.push(b);
                }
            }
            Outcome::WouldDestroy => tracing::info!(
                "would block {addr} in the firewall of network namespace {} for {} (dry run)",
                chosen.id.netns,
                crate::clock::human(for_)
            ),
            _ => {}
        }
    }

    /// Puts the addresses noted this round in their namespaces' sets. An address
    /// blocked a moment ago is not blocked again for each of a burst of connections.
    pub(super) fn apply_blocks(&mut self, namespaces: &Namespaces) {
        let Some(for_) = self.policy.block_firewall else {
            self.to_block.clear();
            return;
        };
        for b in std::mem::take(&mut self.to_block) {
            if self.firewall.is_none() {
                match Firewall::open() {
                    Ok(f) => self.firewall = Some(f),
                    Err(e) => {
                        tracing::error!("cannot block {} in the firewall: {e:#}", b.addr);
                        continue;
                    }
                }
            }
            let fw = self.firewall.as_mut().expect("opened above");
            if fw.holds(b.netns, b.addr, for_.saturating_sub(Duration::from_secs(1))) {
                continue;
            }
            let done = namespaces
                .path_of(b.netns, b.pid)
                .and_then(|path| fw.block(b.netns, path.as_deref(), b.addr, for_));
            match done {
                Ok(()) => tracing::info!(
                    "blocked {} in the firewall of network namespace {} for {} (nftables set inet connwatch)",
                    b.addr,
                    b.netns,
                    crate::clock::human(for_)
                ),
                Err(e) => tracing::error!(
                    "cannot block {} in the firewall of network namespace {}: {e:#}",
                    b.addr,
                    b.netns
                ),
            }
        }
    }

    /// What the firewall blocks now, soonest to expire first.
    pub fn blocked(&mut self) -> Vec<Blocked> {
        self.firewall
            .as_mut()
            .map(Firewall::blocked)
            .unwrap_or_default()
    }

    /// How many addresses the firewall blocks now (all namespaces).
    pub fn blocked_count(&self) -> usize {
        self.firewall.as_ref().map_or(0, Firewall::active)
    }

    /// At a clean stop: removes connwatch's firewall table wherever this daemon put one.
    pub fn remove_firewall(&mut self) {
        if let Some(fw) = self.firewall.as_mut() {
            fw.remove_all();
        }
    }
}
