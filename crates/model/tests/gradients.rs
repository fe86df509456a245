//! The whole model against finite differences, in every combination of pool × block ×
//! qk_norm × biases (issue 3), and its parameters against the closed-form counts.

mod common;

use common::randomised;

use vit_model::{
    layers::{
        patch_dropout::{self, PatchDrop},
        Embedding,
    },
    BlockKind, ModelConfig, ParamCounts, Pool, PosEmb, VisionTransformer,
};
use vit_tensor::{
    ops,
    testing::{assert_close, check_gradient},
    DType, Device, Tensor,
};

const CPU: Device = Device::Cpu;

fn tiny(pool: Pool, block: BlockKind, qk_norm: bool, bias: bool) -> ModelConfig {
    let mut c = ModelConfig::custom();
    for s in ["image_size=8", "patch=4", "channels=2", "width=8", "depth=2", "mlp_dim=12", "heads=2", "classes=3"] {
        c.set(s).unwrap();
    }
    c.pool = pool;
    c.block = block;
    c.qk_norm = qk_norm;
    c.qkv_bias = bias;
    c.norm_bias = bias;
    c
}

/// Checks the gradient of every parameter tensor (sampled) and of the images.
fn check_model(cfg: &ModelConfig, what: &str) {
    check_model_keeping(cfg, None, what)
}

/// [`check_model`] of a training pass that keeps `patch_keep` patch tokens per image
/// (PatchDropout; the same seed, so the same tokens, in every evaluation).
fn check_model_keeping(cfg: &ModelConfig, patch_keep: Option<usize>, what: &str) {
    let model = VisionTransformer::new(cfg, DType::F32, CPU).unwrap();
    let forward = |p: &vit_model::ParamStore, x: &Tensor| match patch_keep {
        Some(keep) => {
            model.forward_train_with(p, x, 11, Some(PatchDrop { keep, seed: 11, first_image: 0 }), None).unwrap()
        }
        None => model.forward(p, x).unwrap(),
    };
    let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 100);
    assert_eq!(p.numel() as u64, ParamCounts::of(cfg).unwrap().total, "{what}: parameter count");
    let images =
        Tensor::randn([2, cfg.channels, cfg.image_size, cfg.image_size], 0.0, 1.0, 7, DType::F32, CPU).unwrap();
    let (out, saved) = forward(&p, &images);
    let r = Tensor::randn(out.shape().clone(), 0.0, 1.0, 8, DType::F32, CPU).unwrap();
    let mut g = p.zeros_like(DType::F32).unwrap();
    let dimages = model.backward(&p, &saved, &r, &mut g).unwrap();
    check_gradient(&format!("{what}: images"), |x| Ok(forward(&p, x).0), &images, &r, &dimages, 1e-2, 3e-3, 12)
        .unwrap();
    for (name, t) in p.iter() {
        let f = |x: &Tensor| {
            let mut q = p.clone();
            q.set(name, x.clone()).unwrap();
            Ok(forward(&q, &images).0)
        };
        // Step 5e-3: at 1e-2 the O(h²) truncation error of central differences reaches the
        // tolerance on some parameters of these random models (a LayerNorm scale of the
        // parallel block: 0.0042 at h = 1e-2, 0.0011 at 5e-3, 0.0001 at 2.5e-3).
        check_gradient(&format!("{what}: {name}"), f, t, &r, g.get(name).unwrap(), 5e-3, 3e-3, 6).unwrap();
    }
}

#[test]
fn every_pool_block_qk_norm_and_bias_combination_matches_finite_differences() {
    for pool in [Pool::Tok, Pool::Gap, Pool::Map] {
        for block in [BlockKind::Sequential, BlockKind::Parallel] {
            for qk_norm in [false, true] {
                for bias in [false, true] {
                    let cfg = tiny(pool, block, qk_norm, bias);
                    check_model(&cfg, &format!("{pool:?} {block:?} qk_norm={qk_norm} bias={bias}"));
                }
            }
        }
    }
}

#[test]
fn sincos_posemb_prelogits_erf_and_headless_models_match_finite_differences() {
    let mut c = tiny(Pool::Tok, BlockKind::Sequential, false, true);
    c.posemb = PosEmb::Sincos2d;
    c.prelogits = Some(5);
    c.set("gelu=erf").unwrap();
    check_model(&c, "sincos + prelogits + erf");
    let mut c = tiny(Pool::Map, BlockKind::Parallel, true, false);
    c.classes = 0;
    check_model(&c, "no classifier");
}

#[test]
fn patch_dropout_matches_finite_differences_with_every_pool() {
    for pool in [Pool::Tok, Pool::Gap, Pool::Map] {
        let mut c = tiny(pool, BlockKind::Sequential, false, true);
        c.set("image_size=12").unwrap(); // 9 patches, 4 kept
        check_model_keeping(&c, Some(4), &format!("patch dropout, {pool:?}"));
    }
}

