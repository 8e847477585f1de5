//! The command line: what each subcommand accepts (errors name the flag and value),
//! and the subcommands themselves: `list`, `top`, `check`, `sweep`/`explain`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use ipnet::IpNet;

use crate::conn::{Direction, TcpState};
use crate::control::protocol::DEFAULT_SOCKET;
pub use crate::observe::log::LogFormat;
use crate::observe::view::{Filter, SortKey};
use crate::policy::{
    parse_cidr, parse_duration, parse_netns, parse_process_name, parse_state_timeout, PortRange,
};

mod check;
mod dispatch;
mod list;
mod sweep;
mod top;

pub use dispatch::main;

/// Watch every TCP socket through eBPF and destroy the ones a policy chooses.
///
/// connwatch learns each socket's birth and state from the kernel as they happen
/// (a tracepoint on sock:inet_sock_set_state), keeps each socket's next deadline,
/// and destroys victims through sock_diag (SOCK_DESTROY), like `ss -K` but without
/// polling the socket table. Dry run is the default: nothing is destroyed without
/// --enforce. Port 22 is never touched.
#[derive(Parser, Debug)]
#[command(name = "connwatch", version, propagate_version = true)]
pub struct Cli {
    /// Log records as plain text lines or as JSON objects (one per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Append log records to FILE instead of stderr (SIGHUP reopens it, for logrotate).
    #[arg(long, value_name = "FILE", global = true)]
    pub log_file: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: track every TCP socket and destroy those the policy chooses.
    ///
    /// Without a limit, the hung-state defaults apply: CLOSE_WAIT 60s, FIN_WAIT1 120s,
    /// FIN_WAIT2 120s, CLOSING 60s, LAST_ACK 60s. Without --enforce nothing is
    /// destroyed: each decision is logged as "would destroy". SIGHUP reloads --config.
    ///
    /// Examples:
    ///   connwatch run                                           # dry run of the defaults
    ///   connwatch run --idle 10m --port 8080 --enforce          # idle connections of a service
    ///   connwatch run --max-age 1h --local-port 5432 --enforce  # old database connections
    ///   connwatch run --block 203.0.113.0/24 --enforce          # an abusive network
    ///   connwatch run --config /etc/connwatch.toml --enforce
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Apply the policy once to the connections that exist now, print a summary, exit.
    ///
    /// For cron and systemd timers. Ages and times in state come from the pinned map of
    /// a running (or earlier) daemon; idle time from the kernel's tcp_info. Exit status
    /// 0, or 1 if any destroy failed.
    Sweep(SweepArgs),
    /// Show, for every current connection, which rule would apply and when.
    Explain(PolicyArgs),
    /// List live TCP connections with their ages, idle time, owner and next rule.
    ///
    /// While `connwatch run` runs, the list comes from it (through its control socket),
    /// with the rule that will apply next to each connection and when. Without it, from
    /// one sock_diag dump and the pinned kernel map (/sys/fs/bpf/connwatch): ages are
    /// known for connections born while a daemon was watching, others show a lower
    /// bound ('>5m') or '-'.
    ///
    /// Examples:
    ///   connwatch list --state close-wait --older-than 5m
    ///   connwatch list --port 5432 --sort idle --limit 20
    ///   connwatch list --remote-addr 10.0.0.0/8 --process nginx --json
    List(ListArgs),
    /// A live view of the connections: states, ages, the oldest and most idle, and
    /// destroys per minute. Refreshes every second; q quits.
    Top(TopArgs),
    /// Check that this kernel and this user have what connwatch needs.
    Check,
    /// Remove everything connwatch pinned in /sys/fs/bpf/connwatch (the ages with it),
    /// and the first sightings of older sockets kept in /run/connwatch.first-seen.
    ///
    /// Refused while `connwatch run` is active. Needed to resize the maps.
    Cleanup,
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The policy, as flags; the same flags may sit in the --config file.
#[derive(Args, Debug, Default, Clone)]
pub struct PolicyArgs {
    /// TOML file holding any of these settings and named rules; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Destroy connections older than this (e.g. 90s, 5m, 1h30m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "Limits")]
    pub max_age: Option<Duration>,

    /// Destroy ESTABLISHED connections with no data in either direction for this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "Limits")]
    pub idle: Option<Duration>,

    /// How long a connection may stay in a closing state (repeatable), e.g.
    /// close-wait=60s. States: close-wait, fin-wait1, fin-wait2, closing, last-ack,
    /// time-wait.
    #[arg(long, value_name = "STATE=DUR", value_parser = parse_state_timeout, help_heading = "Limits")]
    pub state_timeout: Vec<(TcpState, Duration)>,

    /// Destroy every connection from these addresses as soon as it is established
    /// (CIDR; repeatable). Not narrowed by the selectors.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr, help_heading = "Limits")]
    pub block: Vec<IpNet>,

    /// Also block, in the firewall, each address whose connection --block destroyed:
    /// its new connections are dropped (an nftables set in connwatch's own table, in
    /// the connection's network namespace; needs nft).
    #[arg(long, help_heading = "Limits")]
    pub block_firewall: bool,

