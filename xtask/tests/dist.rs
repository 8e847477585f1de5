//! What dist/ ships, checked against the daemon itself: the default config and the
//! DaemonSet's policy parse with connwatch's config parser, the Kubernetes manifests
//! hold what the node agent needs, and every metric the Grafana dashboard queries is
//! one `/metrics` serves. No root, no kernel.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// Parses a config file the way the daemon reads `--config`, from a private copy
/// (the loader refuses files others may write).
fn load_policy(name: &str, text: &str) -> connwatch::policy::PolicySpec {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("connwatch-dist-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("connwatch.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let spec = connwatch::policy::load_config(&path)
        .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
    std::fs::remove_dir_all(&dir).unwrap();
    spec
}

#[test]
fn the_default_config_parses_and_asks_for_nothing() {
    let text = std::fs::read_to_string(dist().join("connwatch.toml")).unwrap();
    let spec = load_policy("default", &text);
    assert_eq!(
        spec,
        connwatch::policy::PolicySpec::default(),
        "every setting of dist/connwatch.toml must stay commented out"
    );
    // And each commented setting is a real one: uncommented, the file still parses.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.contains(' ') && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    }) =>
            {
                rest.to_string()
            }
            _ => String::new(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    // max-age, idle and a state timeout together with named rules is a valid file.
    let spec = load_policy("uncommented", &uncommented);
    assert!(spec.enforce && spec.rules.len() == 2, "{spec:?}");
}

fn manifests() -> Vec<Value> {
    let dir = dist().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            docs.push(v);
        }
    }
    docs
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_daemonset_has_what_the_node_agent_needs() {
    let docs = manifests();
    for d in &docs {
        assert!(
            d["apiVersion"].is_string() && d["kind"].is_string(),
            "{d:?}"
        );
    }
    let ns = kind(&docs, "Namespace")["metadata"]["name"]
        .as_str()
        .unwrap();
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], ns, "{:?}", d["kind"]);
        }
    }
    let sa = kind(&docs, "ServiceAccount")["metadata"]["name"].clone();
    let cm = kind(&docs, "ConfigMap");
    let ds = kind(&docs, "DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let tmpl = &ds["spec"]["template"];
    let labels = &tmpl["metadata"]["labels"];
    for (k, v) in ds["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&labels[k], v, "the selector matches the pod's labels");
    }
    let pod = &tmpl["spec"];
    assert_eq!(pod["serviceAccountName"], sa);
    assert_eq!(pod["hostNetwork"], true, "hostNetwork");
    assert_eq!(pod["hostPID"], true, "hostPID");

    let containers = pod["containers"].as_sequence().unwrap();
    let agent = containers
        .iter()
        .find(|c| c["name"] == "connwatch")
        .expect("a connwatch container");
    let args: Vec<String> = strs(&agent["command"])
        .into_iter()
        .chain(strs(&agent["args"]))
        .collect();
    assert!(args.iter().any(|a| a == "run"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.contains("enforce")),
        "dry run by default: {args:?}"
    );

    // The smallest capability set: everything dropped, then exactly these.
    let sc = &agent["securityContext"];
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let mut caps = strs(&sc["capabilities"]["add"]);
    caps.sort();
    let mut want = vec![
        "BPF",
        "PERFMON",
        "NET_ADMIN",
        "SYS_ADMIN",
        "SYS_PTRACE",
        "DAC_READ_SEARCH",
        "SETPCAP",
    ];
    want.sort();
    assert_eq!(caps, want);
    // What the daemon keeps after loading is among them (kernel/privilege.rs).
    for (cap, _) in connwatch::kernel::privilege::KEEP {
        let name = connwatch::kernel::privilege::name(cap);
        assert!(
            caps.iter().any(|c| format!("CAP_{c}") == name),
            "{name} is missing"
        );
    }
    assert_ne!(sc["privileged"], true, "not privileged: capabilities only");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    for c in containers {
        assert_ne!(c["securityContext"]["privileged"], true, "{:?}", c["name"]);
    }

    // Host mounts.
    let volumes = pod["volumes"].as_sequence().unwrap();
    let volume = |name: &Value| volumes.iter().find(|v| &v["name"] == name).unwrap();
    let mounts = agent["volumeMounts"].as_sequence().unwrap();
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted on {path}"))
    };
    for (path, read_only) in [
        ("/sys/fs/bpf", false),
        ("/sys/kernel/tracing", true),
        ("/sys/kernel/btf", true),
    ] {
        let m = mount(path);
        assert_eq!(volume(&m["name"])["hostPath"]["path"], path, "{path}");
        if read_only {
            assert_eq!(m["readOnly"], true, "{path} read-only");
        } else {
            assert_ne!(m["readOnly"], true, "{path} writable (pins)");
        }
    }

    // The policy: the ConfigMap, mounted as a directory (subPath mounts never update),
    // the file --config names, and a dry run.
    let config = args
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("--config FILE");
    let (dir, file) = config.rsplit_once('/').unwrap();
    let m = mount(dir);
    assert!(
        m.get("subPath").is_none(),
        "a subPath mount is never updated"
    );
    let v = volume(&m["name"]);
    assert_eq!(v["configMap"]["name"], cm["metadata"]["name"]);
    let mode = v["configMap"]["defaultMode"].as_u64().unwrap_or(0o644);
    assert_eq!(
        mode & 0o022,
        0,
        "connwatch refuses a policy others may write"
    );
    let policy = cm["data"][file]
        .as_str()
        .expect("the policy in the ConfigMap");
    let spec = load_policy("configmap", policy);
    assert!(!spec.enforce, "the ConfigMap's policy is a dry run");

    // Reloaded on change: a container beside the daemon sees the same policy.
    let reloader = containers
        .iter()
        .find(|c| c["name"] != "connwatch")
        .expect("a reloader container");
    assert!(reloader["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| m["name"] == v["name"] && m["mountPath"] == dir));
    let script = strs(&reloader["command"]).join(" ");
    assert!(
        script.contains("HUP") && script.contains(config.as_str()),
        "{script}"
    );

    // Metrics on a port Prometheus scrapes.
    let addr = args
        .iter()
        .skip_while(|a| *a != "--metrics-addr")
        .nth(1)
        .expect("--metrics-addr");
    let port = addr.rsplit_once(':').unwrap().1;
    let notes = &tmpl["metadata"]["annotations"];
    assert_eq!(notes["prometheus.io/scrape"], "true");
    assert_eq!(notes["prometheus.io/port"].as_str(), Some(port));
    assert_eq!(notes["prometheus.io/path"], "/metrics");
    assert!(agent["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["containerPort"]
            .as_u64()
            .map(|n| n.to_string())
            .as_deref()
            == Some(port)));
}

#[test]
fn the_containerfile_holds_the_binary_alone() {
    let text = std::fs::read_to_string(dist().join("kubernetes/Containerfile")).unwrap();
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from, ["FROM scratch"]);
    assert!(
        !text.lines().any(|l| l.starts_with("RUN ")),
        "nothing runs, nothing is fetched"
    );
}

