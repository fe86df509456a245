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

/// `vit eval --json` of `ckpt` with `extra` arguments.
fn eval_json(ckpt: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["eval", "--checkpoint", ckpt, "--json"];
    args.extend(extra);
    json(&args)
}

/// A failing `vit eval` of `ckpt` with `extra`: exit code 1 and its one-line error.
fn eval_err(ckpt: &str, extra: &[&str]) -> String {
    let mut args = vec!["eval", "--checkpoint", ckpt];
    args.extend(extra);
    let out = vit(&args);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(1), "vit {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn eval_changes_the_routing_knobs_at_inference_and_sweeps_capacity_with_bpr_and_vanilla() {
    let tmp = tempfile::Builder::new().prefix("vitrs-moe-eval-test-").tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--out", run.to_str().unwrap()];
    args.extend(TINY);
    run_ok(&args);
    let ckpt = run.join("step-12.safetensors");
    let ckpt = ckpt.to_str().unwrap();

    // The checkpoint's own knobs, then changed ones: they reach the model (the echo and the
    // dropped share follow them).
    let base = eval_json(ckpt, &[]);
    assert_eq!(base["moe"], serde_json::json!({ "capacity": 0.8, "k": 2, "group_size": 4, "bpr": true }), "{base}");
    let base_dropped = base["dropped"]["1"].as_f64().unwrap();
    assert!(base_dropped > 0.0 && base_dropped < 1.0, "C = 0.8 drops some assignments: {base}");
    assert_eq!(base["dropped"].as_object().unwrap().len(), 1, "one MoE block: {base}");
    let changed = eval_json(ckpt, &["--set", "model.moe.capacity=0.5", "--set", "model.moe.k=1"]);
    assert_eq!(changed["moe"], serde_json::json!({ "capacity": 0.5, "k": 1, "group_size": 4, "bpr": true }));
    assert!(changed["accuracy"].as_f64().unwrap() >= 0.0 && changed["loss"].as_f64().unwrap().is_finite());
    let roomy = eval_json(ckpt, &["--set", "moe.capacity=2"]);
    assert_eq!(roomy["dropped"]["1"].as_f64(), Some(0.0), "C = E/k leaves room for every token: {roomy}");
    assert_ne!(roomy["loss"], base["loss"], "the capacity changed nothing: {roomy} vs {base}");

    // Bad knobs: one line naming the key and what was expected.
    let err = eval_err(ckpt, &["--set", "model.moe.k=5"]);
    assert!(err.contains("moe.k = 5: expected 1 to moe.experts (4)"), "{err}");
    let err = eval_err(ckpt, &["--set", "model.moe.capacity=0"]);
    assert!(err.contains("moe.capacity") && err.contains("positive"), "{err}");
    let err = eval_err(ckpt, &["--set", "model.moe.capacity=lots"]);
    assert!(err.contains("moe.capacity") && err.contains("lots"), "{err}");
    let err = eval_err(ckpt, &["--set", "model.width=64"]);
    assert!(err.contains("model.width: not an inference knob") && err.contains("model.moe.capacity"), "{err}");
    let err = eval_err(ckpt, &["--sweep", "model.moe.bpr=true,false"]);
    assert!(err.contains("model.moe.bpr"), "{err}");
    let err = eval_err(ckpt, &["--sweep", "model.moe.capacity=0.5,-1"]);
    assert!(err.contains("moe.capacity = -1"), "{err}");

    // The sweep: one row per value, BPR and vanilla side by side.
    let caps = ["0.25", "0.5", "0.75", "1.0", "1.25", "2.0"];
    let s = eval_json(ckpt, &["--sweep", &format!("model.moe.capacity={}", caps.join(","))]);
    assert_eq!(s["key"], "model.moe.capacity");
    let rows = s["rows"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["value"].as_str().unwrap()).collect::<Vec<_>>(), caps);
    let dropped = |r: &serde_json::Value, col: &str| r[col]["dropped"]["1"].as_f64().unwrap();
    for (row, next) in rows.iter().zip(&rows[1..]) {
        for col in ["bpr", "vanilla"] {
            // With one MoE layer the routing choices do not depend on the capacity: an expert
            // with n assignments drops max(0, n − capacity) of them, whatever the order.
            assert!(dropped(next, col) <= dropped(row, col), "more capacity dropped more: {row} {next}");
        }
    }
    for row in rows {
        assert_eq!(dropped(row, "bpr"), dropped(row, "vanilla"), "the order changes which, not how many: {row}");
        for col in ["bpr", "vanilla"] {
            let a = row[col]["accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&a) && row[col]["loss"].as_f64().unwrap().is_finite(), "{row}");
        }
    }
    assert!(dropped(&rows[0], "bpr") > 0.3, "C = 0.25 drops most assignments: {}", rows[0]);
    // Nothing dropped: the experts see the same tokens under either order, bit for bit.
    let last = rows.last().unwrap();
    assert_eq!(dropped(last, "bpr"), 0.0);
    assert_eq!(last["bpr"]["accuracy"], last["vanilla"]["accuracy"]);
    assert_eq!(last["bpr"]["loss"], last["vanilla"]["loss"], "{last}");
    // Where something is dropped, BPR and vanilla route differently.
    assert_ne!(rows[0]["bpr"]["loss"], rows[0]["vanilla"]["loss"], "{}", rows[0]);
    // And --set of the checkpoint's own value reproduces the sweep's row.
    let one = eval_json(ckpt, &["--set", "model.moe.capacity=0.5", "--set", "model.moe.bpr=false"]);
    assert_eq!(one["loss"], rows[1]["vanilla"]["loss"]);

    // The text table: a header and one row per capacity with both columns.
    let out = run_ok(&["eval", "--checkpoint", ckpt, "--sweep", "model.moe.capacity=0.25,1.0,2.0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[1].contains("BPR top-1") && lines[1].contains("vanilla top-1"), "{text}");
    for (line, cap) in lines[2..].iter().zip(["0.25", "1.0", "2.0"]) {
        assert_eq!(line.split_whitespace().next(), Some(cap), "{text}");
        assert_eq!(line.split_whitespace().count(), 7, "{text}");
    }
}
