//! The config file: TOML holding everything the flags do, plus named rules. Every
//! rejection names the file, the line and the field.
//!
//! ```toml
//! idle = "10m"
//! port = [8080, "9000-9100"]
//! exclude-process = ["haproxy"]
//! block = ["203.0.113.0/24"]
//! max-kills-per-second = 200
//!
//! [state-timeout]
//! close-wait = "60s"
//!
//! [[rule]]
//! name = "old-db"
//! local-port = [5432]
//! max-age = "2h"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::conn::Direction;
use crate::policy::PolicySpec;
use crate::policy::{
    parse_cidr, parse_duration, parse_netns, parse_process_name, parse_timeout_state, Limit,
    PortRange, Rule, Selector,
};

/// A rejected config file: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(untagged)]
enum PortValue {
    Num(i64),
    Text(String),
}

type Ports = Option<Vec<Spanned<PortValue>>>;
type Texts = Option<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSettings {
    max_age: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
    state_timeout: Option<BTreeMap<String, Spanned<String>>>,
    port: Ports,
    local_port: Ports,
    remote_port: Ports,
    local_addr: Texts,
    remote_addr: Texts,
    netns: Texts,
    direction: Option<Spanned<String>>,
    cgroup: Option<Vec<String>>,
    exclude_port: Ports,
    exclude_addr: Texts,
    exclude_process: Texts,
    exclude_cgroup: Option<Vec<String>>,
    block: Texts,
    block_firewall: Option<bool>,
    block_for: Option<Spanned<String>>,
    max_conns_per_ip: Option<Spanned<u32>>,
    max_kills_per_second: Option<Spanned<u32>>,
    max_kill_fraction: Option<Spanned<f64>>,
    enforce: Option<bool>,
    #[serde(default)]
    rule: Vec<FileRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileRule {
    name: Spanned<String>,
    port: Ports,
    local_port: Ports,
    remote_port: Ports,
    local_addr: Texts,
    remote_addr: Texts,
    netns: Texts,
    direction: Option<Spanned<String>>,
    cgroup: Option<Vec<String>>,
    max_age: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
    /// With `timeout`: a state timeout.
    state: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    block: Option<bool>,
    max_conns_per_ip: Option<Spanned<u32>>,
}

/// Turns spans into line numbers and values into typed settings, or an error naming
/// the field.
struct Reader<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Reader<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error(&self, offset: Option<usize>, message: String) -> ConfigError {
        ConfigError {
            path: self.path.to_path_buf(),
            line: offset.map(|o| self.line(o)),
            message,
        }
    }

    fn value<T, U>(
        &self,
        field: &str,
        v: &Spanned<T>,
        parse: impl Fn(&T) -> Result<U, String>,
    ) -> Result<U, ConfigError> {
        parse(v.get_ref()).map_err(|e| self.error(Some(v.span().start), format!("{field}: {e}")))
    }

    fn duration(
        &self,
        field: &str,
        v: &Option<Spanned<String>>,
    ) -> Result<Option<std::time::Duration>, ConfigError> {
        v.as_ref()
            .map(|v| self.value(field, v, |s| parse_duration(s)))
            .transpose()
    }

    fn ports(&self, field: &str, v: &Ports) -> Result<Vec<PortRange>, ConfigError> {
        let parse = |p: &PortValue| match p {
            PortValue::Num(n) => u16::try_from(*n)
                .map(|p| PortRange { lo: p, hi: p })
                .map_err(|_| format!("{n} is not a port number (0-65535)")),
            PortValue::Text(t) => t.parse::<PortRange>(),
        };
        v.iter()
            .flatten()
            .map(|p| self.value(field, p, parse))
            .collect()
    }

    fn cidrs(&self, field: &str, v: &Texts) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        v.iter()
            .flatten()
            .map(|c| self.value(field, c, |s| parse_cidr(s)))
            .collect()
    }

    fn direction(
        &self,
        field: &str,
        v: &Option<Spanned<String>>,
    ) -> Result<Option<Direction>, ConfigError> {
        v.as_ref()
            .map(|d| self.value(field, d, |s| Direction::parse(s)))
            .transpose()
    }

    fn namespaces(&self, field: &str, v: &Texts) -> Result<Vec<u32>, ConfigError> {
        v.iter()
            .flatten()
            .map(|n| self.value(field, n, |s| parse_netns(s)))
            .collect()
    }

    fn selector(&self, r: &FileRule, prefix: &str) -> Result<Selector, ConfigError> {
        Ok(Selector {
            ports: self.ports(&format!("{prefix}port"), &r.port)?,
            local_ports: self.ports(&format!("{prefix}local-port"), &r.local_port)?,
            remote_ports: self.ports(&format!("{prefix}remote-port"), &r.remote_port)?,
            local_addrs: self.cidrs(&format!("{prefix}local-addr"), &r.local_addr)?,
            remote_addrs: self.cidrs(&format!("{prefix}remote-addr"), &r.remote_addr)?,
            netns: self.namespaces(&format!("{prefix}netns"), &r.netns)?,
            direction: self.direction(&format!("{prefix}direction"), &r.direction)?,
            cgroups: r.cgroup.clone().unwrap_or_default(),
        })
    }

    fn rule(&self, r: &FileRule) -> Result<Rule, ConfigError> {
        let name = r.name.get_ref().trim().to_string();
        let at = Some(r.name.span().start);
        if name.is_empty() {
            return Err(self.error(at, "rule name: must not be empty".into()));
        }
        let prefix = format!("rule '{name}' ");
        let field = |f: &str| format!("{prefix}{f}");
        let mut limits = Vec::new();
        if let Some(d) = self.duration(&field("max-age"), &r.max_age)? {
            limits.push(Limit::MaxAge(d));
        }
        if let Some(d) = self.duration(&field("idle"), &r.idle)? {
            limits.push(Limit::Idle(d));
        }
        match (&r.state, &r.timeout) {
            (Some(s), Some(t)) => {
                let state = self.value(&field("state"), s, |s| parse_timeout_state(s))?;
                let d = self.value(&field("timeout"), t, |t| parse_duration(t))?;
                limits.push(Limit::StateTimeout(state, d));
            }
            (Some(s), None) => {
                return Err(self.error(Some(s.span().start), field("state: needs a timeout")))
            }
            (None, Some(t)) => {
                return Err(self.error(Some(t.span().start), field("timeout: needs a state")))
            }
            (None, None) => {}
        }
        if r.block == Some(true) {
            limits.push(Limit::Block);
        }
        if let Some(n) = &r.max_conns_per_ip {
            let n = self.value(&field("max-conns-per-ip"), n, |n| {
                if *n == 0 {
                    Err("must be at least 1".to_string())
                } else {
                    Ok(*n)
                }
            })?;
            limits.push(Limit::MaxConnsPerIp(n));
        }
        let selector = self.selector(r, &prefix)?;
        let limit = match limits.as_slice() {
            [one] => *one,
            [] => return Err(self.error(at, format!(
                "{prefix}has no limit: give one of max-age, idle, state + timeout, block = true, max-conns-per-ip"
            ))),
            _ => return Err(self.error(at, format!("{prefix}has {} limits: give each its own rule", limits.len()))),
        };
        if limit == Limit::Block && selector.remote_addrs.is_empty() {
            return Err(self.error(
                at,
                format!("{prefix}blocks without remote-addr: that would block everyone"),
            ));
        }
        Ok(Rule {
            name,
            selector,
            limit,
        })
    }

    fn settings(&self, f: &FileSettings) -> Result<PolicySpec, ConfigError> {
        let mut state_timeouts = Vec::new();
        for (state, dur) in f.state_timeout.iter().flatten() {
            let field = format!("state-timeout.{state}");
            let s = parse_timeout_state(state)
                .map_err(|e| self.error(Some(dur.span().start), format!("{field}: {e}")))?;
            state_timeouts.push((s, self.value(&field, dur, |d| parse_duration(d))?));
        }
        let selector = Selector {
            ports: self.ports("port", &f.port)?,
            local_ports: self.ports("local-port", &f.local_port)?,
            remote_ports: self.ports("remote-port", &f.remote_port)?,
            local_addrs: self.cidrs("local-addr", &f.local_addr)?,
            remote_addrs: self.cidrs("remote-addr", &f.remote_addr)?,
            netns: self.namespaces("netns", &f.netns)?,
            direction: self.direction("direction", &f.direction)?,
            cgroups: f.cgroup.clone().unwrap_or_default(),
        };
        let mut rules = Vec::new();
        for r in &f.rule {
            let rule = self.rule(r)?;
            if rules.iter().any(|x: &Rule| x.name == rule.name) {
                return Err(self.error(
                    Some(r.name.span().start),
                    format!("rule name: '{}' is used twice", rule.name),
                ));
            }
            rules.push(rule);
        }
        let positive =
            |field: &str, v: &Option<Spanned<u32>>| -> Result<Option<u32>, ConfigError> {
                v.as_ref()
                    .map(|v| {
                        self.value(field, v, |n| {
                            if *n == 0 {
                                Err("must be at least 1".to_string())
                            } else {
                                Ok(*n)
                            }
                        })
                    })
                    .transpose()
            };
        Ok(PolicySpec {
            max_age: self.duration("max-age", &f.max_age)?,
            idle: self.duration("idle", &f.idle)?,
            state_timeouts,
            selector,
            exclude_ports: self.ports("exclude-port", &f.exclude_port)?,
            exclude_addrs: self.cidrs("exclude-addr", &f.exclude_addr)?,
            exclude_processes: f
                .exclude_process
                .iter()
                .flatten()
                .map(|n| self.value("exclude-process", n, |s| parse_process_name(s)))
                .collect::<Result<_, _>>()?,
            exclude_cgroups: f.exclude_cgroup.clone().unwrap_or_default(),
            block: self.cidrs("block", &f.block)?,
            block_firewall: f.block_firewall.unwrap_or(false),
            block_for: self.duration("block-for", &f.block_for)?,
            max_conns_per_ip: positive("max-conns-per-ip", &f.max_conns_per_ip)?,
            max_kills_per_second: positive("max-kills-per-second", &f.max_kills_per_second)?,
            max_kill_fraction: f
                .max_kill_fraction
                .as_ref()
                .map(|v| {
                    self.value("max-kill-fraction", v, |x| {
                        if *x > 0.0 && *x <= 1.0 {
                            Ok(*x)
                        } else {
                            Err(format!("{x} is not a fraction between 0 and 1"))
                        }
                    })
                })
                .transpose()?,
            enforce: f.enforce.unwrap_or(false),
            rules,
        })
    }
}

