//! Helpers for the unit tests: a temporary directory (from `tempfile`) removed on drop.

use std::path::{Path, PathBuf};

/// A fresh, empty directory `vitrs-data-{name}-XXXXXX` in the system's temp folder, removed
/// (with its contents) on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(name: &str) -> Self {
        TempDir(tempfile::Builder::new().prefix(&format!("vitrs-data-{name}-")).tempdir().unwrap())
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }
}
