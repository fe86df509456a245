//! Every optimizer through the `Optimizer` interface: convergence on least squares, bit-for-bit
//! resume through a real checkpoint file, state memory against hand-counted bytes, and the
//! default weight-decay rules over the parameters of real ViT models.

use vit_model::{load_checkpoint, save_checkpoint, Checkpoint, ModelConfig, ParamStore, VisionTransformer};
use vit_optim::{
    optimizer_state_bytes, AdamWConfig, Algorithm, Decay, FactoredAdamConfig, Optimizer, OptimizerChain,
    OptimizerConfig, Schedule, SgdConfig,
};
use vit_tensor::{ops, DType, Device, Tensor};

/// `min ‖X W + b − Y‖² / n` with `X [64, 40]`, `W [40, 36]` (factored by the default rule:
/// both dims ≥ 32), `b [36]`, and `Y` from a random `W*`, `b*`.
struct LeastSquares {
    x: Tensor,
    y: Tensor,
}

impl LeastSquares {
    fn new() -> Self {
        let x = Tensor::randn([64, 40], 0.0, 1.0, 11, DType::F32, Device::Cpu).unwrap();
        let w = Tensor::randn([40, 36], 0.0, 1.0, 12, DType::F32, Device::Cpu).unwrap();
        let b = Tensor::randn([36], 0.0, 1.0, 13, DType::F32, Device::Cpu).unwrap();
        let y = ops::bias_add(&ops::matmul(&x, &w).unwrap(), &b).unwrap();
        LeastSquares { x, y }
    }

    fn init(&self) -> ParamStore {
        let mut p = ParamStore::new();
        p.insert("fc.weight", Tensor::zeros([40, 36], DType::F32, Device::Cpu).unwrap()).unwrap();
        p.insert("fc.bias", Tensor::zeros([36], DType::F32, Device::Cpu).unwrap()).unwrap();
        p
    }

    /// The loss and its gradients (through `matmul_bwd`).
    fn loss_and_grads(&self, p: &ParamStore) -> (f64, ParamStore) {
        let (w, b) = (p.get("fc.weight").unwrap(), p.get("fc.bias").unwrap());
        let r = ops::sub(&ops::bias_add(&ops::matmul(&self.x, w).unwrap(), b).unwrap(), &self.y).unwrap();
        let n = self.x.dims()[0] as f32;
        let loss = r.to_f32_vec().unwrap().iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
        let dr = ops::scale(&r, 2.0 / n).unwrap();
        let (_, dw) = ops::matmul_bwd(&self.x, w, &dr, false, false).unwrap();
        let mut g = p.zeros_like(DType::F32).unwrap();
        g.set("fc.weight", dw).unwrap();
        g.set("fc.bias", ops::bias_add_bwd(&dr).unwrap()).unwrap();
        (loss, g)
    }
}

fn bits(s: &ParamStore) -> Vec<(String, DType, Vec<u32>)> {
    s.iter()
        .map(|(n, t)| {
            let b = match t.dtype() {
                DType::U32 => t.to_vec::<u32>().unwrap(),
                _ => t.to_f32_vec().unwrap().iter().map(|x| x.to_bits()).collect(),
            };
            (n.to_string(), t.dtype(), b)
        })
        .collect()
}

/// The three optimizers with their usual settings (reduced precision state where offered).
fn configs(steps: u64) -> Vec<(&'static str, OptimizerConfig)> {
    let cosine = Schedule::new(Decay::Cosine, steps.min(20) / 2, 0, steps).unwrap();
    let mut factored = OptimizerConfig::scaling_vit(cosine);
    factored.lr = 0.05;
    factored.weight_decay = 0.0;
    let mut adamw =
        OptimizerConfig::new(Algorithm::AdamW(AdamWConfig { m_dtype: DType::BF16, ..Default::default() }), 0.1);
    adamw.schedule = cosine;
    adamw.grad_clip_norm = Some(1e3);
    let mut sgd = OptimizerConfig::new(Algorithm::Sgd(SgdConfig::default()), 0.1);
    sgd.schedule = cosine;
    vec![("factored adam", factored), ("adamw", adamw), ("sgd momentum", sgd)]
}

