//! A writer for the cpio "newc" format, the one the kernel unpacks as an initramfs.
//!
//! An [`Archive`] is a set of absolute paths. Adding an entry adds its parent
//! directories, and entries are written in path order, so every directory comes
//! before what it holds (the kernel does not create missing parents).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// What a path in the archive is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    /// A regular file whose bytes are read from `source` when the archive is written.
    File {
        source: PathBuf,
        mode: u32,
    },
    /// A regular file with the given bytes.
    Data {
        bytes: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
    CharDev {
        major: u32,
        minor: u32,
        mode: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Default, Debug)]
pub struct Archive {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds (or replaces) `path`, which must be absolute, and its missing parents
    /// as 0755 directories.
    pub fn add(&mut self, path: impl AsRef<Path>, entry: Entry) {
        let path = normalize(path.as_ref());
        let mut parent = path.parent();
        while let Some(dir) = parent {
            if dir.as_os_str().is_empty() || dir == Path::new("/") {
                break;
            }
            self.entries
                .entry(dir.to_path_buf())
                .or_insert(Entry::Dir { mode: 0o755 });
            parent = dir.parent();
        }
        self.entries.insert(path, entry);
    }

    pub fn contains(&self, path: impl AsRef<Path>) -> bool {
        self.entries.contains_key(&normalize(path.as_ref()))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&PathBuf, &Entry)> {
        self.entries.iter()
    }

    /// Writes the archive, its trailer included.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut w = Counting { inner: out, n: 0 };
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let name = path.to_string_lossy();
            let name = name.trim_start_matches('/');
            let ino = ino as u32 + 1;
            match entry {
                Entry::Dir { mode } => {
                    header(&mut w, name, ino, S_IFDIR | mode, 2, 0, (0, 0))?;
                }
                Entry::Data { bytes, mode } => {
                    header(&mut w, name, ino, S_IFREG | mode, 1, bytes.len(), (0, 0))?;
                    w.write_all(bytes)?;
                    pad(&mut w)?;
                }
                Entry::File { source, mode } => {
                    let file = std::fs::File::open(source).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", source.display()))
                    })?;
                    let len = file.metadata()?.len() as usize;
                    header(&mut w, name, ino, S_IFREG | mode, 1, len, (0, 0))?;
                    let copied = io::copy(&mut file.take(len as u64), &mut w)?;
                    if copied != len as u64 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{} shrank while being archived", source.display()),
                        ));
                    }
                    pad(&mut w)?;
                }
                Entry::Symlink { target } => {
                    let t = target.to_string_lossy();
                    header(&mut w, name, ino, S_IFLNK | 0o777, 1, t.len(), (0, 0))?;
                    w.write_all(t.as_bytes())?;
                    pad(&mut w)?;
                }
                Entry::CharDev { major, minor, mode } => {
                    header(&mut w, name, ino, S_IFCHR | mode, 1, 0, (*major, *minor))?;
                }
            }
        }
        header(&mut w, "TRAILER!!!", 0, 0, 1, 0, (0, 0))?;
        w.flush()
    }
}

/// Absolute, with `.` and `..` resolved lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Pads with NULs to the next multiple of 4.
fn pad<W: Write>(w: &mut Counting<'_, W>) -> io::Result<()> {
    let rem = (w.n % 4) as usize;
    if rem != 0 {
        w.write_all(&[0u8; 3][..4 - rem])?;
    }
    Ok(())
}

