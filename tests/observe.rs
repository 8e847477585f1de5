//! Seeing the connections: `list` with and without a daemon, the control API (and what
//! it does with malformed requests), Prometheus metrics read by Prometheus's own
//! parser, `top` in a real terminal, and the audit log in a file and in journal form.
//!
//! Root, the real eBPF program and real loopback connections, like the other end-to-end
//! tests; `promtool` (Debian's `prometheus`) and `tmux` must be installed (`cargo xtask
//! test` installs them). Without them these tests fail and say so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

const SOCKET: &str = "/run/connwatch.sock";

fn list_json(args: &[&str]) -> Vec<Value> {
    let out = Command::new(BIN)
        .args(["list", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("list --json prints an array")
}

fn row_of<'a>(rows: &'a [Value], c: &Conn) -> &'a Value {
    let local = c.local.to_string();
    rows.iter()
        .find(|r| r["local"] == local.as_str())
        .unwrap_or_else(|| panic!("{local} not listed in {rows:#?}"))
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// The process's own name (its main thread's), which the daemon reads from `/proc`
/// for the pid the kernel program records as a socket's owner.
fn my_process_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

/// Makes the client end known to the kernel program as ours: it learns owners from
/// the processes that move data.
fn talk(c: &Conn) {
    (&c.client).write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    (&c.server).read_exact(&mut buf).unwrap();
}

fn check_ages(rows: &[Value], conns: &[&Conn], with_daemon: bool) {
    for c in conns {
        let r = row_of(rows, c);
        let want = c.opened.elapsed().as_secs_f64();
        let age = num(&r["age_secs"]);
        assert!(
            (age - want).abs() < 1.0,
            "{}: listed age {age}, opened {want:.3} s ago",
            c.local
        );
        assert_eq!(r["state"], "ESTABLISHED");
        assert!(num(&r["state_secs"]) <= age + 0.01);
        assert!(num(&r["idle_secs"]) <= age + 1.0);
        if with_daemon {
            assert_eq!(r["next_rule"], "max-age", "{r}");
            let left = num(&r["next_in_secs"]);
            assert!(
                (left - (3600.0 - want)).abs() < 1.0,
                "{}: due in {left}, expected {}",
                c.local,
                3600.0 - want
            );
        } else {
            assert_eq!(r["next_rule"], Value::Null, "no daemon, no next rule: {r}");
        }
    }
}

#[test]
fn list_ages_match_connections_opened_at_known_times_with_and_without_a_daemon() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let d = Daemon::start_when_free(&["--max-age", "1h", "--port", &p]);
    let old = Conn::open(&l);
    talk(&old);
    thread::sleep(Duration::from_millis(2500));
    let new = Conn::open(&l);

    // With the daemon: its view, with the next rule and deadline.
    let rows = list_json(&["--port", &p]);
    assert_eq!(rows.len(), 4, "two connections, two ends each: {rows:#?}");
    check_ages(&rows, &[&old, &new], true);
    let me = my_process_comm();
    assert_eq!(row_of(&rows, &old)["process"], me.as_str());
    assert_eq!(row_of(&rows, &old)["pid"], std::process::id());

    // Filters, sorts and limits, done by the daemon. The age that splits the two is
    // taken halfway between them, so a slow machine (a TCG guest) cannot blur it.
    let split = || {
        let ms = (old.opened.elapsed() + new.opened.elapsed()).as_millis() / 2;
        format!("{ms}ms")
    };
    let older = list_json(&["--port", &p, "--older-than", &split()]);
    assert_eq!(older.len(), 2, "only the old connection's ends: {older:#?}");
    assert!(older.iter().all(|r| num(&r["age_secs"]) >= 2.0));
    // The client ends are ours (connect and send run in this thread).
    let mine = list_json(&["--port", &p, "--process", &me]);
    assert!(
        mine.iter().all(|r| r["process"] == me.as_str()),
        "{mine:#?}"
    );
    for c in [&old, &new] {
        row_of(&mine, c);
    }
    assert!(list_json(&["--port", &p, "--process", "no-such-proc"]).is_empty());
    let first = list_json(&["--port", &p, "--sort", "age", "--limit", "1"]);
    assert_eq!(first.len(), 1);
    assert!(
        num(&first[0]["age_secs"]) >= 2.0,
        "oldest first: {first:#?}"
    );
    let remote = list_json(&["--port", &p, "--remote-addr", "10.0.0.0/8"]);
    assert!(remote.is_empty(), "{remote:#?}");
    let closing = list_json(&["--port", &p, "--state", "close-wait"]);
    assert!(closing.is_empty(), "{closing:#?}");
    let idle = list_json(&["--port", &p, "--sort", "idle", "--idle-longer-than", "1s"]);
    assert!(!idle.is_empty() && idle.iter().all(|r| num(&r["idle_secs"]) >= 1.0));

    // The table, for people.
    let out = Command::new(BIN)
        .args(["list", "--port", &p])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let head = table.lines().next().unwrap();
    for col in [
        "STATE", "LOCAL", "REMOTE", "AGE", "IN-STATE", "IDLE", "PROCESS", "NEXT",
    ] {
        assert!(head.contains(col), "{head}");
    }
    let line = table
        .lines()
        .find(|l| l.contains(&old.local.to_string()))
        .unwrap();
    assert!(line.contains("max-age in 59m"), "{line}");
    assert!(
        line.contains(&format!("({})", std::process::id())),
        "{line}"
    );

    d.stop();
    // Without the daemon: the kernel's table and the pinned map.
    let rows = list_json(&["--port", &p]);
    assert_eq!(rows.len(), 4, "{rows:#?}");
    check_ages(&rows, &[&old, &new], false);
    assert_eq!(row_of(&rows, &old)["process"], me.as_str());
    let older = list_json(&["--port", &p, "--older-than", &split()]);
    assert_eq!(older.len(), 2, "{older:#?}");
}

