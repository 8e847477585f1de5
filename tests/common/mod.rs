//! Shared by the end-to-end tests: a daemon under test, loopback connections, and
//! what their peers see.
#![allow(dead_code)] // each test binary uses its own part of this

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// A config file holding one `max-age` rule on a port, for tests that start a daemon
/// with a long limit and set the real one by a reload once they are ready: a start
/// and a `list` take seconds under emulation (a TCG guest), which a limit fixed
/// beforehand would have to guess.
pub struct MaxAgeConfig {
    path: std::path::PathBuf,
    port: String,
}

impl MaxAgeConfig {
    /// Writes `limit` into a file under a directory named after `name` and this process.
    pub fn new(name: &str, port: &str, limit: &str) -> MaxAgeConfig {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = MaxAgeConfig {
            path: dir.join("connwatch.toml"),
            port: port.to_string(),
        };
        config.set(limit);
        config
    }

    /// Rewrites the limit; a daemon takes it at its next reload.
    pub fn set(&self, limit: &str) {
        let text = format!("max-age = \"{limit}\"\nport = [{}]\n", self.port);
        std::fs::write(&self.path, text).unwrap();
    }

    pub fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for MaxAgeConfig {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Fails the calling test, saying why, when it cannot run: these tests exercise the
/// real kernel and must not pass by doing nothing.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test {what} and needs root (with BPF and sock_diag); run it as root: `sudo cargo xtask test`"
    );
}

pub const BIN: &str = env!("CARGO_BIN_EXE_connwatch");

/// One daemon at a time: they share the tracepoint and the pinned maps.
pub fn exclusive() -> (MutexGuard<'static, ()>, std::fs::File) {
    static LOCK: Mutex<()> = Mutex::new(());
    require_root("loads the eBPF program and destroys sockets");
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // And one test process at a time on the host: test binaries may run side by side.
    let file = std::fs::File::create("/tmp/connwatch-tests.lock").unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; it is released when the file closes.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
    (guard, file)
}

