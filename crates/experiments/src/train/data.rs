//! The trainer's data: the datasets a `[data]` section names and the loaders over them
//! (`vit_data::Loader`: worker threads, prefetch, deterministic in (seed, step) so a resumed run
//! sees exactly the batches of a straight one).

use crate::train::{config::DataSection, TrainError};
use std::{path::Path, sync::Arc};
use vit_data::{
    load_cifar10, load_cifar100, DataError, Dataset, Example, ImageFolder, InMemoryDataset, Loader, LoaderConfig,
    Pipeline, Split, Transform,
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
fn default_pipeline() -> Vec<Transform> {
    vec![Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 }]
}

/// The train and test datasets with their preprocessing.
pub struct Data {
    pub train: Arc<dyn Dataset>,
    pub test: Arc<dyn Dataset>,
    train_pp: Pipeline,
    eval_pp: Pipeline,
}

/// Loads the datasets `cfg` names: `idx` (MNIST-style files, splits are prefixes; a path
/// `bundled:<name>` reads a dataset embedded in the binary, see `vit_data::bundled`), `cifar10`
/// / `cifar100` (binary batches, splits `train` / `test`), `folder` (one subfolder per class
/// under `path/<split>`).
pub fn load(cfg: &DataSection) -> Result<Data, TrainError> {
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
            let open = |s: &str| -> Result<Arc<dyn Dataset>, TrainError> {
                Ok(Arc::new(ImageFolder::open(Path::new(&cfg.path).join(s))?))
            };
            (limit(open(&cfg.train)?, cfg.train_limit), limit(open(&cfg.test)?, cfg.test_limit))
        }
        (other, None) => {
            return Err(TrainError::Config(format!(
                "data.format = {other:?}: expected idx, cifar10, cifar100 or folder"
            )))
        }
    };
    let pp = |ops: &[Transform]| {
        let p = Pipeline::new(if ops.is_empty() { default_pipeline() } else { ops.to_vec() });
        p.validate().map(|_| p)
    };
    Ok(Data { train, test, train_pp: pp(&cfg.augment)?, eval_pp: pp(&cfg.eval_augment)? })
}

impl Data {
    /// The endless, shuffled, augmented training stream (epoch `e` is a permutation drawn from
    /// `(seed, e)`; the last partial batch of each epoch is dropped).
    pub fn train_loader(&self, batch: usize, seed: u64) -> Result<Loader, TrainError> {
        let cfg = LoaderConfig { shuffle: true, seed, repeat: true, drop_last: true, ..LoaderConfig::new(batch) };
        Ok(Loader::new(self.train.clone(), self.train_pp.clone(), cfg)?)
    }

    /// One ordered pass over `dataset` with the evaluation preprocessing.
    pub fn eval_loader(&self, dataset: &Arc<dyn Dataset>, batch: usize) -> Result<Loader, TrainError> {
        let cfg = LoaderConfig { shuffle: false, repeat: false, drop_last: false, ..LoaderConfig::new(batch) };
        Ok(Loader::new(dataset.clone(), self.eval_pp.clone(), cfg)?)
    }
}
