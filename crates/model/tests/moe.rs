//! V-MoE (issue 11): routing checked by hand on tiny inputs (capacity rounding, overflow, BPR
//! order, k-major slots, fully dropped tokens), the MoE layer against a per-token reference,
//! finite-difference gradients of the layer's input and every parameter through the combine
//! weights and both auxiliary losses, a whole tiny V-MoE, and bad configs as one-line errors.

use vit_model::{
    layers::{
        routing::{capacity, cv_squared},
        GroupRoute, Init, Initializer, MoeMlp,
    },
    ModelConfig, MoeConfig, ParamCounts, ParamStore, Pool, VisionTransformer,
};
use vit_tensor::{ops::Gelu, testing::assert_close, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

fn randn(dims: &[usize], std: f32, seed: u64) -> Tensor {
    Tensor::randn(dims.to_vec(), 0.0, std, seed, DType::F32, CPU).unwrap()
}

/// Every parameter replaced by random values (identical experts would hide index mix-ups).
fn randomised(p: &ParamStore, std: f32, seed: u64) -> ParamStore {
    let mut out = ParamStore::new();
    for (i, (name, t)) in p.iter().enumerate() {
        out.insert(name, randn(t.dims(), std, seed + i as u64)).unwrap();
    }
    out
}

/// Central differences of the scalar `f` at `samples` positions of `x`, against `analytic`:
/// `|analytic − numeric| ≤ tol · max|numeric|`, and the gradient must not vanish (so the
/// check can fail).
fn fd_check(what: &str, f: impl Fn(&Tensor) -> f64, x: &Tensor, analytic: &Tensor, h: f32, tol: f32, samples: usize) {
    assert_eq!(analytic.dims(), x.dims(), "{what}: gradient shape");
    let base = x.to_f32_vec().unwrap();
    let grad = analytic.to_f32_vec().unwrap();
    let n = base.len();
    let step = (n / samples).max(1);
    let mut checked = Vec::new();
    let mut i = (n / 7) % step;
    while i < n && checked.len() < samples {
        let at = |d: f32| {
            let mut v = base.clone();
            v[i] += d;
            f(&Tensor::from_vec(v, x.shape().clone(), CPU).unwrap())
        };
        checked.push((i, ((at(h) - at(-h)) / (2.0 * h as f64)) as f32));
        i += step;
    }
    let scale = checked.iter().map(|(_, g)| g.abs()).fold(0f32, f32::max);
    assert!(scale > 1e-6, "{what}: the gradient vanishes at every sampled position; the check would prove nothing");
    for (i, numeric) in checked {
        let diff = (grad[i] - numeric).abs();
        assert!(
            diff <= tol * scale,
            "{what}: element {i}: analytic {} vs finite difference {numeric} (|diff| {diff} > {tol} x {scale})",
            grad[i]
        );
    }
}

fn route(logits: &[f32], e: usize, k: usize, cap: usize, bpr: bool) -> GroupRoute {
    GroupRoute::new(logits, e, None, k, cap, bpr)
}

#[test]
fn capacity_is_ceil_of_tokens_k_c_over_e_rounded_up_to_4() {
    assert_eq!(capacity(16, 2, 1.05, 8), 8); // ceil(4.2) = 5 -> 8
    assert_eq!(capacity(10, 1, 1.0, 4), 4); // ceil(2.5) = 3 -> 4
    assert_eq!(capacity(32, 2, 1.0, 8), 8); // 8 exactly
    assert_eq!(capacity(33, 2, 1.0, 8), 12); // ceil(8.25) = 9 -> 12
    assert_eq!(capacity(1, 1, 0.01, 32), 4); // at least 1 -> 4
                                             // V-MoE-B/16 at 224 with a class token, 8 images per group: ceil(1576·2·1.05/32) = 104.
    assert_eq!(capacity(8 * 197, 2, 1.05, 32), 104);
    assert_eq!(capacity(8 * 197, 2, 0.5, 32), 52); // ceil(49.25) = 50 -> 52
    let moe = MoeConfig { experts: 8, k: 2, capacity: 1.05, ..MoeConfig::default() };
    assert_eq!(moe.capacity_for(16), 8);
}

/// Four tokens, three experts, k = 2, two slots per expert. Gates (softmax of the logits):
/// t0 [2,1,0] → e0 then e1; t1 [0,3,1] → e1, e2; t2 [4,0,1] → e0, e2; t3 [5,0,0] → e0, then
/// e1 (a tie with e2: the lower index). Top-1 gates: t3 0.987 > t2 0.936 > t1 0.844 > t0 0.665.
const LOGITS: [f32; 12] = [2., 1., 0., 0., 3., 1., 4., 0., 1., 5., 0., 0.];

#[test]
fn vanilla_routing_fills_slots_in_token_order_and_drops_the_overflow() {
    let r = route(&LOGITS, 3, 2, 2, false);
    assert_eq!(r.choice, vec![0, 1, 1, 2, 0, 2, 0, 1]);
    assert_eq!(r.order, vec![0, 1, 2, 3]);
    // First choices: t0→e0#0, t1→e1#0, t2→e0#1, t3→e0 full. Second: t0→e1#1, t1→e2#0,
    // t2→e2#1, t3→e1 full. t3 lost both: it gets nothing from the layer.
    assert_eq!(r.slot, vec![0, 1, 0, 0, 1, 1, -1, -1]);
    assert_eq!(r.dropped(), 2);
    assert_eq!((r.weight(3, 0), r.weight(3, 1)), (0.0, 0.0));
    // Combine weights are the softmax values, not renormalised over the top k.
    let e2 = 2f32.exp();
    assert!((r.weight(0, 0) - e2 / (e2 + 1f32.exp() + 1.0)).abs() < 1e-6);
    assert!((r.weight(0, 1) - 1f32.exp() / (e2 + 1f32.exp() + 1.0)).abs() < 1e-6);
    assert_eq!(r.routed_per_expert(), vec![3, 3, 2]);
}

#[test]
fn batch_priority_routing_serves_the_most_confident_tokens_first() {
    let r = route(&LOGITS, 3, 2, 2, true);
    assert_eq!(r.order, vec![3, 2, 1, 0]);
    // First choices in BPR order: t3→e0#0, t2→e0#1, t1→e1#0, t0→e0 full. Second: t3→e1#1,
    // t2→e2#0, t1→e2#1, t0→e1 full. Now t0, the least confident, is the one dropped.
    assert_eq!(r.slot, vec![-1, -1, 0, 1, 1, 0, 0, 1]);
    assert_eq!(r.dropped(), 2);
    assert_eq!((r.weight(0, 0), r.weight(0, 1)), (0.0, 0.0));
    assert!(r.weight(3, 0) > 0.98);
}

#[test]
fn every_first_choice_is_placed_before_any_second_choice() {
    // Two tokens that want each other's expert second, one slot each: k-major placement gives
    // both their first choice and drops both second choices (token-major would give t0 both
    // experts and drop t1 entirely).
    let r = route(&[1., 0., 0., 1.], 2, 2, 1, false);
    assert_eq!(r.choice, vec![0, 1, 1, 0]);
    assert_eq!(r.slot, vec![0, -1, 0, -1]);
    // With room, slots are numbered in k-major order: t0→e0#0, t1→e1#0, t2→e0#1, then the
    // second choices t0→e1#1, t1→e0#2, t2→e1#2.
    let r = route(&[1., 0., 0., 1., 2., 0.], 2, 2, 4, false);
    assert_eq!(r.slot, vec![0, 1, 0, 2, 1, 2]); // token-major: [0, 0, 1, 1, 2, 2]
}

#[test]
fn auxiliary_losses_follow_their_formulas() {
    assert_eq!(cv_squared(&[1.0, 3.0]).0, 0.25); // var 1, mean 2
    assert_eq!(cv_squared(&[2.0, 2.0, 2.0]).0, 0.0);
    let r = route(&LOGITS, 3, 2, 2, false);
    let mut imp = [0f64; 3];
    for t in 0..4 {
        let row = &LOGITS[3 * t..3 * t + 3];
        let z: f64 = row.iter().map(|v| (*v as f64).exp()).sum();
        for e in 0..3 {
            imp[e] += (row[e] as f64).exp() / z;
        }
    }
    let mean = imp.iter().sum::<f64>() / 3.0;
    let var = imp.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0;
    assert!((r.importance_loss as f64 - var / mean / mean).abs() < 1e-6);
    assert_eq!(r.load_loss, None, "no load loss without noise");
    // With noise σ: load_e = mean_t (1 − Φ((thr_t − z_te)/σ)), thr_t = the 2nd largest noisy logit.
    let noise = [0.5f32, -1.0, 0.2, 0.0, 0.3, -0.4, 1.0, 0.1, 0.0, -0.2, 0.6, 0.9];
    let sigma = 0.5f32;
    let r = GroupRoute::new(&LOGITS, 3, Some((&noise, sigma)), 2, 2, false);
    // Computed independently with Python's math.erfc: load = [0.763362, 0.512037, 0.374534].
    assert!((r.load_loss.unwrap() as f64 - 0.085_684_943_58).abs() < 1e-6, "{:?}", r.load_loss);
}

fn moe_cfg(experts: usize, k: usize, cap: f64, group: usize, bpr: bool) -> MoeConfig {
    MoeConfig { experts, k, capacity: cap, group_size: group, bpr, ..MoeConfig::default() }
}

fn layer(cfg: &MoeConfig, d: usize, m: usize, seed: u64) -> (MoeMlp, ParamStore) {
    let l = MoeMlp::new("moe", d, m, cfg, Gelu::Tanh);
    let mut sink = Initializer { init: Init { seed, dtype: DType::F32, device: CPU }, store: ParamStore::new() };
    l.init(&mut sink).unwrap();
    (l, sink.store)
}

#[test]
fn experts_start_from_the_same_initialisation() {
    let (_, p) = layer(&moe_cfg(4, 2, 1.0, 1, true), 6, 10, 3);
    for name in ["moe.experts.fc1.weight", "moe.experts.fc1.bias", "moe.experts.fc2.weight", "moe.experts.fc2.bias"] {
        let t = p.get(name).unwrap();
        let v = t.to_f32_vec().unwrap();
        let per = v.len() / 4;
        assert!(v[..per].iter().any(|x| *x != 0.0), "{name}");
        for e in 1..4 {
            assert_eq!(&v[e * per..(e + 1) * per], &v[..per], "{name}: expert {e}");
        }
    }
    assert_eq!(p.get("moe.router.weight").unwrap().dims(), &[4, 6]);
}

/// The layer's output computed token by token from the routes: `Σ_j w_tj · MLP_e(x_t)`.
fn reference_output(l: &MoeMlp, p: &ParamStore, x: &Tensor, noise_seed: Option<u64>) -> Vec<f32> {
    let (b, t, d) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let (e, k, m) = (l.cfg.experts, l.cfg.k, l.hidden);
    let xv = x.to_f32_vec().unwrap();
    let get = |n: &str| p.get(n).unwrap().to_f32_vec().unwrap();
    let (wr, w1, b1, w2, b2) =
        (get(&l.router), get(&l.fc1_weight), get(&l.fc1_bias), get(&l.fc2_weight), get(&l.fc2_bias));
    let logits: Vec<f32> = (0..b * t)
        .flat_map(|s| (0..e).map(move |x| (s, x)))
        .map(|(s, ex)| (0..d).map(|i| xv[s * d + i] * wr[ex * d + i]).sum())
        .collect();
    let noise = noise_seed.map(|seed| randn(&[b * t, e], 1.0, seed).to_f32_vec().unwrap());
    let sigma = (l.cfg.noise / e as f64) as f32;
    let gelu = |u: f32| 0.5 * u * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (u + 0.044715 * u * u * u)).tanh());
    let mut y = vec![0f32; b * t * d];
    let g = l.cfg.group_size;
    for first in (0..b).step_by(g) {
        let imgs = g.min(b - first);
        let (lo, hi) = (first * t, (first + imgs) * t);
        let n = noise.as_ref().map(|n| (&n[lo * e..hi * e], sigma));
        let r = GroupRoute::new(&logits[lo * e..hi * e], e, n, k, l.cfg.capacity_for(imgs * t), l.cfg.bpr);
        for tl in 0..imgs * t {
            let s = lo + tl;
            for j in 0..k {
                let w = r.weight(tl, j);
                if w == 0.0 {
                    continue;
                }
                let ex = r.choice[tl * k + j] as usize;
                let h: Vec<f32> = (0..m)
                    .map(|o| {
                        gelu(b1[ex * m + o] + (0..d).map(|i| w1[(ex * m + o) * d + i] * xv[s * d + i]).sum::<f32>())
                    })
                    .collect();
                for o in 0..d {
                    let out = b2[ex * d + o] + (0..m).map(|i| w2[(ex * d + o) * m + i] * h[i]).sum::<f32>();
                    y[s * d + o] += w * out;
                }
            }
        }
    }
    y
}