/// A running `connwatch run`, its log captured line by line.
pub struct Daemon {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Set once the daemon's stderr reached its end: every line it wrote is in `log`.
    eof: Arc<std::sync::atomic::AtomicBool>,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with_env(args, &[])
    }

    /// As [`Daemon::start`], with these environment variables set for the daemon.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        // A daemon started by something else on the host (a benchmark, say) holds the
        // single-instance lock for a while: wait for it rather than fail.
        let give_up = Instant::now() + Duration::from_secs(300);
        loop {
            let mut d = Self::spawn(args, env);
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end {
                if d.lines().iter().any(|l| l.contains("watching TCP sockets")) {
                    return d;
                }
                if let Ok(Some(_)) = d.child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            thread::sleep(Duration::from_millis(50));
            let busy = d
                .lines()
                .iter()
                .any(|l| l.contains("another `connwatch run` is active"));
            if !busy || Instant::now() > give_up {
                d.wait_for("watching TCP sockets", Duration::from_millis(1));
            }
            thread::sleep(Duration::from_secs(1));
        }
    }

    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .env("CONNWATCH_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn connwatch");
        let log = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, at_end) = (log.clone(), eof.clone());
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("daemon: {line}");
                sink.lock().unwrap().push(line);
            }
            at_end.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Daemon { child, log, eof }
    }

    /// Starts a daemon like [`Daemon::start`], waiting its turn (up to 15 minutes)
    /// while another `connwatch run` on this host holds the instance lock.
    pub fn start_when_free(args: &[&str]) -> Daemon {
        Self::start_when_free_with_env(args, &[])
    }

    pub fn start_when_free_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let end = Instant::now() + Duration::from_secs(900);
        loop {
            let mut child = Command::new(BIN)
                .arg("run")
                .args(args)
                .env("CONNWATCH_LOG", "debug")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn connwatch");
            let log = Arc::new(Mutex::new(Vec::new()));
            let eof = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (sink, at_end) = (log.clone(), eof.clone());
            let stderr = child.stderr.take().unwrap();
            let reader = thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("daemon: {line}");
                    sink.lock().unwrap().push(line);
                }
                at_end.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut d = Daemon { child, log, eof };
            let ready = Instant::now() + Duration::from_secs(20);
            while Instant::now() < ready {
                if d.lines().iter().any(|l| l.contains("watching TCP sockets")) {
                    return d;
                }
                if let Ok(Some(_)) = d.child.try_wait() {
                    let _ = reader.join();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let lines = d.lines();
            let busy = lines
                .iter()
                .any(|l| l.contains("another `connwatch run` is active"));
            if !busy || Instant::now() > end {
                panic!("the daemon did not start; log:\n{}", lines.join("\n"));
            }
            drop(d);
            thread::sleep(Duration::from_secs(2));
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_for(&self, needle: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no log line with {needle:?} within {within:?}; log:\n{}",
            self.lines().join("\n")
        );
    }

    /// Tuples named in log lines that start with `action` (e.g. "destroyed").
    pub fn decided(&self, actions: &[&str]) -> BTreeSet<String> {
        self.lines()
            .iter()
            .filter_map(|l| {
                actions.iter().find_map(|a| {
                    let at = l.find(&format!(" {a} "))?;
                    let rest = &l[at + a.len() + 2..];
                    rest.split(" state=").next().map(str::to_string)
                })
            })
            .collect()
    }

    pub fn stop(mut self) -> Vec<String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "daemon exited with {status}");
        self.all_lines()
    }

    /// Every line of a daemon that has exited: waits (up to a minute) until its
    /// stderr has been read to the end, however many lines it wrote last.
    pub fn all_lines(&self) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(60);
        while !self.eof.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                Instant::now() < end,
                "the daemon's log was not read to its end"
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.lines()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback connection: our client end and the accepted server end.
pub struct Conn {
    pub client: TcpStream,
    pub server: TcpStream,
    pub opened: Instant,
    /// The client's local and remote address, kept: a destroyed socket forgets its peer.
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Conn {
    pub fn open(listener: &TcpListener) -> Conn {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        Conn::new(client, server)
    }

    pub fn new(client: TcpStream, server: TcpStream) -> Conn {
        Conn {
            local: client.local_addr().unwrap(),
            remote: client.peer_addr().unwrap(),
            client,
            server,
            opened: Instant::now(),
        }
    }

    pub fn tuple(&self) -> String {
        format!("{} -> {}", self.local, self.remote)
    }

    /// Whether the connection was torn down, as the client end sees it: a reset or
    /// abort (or EOF) instead of a read that times out.
    pub fn is_dead(&self) -> bool {
        self.client
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut buf = [0u8; 1];
        match (&self.client).read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => false,
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => true,
                other => panic!("unexpected read error {other:?}: {e}"),
            },
        }
    }

    /// Waits until the connection dies; returns when, measured from its opening.
    /// Waits up to `limit` from now for the connection to die; returns how long it took.
    pub fn dies_within(&self, limit: Duration) -> Option<Duration> {
        let from = Instant::now();
        loop {
            if self.is_dead() {
                return Some(from.elapsed());
            }
            if from.elapsed() >= limit {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Looks at least once, even when the limit has passed already.
    pub fn died_within(&self, limit: Duration) -> Option<Duration> {
        loop {
            if self.is_dead() {
                return Some(self.opened.elapsed());
            }
            if self.opened.elapsed() >= limit {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn listen(ip: &str) -> TcpListener {
    TcpListener::bind(format!("{ip}:0")).unwrap()
}

pub fn port(l: &TcpListener) -> String {
    l.local_addr().unwrap().port().to_string()
}

/// A client socket bound to `local` (address and port; port 0 picks one), connected
/// to `to`: for connections from a chosen source address or reusing a tuple.
pub fn connect_from(local: SocketAddr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    fn raw(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: sockaddr_storage is plain data; zero is a valid pattern.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_be_bytes(v4.ip().octets()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
    let family = if local.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket calls on a descriptor we own, handed to TcpStream at the end.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            4,
        );
        let (addr, len) = raw(local);
        let rc = libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind {local}: {}", std::io::Error::last_os_error());
        let (addr, len) = raw(to);
        let rc = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect {to}: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// Sets SO_LINGER 0: the close is a reset, leaving no TIME_WAIT behind.
pub fn abort_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor the stream owns.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

/// A network namespace of the test's own (`ip netns add`), with loopback up, deleted
/// when dropped. Sockets made inside [`TestNetns::enter`] live in it for good.
pub struct TestNetns {
    pub name: String,
    /// Its inode: what the kernel program records and `list --json` shows.
    pub inode: u32,
}

impl TestNetns {
    pub fn new(tag: &str) -> TestNetns {
        let name = format!("cwt-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(format!("/run/netns/{name}"))
            .expect("ip netns add made a bind mount")
            .ino() as u32;
        TestNetns { name, inode }
    }

    /// Runs `f` on a thread inside the namespace: the sockets it makes are the
    /// namespace's.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a namespace descriptor we own; only this thread moves.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// This process's network namespace: the host's, for the daemon.
pub fn host_netns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
}

/// `connwatch list --json` with these arguments.
pub fn list_rows(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .arg("list")
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One request to the daemon's control socket, and its reply.
pub fn api(request: &serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect("/run/connwatch.sock")
        .expect("the control socket accepts");
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Under `--enforce`, what the log says of each connection (its two ends, each as
/// `local -> remote`): at least one end `destroyed`, each end at most once; an end
/// `skipped` only as "gone before the destroy" while the other end was destroyed (that
/// destroy reset it); no other decision on either end. Returns the tuples destroyed.
pub fn assert_each_destroyed(lines: &[String], conns: &[[String; 2]]) -> BTreeSet<String> {
    let named = |action: &str| -> Vec<(String, &String)> {
        lines
            .iter()
            .filter_map(|l| {
                let at = l.find(&format!(" {action} "))?;
                let rest = &l[at + action.len() + 2..];
                Some((rest.split(" state=").next()?.to_string(), l))
            })
            .collect()
    };
    let destroyed = named("destroyed");
    let destroyed_set: BTreeSet<String> = destroyed.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(
        destroyed.len(),
        destroyed_set.len(),
        "an end destroyed twice: {destroyed:?}"
    );
    let skipped = named("skipped");
    for ends in conns {
        assert!(
            ends.iter().any(|t| destroyed_set.contains(t)),
            "neither end of {ends:?} was destroyed; skipped: {skipped:?}"
        );
        for (i, t) in ends.iter().enumerate() {
            for (_, line) in skipped.iter().filter(|(s, _)| s == t) {
                assert!(
                    destroyed_set.contains(&ends[1 - i])
                        && line.contains("gone before the destroy"),
                    "{t} skipped, not as reset by its peer's destroy: {line}"
                );
            }
        }
    }
    for action in ["failed to destroy", "would destroy", "protected"] {
        for (t, line) in named(action) {
            assert!(!conns.iter().flatten().any(|e| *e == t), "{t}: {line}");
        }
    }
    destroyed_set
}