#[test]
fn bad_list_flags_are_one_line_naming_the_value() {
    for (args, want) in [
        (&["list", "--state", "open"][..], "'open'"),
        (&["list", "--older-than", "soon"][..], "soon"),
        (&["list", "--sort", "size"][..], "size"),
        (&["list", "--remote-addr", "10.0.0.0/40"][..], "10.0.0.0/40"),
        (&["top", "--port", "9-3"][..], "9-3"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// A control connection: one request a line, one reply a line.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    fn open() -> Control {
        let s = UnixStream::connect(SOCKET).expect("the control socket accepts");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Control {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Option<Value> {
        self.writer.write_all(bytes).unwrap();
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("a JSON reply")),
        }
    }

    fn ask(&mut self, req: Value) -> Value {
        self.send_raw(format!("{req}\n").as_bytes())
            .expect("a reply")
    }
}

fn error_of(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "{v}");
    v["error"].as_str().expect("an error message")
}

#[test]
fn the_control_api_answers_refuses_and_survives_malformed_requests() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let d = Daemon::start_when_free(&["--max-age", "1h", "--port", &p]);
    let meta = std::fs::metadata(SOCKET).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), 0, "owned by root");
    let c = Conn::open(&l);

    let mut ctl = Control::open();
    // Malformed requests: an error reply each, and the same connection goes on.
    for (raw, want) in [
        (&b"{\n"[..], "not JSON"),
        (b"[1,2]\n", "not a JSON object"),
        (b"{\"cmd\":\"explode\"}\n", "unknown cmd 'explode'"),
        (b"{\"cmd\":\"status\",\"verbose\":true}\n", "verbose"),
        (b"{\"cmd\":\"list\",\"sort\":\"size\"}\n", "size"),
        (b"{\"cmd\":\"list\",\"state\":[\"open\"]}\n", "'open'"),
        (
            b"{\"cmd\":\"destroy\",\"local\":\"here\",\"remote\":\"1.2.3.4:5\"}\n",
            "'here'",
        ),
        (b"\xff\xfe\n", "UTF-8"),
    ] {
        let reply = ctl.send_raw(raw).expect("a reply to a malformed request");
        let err = error_of(&reply);
        assert!(
            err.contains(want),
            "{:?}: {err}",
            String::from_utf8_lossy(raw)
        );
    }
    let status = ctl.ask(json!({"cmd": "status"}));
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["enforce"], false);
    assert!(status["tracked"].as_u64().unwrap() >= 2);
    assert!(status["by_state"]["ESTABLISHED"].as_u64().unwrap() >= 2);
    assert_eq!(status["ages"].as_array().unwrap().len(), 7);
    assert_eq!(status["api_socket"], SOCKET);

    // An over-long line: an error, then the connection closes; the daemon carries on.
    let mut long = Control::open();
    let huge = vec![b'x'; 100 * 1024];
    let reply = long
        .send_raw(&huge)
        .expect("a reply to an over-long request");
    assert!(error_of(&reply).contains("longer than"), "{reply}");
    // A client that goes away mid-request.
    UnixStream::connect(SOCKET)
        .unwrap()
        .write_all(b"{\"cmd\":")
        .unwrap();

    let policy = ctl.ask(json!({"cmd": "policy"}));
    assert_eq!(policy["rules"][0]["kind"], "max-age", "{policy}");
    assert_eq!(policy["rules"][0]["ports"][0], p.as_str());
    assert!(policy["protect"]["ports"]
        .as_array()
        .unwrap()
        .contains(&json!("22")));

    let list = ctl.ask(json!({"cmd": "list", "port": [p], "sort": "age"}));
    assert_eq!(list["matched"], 2, "{list}");
    let row = list["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["local"] == c.local.to_string())
        .expect("listed");
    assert_eq!(row["next_rule"], "max-age");

    // A manual destroy in a dry run: said, not done.
    let tuple =
        json!({"cmd": "destroy", "local": c.local.to_string(), "remote": c.remote.to_string()});
    let done = ctl.ask(tuple.clone());
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(done["outcome"], "would destroy");
    assert_eq!(done["dry_run"], true);
    thread::sleep(Duration::from_millis(200));
    assert!(!c.is_dead(), "a dry run destroyed it");
    d.wait_for("would destroy", Duration::from_secs(2));

    // Protections hold for manual destroys too.
    let own22 = TcpListener::bind("127.0.0.1:22").ok();
    let ssh = TcpStream::connect("127.0.0.1:22").expect("connect to port 22");
    let _ssh_peer = own22.as_ref().map(|l| l.accept().unwrap());
    let refused = ctl.ask(json!({
        "cmd": "destroy",
        "local": ssh.local_addr().unwrap().to_string(),
        "remote": "127.0.0.1:22",
    }));
    assert!(
        error_of(&refused).contains("protected by port 22"),
        "{refused}"
    );
    let none = ctl.ask(json!({"cmd": "destroy", "local": "127.0.0.1:1", "remote": "127.0.0.1:2"}));
    assert!(error_of(&none).contains("no TCP connection"), "{none}");
    let listener = ctl.ask(json!({"cmd": "destroy", "local": l.local_addr().unwrap().to_string(), "remote": "0.0.0.0:0"}));
    assert_eq!(listener["ok"], false, "{listener}");

    let recent = ctl.ask(json!({"cmd": "destroys", "limit": 10}));
    let records = recent["records"].as_array().unwrap();
    let manual: Vec<&Value> = records.iter().filter(|r| r["reason"] == "manual").collect();
    assert!(
        manual
            .iter()
            .any(|r| r["action"] == "would destroy" && r["local"] == c.local.to_string()),
        "{recent}"
    );
    assert!(
        manual.iter().any(|r| r["action"] == "protected"),
        "{recent}"
    );
    let last = manual.last().unwrap();
    for field in ["time", "state", "age_secs", "idle_secs", "rule", "dry_run"] {
        assert!(last.get(field).is_some(), "{field} missing from {last}");
    }

    let reload = ctl.ask(json!({"cmd": "reload"}));
    assert_eq!(reload["ok"], true, "{reload}");
    assert!(reload["description"].as_str().unwrap().contains("max-age"));
    let status = ctl.ask(json!({"cmd": "status"}));
    assert_eq!(status["counters"]["protected"], 1, "{status}");
    assert_eq!(status["by_reason"]["manual"], 1, "{status}");
    assert!(d.lines().iter().any(|l| l.contains("reloaded the policy")));
    d.stop();
    assert!(!Path::new(SOCKET).exists(), "the socket is removed on exit");

    // Enforced: the manual destroy happens.
    let d = Daemon::start_when_free(&["--max-age", "1h", "--port", &p, "--enforce"]);
    let done = Control::open().ask(tuple);
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(done["outcome"], "destroyed");
    assert!(
        c.died_within(c.opened.elapsed() + Duration::from_secs(1))
            .is_some(),
        "the connection survived a manual destroy"
    );
    d.wait_for("destroyed", Duration::from_secs(2));
    d.stop();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, target: &str, method: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

fn promtool() -> PathBuf {
    let path = PathBuf::from("/usr/bin/promtool");
    assert!(
        path.exists(),
        "promtool is missing: `apt-get install prometheus` (cargo xtask test installs it)"
    );
    path
}

/// Runs Prometheus's own parsers on an exposition: `promtool check metrics` (the text
/// format parser and linter) and the OpenMetrics parser Prometheus scrapes with, through
/// `promtool tsdb create-blocks-from openmetrics`. Returns the series Prometheus read,
/// as `promtool tsdb dump` prints them.
fn parse_with_prometheus(text: &str) -> Vec<String> {
    let promtool = promtool();
    let dir = std::env::temp_dir().join(format!("connwatch-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // The linter reads the older text format, where a counter's samples carry its
    // family's name; OpenMetrics names the family without `_total`. That one difference
    // is all it may report.
    let mut lint = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let name = line.split_whitespace().next().unwrap_or("");
        let family = name.strip_suffix("_total").unwrap_or("-");
        assert!(
            line.ends_with("no help text") && text.contains(&format!("# TYPE {family} counter\n")),
            "promtool check metrics: {line}\n{text}"
        );
    }

    // Backfilling needs a timestamp on each sample; everything else is as served.
    let stamped: String = text
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("{l} 1700000000\n")
            }
        })
        .collect();
    let input = dir.join("scrape.om");
    std::fs::write(&input, stamped).unwrap();
    let blocks = dir.join("blocks");
    let out = Command::new(&promtool)
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&input)
        .arg(&blocks)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Prometheus's OpenMetrics parser refused the scrape: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::create_dir_all(blocks.join("wal")).unwrap();
    let out = Command::new(&promtool)
        .args(["tsdb", "dump"])
        .arg(&blocks)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The value of the series whose dump line starts with `{__name__="NAME"` and has
