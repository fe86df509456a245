//! Stage-by-stage passes (what full sharding runs) equal the model's own forward and backward:
//! the whole model and the tensor-parallel one on 2 `LocalGroup` ranks, with and without remat,
//! each stage given a store holding only its own parameters.

mod common;

use common::randomised;

use vit_collective::{Communicator, LocalGroup, MatmulComm};
use vit_model::{
    BlockKind, ModelAxis, ModelConfig, ParamStore, Pool, StagedModel, TensorParallelViT, TpStages, VisionTransformer,
};
use vit_tensor::{testing::assert_close, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

fn tiny(block: BlockKind, remat: bool) -> ModelConfig {
    let mut c = ModelConfig::custom();
    for s in ["image_size=8", "patch=2", "channels=2", "width=16", "depth=3", "mlp_dim=24", "heads=4", "classes=3"] {
        c.set(s).unwrap();
    }
    c.block = block;
    c.pool = Pool::Map;
    c.qk_norm = true;
    c.remat = remat;
    c
}

fn only(p: &ParamStore, names: &[String]) -> ParamStore {
    let mut out = ParamStore::new();
    for n in names {
        out.insert(n.clone(), p.get(n).unwrap().clone()).unwrap();
    }
    out
}

/// Runs `m` stage by stage with per-stage stores; returns the logits and the whole gradient.
fn staged(m: &dyn StagedModel, p: &ParamStore, images: &Tensor, dout: &Tensor) -> (Tensor, ParamStore) {
    let stages = m.stages().unwrap();
    let (mut x, mut inputs, mut saved) = (images.clone(), Vec::new(), Vec::new());
    for (s, names) in stages.iter().enumerate() {
        let (y, sv) = m.stage_forward(s, &only(p, names), &x).unwrap();
        inputs.push(x);
        saved.push(sv);
        x = y;
    }
    let mut g = p.zeros_like(DType::F32).unwrap();
    let mut dy = dout.clone();
    for (s, names) in stages.iter().enumerate().rev() {
        let ps = only(p, names);
        let mut gs = ps.zeros_like(DType::F32).unwrap();
        dy = m.stage_backward(s, &ps, &inputs[s], &saved[s], &dy, &mut gs).unwrap();
        for (n, t) in gs.iter() {
            g.accumulate(n, t).unwrap();
        }
    }
    (x, g)
}

#[test]
fn stage_by_stage_passes_equal_the_whole_models_and_the_tensor_parallel_ones() {
    for block in [BlockKind::Sequential, BlockKind::Parallel] {
        for remat in [false, true] {
            let cfg = tiny(block, remat);
            let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
            let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 9);
            let images = Tensor::randn([2, 2, 8, 8], 0.0, 1.0, 7, DType::F32, CPU).unwrap();
            let (out, saved) = model.forward(&p, &images).unwrap();
            let dout = Tensor::randn(out.shape().clone(), 0.0, 1.0, 8, DType::F32, CPU).unwrap();
            let mut g = p.zeros_like(DType::F32).unwrap();
            model.backward(&p, &saved, &dout, &mut g).unwrap();
            let what = format!("{block:?} remat={remat}");
            let (out_s, g_s) = staged(&model, &p, &images, &dout);
            assert_eq!(out_s.to_f32_vec().unwrap(), out.to_f32_vec().unwrap(), "{what}: logits");
            for (n, t) in g.iter() {
                assert_eq!(g_s.get(n).unwrap().to_f32_vec().unwrap(), t.to_f32_vec().unwrap(), "{what}: {n}");
            }
            let results = LocalGroup::run(2, |comm| {
                let tp = TensorParallelViT::new(&model, 2, comm.rank()).unwrap();
                let local = tp.shard_params(&p).unwrap();
                let stages = TpStages { tp: &tp, axis: ModelAxis { comm: &comm, matmul: MatmulComm::Ring } };
                let (o, gl) = staged(&stages, &local, &images, &dout);
                (o, tp.gather_params(&gl, &comm).unwrap())
            });
            for (o, whole) in results {
                assert_close(
                    &format!("{what}, 2 model ranks: logits"),
                    &o.to_f32_vec().unwrap(),
                    &out.to_f32_vec().unwrap(),
                    1e-4,
                    1e-5,
                );
                for (n, t) in g.iter() {
                    let got = whole.get(n).unwrap().to_f32_vec().unwrap();
                    assert_close(&format!("{what}, 2 model ranks: {n}"), &got, &t.to_f32_vec().unwrap(), 1e-4, 1e-4);
                }
            }
        }
    }
}
