//! Parameter counts against reference.md §1 (Scaling ViT Table 2, ViT-22B, the ViT-H/14
//! and ViT-e/14 papers). Where the paper number is rounded, the exact count is written out
//! and checked to round to the paper's figure.

use vit_model::{ModelConfig, ParamBreakdown, ParamCounts};

fn preset(name: &str) -> ModelConfig {
    ModelConfig::preset(name).unwrap()
}

fn counts(cfg: &ModelConfig) -> ParamCounts {
    ParamCounts::of(cfg).unwrap()
}

/// `count` rounded to the nearest multiple of `unit`, in units.
fn round(count: u64, unit: u64) -> u64 {
    (count + unit / 2) / unit
}

#[test]
fn standard_block_formula() {
    // 4D² + 2DM + 9D + M for a pre-LN block with all biases.
    for (name, d, m) in [("Ti/16", 192u64, 768u64), ("B/16", 768, 3072), ("e/14", 1792, 15360)] {
        let b = ParamBreakdown::of(&preset(name)).unwrap();
        assert_eq!(b.block, 4 * d * d + 2 * d * m + 9 * d + m, "{name}");
    }
}

#[test]
fn b16_blocks() {
    let b = ParamBreakdown::of(&preset("B/16")).unwrap();
    assert_eq!(b.block, 7_087_872);
    assert_eq!(b.blocks, 12 * 7_087_872);
    assert_eq!(b.blocks, 85_054_464);
}

#[test]
fn g14_and_giant_g14_one_block() {
    assert_eq!(ParamBreakdown::of(&preset("G/14")).unwrap().block, 38_361_728);
    assert_eq!(ParamBreakdown::of(&preset("g/14")).unwrap().block, 25_250_176);
}

#[test]
fn ti16_encoder_5_5m() {
    let encoder = counts(&preset("Ti/16")).encoder;
    assert_eq!(encoder, 5_524_032);
    assert_eq!(round(encoder, 100_000), 55); // 5.5M
}

#[test]
fn s16_encoder_21_665m() {
    let encoder = counts(&preset("S/16")).encoder;
    assert_eq!(encoder, 21_664_896);
    assert_eq!(round(encoder, 1000), 21_665);
}

#[test]
fn s32_encoder_22_493m() {
    let encoder = counts(&preset("S/32")).encoder;
    assert_eq!(encoder, 22_493_184);
    assert_eq!(round(encoder, 1000), 22_493);
}

#[test]
fn b16_encoder_85_797m() {
    let encoder = counts(&preset("B/16")).encoder;
    assert_eq!(encoder, 85_797_120);
    assert_eq!(round(encoder, 1000), 85_797);
}

#[test]
fn b32_encoder_87_454m() {
    let encoder = counts(&preset("B/32")).encoder;
    assert_eq!(encoder, 87_453_696);
    assert_eq!(round(encoder, 1000), 87_454);
}

#[test]
fn l16_encoder_303_300m() {
    let encoder = counts(&preset("L/16")).encoder;
    assert_eq!(encoder, 303_299_584);
    assert_eq!(round(encoder, 1000), 303_300);
}

#[test]
fn h14_with_class_token_and_head_632_046m() {
    // Counted with a class token, (N+1) position embeddings and a 1000-class head.
    let mut cfg = preset("H/14");
    cfg.set("pool=tok").unwrap();
    assert_eq!(cfg.classes, 1000);
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(b.pos_embed, 257 * 1280);
    assert_eq!(b.cls_token, 1280);
    assert_eq!(b.classifier, 1280 * 1000 + 1000);
    assert_eq!(b.map_head, 0);
    assert_eq!(b.counts.total, 632_045_800);
    assert_eq!(round(b.counts.total, 1000), 632_046);
}

#[test]
fn giant_g14_encoder_1011_200m() {
    let encoder = counts(&preset("g/14")).encoder;
    assert_eq!(encoder, 1_011_199_616);
    assert_eq!(round(encoder, 1000), 1_011_200);
}

#[test]
fn gigantic_g14_encoder_1842_772m() {
    let encoder = counts(&preset("G/14")).encoder;
    assert_eq!(encoder, 1_842_772_352);
    assert_eq!(round(encoder, 1000), 1_842_772);
}

#[test]
fn e14_with_map_head_and_jft_head_3926_403m() {
    // Encoder + MAP head + 29,593-class head.
    let mut cfg = preset("e/14");
    cfg.set("classes=29593").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    let (d, m) = (1792u64, 15360u64);
    assert_eq!(b.map_head, d + (4 * d * d + 4 * d) + 2 * d + (2 * d * m + m + d));
    assert_eq!(b.counts.encoder, 3_805_417_728);
    assert_eq!(b.counts.total, 3_926_402_969);
    assert_eq!(round(b.counts.total, 1000), 3_926_403);
}