#[test]
fn every_optimizer_solves_least_squares() {
    let problem = LeastSquares::new();
    let steps = 400;
    for (what, cfg) in configs(steps) {
        let mut p = problem.init();
        let mut opt = OptimizerChain::new(cfg, &p).unwrap();
        let (first, _) = problem.loss_and_grads(&p);
        let mut last = first;
        for _ in 0..steps {
            let (loss, g) = problem.loss_and_grads(&p);
            assert!(loss.is_finite(), "{what}: loss {loss}");
            opt.step(&mut p, &g).unwrap();
            last = loss;
        }
        let (end, _) = problem.loss_and_grads(&p);
        assert!(end < 1e-3 * first, "{what}: loss {first} -> {last} -> {end}");
    }
}

#[test]
fn factored_adam_state_is_factored_on_the_kernel() {
    let problem = LeastSquares::new();
    let p = problem.init();
    let opt = OptimizerChain::new(configs(10).remove(0).1, &p).unwrap();
    let s = opt.state().unwrap();
    let names: Vec<&str> = s.names().collect();
    assert_eq!(names, ["count", "m.fc.weight", "v_row.fc.weight", "v_col.fc.weight", "m.fc.bias", "v.fc.bias"]);
    // [40, 36]: d0 = 0 (40), d1 = 1 (36); v_row drops d0, v_col drops d1.
    assert_eq!(s.get("v_row.fc.weight").unwrap().dims(), &[36]);
    assert_eq!(s.get("v_col.fc.weight").unwrap().dims(), &[40]);
    assert_eq!(s.get("m.fc.weight").unwrap().dtype(), DType::BF16);
    assert_eq!(opt.state_bytes(), 8 + 2 * (40 * 36 + 36) + 4 * (36 + 40 + 36));
}

#[test]
fn higher_rank_kernels_factor_over_their_two_largest_axes() {
    // pos_embed-like [1, 40, 36]: d0 = 1, d1 = 2, and the step equals that of a [40, 36] kernel.
    // A patch-embedding kernel [48, 3, 4, 4] is not factored (second-largest dim 4 < 32).
    let g3 = Tensor::randn([1, 40, 36], 0.0, 1.0, 5, DType::F32, Device::Cpu).unwrap();
    let mut p = ParamStore::new();
    p.insert("pos_embed", Tensor::randn([1, 40, 36], 0.0, 1.0, 6, DType::F32, Device::Cpu).unwrap()).unwrap();
    p.insert("flat.weight", p.get("pos_embed").unwrap().reshape([40, 36]).unwrap()).unwrap();
    p.insert("patch_embed.proj.weight", Tensor::randn([48, 3, 4, 4], 0.0, 1.0, 7, DType::F32, Device::Cpu).unwrap())
        .unwrap();
    let mut g = ParamStore::new();
    g.insert("pos_embed", g3.clone()).unwrap();
    g.insert("flat.weight", g3.reshape([40, 36]).unwrap()).unwrap();
    g.insert("patch_embed.proj.weight", Tensor::randn([48, 3, 4, 4], 0.0, 1.0, 8, DType::F32, Device::Cpu).unwrap())
        .unwrap();
    let mut opt =
        OptimizerChain::new(OptimizerConfig::new(Algorithm::FactoredAdam(Default::default()), 0.1), &p).unwrap();
    let fd = opt.factored("pos_embed").unwrap();
    assert_eq!((fd.d0, fd.d1), (1, 2));
    assert_eq!(opt.factored("patch_embed.proj.weight"), None);
    let s = opt.state().unwrap();
    assert_eq!(s.get("v_row.pos_embed").unwrap().dims(), &[1, 36]);
    assert_eq!(s.get("v_col.pos_embed").unwrap().dims(), &[1, 40]);
    assert_eq!(s.get("v.patch_embed.proj.weight").unwrap().dims(), &[48, 3, 4, 4]);
    for _ in 0..3 {
        opt.step(&mut p, &g).unwrap();
    }
    assert_eq!(p.get("pos_embed").unwrap().to_f32_vec().unwrap(), p.get("flat.weight").unwrap().to_f32_vec().unwrap());
}

