//! timm (PyTorch) Vision Transformer state dicts → vitrs parameters.
//!
//! vitrs keeps timm's names and `[out, in]` layouts, so most tensors copy by name: the MAP
//! head's `attn_pool.*` among them, its `q.bias` and `kv.bias` included (timm's
//! `AttentionPoolLatent` has them even in `qkv_bias=False` models, and so does vitrs). The
//! differences:
//! - timm's `ParallelScalingBlock` has separate `attn_out_proj` and `mlp_out_proj` by default;
//!   vitrs fuses them into one `(D + M) → D` projection: the weights concatenate along the
//!   input dim (attention first, as timm's fused variant), the biases add.
//! - timm's `global_pool="avg"` normalises after pooling (`fc_norm`) unless built with
//!   `fc_norm=False`; vitrs's GAP follows big_vision (final norm, then mean), so a state dict
//!   with `fc_norm.*` is refused with that explanation.

use crate::{ModelError, ParamDiff, ParamStore, Result, VisionTransformer};
use std::collections::BTreeMap;
use vit_tensor::{ops, DType, Device, Tensor};

/// Maps a timm state dict onto `model`'s parameters (f32, on `device`). Every expected
/// parameter must be present with its shape and nothing may be left over; all differences are
/// reported together ([`ModelError::ParamMismatch`]).
pub fn params_from_timm(model: &VisionTransformer, timm: Vec<(String, Tensor)>, device: Device) -> Result<ParamStore> {
    let mut src: BTreeMap<String, Tensor> = timm.into_iter().collect();
    if src.keys().any(|k| k.starts_with("fc_norm.")) {
        return Err(ModelError::Param {
            name: "fc_norm".into(),
            msg: "timm normalises after average pooling; vitrs's gap pools after the final norm (big_vision). \
                  Build the timm model with fc_norm=False"
                .into(),
        });
    }
    fuse_parallel_out_proj(&mut src)?;
    let mut found = ParamStore::new();
    for (name, t) in src {
        let t = if t.dtype().is_float() { t.cast(DType::F32)? } else { t };
        found.insert(name, t)?;
    }
    // Names, shapes and dtypes to match, from a freshly described model (values are discarded).
    let expected = model.init_params(0, DType::F32, Device::Cpu)?;
    let diff = ParamDiff::between(&expected, &found);
    if !diff.is_empty() {
        return Err(ModelError::ParamMismatch { what: "timm state dict".into(), diff });
    }
    let mut out = ParamStore::new();
    for name in expected.names() {
        out.insert(name, found.get(name)?.to_device(device)?)?;
    }
    Ok(out)
}

/// Replaces `blocks.i.{attn,mlp}_out_proj.*` by the fused `blocks.i.out_proj.*`.
fn fuse_parallel_out_proj(src: &mut BTreeMap<String, Tensor>) -> Result<()> {
    let blocks: Vec<String> =
        src.keys().filter_map(|k| k.strip_suffix(".attn_out_proj.weight").map(str::to_string)).collect();
    for b in blocks {
        let take = |src: &mut BTreeMap<String, Tensor>, n: &str| {
            src.remove(&format!("{b}.{n}")).ok_or_else(|| ModelError::Param {
                name: format!("{b}.{n}"),
                msg: "missing from the timm state dict".into(),
            })
        };
        let (wa, wm) = (take(src, "attn_out_proj.weight")?, take(src, "mlp_out_proj.weight")?);
        src.insert(format!("{b}.out_proj.weight"), ops::concat(&[&wa, &wm], 1)?);
        match (src.remove(&format!("{b}.attn_out_proj.bias")), src.remove(&format!("{b}.mlp_out_proj.bias"))) {
            (Some(ba), Some(bm)) => {
                src.insert(format!("{b}.out_proj.bias"), ops::add(&ba, &bm)?);
            }
            (None, None) => {}
            _ => {
                return Err(ModelError::Param {
                    name: format!("{b}.out_proj.bias"),
                    msg: "timm has a bias on only one of attn_out_proj and mlp_out_proj".into(),
                })
            }
        }
    }
    Ok(())
}
