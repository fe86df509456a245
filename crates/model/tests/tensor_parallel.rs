//! Tensor parallelism (issue 13 items 2 and 4): the model split over 2 and 4 `LocalGroup`
//! model ranks gives the unsharded model's logits and gradients, for the sequential and the
//! parallel block, with and without QK-norm and biases, every pooling, with remat, and with
//! the ring and the plain collective matmul; its initial parameters are the unsharded ones
//! split; bad splits are errors.

mod common;

use common::{randomised, values};

use vit_collective::{Communicator, LocalGroup, MatmulComm};
use vit_model::{BlockKind, ModelAxis, ModelConfig, Pool, ShardSpec, TensorParallelViT, VisionTransformer};
use vit_tensor::{testing::assert_close, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

fn tiny(block: BlockKind, pool: Pool, qk_norm: bool, bias: bool) -> ModelConfig {
    let mut c = ModelConfig::custom();
    for s in ["image_size=8", "patch=2", "channels=2", "width=16", "depth=2", "mlp_dim=24", "heads=4", "classes=3"] {
        c.set(s).unwrap();
    }
    c.block = block;
    c.pool = pool;
    c.qk_norm = qk_norm;
    c.qkv_bias = bias;
    c.norm_bias = bias;
    c
}

fn check(cfg: &ModelConfig, n: usize, matmul: MatmulComm, what: &str) {
    let model = VisionTransformer::new(cfg, DType::F32, CPU).unwrap();
    let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 50);
    // Batch 2 of 16 patches (+1 class token with `tok`): 32 or 34 rows; 34 only splits over 2.
    let images = Tensor::randn([2, 2, 8, 8], 0.0, 1.0, 7, DType::F32, CPU).unwrap();
    let (out, saved) = model.forward(&p, &images).unwrap();
    let dout = Tensor::randn(out.shape().clone(), 0.0, 1.0, 8, DType::F32, CPU).unwrap();
    let mut g = p.zeros_like(DType::F32).unwrap();
    model.backward(&p, &saved, &dout, &mut g).unwrap();
    // A second micro-batch's gradient adds to the first (replicated parameters included).
    model.backward(&p, &saved, &dout, &mut g).unwrap();

    let results = LocalGroup::run(n, |comm| {
        let tp = TensorParallelViT::new(&model, n, comm.rank()).unwrap();
        let local = tp.shard_params(&p).unwrap();
        let axis = ModelAxis { comm: &comm, matmul };
        let (out_r, s) = tp.forward(&local, &images, axis).unwrap();
        let predicted = tp.predict(&local, &images, axis).unwrap();
        let mut gr = local.zeros_like(DType::F32).unwrap();
        tp.backward(&local, &s, &dout, &mut gr, axis).unwrap();
        tp.backward(&local, &s, &dout, &mut gr, axis).unwrap();
        let whole = tp.gather_params(&gr, &comm).unwrap();
        (out_r, predicted, whole, local.numel())
    });
    for (r, (out_r, predicted, whole, local_numel)) in results.into_iter().enumerate() {
        let at = |s: &str| format!("{what}, {n} ranks ({matmul:?}), rank {r}: {s}");
        assert_close(&at("logits"), &values(&out_r), &values(&out), 1e-4, 1e-5);
        assert_close(&at("predict"), &values(&predicted), &values(&out), 1e-4, 1e-5);
        assert!(local_numel < p.numel(), "{}", at("the rank holds less than the whole model"));
        for (name, t) in g.iter() {
            assert_close(&at(name), &values(whole.get(name).unwrap()), &values(t), 1e-4, 1e-4);
        }
    }
}

#[test]
fn sequential_blocks_split_over_2_and_4_ranks_match_the_whole_model() {
    for (pool, qk, bias) in [(Pool::Gap, false, true), (Pool::Map, true, true), (Pool::Gap, true, false)] {
        let cfg = tiny(BlockKind::Sequential, pool, qk, bias);
        for n in [2, 4] {
            check(&cfg, n, MatmulComm::Ring, &format!("sequential {pool:?} qk_norm={qk} bias={bias}"));
        }
    }
    let cfg = tiny(BlockKind::Sequential, Pool::Gap, false, true);
    check(&cfg, 2, MatmulComm::Plain, "sequential, plain collectives");
}

#[test]
fn parallel_blocks_split_over_2_and_4_ranks_match_the_whole_model() {
    for (pool, qk, bias) in [(Pool::Gap, true, false), (Pool::Map, false, true), (Pool::Gap, false, false)] {
        let cfg = tiny(BlockKind::Parallel, pool, qk, bias);
        for n in [2, 4] {
            check(&cfg, n, MatmulComm::Ring, &format!("parallel {pool:?} qk_norm={qk} bias={bias}"));
        }
    }
    check(&tiny(BlockKind::Parallel, Pool::Gap, true, false), 4, MatmulComm::Plain, "parallel, plain collectives");
}

#[test]
fn remat_and_a_class_token_still_match() {
    let mut cfg = tiny(BlockKind::Sequential, Pool::Tok, true, true);
    cfg.remat = true;
    check(&cfg, 2, MatmulComm::Ring, "sequential tok remat");
    let mut cfg = tiny(BlockKind::Parallel, Pool::Gap, true, false);
    cfg.remat = true;
    check(&cfg, 4, MatmulComm::Ring, "parallel remat");
}