/// every label given.
fn series(dump: &[String], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let start = format!("{{__name__=\"{name}\"");
    dump.iter()
        .find(|l| {
            l.starts_with(&start)
                && (l.as_bytes().get(start.len()) == Some(&b'}')
                    || l.as_bytes().get(start.len()) == Some(&b','))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.split_whitespace().rev().nth(1)?.parse().ok())
}

#[test]
fn metrics_are_served_and_read_by_prometheus_own_parser() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_when_free(&[
        "--max-age",
        "1s",
        "--port",
        &p,
        "--enforce",
        "--metrics-addr",
        &addr,
    ]);
    let doomed = [Conn::open(&l), Conn::open(&l)];
    let keep = listen("127.0.0.1");
    let _alive = Conn::open(&keep);
    for c in &doomed {
        assert!(c.died_within(Duration::from_secs(3)).is_some());
    }
    thread::sleep(Duration::from_millis(300));

    let (head, body) = http_get(&addr, "/metrics", "GET");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let dump = parse_with_prometheus(&body);
    let get = |name: &str, labels: &[(&str, &str)]| {
        series(&dump, name, labels)
            .unwrap_or_else(|| panic!("{name}{labels:?} not in\n{}", dump.join("\n")))
    };
    let destroyed = get(
        "connwatch_destroys_total",
        &[("reason", "max-age"), ("outcome", "destroyed")],
    );
    assert!(destroyed >= 2.0, "{destroyed}");
    let late = get("connwatch_deadline_to_destroy_seconds_count", &[]);
    assert!(
        late >= destroyed,
        "every destroy is timed: {late} < {destroyed}"
    );
    let within_a_second = get(
        "connwatch_deadline_to_destroy_seconds_bucket",
        &[("le", "1.0")],
    );
    assert_eq!(
        within_a_second, late,
        "destroys come within a second of their deadline"
    );
    assert!(get("connwatch_connections", &[("state", "ESTABLISHED")]) >= 2.0);
    assert!(get("connwatch_sockets_tracked", &[]) >= 2.0);
    assert!(get("connwatch_connection_age_seconds_count", &[]) >= 2.0);
    assert!(get("connwatch_connection_age_seconds_bucket", &[("le", "+Inf")]) >= 2.0);
    assert!(get("connwatch_events_total", &[]) > 0.0);
    assert!(get("connwatch_kernel_events_total", &[]) > 0.0);
    assert_eq!(
        get("connwatch_kernel_drops_total", &[("reason", "map_full")]),
        0.0
    );
    assert_eq!(
        get("connwatch_kernel_drops_total", &[("reason", "ring_full")]),
        0.0
    );

    // Counters only grow; the rest of HTTP is refused cleanly.
    let (_, again) = http_get(&addr, "/metrics", "GET");
    let dump2 = parse_with_prometheus(&again);
    assert!(
        series(&dump2, "connwatch_kernel_events_total", &[]).unwrap()
            >= get("connwatch_kernel_events_total", &[])
    );
    let (head, body) = http_get(&addr, "/metrics", "HEAD");
    assert!(
        head.starts_with("HTTP/1.1 200") && body.is_empty(),
        "{head}"
    );
    let (head, _) = http_get(&addr, "/nothing", "GET");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http_get(&addr, "/metrics", "POST");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let mut junk = TcpStream::connect(&addr).unwrap();
    junk.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = junk.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let (head, _) = http_get(&addr, "/metrics", "GET");
    assert!(head.starts_with("HTTP/1.1 200"), "still serving: {head}");
    d.stop();
}

