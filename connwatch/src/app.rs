//! What each subcommand does, between the parsed command line and the modules.

use std::path::Path;

use anyhow::{bail, Result};

use crate::cli::{Cli, Command, LogFormat, PolicyArgs};
use crate::policy::{Policy, Selector};
use crate::spec::PolicySpec;
use crate::{audit, check, config, daemon, list, oneshot, top};

/// Sets up logging: to stderr or `--log-file`, as text or JSON. Under systemd (stderr
/// is the journal's stream) lines carry their syslog priority and no timestamp, which
/// the journal adds. Returns a note to log once logging runs.
pub fn init_logging(format: LogFormat, log_file: Option<&Path>) -> Result<Option<String>> {
    use tracing_subscriber::fmt::format::JsonFields;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, Layer, Registry};

    let filter = tracing_subscriber::EnvFilter::try_from_env("CONNWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let mut note = None;
    if let Some(path) = log_file {
        audit::log_to_file(path)?;
    }
    let journal = log_file.is_none() && audit::stderr_is_journal();
    if journal {
        note = Some("logging to the systemd journal (stderr is its JOURNAL_STREAM)".to_string());
    }
    // Colour only for a person at a terminal, never into files or the journal.
    let ansi = log_file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = audit::LogWriter;
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match (format, journal) {
        (LogFormat::Text, false) => fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .with_target(false)
            .boxed(),
        (LogFormat::Text, true) => fmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .event_format(audit::SyslogPriority(
                tracing_subscriber::fmt::format::format()
                    .with_target(false)
                    .with_ansi(false)
                    .without_time(),
            ))
            .boxed(),
        (LogFormat::Json, false) => fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_target(false)
            .boxed(),
        (LogFormat::Json, true) => fmt::layer()
            .with_writer(writer)
            .fmt_fields(JsonFields::new())
            .event_format(audit::SyslogPriority(
                tracing_subscriber::fmt::format::format()
                    .json()
                    .flatten_event(true)
                    .with_target(false),
            ))
            .boxed(),
    };
    let _ = Registry::default()
        .with(layer.with_filter(filter))
        .try_init();
    audit::set_json(format == LogFormat::Json);
    Ok(note)
}

impl PolicyArgs {
    /// The flags as a spec, to lay over the config file's.
    pub fn flags_spec(&self, enforce: bool) -> PolicySpec {
        PolicySpec {
            max_age: self.max_age,
            idle: self.idle,
            state_timeouts: self.state_timeout.clone(),
            selector: Selector {
                ports: self.ports.clone(),
                local_ports: self.local_ports.clone(),
                remote_ports: self.remote_ports.clone(),
                local_addrs: self.local_addrs.clone(),
                remote_addrs: self.remote_addrs.clone(),
            },
            exclude_ports: self.exclude_ports.clone(),
            exclude_addrs: self.exclude_addrs.clone(),
            exclude_processes: self.exclude_processes.clone(),
            block: self.block.clone(),
            max_conns_per_ip: self.max_conns_per_ip,
            max_kills_per_second: self.max_kills_per_second,
            max_kill_fraction: self.max_kill_fraction,
            enforce,
            rules: Vec::new(),
        }
    }

    /// The config file (if any) with the flags over it. Called again on SIGHUP.
    pub fn spec(&self, enforce: bool) -> Result<PolicySpec> {
        let file = match &self.config {
            Some(path) => config::load(path)?,
            None => PolicySpec::default(),
        };
        Ok(file.overlay(self.flags_spec(enforce)))
    }
}

/// Describes a policy in one line, for the start-up and reload logs.
pub fn describe(policy: &Policy) -> String {
    let rules: Vec<String> = policy
        .rules
        .iter()
        .map(|r| {
            if r.name == r.limit.kind() {
                r.limit.to_string()
            } else {
                format!("{} ({})", r.name, r.limit)
            }
        })
        .collect();
    let ports: Vec<String> = policy.protect.ports.iter().map(|p| p.to_string()).collect();
    format!(
        "rules: {}; protected ports: {}; protected processes: {}",
        rules.join(", "),
        ports.join(","),
        policy.protect.processes.join(",")
    )
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
    if let Some(note) = init_logging(cli.log_format, cli.log_file.as_deref())? {
        tracing::info!("{note}");
    }
    match cli.command {
        Command::Run(args) => {
            let spec = args.policy.spec(args.enforce)?;
            require_root("connwatch run")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(daemon::Options {
                policy: spec.build(),
                enforce: spec.enforce,
                sizes: crate::loader::Sizes {
                    max_conns: args.max_conns,
                    ring_bytes: args.ring_bytes,
                },
                source: args.policy,
                api_socket: args.api_socket,
                metrics_addr: args.metrics_addr,
            }))?;
            Ok(0)
        }
        Command::Sweep(args) => {
            let spec = args.policy.spec(args.enforce)?;
            require_root("connwatch sweep")?;
            let summary = oneshot::sweep(spec.build(), spec.enforce)?;
            println!("{summary}");
            Ok(if summary.failed > 0 { 1 } else { 0 })
        }
        Command::Explain(args) => {
            let spec = args.spec(false)?;
            require_root("connwatch explain")?;
            oneshot::explain(spec.build())?;
            Ok(0)
        }
        Command::List(args) => {
            require_root("connwatch list")?;
            list::run(&args.filter(), args.json, &args.api_socket)?;
            Ok(0)
        }
        Command::Top(args) => {
            require_root("connwatch top")?;
            top::run(
                &args.filter.filter(Default::default(), None),
                &args.api_socket,
            )?;
            Ok(0)
        }
        Command::Check => Ok(if check::run() { 0 } else { 1 }),
        Command::Cleanup => {
            require_root("connwatch cleanup")?;
            // Holding the daemon's lock proves no daemon is using the maps.
            let _lock = daemon::lock_instance()?;
            let removed = crate::loader::cleanup()?;
            if removed.is_empty() {
                println!("nothing pinned in {}", crate::loader::PIN_DIR);
            }
            for path in removed {
                println!("removed {path}");
            }
            Ok(0)
        }
    }
}
