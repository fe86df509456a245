//! Parity with timm: fixtures made by tests/reference/make_timm_fixtures.py (PyTorch + timm)
//! hold random timm weights, images, timm's logits and gradients. Imported into vitrs, the same
//! model must give the same logits and gradients (relative error < 1e-4 in f32, issue 3).

use std::{collections::HashMap, path::PathBuf};
use vit_model::{checkpoint::read_safetensors, import::timm::params_from_timm, ModelConfig, VisionTransformer};
use vit_tensor::{DType, Device, Tensor};

/// `parallel_qknorm_map`: parallel blocks, QK-norm and `qkv_bias = false`, with a MAP head
/// whose attention keeps its q/kv biases (timm `AttentionPoolLatent`).
const KINDS: [&str; 5] = ["vit_tok", "vit_gap", "vit_map", "parallel_qknorm", "parallel_qknorm_map"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn config(kind: &str) -> ModelConfig {
    let text = std::fs::read_to_string(fixture(&format!("{kind}.json"))).unwrap();
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut cfg = ModelConfig::custom();
    for (k, v) in json {
        let v = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
        cfg.set(&format!("{k}={v}")).unwrap();
    }
    cfg.validate().unwrap();
    cfg
}

/// `max |a − b| / max |b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn logits_and_gradients_match_timm() {
    for kind in KINDS {
        let cfg = config(kind);
        let model = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
        let timm = read_safetensors(fixture(&format!("{kind}.timm.safetensors"))).unwrap();
        let params = params_from_timm(&model, timm, Device::Cpu).unwrap();
        let io: HashMap<String, Tensor> =
            read_safetensors(fixture(&format!("{kind}.io.safetensors"))).unwrap().into_iter().collect();
        let (logits, saved) = model.forward(&params, &io["images"]).unwrap();
        let e = rel_err(&logits, &io["logits"]);
        assert!(e < 1e-4, "{kind}: logits relative error {e}");
        let mut g = params.zeros_like(DType::F32).unwrap();
        let dimages = model.backward(&params, &saved, &io["r"], &mut g).unwrap();
        let mut checked = 0;
        for (name, want) in &io {
            let Some(pname) = name.strip_prefix("grad.") else { continue };
            let got = if pname == "images" { dimages.clone() } else { g.get(pname).unwrap().clone() };
            let e = rel_err(&got, want);
            assert!(e < 1e-4, "{kind}: gradient of {pname}: relative error {e}");
            checked += 1;
        }
        assert!(checked >= 7, "{kind}: only {checked} gradients in the fixture");
    }
}

#[test]
fn map_head_biases_of_a_model_without_qkv_bias_are_imported_and_checked() {
    let kind = "parallel_qknorm_map";
    let cfg = config(kind);
    assert!(!cfg.qkv_bias);
    let io = read_safetensors(fixture(&format!("{kind}.io.safetensors"))).unwrap();
    for b in ["attn_pool.q.bias", "attn_pool.kv.bias", "attn_pool.proj.bias"] {
        assert!(io.iter().any(|(n, _)| n == &format!("grad.{b}")), "{kind}: the fixture lacks the gradient of {b}");
    }
    let model = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
    let timm = read_safetensors(fixture(&format!("{kind}.timm.safetensors"))).unwrap();
    let params = params_from_timm(&model, timm.clone(), Device::Cpu).unwrap();
    let q_bias = &timm.iter().find(|(n, _)| n == "attn_pool.q.bias").unwrap().1;
    assert_eq!(params.get("attn_pool.q.bias").unwrap().to_f32_vec().unwrap(), q_bias.to_f32_vec().unwrap());
    // The head's biases are required, not optional.
    let mut without = timm;
    without.retain(|(n, _)| n != "attn_pool.kv.bias");
    let e = params_from_timm(&model, without, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing 1 [attn_pool.kv.bias]"), "{e}");
}

#[test]
fn import_reports_every_problem_at_once() {
    let cfg = config("vit_tok");
    let model = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
    let mut timm = read_safetensors(fixture("vit_tok.timm.safetensors")).unwrap();
    timm.retain(|(n, _)| n != "blocks.1.mlp.fc1.bias");
    for (n, t) in timm.iter_mut() {
        if n == "head.weight" {
            *t = Tensor::zeros([4, 32], DType::F32, Device::Cpu).unwrap();
        }
    }
    timm.push(("reg_token".into(), Tensor::zeros([1, 4, 32], DType::F32, Device::Cpu).unwrap()));
    let mut with_fc_norm = timm.clone();
    let e = params_from_timm(&model, timm, Device::Cpu).unwrap_err().to_string();
    for needle in [
        "missing 1 [blocks.1.mlp.fc1.bias]",
        "head.weight: expected [5, 32], found [4, 32]",
        "unexpected 1 [reg_token]",
    ] {
        assert!(e.contains(needle), "error lacks {needle:?}: {e}");
    }
    // timm's post-pooling norm has no vitrs counterpart: refused with the way out.
    with_fc_norm.push(("fc_norm.weight".into(), Tensor::zeros([32], DType::F32, Device::Cpu).unwrap()));
    let e = params_from_timm(&model, with_fc_norm, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("fc_norm=False"), "{e}");
}