#[test]
fn a_conv_stem_is_replicated_and_still_matches() {
    let mut cfg = tiny(BlockKind::Parallel, Pool::Map, true, false);
    cfg.set("stem=[4]").unwrap(); // patch 2: one stride-2 convolution
    cfg.validate().unwrap();
    check(&cfg, 2, MatmulComm::Ring, "parallel map stem");
    let mut cfg = tiny(BlockKind::Sequential, Pool::Gap, false, true);
    cfg.set("patch_kernel=4").unwrap(); // overlapping windows, replicated like the plain patches
    cfg.validate().unwrap();
    check(&cfg, 2, MatmulComm::Ring, "sequential gap overlapping patches");
}

#[test]
fn initial_parameters_are_the_whole_models_split_and_gather_back() {
    let cfg = tiny(BlockKind::Parallel, Pool::Map, true, true);
    let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let whole = model.init_params(3, DType::F32, CPU).unwrap();
    let gathered = LocalGroup::run(4, |comm| {
        let tp = TensorParallelViT::new(&model, 4, comm.rank()).unwrap();
        let local = tp.init_params(3, DType::F32, CPU).unwrap();
        let want = tp.shard_params(&whole).unwrap();
        for (name, t) in want.iter() {
            assert_eq!(values(local.get(name).unwrap()), values(t), "rank {}: {name}", comm.rank());
        }
        // The in-projection [M + 3D, D] = [24 + 48, 16] keeps a quarter of each segment.
        assert_eq!(local.get("blocks.0.in_proj.weight").unwrap().dims(), [18, 16]);
        assert_eq!(local.get("blocks.0.out_proj.weight").unwrap().dims(), [16, 10]);
        assert_eq!(tp.plan().spec("blocks.1.in_norm.weight").unwrap(), &ShardSpec::Replicated);
        tp.gather_params(&local, &comm).unwrap()
    });
    for g in gathered {
        for (name, t) in whole.iter() {
            assert_eq!(values(g.get(name).unwrap()), values(t), "{name}");
        }
    }
}

#[test]
fn splits_that_do_not_divide_are_errors() {
    let cfg = tiny(BlockKind::Sequential, Pool::Gap, false, true);
    let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let e = TensorParallelViT::new(&model, 3, 0).unwrap_err().to_string();
    assert!(e.contains("heads") && e.contains("4") && e.contains("3"), "{e}");
    let mut odd = cfg.clone();
    odd.set("mlp_dim=26").unwrap();
    let m = VisionTransformer::new(&odd, DType::F32, CPU).unwrap();
    let e = TensorParallelViT::new(&m, 4, 0).unwrap_err().to_string();
    assert!(e.contains("mlp_dim") && e.contains("26"), "{e}");
    // 2 images × 17 tokens (class token) = 34 rows do not split over 4 ranks.
    let tok = tiny(BlockKind::Sequential, Pool::Tok, false, true);
    let model = VisionTransformer::new(&tok, DType::F32, CPU).unwrap();
    let images = Tensor::randn([2, 2, 8, 8], 0.0, 1.0, 7, DType::F32, CPU).unwrap();
    let errs = LocalGroup::run(4, |comm| {
        let tp = TensorParallelViT::new(&model, 4, comm.rank()).unwrap();
        let p = tp.init_params(0, DType::F32, CPU).unwrap();
        tp.forward(&p, &images, ModelAxis { comm: &comm, matmul: MatmulComm::Ring }).unwrap_err().to_string()
    });
    for e in errs {
        assert!(e.contains("34 rows") && e.contains("4 model ranks"), "{e}");
    }
    // A communicator of the wrong size.
    let e = LocalGroup::run(2, |comm| {
        let tp = TensorParallelViT::new(&model, 4, comm.rank()).unwrap();
        let p = tp.init_params(0, DType::F32, CPU).unwrap();
        tp.predict(&p, &images, ModelAxis { comm: &comm, matmul: MatmulComm::Ring }).unwrap_err().to_string()
    });
    assert!(e[0].contains("rank 0 of 4") && e[0].contains("rank 0 of 2"), "{}", e[0]);
}

#[test]
fn a_share_of_the_initial_parameters_is_the_same_values_made_alone() {
    let cfg = tiny(BlockKind::Sequential, Pool::Map, true, true);
    let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let whole = model.init_params(5, DType::F32, CPU).unwrap();
    let keep = |n: &str| n.contains("fc1") || n.starts_with("head");
    let some = model.init_params_where(5, DType::F32, CPU, &keep).unwrap();
    assert_eq!(some.len(), whole.names().filter(|n| keep(n)).count());
    assert!(some.len() >= 3, "{}", some.len());
    for (name, t) in some.iter() {
        assert_eq!(values(t), values(whole.get(name).unwrap()), "{name}");
    }
    let tp = TensorParallelViT::new(&model, 2, 1).unwrap();
    let part = tp.init_params(5, DType::F32, CPU).unwrap();
    let some = tp.init_params_where(5, DType::F32, CPU, &keep).unwrap();
    for (name, t) in some.iter() {
        assert_eq!(values(t), values(part.get(name).unwrap()), "{name}");
    }
}
