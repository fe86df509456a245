//! The planner's memory against measured memory (issue 13 item 6, data-parallel part): for small
//! models on one rank and on ZeRO-1 ranks, the bytes of parameters, gradients, optimizer state
//! (`Optimizer::state_bytes`, and `ShardedOptimizer::state_bytes` of each rank, the optimizer a
//! `LocalGroup` rank of the trainer builds) and the activations a forward keeps for backward
//! (measured by a counting global allocator: live heap bytes after the forward minus before)
//! are within 10% of `vit_experiments::plan`; the peak of a whole forward and backward is
//! within 25% of the planned activations plus the estimated backward workspace. The model axis
//! too: on 2 and 4 `LocalGroup` model ranks of the tensor-parallel model, each rank's parameter
//! bytes equal the plan's and the ranks' kept activations together are within 10% of the plan's
//! per device times the ranks. One test in this binary, so nothing else allocates while it
//! measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use vit_collective::{Communicator, LocalGroup, MatmulComm};
use vit_experiments::plan::{plan, Mesh, ParamSharding, PlanSettings};
use vit_experiments::train::zero::ShardedOptimizer;
use vit_model::{ModelAxis, ModelConfig, TensorParallelViT, VisionTransformer};
use vit_optim::{Algorithm, FactoredAdamConfig, Optimizer, OptimizerChain, OptimizerConfig};
use vit_tensor::{DType, Device, Tensor};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size() as i64, Relaxed) + layout.size() as i64;
        PEAK.fetch_max(live, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let live =
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Relaxed) + new_size as i64 - layout.size() as i64;
        PEAK.fetch_max(live, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Relaxed)
}

fn factored() -> OptimizerConfig {
    OptimizerConfig::new(Algorithm::FactoredAdam(FactoredAdamConfig::default()), 1e-3)
}

/// A small ViT (MAP head, sequential blocks) and a ViT-22B-style one (parallel blocks, QK-norm,
/// no QKV bias, GAP, pre-logits).
fn models() -> Vec<(&'static str, ModelConfig)> {
    let mut seq = ModelConfig::custom();
    for s in ["image_size=32", "patch=4", "width=64", "depth=4", "mlp_dim=256", "heads=4", "classes=10"] {
        seq.set(s).unwrap();
    }
    let mut par = seq.clone();
    for s in ["block=parallel", "qk_norm=true", "qkv_bias=false", "pool=gap", "prelogits=48"] {
        par.set(s).unwrap();
    }
    vec![("sequential", seq), ("parallel", par)]
}

/// Live heap bytes a forward of `images` keeps (its saved activations and output).
fn kept_by_forward(vit: &VisionTransformer, params: &vit_tensor::ParamStore, images: &Tensor) -> u64 {
    let before = live();
    let kept = vit.forward(params, images).unwrap();
    let after = live();
    drop(kept);
    (after - before) as u64
}

/// Peak live heap bytes of a forward and backward over the live bytes before it (what a
/// training step adds to parameters, gradients and optimizer state).
fn step_peak(vit: &VisionTransformer, params: &vit_tensor::ParamStore, images: &Tensor) -> u64 {
    let mut grads = params.zeros_like(DType::F32).unwrap();
    let dout = Tensor::randn([images.dims()[0], vit.config.classes], 0.0, 1.0, 9, DType::F32, Device::Cpu).unwrap();
    let before = live();
    PEAK.store(before, Relaxed);
    let (out, saved) = vit.forward(params, images).unwrap();
    let dx = vit.backward(params, &saved, &dout, &mut grads).unwrap();
    drop((out, saved, dx));
    (PEAK.load(Relaxed) - before) as u64
}

fn within(what: &str, planned: u64, measured: u64) {
    let ratio = planned as f64 / measured as f64;
    println!("{what}: planned {planned}, measured {measured}, ratio {ratio:.4}");
    assert!((ratio - 1.0).abs() < 0.10, "{what}: planned {planned} vs measured {measured} (ratio {ratio:.4})");
}

