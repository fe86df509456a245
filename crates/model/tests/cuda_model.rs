//! The whole model on CUDA equals the CPU reference: logits and every parameter gradient,
//! in f32 (tight) for both block kinds and every pooling, with a conv stem and with overlapping
//! patches under PatchDropout.

use vit_model::{layers::patch_dropout::PatchDrop, BlockKind, ModelConfig, ParamStore, Pool, VisionTransformer};
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
        if pool == Pool::Map {
            // A conv stem (im2col, col2im, channels-last permutes) in place of the patch projection.
            cfg.set("stem=[8, 16]").unwrap();
        }
        if pool == Pool::Gap {
            // Overlapping 8x8 patches of a 3-channel image (im2col, the kernel's permute).
            cfg.set("patch_kernel=8").unwrap();
        }
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
        // With overlapping windows, a PatchDropout pass too (the kept patches' projection:
        // gather_rows and scatter_add_rows on the device).
        let drop = (pool == Pool::Gap).then_some(PatchDrop { keep: 20, seed: 3, first_image: 0 });
        let (lc, sc) = cpu_model.forward_train_with(&p, &images, 0, drop, None).unwrap();
        let (lg, sg) = gpu_model.forward_train_with(&pg, &images.to_device(gpu).unwrap(), 0, drop, None).unwrap();
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

/// `‖got − want‖ / ‖want‖`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// The trainer's mixed precision on CUDA (bf16 parameters and activations, f32 gradients) takes
/// the fused cuBLASLt epilogues (bias, bias + tanh GELU, residual, weight gradients accumulated
/// into the f32 store with the bias gradient; the dGELU is composed) and matches the same model
/// run in bf16 on the CPU (the unfused composition) to bf16 accuracy.
#[test]
#[ignore = "needs a CUDA device"]
fn bf16_forward_and_backward_with_fused_epilogues_match_cpu() {
    let gpu = Device::Cuda(0);
    for (pool, block) in [(Pool::Map, BlockKind::Sequential), (Pool::Gap, BlockKind::Parallel)] {
        let mut cfg = ModelConfig::custom();
        for s in ["image_size=32", "patch=4", "width=64", "depth=2", "mlp_dim=128", "heads=4", "classes=10"] {
            cfg.set(s).unwrap();
        }
        cfg.pool = pool;
        cfg.block = block;
        let cpu_model = VisionTransformer::new(&cfg, DType::BF16, Device::Cpu).unwrap();
        let gpu_model = VisionTransformer::new(&cfg, DType::BF16, gpu).unwrap();
        let init = cpu_model.init_params(5, DType::F32, Device::Cpu).unwrap();
        let mut p = ParamStore::new();
        for (n, t) in init.iter() {
            // Random biases and head, so every fused bias path carries a signal.
            let t = if n.starts_with("head") || n.ends_with("bias") {
                Tensor::randn(t.shape().clone(), 0.0, 0.1, 11, DType::F32, Device::Cpu).unwrap()
            } else {
                t.clone()
            };
            p.insert(n, t.cast(DType::BF16).unwrap()).unwrap();
        }
        let pg = p.to_device(gpu).unwrap();
        let images = Tensor::randn([4, 3, 32, 32], 0.0, 1.0, 1, DType::BF16, Device::Cpu).unwrap();
        let r = Tensor::randn([4, 10], 0.0, 1.0, 2, DType::BF16, Device::Cpu).unwrap();
        let (lc, sc) = cpu_model.forward(&p, &images).unwrap();
        let (lg, sg) = gpu_model.forward(&pg, &images.to_device(gpu).unwrap()).unwrap();
        let e = rel_l2(&lg.to_f32_vec().unwrap(), &lc.to_f32_vec().unwrap());
        assert!(e < 3e-2, "{pool:?} {block:?} logits: relative L2 error {e:.2e}");
        let mut gc = p.zeros_like(DType::F32).unwrap();
        let mut gg = pg.zeros_like(DType::F32).unwrap();
        cpu_model.backward(&p, &sc, &r, &mut gc).unwrap();
        gpu_model.backward(&pg, &sg, &r.to_device(gpu).unwrap(), &mut gg).unwrap();
        for (n, t) in gc.iter() {
            let e = rel_l2(&gg.get(n).unwrap().to_f32_vec().unwrap(), &t.to_f32_vec().unwrap());
            assert!(e < 5e-2, "{pool:?} {block:?} grad {n}: relative L2 error {e:.2e}");
        }
    }
    let report = vit_tensor::cuda::self_check::fast_kernel_report(0).unwrap();
    for name in ["gemm_bias", "gemm_residual", "gemm_gelu_aux_bias", "gemm_wgrad_accumulate", "gemm_bgradb"] {
        let status = report.iter().find(|(k, _)| *k == name).map(|(_, s)| s.to_string());
        assert!(status.as_deref().is_some_and(|s| s.starts_with("passed")), "{name}: {status:?}");
    }
}