fn header<W: Write>(
    w: &mut Counting<'_, W>,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rdev: (u32, u32),
) -> io::Result<()> {
    let size = u32::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: over 4 GiB")))?;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        size,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    let mut head = String::with_capacity(110);
    head.push_str("070701");
    for f in fields {
        head.push_str(&format!("{f:08x}"));
    }
    w.write_all(head.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// name, mode, (rdevmajor, rdevminor), data
    type Read = (String, u32, (u32, u32), Vec<u8>);

    /// Reads a newc archive back, trailer excluded.
    fn parse(mut buf: &[u8]) -> Vec<Read> {
        let total = buf.len();
        let mut out = Vec::new();
        loop {
            let at = total - buf.len();
            assert_eq!(at % 4, 0, "entry at unaligned offset {at}");
            assert_eq!(&buf[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rdev, namesize) =
                (field(1), field(6), (field(9), field(10)), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&buf[110..name_end - 1])
                .unwrap()
                .to_string();
            assert_eq!(buf[name_end - 1], 0);
            let data_at = name_end.next_multiple_of(4);
            let data = buf[data_at..data_at + size as usize].to_vec();
            let next = (data_at + size as usize).next_multiple_of(4);
            // Header offsets are relative to the entry, which starts aligned.
            buf = &buf[next..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn parents_come_first_and_everything_reads_back() {
        let mut a = Archive::new();
        a.add(
            "/vm/tests/e2e",
            Entry::Data {
                bytes: b"hello".to_vec(),
                mode: 0o755,
            },
        );
        a.add(
            "/dev/console",
            Entry::CharDev {
                major: 5,
                minor: 1,
                mode: 0o600,
            },
        );
        a.add(
            "/bin/sh",
            Entry::Symlink {
                target: "bash".into(),
            },
        );
        a.add(
            "/init",
            Entry::Data {
                bytes: vec![1, 2, 3, 4],
                mode: 0o755,
            },
        );
        let mut buf = Vec::new();
        a.write_to(&mut buf).unwrap();
        let got = parse(&buf);
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "vm",
                "vm/tests",
                "vm/tests/e2e"
            ]
        );
        let by = |n: &str| got.iter().find(|e| e.0 == n).unwrap().clone();
        assert_eq!(by("vm").1, 0o040755);
        assert_eq!(by("vm/tests/e2e").1, 0o100755);
        assert_eq!(by("vm/tests/e2e").3, b"hello");
        assert_eq!(by("init").3, [1, 2, 3, 4]);
        assert_eq!(by("bin/sh").1, 0o120777);
        assert_eq!(by("bin/sh").3, b"bash");
        assert_eq!(by("dev/console").1, 0o020600);
        assert_eq!(by("dev/console").2, (5, 1));
        assert_eq!(buf.len() % 4, 0);
    }

    #[test]
    fn header_layout_is_exact() {
        let mut a = Archive::new();
        a.add(
            "/a",
            Entry::Data {
                bytes: b"xyz".to_vec(),
                mode: 0o644,
            },
        );
        let mut buf = Vec::new();
        a.write_to(&mut buf).unwrap();
        let head = std::str::from_utf8(&buf[..110]).unwrap();
        assert_eq!(
            head,
            "070701\
             00000001\
             000081a4\
             00000000\
             00000000\
             00000001\
             00000000\
             00000003\
             00000000\
             00000000\
             00000000\
             00000000\
             00000002\
             00000000"
        );
        // name "a\0" ends at 112 (aligned), then "xyz" and one byte of padding.
        assert_eq!(&buf[110..116], b"a\0xyz\0");
        assert_eq!(&buf[116..122], b"070701");
    }

    #[test]
    fn files_are_read_at_write_time_and_paths_are_normalized() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("f");
        std::fs::write(&src, b"abcdefg").unwrap();
        let mut a = Archive::new();
        a.add(
            "/x/../y/./f",
            Entry::File {
                source: src.clone(),
                mode: 0o600,
            },
        );
        assert!(a.contains("/y/f"));
        assert!(a.contains("/y"));
        let mut buf = Vec::new();
        a.write_to(&mut buf).unwrap();
        let got = parse(&buf);
        assert_eq!(got[1].0, "y/f");
        assert_eq!(got[1].3, b"abcdefg");
        std::fs::remove_dir_all(&dir).unwrap();
        a.add(
            "/z",
            Entry::File {
                source: src,
                mode: 0o600,
            },
        );
        assert!(a.write_to(&mut Vec::new()).is_err());
    }
}
