//! Model FLOPs of a ViT: the multiply-adds of its matrix products (×2) and of attention's two
//! `N × N` products, per image. Elementwise work (norms, GELU, softmax) is left out, as in the
//! usual MFU convention (PaLM appendix B; reference §7), so MFU = model FLOPs/s over the peak.

use crate::config::{ModelConfig, Pool};

impl ModelConfig {
    /// Tokens the encoder sees: the patches, plus the class token with `pool = "tok"`.
    pub fn tokens(&self) -> usize {
        let side = self.image_size / self.patch.max(1);
        side * side + usize::from(self.pool == Pool::Tok)
    }

    /// Forward FLOPs for one image: patch embedding (with a conv stem, its convolutions'
    /// `2·positions·9·in·out` and the 1×1 projection), every block (q, k, v and output
    /// projections, the two MLP matmuls, `softmax(qkᵀ)·v` as `4·N²·D`), the MAP head's
    /// attention and MLP, the pre-logits layer and the classifier. The same for the
    /// sequential and the parallel block (the same matmuls, fused differently).
    ///
    /// A V-MoE block replaces the MLP's `2·N·2DM` by its router, `2·N·D·E`, and its experts'
    /// matmuls over every slot of their buffers, `2·slots·2DM`, where the slots per image are
    /// `E · capacity(group of group_size images) / group_size` (≈ k·C·N: the padding of empty
    /// slots is computed too).
    pub fn forward_flops_per_image(&self) -> f64 {
        self.forward_flops_keeping(self.num_patches())
    }

    /// [`ModelConfig::forward_flops_per_image`] of a training pass under PatchDropout that keeps
    /// `kept` patch tokens per image: the patch projection, the blocks and the head see `kept`
    /// tokens (and the class token); a conv stem still runs on the whole image.
    pub fn forward_flops_keeping(&self, kept: usize) -> f64 {
        let n = (kept + usize::from(self.pool == Pool::Tok)) as f64;
        let (d, m) = (self.width as f64, self.mlp_dim as f64);
        let projected = kept as f64;
        let embed = match self.stem.last() {
            Some(&last) => {
                let (mut cin, mut side, mut convs) = (self.channels as f64, self.image_size as f64, 0.0);
                for &cout in &self.stem {
                    side = (side / 2.0).ceil();
                    convs += 2.0 * side * side * 9.0 * cin * cout as f64;
                    cin = cout as f64;
                }
                convs + 2.0 * projected * last as f64 * d
            }
            None => {
                let k = self.patch_window().kernel as f64;
                2.0 * projected * self.channels as f64 * k * k * d
            }
        };
        let block = 2.0 * n * d * (4.0 * d + 2.0 * m) + 4.0 * n * n * d;
        let moe = self.moe.as_ref().map_or(0.0, |moe| {
            let g = moe.group_size.max(1);
            let slots = (moe.experts * moe.capacity_for(g * n as usize)) as f64 / g as f64;
            let moe_block =
                block - 2.0 * n * 2.0 * d * m + 2.0 * n * d * moe.experts as f64 + 2.0 * slots * 2.0 * d * m;
            moe.moe_blocks(self.depth).len() as f64 * (moe_block - block)
        });
        let head_in = match self.pool {
            // One probe query: q and output projections on 1 token, k and v on N, attention
            // 1 × N, then the MLP on 1 token.
            Pool::Map => 2.0 * d * d * 2.0 + 2.0 * n * d * 2.0 * d + 4.0 * n * d + 2.0 * d * m * 2.0,
            Pool::Tok | Pool::Gap => 0.0,
        };
        let feature = self.prelogits.unwrap_or(self.width) as f64;
        let prelogits = self.prelogits.map_or(0.0, |p| 2.0 * d * p as f64);
        let classifier = 2.0 * feature * self.classes as f64;
        embed + self.depth as f64 * block + moe + head_in + prelogits + classifier
    }

    /// [`ModelConfig::forward_flops_per_image`] of the dense twin: the same model with every
    /// MoE MLP a dense one (`moe = none`).
    pub fn dense_forward_flops_per_image(&self) -> f64 {
        ModelConfig { moe: None, ..self.clone() }.forward_flops_per_image()
    }

    /// Model FLOPs of one training step per image: forward and backward, counted as 3× the
    /// forward (the backward's two products per forward product). Recomputation under `remat`
    /// is not model work and is not counted.
    pub fn train_flops_per_image(&self) -> f64 {
        3.0 * self.forward_flops_per_image()
    }
}

#[cfg(test)]
mod tests {
    use crate::{ModelConfig, Pool};