#[test]
fn conv_stems_match_finite_differences() {
    // Two channels (the channels-last permute), one channel (a reshape), with and without norm
    // biases, a class token and PatchDropout after the stem.
    for (channels, bias, pool, keep) in
        [(2, true, Pool::Gap, None), (1, false, Pool::Tok, None), (2, true, Pool::Map, Some(2))]
    {
        let mut c = tiny(pool, BlockKind::Sequential, false, bias);
        c.set(&format!("channels={channels}")).unwrap();
        c.set("stem=[3, 5]").unwrap();
        c.validate().unwrap();
        check_model_keeping(
            &c,
            keep,
            &format!("stem [3, 5], {channels} channels, bias={bias}, {pool:?}, keep {keep:?}"),
        );
    }
}

#[test]
fn overlapping_patches_match_finite_differences() {
    // Two channels (the kernel's permute), one channel (a reshape), windows of 6 and 8 pixels
    // (padding 1 and 2), a class token and PatchDropout after the projection.
    for (channels, kernel, pool, keep) in [(2, 8, Pool::Gap, None), (1, 6, Pool::Tok, None), (2, 6, Pool::Map, Some(2))]
    {
        let mut c = tiny(pool, BlockKind::Sequential, false, true);
        c.set(&format!("channels={channels}")).unwrap();
        c.set(&format!("patch_kernel={kernel}")).unwrap();
        c.validate().unwrap();
        check_model_keeping(&c, keep, &format!("patch_kernel {kernel}, {channels} channels, {pool:?}, keep {keep:?}"));
    }
}

#[test]
fn overlapping_patches_with_a_kernel_zero_outside_the_patch_are_the_plain_projection() {
    // The stored layout [D, C, k, k]: the plain model's kernel placed at the window's centre
    // (offset (k - p) / 2) gives the same tokens, for several channels.
    for channels in [1, 3] {
        let mut plain = tiny(Pool::Gap, BlockKind::Sequential, false, true);
        plain.set(&format!("channels={channels}")).unwrap();
        let mut wide = plain.clone();
        wide.set("patch_kernel=8").unwrap();
        wide.validate().unwrap();
        let (pm, wm) = (
            VisionTransformer::new(&plain, DType::F32, CPU).unwrap(),
            VisionTransformer::new(&wide, DType::F32, CPU).unwrap(),
        );
        let p = randomised(&pm.init_params(0, DType::F32, CPU).unwrap(), 3);
        let mut q = randomised(&wm.init_params(0, DType::F32, CPU).unwrap(), 3);
        let w = p.get("patch_embed.proj.weight").unwrap();
        let (d, pp) = (w.dims()[0], 4);
        let small = w.to_f32_vec().unwrap();
        let mut big = vec![0.0f32; d * channels * 8 * 8];
        for o in 0..d * channels {
            for y in 0..pp {
                for x in 0..pp {
                    big[(o * 8 + y + 2) * 8 + x + 2] = small[(o * pp + y) * pp + x];
                }
            }
        }
        for (name, t) in p.iter() {
            let t = match name {
                "patch_embed.proj.weight" => {
                    Tensor::from_f32(big.clone(), [d, channels, 8, 8], DType::F32, CPU).unwrap()
                }
                _ => t.clone(),
            };
            q.set(name, t).unwrap();
        }
        let images = Tensor::randn([2, channels, 8, 8], 0.0, 1.0, 4, DType::F32, CPU).unwrap();
        let a = pm.forward(&p, &images).unwrap().0.to_f32_vec().unwrap();
        let b = wm.forward(&q, &images).unwrap().0.to_f32_vec().unwrap();
        assert_close(&format!("{channels} channels"), &b, &a, 1e-5, 1e-5);
    }
}

#[test]
fn patch_dropout_keeping_every_patch_is_the_plain_forward_and_a_drop_changes_the_output() {
    let mut c = tiny(Pool::Tok, BlockKind::Parallel, true, false);
    c.set("image_size=12").unwrap();
    let model = VisionTransformer::new(&c, DType::F32, CPU).unwrap();
    let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 5);
    let images = Tensor::randn([3, 2, 12, 12], 0.0, 1.0, 4, DType::F32, CPU).unwrap();
    let keeping =
        |keep| model.forward_train_with(&p, &images, 1, Some(PatchDrop { keep, seed: 1, first_image: 0 }), None);
    let plain = common::values(&model.forward(&p, &images).unwrap().0);
    let all = common::values(&keeping(9).unwrap().0);
    assert_eq!(plain, all, "keeping all 9 patches (in order) is the plain pass");
    let some = common::values(&keeping(5).unwrap().0);
    assert_ne!(plain, some);
    assert_eq!(some, common::values(&keeping(5).unwrap().0), "the same seed keeps the same tokens");
    for bad in [0, 10] {
        let e = keeping(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("{bad} of the 9 patch tokens")), "{e}");
    }
}

