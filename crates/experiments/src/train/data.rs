//! The trainer's data: the datasets a `[data]` section names and the loaders over them
//! (`vit_data::Loader`: worker threads, prefetch, deterministic in (seed, step) so a resumed run
//! sees exactly the batches of a straight one).

use crate::train::{config::DataSection, TrainError};
use std::{path::Path, sync::Arc};
use vit_data::{
    load_cifar10, load_cifar100, BadExample, DataError, Dataset, Example, ImageFolder, InMemoryDataset, Loader,
    LoaderConfig, OnBadExample, Pipeline, Split, Transform,
};

/// The first `len` examples of a dataset (`data.train_limit`, `data.test_limit`).
struct Limited {
    inner: Arc<dyn Dataset>,
    len: usize,
}

impl Dataset for Limited {
    fn len(&self) -> usize {
        self.len
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        if index >= self.len {
            return Err(DataError::Index { index, len: self.len });
        }
        self.inner.get(index)
    }
}

/// `value_range(-1, 1)`: ViT's input range (reference §2), the default preprocessing.
/// The evaluation preprocessing of `cfg` (`data.eval_augment`, or the default), validated.
pub fn eval_pipeline(cfg: &DataSection) -> Result<Pipeline, TrainError> {
    let p = Pipeline::new(if cfg.eval_augment.is_empty() { default_pipeline() } else { cfg.eval_augment.clone() });
    p.validate()?;
    Ok(p)
}

fn default_pipeline() -> Vec<Transform> {
    vec![Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 }]
}

/// The train and test datasets with their preprocessing.
pub struct Data {
    pub train: Arc<dyn Dataset>,
    pub test: Arc<dyn Dataset>,
    train_pp: Pipeline,
    eval_pp: Pipeline,
    on_bad_example: OnBadExample,
    /// Training files the header scan found not to be images (`skip` mode; in `fail` mode they
    /// are an error before the first step).
    pub bad_at_start: Vec<BadExample>,
}

/// The examples of an image-folder split (`dataset` if it is one, within `limit`) whose files
/// are obviously not images, by the cheap header scan of `ImageFolder::check_headers`.
fn scan_headers(folder: &ImageFolder, limit: Option<usize>) -> Vec<BadExample> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut bad = folder.check_headers(threads);
    bad.retain(|b| limit.is_none_or(|n| b.index < n));
    bad
}

/// The error for files the header scan rejected: the count and the first few, one line.
fn bad_files_error(split: &str, bad: &[BadExample]) -> TrainError {
    let shown: Vec<&str> = bad.iter().take(3).map(|b| b.reason.as_str()).collect();
    TrainError::Data(vit_data::DataError::Config(format!(
        "{} file(s) of the {split} split are not readable JPEG/PNG images (found before training): {}{}          (list them all with `vit data check`; data.on_bad_example = \"skip\" trains without them)",
        bad.len(),
        shown.join("; "),
        if bad.len() > 3 { "; ..." } else { "" }
    )))
}

