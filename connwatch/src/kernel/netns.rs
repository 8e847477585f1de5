//! Network namespaces: which exist, and a sock_diag socket inside each one the daemon
//! must reach. A sock_diag socket sees and destroys only its own namespace's sockets,
//! so one is opened per namespace, on a short-lived thread that enters it through
//! `/proc/PID/ns/net` (or an `ip netns` bind mount): `setns` moves only that thread,
//! and the socket keeps the namespace it was made in.
//!
//! A socket holds a reference on its namespace: a cached one would keep a dead
//! container's namespace (and its sockets) alive. [`Namespaces::retain`] drops the
//! sockets of namespaces that no longer hold tracked connections.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use super::sock_diag::{DiagSocket, PortTerm, SockDiag};

/// Where `ip netns` keeps its named namespaces (bind mounts).
pub const NAMED_NETNS_DIR: &str = "/run/netns";

/// The inode of a namespace file: the number `stat -L /proc/PID/ns/net` shows, and
/// the one the kernel program records for each socket.
pub fn inode_of(path: &Path) -> io::Result<u32> {
    Ok(fs::metadata(path)?.ino() as u32)
}

/// This process's network namespace: what connwatch calls the host.
pub fn own() -> io::Result<u32> {
    inode_of(Path::new("/proc/self/ns/net"))
}

/// A way into a namespace: a file that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u32,
    /// `/proc/PID/ns/net` of a process living there, or a bind mount in /run/netns.
    pub path: PathBuf,
    /// The `ip netns` name, where it has one.
    pub name: Option<String>,
}

/// Every network namespace on the host that a process lives in or `ip netns` names,
/// one entry each (the named one preferred, for its name).
pub fn all() -> Vec<Netns> {
    let mut found: HashMap<u32, Netns> = HashMap::new();
    if let Ok(dir) = fs::read_dir(NAMED_NETNS_DIR) {
        for entry in dir.flatten() {
            let path = entry.path();
            if let Ok(inode) = inode_of(&path) {
                let name = entry.file_name().to_string_lossy().into_owned();
                found.insert(
                    inode,
                    Netns {
                        inode,
                        path,
                        name: Some(name),
                    },
                );
            }
        }
    }
    if let Ok(procs) = fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(inode) = inode_of(&path) {
                found.entry(inode).or_insert(Netns {
                    inode,
                    path,
                    name: None,
                });
            }
        }
    }
    let mut all: Vec<Netns> = found.into_values().collect();
    all.sort_by_key(|n| n.inode);
    all
}

/// Resolves what an operator wrote for `--netns`: `host`, an `ip netns` name, or an
/// inode number.
pub fn resolve(text: &str, host: u32) -> Result<u32, String> {
    let t = text.trim();
    if t == "host" {
        return Ok(host);
    }
    if let Ok(inode) = t.parse::<u32>() {
        return Ok(inode);
    }
    if t.is_empty() || t.contains('/') {
        return Err(format!(
            "'{text}' is not a network namespace (host, an `ip netns` name, or an inode number)"
        ));
    }
    let path = Path::new(NAMED_NETNS_DIR).join(t);
    inode_of(&path).map_err(|e| {
        format!(
            "'{text}' is not a network namespace: {} ({e}); use host, an `ip netns` name, or an inode number",
            path.display()
        )
    })
}

/// Opens a sock_diag socket inside the namespace `path` names, on a thread of its own.
pub fn open_in(path: &Path) -> Result<SockDiag> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let shown = path.display().to_string();
    std::thread::spawn(move || -> Result<SockDiag> {
        // SAFETY: setns on a namespace descriptor we own; it moves only this thread,
        // which ends right after opening the socket.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow!(
                "cannot enter the network namespace {shown}: {} (needs CAP_SYS_ADMIN)",
                io::Error::last_os_error()
            ));
        }
        SockDiag::open().with_context(|| format!("cannot open sock_diag in {shown}"))
    })
    .join()
    .map_err(|_| anyhow!("the thread entering {} panicked", path.display()))?
}

/// A file naming namespace `inode`: `pid`'s namespace file when it is there, else
/// that of any process or `ip netns` name found in it.
fn path_to(inode: u32, pid: Option<u32>) -> Result<PathBuf> {
    let by_pid = pid
        .map(|p| PathBuf::from(format!("/proc/{p}/ns/net")))
        .filter(|p| inode_of(p).ok() == Some(inode));
    match by_pid {
        Some(p) => Ok(p),
        None => all()
            .into_iter()
            .find(|n| n.inode == inode)
            .map(|n| n.path)
            .ok_or_else(|| {
                anyhow!(
                    "network namespace {inode} is gone (no process or `ip netns` name holds it)"
                )
            }),
    }
}