    /// How long --block-firewall blocks an address (default 10m); each destroy starts
    /// it again.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, requires = "block_firewall", help_heading = "Limits")]
    pub block_for: Option<Duration>,

    /// Destroy the newest connections of a remote address beyond N (within the
    /// selectors: scope it with --local-port to count a service's clients).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub max_conns_per_ip: Option<u32>,

    /// Only connections with this local or remote port (P or LO-HI; repeatable).
    #[arg(long = "port", value_name = "P|LO-HI", value_parser = parse_port_range, help_heading = "Selectors")]
    pub ports: Vec<PortRange>,

    /// Only connections with this local port (repeatable).
    #[arg(long = "local-port", value_name = "P|LO-HI", value_parser = parse_port_range, help_heading = "Selectors")]
    pub local_ports: Vec<PortRange>,

    /// Only connections with this remote port (repeatable).
    #[arg(long = "remote-port", value_name = "P|LO-HI", value_parser = parse_port_range, help_heading = "Selectors")]
    pub remote_ports: Vec<PortRange>,

    /// Only connections with a local address in this block (CIDR; repeatable).
    #[arg(long = "local-addr", value_name = "CIDR", value_parser = parse_cidr, help_heading = "Selectors")]
    pub local_addrs: Vec<IpNet>,

    /// Only connections with a remote address in this block (CIDR; repeatable).
    #[arg(long = "remote-addr", value_name = "CIDR", value_parser = parse_cidr, help_heading = "Selectors")]
    pub remote_addrs: Vec<IpNet>,

    /// Only connections in this network namespace (repeatable): `host` (connwatch's
    /// own), an `ip netns` name, or the inode `stat -L /proc/PID/ns/net` shows. Every
    /// namespace is watched when none is given.
    #[arg(long = "netns", value_name = "host|NAME|INODE", value_parser = parse_netns, help_heading = "Selectors")]
    pub netns: Vec<u32>,

    /// Only connections opened this way: `in` (accepted from a peer: what clients hold
    /// open on this host's servers) or `out` (connected out: this host's own clients).
    #[arg(long, value_name = "in|out", value_parser = Direction::parse, help_heading = "Selectors")]
    pub direction: Option<Direction>,

    /// Only connections of processes in this cgroup (repeatable): a cgroup v2 path such
    /// as /system.slice/nginx.service (that cgroup and everything below it), or a glob
    /// with `*` matched against the whole path (e.g. '*docker-*').
    #[arg(long = "cgroup", value_name = "PATTERN", help_heading = "Selectors")]
    pub cgroups: Vec<String>,

    /// Never touch connections with this local or remote port (repeatable). Port 22
    /// is always protected, in addition to these.
    #[arg(long = "exclude-port", value_name = "P|LO-HI", value_parser = parse_port_range, help_heading = "Protections")]
    pub exclude_ports: Vec<PortRange>,

    /// Never touch connections with a local or remote address in this block.
    #[arg(long = "exclude-addr", value_name = "CIDR", value_parser = parse_cidr, help_heading = "Protections")]
    pub exclude_addrs: Vec<IpNet>,

    /// Never touch connections owned by a process of this name (repeatable). Always
    /// protected, in addition: sshd, systemd, init, containerd, dockerd, kubelet, k3s.
    /// The name is the kernel's (`comm`, as `ps -o comm` shows it): at most 15 bytes,
    /// and a longer one is refused since it could never match.
    #[arg(
        long = "exclude-process",
        value_name = "NAME",
        value_parser = parse_process_name,
        help_heading = "Protections"
    )]
    pub exclude_processes: Vec<String>,

    /// Never touch connections of processes in this cgroup (repeatable; a path and
    /// everything below it, or a glob with `*`), e.g. /system.slice/postgresql.service.
    #[arg(
        long = "exclude-cgroup",
        value_name = "PATTERN",
        help_heading = "Protections"
    )]
    pub exclude_cgroups: Vec<String>,

    /// Destroy at most N connections a second; the rest wait their turn (off by default).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Safety budget")]
    pub max_kills_per_second: Option<u32>,

    /// Destroy at most this share (0-1) of the tracked connections a second (off by
    /// default).
    #[arg(long, value_name = "F", value_parser = parse_fraction, help_heading = "Safety budget")]
    pub max_kill_fraction: Option<f64>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,

    /// Destroy the chosen connections. Without it connwatch only logs what it would do.
    #[arg(long)]
    pub enforce: bool,

    /// Capacity of the kernel's connection map (sockets tracked at once; default
    /// 262144). A map already pinned keeps its size until `connwatch cleanup`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
    pub max_conns: Option<u32>,

    /// Size of the kernel's event ring in bytes (a power of two, at least 4096; default
    /// 4 MiB).
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_bytes)]
    pub ring_bytes: Option<u32>,

    /// The control socket (JSON lines; mode 0600).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: std::path::PathBuf,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9752); off
    /// unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

