//! The running kernel's struct layout, read from its BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The set-state program reads `struct sock` directly, and aya-ebpf has no CO-RE: the
//! daemon resolves the member offsets here and hands them to the program as read-only
//! globals (`EbpfLoader::override_global`, names in `connwatch_common::sock_globals`).
//!
//! The BTF format is small: a header, a type section (each type a 12-byte `btf_type`
//! followed by kind-specific data, ids counted from 1) and a string section. Only what
//! offset resolution needs is decoded.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use connwatch_common::sock_globals as g;

/// Where the kernel exposes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A parsed BTF blob: the raw sections and where each type starts.
pub struct Btf {
    types: Vec<u8>,
    strings: Vec<u8>,
    /// Byte offset in `types` of type id `i + 1`.
    starts: Vec<usize>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.starts.len())
            .field("string_bytes", &self.strings.len())
            .finish()
    }
}

/// One type's fixed part.
#[derive(Clone, Copy, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` for INT/STRUCT/UNION/ENUM/DATASEC/FLOAT, the referred type otherwise.
    size_or_type: u32,
    /// Offset of the kind-specific data in `Btf::types`.
    data: usize,
}

/// A member found by [`Btf::member`]: where it is and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outer struct.
    pub offset: u32,
    /// The member's type id (modifiers not stripped).
    pub type_id: u32,
    /// Size in bytes of the member's type.
    pub size: u32,
    /// Whether the member's type is a pointer (after typedefs and modifiers).
    pub is_ptr: bool,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    let s = b.get(at..at + 2).context("BTF truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    let s = b.get(at..at + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    /// Reads and parses a BTF file, such as [`VMLINUX`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Btf> {
        let path = path.as_ref();
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Btf::parse(&data).with_context(|| format!("cannot parse the BTF in {}", path.display()))
    }

    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Btf> {
        Btf::from_file(VMLINUX)
    }

    /// Parses a little-endian BTF blob (header, types, strings).
    pub fn parse(data: &[u8]) -> Result<Btf> {
        let magic = u16_at(data, 0).context("BTF shorter than its header")?;
        if magic == BTF_MAGIC.swap_bytes() {
            bail!("big-endian BTF is not supported");
        }
        ensure!(magic == BTF_MAGIC, "not BTF (magic {magic:#06x})");
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize, what: &str| -> Result<Vec<u8>> {
            let start = hdr_len.checked_add(off).context("BTF header overflows")?;
            let end = start.checked_add(len).context("BTF header overflows")?;
            Ok(data
                .get(start..end)
                .with_context(|| format!("BTF {what} section runs past the end"))?
                .to_vec())
        };
        let types = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?;

        let mut starts = Vec::new();
        let mut at = 0;
        while at < types.len() {
            let info = u32_at(&types, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                other => bail!("BTF type {} has unknown kind {other}", starts.len() + 1),
            };
            starts.push(at);
            at += 12 + extra;
        }
        ensure!(at == types.len(), "BTF type section ends inside a type");
        Ok(Btf {
            types,
            strings,
            starts,
        })
    }

    /// Number of types (ids 1..=len).
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    fn ty(&self, id: u32) -> Result<Type> {
        let at = *id
            .checked_sub(1)
            .and_then(|i| self.starts.get(i as usize))
            .with_context(|| format!("BTF type id {id} does not exist"))?;
        let info = u32_at(&self.types, at + 4)?;
        Ok(Type {
            name_off: u32_at(&self.types, at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: u32_at(&self.types, at + 8)?,
            data: at + 12,
        })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// The id of the first type of `kind` named `name`.
    fn find(&self, name: &str, kind: u32) -> Option<u32> {
        (1..=self.starts.len() as u32).find(|&id| {
            self.ty(id)
                .is_ok_and(|t| t.kind == kind && self.name(t.name_off) == name)
        })
    }

    /// The id of the struct named `name` (a definition, not a forward declaration).
    pub fn struct_id(&self, name: &str) -> Result<u32> {
        self.find(name, KIND_STRUCT)
            .with_context(|| format!("the kernel's BTF has no struct {name}"))
    }

    /// Whether the kernel has a BTF-typed tracepoint `name` (`btf_trace_<name>`), which a
    /// `tp_btf` program attaches to.
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.find(&format!("btf_trace_{name}"), KIND_TYPEDEF)
            .is_some()
    }

    /// Follows typedefs and modifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Result<u32> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        bail!("BTF type {id}: typedef chain too long")
    }

    /// Size in bytes of a type.
    fn size_of(&self, id: u32) -> Result<u32> {
        let id = self.resolve(id)?;
        let t = self.ty(id)?;
        Ok(match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                t.size_or_type
            }
            KIND_PTR => 8,
            KIND_ARRAY => {
                let elem = u32_at(&self.types, t.data)?;
                let n = u32_at(&self.types, t.data + 8)?;
                self.size_of(elem)?
                    .checked_mul(n)
                    .context("BTF array size overflows")?
            }
            other => bail!("BTF type {id} (kind {other}) has no size"),
        })
    }

    /// Finds member `name` of struct/union `id`, looking through anonymous struct and
    /// union members. Returns the byte offset and the member's type.
    fn direct_member(&self, id: u32, name: &str) -> Result<Option<(u32, u32)>> {
        let t = self.ty(self.resolve(id)?)?;
        ensure!(
            t.kind == KIND_STRUCT || t.kind == KIND_UNION,
            "BTF type {id} is not a struct or union"
        );
        for i in 0..t.vlen {
            let at = t.data + 12 * i;
            let m_name = self.name(u32_at(&self.types, at)?);
            let m_type = u32_at(&self.types, at + 4)?;
            let raw = u32_at(&self.types, at + 8)?;
            let (bit_off, bitfield) = if t.kind_flag {
                (raw & 0x00ff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            if m_name == name {
                ensure!(
                    bitfield == 0 && bit_off % 8 == 0,
                    "member {name} is a bitfield"
                );
                return Ok(Some((bit_off / 8, m_type)));
            }
            if m_name.is_empty() && bit_off % 8 == 0 {
                let inner = self.ty(self.resolve(m_type)?)?;
                if inner.kind == KIND_STRUCT || inner.kind == KIND_UNION {
                    if let Some((off, ty)) = self.direct_member(m_type, name)? {
                        return Ok(Some((bit_off / 8 + off, ty)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The member at `path` (`["__sk_common", "skc_net", "net"]`) of struct `outer`: its
    /// byte offset from the start of `outer`, walking through nested structs, unions and
    /// typedefs of them (such as `possible_net_t`).
    pub fn member(&self, outer: &str, path: &[&str]) -> Result<Member> {
        let mut id = self.struct_id(outer)?;
        let mut offset = 0u32;
        let mut walked = outer.to_string();
        for name in path {
            let (off, ty) = self
                .direct_member(id, name)
                .with_context(|| format!("cannot read member {name} of {walked}"))?
                .with_context(|| format!("the kernel's {walked} has no member {name}"))?;
            offset += off;
            id = ty;
            walked.push('.');
            walked.push_str(name);
        }
        let resolved = self.ty(self.resolve(id)?)?;
        Ok(Member {
            offset,
            type_id: id,
            size: self.size_of(id)?,
            is_ptr: resolved.kind == KIND_PTR,
        })
    }
}

/// The offsets the set-state program reads, resolved for the running kernel: all from
/// the start of `struct sock`, except `net_inum` (from the start of `struct net`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_bound_dev_if: u32,
    /// `__sk_common.skc_net.net`: the `struct net *`.
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub sk_protocol: u32,
    /// `ns.inum` within `struct net`.
    pub net_inum: u32,
}

impl SockOffsets {
    /// Resolves the offsets from the running kernel's BTF.
    pub fn from_sys_fs() -> Result<SockOffsets> {
        SockOffsets::from_btf(&Btf::from_sys_fs()?)
    }

    /// Resolves the offsets from `btf`, checking each member's size; the error names the
    /// struct and member that is missing or unexpected.
    pub fn from_btf(btf: &Btf) -> Result<SockOffsets> {
        let common = btf.member("sock", &["__sk_common"])?.offset;
        let skc = |name: &str, size: u32| -> Result<u32> {
            let m = btf.member("sock_common", &[name])?;
            ensure!(
                m.size == size,
                "struct sock_common member {name} is {} bytes, connwatch reads {size}",
                m.size
            );
            Ok(common + m.offset)
        };
        let net = btf.member("sock_common", &["skc_net", "net"])?;
        ensure!(
            net.is_ptr,
            "struct sock_common member skc_net.net is not a pointer"
        );
        let protocol = btf
            .member("sock", &["sk_protocol"])
            .context("struct sock member sk_protocol (a u16 since Linux 5.6)")?;
        ensure!(
            protocol.size == 2,
            "struct sock member sk_protocol is {} bytes, connwatch reads 2",
            protocol.size
        );
        let inum = btf.member("net", &["ns", "inum"])?;
        ensure!(
            inum.size == 4,
            "struct net member ns.inum is {} bytes, connwatch reads 4",
            inum.size
        );
        Ok(SockOffsets {
            skc_daddr: skc("skc_daddr", 4)?,
            skc_rcv_saddr: skc("skc_rcv_saddr", 4)?,
            skc_dport: skc("skc_dport", 2)?,
            skc_num: skc("skc_num", 2)?,
            skc_family: skc("skc_family", 2)?,
            skc_bound_dev_if: skc("skc_bound_dev_if", 4)?,
            skc_net: common + net.offset,
            skc_v6_daddr: skc("skc_v6_daddr", 16)?,
            skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr", 16)?,
            sk_protocol: protocol.offset,
            net_inum: inum.offset,
        })
    }

    /// The program's globals and their values, `CW_BTF_READY` = 1 included: pass each to
    /// `EbpfLoader::override_global(name, &value, true)`.
    pub fn globals(&self) -> [(&'static str, u32); 12] {
        [
            (g::READY, 1),
            (g::DADDR, self.skc_daddr),
            (g::RCV_SADDR, self.skc_rcv_saddr),
            (g::DPORT, self.skc_dport),
            (g::NUM, self.skc_num),
            (g::FAMILY, self.skc_family),
            (g::BOUND_DEV_IF, self.skc_bound_dev_if),
            (g::NET, self.skc_net),
            (g::V6_DADDR, self.skc_v6_daddr),
            (g::V6_RCV_SADDR, self.skc_v6_rcv_saddr),
            (g::PROTOCOL, self.sk_protocol),
            (g::NET_INUM, self.net_inum),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmlinux() -> Option<Btf> {
        if !Path::new(VMLINUX).exists() {
            eprintln!("{VMLINUX} is missing (kernel without CONFIG_DEBUG_INFO_BTF): skipped");
            return None;
        }
        Some(Btf::from_sys_fs().expect("the running kernel's BTF parses"))
    }

    #[test]
    fn running_kernel_has_every_offset() {
        let Some(btf) = vmlinux() else { return };
        let o = SockOffsets::from_btf(&btf).unwrap();
        // Stable for many years: the address pair opens sock_common, ports follow the
        // hash, and the two IPv6 addresses are adjacent.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert_eq!(o.skc_dport, 12);
        assert_eq!(o.skc_num, 14);
        assert_eq!(o.skc_family, 16);
        assert_eq!(o.skc_v6_rcv_saddr, o.skc_v6_daddr + 16);
        assert!(o.skc_bound_dev_if > o.skc_family);
        assert!(o.skc_net > o.skc_bound_dev_if && o.skc_net % 8 == 0);
        assert!(o.sk_protocol > o.skc_v6_rcv_saddr);
        assert!(o.net_inum > 0);
        let names: Vec<_> = o.globals().iter().map(|(n, _)| *n).collect();
        for name in g::OFFSETS.iter().chain([&g::READY]) {
            assert!(names.contains(name), "{name} not among the globals");
        }
        assert_eq!(o.globals()[0], (g::READY, 1));
    }

    #[test]
    fn running_kernel_has_the_btf_tracepoint() {
        let Some(btf) = vmlinux() else { return };
        assert!(btf.has_btf_tracepoint("inet_sock_set_state"));
        assert!(!btf.has_btf_tracepoint("no_such_tracepoint_here"));
    }

    #[test]
    fn missing_members_are_named() {
        let Some(btf) = vmlinux() else { return };
        let e = btf.member("sock_common", &["skc_nope"]).unwrap_err();
        assert!(
            format!("{e:#}").contains("sock_common has no member skc_nope"),
            "{e:#}"
        );
        let e = btf.member("no_such_struct_x", &["a"]).unwrap_err();
        assert!(
            format!("{e:#}").contains("no struct no_such_struct_x"),
            "{e:#}"
        );
    }

    /// Builds a BTF blob from (name, info, size_or_type, extra words) entries.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Builder {
            Builder {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn ty(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, sot: u32, extra: &[u32]) {
            let n = self.s(name);
            let info = (kind << 24) | vlen | if kflag { 1 << 31 } else { 0 };
            for w in [n, info, sot].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }
        /// A struct or union with (name, type, bit offset) members.
        fn aggregate(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            let mut extra = Vec::new();
            for (m, ty, off) in members {
                extra.extend([self.s(m), *ty, *off]);
            }
            self.ty(name, kind, members.len() as u32, false, size, &extra);
        }
        fn finish(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature of the kernel's layout: anonymous unions and structs, a typedef of an
    /// anonymous struct holding a pointer, a nested struct member, an array.
    fn tiny() -> Vec<u8> {
        let mut b = Builder::new();
        // 1: u16, 2: u32, 3: u64
        b.ty("u16", KIND_INT, 0, false, 2, &[16]);
        b.ty("u32", KIND_INT, 0, false, 4, &[32]);
        b.ty("u64", KIND_INT, 0, false, 8, &[64]);
        // 4: struct ns_common { u64 pad; u32 inum; }
        b.aggregate(
            KIND_STRUCT,
            "ns_common",
            16,
            &[("pad", 3, 0), ("inum", 2, 64)],
        );
        // 5: struct net { u32 a; u32 b; struct ns_common ns; }
        b.aggregate(
            KIND_STRUCT,
            "net",
            24,
            &[("a", 2, 0), ("b", 2, 32), ("ns", 4, 64)],
        );
        // 6: struct net *; 7: anonymous struct { struct net *net; }; 8: typedef possible_net_t
        b.ty("", KIND_PTR, 0, false, 5, &[]);
        b.aggregate(KIND_STRUCT, "", 8, &[("net", 6, 0)]);
        b.ty("possible_net_t", KIND_TYPEDEF, 0, false, 7, &[]);
        // 9: anonymous struct { u32 skc_daddr; u32 skc_rcv_saddr; }
        b.aggregate(
            KIND_STRUCT,
            "",
            8,
            &[("skc_daddr", 2, 0), ("skc_rcv_saddr", 2, 32)],
        );
        // 10: anonymous union { u64 skc_addrpair; struct {...}; }
        b.aggregate(KIND_UNION, "", 8, &[("skc_addrpair", 3, 0), ("", 9, 0)]);
        // 11: const u16 ; 12: u8[16] (elem 13: u8)
        b.ty("", KIND_CONST, 0, false, 1, &[]);
        b.ty("", KIND_ARRAY, 0, false, 0, &[13, 2, 16]);
        b.ty("u8", KIND_INT, 0, false, 1, &[8]);
        // 14: struct sock_common { union {...}; const u16 skc_family @8; possible_net_t
        //     skc_net @16; u8 skc_v6_daddr[16] @24 }
        b.aggregate(
            KIND_STRUCT,
            "sock_common",
            40,
            &[
                ("", 10, 0),
                ("skc_family", 11, 64),
                ("skc_net", 8, 128),
                ("skc_v6_daddr", 12, 192),
            ],
        );
        // 15: struct sock { u64 x; struct sock_common __sk_common @8; u32 flags:4 @48 },
        //     a bitfield member making it a kind_flag struct.
        let (x, common, flags) = (b.s("x"), b.s("__sk_common"), b.s("flags"));
        b.ty(
            "sock",
            KIND_STRUCT,
            3,
            true,
            64,
            &[x, 3, 0, common, 14, 64, flags, 2, (4 << 24) | 384],
        );
        // 16: a forward declaration and a typedef of a tracepoint, as vmlinux has.
        b.ty("fwd_only", KIND_FWD, 0, false, 0, &[]);
        b.ty("btf_trace_tiny", KIND_TYPEDEF, 0, false, 6, &[]);
        b.finish()
    }

    #[test]
    fn hand_made_blob_resolves_nested_members() {
        let btf = Btf::parse(&tiny()).unwrap();
        assert_eq!(btf.len(), 17);
        let m = |s: &str, p: &[&str]| btf.member(s, p).unwrap();
        // Through an anonymous union and an anonymous struct inside it.
        assert_eq!(m("sock_common", &["skc_rcv_saddr"]).offset, 4);
        assert_eq!(m("sock_common", &["skc_rcv_saddr"]).size, 4);
        // A const-qualified member keeps its size.
        assert_eq!(m("sock_common", &["skc_family"]).offset, 8);
        assert_eq!(m("sock_common", &["skc_family"]).size, 2);
        // Through a typedef of an anonymous struct, to a pointer.
        let net = m("sock_common", &["skc_net", "net"]);
        assert_eq!((net.offset, net.size, net.is_ptr), (16, 8, true));
        assert_eq!(m("sock_common", &["skc_v6_daddr"]).size, 16);
        // Nested named struct member, from the outer struct.
        assert_eq!(m("sock", &["__sk_common", "skc_v6_daddr"]).offset, 8 + 24);
        assert_eq!(m("net", &["ns", "inum"]).offset, 8 + 8);
        assert!(btf.has_btf_tracepoint("tiny"));
        assert!(!btf.has_btf_tracepoint("other"));
    }

    #[test]
    fn hand_made_blob_errors_name_what_is_missing() {
        let btf = Btf::parse(&tiny()).unwrap();
        let err = |s: &str, p: &[&str]| format!("{:#}", btf.member(s, p).unwrap_err());
        assert!(err("sock", &["flags"]).contains("bitfield"));
        assert!(err("sock_common", &["skc_net", "nope"])
            .contains("sock_common.skc_net has no member nope"));
        assert!(err("fwd_only", &["a"]).contains("no struct fwd_only"));
        // The tiny kernel lacks sk_protocol: the full resolution names it.
        let e = format!("{:#}", SockOffsets::from_btf(&btf).unwrap_err());
        assert!(
            e.contains("sock_common has no member skc_dport") || e.contains("sk_protocol"),
            "{e}"
        );
    }

    #[test]
    fn malformed_blobs_are_refused() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
        let mut blob = tiny();
        blob[0] = 0; // magic
        assert!(format!("{:#}", Btf::parse(&blob).unwrap_err()).contains("not BTF"));
        let mut blob = tiny();
        let len = blob.len() as u32;
        blob[20..24].copy_from_slice(&len.to_le_bytes()); // string section past the end
        assert!(Btf::parse(&blob).is_err());
        let mut blob = tiny();
        blob[24 + 7] = 30; // first type's kind byte: an unknown kind
        assert!(format!("{:#}", Btf::parse(&blob).unwrap_err()).contains("unknown kind"));
    }
}
