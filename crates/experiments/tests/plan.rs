//! The sharding planner (`vit_experiments::plan`, `vit plan`): parameter bytes against the
//! model's real parameters, sharded shapes against the whole, the ViT-22B setup, FLOPs against
//! `vit_model`, communication formulas, and clear errors for bad meshes.

use std::process::Command;
use vit_experiments::plan::{plan, shard_params, Mesh, ParamSharding, PlanError, PlanSettings, Split};
use vit_model::{ModelConfig, ParamCounts, VisionTransformer};
use vit_optim::{optimizer_state_bytes, AdamWConfig, Algorithm, FactoredAdamConfig, OptimizerConfig};
use vit_tensor::{DType, Device};

fn adamw() -> OptimizerConfig {
    OptimizerConfig::new(Algorithm::AdamW(AdamWConfig::default()), 1e-3)
}

fn factored() -> OptimizerConfig {
    OptimizerConfig::new(Algorithm::FactoredAdam(FactoredAdamConfig::default()), 1e-3)
}

fn preset(name: &str) -> ModelConfig {
    ModelConfig::preset(name).unwrap()
}

/// A small sequential model and a small parallel one with QK-norm and no QKV biases (ViT-22B's
/// block), both with every head kind we shard around.
fn small_models() -> Vec<ModelConfig> {
    let mut seq = ModelConfig::custom();
    for s in ["image_size=32", "patch=8", "width=48", "depth=3", "mlp_dim=96", "heads=4", "classes=10"] {
        seq.set(s).unwrap();
    }
    let mut par = seq.clone();
    for s in ["block=parallel", "qk_norm=true", "qkv_bias=false", "pool=gap", "prelogits=32"] {
        par.set(s).unwrap();
    }
    vec![seq, par]
}

#[test]
fn unsharded_parameter_bytes_are_the_models_real_parameters() {
    let mut models = small_models();
    models.extend(["B/16", "g/14", "22B/14"].map(preset));
    for cfg in models {
        let s = PlanSettings::new(cfg.clone(), Mesh { data: 1, model: 1 }, 8, adamw());
        let p = plan(&s).unwrap();
        let count = ParamCounts::of(&cfg).unwrap().total;
        assert_eq!(p.params_total, count);
        assert_eq!(p.params_per_device, count);
        // f32 master weights and gradients, each tensor padded to 64 bytes (ParamStore).
        let tensors = shard_params(&cfg, 1).unwrap().len() as u64;
        assert!((4 * count..4 * count + 60 * tensors).contains(&p.memory.parameters));
        assert_eq!(p.memory.gradients, p.memory.parameters);
        // AdamW keeps two f32 moments per parameter, plus its 8-byte step counter.
        assert_eq!(p.memory.optimizer, 8 * count + 8);
        // bf16 adds the bf16 compute copy.
        let p16 = plan(&PlanSettings { precision: DType::BF16, ..s }).unwrap();
        assert!((6 * count..6 * count + 120 * tensors).contains(&p16.memory.parameters));
    }
    // A real parameter store of the small models has exactly those bytes.
    for cfg in small_models() {
        let vit = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
        let store = vit.init_params(3, DType::F32, Device::Cpu).unwrap();
        let real: usize = store.buffers().iter().map(|b| b.numel() * 4).sum();
        let p = plan(&PlanSettings::new(cfg, Mesh { data: 1, model: 1 }, 2, factored())).unwrap();
        assert_eq!(p.memory.parameters, real as u64);
        let grads: usize = store.zeros_like(DType::F32).unwrap().buffers().iter().map(|b| b.numel() * 4).sum();
        assert_eq!(p.memory.gradients, grads as u64);
        let shapes = vit.param_shapes().unwrap();
        let opt = optimizer_state_bytes(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())), &factored()).unwrap();
        assert_eq!(p.memory.optimizer, opt);
    }
}