fn parse_ring_bytes(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if n >= 4096 && n.is_power_of_two() => Ok(n),
        _ => Err(format!("'{text}' is not a power of two of at least 4096")),
    }
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,

    /// Destroy the chosen connections. Without it the summary says what would be done.
    #[arg(long)]
    pub enforce: bool,
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "'{text}' is not a fraction between 0 and 1 (e.g. 0.1)"
        )),
    }
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub filter: FilterArgs,

    /// Order: age (oldest first), idle (longest idle first), state, remote, bytes (most
    /// traffic first).
    #[arg(long, value_enum, default_value_t = SortKey::Age)]
    pub sort: SortKey,

    /// Show at most N connections.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    /// Show the addresses --block-firewall blocks instead, and until when (asks the
    /// daemon).
    #[arg(long)]
    pub blocked: bool,

    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: std::path::PathBuf,
}

/// Which connections `list` and `top` show.
#[derive(Args, Debug, Default, Clone)]
pub struct FilterArgs {
    /// Only connections in this state (repeatable), e.g. established, close-wait.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Vec<TcpState>,

    /// Only connections with this local or remote port (P or LO-HI; repeatable).
    #[arg(long = "port", value_name = "P|LO-HI", value_parser = parse_port_range)]
    pub ports: Vec<PortRange>,

    /// Only connections with a remote address in this block (CIDR; repeatable).
    #[arg(long = "remote-addr", value_name = "CIDR", value_parser = parse_cidr)]
    pub remote_addrs: Vec<IpNet>,

    /// Only connections owned by a process of this name (repeatable).
    #[arg(long = "process", value_name = "NAME")]
    pub processes: Vec<String>,

    /// Only connections opened this way: `in` (accepted from a peer) or `out`
    /// (connected out).
    #[arg(long, value_name = "in|out", value_parser = Direction::parse)]
    pub direction: Option<Direction>,

    /// Only connections in this network namespace (repeatable): `host`, an `ip netns`
    /// name, or an inode number. Every namespace is shown when none is given.
    #[arg(long = "netns", value_name = "host|NAME|INODE", value_parser = parse_netns)]
    pub netns: Vec<u32>,

    /// Only connections older than this (e.g. 5m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub older_than: Option<Duration>,

    /// Only connections with no data either way for longer than this.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub idle_longer_than: Option<Duration>,
}

impl FilterArgs {
    pub fn filter(&self, sort: SortKey, limit: Option<usize>) -> Filter {
        Filter {
            states: self.state.clone(),
            netns: self.netns.clone(),
            direction: self.direction,
            ports: self.ports.clone(),
            remote_addrs: self.remote_addrs.clone(),
            processes: self.processes.clone(),
            older_than: self.older_than,
            idle_longer_than: self.idle_longer_than,
            sort,
            limit,
        }
    }
}

impl ListArgs {
    pub fn filter(&self) -> Filter {
        self.filter.filter(self.sort, self.limit)
    }
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Show only these connections (the counts, the ages and the tables; destroys per
    /// minute stay host-wide).
    #[command(flatten)]
    pub filter: FilterArgs,

    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: std::path::PathBuf,
}

fn parse_state(text: &str) -> Result<TcpState, String> {
    TcpState::parse(text).ok_or_else(|| {
        format!("'{text}' is not a TCP state (e.g. established, close-wait, time-wait)")
    })
}

fn parse_port_range(text: &str) -> Result<PortRange, String> {
    text.parse()
}

/// Parses the command line; an error is one line naming the flag and value, exit 2.
pub fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see connwatch --help)");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(args: &[&str]) -> String {
        Cli::try_parse_from(args).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_name_the_flag_and_value() {
        let e = err(&["connwatch", "run", "--port", "9-3"]);
        assert!(e.contains("--port") && e.contains("9-3"), "{e}");
        let e = err(&["connwatch", "run", "--max-age", "soon"]);
        assert!(e.contains("--max-age") && e.contains("soon"), "{e}");
        let e = err(&["connwatch", "run", "--bogus"]);
        assert!(e.contains("--bogus"), "{e}");
        let e = err(&["connwatch", "run", "--state-timeout", "listen=5s"]);
        assert!(e.contains("--state-timeout") && e.contains("LISTEN"), "{e}");
        let e = err(&["connwatch", "run", "--block", "10.0.0.0/40"]);
        assert!(e.contains("--block") && e.contains("10.0.0.0/40"), "{e}");
        let e = err(&["connwatch", "sweep", "--max-kill-fraction", "2"]);
        assert!(
            e.contains("--max-kill-fraction") && e.contains("'2'"),
            "{e}"
        );
    }

    #[test]
    fn run_flags_parse() {
        let cli = Cli::try_parse_from([
            "connwatch",
            "run",
            "--max-age",
            "90s",
            "--port",
            "8000-8100",
            "--port",
            "443",
            "--exclude-port",
            "5432",
            "--enforce",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.policy.max_age, Some(Duration::from_secs(90)));
        assert_eq!(run.policy.ports.len(), 2);
        assert!(run.enforce);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