    #[test]
    fn vit_b16_with_a_class_token_is_17_6_gmacs() {
        // ViT-B/16 at 224 with a class token: 17.56 GMACs forward (timm and the ViT paper's
        // tables quote 17.6), i.e. 35.13 GFLOPs.
        let mut cfg = ModelConfig::preset("B/16").unwrap();
        cfg.pool = Pool::Tok;
        assert_eq!(cfg.tokens(), 197);
        let f = cfg.forward_flops_per_image();
        assert!((f / 2.0 / 1e9 - 17.56).abs() < 0.01, "{} GMACs", f / 2e9);
        assert_eq!(cfg.train_flops_per_image(), 3.0 * f);
    }

    #[test]
    fn patch_dropout_cuts_the_blocks_and_the_projections_flops() {
        let mut cfg = ModelConfig::preset("B/16").unwrap();
        cfg.pool = Pool::Tok;
        assert_eq!(cfg.forward_flops_keeping(196), cfg.forward_flops_per_image());
        let (d, m) = (768.0, 3072.0);
        let block = |n: f64| 2.0 * n * d * (4.0 * d + 2.0 * m) + 4.0 * n * n * d;
        let saved = cfg.forward_flops_per_image() - cfg.forward_flops_keeping(98);
        let projection = 2.0 * 98.0 * (3.0 * 16.0 * 16.0) * d;
        assert!((saved - 12.0 * (block(197.0) - block(99.0)) - projection).abs() < 1.0, "{saved}");
    }

    #[test]
    fn a_conv_stem_counts_its_convolutions_and_the_1x1_projection() {
        let mut plain = ModelConfig::custom();
        for s in ["image_size=28", "patch=4", "channels=1", "width=64", "heads=4"] {
            plain.set(s).unwrap();
        }
        let mut stem = plain.clone();
        stem.set("stem=[16, 32]").unwrap();
        stem.validate().unwrap();
        // 28 -> 14 (1 -> 16 channels) -> 7 (16 -> 32), then 49 tokens of 32 -> 64; the plain
        // embedding is 49 patches of 16 pixels -> 64.
        let convs = 2.0 * 196.0 * 9.0 * 16.0 + 2.0 * 49.0 * 9.0 * 16.0 * 32.0;
        let diff = stem.forward_flops_per_image() - plain.forward_flops_per_image();
        assert!((diff - (convs + 2.0 * 49.0 * (32.0 - 16.0) * 64.0)).abs() < 1e-6, "{diff}");
        // PatchDropout leaves the stem whole; the projection runs on the 12 kept tokens.
        let diff = stem.forward_flops_keeping(12) - plain.forward_flops_keeping(12);
        assert!((diff - (convs + 2.0 * 12.0 * (32.0 - 16.0) * 64.0)).abs() < 1e-6, "{diff}");
    }

    #[test]
    fn overlapping_patches_count_their_whole_windows() {
        let mut plain = ModelConfig::custom();
        for s in ["image_size=28", "patch=4", "channels=1", "width=64", "heads=4"] {
            plain.set(s).unwrap();
        }
        let mut wide = plain.clone();
        wide.set("patch_kernel=8").unwrap();
        wide.validate().unwrap();
        // 49 windows of 8x8 pixels -> 64, against 49 patches of 4x4.
        let diff = wide.forward_flops_per_image() - plain.forward_flops_per_image();
        assert!((diff - 2.0 * 49.0 * (64.0 - 16.0) * 64.0).abs() < 1e-6, "{diff}");
        let diff = wide.forward_flops_keeping(12) - plain.forward_flops_keeping(12);
        assert!((diff - 2.0 * 12.0 * (64.0 - 16.0) * 64.0).abs() < 1e-6, "{diff}");
    }

    #[test]
    fn flops_grow_with_depth_and_the_map_head_adds_its_attention() {
        let b = ModelConfig::preset("B/16").unwrap();
        let mut deeper = b.clone();
        deeper.depth += 1;
        let per_block = 2.0 * 196.0 * 768.0 * (4.0 * 768.0 + 2.0 * 3072.0) + 4.0 * 196.0 * 196.0 * 768.0;
        assert!((deeper.forward_flops_per_image() - b.forward_flops_per_image() - per_block).abs() < 1.0);
        let mut gap = b.clone();
        gap.pool = Pool::Gap;
        let map_head =
            2.0 * 768.0 * 768.0 * 2.0 + 2.0 * 196.0 * 768.0 * 1536.0 + 4.0 * 196.0 * 768.0 + 2.0 * 768.0 * 3072.0 * 2.0;
        assert!((b.forward_flops_per_image() - gap.forward_flops_per_image() - map_head).abs() < 1.0);
    }
}
