//! Where the policy in force comes from: the config file (if any) with the flags laid
//! over it. The daemon keeps one and reads it again on SIGHUP or a control-API reload.

use std::path::PathBuf;

use anyhow::Result;

use crate::policy::{config, PolicySpec};

/// The config file and the command line's flags, as the daemon was started with them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySource {
    pub config: Option<PathBuf>,
    /// What the flags say; laid over the file's settings at every read.
    pub flags: PolicySpec,
}

impl PolicySource {
    /// Reads the file again and lays the flags over it, `enforce` standing for the
    /// command line's `--enforce`.
    pub fn read(&self, enforce: bool) -> Result<PolicySpec> {
        let file = match &self.config {
            Some(path) => config::load(path)?,
            None => PolicySpec::default(),
        };
        Ok(file.overlay(PolicySpec {
            enforce,
            ..self.flags.clone()
        }))
    }
}
