//! How each parameter of a tensor-parallel model is split over the `model` mesh axis
//! (Megatron's column and row sharding as ViT-22B applies it, reference §5, design §5).
//!
//! A split parameter is cut along one dimension into *segments* that are each divided evenly
//! over the `n` ranks, and rank `m` keeps the `m`-th part of every segment, concatenated. The
//! segments keep fused projections whole on every rank: the sequential block's qkv weight
//! `[3D, D]` has segments `[D, D, D]` (q, k, v), so each rank holds the q, k and v rows of its
//! own heads; the parallel block's in-projection `[M + 3D, D]` has `[M, D, D, D]`.

use crate::{ModelError, ParamStore, Result};
use vit_tensor::{ops, Tensor};

/// Where one parameter's values live on the ranks of the model axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardSpec {
    /// Every rank holds the whole tensor (norms, row-sharded layers' biases, embeddings, heads).
    Replicated,
    /// Cut along `dim` into `segments` (their sizes, summing to the dimension); each segment is
    /// split into `n` equal parts and rank `m` holds part `m` of each, in segment order.
    Split {
        /// The dimension cut: 0 for column-parallel layers (output features of a `[out, in]`
        /// weight, and their biases), 1 for row-parallel ones (input features).
        dim: usize,
        /// Segment sizes along `dim`.
        segments: Vec<usize>,
    },
}

impl ShardSpec {
    /// `Split` along `dim` into the given segments.
    pub fn split(dim: usize, segments: &[usize]) -> Self {
        ShardSpec::Split { dim, segments: segments.to_vec() }
    }

    /// Checks that `dims` (the whole parameter's shape) can be split over `n` ranks.
    pub fn check(&self, name: &str, dims: &[usize], n: usize) -> Result<()> {
        let ShardSpec::Split { dim, segments } = self else { return Ok(()) };
        let whole: usize = segments.iter().sum();
        if dims.get(*dim) != Some(&whole) {
            return Err(ModelError::Param {
                name: name.into(),
                msg: format!("shape {dims:?} does not have {whole} (segments {segments:?}) along dim {dim}"),
            });
        }
        if let Some(s) = segments.iter().find(|&&s| s % n != 0) {
            return Err(ModelError::Param {
                name: name.into(),
                msg: format!("a segment of {s} along dim {dim} cannot be split evenly over {n} model ranks"),
            });
        }
        Ok(())
    }

    /// Rank `m`'s part of the whole tensor `full`, of `n` ranks.
    pub fn shard(&self, full: &Tensor, m: usize, n: usize) -> Result<Tensor> {
        let ShardSpec::Split { dim, segments } = self else { return Ok(full.clone()) };
        let mut parts = Vec::with_capacity(segments.len());
        let mut start = 0;
        for &s in segments {
            parts.push(ops::slice(full, *dim, start + m * s / n, s / n)?);
            start += s;
        }
        Ok(ops::concat(&parts.iter().collect::<Vec<_>>(), *dim)?)
    }

    /// The whole tensor from every rank's part (`parts[m]` from rank `m`, `n = parts.len()`).
    pub fn unshard(&self, parts: &[Tensor]) -> Result<Tensor> {
        let n = parts.len();
        let ShardSpec::Split { dim, segments } = self else {
            return parts.first().cloned().ok_or_else(|| ModelError::Param {
                name: "unshard".into(),
                msg: "expected the parts of at least one rank".into(),
            });
        };
        let mut pieces = Vec::with_capacity(segments.len() * n);
        let mut offset = 0;
        for &s in segments {
            for part in parts {
                pieces.push(ops::slice(part, *dim, offset, s / n)?);
            }
            offset += s / n;
        }
        Ok(ops::concat(&pieces.iter().collect::<Vec<_>>(), *dim)?)
    }

    /// The shape rank `m` holds of a parameter whose whole shape is `dims`.
    pub fn local_dims(&self, dims: &[usize], n: usize) -> Vec<usize> {
        let mut d = dims.to_vec();
        if let ShardSpec::Split { dim, .. } = self {
            d[*dim] /= n;
        }
        d
    }
}

