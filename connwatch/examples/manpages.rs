//! Writes connwatch's man pages, generated from its clap definitions, into a directory:
//! `connwatch.8` and one `connwatch-SUBCOMMAND.8` per subcommand. `cargo xtask deb`
//! runs it (`cargo run -p connwatch --example manpages -- DIR`); an example rather than
//! part of the xtask, so the xtask does not compile the daemon on every `cargo xtask`.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: manpages DIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&dir)?;
    let mut cmd = connwatch::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let subs: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name().to_string())
        .collect();
    write(&dir, cmd.clone(), &subs)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write(&dir, sub.clone(), &[])?;
    }
    Ok(())
}

/// One page; the top page's SEE ALSO names every subcommand's.
fn write(dir: &Path, cmd: clap::Command, subs: &[String]) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("System Administration");
    let path = dir.join(man.get_filename());
    let mut out = Vec::new();
    man.render(&mut out)?;
    if !subs.is_empty() {
        let refs: Vec<String> = subs
            .iter()
            .map(|s| format!(".BR connwatch\\-{} (8)", s.replace('-', "\\-")))
            .collect();
        out.extend_from_slice(format!(".SH \"SEE ALSO\"\n{}\n", refs.join(",\n")).as_bytes());
    }
    std::fs::write(&path, out)?;
    println!("{}", path.display());
    Ok(())
}
