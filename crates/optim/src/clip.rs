//! Global-norm gradient clipping: the first link of the Scaling-ViT optimizer chain (reference §3).

use crate::OptimError;
use vit_tensor::{ops, Tensor};

/// `Σ_i ‖g_i‖²` over every gradient tensor: every element squared and summed in f64 on the
/// host (CUDA tensors are copied over; `OptimizerChain` sums CUDA gradients on their device
/// with `crate::cuda::sum_of_squares`, which agrees with this to ~1e-15).
pub(crate) fn sum_of_squares(grads: &[Tensor]) -> Result<f64, OptimError> {
    use rayon::prelude::*;
    // One tensor per task, each summed in order, the sums added in tensor order: the bits do
    // not depend on the thread count.
    let per_tensor: Vec<f64> = grads
        .par_iter()
        .map(|g| {
            // f32 on the CPU is read in place; other dtypes and devices are widened to a copy.
            let owned;
            let values = match g.as_slice::<f32>() {
                Ok(v) => v,
                Err(_) => {
                    owned = g.to_f32_vec()?;
                    &owned
                }
            };
            Ok(values.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        })
        .collect::<Result<_, OptimError>>()?;
    Ok(per_tensor.iter().sum())
}

/// `sqrt(Σ_i ‖g_i‖²)` over every gradient tensor, accumulated in f64 on the host.
pub fn global_norm(grads: &[Tensor]) -> Result<f64, OptimError> {
    Ok(sum_of_squares(grads)?.sqrt())
}

/// Scales every gradient by `min(1, max_norm / ‖g‖)`; returns the norm before clipping.
/// A non-finite norm is returned unchanged with the gradients untouched, so the caller can stop.
pub fn clip_by_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, OptimError> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(OptimError::Setting {
            setting: "max_norm",
            value: max_norm.to_string(),
            expected: "a finite value > 0",
        });
    }
    let norm = global_norm(grads)?;
    if norm.is_finite() && norm > max_norm {
        let s = (max_norm / norm) as f32;
        for g in grads.iter_mut() {
            *g = ops::scale(g, s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_tensor::{DType, Device};

    #[test]
    fn clipping_scales_to_the_max_norm_and_keeps_small_gradients() {
        let mut g = vec![
            Tensor::randn([3, 4], 0.0, 2.0, 1, DType::F32, Device::Cpu).unwrap(),
            Tensor::randn([5], 0.0, 2.0, 2, DType::F32, Device::Cpu).unwrap(),
        ];
        let naive: f64 = g.iter().flat_map(|t| t.to_f32_vec().unwrap()).map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let before = clip_by_global_norm(&mut g, 1.0).unwrap();
        assert!((before - naive).abs() < 1e-5 * naive);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let kept = g.clone();
        clip_by_global_norm(&mut g, 10.0).unwrap();
        assert_eq!(g[0].to_f32_vec().unwrap(), kept[0].to_f32_vec().unwrap());
        assert!(clip_by_global_norm(&mut g, 0.0).is_err());
    }
}
