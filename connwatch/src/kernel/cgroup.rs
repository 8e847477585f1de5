//! Who a connection belongs to: the cgroup v2 of the process that opened or used it,
//! as a path, and the container or pod that path names. The kernel program records
//! the cgroup id (`bpf_get_current_cgroup_id`), which on cgroup v2 is the inode number
//! of the cgroup's directory in the cgroup2 mount: a walk of that tree names it.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where cgroup v2 is mounted on a unified host.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where this host mounts cgroup v2 (the hierarchy whose ids the kernel program
/// records): /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_root() -> PathBuf {
    fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                let (_dev, at, fstype) = (f.next()?, f.next()?, f.next()?);
                (fstype == "cgroup2").then(|| PathBuf::from(at))
            })
        })
        .unwrap_or_else(|| PathBuf::from(CGROUP_ROOT))
}

/// The least time between two walks of the tree for an id not found: containers start
/// all the time on a node, but a walk per unknown socket would cost too much.
const WALK_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Cgroup paths by id, learned by walking /sys/fs/cgroup when an unknown id shows up.
pub struct Cgroups {
    root: PathBuf,
    by_id: HashMap<u64, Arc<str>>,
    last_walk: Option<Instant>,
}

impl Default for Cgroups {
    fn default() -> Self {
        Cgroups::at(&cgroup2_root())
    }
}

impl Cgroups {
    pub fn at(root: &Path) -> Cgroups {
        Cgroups {
            root: root.to_path_buf(),
            by_id: HashMap::new(),
            last_walk: None,
        }
    }

    /// The path of cgroup `id` (`/system.slice/nginx.service`), relative to the root;
    /// None for 0 (unknown) or an id the tree does not hold (any more).
    pub fn path(&mut self, id: u64) -> Option<Arc<str>> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        if self
            .last_walk
            .is_some_and(|at| at.elapsed() < WALK_AT_MOST_EVERY)
        {
            return None;
        }
        self.walk();
        self.by_id.get(&id).cloned()
    }

    /// Learns every cgroup of the tree afresh (dead ones are forgotten).
    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        self.by_id.clear();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
            let shown = format!("/{}", rel.display());
            self.by_id.insert(meta.ino(), Arc::from(shown.as_str()));
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// The container or pod a cgroup path names, for the shapes that Docker, containerd
/// (and Kubernetes through CRI), CRI-O and Podman give their cgroups under systemd or
/// cgroupfs drivers: `docker:0123456789ab`, `k8s:pod=<uid>,container=0123456789ab`.
pub fn container_of(path: &str) -> Option<String> {
    let short = |id: &str| id.chars().take(12).collect::<String>();
    let is_id = |s: &str| s.len() >= 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let pod = parts.iter().find_map(|p| {
        let p = p.strip_suffix(".slice").unwrap_or(p);
        let uid = p
            .rsplit_once("-pod")
            .map(|(_, u)| u)
            .or_else(|| p.strip_prefix("pod"))?;
        (uid.len() >= 32).then(|| uid.replace('_', "-"))
    });
    for part in parts.iter().rev() {
        let scoped = part.strip_suffix(".scope").unwrap_or(part);
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "crio"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = scoped.strip_prefix(prefix).filter(|id| is_id(id)) {
                return Some(match &pod {
                    Some(uid) => format!("k8s:pod={uid},container={}", short(id)),
                    None => format!("{runtime}:{}", short(id)),
                });
            }
        }
        // cgroupfs drivers: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>.
        if is_id(part) {
            return Some(match (&pod, parts.first()) {
                (Some(uid), _) => format!("k8s:pod={uid},container={}", short(part)),
                (None, Some(&"docker")) => format!("docker:{}", short(part)),
                (None, _) => format!("container:{}", short(part)),
            });
        }
    }
    pod.map(|uid| format!("k8s:pod={uid}"))
}

/// Whether a cgroup path matches what an operator wrote for `--cgroup` or
/// `--exclude-cgroup`: a glob (`*` is any run of characters) matched against the whole
/// path, or, without `*`, that cgroup and everything below it.
pub fn matches(pattern: &str, path: &str) -> bool {
    if !pattern.contains('*') {
        let p = pattern.trim_end_matches('/');
        return path == p || (path.starts_with(p) && path[p.len()..].starts_with('/'));
    }
    glob(pattern.as_bytes(), path.as_bytes())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with one backtrack point: linear in practice.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3b5c2a1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a";

    #[test]
    fn container_shapes_are_named() {
        assert_eq!(
            container_of(&format!("/system.slice/docker-{ID}.scope")).as_deref(),
            Some("docker:4f3b5c2a1d0e")
        );
        assert_eq!(
            container_of(&format!("/docker/{ID}")).as_deref(),
            Some("docker:4f3b5c2a1d0e")
        );
        assert_eq!(
            container_of(&format!("/machine.slice/libpod-{ID}.scope")).as_deref(),
            Some("podman:4f3b5c2a1d0e")
        );
        let uid = "0b6e2d5c_91a4_4c8e_a2b1_3f6d7e8c9a0b";
        assert_eq!(
            container_of(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{ID}.scope"
            ))
            .as_deref(),
            Some("k8s:pod=0b6e2d5c-91a4-4c8e-a2b1-3f6d7e8c9a0b,container=4f3b5c2a1d0e")
        );
        assert_eq!(
            container_of(&format!(
                "/kubepods/besteffort/pod0b6e2d5c-91a4-4c8e-a2b1-3f6d7e8c9a0b/{ID}"
            ))
            .as_deref(),
            Some("k8s:pod=0b6e2d5c-91a4-4c8e-a2b1-3f6d7e8c9a0b,container=4f3b5c2a1d0e")
        );
        assert_eq!(container_of("/system.slice/nginx.service"), None);
        assert_eq!(
            container_of("/user.slice/user-0.slice/session-3.scope"),
            None
        );
        assert_eq!(container_of("/"), None);
    }

    #[test]
    fn patterns_are_subtrees_or_globs() {
        let p = "/system.slice/nginx.service";
        assert!(matches("/system.slice", p));
        assert!(matches("/system.slice/", p));
        assert!(matches(p, p));
        assert!(
            !matches("/system.sl", p),
            "a prefix of a name is not a subtree"
        );
        assert!(matches("*nginx*", p));
        assert!(matches("/system.slice/*.service", p));
        assert!(!matches("/kubepods*", p));
        assert!(matches("*", "/"));
    }

    #[test]
    fn ids_are_the_inodes_of_the_tree() {
        let root = std::env::temp_dir().join(format!("connwatch-cg-{}", std::process::id()));
        let leaf = root.join("kubepods.slice").join("app.scope");
        fs::create_dir_all(&leaf).unwrap();
        let mut cg = Cgroups::at(&root);
        let id = fs::metadata(&leaf).unwrap().ino();
        assert_eq!(cg.path(id).as_deref(), Some("/kubepods.slice/app.scope"));
        assert_eq!(cg.path(0), None);
        // An id unknown right after a walk waits for the next one.
        let late = root.join("late.scope");
        fs::create_dir_all(&late).unwrap();
        let late_id = fs::metadata(&late).unwrap().ino();
        assert_eq!(cg.path(late_id), None);
        cg.last_walk = Some(Instant::now() - WALK_AT_MOST_EVERY);
        assert_eq!(cg.path(late_id).as_deref(), Some("/late.scope"));
        fs::remove_dir_all(&root).unwrap();
    }
}
