//! Optimizer-state memory from parameter shapes alone, with nothing allocated (reference §3:
//! Adam keeps 8 B/param in f32, factored Adam ≈ 2 B/param of bf16 momentum plus one row and
//! one column of f32 second moment per factored kernel).

use crate::{optimizer::state_layout, OptimError, OptimizerConfig};

/// Bytes of optimizer state that [`OptimizerChain::new`](crate::OptimizerChain::new) with
/// `config` would allocate for parameters of these `(name, shape)`s: the same layout, frozen
/// parameters (by `config.groups`) included at 0 bytes, plus 8 bytes for the step counter.
/// Equals [`Optimizer::state_bytes`](crate::Optimizer::state_bytes) of that optimizer.
pub fn optimizer_state_bytes<'a>(
    shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    config: &OptimizerConfig,
) -> Result<u64, OptimError> {
    optimizer_state_bytes_split(shapes.into_iter().map(|(name, dims)| (name, dims, dims)), config)
}

/// [`optimizer_state_bytes`] of one rank of a tensor-parallel group: `(name, this rank's
/// shape, the whole shape)` per parameter, as
/// [`OptimizerChain::with_shards`](crate::OptimizerChain::with_shards) lays the state out
/// (factored Adam picks its axes from the whole shape; its statistics are the part's shape
/// without them).
pub fn optimizer_state_bytes_split<'a>(
    shapes: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [usize])>,
    config: &OptimizerConfig,
) -> Result<u64, OptimError> {
    config.validate()?;
    let groups = config.groups.compile()?;
    let mut bytes = 8u64;
    for (name, dims, full) in shapes {
        let (_, layout) = state_layout(&config.algorithm, dims, full, groups.settings(name).frozen);
        for (_, shape, dtype) in layout {
            bytes += shape.iter().map(|&d| d as u64).product::<u64>() * dtype.size_in_bytes() as u64;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdamWConfig, Algorithm, FactoredAdamConfig, SgdConfig};
    use vit_tensor::DType;

    /// The parameters of one sequential block with all biases (reference §1).
    fn block_shapes(d: usize, m: usize) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        let mut add = |n: &str, s: &[usize]| v.push((format!("blocks.0.{n}"), s.to_vec()));
        add("norm1.weight", &[d]);
        add("norm1.bias", &[d]);
        add("attn.qkv.weight", &[3 * d, d]);
        add("attn.qkv.bias", &[3 * d]);
        add("attn.proj.weight", &[d, d]);
        add("attn.proj.bias", &[d]);
        add("norm2.weight", &[d]);
        add("norm2.bias", &[d]);
        add("mlp.fc1.weight", &[m, d]);
        add("mlp.fc1.bias", &[m]);
        add("mlp.fc2.weight", &[d, m]);
        add("mlp.fc2.bias", &[d]);
        v
    }

    fn bytes(shapes: &[(String, Vec<usize>)], algorithm: Algorithm) -> u64 {
        let cfg = OptimizerConfig::new(algorithm, 1e-3);
        optimizer_state_bytes(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())), &cfg).unwrap()
    }

    #[test]
    fn g14_block_adamw_is_twice_and_factored_adam_about_half_the_f32_params() {
        let (d, m) = (1664u64, 8192u64);
        let shapes = block_shapes(d as usize, m as usize);
        let n: u64 = shapes.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        assert_eq!(n, 38_361_728); // reference §1: one G/14 block
        let f32_bytes = 4 * n;

        let adamw = bytes(&shapes, Algorithm::AdamW(AdamWConfig::default()));
        assert_eq!(adamw, 2 * f32_bytes + 8);
        let adamw_bf16 = bytes(&shapes, Algorithm::AdamW(AdamWConfig { m_dtype: DType::BF16, ..Default::default() }));
        assert_eq!(adamw_bf16, 6 * n + 8); // reference §3: bf16 m + fp32 v = 6 B/param

        // bf16 m (2 B/param) + rows and columns of the four kernels + full f32 v of the
        // vectors (9D + M values).
        let factored = bytes(&shapes, Algorithm::FactoredAdam(FactoredAdamConfig::default()));
        let rows_cols = (3 * d + d) + (d + d) + (m + d) + (d + m);
        assert_eq!(factored, 2 * n + 4 * rows_cols + 4 * (9 * d + m) + 8);
        let ratio = factored as f64 / f32_bytes as f64;
        assert!((0.5..0.502).contains(&ratio), "{ratio}"); // 0.50138

        let sgd = bytes(&shapes, Algorithm::Sgd(SgdConfig::default()));
        assert_eq!(sgd, 2 * n + 8);
        assert_eq!(bytes(&shapes, Algorithm::Sgd(SgdConfig { momentum: None, ..Default::default() })), 8);
    }

    #[test]
    fn frozen_parameters_cost_nothing() {
        let shapes = block_shapes(64, 256);
        let mut cfg = OptimizerConfig::new(Algorithm::AdamW(AdamWConfig::default()), 1e-3);
        cfg.groups = cfg.groups.freeze(r".*\.mlp\..*");
        let got = optimizer_state_bytes(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())), &cfg).unwrap();
        let kept: usize =
            shapes.iter().filter(|(n, _)| !n.contains(".mlp.")).map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(got, 8 * kept as u64 + 8);
    }

    #[test]
    fn split_parameters_are_factored_over_their_whole_shape() {
        use crate::{OptimizerChain, ParamShard};
        use vit_tensor::{Device, ParamStore, Tensor};
        // [64, 32] cut along rows over 4 ranks: the part [16, 32] alone would not be factored
        // (16 < 32, a full [16, 32] second moment); the whole is: v_row [32] + v_col [16].
        let cfg = OptimizerConfig::new(Algorithm::FactoredAdam(FactoredAdamConfig::default()), 1e-3);
        let (local, full) = ([16usize, 32], [64usize, 32]);
        let split = optimizer_state_bytes_split([("w", &local[..], &full[..])], &cfg).unwrap();
        assert_eq!(split, 8 + 2 * 16 * 32 + 4 * (32 + 16)); // bf16 momentum, f32 statistics
        assert_eq!(optimizer_state_bytes([("w", &local[..])], &cfg).unwrap(), 8 + 2 * 16 * 32 + 4 * 16 * 32);
        let mut p = ParamStore::new();
        p.insert("w", Tensor::zeros(local.to_vec(), DType::F32, Device::Cpu).unwrap()).unwrap();
        let shards = std::collections::HashMap::from([(
            "w".to_string(),
            ParamShard { full_dims: full.to_vec(), axis: 0, ranks: 4 },
        )]);
        let opt = OptimizerChain::with_shards(cfg, &p, &shards).unwrap();
        use crate::Optimizer;
        assert_eq!(opt.state_bytes(), split);
    }
}
