//! What each subcommand does, between the parsed command line and the modules.

use anyhow::{bail, Result};

use super::{check, list, sweep, top, Cli, Command, PolicyArgs};
use crate::daemon;
use crate::kernel::{self, pins};
use crate::observe::log;
use crate::policy::{PolicySource, PolicySpec, Selector};

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
                netns: self.netns.clone(),
                direction: self.direction,
                cgroups: self.cgroups.clone(),
            },
            exclude_ports: self.exclude_ports.clone(),
            exclude_addrs: self.exclude_addrs.clone(),
            exclude_processes: self.exclude_processes.clone(),
            exclude_cgroups: self.exclude_cgroups.clone(),
            block: self.block.clone(),
            block_firewall: self.block_firewall,
            block_for: self.block_for,
            max_conns_per_ip: self.max_conns_per_ip,
            max_kills_per_second: self.max_kills_per_second,
            max_kill_fraction: self.max_kill_fraction,
            enforce,
            rules: Vec::new(),
        }
    }

    /// Where the policy comes from: the config file and these flags over it,
    /// `--enforce` as given.
    pub fn source(&self, enforce: bool) -> PolicySource {
        PolicySource {
            config: self.config.clone(),
            flags: self.flags_spec(enforce),
        }
    }

    /// The config file (if any) with the flags over it, `--enforce` as given.
    pub fn spec(&self, enforce: bool) -> Result<PolicySpec> {
        self.source(enforce).read()
    }
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
    if let Some(note) = log::init(cli.log_format, cli.log_file.as_deref())? {
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
                sizes: kernel::Sizes {
                    max_conns: args.max_conns,
                    ring_bytes: args.ring_bytes,
                },
                source: args.policy.source(args.enforce),
                api_socket: args.api_socket,
                metrics_addr: args.metrics_addr,
            }))?;
            Ok(0)
        }
        Command::Sweep(args) => {
            let spec = args.policy.spec(args.enforce)?;
            require_root("connwatch sweep")?;
            let summary = sweep::sweep(spec.build(), spec.enforce)?;
            println!("{summary}");
            Ok(if summary.failed > 0 { 1 } else { 0 })
        }
        Command::Explain(args) => {
            let spec = args.spec(false)?;
            require_root("connwatch explain")?;
            sweep::explain(spec.build())?;
            Ok(0)
        }
        Command::List(args) => {
            require_root("connwatch list")?;
            if args.blocked {
                list::blocked(args.json, &args.api_socket)?;
                return Ok(0);
            }
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
            let removed = pins::cleanup()?;
            if removed.is_empty() {
                println!("nothing pinned in {}", pins::PIN_ROOT);
            }
            for path in removed {
                println!("removed {path}");
            }
            // --block-firewall's tables, in whichever namespace holds one.
            let host = kernel::netns::own()?;
            let ways: Vec<_> = kernel::netns::all()
                .into_iter()
                .map(|n| (n.inode, (n.inode != host).then_some(n.path)))
                .collect();
            let (gone, failed) = kernel::firewall::remove_everywhere(&ways);
            for netns in gone {
                println!(
                    "removed the firewall table inet {} of network namespace {netns}",
                    kernel::firewall::TABLE
                );
            }
            for (netns, why) in &failed {
                eprintln!("connwatch: cannot remove the firewall table of network namespace {netns}: {why}");
            }
            Ok(0)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "connwatch", &mut std::io::stdout());
            Ok(0)
        }
    }
}