/// The metric names the daemon serves, from a real exposition of the library's
/// registry, with one of everything in it: a tracked connection, a destroy, a
/// protection, a reload (a family without series is not exposed at all). Each
/// sample's name, and for each family the names its samples take (a counter's
/// `_total`, a histogram's `_bucket`, `_sum`, `_count`).
fn served() -> BTreeSet<String> {
    use connwatch::engine::audit::{Action, Age, Record};
    use connwatch::engine::{Engine, Observed};
    use connwatch::kernel::Stats;
    use connwatch::observe::metrics::Metrics;
    use connwatch::policy::Policy;
    use connwatch_common::{event_kind, ConnEvent, ConnInfo};

    let mut engine = Engine::new(Policy::default_hung_states(), false);
    let mut info = ConnInfo::zeroed();
    info.family = 2; // AF_INET
    info.state = 1; // ESTABLISHED
    info.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    info.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    info.sport = 40000;
    info.dport = 8080;
    info.netns = 4026531840;
    info.cookie = 7;
    info.seen_ns = 1;
    info.state_since_ns = 1;
    engine.on_event(&ConnEvent {
        key: 1,
        kind: event_kind::OPENED,
        oldstate: 0,
        info,
    });
    let metrics = Metrics::new(Stats::default());
    let record = Record {
        time: std::time::SystemTime::now(),
        action: Action::Destroyed,
        id: connwatch::conn::SockId::new(4026531840, 7),
        tuple: connwatch::conn::Tuple::new(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        ),
        state: connwatch::conn::TcpState::ESTABLISHED,
        age: Age {
            secs: 3,
            exact: true,
        },
        idle_secs: None,
        reason: "max-age",
        rule: "max-age".into(),
        owner: None,
        direction: None,
        cgroup: None,
        dry_run: false,
        detail: None,
        traffic: None,
    };
    metrics.observe(&Observed {
        record: &record,
        late_ns: Some(2_000_000),
        protection: Some("port"),
    });
    metrics.reloaded(true);
    let text = metrics.scrape(&engine, Stats::default(), 2);
    assert!(
        text.contains("connwatch_connections{state="),
        "the tracked connection is missing from\n{text}"
    );

    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, ty) = (it.next().unwrap(), it.next().unwrap());
            match ty {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every `connwatch_...` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("connwatch_") {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query" | "definition", serde_json::Value::String(s))
                        if s.contains("connwatch_") =>
                    {
                        out.push(s.clone())
                    }
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_served() {
    let served = served();
    assert!(served.contains("connwatch_destroys_total"), "{served:?}");
    let text = std::fs::read_to_string(dist().join("grafana/connwatch.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 10, "{all:?}");
    let mut used = BTreeSet::new();
    for expr in &all {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no connwatch metric in {expr:?}");
        for name in names {
            assert!(
                served.contains(&name),
                "{name} (in {expr:?}) is not served; /metrics has {served:?}"
            );
            used.insert(name);
        }
    }
    // The panels the dashboard promises.
    for want in [
        "connwatch_connections",
        "connwatch_connection_age_seconds_bucket",
        "connwatch_destroys_total",
        "connwatch_protected_total",
        "connwatch_kernel_drops_total",
        "connwatch_deadline_to_destroy_seconds_bucket",
    ] {
        assert!(used.contains(want), "the dashboard does not show {want}");
    }
    // Panels and their ids are unique and every panel has a query.
    let panels = dash["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len());
    for p in panels {
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
}

#[test]
fn promql_names_are_found() {
    assert_eq!(
        metric_names(
            "sum by (le) (rate(connwatch_x_bucket{a=\"connwatch_no\"}[5m])) / connwatch_y"
        ),
        ["connwatch_x_bucket", "connwatch_no", "connwatch_y"]
    );
}