/// The two splits `cfg` names, and for image folders the files of each that the header scan
/// rejected (`(train, test, train_bad, test_bad)`), whatever `data.on_bad_example` says.
#[allow(clippy::type_complexity)]
pub fn open_splits(
    cfg: &DataSection,
) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>, Vec<BadExample>, Vec<BadExample>), TrainError> {
    let limit = |d: Arc<dyn Dataset>, n: Option<usize>| -> Arc<dyn Dataset> {
        match n {
            Some(n) if n < d.len() => Arc::new(Limited { inner: d, len: n }),
            _ => d,
        }
    };
    let cifar_split = |s: &str| match s {
        "train" => Ok(Split::Train),
        "test" => Ok(Split::Test),
        other => Err(TrainError::Config(format!("data split {other:?}: expected \"train\" or \"test\" for CIFAR"))),
    };
    let bundled = vit_data::bundled_name(&cfg.path);
    let (mut train_bad, mut test_bad) = (Vec::new(), Vec::new());
    let (train, test): (Arc<dyn Dataset>, Arc<dyn Dataset>) = match (cfg.format.as_str(), bundled) {
        ("idx", Some(name)) => (
            Arc::new(InMemoryDataset::from_bundled(name, &cfg.train, cfg.train_limit)?),
            Arc::new(InMemoryDataset::from_bundled(name, &cfg.test, cfg.test_limit)?),
        ),
        (other, Some(_)) => {
            return Err(TrainError::Config(format!(
                "data.format = {other:?} with data.path = {:?}: the bundled datasets are IDX, expected data.format = \"idx\"",
                cfg.path
            )))
        }
        ("idx", None) => (
            Arc::new(InMemoryDataset::from_idx(&cfg.path, &cfg.train, cfg.train_limit)?),
            Arc::new(InMemoryDataset::from_idx(&cfg.path, &cfg.test, cfg.test_limit)?),
        ),
        ("cifar10" | "cifar100", None) => {
            let read = |s: &str| -> Result<Arc<dyn Dataset>, TrainError> {
                let split = cifar_split(s)?;
                Ok(Arc::new(if cfg.format == "cifar10" {
                    load_cifar10(&cfg.path, split)?
                } else {
                    load_cifar100(&cfg.path, split)?
                }))
            };
            (limit(read(&cfg.train)?, cfg.train_limit), limit(read(&cfg.test)?, cfg.test_limit))
        }
        ("folder", None) => {
            let train = ImageFolder::open(Path::new(&cfg.path).join(&cfg.train))?;
            let test = ImageFolder::open(Path::new(&cfg.path).join(&cfg.test))?;
            // Obviously wrong files are found before the first step (issue 16 item 4).
            test_bad = scan_headers(&test, cfg.test_limit);
            train_bad = scan_headers(&train, cfg.train_limit);
            (limit(Arc::new(train), cfg.train_limit), limit(Arc::new(test), cfg.test_limit))
        }
        (other, None) => {
            return Err(TrainError::Config(format!(
                "data.format = {other:?}: expected idx, cifar10, cifar100 or folder"
            )))
        }
    };
    Ok((train, test, train_bad, test_bad))
}

/// Loads the datasets `cfg` names: `idx` (MNIST-style files, splits are prefixes; a path
/// `bundled:<name>` reads a dataset embedded in the binary, see `vit_data::bundled`), `cifar10`
/// / `cifar100` (binary batches, splits `train` / `test`), `folder` (one subfolder per class
/// under `path/<split>`).
pub fn load(cfg: &DataSection) -> Result<Data, TrainError> {
    let (train, test, bad_at_start, test_bad) = open_splits(cfg)?;
    // The test split must be clean in either mode; the training split's bad files are an error
    // before the first step unless they are to be skipped.
    if !test_bad.is_empty() {
        return Err(bad_files_error(&cfg.test, &test_bad));
    }
    if !bad_at_start.is_empty() && cfg.on_bad_example == OnBadExample::Fail {
        return Err(bad_files_error(&cfg.train, &bad_at_start));
    }
    let pp = |ops: &[Transform]| {
        let p = Pipeline::new(if ops.is_empty() { default_pipeline() } else { ops.to_vec() });
        p.validate().map(|_| p)
    };
    Ok(Data {
        train,
        test,
        train_pp: pp(&cfg.augment)?,
        eval_pp: pp(&cfg.eval_augment)?,
        on_bad_example: cfg.on_bad_example,
        bad_at_start,
    })
}

impl Data {
    /// The endless, shuffled, augmented training stream (epoch `e` is a permutation drawn from
    /// `(seed, e)`; the last partial batch of each epoch is dropped) of global batches of
    /// `batch`, of which this loader makes the rows of `shard` (a data-parallel rank's part).
    pub fn train_loader(&self, batch: usize, seed: u64, shard: vit_data::loader::Shard) -> Result<Loader, TrainError> {
        let cfg = LoaderConfig {
            shuffle: true,
            seed,
            repeat: true,
            drop_last: true,
            on_bad_example: self.on_bad_example,
            shard,
            ..LoaderConfig::new(batch)
        };
        Ok(Loader::new(self.train.clone(), self.train_pp.clone(), cfg)?)
    }

    /// One ordered pass over `dataset` with the evaluation preprocessing.
    pub fn eval_loader(&self, dataset: &Arc<dyn Dataset>, batch: usize) -> Result<Loader, TrainError> {
        let cfg = LoaderConfig { shuffle: false, repeat: false, drop_last: false, ..LoaderConfig::new(batch) };
        Ok(Loader::new(dataset.clone(), self.eval_pp.clone(), cfg)?)
    }
}