#[test]
fn vit22b_matmul_21_743_27m() {
    let cfg = preset("22B/14");
    let (d, l) = (6144u64, 48u64);
    let c = counts(&cfg);
    // 12·L·D² holds because M = 4D, so 4D² + 2DM = 12D².
    assert_eq!(cfg.mlp_dim, 4 * cfg.width);
    assert_eq!(c.matmul, 12 * l * d * d);
    assert_eq!(c.matmul, 21_743_271_936);
    assert_eq!(round(c.matmul, 10_000), 2_174_327); // 21,743.27M
}

#[test]
fn vit22b_block_has_no_qkv_or_norm_biases() {
    let (d, m, dh) = (6144u64, 24576u64, 128u64);
    let b = ParamBreakdown::of(&preset("22B/14")).unwrap();
    // Fused in-proj D×(3D+M) + M (MLP hidden bias), fused out-proj (D+M)×D + D,
    // one LayerNorm scale D, QK-norm scales for q and k 2·dh.
    assert_eq!(b.block, d * (3 * d + m) + m + (d + m) * d + d + d + 2 * dh);
    assert_eq!(b.block, 453_021_952);
    assert_eq!(b.final_norm, d);
}

#[test]
fn vit22b_map_head_keeps_its_attention_biases() {
    // qkv_bias = false and norm_bias = false are block settings; the MAP head's attention
    // has q, k, v and out biases (big_vision MAPHead, timm AttentionPoolLatent), its
    // LayerNorm follows norm_bias.
    let (d, m) = (6144u64, 24576u64);
    let b = ParamBreakdown::of(&preset("22B/14")).unwrap();
    assert_eq!(b.map_head, d + (4 * d * d + 4 * d) + d + (2 * d * m + m + d));
    assert_eq!(b.map_head, 453_052_416);
    assert_eq!(b.counts.total, 22_209_448_936);
}

#[test]
fn matmul_excludes_biases_and_norms() {
    let c = counts(&preset("B/16"));
    assert_eq!(c.matmul, 12 * (4 * 768 * 768 + 2 * 768 * 3072));
}

#[test]
fn bias_and_norm_switches() {
    let d = 768u64;
    let base = ParamBreakdown::of(&preset("B/16")).unwrap();

    let mut cfg = preset("B/16");
    cfg.set("qkv_bias=false").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(base.block - b.block, 3 * d);
    assert_eq!(b.map_head, base.map_head, "the MAP head's attention keeps its q, k, v biases");

    let mut cfg = preset("B/16");
    cfg.set("norm_bias=false").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(base.block - b.block, 2 * d, "two LayerNorms per sequential block");
    assert_eq!(base.final_norm - b.final_norm, d);
    assert_eq!(base.map_head - b.map_head, d);

    let mut cfg = preset("B/16");
    cfg.set("qk_norm=true").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(b.block - base.block, 4 * 64, "q and k norms, scale and bias, dh = 64");
    cfg.set("norm_bias=false").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(b.block + 2 * d - base.block, 2 * 64);
}

#[test]
fn parallel_block_with_all_biases() {
    // One LayerNorm (not two) and one fused output bias (not two): D + D fewer than the
    // sequential block's 4D² + 2DM + 9D + M.
    let (d, m) = (768u64, 3072u64);
    let mut cfg = preset("B/16");
    cfg.set("block=parallel").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(b.block, 4 * d * d + 2 * d * m + 6 * d + m);
    assert_eq!(counts(&cfg).matmul, counts(&preset("B/16")).matmul);
}

#[test]
fn pooling_position_embedding_and_heads() {
    let (d, n) = (768u64, 196u64);
    let mut cfg = preset("B/16");
    cfg.set("pool=gap").unwrap();
    let gap = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(gap.pos_embed, n * d);
    assert_eq!(gap.cls_token + gap.map_head, 0);
    assert_eq!(gap.counts.total, gap.counts.encoder + d * 1000 + 1000);

    cfg.set("posemb=sincos2d").unwrap();
    assert_eq!(ParamBreakdown::of(&cfg).unwrap().pos_embed, 0);
    cfg.set("pool=tok").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!((b.pos_embed, b.cls_token), (0, d));

    cfg.set("prelogits=512").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(b.pre_logits, d * 512 + 512);
    assert_eq!(b.classifier, 512 * 1000 + 1000);

    cfg.set("classes=0").unwrap();
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(b.classifier, 0);
    assert_eq!(b.pre_logits, d * 512 + 512);
}

#[test]
fn patch_embedding_uses_channels() {
    let mut cfg = preset("B/16");
    cfg.set("channels=1").unwrap();
    assert_eq!(ParamBreakdown::of(&cfg).unwrap().patch_embed, 16 * 16 * 768 + 768);
}

#[test]
fn param_shapes_list_every_parameter_without_allocating_them() {
    use vit_model::VisionTransformer;
    use vit_tensor::{DType, Device};
    for name in ModelConfig::preset_names() {
        let cfg = ModelConfig::preset(name).unwrap();
        let shapes = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap().param_shapes().unwrap();
        let total: u64 = shapes.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        assert_eq!(total, ParamCounts::of(&cfg).unwrap().total, "{name}");
    }
    let mut cfg = ModelConfig::custom();
    cfg.set("depth=2").unwrap();
    let m = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
    let p = m.init_params(0, DType::F32, Device::Cpu).unwrap();
    let listed: Vec<(String, Vec<usize>)> = p.iter().map(|(n, t)| (n.to_string(), t.dims().to_vec())).collect();
    assert_eq!(m.param_shapes().unwrap(), listed);
}

