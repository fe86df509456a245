//! CPU speed of one V-MoE layer (E = 8, k = 2, C = 1.05, ViT-S/16 width: D 384, M 1536, one
//! routing group of 8 images of 197 tokens) against the dense MLP of equal FLOPs (hidden width
//! chosen so its two GEMMs do the work of the experts' GEMMs over all capacity slots), forward
//! and backward, in the same run: issue 11 item 7, target ≤ 1.3× the dense time.
//! `cargo bench --bench moe_cpu`

mod common;

use std::hint::black_box;
use vit_model::{
    layers::{Init, Initializer, Mlp, MoeMlp},
    MoeConfig, ParamStore,
};
use vit_tensor::{ops::Gelu, DType, Device, Tensor};

fn params(init: impl FnOnce(&mut Initializer)) -> ParamStore {
    let mut sink =
        Initializer { init: Init { seed: 0, dtype: DType::F32, device: Device::Cpu }, store: ParamStore::new() };
    init(&mut sink);
    sink.store
}

fn main() {
    let quick = common::quick();
    // Quick (under `cargo test --benches`): the same code on a toy size, one sample.
    let (d, m, imgs, tokens, samples) = if quick { (32, 64, 2, 10, 1) } else { (384, 1536, 8, 197, 9) };
    let cfg = MoeConfig { experts: 8, k: 2, capacity: 1.05, group_size: imgs, ..MoeConfig::default() };
    let s = imgs * tokens;
    let cap = cfg.capacity_for(s);
    // Equal FLOPs: the dense MLP's hidden width covers the experts' E·capacity slots of width M.
    let dense_m = ((cfg.experts * cap * m) as f64 / s as f64).round() as usize;
    let moe = MoeMlp::new("moe", d, m, &cfg, Gelu::Tanh);
    let dense = Mlp::new("mlp", d, dense_m, Gelu::Tanh);
    let pm = params(|s| moe.init(s).unwrap());
    let pd = params(|s| dense.init(s).unwrap());
    let x = Tensor::randn([imgs, tokens, d], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
    let dy = Tensor::randn([imgs, tokens, d], 0.0, 1.0, 2, DType::F32, Device::Cpu).unwrap();

    let moe_step = || {
        let (y, saved) = moe.forward(&pm, &x, Some(7)).unwrap();
        let mut g = pm.zeros_like(DType::F32).unwrap();
        black_box(moe.backward(&pm, &x, &saved, &dy, 1.0, &mut g).unwrap());
        black_box(y);
    };
    let dense_step = || {
        let (y, saved) = dense.forward(&pd, &x).unwrap();
        let mut g = pd.zeros_like(DType::F32).unwrap();
        black_box(dense.backward(&pd, &x, &saved, &dy, &mut g).unwrap());
        black_box(y);
    };
    // Interleaved, one MoE and one dense step per sample, so that load from other processes
    // on a shared machine hits both alike; the ratio is the median of the per-sample ratios.
    // Each timed step right after one untimed step of the same layer (caches, allocator).
    let (mut t_moe, mut t_dense, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        let (a, b) = (common::median_time(1, 1, moe_step), common::median_time(1, 1, dense_step));
        t_moe.push(a);
        t_dense.push(b);
        ratio.push(a.as_secs_f64() / b.as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t_moe, t_dense) = (t_moe.iter().min().unwrap().as_secs_f64(), t_dense.iter().min().unwrap().as_secs_f64());
    let ratio = median(&mut ratio);
    // Forward FLOPs: experts 2·(E·cap)·2DM, router 2·S·D·E; dense 2·S·2D·M'.
    let (e, sf, df, mf) = (cfg.experts as f64, s as f64, d as f64, m as f64);
    let moe_flops = 2.0 * e * cap as f64 * 2.0 * df * mf + 2.0 * sf * df * e;
    let dense_flops = 2.0 * sf * 2.0 * df * dense_m as f64;
    println!("moe_cpu: {} threads, f32, forward + backward of one layer", rayon::current_num_threads());
    println!(
        "  MoE   E {} k {} C {} (capacity {cap}/expert), D {d}, M {m}, {imgs}×{tokens} tokens: {:9.2} ms ({:6.1} GFLOP/s)",
        cfg.experts,
        cfg.k,
        cfg.capacity,
        t_moe * 1e3,
        3.0 * moe_flops / t_moe / 1e9
    );
    println!(
        "  dense MLP of equal FLOPs (M' {dense_m}):                        {:9.2} ms ({:6.1} GFLOP/s)",
        t_dense * 1e3,
        3.0 * dense_flops / t_dense / 1e9
    );
    println!(
        "  MoE / dense time {ratio:.2} (median of {samples} interleaved pairs; target ≤ 1.3), FLOP ratio {:.3}",
        moe_flops / dense_flops
    );
}
