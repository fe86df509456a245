//! Parameter counts computed from a [`ModelConfig`] alone, with no tensors allocated (a
//! 22B-parameter model is counted in nanoseconds), following reference.md §1.
//!
//! With D = width, L = depth, M = mlp_dim, p = patch, C = channels, N = (image_size/p)²
//! patch tokens, dh = D/heads, K = classes and P = prelogits:
//!
//! | piece | parameters |
//! |---|---|
//! | patch embedding (conv p×p, stride p, bias) | p²·C·D + D (k²·C·D + D with `patch_kernel` k) |
//! | learned position embedding | N·D, or (N+1)·D with `pool = "tok"` (the class token has its own) |
//! | sincos2d position embedding | 0 |
//! | class token (`tok`) | D |
//! | LayerNorm | 2D, or D without `norm_bias` |
//! | sequential block | q,k,v 3D² (+3D `qkv_bias`) + out D²+D + MLP 2DM+M+D + 2 LayerNorms |
//! | parallel block | in-proj D·(3D+M) (+3D `qkv_bias`) + M, out-proj (D+M)·D + D, 1 LayerNorm |
//! | QK-norm (per block) | 2·dh, or 4·dh with `norm_bias` (q and k, shared across heads) |
//! | final LayerNorm | as LayerNorm |
//! | MAP head | probe D + attention 4D² + 4D (q, k, v and out biases always) + LayerNorm + MLP 2DM+M+D |
//! | pre-logits | D·P + P |
//! | classifier | D·K + K, or P·K + K after pre-logits; 0 with K = 0 |
//!
//! | MoE block (V-MoE, E experts) | the sequential block with E MLPs 2DM+M+D instead of one, plus the router D·E (no bias) |
//!
//! A sequential block with all biases has 4D² + 2DM + 9D + M parameters; a V-MoE block
//! 4D² + 4D + 4D + E·(2DM+M+D) + D·E (reference §4). In the parallel
//! block the attention and MLP output projections are one fused (D+M)→D matmul with one
//! D-bias, so it has one D-bias fewer than two separate projections would; the MLP's
//! hidden bias M is kept in the fused in-projection. `norm_bias` applies to the MAP head too;
//! `qkv_bias` and `qk_norm` apply to the encoder blocks only: the MAP head's attention always
//! has its q, k, v biases (big_vision's `MAPHead`, timm's `AttentionPoolLatent`).

use serde::Serialize;

use crate::config::{BlockKind, ModelConfig, Pool, PosEmb};
use crate::error::{ModelError, Result};

/// The three parameter counts that `vit params` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ParamCounts {
    /// Every parameter of the model as configured (embeddings, class token, blocks, final
    /// norm, head).
    pub total: u64,
    /// Patch embedding + position embedding + blocks + final LayerNorm: the "encoder only"
    /// convention of Scaling ViT (Zhai et al. 2022), Table 2. Excludes the class token,
    /// the MAP head, pre-logits and the classifier.
    pub encoder: u64,
    /// Weights of the blocks' matrix multiplications only, L·(4D² + 2DM), no biases or
    /// norms: the convention of ViT-22B (12·L·D² when M = 4D). A MoE block counts its E
    /// experts' kernels and its router.
    pub matmul: u64,
    /// Parameters one token passes through: `total` less the experts it is not routed to,
    /// (E − k)·(2DM+M+D) per MoE block. Equal to `total` for a dense model.
    pub active_per_token: u64,
}

impl ParamCounts {
    /// Validates `cfg` and counts its parameters. Fails only for an invalid config.
    pub fn of(cfg: &ModelConfig) -> Result<Self> {
        Ok(ParamBreakdown::of(cfg)?.counts)
    }
}

/// Parameter counts per piece of the model, plus the [`ParamCounts`] totals.
/// Pieces a config does not have count 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ParamBreakdown {
    /// Patch embedding: p²·C·D kernel (k²·C·D with `patch_kernel` k) + D bias; with a conv stem, its convolutions
    /// (`9·in·out` each) and norms, then the 1×1 projection `stem.last()·D + D`.
    pub patch_embed: u64,
    /// Learned position embedding: N·D, or (N+1)·D with a class token; 0 for sincos2d.
    pub pos_embed: u64,
    /// Class token: D with `pool = "tok"`.
    pub cls_token: u64,
    /// One encoder block (a dense one, in a V-MoE).
    pub block: u64,
    /// One MoE block (V-MoE); 0 without MoE.
    pub moe_block: u64,
    /// The number of MoE blocks.
    pub moe_blocks: u64,
    /// All L encoder blocks.
    pub blocks: u64,
    /// Final LayerNorm: 2D, or D without bias.
    pub final_norm: u64,
    /// MAP head (probe, attention, LayerNorm, MLP) with `pool = "map"`.
    pub map_head: u64,
    /// Pre-logits dense layer: D·P + P.
    pub pre_logits: u64,
    /// Classifier: F·K + K with F = P or D.
    pub classifier: u64,
    /// The totals.
    pub counts: ParamCounts,
}

impl ParamBreakdown {
    /// Validates `cfg` and counts its parameters piece by piece.
    pub fn of(cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        Self::count(cfg)
    }

    /// Counts without validating first, with overflow checks. Used by `validate`, which
    /// has already checked that every size is nonzero and divisible as needed.
    pub(crate) fn count(cfg: &ModelConfig) -> Result<Self> {
        count(cfg).ok_or(ModelError::Overflow { what: "the parameter count" })
    }
}

/// A u64 count whose arithmetic stops at overflow (as `None`) instead of wrapping or
/// panicking, so the formulas read as plain algebra.
#[derive(Clone, Copy)]
struct C(Option<u64>);

