//! The trainer's view of the data: the train and test splits in memory as `[N, C, H, W]` f32
//! tensors in [-1, 1], and the training batch of any step, deterministic in (seed, step) so a
//! resumed run sees exactly the batches a straight run would.

use crate::train::{config::DataSection, TrainError};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use vit_tensor::{ops, Device, Tensor};

/// One split in memory.
#[derive(Debug, Clone)]
pub struct Split {
    /// `[N, C, H, W]` f32 in [-1, 1].
    pub images: Tensor,
    /// Class labels, `N` of them.
    pub labels: Vec<i32>,
}

impl Split {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the split has no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Rows `idx` of the split: `([B, C, H, W], labels)`.
    pub fn gather(&self, idx: &[usize]) -> Result<(Tensor, Vec<i32>), TrainError> {
        let d = self.images.dims().to_vec();
        let flat = self.images.reshape([d[0], d[1] * d[2] * d[3]])?;
        let rows = Tensor::from_vec(idx.iter().map(|&i| i as i32).collect::<Vec<_>>(), [idx.len()], Device::Cpu)?;
        let x = ops::gather_rows(&flat, &rows)?.reshape([idx.len(), d[1], d[2], d[3]])?;
        Ok((x, idx.iter().map(|&i| self.labels[i]).collect()))
    }
}

/// Loads the train and test splits the config names.
pub fn load(cfg: &DataSection) -> Result<(Split, Split), TrainError> {
    match cfg.format.as_str() {
        "idx" => {
            let split = |prefix: &str, limit| -> Result<Split, TrainError> {
                let d = vit_data::load_idx_dataset(&cfg.path, prefix, limit)?;
                Ok(Split { labels: d.labels.to_vec::<i32>()?, images: d.images })
            };
            Ok((split(&cfg.train, cfg.train_limit)?, split(&cfg.test, cfg.test_limit)?))
        }
        other => {
            Err(TrainError::Config(format!("data.format = {other:?}: only \"idx\" is wired into vit train so far")))
        }
    }
}

/// Indices of the training batch of `step`: epoch `e` visits a permutation seeded by
/// `(seed, e)`; batches never straddle epochs (the last partial batch of an epoch is dropped).
pub fn batch_indices(n: usize, batch: usize, seed: u64, step: u64) -> Vec<usize> {
    let per_epoch = (n / batch).max(1) as u64;
    let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    order[k * batch..((k + 1) * batch).min(n)].to_vec()
}