#[test]
fn projecting_only_the_kept_patches_gives_the_kept_tokens_of_the_whole_embedding() {
    // Embedding::forward_kept against the whole embedding followed by PatchDropout's gather,
    // forward and backward: plain, overlapping and stem patches, with and without a class token.
    for (extra, pool) in [("image_size=12", Pool::Tok), ("patch_kernel=8", Pool::Gap), ("stem=[3, 5]", Pool::Map)] {
        let mut c = tiny(pool, BlockKind::Sequential, false, true);
        c.set("image_size=16").unwrap(); // 16 patches of 4 = 2^2 pixels
        c.set(extra).unwrap();
        c.validate().unwrap();
        let model = VisionTransformer::new(&c, DType::F32, CPU).unwrap();
        let embed = Embedding::new(&c, DType::F32, CPU).unwrap();
        let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 9);
        let (b, n, side) = (3, c.num_patches(), c.image_size);
        let images = Tensor::randn([b, 2, side, side], 0.0, 1.0, 4, DType::F32, CPU).unwrap();
        let drop = PatchDrop { keep: n / 3, seed: 5, first_image: 2 };
        let prefix = usize::from(pool == Pool::Tok);
        let rows = patch_dropout::kept_patch_rows(b, n, &drop, CPU).unwrap();
        let (whole, ws) = embed.forward(&p, &images).unwrap();
        let (kept, ks) = embed.forward_kept(&p, &images, Some(&rows)).unwrap();
        let (whole_kept, wk) = patch_dropout::drop_tokens(&whole, prefix, &drop).unwrap();
        let (kept_kept, kk) = patch_dropout::drop_tokens(&kept, prefix, &drop).unwrap();
        let what = format!("{extra:?} {pool:?}");
        // Equal up to rounding: the projection's matmul has fewer rows, so it may block differently.
        assert_close(&what, &common::values(&kept_kept), &common::values(&whole_kept), 1e-5, 1e-5);
        // A gradient on the kept tokens only, as the blocks give it.
        let dy = Tensor::randn(kept_kept.shape().clone(), 0.0, 1.0, 6, DType::F32, CPU).unwrap();
        let (mut gw, mut gk) = (p.zeros_like(DType::F32).unwrap(), p.zeros_like(DType::F32).unwrap());
        let dw = embed.backward(&p, &ws, &patch_dropout::restore(&dy, &wk).unwrap(), &mut gw).unwrap();
        let dk = embed.backward(&p, &ks, &patch_dropout::restore(&dy, &kk).unwrap(), &mut gk).unwrap();
        assert_close(&format!("{what}: images"), &common::values(&dk), &common::values(&dw), 1e-5, 1e-5);
        for (name, t) in gw.iter() {
            let k = common::values(gk.get(name).unwrap());
            assert_close(&format!("{what}: {name}"), &k, &common::values(t), 1e-5, 1e-5);
        }
    }
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    for block in [BlockKind::Sequential, BlockKind::Parallel] {
        let cfg = tiny(Pool::Gap, block, true, true);
        let mut remat = cfg.clone();
        remat.remat = true;
        let (m, mr) = (
            VisionTransformer::new(&cfg, DType::F32, CPU).unwrap(),
            VisionTransformer::new(&remat, DType::F32, CPU).unwrap(),
        );
        let p = randomised(&m.init_params(0, DType::F32, CPU).unwrap(), 1);
        let images = Tensor::randn([3, 2, 8, 8], 0.0, 1.0, 2, DType::F32, CPU).unwrap();
        let r = Tensor::randn([3, 3], 0.0, 1.0, 3, DType::F32, CPU).unwrap();
        let grads = |model: &VisionTransformer| {
            let (_, s) = model.forward(&p, &images).unwrap();
            let mut g = p.zeros_like(DType::F32).unwrap();
            model.backward(&p, &s, &r, &mut g).unwrap();
            g
        };
        let (g, gr) = (grads(&m), grads(&mr));
        for (name, t) in g.iter() {
            assert_eq!(t.to_f32_vec().unwrap(), gr.get(name).unwrap().to_f32_vec().unwrap(), "{block:?} {name}");
        }
    }
}

