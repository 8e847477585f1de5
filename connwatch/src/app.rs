//! What each subcommand does, between the parsed command line and the modules.

use anyhow::{bail, Result};

use crate::cli::{Cli, Command, LogFormat, RunArgs};
use crate::policy::{Policy, DEFAULT_EXCLUDED_PORT};
use crate::{audit, check, daemon, list};

/// The embedded default when no limit is given: a dry run that logs what it would do.
pub const DEFAULT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONNWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    audit::set_json(format == LogFormat::Json);
}

/// Turns the run flags into a policy, refusing combinations that would surprise.
pub fn policy_from(args: &RunArgs) -> Result<Policy> {
    let mut exclude_ports = vec![DEFAULT_EXCLUDED_PORT];
    exclude_ports.extend(args.exclude_ports.iter().copied());
    let mut policy = Policy {
        max_age: args.max_age,
        ports: args.ports.clone(),
        exclude_ports,
    };
    if !policy.has_limit() {
        if args.enforce {
            bail!("--enforce needs an explicit limit (e.g. --max-age 10m): connwatch does not destroy on its default policy");
        }
        policy.max_age = Some(DEFAULT_MAX_AGE);
        tracing::info!("no limit given: using the default policy, --max-age 5m, as a dry run");
    }
    Ok(policy)
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (it loads eBPF programs and uses sock_diag); run it with sudo");
    }
    Ok(())
}

/// Runs the command; the returned code is the process's exit status.
pub fn main(cli: Cli) -> Result<i32> {
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let policy = policy_from(&args)?;
            require_root("connwatch run")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(daemon::Options {
                policy,
                enforce: args.enforce,
                max_conns: args.max_conns,
            }))?;
            Ok(0)
        }
        Command::List(args) => {
            require_root("connwatch list")?;
            list::run(args.json)?;
            Ok(0)
        }
        Command::Check => Ok(if check::run() { 0 } else { 1 }),
    }
}