#[test]
fn resuming_from_a_checkpoint_is_bit_for_bit() {
    let problem = LeastSquares::new();
    let tmp = tempfile::Builder::new().prefix("vit-optim-resume-").tempdir().unwrap();
    let dir = tmp.path();
    for (what, mut cfg) in configs(8) {
        cfg.weight_decay = 1e-3; // exercise the decay term too
                                 // Never stopping: 8 steps.
        let mut p = problem.init();
        let mut opt = OptimizerChain::new(cfg.clone(), &p).unwrap();
        for _ in 0..8 {
            let g = problem.loss_and_grads(&p).1;
            opt.step(&mut p, &g).unwrap();
        }

        // 3 steps, a checkpoint, a fresh process's worth of objects, 5 more steps.
        let mut q = problem.init();
        let mut first = OptimizerChain::new(cfg.clone(), &q).unwrap();
        for _ in 0..3 {
            let g = problem.loss_and_grads(&q).1;
            first.step(&mut q, &g).unwrap();
        }
        let path = dir.join(format!("{}.safetensors", what.replace(' ', "-")));
        let mut ckpt = Checkpoint::new(ModelConfig::custom(), q.clone());
        ckpt.optimizer = Some(first.state().unwrap());
        ckpt.step = first.count();
        save_checkpoint(&path, &ckpt).unwrap();
        drop((q, first));

        let loaded = load_checkpoint(&path, Device::Cpu).unwrap();
        let mut q = loaded.params;
        let mut second = OptimizerChain::new(cfg, &q).unwrap();
        second.load_state(loaded.optimizer.as_ref().unwrap()).unwrap();
        assert_eq!(second.count(), 3, "{what}");
        for _ in 0..5 {
            let g = problem.loss_and_grads(&q).1;
            second.step(&mut q, &g).unwrap();
        }
        assert_eq!(bits(&q), bits(&p), "{what}: parameters differ after resuming");
        assert_eq!(bits(&second.state().unwrap()), bits(&opt.state().unwrap()), "{what}: state differs");
    }
}

/// Small models covering every parameter kind of the naming contract.
fn small_models() -> Vec<ModelConfig> {
    let mut out = Vec::new();
    for sets in [
        // MAP head, pre-logits, sequential blocks with all biases.
        &["image_size=16", "patch=4", "width=32", "depth=2", "mlp_dim=64", "heads=2", "classes=10", "prelogits=16"][..],
        // Class token, parallel block (in/out projections, mlp_bias), QK-norm, no QKV/LN biases.
        &[
            "image_size=16",
            "patch=4",
            "width=32",
            "depth=2",
            "mlp_dim=64",
            "heads=2",
            "classes=10",
            "pool=tok",
            "block=parallel",
            "qk_norm=true",
            "qkv_bias=false",
            "norm_bias=false",
        ][..],
    ] {
        let mut cfg = ModelConfig::custom();
        for s in sets {
            cfg.set(s).unwrap();
        }
        cfg.validate().unwrap();
        out.push(cfg);
    }
    out
}

