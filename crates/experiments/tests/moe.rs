//! V-MoE through the `vit` tool (issue 11): `vit params` counts, a tiny V-MoE trains on the
//! bundled data with its MoE statistics in metrics.jsonl, its checkpoint round-trips, and a
//! resumed run equals a straight one exactly.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vit")).current_dir(root()).args(args).output().expect("run vit")
}

fn run_ok(args: &[&str]) -> std::process::Output {
    let out = vit(args);
    assert!(
        out.status.success(),
        "vit {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&run_ok(args).stdout).expect("one JSON object")
}

#[test]
fn params_counts_the_vmoe_presets_their_active_parameters_and_flops() {
    let j = json(&["params", "--model", "V-MoE-15B", "--json"]);
    assert_eq!(j["total"].as_u64(), Some(14_705_071_769));
    assert_eq!(j["active_per_token"].as_u64(), Some(1_723_322_009));
    let sets = ["--set", "classes=18291", "--set", "prelogits=768"];
    let mut args = vec!["params", "--model", "V-MoE-B/16", "--set", "moe.experts=32", "--json"];
    args.extend(sets);
    let moe = json(&args);
    assert_eq!(moe["total"].as_u64(), Some(978_974_835));
    let mut args = vec!["params", "--model", "V-MoE-B/16", "--set", "moe=none", "--json"];
    args.extend(sets);
    let dense = json(&args);
    assert_eq!(dense["total"].as_u64(), Some(100_455_027));
    // k = 2 at C = 1.05 runs about twice the MLP work of the dense twin in each MoE block.
    let (f, fd) =
        (moe["forward_flops_per_image"].as_f64().unwrap(), moe["dense_forward_flops_per_image"].as_f64().unwrap());
    assert!(f > 1.2 * fd && f < 1.5 * fd, "{f} vs {fd}");
    assert_eq!(dense["forward_flops_per_image"].as_f64(), Some(fd));
    let out = vit(&["params", "--model", "V-MoE-B/16", "--set", "moe.k=33"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("moe.k = 33: expected 1 to moe.experts (32)") && err.trim().lines().count() == 1, "{err}");
}

/// A tiny V-MoE on the bundled subset: 2 blocks (block 1 a MoE of 4 experts, k = 2), groups of
/// 4 images, BPR, with a capacity that drops some assignments.
const TINY: &[&str] = &[
    "--set",
    "model.width=32",
    "--set",
    "model.depth=2",
    "--set",
    "model.mlp_dim=64",
    "--set",
    "model.moe.experts=4",
    "--set",
    "model.moe.k=2",
    "--set",
    "model.moe.capacity=0.8",
    "--set",
    "model.moe.group_size=4",
    "--set",
    "data.train_limit=512",
    "--set",
    "data.test_limit=128",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.grad_accum=2",
    "--set",
    "train.steps=12",
    "--set",
    "schedule.warmup_steps=2",
    "--set",
    "optimizer.lr=1e-2",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.log_every=1",
];

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_tiny_vmoe_trains_logs_its_routing_and_resumes_exactly() {
    let tmp = tempfile::Builder::new().prefix("vitrs-moe-test-").tempdir().unwrap();
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));
    let mut args = vec!["train", "--out", straight.to_str().unwrap()];
    args.extend(TINY);
    run_ok(&args);
    let m = metrics(&straight);
    assert_eq!(m.len(), 12);
    let losses: Vec<f64> = m.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    assert!(losses.iter().all(|l| l.is_finite()));
    for line in &m {
        let layer = &line["moe"]["1"];
        let load: Vec<f64> = layer["load"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(load.len(), 4, "{line}");
        assert!((load.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{line}");
        let dropped = layer["dropped"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&dropped), "{line}");
        assert!(layer["importance_loss"].as_f64().unwrap() >= 0.0 && layer["load_loss"].as_f64().unwrap() >= 0.0);
        assert!(layer["aux_loss"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["moe"].get("0").is_none(), "block 0 is dense");
    }
    // The checkpoint keeps the MoE config and the parameters; the model reloads from it.
    let ckpt =
        vit_model::checkpoint::load_checkpoint(straight.join("step-12.safetensors"), vit_tensor::Device::Cpu).unwrap();
    let moe = ckpt.config.moe.clone().expect("the checkpoint's config has its moe table");
    assert_eq!((moe.experts, moe.k, moe.capacity, moe.group_size), (4, 2, 0.8, 4));
    assert_eq!(ckpt.params.get("blocks.1.moe.experts.fc1.weight").unwrap().dims(), &[4, 64, 32]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("summary.json")).unwrap()).unwrap();
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.1, "{summary}");
    run_ok(&["eval", "--checkpoint", straight.join("step-12.safetensors").to_str().unwrap()]);

    let mut args = vec!["train", "--out", resumed.to_str().unwrap(), "--stop-at", "5"];
    args.extend(TINY);
    assert_eq!(vit(&args).status.code(), Some(3));
    run_ok(&["train", "--resume", resumed.to_str().unwrap()]);
    let again: Vec<f64> = metrics(&resumed).iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses, again, "the resumed V-MoE run differs from the straight one");
    assert_eq!(
        std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap().lines().map(strip_speed).collect::<Vec<_>>(),
        std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap().lines().map(strip_speed).collect::<Vec<_>>(),
        "the MoE statistics of the resumed run differ"
    );
}

/// A metrics line without its timing field (which differs between runs).
fn strip_speed(line: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v.as_object_mut().unwrap().remove("images_per_second");
    v.to_string()
}