/// The V-MoE presets against reference §4 ("V-MoE MoE block = attention 4D²+4D + LNs 4D +
/// E·(2DM+M+D) + router D·E"): class token (N+1 position embeddings), every-2, E = 32, k = 2.
fn vmoe_total(d: u64, l: u64, m: u64, p: u64, classes: u64, e: u64, prelogits: Option<u64>) -> (u64, u64) {
    let n = (224 / p) * (224 / p);
    let mlp = 2 * d * m + m + d;
    let dense = 4 * d * d + 2 * d * m + 9 * d + m;
    let moe = 4 * d * d + 4 * d + 4 * d + e * mlp + d * e;
    let moe_blocks = l / 2;
    let mut total = (l - moe_blocks) * dense + moe_blocks * moe + p * p * 3 * d + d + (n + 1) * d + d + 2 * d;
    let feature = match prelogits {
        Some(w) => {
            total += d * w + w;
            w
        }
        None => d,
    };
    total += feature * classes + classes;
    (total, total - moe_blocks * (e - 2) * mlp)
}

#[test]
fn vmoe_15b_is_14_705_071_769() {
    let c = counts(&preset("V-MoE-15B"));
    assert_eq!(c.total, 14_705_071_769);
    assert_eq!((c.total, c.active_per_token), vmoe_total(1408, 48, 6400, 14, 29_593, 32, None));
    assert_eq!(c.active_per_token, 1_723_322_009);
}

#[test]
fn vmoe_b16_with_32_experts_and_the_jft_head_is_978_974_835() {
    let mut cfg = preset("V-MoE-B/16");
    for s in ["moe.experts=32", "classes=18291", "prelogits=768"] {
        cfg.set(s).unwrap();
    }
    assert_eq!(counts(&cfg).total, 978_974_835);
    assert_eq!(round(counts(&cfg).total, 100_000), 9790); // 979.0M
    let b = ParamBreakdown::of(&cfg).unwrap();
    assert_eq!(b.moe_blocks, 6);
    assert_eq!(b.moe_block, 4 * 768 * 768 + 8 * 768 + 32 * (2 * 768 * 3072 + 3072 + 768) + 768 * 32);
    cfg.set("moe=none").unwrap();
    let dense = counts(&cfg);
    assert_eq!(dense.total, 100_455_027);
    assert_eq!(dense.active_per_token, dense.total);
}

#[test]
fn every_vmoe_preset_follows_the_moe_block_formula() {
    for (name, d, l, m, p) in [
        ("V-MoE-S/32", 384, 12, 1536, 32),
        ("V-MoE-B/32", 768, 12, 3072, 32),
        ("V-MoE-B/16", 768, 12, 3072, 16),
        ("V-MoE-L/16", 1024, 24, 4096, 16),
        ("V-MoE-H/14", 1280, 32, 5120, 14),
    ] {
        let cfg = preset(name);
        assert_eq!(cfg.pool, vit_model::Pool::Tok, "{name}");
        let moe = cfg.moe.clone().unwrap();
        assert_eq!((moe.experts, moe.k, moe.capacity, moe.every, moe.bpr), (32, 2, 1.05, 2, true), "{name}");
        let c = counts(&cfg);
        assert_eq!((c.total, c.active_per_token), vmoe_total(d, l, m, p, 1000, 32, None), "{name}");
        let b = ParamBreakdown::of(&cfg).unwrap();
        let sum = b.patch_embed
            + b.pos_embed
            + b.cls_token
            + b.blocks
            + b.final_norm
            + b.map_head
            + b.pre_logits
            + b.classifier;
        assert_eq!(sum, c.total, "{name}: pieces");
    }
    // Spelling is case-insensitive; the presets are listed.
    assert_eq!(preset("v-moe-b/16"), preset("V-MoE-B/16"));
    assert!(ModelConfig::preset_names().contains(&"V-MoE-15B"));
}

#[test]
fn vmoe_b16_flops_count_the_router_and_every_capacity_slot() {
    let cfg = preset("V-MoE-B/16");
    // 197 tokens, 8 images per group: capacity ceil(1576·2·1.05/32) = 104 → 32·104/8 = 416
    // expert slots per image instead of 197 tokens through one MLP, plus the router.
    let (d, m, n) = (768f64, 3072f64, 197f64);
    let per_moe_block = 2.0 * n * d * 32.0 + 2.0 * (416.0 - n) * 2.0 * d * m;
    let extra = cfg.forward_flops_per_image() - cfg.dense_forward_flops_per_image();
    assert!((extra - 6.0 * per_moe_block).abs() < 1.0, "{extra}");
    let mut dense = cfg.clone();
    dense.moe = None;
    assert_eq!(dense.forward_flops_per_image(), cfg.dense_forward_flops_per_image());
}