/// Parses config text; `path` is only for messages.
pub fn parse(path: &Path, text: &str) -> Result<PolicySpec, ConfigError> {
    let reader = Reader { path, text };
    let settings: FileSettings = toml::from_str(text).map_err(|e| {
        let mut message = e.message().trim().replace('\n', " ");
        if message.is_empty() {
            // The TOML parser says nothing for some bytes (a lone carriage return).
            message = "not valid TOML here (a stray control character?)".into();
        }
        reader.error(e.span().map(|s| s.start), message)
    })?;
    reader.settings(&settings)
}

/// Reads and parses a config file, refusing one that others may write: connwatch
/// runs as root and destroys what the file says.
pub fn load(path: &Path) -> Result<PolicySpec, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |message: String| ConfigError {
        path: path.to_path_buf(),
        line: None,
        message,
    };
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    // Whoever can write the policy can have connwatch destroy any connection.
    let mode = meta.permissions().mode() & 0o7777;
    let shown = path.display();
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 {
            "every user"
        } else {
            "its group"
        };
        return Err(fail(format!(
            "mode {mode:04o} makes it writable by {who}: refusing it (run `chmod go-w {shown}`)"
        )));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(fail(format!(
            "is owned by uid {}, not root: refusing it (run `chown root {shown}`)",
            meta.uid()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::TcpState;
    use std::time::Duration;

    fn parse_ok(text: &str) -> PolicySpec {
        parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> String {
        parse(Path::new("test.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn everything_the_flags_do() {
        let spec = parse_ok(
            r#"
idle = "10m"
max-age = "2h"
port = [8080, "9000-9100"]
remote-addr = ["10.0.0.0/8"]
exclude-port = [5432]
exclude-addr = ["192.0.2.1"]
exclude-process = ["haproxy"]
block = ["203.0.113.0/24"]
max-conns-per-ip = 50
max-kills-per-second = 200
max-kill-fraction = 0.25
enforce = true

[state-timeout]
close-wait = "60s"
time-wait = "10s"

[[rule]]
name = "old-db"
local-port = [5432]
max-age = "2h"

[[rule]]
name = "stuck-proxy"
remote-port = ["3128"]
state = "fin-wait2"
timeout = "30s"
"#,
        );
        assert_eq!(spec.idle, Some(Duration::from_secs(600)));
        assert_eq!(spec.selector.ports.len(), 2);
        assert_eq!(spec.state_timeouts.len(), 2);
        assert!(spec
            .state_timeouts
            .contains(&(TcpState::TIME_WAIT, Duration::from_secs(10))));
        assert_eq!(spec.max_kill_fraction, Some(0.25));
        assert!(spec.enforce);
        assert_eq!(spec.rules.len(), 2);
        assert_eq!(
            spec.rules[1].limit,
            Limit::StateTimeout(TcpState::FIN_WAIT2, Duration::from_secs(30))
        );
        assert_eq!(spec.rules[0].selector.local_ports[0].lo, 5432);
    }

    #[test]
    fn a_stray_carriage_return_gets_a_message() {
        // Found by `cargo xtask fuzz`: the TOML parser's own message is empty here.
        for text in ["\r", "\r.", "port = [80]\n\r"] {
            let e = parse_err(text);
            assert!(e.contains("not valid TOML"), "{text:?}: {e}");
        }
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let e = parse_err("port = [80]\nidle = \"soon\"\n");
        assert!(
            e.starts_with("test.toml:2: idle:") && e.contains("soon"),
            "{e}"
        );
        let e = parse_err("port = [80, \"9-3\"]\n");
        assert!(
            e.starts_with("test.toml:1: port:") && e.contains("9-3"),
            "{e}"
        );
        let e = parse_err("frobnicate = 1\n");
        assert!(
            e.starts_with("test.toml:1:") && e.contains("frobnicate"),
            "{e}"
        );
        let e = parse_err("\n\n[[rule]]\nname = \"x\"\nidle = \"1m\"\nmax-age = \"1h\"\n");
        assert!(
            e.starts_with("test.toml:4:") && e.contains("2 limits"),
            "{e}"
        );
        let e = parse_err("[[rule]]\nname = \"x\"\nlocal-port = [80]\n");
        assert!(e.contains("rule 'x' has no limit"), "{e}");
        let e = parse_err("[state-timeout]\nlisten = \"1m\"\n");
        assert!(e.starts_with("test.toml:2: state-timeout.listen"), "{e}");
        let e = parse_err("[[rule]]\nname = \"b\"\nblock = true\n");
        assert!(e.contains("block everyone"), "{e}");
        let e = parse_err("idle = \"1m\"\nidle = \"2m\"\n");
        assert!(e.starts_with("test.toml:2:"), "{e}");
        let e = parse_err("max-kill-fraction = 3.0\n");
        assert!(e.contains("max-kill-fraction") && e.contains('3'), "{e}");
        let e = parse_err(
            "[[rule]]\nname = \"a\"\nidle = \"1m\"\n[[rule]]\nname = \"a\"\nidle = \"2m\"\n",
        );
        assert!(e.starts_with("test.toml:5:") && e.contains("twice"), "{e}");
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(parse_ok(""), PolicySpec::default());
    }

    #[test]
    fn a_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("connwatch-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "idle = \"1m\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(&path).unwrap().idle, Some(Duration::from_secs(60)));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("0666") && e.contains("writable by every user") && e.contains("chmod go-w"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("0664") && e.contains("writable by its group"),
            "{e}"
        );
        // Owned by another user: refused, naming the owner (root only can chown).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains("uid 65534") && e.contains("chown root"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