/// One sock_diag dump of every namespace.
#[derive(Debug, Default)]
pub struct Dump {
    /// Each socket found, with the inode of its namespace.
    pub sockets: Vec<(u32, DiagSocket)>,
    /// The namespaces dumped in full.
    pub dumped: HashSet<u32>,
    /// Every namespace that exists now (dumped or not): a socket recorded in any
    /// other is gone with its namespace.
    pub existing: HashSet<u32>,
    /// The namespaces that exist but could not be dumped, with why.
    pub failed: Vec<(u32, anyhow::Error)>,
}

/// One sock_diag socket per namespace in use, the host's always open.
pub struct Namespaces {
    pub host: u32,
    diags: HashMap<u32, SockDiag>,
}

impl Namespaces {
    pub fn open() -> Result<Namespaces> {
        let host = own().context("cannot read this process's network namespace")?;
        let mut diags = HashMap::new();
        diags.insert(
            host,
            SockDiag::open().context("cannot open a sock_diag netlink socket")?,
        );
        Ok(Namespaces { host, diags })
    }

    /// The host namespace's socket.
    pub fn host(&mut self) -> &mut SockDiag {
        self.diags
            .get_mut(&self.host)
            .expect("the host's socket is opened first and never dropped")
    }

    /// The socket for namespace `inode`, opened on first use through `pid`'s
    /// namespace file when it is there (the owner the kernel recorded), else through
    /// any process or `ip netns` name found in it.
    pub fn diag(&mut self, inode: u32, pid: Option<u32>) -> Result<&mut SockDiag> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.diags.entry(inode) {
            slot.insert(open_in(&path_to(inode, pid)?)?);
        }
        Ok(self.diags.get_mut(&inode).expect("inserted above"))
    }

    /// A file to enter namespace `inode` by, as [`Namespaces::diag`] finds one; None
    /// for the host (this process's own).
    pub fn path_of(&self, inode: u32, pid: Option<u32>) -> Result<Option<PathBuf>> {
        if inode == self.host {
            return Ok(None);
        }
        path_to(inode, pid).map(Some)
    }

    /// Dumps every namespace that can be reached, each socket with its namespace's
    /// inode. A namespace that cannot be dumped is named in [`Dump::failed`].
    pub fn dump_all(&mut self, states: u32) -> Dump {
        self.dump_all_ports(states, &[])
    }

    /// Like [`Namespaces::dump_all`], of the sockets with a port in one of `ports`, each
    /// on its own end (none: every socket), filtered by the kernel.
    pub fn dump_all_ports(&mut self, states: u32, ports: &[PortTerm]) -> Dump {
        let mut dump = Dump::default();
        let mut inodes = vec![self.host];
        inodes.extend(
            all()
                .into_iter()
                .map(|n| n.inode)
                .filter(|i| *i != self.host),
        );
        for inode in inodes {
            dump.existing.insert(inode);
            let dumped = self
                .diag(inode, None)
                .and_then(|d| d.dump_ports_with_activity(states, ports));
            match dumped {
                Ok(list) => {
                    dump.dumped.insert(inode);
                    dump.sockets.extend(list.into_iter().map(|s| (inode, s)));
                }
                Err(e) => dump.failed.push((inode, e)),
            }
        }
        dump
    }

    /// Keeps the sockets of the namespaces `keep` names (and the host's), closing the
    /// rest so that a dead namespace is not kept alive by connwatch.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        let host = self.host;
        self.diags.retain(|inode, _| *inode == host || keep(*inode));
    }

    /// How many namespaces have a socket open now.
    pub fn open_count(&self) -> usize {
        self.diags.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_this_process_namespace() {
        let host = own().unwrap();
        assert_eq!(resolve("host", host), Ok(host));
        assert_eq!(resolve("4026531840", host), Ok(4026531840));
        let err = resolve("no-such-namespace-here", host).unwrap_err();
        assert!(
            err.contains("no-such-namespace-here") && err.contains("/run/netns"),
            "{err}"
        );
        assert!(resolve("../etc", host).is_err());
        assert!(all().iter().any(|n| n.inode == host));
    }
}
