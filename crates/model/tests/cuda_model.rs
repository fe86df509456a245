//! The whole model on CUDA equals the CPU reference: logits and every parameter gradient,
//! in f32 (tight) for both block kinds and every pooling.

use vit_model::{BlockKind, ModelConfig, ParamStore, Pool, VisionTransformer};
use vit_tensor::{testing::assert_close, DType, Device, Tensor};

#[test]
#[ignore = "needs a CUDA device"]
fn forward_and_backward_on_cuda_equal_cpu() {
    let gpu = Device::Cuda(0);
    for (pool, block) in
        [(Pool::Tok, BlockKind::Sequential), (Pool::Gap, BlockKind::Parallel), (Pool::Map, BlockKind::Sequential)]
    {
        let mut cfg = ModelConfig::custom();
        for s in
            ["image_size=32", "patch=4", "width=64", "depth=2", "mlp_dim=128", "heads=4", "classes=10", "qk_norm=true"]
        {
            cfg.set(s).unwrap();
        }
        cfg.pool = pool;
        cfg.block = block;
        let cpu_model = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
        let gpu_model = VisionTransformer::new(&cfg, DType::F32, gpu).unwrap();
        let p = cpu_model.init_params(3, DType::F32, Device::Cpu).unwrap();
        let mut pg = ParamStore::new();
        for (n, t) in p.iter() {
            // Random head too, so the body's gradients are not zero.
            let t = if n.starts_with("head") {
                Tensor::randn(t.shape().clone(), 0.0, 0.1, 9, DType::F32, Device::Cpu).unwrap()
            } else {
                t.clone()
            };
            pg.insert(n, t).unwrap();
        }
        let p = pg.clone();
        let mut pg = ParamStore::new();
        for (n, t) in p.iter() {
            pg.insert(n, t.to_device(gpu).unwrap()).unwrap();
        }
        let images = Tensor::randn([4, 3, 32, 32], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
        let r = Tensor::randn([4, 10], 0.0, 1.0, 2, DType::F32, Device::Cpu).unwrap();
        let (lc, sc) = cpu_model.forward(&p, &images).unwrap();
        let (lg, sg) = gpu_model.forward(&pg, &images.to_device(gpu).unwrap()).unwrap();
        assert_close(&format!("{pool:?} logits"), &lg.to_f32_vec().unwrap(), &lc.to_f32_vec().unwrap(), 1e-3, 1e-4);
        let mut gc = p.zeros_like(DType::F32).unwrap();
        let mut gg = pg.zeros_like(DType::F32).unwrap();
        cpu_model.backward(&p, &sc, &r, &mut gc).unwrap();
        gpu_model.backward(&pg, &sg, &r.to_device(gpu).unwrap(), &mut gg).unwrap();
        for (n, t) in gc.iter() {
            let g = gg.get(n).unwrap().to_f32_vec().unwrap();
            assert_close(&format!("{pool:?} {block:?} grad {n}"), &g, &t.to_f32_vec().unwrap(), 1e-3, 1e-4);
        }
    }
}