#[test]
fn layer_output_equals_the_per_token_reference_and_dropped_tokens_get_zero() {
    // 5 images of 3 tokens in groups of 2 images (the last group has 1): 6 tokens, k = 2 of 4
    // experts, C = 0.5 → ceil(6·2·0.5/4) = 2 → 4 slots per expert and group.
    for (bpr, seed) in [(false, None), (true, None), (true, Some(77u64)), (false, Some(78))] {
        let cfg = moe_cfg(4, 2, 0.5, 2, bpr);
        let (l, p) = layer(&cfg, 6, 5, 1);
        let p = randomised(&p, 0.7, 10);
        let x = randn(&[5, 3, 6], 1.0, 2);
        let (y, saved) = l.forward(&p, &x, seed).unwrap();
        assert_eq!(y.dims(), &[5, 3, 6]);
        let want = reference_output(&l, &p, &x, seed);
        assert_close(&format!("bpr={bpr} noise={seed:?}"), &y.to_f32_vec().unwrap(), &want, 1e-4, 1e-5);
        assert_eq!(saved.stats.load_loss.is_some(), seed.is_some());
        assert!((saved.stats.load.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    // Capacity so small that tokens lose every choice: their rows are exactly zero.
    // k = 1 of 2 experts, C = 0.01: ceil(12·0.01/2) = 1 → 4 slots per expert for 12 tokens.
    let cfg = moe_cfg(2, 1, 0.01, 4, true);
    let (l, p) = layer(&cfg, 6, 5, 1);
    let p = randomised(&p, 0.7, 11);
    let x = randn(&[4, 3, 6], 1.0, 3);
    let (y, saved) = l.forward(&p, &x, None).unwrap();
    let y = y.to_f32_vec().unwrap();
    let zero_rows = y.chunks(6).filter(|r| r.iter().all(|v| *v == 0.0)).count();
    assert!(zero_rows >= 4, "at most 8 of 12 tokens fit, got {zero_rows} zero rows");
    assert_eq!(zero_rows as f32 / 12.0, saved.stats.dropped, "a dropped token (k = 1) gets a zero row");
}

#[test]
fn router_noise_is_deterministic_per_seed() {
    let cfg = moe_cfg(4, 2, 1.0, 2, true);
    let (l, p) = layer(&cfg, 6, 5, 1);
    let p = randomised(&p, 0.7, 12);
    let x = randn(&[4, 3, 6], 1.0, 4);
    let run = |seed| l.forward(&p, &x, seed).unwrap().0.to_f32_vec().unwrap();
    assert_eq!(run(Some(5)), run(Some(5)));
    assert_ne!(run(Some(5)), run(Some(6)));
    assert_ne!(run(Some(5)), run(None));
    assert_eq!(run(None), run(None));
}

/// `⟨r, y⟩ + aux_scale·aux_loss` of the layer at `x` with parameters `p`.
fn layer_loss(l: &MoeMlp, p: &ParamStore, x: &Tensor, r: &[f32], aux_scale: f32, seed: Option<u64>) -> f64 {
    let (y, s) = l.forward(p, x, seed).unwrap();
    let y = y.to_f32_vec().unwrap();
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + aux_scale as f64 * s.stats.aux_loss as f64
}

/// Gradients of the input and every parameter against central differences for the loss
/// `⟨r, y⟩ + aux_scale·aux` (`r` zero to test an auxiliary loss alone).
fn check_layer(what: &str, cfg: &MoeConfig, r_std: f32, aux_scale: f32, params_too: bool) {
    let seed = Some(31u64);
    let (l, p) = layer(cfg, 6, 5, 1);
    let p = randomised(&p, 0.6, 20);
    let x = randn(&[4, 3, 6], 1.0, 5);
    let (y, saved) = l.forward(&p, &x, seed).unwrap();
    let r = if r_std > 0.0 {
        randn(y.dims(), r_std, 6)
    } else {
        Tensor::zeros(y.dims().to_vec(), DType::F32, CPU).unwrap()
    };
    let rv = r.to_f32_vec().unwrap();
    let mut g = p.zeros_like(DType::F32).unwrap();
    let dx = l.backward(&p, &x, &saved, &r, aux_scale, &mut g).unwrap();
    fd_check(&format!("{what}: input"), |x| layer_loss(&l, &p, x, &rv, aux_scale, seed), &x, &dx, 1e-3, 2e-2, 24);
    let names: Vec<String> = if params_too { p.names().map(str::to_string).collect() } else { vec![l.router.clone()] };
    for name in names {
        let f = |t: &Tensor| {
            let mut q = p.clone();
            q.set(&name, t.clone()).unwrap();
            layer_loss(&l, &q, &x, &rv, aux_scale, seed)
        };
        fd_check(&format!("{what}: {name}"), f, p.get(&name).unwrap(), g.get(&name).unwrap(), 1e-3, 2e-2, 16);
    }
}

#[test]
fn layer_gradients_through_the_combine_weights_match_finite_differences() {
    // Auxiliary weights 0: the output alone, with drops (C = 0.5) under BPR and vanilla.
    for bpr in [true, false] {
        let cfg = MoeConfig { importance_weight: 0.0, load_weight: 0.0, ..moe_cfg(4, 2, 0.5, 2, bpr) };
        check_layer(&format!("output, bpr={bpr}"), &cfg, 1.0, 1.0, true);
    }
}

#[test]
fn importance_and_load_loss_gradients_match_finite_differences() {
    // The output does not count (r = 0): only an auxiliary loss moves the router and the input.
    let imp = MoeConfig { importance_weight: 1.0, load_weight: 0.0, ..moe_cfg(4, 2, 1.0, 2, true) };
    check_layer("importance loss", &imp, 0.0, 1.0, false);
    let load = MoeConfig { importance_weight: 0.0, load_weight: 1.0, ..moe_cfg(4, 2, 1.0, 2, true) };
    check_layer("load loss", &load, 0.0, 1.0, false);
    // All together with the default weights, scaled as a trainer does for a micro-batch.
    let all = MoeConfig { importance_weight: 0.3, load_weight: 0.2, ..moe_cfg(4, 2, 0.75, 2, false) };
    check_layer("output + both losses", &all, 1.0, 0.5, true);
}

fn tiny_vmoe() -> ModelConfig {
    let mut c = ModelConfig::custom();
    for s in [
        "image_size=8",
        "patch=4",
        "channels=2",
        "width=8",
        "depth=2",
        "mlp_dim=12",
        "heads=2",
        "classes=3",
        "pool=tok",
        "moe.experts=4",
        "moe.k=2",
        "moe.capacity=1.0",
        "moe.group_size=2",
        "moe.importance_weight=0.5",
        "moe.load_weight=0.5",
    ] {
        c.set(s).unwrap();
    }
    c.validate().unwrap();
    c
}

#[test]
fn a_tiny_vmoe_matches_finite_differences_with_its_auxiliary_loss() {
    let cfg = tiny_vmoe();
    let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let p0 = model.init_params(0, DType::F32, CPU).unwrap();
    assert_eq!(p0.numel() as u64, ParamCounts::of(&cfg).unwrap().total, "parameter count");
    assert!(p0.contains("blocks.1.moe.router.weight") && p0.contains("blocks.0.mlp.fc1.weight"));
    let p = randomised(&p0, 0.5, 100);
    let images = randn(&[4, 2, 8, 8], 1.0, 7);
    let seed = 9u64;
    for remat in [false, true] {
        let mut cfg = cfg.clone();
        cfg.remat = remat;
        let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
        let (out, saved) = model.forward_train(&p, &images, seed).unwrap();
        assert_eq!(saved.moe_stats().len(), 1);
        assert!(saved.aux_loss() > 0.0);
        let r = randn(out.dims(), 1.0, 8);
        let rv = r.to_f32_vec().unwrap();
        let mut g = p.zeros_like(DType::F32).unwrap();
        let dimages = model.backward_scaled(&p, &saved, &r, 0.7, &mut g).unwrap();
        let loss = |q: &ParamStore, x: &Tensor| {
            let (o, s) = model.forward_train(q, x, seed).unwrap();
            let o = o.to_f32_vec().unwrap();
            o.iter().zip(&rv).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + 0.7 * s.aux_loss() as f64
        };
        fd_check(&format!("remat={remat}: images"), |x| loss(&p, x), &images, &dimages, 1e-3, 2e-2, 12);
        for (name, t) in p.iter() {
            let f = |x: &Tensor| {
                let mut q = p.clone();
                q.set(name, x.clone()).unwrap();
                loss(&q, &images)
            };
            // The head and a few norms see gradients; parameters of the dense path too.
            fd_check(&format!("remat={remat}: {name}"), f, t, g.get(name).unwrap(), 1e-3, 2e-2, 6);
        }
    }
}

#[test]
fn forward_without_noise_is_inference_and_dense_models_ignore_the_seed() {
    let cfg = tiny_vmoe();
    let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 0.5, 1);
    let images = randn(&[4, 2, 8, 8], 1.0, 2);
    let (a, sa) = model.forward(&p, &images).unwrap();
    assert_eq!(a.to_f32_vec().unwrap(), model.predict(&p, &images).unwrap().to_f32_vec().unwrap());
    assert!(sa.moe_stats()[0].1.load_loss.is_none());
    let (b, sb) = model.forward_train(&p, &images, 3).unwrap();
    assert_ne!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    assert!(sb.moe_stats()[0].1.load_loss.is_some());
    let mut dense = cfg.clone();
    dense.moe = None;
    let model = VisionTransformer::new(&dense, DType::F32, CPU).unwrap();
    let p = model.init_params(0, DType::F32, CPU).unwrap();
    let (a, sa) = model.forward(&p, &images).unwrap();
    let (b, _) = model.forward_train(&p, &images, 3).unwrap();
    assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    assert_eq!(sa.aux_loss(), 0.0);
}

#[test]
fn moe_blocks_are_every_nth_or_the_last_odd_ones() {
    let every2 = MoeConfig::default();
    assert_eq!(every2.moe_blocks(12), vec![1, 3, 5, 7, 9, 11]);
    let every3 = MoeConfig { every: 3, ..MoeConfig::default() };
    assert_eq!(every3.moe_blocks(12), vec![2, 5, 8, 11]);
    let last2 = MoeConfig { last: Some(2), ..MoeConfig::default() };
    assert_eq!(last2.moe_blocks(12), vec![9, 11]);
    assert_eq!(last2.moe_blocks(24), vec![21, 23]);
    let last1 = MoeConfig { last: Some(1), ..MoeConfig::default() };
    assert_eq!(last1.moe_blocks(5), vec![3]);
}

fn err(sets: &[&str]) -> String {
    let mut c = tiny_vmoe();
    for s in sets {
        if let Err(e) = c.set(s) {
            return e.to_string();
        }
    }
    c.validate().unwrap_err().to_string()
}

#[test]
fn bad_moe_configs_are_one_line_errors() {
    let cases = [
        (&["moe.k=5"][..], "model config: moe.k = 5: expected 1 to moe.experts (4)"),
        (&["moe.k=0"][..], "model config: moe.k = 0: expected 1 to moe.experts (4)"),
        (&["moe.capacity=0"][..], "model config: moe.capacity = 0: expected a positive capacity factor"),
        (&["moe.capacity=-1"][..], "model config: moe.capacity = -1: expected a positive capacity factor"),
        (&["moe.every=0"][..], "model config: moe.every = 0: expected a positive block interval (2: blocks 1, 3, 5, ...)"),
        (&["moe.experts=0"][..], "model config: moe.experts = 0: expected a positive number of experts"),
        (&["moe.last=2"][..], "model config: moe.last = 2: expected 1 to the number of odd blocks (1 of depth 2)"),
        (&["moe.group_size=0"][..], "model config: moe.group_size = 0: expected a positive number of images per group"),
        (&["moe.noise=-0.5"][..], "model config: moe.noise = -0.5: expected a finite value >= 0"),
        (&["moe.k=two"][..], "model config: moe.k = \"two\": expected an unsigned integer"),
        (&["moe.bpr=yes"][..], "model config: moe.bpr = \"yes\": expected true or false"),
        (
            &["block=parallel"][..],
            "model config: block = parallel: expected \"sequential\" with moe (MoE MLPs replace the sequential block's MLP)",
        ),
    ];
    for (sets, want) in cases {
        let got = err(sets);
        assert_eq!(got, want, "{sets:?}");
        assert!(!got.contains('\n'));
    }
    let mut c = ModelConfig::custom();
    let e = c.set("moe.expert=3").unwrap_err().to_string();
    assert!(
        e.starts_with("unknown model config key \"moe.expert\": expected one of") && e.contains("moe.experts"),
        "{e}"
    );
}

#[test]
fn moe_config_round_trips_through_toml_and_inline_tables() {
    let mut c = tiny_vmoe();
    c.set("moe.last=1").unwrap();
    c.set("moe.bpr=false").unwrap();
    c.validate().unwrap();
    let text = c.to_toml().unwrap();
    assert!(text.contains("[moe]") && text.contains("capacity = 1.0") && text.contains("last = 1"), "{text}");
    assert_eq!(ModelConfig::from_toml(&text).unwrap(), c);
    // A train config's [model.moe] arrives as an inline table; unset keys take the defaults.
    let mut d = ModelConfig::custom();
    d.set("moe={ experts = 8, k = 1, capacity = 0.5 }").unwrap();
    let m = d.moe.clone().unwrap();
    assert_eq!((m.experts, m.k, m.capacity, m.every, m.group_size), (8, 1, 0.5, 2, 8));
    d.set("moe=none").unwrap();
    assert_eq!(d.moe, None);
    assert_eq!(d, ModelConfig::custom());
    // A dense config writes no [moe] table (checkpoints of dense models are unchanged).
    assert!(!ModelConfig::custom().to_toml().unwrap().contains("moe"));
    let _ = Pool::Tok;
}