#[test]
fn metrics_are_off_unless_asked_for() {
    let _x = exclusive();
    let d = Daemon::start_when_free(&["--max-age", "1h", "--port", "1"]);
    assert!(
        TcpStream::connect("127.0.0.1:9752").is_err(),
        "something listens on the default metrics port"
    );
    assert!(!d.lines().iter().any(|l| l.contains("Prometheus metrics")));
    d.stop();
}

/// A tmux server of our own, its one window 80x24.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        assert!(
            Command::new("tmux").arg("-V").output().is_ok(),
            "tmux is missing: `apt-get install tmux` (cargo xtask test installs it)"
        );
        let t = Tmux {
            socket: format!("connwatch-test-{}", std::process::id()),
        };
        let ok = t
            .cmd(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "80",
                "-y",
                "24",
                command,
            ])
            .status
            .success();
        assert!(ok, "tmux new-session failed");
        t
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).to_string()
    }

    fn alive(&self) -> bool {
        self.cmd(&["has-session", "-t", "top"]).status.success()
    }

    fn wait_for_screen(&self, wants: &[&str], within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let s = self.screen();
            if wants.iter().all(|w| s.contains(w)) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "the screen never showed {wants:?}:\n{s}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_runs_in_a_real_80x24_terminal_and_quits_on_q() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let d = Daemon::start_when_free(&["--max-age", "2s", "--port", &p]);
    let c = Conn::open(&l);
    talk(&c);
    let t = Tmux::start(&format!("{BIN} top --port {p}"));
    let local = c.local.to_string();
    let screen = t.wait_for_screen(
        &["States", "Ages", "Oldest", "Most idle", &local],
        Duration::from_secs(10),
    );
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines.len() <= 24, "{screen}");
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(
        lines[0].contains("daemon") && lines[0].contains("dry run"),
        "{screen}"
    );
    assert!(lines[0].contains("q quit"), "{screen}");
    let states = lines
        .iter()
        .find(|l| l.contains("ESTABLISHED"))
        .expect("a state count");
    assert!(
        states.contains("ESTABLISHED        2"),
        "two ends: {states}"
    );
    let me = my_process_comm();
    assert!(
        screen.contains(&me[..me.len().min(6)]),
        "the owner is shown:\n{screen}"
    );
    // After the deadline, the dry run's decisions show per minute.
    let screen = t.wait_for_screen(&["Would destroy/min", "max-age"], Duration::from_secs(6));
    let rate = screen.lines().find(|l| l.contains("max-age")).unwrap();
    assert!(
        rate.trim_end()
            .trim_end_matches('│')
            .trim_end()
            .ends_with('2'),
        "{screen}"
    );

    t.cmd(&["send-keys", "-t", "top", "q"]);
    // At its next look at the keyboard, between refreshes: a refresh takes seconds
    // under emulation (a TCG guest).
    let end = Instant::now() + Duration::from_secs(10);
    while t.alive() {
        assert!(
            Instant::now() < end,
            "top did not quit on q:\n{}",
            t.screen()
        );
        thread::sleep(Duration::from_millis(50));
    }
    d.stop();
}

