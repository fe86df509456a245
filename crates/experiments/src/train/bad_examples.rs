//! `bad_examples.txt` of a run directory (issue 16 item 3): with `data.on_bad_example = "skip"`,
//! each training example that could not be read, decoded or augmented is written once, with the
//! step whose batch met it and the reason (which names the file), and the run stops (as for any
//! error, keeping the last step's state) when the bad examples exceed `data.max_bad_fraction`
//! of the training set.
//!
//! Lines are `step<TAB>index<TAB>reason` after one `#` header line. On resume from step `s` the
//! lines of later steps are dropped, like `metrics.jsonl`'s, so a resumed run writes the same
//! file as a straight one.

use super::{run_dir::RunDir, TrainError};
use std::{collections::BTreeSet, io::Write, path::PathBuf};
use vit_data::BadExample;

const HEADER: &str = "# step\tindex\treason";

/// The bad training examples seen so far and where they are listed.
pub struct BadLog {
    path: PathBuf,
    seen: BTreeSet<usize>,
    dataset_len: usize,
    max_fraction: f64,
    /// False on data-parallel ranks other than 0: they count but do not write.
    writes: bool,
}

fn io(path: &std::path::Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

impl BadLog {
    /// The log of `run` for a training set of `dataset_len` examples: empty for a new run; on
    /// resume from `resume_step`, the entries of steps up to it (later ones are dropped).
    pub fn open(
        run: &RunDir,
        dataset_len: usize,
        max_fraction: f64,
        resume_step: Option<u64>,
    ) -> Result<Self, TrainError> {
        let path = run.file("bad_examples.txt");
        let mut log = BadLog { path, seen: BTreeSet::new(), dataset_len, max_fraction, writes: run.writes() };
        let kept: Vec<String> = match (resume_step, std::fs::read_to_string(&log.path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    let mut f = l.split('\t');
                    let s = f.next().and_then(|s| s.parse::<u64>().ok());
                    let i = f.next().and_then(|i| i.parse::<usize>().ok());
                    match (s, i) {
                        (Some(s), Some(i)) if s <= step => {
                            log.seen.insert(i);
                            true
                        }
                        _ => false,
                    }
                })
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        if log.writes && (resume_step.is_some() || log.path.exists()) {
            let mut text = format!("{HEADER}\n");
            for l in &kept {
                text.push_str(l);
                text.push('\n');
            }
            std::fs::write(&log.path, text).map_err(|e| io(&log.path, e))?;
        }
        Ok(log)
    }

    /// Distinct bad examples listed so far.
    pub fn count(&self) -> usize {
        self.seen.len()
    }

    /// Lists the examples of `bad` not listed yet (met while making batch `step`), then checks
    /// the bad fraction: an error naming the count when it exceeds `data.max_bad_fraction`.
    pub fn record(&mut self, step: u64, bad: &[BadExample]) -> Result<(), TrainError> {
        let fresh: Vec<&BadExample> = bad.iter().filter(|b| self.seen.insert(b.index)).collect();
        if !fresh.is_empty() && self.writes {
            let new_file = !self.path.exists();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| io(&self.path, e))?;
            let mut text = if new_file { format!("{HEADER}\n") } else { String::new() };
            for b in fresh {
                let reason = b.reason.replace(['\n', '\t'], " ");
                text.push_str(&format!("{step}\t{}\t{reason}\n", b.index));
            }
            f.write_all(text.as_bytes()).map_err(|e| io(&self.path, e))?;
        }
        let fraction = self.seen.len() as f64 / self.dataset_len.max(1) as f64;
        if fraction > self.max_fraction {
            return Err(TrainError::Config(format!(
                "{} of the {} training examples are bad ({:.3}%), more than data.max_bad_fraction = {}; \
                 they are listed in {}",
                self.seen.len(),
                self.dataset_len,
                100.0 * fraction,
                self.max_fraction,
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// Every rank's `mine` (the bad examples its part of a batch met), in rank order, on every rank.
pub fn gather(comm: &dyn vit_collective::Communicator, mine: &[BadExample]) -> Result<Vec<BadExample>, TrainError> {
    let text: String = mine.iter().map(|b| format!("{}\t{}\n", b.index, b.reason.replace(['\n', '\t'], " "))).collect();
    let mut all = Vec::new();
    for part in vit_collective::all_gather_bytes(comm, text.as_bytes())? {
        let part = String::from_utf8(part).map_err(|e| TrainError::Io(format!("a rank's bad-example list: {e}")))?;
        for line in part.lines() {
            let (index, reason) = line.split_once('\t').unwrap_or((line, ""));
            let index = index
                .parse()
                .map_err(|_| TrainError::Io(format!("a rank's bad-example list has a bad line: {line:?}")))?;
            all.push(BadExample { index, reason: reason.to_string() });
        }
    }
    Ok(all)
}
