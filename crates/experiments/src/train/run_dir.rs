//! The run directory (design §6): `config.toml` (resolved), `metrics.jsonl` (one JSON object
//! per log step), `step-N.safetensors` checkpoints, `curves.svg`, `summary.json`.

use crate::train::TrainError;
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

/// How many checkpoints a run keeps (older ones are deleted once a newer one is safely written).
pub const KEEP_CHECKPOINTS: usize = 2;

/// A run's directory. With data parallelism only rank 0 writes it: the other ranks hold a
/// [`RunDir::reader`] of the same folder, whose writes do nothing.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
    writes: bool,
}

impl RunDir {
    /// Creates (or reopens, for `--resume`) the directory.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, TrainError> {
        let path = path.into();
        fs::create_dir_all(&path).map_err(|e| TrainError::io(&path, "create", e))?;
        Ok(RunDir { path, writes: true })
    }

    /// The same folder for a rank that reads it (checkpoints to resume from) but never writes.
    pub fn reader(&self) -> Self {
        RunDir { path: self.path.clone(), writes: false }
    }

    /// Whether this handle writes the directory (false on data-parallel ranks other than 0).
    pub fn writes(&self) -> bool {
        self.writes
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `name` atomically (temporary file, then rename).
    pub fn write(&self, name: &str, text: &str) -> Result<(), TrainError> {
        if !self.writes {
            return Ok(());
        }
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, "write", e))?;
        fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, "rename onto", e))
    }

    /// Appends one JSON object to `metrics.jsonl`.
    pub fn log_metrics(&self, line: &serde_json::Value) -> Result<(), TrainError> {
        if !self.writes {
            return Ok(());
        }
        let path = self.file("metrics.jsonl");
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, "open", e))?;
        writeln!(f, "{line}").map_err(|e| TrainError::io(&path, "append to", e))
    }

    /// Every metrics line so far (for the plot and for resuming).
    pub fn read_metrics(&self) -> Result<Vec<serde_json::Value>, TrainError> {
        let path = self.file("metrics.jsonl");
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = fs::read_to_string(&path).map_err(|e| TrainError::io(&path, "read", e))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| TrainError::Config(format!("{}: {e}", path.display()))))
            .collect()
    }

    /// Drops metrics lines past `step` (a resumed run rewrites what came after its checkpoint).
    /// The lines kept are copied byte for byte: parsing them into JSON values and printing them
    /// again could change a float's last digits, and a resumed run's metrics must equal a
    /// straight run's.
    pub fn truncate_metrics(&self, step: u64) -> Result<(), TrainError> {
        if !self.writes {
            return Ok(());
        }
        let path = self.file("metrics.jsonl");
        if !path.exists() {
            return self.write("metrics.jsonl", "");
        }
        let text = fs::read_to_string(&path).map_err(|e| TrainError::io(&path, "read", e))?;
        let mut kept = String::with_capacity(text.len());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
            if value["step"].as_u64().is_some_and(|s| s <= step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        self.write("metrics.jsonl", &kept)
    }

    /// `step-N.safetensors` files, sorted by step.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>, TrainError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.path).map_err(|e| TrainError::io(&self.path, "list", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) =
                name.strip_prefix("step-").and_then(|s| s.strip_suffix(".safetensors")).and_then(|s| s.parse().ok())
            {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes all but the newest [`KEEP_CHECKPOINTS`] checkpoints.
    pub fn prune_checkpoints(&self) -> Result<(), TrainError> {
        if !self.writes {
            return Ok(());
        }
        let all = self.checkpoints()?;
        for (_, path) in all.iter().take(all.len().saturating_sub(KEEP_CHECKPOINTS)) {
            fs::remove_file(path).map_err(|e| TrainError::io(path, "remove", e))?;
        }
        Ok(())
    }
}

impl TrainError {
    pub(crate) fn io(path: &Path, action: &str, e: std::io::Error) -> Self {
        TrainError::Io(format!("cannot {action} {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Floats that serde_json's default (not correctly rounded) parser reads one ulp off: a
    /// resumed run that re-printed its kept metrics changed them (issue 10: "loss and
    /// grad_norm differ in their last bits at steps before the interruption").
    const LINES: &str = "{\"loss\":2.2804832458496094,\"step\":10}\n\
                         {\"loss\":2.2619235515594482,\"step\":12}\n\
                         {\"grad_norm\":1.3742240143218305,\"loss\":2.2460854053497314,\"step\":13}\n\
                         {\"loss\":2.1,\"step\":14}\n";

    #[test]
    fn truncating_metrics_keeps_the_kept_lines_byte_for_byte() {
        let tmp = tempfile::Builder::new().prefix("vitrs-run-dir-test-").tempdir().unwrap();
        let run = RunDir::create(tmp.path().join("run")).unwrap();
        run.write("metrics.jsonl", LINES).unwrap();
        run.truncate_metrics(13).unwrap();
        let kept = fs::read_to_string(run.file("metrics.jsonl")).unwrap();
        let want: String = LINES.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert_eq!(kept, want);
        // No metrics yet: an empty file.
        fs::remove_file(run.file("metrics.jsonl")).unwrap();
        run.truncate_metrics(13).unwrap();
        assert_eq!(fs::read_to_string(run.file("metrics.jsonl")).unwrap(), "");
    }
}
