//! Blocking at the firewall (`--block-firewall`): an address whose connection a
//! `--block` rule destroyed goes into a named nftables set, with a timeout, so its new
//! connections get nowhere until the timeout passes.
//!
//! connwatch keeps to a table of its own, `inet connwatch`, in the network namespace
//! where the blocked connection lived (a container's firewall for a container's
//! socket, the host's for the host's):
//!
//! ```text
//! table inet connwatch {
//!     set blocked4 { type ipv4_addr; flags timeout; }
//!     set blocked6 { type ipv6_addr; flags timeout; }
//!     chain input {
//!         type filter hook input priority filter - 10; policy accept;
//!         ip saddr @blocked4 tcp flags & (syn | ack) == syn drop
//!         ip6 saddr @blocked6 tcp flags & (syn | ack) == syn drop
//!     }
//! }
//! ```
//!
//! Only new connections (a SYN without ACK) are dropped: what this host opens to the
//! address still works. No other table, chain or rule is read or changed. The timeouts
//! are the kernel's own (nft set element timeouts), so a block expires even if the
//! daemon is gone; the daemon removes its table at a clean stop, and `connwatch cleanup`
//! removes it from every namespace.
//!
//! The rules are written by Debian's `nft` (package `nftables`), run as a child
//! process. It runs with what the daemon keeps after its privilege drop: as root,
//! no_new_privs only caps an exec at the bounding set, which holds CAP_NET_ADMIN (what
//! nftables needs) and CAP_SYS_ADMIN (to enter another namespace, done in the child
//! between fork and exec).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

use crate::conn::canonical;

/// connwatch's table (family `inet`: both IPv4 and IPv6).
pub const TABLE: &str = "connwatch";

/// Where `nft` is looked for, before `PATH`.
const NFT_PATHS: [&str; 2] = ["/usr/sbin/nft", "/sbin/nft"];

/// The table, its sets and its chain; `flush chain` keeps the rules single when the
/// table is already there (from a daemon killed before its clean stop).
fn setup_script() -> String {
    format!(
        "add table inet {TABLE}\n\
         add set inet {TABLE} blocked4 {{ type ipv4_addr; flags timeout; }}\n\
         add set inet {TABLE} blocked6 {{ type ipv6_addr; flags timeout; }}\n\
         add chain inet {TABLE} input {{ type filter hook input priority filter - 10; policy accept; }}\n\
         flush chain inet {TABLE} input\n\
         add rule inet {TABLE} input ip saddr @blocked4 tcp flags & (syn | ack) == syn drop\n\
         add rule inet {TABLE} input ip6 saddr @blocked6 tcp flags & (syn | ack) == syn drop\n"
    )
}

/// Puts `addr` in its set for `timeout`, restarting the timeout if it is there already
/// (add, delete and add again, in one transaction).
fn block_script(addr: IpAddr, timeout: Duration) -> String {
    let set = match addr {
        IpAddr::V4(_) => "blocked4",
        IpAddr::V6(_) => "blocked6",
    };
    let secs = timeout.as_secs().max(1);
    format!(
        "add element inet {TABLE} {set} {{ {addr} timeout {secs}s }}\n\
         delete element inet {TABLE} {set} {{ {addr} }}\n\
         add element inet {TABLE} {set} {{ {addr} timeout {secs}s }}\n"
    )
}

/// One address blocked in one namespace, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub netns: u32,
    pub addr: IpAddr,
    pub until: SystemTime,
}

/// The daemon's blocks: what it put in the sets, and where it set a table up.
pub struct Firewall {
    nft: PathBuf,
    /// Namespaces whose table this daemon set up, with the file it entered them by
    /// (None for its own).
    tables: HashMap<u32, Option<PathBuf>>,
    blocks: HashMap<(u32, IpAddr), SystemTime>,
}

/// The `nft` binary, or why there is none.
pub fn find_nft() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nft"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    NFT_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "--block-firewall needs nft, which is not installed (Debian: apt install nftables)"
            )
        })
}

