//! Where the policy in force comes from: the config file (if any) with the flags laid
//! over it. The daemon keeps one and reads it again on SIGHUP or a control-API reload.

use std::path::PathBuf;

use anyhow::Result;

use crate::policy::{config, PolicySpec};

/// The config file and the command line's flags, as the daemon was started with them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySource {
    pub config: Option<PathBuf>,
    /// What the flags say (`--enforce` included); laid over the file's settings at
    /// every read.
    pub flags: PolicySpec,
}

impl PolicySource {
    /// Reads the file again and lays the flags over it. The result enforces when
    /// `--enforce` was given or the file says `enforce = true`: so a reload can turn
    /// enforcing on or off through the file only when the flag was not given.
    pub fn read(&self) -> Result<PolicySpec> {
        let file = match &self.config {
            Some(path) => config::load(path)?,
            None => PolicySpec::default(),
        };
        Ok(file.overlay(self.flags.clone()))
    }
}