#[test]
fn planned_memory_is_within_10_percent_of_measured_on_one_rank_and_zero1_ranks() {
    let per_rank = 8;
    for (name, cfg) in models() {
        for remat in [false, true] {
            let cfg = ModelConfig { remat, ..cfg.clone() };
            let vit = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
            let params = vit.init_params(1, DType::F32, Device::Cpu).unwrap();
            let grads = params.zeros_like(DType::F32).unwrap();
            let bytes = |s: &vit_tensor::ParamStore| s.buffers().iter().map(|b| b.numel() as u64 * 4).sum::<u64>();
            let images = Tensor::randn([per_rank, 3, 32, 32], 0.0, 1.0, 7, DType::F32, Device::Cpu).unwrap();
            // Warm-up (thread pools, per-thread GEMM scratch), then the least of three runs: a
            // worker thread that grows its scratch during a run adds bytes that are not kept.
            step_peak(&vit, &params, &images);
            let activations = (0..3).map(|_| kept_by_forward(&vit, &params, &images)).min().unwrap();
            let step_peak = (0..3).map(|_| step_peak(&vit, &params, &images)).min().unwrap();
            for world in [1usize, 2, 4] {
                let mut s =
                    PlanSettings::new(cfg.clone(), Mesh { data: world, model: 1 }, world * per_rank, factored());
                s.remat = remat;
                s.sharding = if world > 1 { ParamSharding::Optimizer } else { ParamSharding::None };
                let p = plan(&s).unwrap();
                let tag = format!("{name}, remat {remat}, {world} rank(s)");
                assert_eq!(p.memory.parameters, bytes(&params), "{tag}");
                assert_eq!(p.memory.gradients, bytes(&grads), "{tag}");
                // Kept activations: what the forward keeps; with remat the plan also counts the
                // one block recomputed in backward, which the forward does not hold.
                let planned_act = if remat {
                    p.activations_remat - (p.activations_no_remat - p.activations_remat) / (cfg.depth as u64 - 1)
                } else {
                    p.activations_no_remat
                };
                within(&format!("{tag}: activations"), planned_act, activations);
                // The step's peak (kept activations plus backward's transients) against the
                // planned activations + workspace: the workspace is an estimate (docs/sharding.md
                // records the measured gaps, 4-22% on these models), so this bound is 25%.
                let planned_peak = p.memory.activations + p.memory.workspace;
                let ratio = planned_peak as f64 / step_peak as f64;
                println!("{tag}: step peak measured {step_peak}, planned {planned_peak}, ratio {ratio:.4}");
                assert!((ratio - 1.0).abs() < 0.25, "{tag}: step peak {step_peak} vs planned {planned_peak}");
                let ranks: Vec<u64> = if world == 1 {
                    vec![OptimizerChain::new(factored(), &params).unwrap().state_bytes()]
                } else {
                    (0..world)
                        .map(|r| ShardedOptimizer::new(factored(), &params, r, world).unwrap().state_bytes())
                        .collect()
                };
                for (r, opt) in ranks.iter().enumerate() {
                    let measured = bytes(&params) + bytes(&grads) + opt + activations;
                    let planned = p.memory.parameters + p.memory.gradients + p.memory.optimizer + planned_act;
                    within(
                        &format!("{tag}, rank {r}: parameters + gradients + optimizer + activations"),
                        planned,
                        measured,
                    );
                }
            }
            for model in [2usize, 4] {
                let mut s = PlanSettings::new(cfg.clone(), Mesh { data: 1, model }, per_rank, factored());
                s.remat = remat;
                let p = plan(&s).unwrap();
                let tag = format!("{name}, remat {remat}, {model} model ranks");
                let planned_act = if remat {
                    p.activations_remat - (p.activations_no_remat - p.activations_remat) / (cfg.depth as u64 - 1)
                } else {
                    p.activations_no_remat
                };
                let (param_bytes, kept) = tensor_parallel_kept(&vit, model, per_rank);
                for (r, b) in param_bytes.iter().enumerate() {
                    assert_eq!(p.memory.parameters, *b, "{tag}, rank {r}: parameter bytes");
                }
                within(&format!("{tag}: activations of all ranks"), planned_act * model as u64, kept);
            }
        }
    }
}

/// The tensor-parallel model on `model` `LocalGroup` ranks, every rank on the same `images`
/// images: each rank's parameter bytes, and the live heap bytes that the ranks' forwards keep
/// together (measured by rank 0 between barriers, after a warm-up; the least of three runs).
fn tensor_parallel_kept(vit: &VisionTransformer, model: usize, images: usize) -> (Vec<u64>, u64) {
    let x = Tensor::randn([images, 3, 32, 32], 0.0, 1.0, 7, DType::F32, Device::Cpu).unwrap();
    let out = LocalGroup::run(model, |comm| {
        let tp = TensorParallelViT::new(vit, model, comm.rank()).unwrap();
        let params = tp.init_params(1, DType::F32, Device::Cpu).unwrap();
        let axis = ModelAxis { comm: &comm, matmul: MatmulComm::Ring };
        drop(tp.forward(&params, &x, axis).unwrap());
        let mut least = u64::MAX;
        for _ in 0..3 {
            comm.barrier().unwrap();
            let before = live();
            comm.barrier().unwrap();
            let kept = tp.forward(&params, &x, axis).unwrap();
            comm.barrier().unwrap();
            least = least.min((live() - before) as u64);
            comm.barrier().unwrap();
            drop(kept);
        }
        (params.buffers().iter().map(|b| b.numel() as u64 * 4).sum::<u64>(), least)
    });
    (out.iter().map(|(b, _)| *b).collect(), out[0].1)
}
