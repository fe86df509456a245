//! Mixup in training (`data.mixup = { p = 0.2 }`): big_vision's `get_mixup` applied to the
//! whole global batch's images and targets before they are split into micro-batches, over
//! data-parallel ranks too. Each example is mixed with the previous one of the *global* batch,
//! so a rank also needs the last example of the rank before it (one ring `send_recv`). The
//! ratio comes from `(train.seed, step)` alone, so a resumed run and any world size mix alike.

use crate::train::TrainError;
use serde::{Deserialize, Serialize};
use vit_data::{augment::mix64, Rng};
use vit_tensor::{Device, Tensor};

/// `data.mixup`: big_vision's `config.mixup = dict(p=...)`. Absent = no mixup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MixupConfig {
    /// The Beta(p, p) parameter of the mixing ratio (0.2 in "Better plain ViT baselines").
    pub p: f64,
}

impl MixupConfig {
    /// Checks `p`: a positive, finite Beta parameter.
    pub fn validate(&self) -> Result<(), TrainError> {
        if !(self.p > 0.0 && self.p.is_finite()) {
            return Err(TrainError::Config(format!(
                "data.mixup.p = {}: expected a positive Beta parameter (big_vision uses 0.2)",
                self.p
            )));
        }
        Ok(())
    }
}

/// The generator of step `step`'s mixing ratio in a run seeded with `seed` (a stream of its
/// own: not the data order's nor the augmentation's).
fn step_rng(seed: u64, step: u64) -> Rng {
    Rng::new(mix64(mix64(seed ^ 0x6d69_7875_705f_7631) ^ step))
}

/// This rank's part of the mixed global batch of step `step`: `images` `[rows, C, H, W]` f32
/// (the rank's rows of the global batch, in order) and `targets` `[rows, classes]` f32 (soft
/// targets), both on the CPU; returns the mixed `(images, targets)` of the same shapes. Row `i`
/// becomes `λ·row_i + (1 − λ)·row_{i−1}` with row −1 the global batch's last, λ drawn from
/// `(seed, step)` by [`vit_data::mixup::mixup`]. With several ranks, each sends its last row
/// to the next rank (a ring), so the result does not depend on the world size.
pub fn mix_global_batch(
    cfg: &MixupConfig,
    images: &Tensor,
    targets: &Tensor,
    seed: u64,
    step: u64,
    comm: &dyn vit_collective::Communicator,
) -> Result<(Tensor, Tensor), TrainError> {
    let rows = images.dims()[0];
    let (mut x, mut t) = (images.to_f32_vec()?, targets.to_f32_vec()?);
    if rows == 0 || targets.dims()[0] != rows {
        return Err(TrainError::Config(format!(
            "mixup of {rows} images and {} targets: expected one target row per image, at least one",
            targets.dims()[0]
        )));
    }
    let (per_image, classes) = (x.len() / rows, t.len() / rows);
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut rng = step_rng(seed, step);
    if world <= 1 {
        vit_data::mixup::mixup(&mut x, &mut t, rows, cfg.p, &mut rng)?;
    } else {
        // The previous rank's last row (rank 0 gets the global batch's last, from the last rank).
        let mut last = x[(rows - 1) * per_image..].to_vec();
        last.extend_from_slice(&t[(rows - 1) * classes..]);
        let n = last.len();
        let sent = Tensor::from_vec(last, [n], Device::Cpu)?;
        let prev = comm.send_recv(&sent, (rank + 1) % world, (rank + world - 1) % world)?.to_f32_vec()?;
        // Mix [prev, rows...] as one batch and drop its first row (mixed with our last one).
        let mut xa = prev[..per_image].to_vec();
        xa.extend_from_slice(&x);
        let mut ta = prev[per_image..].to_vec();
        ta.extend_from_slice(&t);
        vit_data::mixup::mixup(&mut xa, &mut ta, rows + 1, cfg.p, &mut rng)?;
        x = xa.split_off(per_image);
        t = ta.split_off(classes);
    }
    Ok((
        Tensor::from_vec(x, images.shape().clone(), Device::Cpu)?,
        Tensor::from_vec(t, targets.shape().clone(), Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_collective::{LocalGroup, SingleProcess};

    fn batch(rows: usize, d: usize, k: usize) -> (Tensor, Tensor) {
        let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919) % 113) as f32 / 10.0).collect();
        let mut t = vec![0f32; rows * k];
        for i in 0..rows {
            t[i * k + (i * 3) % k] = 1.0;
        }
        (
            Tensor::from_vec(x, [rows, 1, 1, d], Device::Cpu).unwrap(),
            Tensor::from_vec(t, [rows, k], Device::Cpu).unwrap(),
        )
    }

    #[test]
    fn ranks_mix_their_rows_as_one_rank_mixes_the_global_batch() {
        let (rows, d, k) = (8, 5, 4);
        let (x, t) = batch(rows, d, k);
        let cfg = MixupConfig { p: 0.2 };
        // A step whose ratio is well inside (0.5, 1), so every row really changes.
        let step = (0..1000u64)
            .find(|&s| {
                let mut r = step_rng(9, s);
                let (mut a, mut b) = (vec![0f32; 2], vec![0f32; 2]);
                let l = vit_data::mixup::mixup(&mut a, &mut b, 2, 0.2, &mut r).unwrap();
                l < 0.8
            })
            .unwrap();
        let (mx, mt) = mix_global_batch(&cfg, &x, &t, 9, step, &SingleProcess::new()).unwrap();
        assert_ne!(mx.to_f32_vec().unwrap(), x.to_f32_vec().unwrap(), "mixup changed nothing");
        for world in [2usize, 4] {
            let parts = LocalGroup::run(world, |comm| {
                let r = vit_collective::Communicator::rank(&comm);
                let n = rows / world;
                mix_global_batch(&cfg, &x.narrow(r * n, n).unwrap(), &t.narrow(r * n, n).unwrap(), 9, step, &comm)
            });
            let (mut gx, mut gt) = (Vec::new(), Vec::new());
            for p in parts {
                let (a, b) = p.unwrap();
                gx.extend(a.to_f32_vec().unwrap());
                gt.extend(b.to_f32_vec().unwrap());
            }
            assert_eq!(gx, mx.to_f32_vec().unwrap(), "world {world}: images");
            assert_eq!(gt, mt.to_f32_vec().unwrap(), "world {world}: targets");
        }
        // Another step draws another ratio; the same step the same one.
        let (again, _) = mix_global_batch(&cfg, &x, &t, 9, step, &SingleProcess::new()).unwrap();
        assert_eq!(again.to_f32_vec().unwrap(), mx.to_f32_vec().unwrap());
    }

    #[test]
    fn a_bad_p_is_a_one_line_error() {
        for p in [0.0, -1.0, f64::NAN] {
            let e = MixupConfig { p }.validate().unwrap_err().to_string();
            assert!(e.contains("data.mixup.p") && e.contains("expected a positive Beta parameter"), "{e}");
        }
        MixupConfig { p: 0.2 }.validate().unwrap();
    }
}