/// Runs `nft -f -` with `script`, inside the namespace `netns` names (None: this
/// process's own).
fn nft(nft: &Path, netns: Option<&Path>, args: &[&str], script: &str) -> Result<String> {
    let mut cmd = Command::new(nft);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ns_file = match netns {
        Some(p) => {
            Some(std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?)
        }
        None => None,
    };
    if let Some(f) = &ns_file {
        let fd = f.as_raw_fd();
        // SAFETY: between fork and exec only setns runs, an async-signal-safe system
        // call on a descriptor the parent holds open until the child has started.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", nft.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Firewall {
    /// Finds `nft` and checks that it works with this process's capabilities (it lists
    /// the tables: CAP_NET_ADMIN).
    pub fn open() -> Result<Firewall> {
        let path = find_nft()?;
        nft(&path, None, &["list", "tables"], "")
            .context("nft does not work with the daemon's capabilities")?;
        Ok(Firewall {
            nft: path,
            tables: HashMap::new(),
            blocks: HashMap::new(),
        })
    }

    /// Blocks `addr`'s new connections in namespace `netns` (entered through `path`,
    /// None for this process's own) for `timeout`.
    pub fn block(
        &mut self,
        netns: u32,
        path: Option<&Path>,
        addr: IpAddr,
        timeout: Duration,
    ) -> Result<()> {
        let addr = canonical(addr);
        let mut script = String::new();
        if !self.tables.contains_key(&netns) {
            script.push_str(&setup_script());
        }
        script.push_str(&block_script(addr, timeout));
        let done = nft(&self.nft, path, &["-f", "-"], &script).or_else(|e| {
            // The table may have been removed under us: set it up again, once.
            if self.tables.contains_key(&netns) {
                nft(
                    &self.nft,
                    path,
                    &["-f", "-"],
                    &(setup_script() + &block_script(addr, timeout)),
                )
            } else {
                Err(e)
            }
        });
        done?;
        self.tables.insert(netns, path.map(Path::to_path_buf));
        self.blocks
            .insert((netns, addr), SystemTime::now() + timeout);
        Ok(())
    }

    /// Whether `addr` is blocked in `netns` for at least `left` more.
    pub fn holds(&self, netns: u32, addr: IpAddr, left: Duration) -> bool {
        self.blocks
            .get(&(netns, canonical(addr)))
            .is_some_and(|until| *until > SystemTime::now() + left)
    }

    /// How many blocks hold now.
    pub fn active(&self) -> usize {
        let now = SystemTime::now();
        self.blocks.values().filter(|until| **until > now).count()
    }

    /// What is blocked now, soonest to expire first; expired blocks are forgotten.
    pub fn blocked(&mut self) -> Vec<Blocked> {
        let now = SystemTime::now();
        self.blocks.retain(|_, until| *until > now);
        let mut all: Vec<Blocked> = self
            .blocks
            .iter()
            .map(|((netns, addr), until)| Blocked {
                netns: *netns,
                addr: *addr,
                until: *until,
            })
            .collect();
        all.sort_by_key(|b| (b.until, b.netns, b.addr));
        all
    }

    /// Removes connwatch's table from every namespace this daemon put one in (a clean
    /// stop); a namespace gone since has nothing left to remove.
    pub fn remove_all(&mut self) {
        for (netns, path) in self.tables.drain() {
            if path.as_deref().is_some_and(|p| !p.exists()) {
                continue;
            }
            let script = format!("delete table inet {TABLE}\n");
            match nft(&self.nft, path.as_deref(), &["-f", "-"], &script) {
                Ok(_) => tracing::info!("removed the firewall table inet {TABLE} of network namespace {netns}"),
                Err(e) => tracing::warn!("cannot remove the firewall table inet {TABLE} of network namespace {netns}: {e:#}"),
            }
        }
        self.blocks.clear();
    }
}

/// For `connwatch cleanup`: removes connwatch's table from every network namespace
/// that holds one (`paths`: a way into each; None for this process's own). Returns
/// what it removed and what it could not.
pub fn remove_everywhere(paths: &[(u32, Option<PathBuf>)]) -> (Vec<u32>, Vec<(u32, String)>) {
    let Ok(nft_path) = find_nft() else {
        return (Vec::new(), Vec::new());
    };
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    let mut seen = HashSet::new();
    for (netns, path) in paths {
        if !seen.insert(*netns) {
            continue;
        }
        let listed = nft(&nft_path, path.as_deref(), &["list", "tables"], "");
        match listed {
            Ok(out)
                if out
                    .lines()
                    .any(|l| l.trim() == format!("table inet {TABLE}")) =>
            {
                let script = format!("delete table inet {TABLE}\n");
                match nft(&nft_path, path.as_deref(), &["-f", "-"], &script) {
                    Ok(_) => removed.push(*netns),
                    Err(e) => failed.push((*netns, format!("{e:#}"))),
                }
            }
            Ok(_) => {}
            Err(e) => failed.push((*netns, format!("{e:#}"))),
        }
    }
    (removed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_touch_only_connwatch_table() {
        let all = setup_script()
            + &block_script("192.0.2.7".parse().unwrap(), Duration::from_millis(1500));
        for line in all.lines() {
            assert!(line.contains(&format!(" inet {TABLE}")), "{line}");
        }
        assert!(
            all.contains("add element inet connwatch blocked4 { 192.0.2.7 timeout 1s }"),
            "{all}"
        );
        let v6 = block_script("2001:db8::1".parse().unwrap(), Duration::from_secs(600));
        assert!(v6.contains("blocked6 { 2001:db8::1 timeout 600s }"), "{v6}");
    }
}