fn c(n: usize) -> C {
    C(u64::try_from(n).ok())
}

fn when(cond: bool, n: C) -> C {
    if cond {
        n
    } else {
        C(Some(0))
    }
}

impl std::ops::Add for C {
    type Output = C;
    fn add(self, rhs: C) -> C {
        C(self.0.zip(rhs.0).and_then(|(a, b)| a.checked_add(b)))
    }
}

impl std::ops::Mul for C {
    type Output = C;
    fn mul(self, rhs: C) -> C {
        C(self.0.zip(rhs.0).and_then(|(a, b)| a.checked_mul(b)))
    }
}

fn count(cfg: &ModelConfig) -> Option<ParamBreakdown> {
    let zero = c(0);
    let one = c(1);
    let d = c(cfg.width);
    let m = c(cfg.mlp_dim);
    let k = c(cfg.classes);
    let grid = c(cfg.image_size.checked_div(cfg.patch)?);
    let n = grid * grid;
    let dh = c(cfg.width.checked_div(cfg.heads)?);
    let tok = cfg.pool == Pool::Tok;

    // A LayerNorm over `dim` features: scale, plus offset with `norm_bias`.
    let norm = |dim: C| dim + when(cfg.norm_bias, dim);
    let qkv_bias = when(cfg.qkv_bias, c(3) * d);
    let mlp = c(2) * d * m + m + d; // Dense(D→M) and Dense(M→D), with biases
    let attn = c(4) * d * d + qkv_bias + d; // q, k, v, out kernels; out bias always
    let map_attn = c(4) * d * d + c(4) * d; // the MAP head's attention: every bias, always

    let patch_embed = match cfg.stem.last() {
        Some(&last) => {
            let ins = std::iter::once(cfg.channels).chain(cfg.stem.iter().copied());
            let convs =
                ins.zip(&cfg.stem).fold(zero, |sum, (cin, &cout)| sum + c(9) * c(cin) * c(cout) + norm(c(cout)));
            convs + c(last) * d + d
        }
        None => {
            let p = c(cfg.patch_window().kernel); // p, or patch_kernel
            p * p * c(cfg.channels) * d + d
        }
    };
    let pos_embed = match cfg.posemb {
        PosEmb::Learn => (n + when(tok, one)) * d,
        PosEmb::Sincos2d => zero,
    };
    let cls_token = when(tok, d);
    let qk_norm = when(cfg.qk_norm, c(2) * norm(dh));
    let block = match cfg.block {
        BlockKind::Sequential => attn + mlp + c(2) * norm(d) + qk_norm,
        BlockKind::Parallel => {
            let in_proj = d * (c(3) * d + m) + qkv_bias + m;
            let out_proj = (d + m) * d + d;
            in_proj + out_proj + norm(d) + qk_norm
        }
    };
    let (moe_block, moe_blocks, expert_matmul, inactive) = match &cfg.moe {
        Some(moe) => {
            let e = c(moe.experts);
            let router = d * e;
            let moe_block = attn + c(2) * norm(d) + qk_norm + e * mlp + router;
            let n = c(moe.moe_blocks(cfg.depth).len());
            let inactive = n * c(moe.experts.checked_sub(moe.k)?) * mlp;
            (moe_block, n, e * c(2) * d * m + router, inactive)
        }
        None => (zero, zero, zero, zero),
    };
    let dense_blocks = C(c(cfg.depth).0.zip(moe_blocks.0).and_then(|(a, b)| a.checked_sub(b)));
    let blocks = dense_blocks * block + moe_blocks * moe_block;
    let final_norm = norm(d);
    let map_head = when(cfg.pool == Pool::Map, d + map_attn + norm(d) + mlp);
    let (pre_logits, feature) = match cfg.prelogits {
        Some(width) => (d * c(width) + c(width), c(width)),
        None => (zero, d),
    };
    let classifier = when(cfg.classes > 0, feature * k + k);

    let encoder = patch_embed + pos_embed + blocks + final_norm;
    let total = encoder + cls_token + map_head + pre_logits + classifier;
    let matmul = dense_blocks * (c(4) * d * d + c(2) * d * m) + moe_blocks * (c(4) * d * d + expert_matmul);
    let active = C(total.0.zip(inactive.0).and_then(|(a, b)| a.checked_sub(b)));
    Some(ParamBreakdown {
        patch_embed: patch_embed.0?,
        pos_embed: pos_embed.0?,
        cls_token: cls_token.0?,
        block: block.0?,
        moe_block: moe_block.0?,
        moe_blocks: moe_blocks.0?,
        blocks: blocks.0?,
        final_norm: final_norm.0?,
        map_head: map_head.0?,
        pre_logits: pre_logits.0?,
        classifier: classifier.0?,
        counts: ParamCounts { total: total.0?, encoder: encoder.0?, matmul: matmul.0?, active_per_token: active.0? },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_config_is_an_error_not_a_panic() {
        let mut cfg = ModelConfig::custom();
        cfg.set("width=4294967296").unwrap();
        cfg.set("heads=1").unwrap();
        cfg.set("mlp_dim=4294967296").unwrap();
        let err = ParamCounts::of(&cfg).unwrap_err();
        assert!(matches!(err, ModelError::Overflow { .. }), "{err}");
    }

    #[test]
    fn pieces_sum_to_total() {
        for name in ModelConfig::preset_names() {
            let b = ParamBreakdown::of(&ModelConfig::preset(name).unwrap()).unwrap();
            let sum = b.patch_embed
                + b.pos_embed
                + b.cls_token
                + b.blocks
                + b.final_norm
                + b.map_head
                + b.pre_logits
                + b.classifier;
            assert_eq!(sum, b.counts.total, "{name}");
        }
    }
}
