//! `vit data check` (issue 16 item 4): reads, decodes and preprocesses every example of a
//! split in parallel (the loader's workers), and reports every bad one with its reason (which
//! names the file), the header scan's findings included, and the shape and label problems
//! against the model.

use super::{config::TrainConfig, data, TrainError};
use std::collections::BTreeMap;
use vit_data::{BadExample, Loader, LoaderConfig, OnBadExample};

/// Which split to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WhichSplit {
    Train,
    Test,
}

/// What a check found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The split's name in the config (`data.train` or `data.test`).
    pub split: String,
    /// Examples in the split (within `data.*_limit`).
    pub examples: usize,
    /// Every bad example once, by index: `(index, reason)`.
    pub bad: Vec<(usize, String)>,
    /// Problems of the split as a whole (shape after preprocessing, number of classes).
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn clean(&self) -> bool {
        self.bad.is_empty() && self.problems.is_empty()
    }
}

/// Checks `split` of `cfg`'s data with its evaluation preprocessing; `on_batch(done, total)`
/// reports progress in batches.
pub fn check_split(
    cfg: &TrainConfig,
    split: WhichSplit,
    mut on_batch: impl FnMut(u64, u64),
) -> Result<CheckReport, TrainError> {
    let model = cfg.model_config()?;
    let (train, test, train_bad, test_bad) = data::open_splits(&cfg.data)?;
    let (name, dataset, scanned) = match split {
        WhichSplit::Train => (&cfg.data.train, train, train_bad),
        WhichSplit::Test => (&cfg.data.test, test, test_bad),
    };
    let mut bad: BTreeMap<usize, String> = scanned.into_iter().map(|b| (b.index, b.reason)).collect();
    let mut problems = Vec::new();
    if dataset.num_classes() > model.classes {
        problems.push(format!("the split has {} classes but model.classes = {}", dataset.num_classes(), model.classes));
    }
    let lc = LoaderConfig {
        shuffle: false,
        repeat: false,
        drop_last: false,
        on_bad_example: OnBadExample::Skip,
        ..LoaderConfig::new(64)
    };
    let loader = Loader::new(dataset.clone(), data::eval_pipeline(&cfg.data)?, lc)?;
    let total = loader.steps_per_epoch();
    let want = [model.channels, model.image_size, model.image_size];
    for (done, batch) in loader.iter().enumerate() {
        match batch {
            Ok(b) => {
                for BadExample { index, reason } in b.bad {
                    bad.entry(index).or_insert(reason);
                }
                let got = &b.images.dims()[1..];
                if got != want && problems.iter().all(|p| !p.starts_with("images are")) {
                    problems.push(format!(
                        "images are {got:?} (C, H, W) after data.eval_augment, but the model expects {want:?}"
                    ));
                }
            }
            // A batch-level failure (images of different sizes, every example bad): one
            // problem, and the check goes on with the next batch.
            Err(e) => problems.push(format!("batch {done}: {e}")),
        }
        on_batch(done as u64 + 1, total);
    }
    Ok(CheckReport { split: name.clone(), examples: dataset.len(), bad: bad.into_iter().collect(), problems })
}