#[test]
fn default_weight_decay_rules_over_real_models() {
    for cfg in small_models() {
        let model = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
        let p = model.init_params(0, DType::F32, Device::Cpu).unwrap();
        let opt = OptimizerChain::new(OptimizerConfig::scaling_vit(Schedule::constant()), &p).unwrap();
        let mut seen_norm = false;
        for (name, t) in p.iter() {
            // Kernels are exactly the `*.weight` tensors of rank ≥ 2 (norm scales are vectors;
            // pos_embed, cls_token and the probe are not called weight).
            let want = if name == "head.weight" {
                100.0
            } else if t.rank() >= 2 && name.ends_with(".weight") {
                1.0
            } else {
                0.0
            };
            seen_norm |= name.contains("norm") && name.ends_with(".weight");
            assert_eq!(opt.settings(name).unwrap().wd_mult, want, "{name} {:?}", t.dims());
        }
        assert!(seen_norm);
    }
}

#[test]
fn state_bytes_are_the_hand_counted_numbers() {
    // A small model's worth of parameters; `patch_embed` is frozen (no state at all).
    //   patch_embed.proj.weight [32, 1, 4, 4]  512 (frozen)
    //   pos_embed               [1, 49, 32]   1568
    //   blocks.0.mlp.fc1.weight [64, 32]      2048
    //   blocks.0.mlp.fc1.bias   [64]            64
    //   head.weight             [10, 32]       320
    //   head.bias               [10]            10
    // n = 1568 + 2048 + 64 + 320 + 10 = 4010 trained values; every optimizer adds an 8-byte
    // step counter.
    //
    // Factoring (optax's rule): a tensor of rank >= 2 whose second-largest dim is at least
    // `min_dim_size_to_factor` keeps v_row (without the largest dim) and v_col (without the
    // second largest) instead of a full v. With the default minimum 32:
    //   pos_embed [1, 49, 32]: v_row [1, 32] + v_col [1, 49] = 81 values
    //   fc1.weight [64, 32]:   v_row [32]    + v_col [64]    = 96 values
    //   head.weight [10, 32]:  10 < 32, full v = 320 values
    //   vectors: full v = 64 + 10
    // and with minimum 8 head.weight factors too: v_row [10] + v_col [32] = 42 values.
    let cases = [
        // AdamW: f32 m and f32 v for every trained value: 8 B · 4010 + 8.
        ("adamw", Algorithm::AdamW(AdamWConfig::default()), 8 * 4010 + 8),
        // SGD: one bf16 accumulator per value: 2 B · 4010 + 8.
        ("sgd", Algorithm::Sgd(SgdConfig::default()), 2 * 4010 + 8),
        // SGD without momentum: the step counter only.
        ("sgd, no momentum", Algorithm::Sgd(SgdConfig { momentum: None, ..Default::default() }), 8),
        // Factored Adam: bf16 m (2 B · 4010) + f32 v: 4 B · (81 + 96 + 320 + 64 + 10) = 4 · 571.
        ("factored adam", Algorithm::FactoredAdam(FactoredAdamConfig::default()), 2 * 4010 + 4 * 571 + 8),
        // Factored Adam, min 8, no momentum: 4 B · (81 + 96 + 42 + 64 + 10) = 4 · 293.
        (
            "factored adam, min 8, no momentum",
            Algorithm::FactoredAdam(FactoredAdamConfig {
                min_dim_size_to_factor: 8,
                momentum: None,
                ..Default::default()
            }),
            4 * 293 + 8,
        ),
    ];
    let mut p = ParamStore::new();
    for (name, dims) in [
        ("patch_embed.proj.weight", &[32, 1, 4, 4][..]),
        ("pos_embed", &[1, 49, 32][..]),
        ("blocks.0.mlp.fc1.weight", &[64, 32][..]),
        ("blocks.0.mlp.fc1.bias", &[64][..]),
        ("head.weight", &[10, 32][..]),
        ("head.bias", &[10][..]),
    ] {
        p.insert(name, Tensor::zeros(dims.to_vec(), DType::F32, Device::Cpu).unwrap()).unwrap();
    }
    for (what, algorithm, want) in cases {
        let mut oc = OptimizerConfig::new(algorithm, 1e-3);
        oc.groups = oc.groups.freeze(r"patch_embed\..*");
        let opt = OptimizerChain::new(oc.clone(), &p).unwrap();
        assert_eq!(opt.state_bytes(), want, "{what}: allocated state");
        let shapes = p.iter().map(|(n, t)| (n, t.dims()));
        assert_eq!(optimizer_state_bytes(shapes, &oc).unwrap(), want, "{what}: counted from shapes");
    }
}