#[test]
fn gradients_accumulate_across_micro_batches() {
    let cfg = tiny(Pool::Map, BlockKind::Sequential, false, true);
    let m = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let p = randomised(&m.init_params(0, DType::F32, CPU).unwrap(), 4);
    let images = Tensor::randn([4, 2, 8, 8], 0.0, 1.0, 5, DType::F32, CPU).unwrap();
    let r = Tensor::randn([4, 3], 0.0, 1.0, 6, DType::F32, CPU).unwrap();
    let mut whole = p.zeros_like(DType::F32).unwrap();
    let (_, s) = m.forward(&p, &images).unwrap();
    m.backward(&p, &s, &r, &mut whole).unwrap();
    let mut halves = p.zeros_like(DType::F32).unwrap();
    for h in 0..2 {
        let (_, s) = m.forward(&p, &images.narrow(2 * h, 2).unwrap()).unwrap();
        m.backward(&p, &s, &r.narrow(2 * h, 2).unwrap(), &mut halves).unwrap();
    }
    for (name, t) in whole.iter() {
        let (a, b) = (t.to_f32_vec().unwrap(), halves.get(name).unwrap().to_f32_vec().unwrap());
        vit_tensor::testing::assert_close(name, &b, &a, 1e-4, 1e-5);
    }
}

#[test]
fn predict_equals_forward_and_features_feed_the_head() {
    let mut cfg = tiny(Pool::Gap, BlockKind::Parallel, true, false);
    cfg.prelogits = Some(6);
    let m = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let p = randomised(&m.init_params(0, DType::F32, CPU).unwrap(), 9);
    let images = Tensor::randn([2, 2, 8, 8], 0.0, 1.0, 10, DType::F32, CPU).unwrap();
    let (out, saved) = m.forward(&p, &images).unwrap();
    let (features, logits) = m.features_and_logits(&p, &images).unwrap();
    assert_eq!(out.to_f32_vec().unwrap(), logits.to_f32_vec().unwrap());
    assert_eq!(saved.features().to_f32_vec().unwrap(), features.to_f32_vec().unwrap());
    assert_eq!(features.dims(), &[2, 6]);
    let head = ops::bias_add(
        &ops::matmul_t(&features, p.get("head.weight").unwrap(), false, true).unwrap(),
        p.get("head.bias").unwrap(),
    )
    .unwrap();
    assert_eq!(head.to_f32_vec().unwrap(), logits.to_f32_vec().unwrap());
}

/// `backward_notify` names every parameter once, from the head back to the embedding, and a
/// gradient named ready already has its final value (a data-parallel trainer reduces it then).
#[test]
fn backward_notify_names_each_gradient_once_when_it_is_final() {
    for block in [BlockKind::Sequential, BlockKind::Parallel] {
        let mut cfg = tiny(Pool::Map, block, true, true);
        cfg.remat = block == BlockKind::Parallel;
        if block == BlockKind::Parallel {
            cfg.set("stem=[3, 5]").unwrap(); // the stem's parameters belong to the embedding stage
        }
        let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
        let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 300);
        let images = Tensor::randn([2, 2, 8, 8], 0.0, 1.0, 9, DType::F32, CPU).unwrap();
        let (out, saved) = model.forward(&p, &images).unwrap();
        let dout = Tensor::randn(out.shape().clone(), 0.0, 1.0, 10, DType::F32, CPU).unwrap();
        let mut g = p.zeros_like(DType::F32).unwrap();
        let mut seen: Vec<(String, Vec<f32>)> = Vec::new();
        model
            .backward_notify(&p, &saved, &dout, 1.0, &mut g, &mut |g, names| {
                for n in names {
                    seen.push((n.clone(), g.get(n).unwrap().to_f32_vec().unwrap()));
                }
            })
            .unwrap();
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        let mut all: Vec<&str> = p.names().collect();
        all.sort();
        assert_eq!(sorted, all, "{block:?}: every parameter named once");
        // The last stage (final norm, pooling, head) first, the embedding last, and the blocks
        // in between from the last to the first.
        let stage = |n: &str| match n.split('.').next().unwrap() {
            "norm" | "attn_pool" | "head" => 0,
            "blocks" => 1,
            _ => 2,
        };
        assert!(names.windows(2).all(|w| stage(w[0]) <= stage(w[1])), "{names:?}");
        assert_eq!(stage(names.last().unwrap()), 2, "{names:?}");
        let first_of = |b: &str| names.iter().position(|n| n.starts_with(b)).unwrap();
        assert!(first_of("blocks.1.") < first_of("blocks.0."), "{names:?}");
        for (n, at_notify) in &seen {
            assert_eq!(
                at_notify,
                &g.get(n).unwrap().to_f32_vec().unwrap(),
                "{block:?}: {n} changed after it was ready"
            );
        }
        assert!(seen.iter().any(|(_, v)| v.iter().any(|&x| x != 0.0)));
    }
}
