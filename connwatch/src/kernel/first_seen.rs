//! The first sighting of each socket older than connwatch (its birth unknown, found by
//! a start-up dump), kept across restarts so that a restart never pushes its age bound
//! back.
//!
//! A file in `/run`, beside the lock and the control socket: like the pins it lasts
//! until reboot (when every socket and cookie is new) or `connwatch cleanup`, and it
//! costs what it holds. No kernel program reads these sightings; a pinned hash map of
//! the connection map's capacity (earlier builds' `CW_FIRST_SEEN`) held 4 MiB of empty
//! buckets on every host.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use connwatch_common::MAP_FIRST_SEEN;

use crate::conn::SockId;
use crate::kernel::pins::PIN_DIR;

/// Where the daemon keeps them.
pub const PATH: &str = "/run/connwatch.first-seen";

/// The file's first line: its format.
const MAGIC: &[u8] = b"connwatch first-seen 1\n";

/// A record: cookie (u64), namespace inode (u32), first seen (u64, CLOCK_MONOTONIC
/// ns), little-endian.
const RECORD: usize = 20;

/// The first sightings kept in one file.
#[derive(Clone, Debug)]
pub struct FirstSeenFile {
    path: PathBuf,
}

impl FirstSeenFile {
    /// The daemon's, at [`PATH`].
    pub fn host() -> FirstSeenFile {
        FirstSeenFile::at(PATH)
    }

    pub fn at(path: impl Into<PathBuf>) -> FirstSeenFile {
        FirstSeenFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every sighting the file holds; none if there is no file.
    pub fn read(&self) -> Result<Vec<(SockId, u64)>> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path.display()))
            }
        };
        let Some(records) = bytes.strip_prefix(MAGIC) else {
            bail!(
                "{} is not a connwatch first-sightings file (its first line is not {:?})",
                self.path.display(),
                String::from_utf8_lossy(&MAGIC[..MAGIC.len() - 1])
            );
        };
        if records.len() % RECORD != 0 {
            bail!(
                "{} is cut short: {} bytes of records, not a whole number of {RECORD}-byte records",
                self.path.display(),
                records.len()
            );
        }
        Ok(records
            .chunks_exact(RECORD)
            .map(|r| {
                let word = |at: usize| u64::from_le_bytes(r[at..at + 8].try_into().unwrap());
                let netns = u32::from_le_bytes(r[8..12].try_into().unwrap());
                (SockId::new(netns, word(0)), word(12))
            })
            .collect())
    }

    /// Replaces the file's content with `sightings`, whole or not at all: a new file,
    /// renamed over the old one, so a daemon killed meanwhile leaves the last complete
    /// set.
    pub fn write<'a>(
        &self,
        sightings: impl IntoIterator<Item = (&'a SockId, &'a u64)>,
    ) -> Result<()> {
        let mut bytes = MAGIC.to_vec();
        for (id, at) in sightings {
            bytes.extend_from_slice(&id.cookie.to_le_bytes());
            bytes.extend_from_slice(&id.netns.to_le_bytes());
            bytes.extend_from_slice(&at.to_le_bytes());
        }
        let new = self.new_path();
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // Root's alone: it names the sockets of every namespace.
            .mode(0o600)
            .open(&new)
            .and_then(|mut f| f.write_all(&bytes));
        written
            .and_then(|()| fs::rename(&new, &self.path))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Where a write puts the new content before it takes the file's place.
    fn new_path(&self) -> PathBuf {
        let mut new = self.path.clone().into_os_string();
        new.push(".new");
        PathBuf::from(new)
    }

    /// Removes the file (`connwatch cleanup`), and any new one a write left half done;
    /// true if there was one.
    pub fn remove(&self) -> Result<bool> {
        let _ = fs::remove_file(self.new_path());
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.path.display())),
        }
    }
}

/// Where builds before the file pinned the sightings.
fn pinned_path() -> PathBuf {
    Path::new(PIN_DIR.as_str()).join(MAP_FIRST_SEEN)
}

/// The sightings an earlier build kept in the pinned map `CW_FIRST_SEEN`; None if there
/// is no such pin. Read at the first start of this build, so an upgrade keeps them; the
/// caller removes the pin ([`forget_pinned`]) once the file holds them.
pub fn read_pinned() -> Option<Result<Vec<(SockId, u64)>>> {
    let path = pinned_path();
    if !path.exists() {
        return None;
    }
    let read = || -> Result<Vec<(SockId, u64)>> {
        let data =
            MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let map: HashMap<MapData, [u64; 2], u64> = HashMap::try_from(Map::HashMap(data))?;
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .map(|([cookie, netns], at)| (SockId::new(netns as u32, cookie), at))
            .collect())
    };
    Some(read())
}

/// Removes the earlier build's pin (the map goes with its last descriptor).
pub fn forget_pinned() -> Result<()> {
    let path = pinned_path();
    fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> FirstSeenFile {
        let dir = std::env::temp_dir().join(format!("cw-first-seen-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        FirstSeenFile::at(dir.join("first-seen"))
    }

    #[test]
    fn what_is_written_is_read_back() {
        let file = scratch("round");
        assert_eq!(file.read().unwrap(), vec![], "no file holds no sightings");
        let kept = [
            (SockId::new(4026531840, 7), 5_000_000_000u64),
            (SockId::new(u32::MAX, u64::MAX), u64::MAX),
            (SockId::new(1, 0), 0),
        ];
        file.write(kept.iter().map(|(id, at)| (id, at))).unwrap();
        assert_eq!(file.read().unwrap(), kept.to_vec());
        // A rewrite replaces, not appends.
        file.write(kept[..1].iter().map(|(id, at)| (id, at)))
            .unwrap();
        assert_eq!(file.read().unwrap(), kept[..1].to_vec());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "readable by others: {mode:o}");
        assert!(file.remove().unwrap());
        assert!(!file.remove().unwrap(), "a second removal finds nothing");
        assert_eq!(file.read().unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_file_is_refused_naming_it() {
        let file = scratch("damaged");
        let one = [(SockId::new(9, 9), 9u64)];
        file.write(one.iter().map(|(id, at)| (id, at))).unwrap();
        let mut bytes = fs::read(file.path()).unwrap();
        bytes.pop();
        fs::write(file.path(), &bytes).unwrap();
        let e = file.read().unwrap_err().to_string();
        assert!(
            e.contains("cut short") && e.contains(&file.path().display().to_string()),
            "{e}"
        );
        fs::write(file.path(), b"something else\n").unwrap();
        let e = file.read().unwrap_err().to_string();
        assert!(e.contains("not a connwatch first-sightings file"), "{e}");
    }
}
