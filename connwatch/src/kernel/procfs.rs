//! Who owns a socket, from `/proc`: the names of the processes the kernel program
//! recorded by pid, and for the sockets it could not attribute (never used by a process
//! since connwatch watched) the holders of their inodes. Those are asked only when a
//! socket is about to be destroyed, and then only of the protected processes: their
//! descriptors are few, where a walk of every process's descriptors is not.

use std::collections::HashMap;
use std::fs;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::conn::Owner;

/// The command name of a process, as the kernel keeps it for its main thread.
pub fn process_name(pid: u32) -> Option<String> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_string())
}

/// How long a process name read from /proc is taken as still right: names are shown,
/// not trusted (a decision reads the name again), and a pid is rarely reused sooner.
const NAME_FRESH: Duration = Duration::from_secs(1);

/// Process names by pid, each read from /proc at most once a [`NAME_FRESH`]: the kernel
/// program keeps a socket's owner's pid, not its name.
#[derive(Default)]
pub struct Names {
    known: HashMap<u32, ([u8; 16], Instant)>,
}

impl Names {
    /// The name of process `pid` as the kernel's 16-byte command name (zero when the
    /// process is gone or `pid` is 0, unknown).
    pub fn comm(&mut self, pid: u32) -> [u8; 16] {
        if pid == 0 {
            return [0; 16];
        }
        let now = Instant::now();
        if let Some((comm, at)) = self.known.get(&pid) {
            if now.duration_since(*at) < NAME_FRESH {
                return *comm;
            }
        }
        if self.known.len() >= 4096 {
            self.known
                .retain(|_, (_, at)| now.duration_since(*at) < NAME_FRESH);
        }
        let comm = process_name(pid).map_or([0; 16], |n| Owner::new(pid, &n).comm);
        self.known.insert(pid, (comm, now));
        comm
    }
}

/// The one cache of names: the daemon's event reader and its map reader both name the
/// owners they read.
static NAMES: LazyLock<Mutex<Names>> = LazyLock::new(Mutex::default);

/// Runs `f` with the shared cache of names (a poisoned lock still holds a usable cache).
pub fn with_names<R>(f: impl FnOnce(&mut Names) -> R) -> R {
    f(&mut NAMES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Names the owner of each socket read from the kernel, under one lock for them all.
pub fn name_owners<'a>(infos: impl IntoIterator<Item = &'a mut connwatch_common::ConnInfo>) {
    with_names(|names| {
        for info in infos {
            info.comm = names.comm(info.pid);
        }
    });
}

/// The socket inodes held by processes with one of these names, with their owner.
pub fn sockets_of(names: &[String]) -> HashMap<u32, Owner> {
    let mut found = HashMap::new();
    if names.is_empty() {
        return found;
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(name) = process_name(pid) else {
            continue;
        };
        if !names.contains(&name) {
            continue;
        }
        let owner = Owner::new(pid, &name);
        let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            // Gone meanwhile: nothing of it to protect.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                warn_unreadable(pid, &name, &e);
                continue;
            }
        };
        for fd in fds.flatten() {
            if let Some(inode) = fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(&l.to_string_lossy()))
            {
                found.insert(inode, owner);
            }
        }
    }
    found
}

/// Says once per process that a protected process's sockets cannot be told: only those
/// the kernel saw it connect or listen on stay protected by its name.
fn warn_unreadable(pid: u32, name: &str, e: &std::io::Error) {
    static WARNED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned.contains(&pid) {
        return;
    }
    warned.push(pid);
    tracing::warn!(
        "cannot read /proc/{pid}/fd of protected process {name}: {e}; sockets it accepted or was handed are not recognised as its (run connwatch with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, as the packaged unit does)"
    );
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn finds_the_sockets_of_this_process_by_name() {
        let me = process_name(std::process::id()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode = socket_inode(&link.to_string_lossy()).unwrap();
        let found = sockets_of(std::slice::from_ref(&me));
        let owner = found.get(&inode).expect("our own socket is found");
        assert_eq!(owner.pid, std::process::id());
        assert_eq!(owner.name(), &me[..me.len().min(15)]);
        assert!(sockets_of(&["no-such-process".into()]).is_empty());
    }
}