#[test]
fn a_small_vit_trains_through_the_interface() {
    let cfg = &small_models()[0];
    let model = VisionTransformer::new(cfg, DType::F32, Device::Cpu).unwrap();
    let mut p = model.init_params(1, DType::F32, Device::Cpu).unwrap();
    let images = Tensor::rand_uniform([8, 3, 16, 16], -1.0, 1.0, 2, DType::F32, Device::Cpu).unwrap();
    let labels = Tensor::from_vec((0..8).map(|i| i % 10).collect::<Vec<i32>>(), [8], Device::Cpu).unwrap();
    let targets = ops::one_hot(&labels, 10, DType::F32).unwrap();
    let mut oc = OptimizerConfig::scaling_vit(Schedule::new(Decay::Rsqrt { timescale: 10 }, 2, 5, 30).unwrap());
    oc.lr = 1e-2;
    let mut opt = OptimizerChain::new(oc, &p).unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let (logits, saved) = model.forward(&p, &images).unwrap();
        let loss = ops::softmax_cross_entropy_fwd(&logits, &targets).unwrap();
        losses.push(ops::sum_all(&loss).unwrap().to_scalar().unwrap() / 8.0);
        let dloss = Tensor::full(1.0 / 8.0, [8], DType::F32, Device::Cpu).unwrap();
        let dlogits = ops::softmax_cross_entropy_bwd(&logits, &targets, &dloss).unwrap();
        let mut g = p.zeros_like(DType::F32).unwrap();
        model.backward(&p, &saved, &dlogits, &mut g).unwrap();
        let info = opt.step(&mut p, &g).unwrap();
        assert!(info.grad_norm.is_finite());
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.5 * first, "losses {losses:?}");
}

/// The CPU's in-place AdamW (f32 parameters, gradients and moments: every slot updated in one
/// pass, in parallel) gives the bits of the general path, which f16 gradients take (they are
/// widened to f32 copies first). The gradients are rounded to f16 values so both see the same
/// numbers; clipping is on, with a norm that clips, and two parameter groups differ in decay.
#[test]
fn in_place_adamw_equals_the_general_path_bit_for_bit() {
    let ls = LeastSquares::new();
    let cfg = || {
        let mut c = OptimizerConfig::new(Algorithm::AdamW(AdamWConfig::default()), 0.05);
        c.weight_decay = 0.1;
        c.grad_clip_norm = Some(0.5);
        c
    };
    let (mut p_fast, mut p_general) = (ls.init(), ls.init());
    let mut fast = OptimizerChain::new(cfg(), &p_fast).unwrap();
    let mut general = OptimizerChain::new(cfg(), &p_general).unwrap();
    for step in 0..5 {
        let (_, g) = ls.loss_and_grads(&p_fast);
        let g_f16 = g.cast(DType::F16).unwrap();
        let g_f32 = g_f16.cast(DType::F32).unwrap();
        let a = fast.step(&mut p_fast, &g_f32).unwrap();
        let b = general.step(&mut p_general, &g_f16).unwrap();
        assert!(a.clipped, "step {step}: the test wants clipping on");
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "step {step}");
        assert_eq!(bits(&p_fast), bits(&p_general), "parameters after step {step}");
        assert_eq!(bits(&fast.state().unwrap()), bits(&general.state().unwrap()), "state after step {step}");
    }
}