/// Each parameter's [`ShardSpec`], by name, in the model's parameter order.
#[derive(Debug, Clone, Default)]
pub struct ShardPlan {
    /// `(name, whole shape, spec)`.
    pub params: Vec<(String, Vec<usize>, ShardSpec)>,
    /// Model-axis size.
    pub n: usize,
}

impl ShardPlan {
    /// The spec of `name`.
    pub fn spec(&self, name: &str) -> Result<&ShardSpec> {
        self.params.iter().find(|(n, _, _)| n == name).map(|(_, _, s)| s).ok_or_else(|| ModelError::Param {
            name: name.into(),
            msg: "not a parameter of the tensor-parallel model".into(),
        })
    }

    /// Rank `m`'s parameters from the whole model's (every name of the plan must be in `full`).
    pub fn shard_store(&self, full: &ParamStore, m: usize) -> Result<ParamStore> {
        let mut out = ParamStore::new();
        for (name, _, spec) in &self.params {
            out.insert(name.clone(), spec.shard(full.get(name)?, m, self.n)?)?;
        }
        Ok(out)
    }

    /// The whole model's parameters from every model rank's store (`stores[m]` of rank `m`).
    pub fn unshard_stores(&self, stores: &[&ParamStore]) -> Result<ParamStore> {
        let mut out = ParamStore::new();
        for (name, _, spec) in &self.params {
            let parts = stores.iter().map(|s| s.get(name).cloned()).collect::<std::result::Result<Vec<_>, _>>()?;
            out.insert(name.clone(), spec.unshard(&parts)?)?;
        }
        Ok(out)
    }

    /// Whether `name` is split (its gradient is complete on each rank) rather than
    /// replicated (each rank's gradient is a partial sum unless computed on all tokens).
    pub fn is_split(&self, name: &str) -> bool {
        matches!(self.spec(name), Ok(ShardSpec::Split { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_tensor::{DType, Device};

    #[test]
    fn shards_of_segmented_rows_and_columns_put_back_the_whole() {
        let full = Tensor::randn(vec![12, 6], 0.0, 1.0, 3, DType::F32, Device::Cpu).unwrap();
        let v = full.to_f32_vec().unwrap();
        // Rows in segments [6, 3, 3] over 3 ranks: rank 1 holds rows 2..4, 7, 10.
        let spec = ShardSpec::split(0, &[6, 3, 3]);
        spec.check("w", &[12, 6], 3).unwrap();
        let parts: Vec<Tensor> = (0..3).map(|m| spec.shard(&full, m, 3).unwrap()).collect();
        let want: Vec<f32> = [2, 3, 7, 10].iter().flat_map(|&r| v[r * 6..r * 6 + 6].to_vec()).collect();
        assert_eq!(parts[1].dims(), [4, 6]);
        assert_eq!(parts[1].to_f32_vec().unwrap(), want);
        assert_eq!(spec.unshard(&parts).unwrap().to_f32_vec().unwrap(), v);
        // Columns in one segment over 2 ranks.
        let spec = ShardSpec::split(1, &[6]);
        let parts: Vec<Tensor> = (0..2).map(|m| spec.shard(&full, m, 2).unwrap()).collect();
        assert_eq!(parts[0].dims(), [12, 3]);
        assert_eq!(parts[1].to_f32_vec().unwrap()[..3], v[3..6]);
        assert_eq!(spec.unshard(&parts).unwrap().to_f32_vec().unwrap(), v);
        assert_eq!(spec.local_dims(&[12, 6], 2), vec![12, 3]);
    }

    #[test]
    fn uneven_segments_and_wrong_shapes_are_errors_naming_the_parameter() {
        let e = ShardSpec::split(0, &[6, 3]).check("blocks.0.in_proj.weight", &[9, 4], 2).unwrap_err().to_string();
        assert!(
            e.contains("blocks.0.in_proj.weight") && e.contains("segment of 3") && e.contains("2 model ranks"),
            "{e}"
        );
        let e = ShardSpec::split(1, &[5]).check("w", &[4, 4], 1).unwrap_err().to_string();
        assert!(e.contains("[4, 4]") && e.contains("5"), "{e}");
    }
}
