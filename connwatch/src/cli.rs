//! The command line: what each subcommand accepts, with errors that name the value.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::policy::{parse_duration, PortRange};

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

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: track every TCP socket and destroy those the policy chooses.
    ///
    /// Without a limit, runs the safe default: a dry run with --max-age 5m, which logs
    /// the connections it would destroy and destroys nothing.
    ///
    /// Examples:
    ///   connwatch run --max-age 10m --port 8080                 # dry run: log only
    ///   connwatch run --max-age 1h --port 5432 --enforce        # destroy
    Run(RunArgs),
    /// List live TCP connections with their ages, oldest first.
    ///
    /// Ages come from the pinned kernel map (/sys/fs/bpf/connwatch), so they are known
    /// for connections born while `connwatch run` was watching; older ones show '-'.
    List(ListArgs),
    /// Check that this kernel and this user have what connwatch needs.
    Check,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Destroy connections older than this (e.g. 90s, 5m, 1h30m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub max_age: Option<Duration>,

    /// Only act on connections with this local or remote port (P or LO-HI; repeatable).
    #[arg(long = "port", value_name = "P|LO-HI", value_parser = parse_port_range)]
    pub ports: Vec<PortRange>,

    /// Never touch connections with this local or remote port (P or LO-HI; repeatable).
    /// Port 22 is always excluded, in addition to these.
    #[arg(long = "exclude-port", value_name = "P|LO-HI", value_parser = parse_port_range)]
    pub exclude_ports: Vec<PortRange>,

    /// Destroy the chosen connections. Without it connwatch only logs what it would do.
    #[arg(long)]
    pub enforce: bool,

    /// Capacity of the kernel's connection map (sockets tracked at once).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_conns: Option<u32>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,
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
        assert_eq!(run.max_age, Some(Duration::from_secs(90)));
        assert_eq!(run.ports.len(), 2);
        assert!(run.enforce);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