#[test]
fn sharded_shapes_sum_back_to_the_whole() {
    let mut models = small_models();
    models.extend(["B/16", "22B/14"].map(preset));
    for cfg in models {
        let total = ParamCounts::of(&cfg).unwrap().total;
        let whole = shard_params(&cfg, 1).unwrap();
        for m in [2usize, 4] {
            let shards = shard_params(&cfg, m).unwrap();
            assert_eq!(shards.len(), whole.len());
            let (mut sum, mut split) = (0u64, 0usize);
            for (p, w) in shards.iter().zip(&whole) {
                assert_eq!((&p.name, &p.full), (&w.name, &w.local));
                let n = |s: &[usize]| s.iter().product::<usize>() as u64;
                match p.split {
                    Split::Replicated => {
                        assert_eq!(p.local, p.full, "{}", p.name);
                        sum += n(&p.local);
                    }
                    Split::Column => {
                        assert_eq!(p.local[0] * m, p.full[0], "{}", p.name);
                        assert_eq!(p.local[1..], p.full[1..], "{}", p.name);
                        sum += m as u64 * n(&p.local);
                        split += 1;
                    }
                    Split::Row => {
                        assert_eq!((p.local[0], p.local[1] * m), (p.full[0], p.full[1]), "{}", p.name);
                        sum += m as u64 * n(&p.local);
                        split += 1;
                    }
                }
            }
            // The m shards of the split matrices plus one copy of the replicated rest is the model.
            assert_eq!(sum, total, "model={m}");
            // Every block has its matrices split: qkv, proj, fc1, fc2 (+ qkv and fc1 biases), or
            // in_proj, out_proj (+ mlp_bias or in_proj bias).
            let per_block = match cfg.block {
                vit_model::BlockKind::Sequential => 4 + 1 + usize::from(cfg.qkv_bias),
                vit_model::BlockKind::Parallel => 3,
            };
            assert_eq!(split, per_block * cfg.depth, "model={m}");
            // One device holds less than the whole, more than 1/m of it.
            let local: u64 = shards.iter().map(|p| p.local.iter().product::<usize>() as u64).sum();
            assert!(local < total && local * m as u64 > total);
        }
    }
}

fn vit22b(devices: usize, mesh: &str, batch: usize, sharding: ParamSharding) -> PlanSettings {
    let mut s = PlanSettings::new(preset("22B/14"), Mesh::parse(mesh).unwrap(), batch, factored());
    s.devices = devices;
    s.remat = true;
    s.precision = DType::BF16;
    s.sharding = sharding;
    s
}

#[test]
fn vit22b_paper_setup_fits_and_22b_on_8_devices_does_not() {
    let p = plan(&vit22b(1024, "data=256,model=4", 65536, ParamSharding::Full)).unwrap();
    assert!(p.fits, "{p:#?}");
    assert_eq!(p.batch_per_replica, 256);
    assert!(p.memory.total < 80 << 30 && p.memory.total > 4 << 30, "{}", p.memory.total);
    // Without remat the kept activations of 48 blocks do not fit.
    assert!(p.memory_total_other_remat > 80 << 30);
    // A plausible predicted MFU: below the assumed 50% (remat and communication cost), above 20%.
    assert!(p.mfu_overlap > 0.2 && p.mfu_overlap <= 0.5, "{}", p.mfu_overlap);
    assert!(p.mfu_no_overlap <= p.mfu_overlap);

    // Pure data parallelism on 8 GPUs: every device holds all 21.7B parameters (> 200 GB).
    let p = plan(&vit22b(8, "data=8", 256, ParamSharding::None)).unwrap();
    assert!(!p.fits);
    assert!(p.over_by > 150 << 30, "{}", p.over_by);
    assert_eq!(p.over_by, p.memory.total - (80u64 << 30));
    // Tensor- and data-sharded on 8 GPUs at the paper's batch: activations do not fit.
    let p = plan(&vit22b(8, "data=2,model=4", 65536, ParamSharding::Full)).unwrap();
    assert!(!p.fits);
    assert!(p.memory.activations > 80 << 30);
}

#[test]
fn flops_match_the_model_and_split_over_devices() {
    for name in ["B/16", "L/16", "22B/14"] {
        let cfg = preset(name);
        let batch = 64;
        let one = plan(&PlanSettings::new(cfg.clone(), Mesh { data: 1, model: 1 }, batch, factored())).unwrap();
        let want = batch as f64 * cfg.train_flops_per_image();
        assert!((one.model_flops - want).abs() <= 1e-9 * want, "{name}");
        assert_eq!(one.executed_flops, one.model_flops);
        let mut s = PlanSettings::new(cfg.clone(), Mesh { data: 4, model: 4 }, batch, factored());
        s.remat = true;
        let p = plan(&s).unwrap();
        assert!((p.model_flops * 16.0 - want).abs() <= 1e-9 * want, "{name}");
        // remat runs the forward again: 4 forwards' worth instead of 3.
        assert!((p.executed_flops / p.model_flops - 4.0 / 3.0).abs() < 1e-12);
    }
}

