//! The tracepoints the eBPF object attaches to, and the check that the running
//! kernel lays out their records where the programs read them: a kernel that moved a
//! field is refused, not misread.

use std::fs;

use anyhow::{bail, Context, Result};

use crate::kernel::fs::TRACEFS;

/// A tracepoint the eBPF object attaches to, and the record fields its program reads.
pub struct Hook {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    /// The record fields its program reads; empty for a BTF-typed tracepoint (`tp_btf`),
    /// whose program reads the kernel's structures at offsets from BTF.
    pub fields: &'static [(&'static str, usize)],
}

/// The one hook: every socket's state changes. Nothing is hooked per packet or per
/// send; activity comes from the kernel's own `tcp_info` timers, read by sock_diag.
pub const HOOKS: [Hook; 1] = [Hook {
    program: "inet_sock_set_state",
    category: "sock",
    name: "inet_sock_set_state",
    // Typed: it reads `struct sock` at offsets from this kernel's BTF.
    fields: &[],
}];

/// Offsets of the tracepoint's fields as the running kernel's format file gives them.
pub fn tracepoint_fields(format: &str) -> Vec<(String, usize)> {
    format
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?.split(';').next()?;
            let name = decl.split_whitespace().last()?;
            let name = name.split('[').next()?.to_string();
            let offset = line
                .split(';')
                .find_map(|p| p.trim().strip_prefix("offset:"))?
                .parse()
                .ok()?;
            Some((name, offset))
        })
        .collect()
}

/// Refuses a tracepoint whose record differs from what its program reads.
pub fn check_layout(hook: &Hook, format: &str) -> Result<()> {
    let fields = tracepoint_fields(format);
    let tp = format!("{}:{}", hook.category, hook.name);
    for (name, want) in hook.fields {
        match fields.iter().find(|(n, _)| n == name) {
            Some((_, got)) if got == want => {}
            Some((_, got)) => bail!(
                "tracepoint {tp} field {name} is at offset {got}, connwatch reads it at {want}: this kernel's layout is not supported"
            ),
            None => bail!("tracepoint {tp} has no field {name}: this kernel's layout is not supported"),
        }
    }
    Ok(())
}

pub fn read_format(hook: &Hook) -> Result<String> {
    let path = format!("{TRACEFS}/events/{}/{}/format", hook.category, hook.name);
    fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))
}

/// Checks one hook against the running kernel.
pub fn check_hook(hook: &Hook) -> Result<()> {
    check_layout(hook, &read_format(hook)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use connwatch_common::set_state_offsets as off;

    /// The classic record of `sock:inet_sock_set_state`, as tools that read it expect.
    const CLASSIC: Hook = Hook {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        fields: &[
            ("skaddr", off::SKADDR),
            ("oldstate", off::OLDSTATE),
            ("newstate", off::NEWSTATE),
            ("sport", off::SPORT),
            ("dport", off::DPORT),
            ("family", off::FAMILY),
            ("protocol", off::PROTOCOL),
            ("saddr", off::SADDR),
            ("daddr", off::DADDR),
            ("saddr_v6", off::SADDR_V6),
            ("daddr_v6", off::DADDR_V6),
        ],
    };

    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 1480
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;
";

    #[test]
    fn accepts_the_known_layout() {
        check_layout(&CLASSIC, FORMAT_6_18).unwrap();
        // The typed hook reads no record field: any layout will do.
        check_layout(&HOOKS[0], "").unwrap();
    }

    #[test]
    fn refuses_a_shifted_layout() {
        // Before 5.6 `protocol` was a u8, which moved the addresses.
        let old = FORMAT_6_18.replace("offset:32;", "offset:31;");
        let err = check_layout(&CLASSIC, &old).unwrap_err().to_string();
        assert!(err.contains("saddr") && err.contains("31"), "{err}");
    }

    #[test]
    fn running_kernel_matches_the_program() {
        crate::testing::require_root("reads the tracepoint format file under tracefs");
        crate::kernel::fs::ensure_filesystems().unwrap();
        for hook in &HOOKS {
            if let Err(e) = check_hook(hook) {
                panic!("{}: {e:#}", hook.name);
            }
        }
    }
}
