//! Kernel modules for the guest: which files to load, in which order.
//!
//! Debian's kernel packages ship no `modules.dep` (depmod writes it when the
//! package is installed, and it is never installed here), so the dependencies are
//! read from each module's own `.modinfo` section (`depends=a,b`) and written out
//! in the `modules.dep` form, which is parsed back like a real one would be.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A module's name as the kernel knows it: the file name without `.ko[.xz|.zst|.gz]`,
/// with `-` read as `_`.
pub fn module_name(file: &str) -> Option<String> {
    let base = file.rsplit('/').next()?;
    let stem = base
        .strip_suffix(".ko")
        .or_else(|| base.strip_suffix(".ko.xz"))
        .or_else(|| base.strip_suffix(".ko.zst"))
        .or_else(|| base.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

/// One module of a `modules.dep`: its path (relative to the modules dir) and the
/// names of the modules it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepEntry {
    pub path: String,
    pub deps: Vec<String>,
}

/// Parses `modules.dep` ("kernel/net/ipv4/tcp_diag.ko: kernel/net/ipv4/inet_diag.ko"),
/// keyed by module name.
pub fn parse_modules_dep(text: &str) -> Result<BTreeMap<String, DepEntry>> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (path, deps) = line
            .split_once(':')
            .with_context(|| format!("modules.dep line {}: no ':' in {line:?}", n + 1))?;
        let name = module_name(path)
            .with_context(|| format!("modules.dep line {}: {path:?} is not a module", n + 1))?;
        let deps = deps
            .split_whitespace()
            .map(|d| {
                module_name(d)
                    .with_context(|| format!("modules.dep line {}: {d:?} is not a module", n + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        out.insert(
            name,
            DepEntry {
                path: path.trim().to_string(),
                deps,
            },
        );
    }
    Ok(out)
}

/// Writes entries in the `modules.dep` form, each dependency by its path.
/// The inverse of [`parse_modules_dep`].
pub fn format_modules_dep(entries: &BTreeMap<String, DepEntry>) -> String {
    let mut out = String::new();
    for e in entries.values() {
        out.push_str(&e.path);
        out.push(':');
        for d in &e.deps {
            out.push(' ');
            match entries.get(d) {
                Some(x) => out.push_str(&x.path),
                // Not among the entries: by name, which reads back the same.
                None => out.push_str(&format!("{d}.ko")),
            }
        }
        out.push('\n');
    }
    out
}

/// The modules to load for `wanted`, each after those it depends on, none twice.
/// Names in `builtin` are part of the kernel: skipped, as dependencies too.
pub fn load_order(
    wanted: &[&str],
    deps: &BTreeMap<String, DepEntry>,
    builtin: &[String],
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        deps: &BTreeMap<String, DepEntry>,
        builtin: &[String],
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if out.iter().any(|n| n == name) || builtin.iter().any(|b| b == name) {
            return Ok(());
        }
        if stack.iter().any(|n| n == name) {
            bail!(
                "modules depend on each other in a cycle: {} -> {name}",
                stack.join(" -> ")
            );
        }
        let entry = deps.get(name).with_context(|| {
            format!("the kernel has no module {name} (and does not build it in)")
        })?;
        stack.push(name.to_string());
        for d in &entry.deps {
            visit(d, deps, builtin, stack, out)?;
        }
        stack.pop();
        out.push(name.to_string());
        Ok(())
    }
    let mut out = Vec::new();
    for w in wanted {
        visit(
            &w.replace('-', "_"),
            deps,
            builtin,
            &mut Vec::new(),
            &mut out,
        )?;
    }
    Ok(out)
}

/// Names in a `modules.builtin` ("kernel/net/ipv6/ipv6.ko" per line).
pub fn parse_builtin(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| module_name(l.trim())).collect()
}

/// The strings of an ELF64 little-endian object's `.modinfo` section.
pub fn modinfo(elf: &[u8]) -> Result<Vec<String>> {
    let u16_at = |o: usize| -> Result<u16> {
        Ok(u16::from_le_bytes(
            elf.get(o..o + 2).context("truncated ELF")?.try_into()?,
        ))
    };
    let u32_at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            elf.get(o..o + 4).context("truncated ELF")?.try_into()?,
        ))
    };
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(o..o + 8).context("truncated ELF")?.try_into()?,
        ))
    };
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        bail!("not a 64-bit little-endian ELF object");
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| -> Result<(u32, usize, usize)> {
        let h = shoff + i * shentsize;
        Ok((
            u32_at(h)?,
            u64_at(h + 0x18)? as usize,
            u64_at(h + 0x20)? as usize,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let names = elf
        .get(stroff..stroff + strsize)
        .context("truncated ELF section names")?;
    for i in 0..shnum {
        let (name_at, off, size) = section(i)?;
        let name = names
            .get(name_at as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = elf.get(off..off + size).context("truncated .modinfo")?;
            return Ok(data
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
    }
    bail!("no .modinfo section")
}

/// The `depends=` of a module's modinfo, as module names.
pub fn depends(modinfo: &[String]) -> Vec<String> {
    modinfo
        .iter()
        .filter_map(|s| s.strip_prefix("depends="))
        .flat_map(|d| d.split(','))
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// Every module file under `dir` (recursively), keyed by module name, with its path
/// relative to `dir`.
pub fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|f| f.to_str()).and_then(module_name)
            {
                out.insert(name, p.strip_prefix(dir)?.to_path_buf());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_module_files() {
        assert_eq!(
            module_name("kernel/net/ipv4/tcp_diag.ko").as_deref(),
            Some("tcp_diag")
        );
        assert_eq!(module_name("inet_diag.ko.xz").as_deref(), Some("inet_diag"));
        assert_eq!(
            module_name("a/nf-conntrack.ko.zst").as_deref(),
            Some("nf_conntrack")
        );
        assert_eq!(module_name("a/b.ko.gz").as_deref(), Some("b"));
        assert_eq!(module_name("modules.dep"), None);
    }

    const DEP: &str = "\
kernel/net/ipv4/inet_diag.ko.xz:
kernel/net/ipv4/tcp_diag.ko.xz: kernel/net/ipv4/inet_diag.ko.xz
kernel/net/ipv4/udp_diag.ko.xz: kernel/net/ipv4/inet_diag.ko.xz
kernel/net/x/top.ko: kernel/net/x/mid.ko kernel/net/ipv4/inet_diag.ko.xz kernel/net/x/base.ko
kernel/net/x/mid.ko: kernel/net/x/base.ko
kernel/net/x/base.ko:
kernel/net/x/uses-builtin.ko: kernel/net/ipv6/ipv6.ko
kernel/c/a.ko: kernel/c/b.ko
kernel/c/b.ko: kernel/c/a.ko
";

    #[test]
    fn parses_modules_dep() {
        let m = parse_modules_dep(DEP).unwrap();
        assert_eq!(
            m["tcp_diag"],
            DepEntry {
                path: "kernel/net/ipv4/tcp_diag.ko.xz".into(),
                deps: vec!["inet_diag".into()],
            }
        );
        assert!(m["inet_diag"].deps.is_empty());
        assert_eq!(m["uses_builtin"].deps, ["ipv6"]);
        assert!(parse_modules_dep("no colon here\n").is_err());
        assert!(parse_modules_dep("kernel/x.ko: notamodule\n").is_err());
        // Round trip through the writer.
        assert_eq!(parse_modules_dep(&format_modules_dep(&m)).unwrap(), m);
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let m = parse_modules_dep(DEP).unwrap();
        assert_eq!(
            load_order(&["tcp_diag", "udp_diag"], &m, &[]).unwrap(),
            ["inet_diag", "tcp_diag", "udp_diag"]
        );
        assert_eq!(
            load_order(&["top", "mid", "tcp-diag"], &m, &[]).unwrap(),
            ["base", "mid", "inet_diag", "top", "tcp_diag"]
        );
    }

    #[test]
    fn builtins_are_skipped_and_unknowns_fail() {
        let m = parse_modules_dep(DEP).unwrap();
        let builtin = parse_builtin("kernel/net/ipv6/ipv6.ko\nkernel/net/ipv4/inet_diag.ko\n");
        assert_eq!(builtin, ["ipv6", "inet_diag"]);
        assert_eq!(
            load_order(&["ipv6"], &m, &builtin).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            load_order(&["tcp_diag", "uses_builtin"], &m, &builtin).unwrap(),
            ["tcp_diag", "uses_builtin"]
        );
        let err = load_order(&["uses_builtin"], &m, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no module ipv6"), "{err}");
        let err = load_order(&["a"], &m, &[]).unwrap_err().to_string();
        assert!(err.contains("cycle: a -> b -> a"), "{err}");
    }

    /// A minimal ELF64 object: a null section, `.modinfo`, and the section names.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let names_at = elf.len();
        elf.extend_from_slice(names);
        elf.resize(elf.len().next_multiple_of(8), 0);
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, modinfo_at, modinfo.len());
        sh(10, names_at, names.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let elf =
            elf_with_modinfo(b"license=GPL\0depends=inet_diag,nf-x\0\0intree=Y\0name=tcp_diag\0");
        let info = modinfo(&elf).unwrap();
        assert_eq!(
            info,
            [
                "license=GPL",
                "depends=inet_diag,nf-x",
                "intree=Y",
                "name=tcp_diag"
            ]
        );
        assert_eq!(depends(&info), ["inet_diag", "nf_x"]);
        let none = modinfo(&elf_with_modinfo(b"depends=\0name=inet_diag\0")).unwrap();
        assert!(depends(&none).is_empty());
        assert!(modinfo(b"\x7fELF\x01\x01").is_err());
        assert!(modinfo(&elf[..40]).is_err());
    }
}