#[test]
fn communication_follows_the_ring_formulas() {
    let cfg = preset("B/16");
    let count = ParamCounts::of(&cfg).unwrap().total as f64;
    let p = plan(&PlanSettings::new(cfg.clone(), Mesh { data: 8, model: 1 }, 256, factored())).unwrap();
    assert!((p.comm.data - 2.0 * 7.0 / 8.0 * 4.0 * count).abs() < 1.0);
    assert_eq!(p.comm.model, 0.0);
    // Model axis: 2 all-gathers and 2 reduce-scatters of [b, T, D] per block per pass in the
    // sequential block; the parallel block needs half.
    let p = plan(&PlanSettings::new(cfg.clone(), Mesh { data: 2, model: 4 }, 64, factored())).unwrap();
    let act = 32.0 * 196.0 * 768.0 * 4.0;
    assert!((p.comm.model - 12.0 * 2.0 * 4.0 * 0.75 * act).abs() < 1.0, "{}", p.comm.model);
    let mut par = cfg.clone();
    par.set("block=parallel").unwrap();
    let q = plan(&PlanSettings::new(par, Mesh { data: 2, model: 4 }, 64, factored())).unwrap();
    assert!((q.comm.model * 2.0 - p.comm.model).abs() < 1.0);
    // Overlap never predicts a slower step.
    assert!(p.step_time_overlap <= p.step_time_no_overlap);
    assert!((p.step_time_no_overlap - p.compute_time - p.data_time - p.model_time).abs() < 1e-12);
}

#[test]
fn bad_meshes_are_clear_errors() {
    let s = |mesh: Mesh, devices: usize, batch: usize| {
        let mut s = PlanSettings::new(preset("B/16"), mesh, batch, factored());
        s.devices = devices;
        plan(&s).unwrap_err()
    };
    let e = s(Mesh { data: 4, model: 2 }, 16, 64);
    assert!(matches!(&e, PlanError::Invalid { what, .. } if what == "--devices"), "{e}");
    assert!(e.to_string().contains("8 devices"), "{e}");
    // B/16 has 12 heads.
    let e = s(Mesh { data: 1, model: 5 }, 5, 64).to_string();
    assert!(e.contains("12 heads"), "{e}");
    let e = s(Mesh { data: 3, model: 1 }, 3, 64).to_string();
    assert!(e.contains("--batch = 64") && e.contains("multiple of the data axis (3)"), "{e}");
    let e = Mesh::parse("data=4,pipeline=2").unwrap_err().to_string();
    assert!(e.contains("unknown axis \"pipeline\""), "{e}");
}

fn vit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vit"))
}

#[test]
fn cli_prints_one_json_object_and_fails_clearly() {
    let out = vit()
        .args(["plan", "--model", "22B/14", "--devices", "1024", "--mesh", "data=256,model=4", "--batch", "65536"])
        .args(["--remat", "--precision", "bf16", "--shard-params", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["fits"], true);
    assert_eq!(j["mesh"]["model"], 4);
    assert_eq!(j["sharding"], "full");
    for field in ["memory", "comm", "model_flops", "step_time_overlap", "mfu_overlap", "over_by"] {
        assert!(j.get(field).is_some(), "{field} missing in {j}");
    }

    let out = vit()
        .args(["plan", "--model", "B/16", "--devices", "8", "--mesh", "data=2,model=3", "--batch", "8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--devices = 8") && err.contains("6 devices"), "{err}");
    let out = vit()
        .args([
            "plan",
            "--model",
            "B/16",
            "--devices",
            "8",
            "--mesh",
            "data=8",
            "--batch",
            "8",
            "--link-bw",
            "infiniband=1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown axis `infiniband`"));
    // The human-readable form says whether it fits and by how much it does not.
    let out = vit()
        .args(["plan", "--model", "22B/14", "--devices", "8", "--mesh", "data=8", "--batch", "256"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fits: NO, over by"), "{text}");
}