/// Starts `connwatch run` with stderr into a file, waiting its turn while another
/// daemon runs; returns when `ready_in` says it watches.
fn start_logging_to(
    args: &[&str],
    env: &[(&str, &str)],
    stderr: &Path,
    ready_in: &Path,
) -> Running {
    let end = Instant::now() + Duration::from_secs(900);
    loop {
        let err = std::fs::File::create(stderr).unwrap();
        let mut child = Command::new(BIN)
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let ready = Instant::now() + Duration::from_secs(20);
        while Instant::now() < ready {
            let text = std::fs::read_to_string(ready_in).unwrap_or_default();
            if text.contains("watching TCP sockets") {
                return Running(Some(child));
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let said = std::fs::read_to_string(stderr).unwrap_or_default();
        if !said.contains("another `connwatch run` is active") || Instant::now() > end {
            panic!("the daemon did not start: {said}");
        }
        thread::sleep(Duration::from_secs(2));
    }
}

/// A daemon started by hand: killed if a test fails before it stops it.
struct Running(Option<Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stop(mut running: Running) {
    let mut child = running.0.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

fn wait_for_in(path: &Path, needle: &str) -> String {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(
            Instant::now() < end,
            "no {needle:?} in {}:\n{text}",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_audit_log_goes_to_a_file_reopened_on_sighup() {
    let _x = exclusive();
    let dir = std::env::temp_dir().join(format!("connwatch-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("connwatch.log");
    let l = listen("127.0.0.1");
    let p = port(&l);
    let child = start_logging_to(
        &[
            "--log-format",
            "json",
            "--log-file",
            log.to_str().unwrap(),
            "--max-age",
            "1s",
            "--port",
            &p,
        ],
        &[],
        &dir.join("stderr"),
        &log,
    );
    let first = Conn::open(&l);
    talk(&first);
    let line = wait_for_in(&log, &format!("\"local\":\"{}\"", first.local));
    let v: Value = serde_json::from_str(&line).expect("one JSON object a line");
    assert_eq!(v["action"], "would destroy", "{v}");
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["state"], "ESTABLISHED");
    assert_eq!(v["reason"], "max-age");
    assert_eq!(v["rule"], "max-age");
    assert_eq!(v["remote"], first.remote.to_string());
    assert!(v["age_secs"].as_u64().unwrap() >= 1);
    assert!(v["idle_secs"].as_u64().is_some(), "{v}");
    assert!(v["timestamp"].as_str().is_some(), "{v}");
    assert_eq!(v["owner"], my_process_comm().as_str(), "{v}");
    assert_eq!(v["pid"], std::process::id());
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // logrotate moves the file, then signals.
    let rotated = dir.join("connwatch.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_for_in(&log, "reopened the log file");
    let second = Conn::open(&l);
    wait_for_in(&log, &format!("\"local\":\"{}\"", second.local));
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        !old.contains(&second.local.to_string()),
        "a record went to the rotated file"
    );
    let said = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(
        said.is_empty(),
        "with --log-file nothing goes to stderr: {said}"
    );
    stop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn under_systemd_lines_carry_their_journal_priority() {
    let _x = exclusive();
    let dir = std::env::temp_dir().join(format!("connwatch-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stderr = dir.join("stderr");
    std::fs::File::create(&stderr).unwrap();
    // JOURNAL_STREAM names the stream systemd connected: here, the file stderr goes to.
    let meta = std::fs::metadata(&stderr).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let l = listen("127.0.0.1");
    let p = port(&l);
    let child = start_logging_to(
        &["--max-age", "1s", "--port", &p],
        &[("JOURNAL_STREAM", stream.as_str())],
        &stderr,
        &stderr,
    );
    let c = Conn::open(&l);
    let line = wait_for_in(&stderr, &c.local.to_string());
    assert!(
        line.starts_with("<6>would destroy")
            || line.starts_with("<6> INFO would destroy")
            || line.starts_with("<6>"),
        "{line}"
    );
    let text = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        text.contains("logging to the systemd journal"),
        "the daemon says where it logs:\n{text}"
    );
    for l in text.lines() {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p)),
            "a line without its priority: {l}"
        );
        // The journal stamps lines itself: no timestamp of our own.
        let rest = &l[3..];
        assert!(
            !rest.trim_start().starts_with(|c: char| c.is_ascii_digit()),
            "{l}"
        );
    }
    stop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `out` bytes from the client and `back` from the server, each read in full.
fn carry(c: &Conn, out: usize, back: usize) {
    let (mut client, mut server) = (&c.client, &c.server);
    let reader = thread::scope(|s| {
        let r = s.spawn(move || {
            let mut buf = vec![0u8; out];
            server.read_exact(&mut buf).unwrap();
        });
        client.write_all(&vec![7u8; out]).unwrap();
        r.join()
    });
    reader.unwrap();
    server.write_all(&vec![9u8; back]).unwrap();
    let mut buf = vec![0u8; back];
    client.read_exact(&mut buf).unwrap();
}

/// A connection that moved a known number of bytes shows them, each end its own way,
/// in `list --json` without a daemon and with one (which joins one dump per
/// namespace to its tracker), `--sort bytes` puts it first, and the audit record of
/// its destroy carries its totals.
#[test]
fn list_shows_what_each_connection_carried() {
    let _x = exclusive();
    let l = listen("127.0.0.1");
    let p = port(&l);
    let big = Conn::open(&l);
    let small = Conn::open(&l);
    carry(&big, 100_000, 30_000);
    carry(&small, 1_000, 0);
    thread::sleep(Duration::from_millis(300));
    let check = |rows: &[Value], with_daemon: bool| {
        let client = row_of(rows, &big);
        assert_eq!(
            client["bytes_out"], 100_000,
            "{client} (daemon: {with_daemon})"
        );
        assert_eq!(client["bytes_in"], 30_000, "{client}");
        assert!(num(&client["segs_out"]) >= 2.0, "{client}");
        assert!(num(&client["segs_in"]) >= 1.0, "{client}");
        assert_eq!(client["retrans"], 0, "{client}");
        let server = rows
            .iter()
            .find(|r| r["remote"] == big.local.to_string().as_str())
            .expect("the server end");
        assert_eq!(server["bytes_in"], 100_000, "{server}");
        assert_eq!(server["bytes_out"], 30_000, "{server}");
        let small_client = row_of(rows, &small);
        assert_eq!(small_client["bytes_out"], 1_000, "{small_client}");
        assert_eq!(small_client["bytes_in"], 0, "{small_client}");
    };
    check(&list_json(&["--port", &p]), false);

    // An hour while the lists are checked, then a second by a reload: the destroys
    // come once the test is ready for them, however long the daemon took to start and
    // answer (seconds under emulation, a TCG guest).
    let config = MaxAgeConfig::new("connwatch-traffic", &p, "1h");
    let d = Daemon::start_when_free(&["--config", config.path(), "--enforce"]);
    let rows = list_json(&["--port", &p, "--sort", "bytes"]);
    check(&rows, true);
    let first: Vec<&str> = rows[..2]
        .iter()
        .map(|r| r["local"].as_str().unwrap())
        .collect();
    assert!(
        first.contains(&big.local.to_string().as_str()),
        "the big connection sorts first: {rows:#?}"
    );
    let last: Vec<&str> = rows[2..4]
        .iter()
        .map(|r| r["local"].as_str().unwrap())
        .collect();
    assert!(
        last.contains(&small.local.to_string().as_str()),
        "the small connection sorts after: {rows:#?}"
    );
    // The table says it too.
    let out = Command::new(BIN)
        .args(["list", "--port", &p, "--sort", "bytes"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().next().unwrap().contains(" IN   OUT "),
        "{text}"
    );
    assert!(text.contains("  98K   29K "), "{text}");

    config.set("1s");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    d.wait_for("reloaded the policy", Duration::from_secs(30));
    assert!(big.dies_within(Duration::from_secs(10)).is_some());
    thread::sleep(Duration::from_millis(300));
    let records = api(&json!({"cmd": "destroys", "limit": 50}));
    let record = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["local"] == big.local.to_string().as_str() && r["action"] == "destroyed")
        .unwrap_or_else(|| panic!("no record of {}: {records:#}", big.tuple()));
    assert_eq!(record["bytes_out"], 100_000, "{record}");
    assert_eq!(record["bytes_in"], 30_000, "{record}");
    let line = d.wait_for(
        &format!("destroyed {}", big.tuple()),
        Duration::from_secs(1),
    );
    assert!(line.contains("bytes_in=30000 bytes_out=100000"), "{line}");
    d.stop();
}

/// The new-connection counters move by the connections opened and closed, each
/// direction apart, as Prometheus reads them.
#[test]
fn connection_counters_follow_opens_and_closes() {
    let _x = exclusive();
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_when_free(&["--metrics-addr", &addr]);
    let l = listen("127.0.0.1");
    let read = |name: &str, labels: &[(&str, &str)]| {
        let (_, body) = http_get(&addr, "/metrics", "GET");
        let dump = parse_with_prometheus(&body);
        series(&dump, name, labels).unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    let opened = "connwatch_connections_opened_total";
    let closed = "connwatch_connections_closed_total";
    let (in0, out0) = (
        read(opened, &[("direction", "in")]),
        read(opened, &[("direction", "out")]),
    );
    let closed0 = read(closed, &[]);
    const N: f64 = 7.0;
    let conns: Vec<Conn> = (0..N as usize).map(|_| Conn::open(&l)).collect();
    thread::sleep(Duration::from_millis(300));
    let (in1, out1) = (
        read(opened, &[("direction", "in")]),
        read(opened, &[("direction", "out")]),
    );
    // Other programs on the host may open connections meanwhile: at least N, not many more.
    for (what, delta) in [("in", in1 - in0), ("out", out1 - out0)] {
        assert!((N..N + 20.0).contains(&delta), "opened {what}: {delta}");
    }
    for c in &conns {
        abort_on_close(&c.client);
    }
    drop(conns);
    thread::sleep(Duration::from_millis(300));
    let delta = read(closed, &[]) - closed0;
    assert!(
        (2.0 * N..2.0 * N + 20.0).contains(&delta),
        "closed: {delta}"
    );
    d.stop();
}
