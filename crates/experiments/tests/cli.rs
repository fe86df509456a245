//! The `vit` binary end to end: outputs, and one-line errors with exit code 1.

use std::process::{Command, Output};

fn vit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vit")).args(args).output().expect("run vit")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = vit(args);
    assert!(out.status.success(), "vit {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn params_json_reproduces_reference_counts() {
    // reference.md §1, each by its own convention.
    let enc = |m: &str| json(&["params", "--model", m, "--json"])["encoder"].as_u64().unwrap();
    assert_eq!(enc("S/16"), 21_664_896);
    assert_eq!(enc("ViT-B/16"), 85_797_120);
    assert_eq!(enc("b/32"), 87_453_696);
    assert_eq!(enc("L/16"), 303_299_584);
    assert_eq!(enc("g/14"), 1_011_199_616);
    assert_eq!(enc("G/14"), 1_842_772_352);
    let h = json(&["params", "--model", "H/14", "--set", "pool=tok", "--json"]);
    assert_eq!(h["total"].as_u64(), Some(632_045_800));
    let e = json(&["params", "--model", "e/14", "--set", "classes=29593", "--json"]);
    assert_eq!(e["total"].as_u64(), Some(3_926_402_969));
    let g = json(&["params", "--model", "22B/14", "--json"]);
    assert_eq!(g["matmul"].as_u64(), Some(12 * 48 * 6144 * 6144));
}

#[test]
fn optimizer_state_bytes_match_scaling_vit_ratios() {
    // Scaling ViT §3.4 on G/14: AdamW keeps 2x the f32 parameter bytes, factored Adam about 0.5x.
    let ratio = |opt: &str| {
        let j = json(&["params", "--model", "G/14", "--optimizer", opt, "--json"]);
        j["optimizer_state_bytes"].as_u64().unwrap() as f64 / (4.0 * j["total"].as_u64().unwrap() as f64)
    };
    assert!((ratio("adamw") - 2.0).abs() < 1e-6, "adamw {}", ratio("adamw"));
    let f = ratio("factored-adam");
    assert!((0.5..0.51).contains(&f), "factored adam {f}");
    assert!((ratio("sgd") - 0.5).abs() < 1e-6, "sgd {}", ratio("sgd"));
    // 22B is counted from shapes: nothing of its size is allocated.
    let j = json(&["params", "--model", "22B/14", "--optimizer", "factored-adam", "--json"]);
    assert!(j["optimizer_state_bytes"].as_u64().unwrap() > 20_000_000_000);
}

#[test]
fn bad_input_is_one_line_and_exit_code_1() {
    for (args, needle) in [
        (&["params", "--model", "B/17"][..], "unknown model \"B/17\""),
        (&["params", "--model", "B/16", "--set", "pool=bad"][..], "pool"),
        (&["params", "--model", "B/16", "--set", "nonsense=1"][..], "nonsense"),
        (&["params", "--model", "B/16", "--set", "heads=7"][..], "heads"),
    ] {
        let out = vit(args);
        assert_eq!(out.status.code(), Some(1), "vit {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one line for {args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "vit {args:?}: {err}");
    }
}

#[test]
fn devices_reports_without_panicking() {
    let d = json(&["devices", "--json"]);
    assert!(d["cpu_threads"].as_u64().unwrap() >= 1);
    assert_eq!(d["cpu"].as_str(), Some(vit_tensor::cpu::CpuInfo::detect().to_string().as_str()), "{d}");
    assert!(d["cuda_devices"].is_u64());
    // NCCL's version where a GPU and libnccl are present, else null (never a panic).
    assert!(d["nccl"].is_string() || d["nccl"].is_null(), "{}", d["nccl"]);
    if d["cuda_devices"] == 0 {
        assert!(d["nccl"].is_null(), "NCCL reported without a CUDA device: {}", d["nccl"]);
    }
}

fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

/// `--set` arguments describing a fixture's model (from its JSON).
fn fixture_sets(kind: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join(format!("{kind}.json"))).unwrap();
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    json.into_iter()
        .flat_map(|(k, v)| {
            ["--set".to_string(), format!("{k}={}", v.as_str().map(str::to_string).unwrap_or(v.to_string()))]
        })
        .collect()
}

#[test]
fn convert_then_predict_reproduces_timm_logits() {
    let tmp = tempfile::Builder::new().prefix("vitrs-cli-test-").tempdir().unwrap();
    let dir = tmp.path();
    for kind in ["vit_map", "parallel_qknorm", "parallel_qknorm_map"] {
        let ckpt = dir.join(format!("{kind}.safetensors"));
        let input = fixtures().join(format!("{kind}.timm.safetensors"));
        let mut args = vec!["convert", "--from", "timm", input.to_str().unwrap(), "--out", ckpt.to_str().unwrap()];
        let sets = fixture_sets(kind);
        args.extend(sets.iter().map(String::as_str));
        let out = vit(&args);
        assert!(out.status.success(), "convert {kind}: {}", String::from_utf8_lossy(&out.stderr));
        let images = fixtures().join(format!("{kind}.io.safetensors"));
        let logits = dir.join(format!("{kind}.logits.safetensors"));
        let out = vit(&[
            "predict",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--output",
            logits.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "predict {kind}: {}", String::from_utf8_lossy(&out.stderr));
        let got = vit_model::checkpoint::read_safetensors(&logits).unwrap();
        let want = vit_model::checkpoint::read_safetensors(&images).unwrap();
        let (got, want) =
            (&got.iter().find(|(n, _)| n == "logits").unwrap().1, &want.iter().find(|(n, _)| n == "logits").unwrap().1);
        assert_eq!(got.dims(), want.dims());
        let (g, w) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = g.iter().zip(&w).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err < 1e-4, "{kind}: relative error {err}");
    }
    // Converting with the wrong config names every mismatch, on one line, exit 1.
    let input = fixtures().join("vit_tok.timm.safetensors");
    let out = vit(&[
        "convert",
        "--from",
        "timm",
        input.to_str().unwrap(),
        "--model",
        "Ti/16",
        "--out",
        dir.join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: timm state dict") && err.contains("misshaped") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    let out = vit(&["convert", "--from", "keras", input.to_str().unwrap(), "--out", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from keras: expected timm"));
    let out = vit(&["predict", "--checkpoint", input.to_str().unwrap(), "--images", "x", "--output", "y"]);
    assert_eq!(out.status.code(), Some(1), "a timm file is not a vitrs checkpoint");
}

#[test]
fn train_without_arguments_works_in_an_empty_folder() {
    // The quickstart recipe reads the Fashion-MNIST subset embedded in the binary, so it needs
    // nothing from the repository: as after `cargo install`, run from an empty folder.
    let tmp = tempfile::Builder::new().prefix("vitrs-cli-empty-").tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vit"))
        .current_dir(tmp.path())
        .args(["train", "--set", "train.steps=3", "--set", "schedule.warmup_steps=1"])
        .output()
        .expect("run vit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vit train in an empty folder: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("done: 3 steps") && stdout.contains("test accuracy"), "{stdout}");
    let run = tmp.path().join("runs/quickstart");
    for f in ["config.toml", "metrics.jsonl", "summary.json", "step-3.safetensors"] {
        assert!(run.join(f).is_file(), "{f} missing from {}", run.display());
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"].as_u64(), Some(3));
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{summary}");
    // The hypervisor's share of the CPU during the run: a fraction on Linux, null elsewhere.
    match summary["cpu_steal"].as_f64() {
        Some(steal) => assert!((0.0..=1.0).contains(&steal), "{summary}"),
        None => assert!(summary["cpu_steal"].is_null() && !cfg!(target_os = "linux"), "{summary}"),
    }
    // The resolved config keeps the bundled path, so eval from the run directory works too.
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("path = \"bundled:fashion-mnist-small\""), "{config}");
    let out = Command::new(env!("CARGO_BIN_EXE_vit"))
        .current_dir(tmp.path())
        .args(["eval", "--checkpoint", "runs/quickstart/step-3.safetensors", "--json"])
        .output()
        .expect("run vit");
    assert!(out.status.success(), "vit eval in the same folder: {}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["examples"].as_u64(), Some(2_000), "the bundled test split: {e}");
}

/// `vit bench` arguments of a tiny custom model on the CPU in f32 (width 32, depth 1, MLP 64,
/// 2 heads, 16 px, patch 8, 5 classes), with `sets` added, `batch` images and `steps` timed
/// steps after one warm-up step.
fn tiny_bench_args(sets: &[&str], batch: usize, steps: usize) -> Vec<String> {
    let mut args: Vec<String> = ["--model", "custom"].map(String::from).to_vec();
    let model = ["width=32", "depth=1", "mlp_dim=64", "heads=2", "image_size=16", "patch=8", "classes=5"];
    for s in model.iter().chain(sets) {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let (batch, steps) = (batch.to_string(), steps.to_string());
    args.extend(
        ["--batch", &batch, "--steps", &steps, "--warmup", "1", "--device", "cpu", "--precision", "f32"]
            .map(String::from),
    );
    args
}

#[test]
fn bench_train_reports_rate_and_model_flops_on_the_cpu() {
    let tiny = tiny_bench_args(&[], 4, 3);
    let tiny: Vec<&str> = tiny.iter().map(String::as_str).chain(["--json"]).collect();
    let r = json(&[&["bench", "train"][..], &tiny[..]].concat());
    assert_eq!(r["timed_steps"], 3);
    let (rate, ms) = (r["images_per_second"].as_f64().unwrap(), r["step_ms"].as_f64().unwrap());
    assert!(rate > 0.0 && (rate - 4.0 / (ms / 1e3)).abs() < 1e-6 * rate, "{r}");
    // 4 tokens of width 32: 3 × the forward FLOPs per image, times images/s.
    let fwd = 2.0 * 4.0 * 192.0 * 32.0
        + (2.0 * 4.0 * 32.0 * (4.0 * 32.0 + 128.0) + 4.0 * 16.0 * 32.0)
        + (2.0 * 32.0 * 32.0 * 2.0 + 2.0 * 4.0 * 32.0 * 64.0 + 4.0 * 4.0 * 32.0 + 2.0 * 32.0 * 64.0 * 2.0)
        + 2.0 * 32.0 * 5.0;
    let tflops = r["model_tflops"].as_f64().unwrap();
    assert!((tflops - 3.0 * fwd * rate / 1e12).abs() < 1e-9 * tflops.max(1e-12), "{r}");
    let per_image = r["model_flops_per_image"].as_f64().unwrap();
    assert!((per_image - 3.0 * fwd).abs() < 1e-9 * fwd, "{r}");
    let gflops = r["model_gflops"].as_f64().unwrap();
    assert!((gflops - 3.0 * fwd * rate / 1e9).abs() < 1e-9 * gflops, "{r}");
    assert!(r["mfu"].is_null() && r["peak_memory_bytes"].is_null() && r["error"].is_null(), "{r}");
    assert_eq!(r["cpu"].as_str(), Some(vit_tensor::cpu::CpuInfo::detect().to_string().as_str()), "{r}");
    let bad = vit(&["bench", "train", "--batch", "0", "--device", "cpu"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--batch 0: expected at least one image"));
}

#[test]
fn bench_train_with_bf16_matmuls_times_each_step_against_its_f32_twin() {
    // Width 64 and 64 tokens of batch 2: the linear layers' products are at least 32 in every
    // dimension, so they take the bf16 path (the AMX tiles where this CPU has them).
    let tiny = tiny_bench_args(&["width=64", "mlp_dim=128", "image_size=32", "patch=4"], 2, 3);
    let tiny: Vec<&str> = tiny.iter().map(String::as_str).chain(["--json"]).collect();
    let r = json(&[&["bench", "train"][..], &tiny[..], &["--matmul-precision", "bf16"][..]].concat());
    assert_eq!(r["matmul_precision"], "bf16", "{r}");
    assert_eq!(r["timed_steps"], 3, "{r}");
    let (rate, f32_rate) =
        (r["images_per_second"].as_f64().unwrap(), r["f32_matmul_images_per_second"].as_f64().unwrap());
    let x = r["speedup_vs_f32_matmul"].as_f64().unwrap();
    assert!(rate > 0.0 && f32_rate > 0.0 && (x - rate / f32_rate).abs() <= 1e-12 * x, "{r}");
    assert!(r["error"].is_null(), "{r}");
    let plain = json(&[&["bench", "train"][..], &tiny[..]].concat());
    assert_eq!(plain["matmul_precision"], "f32", "{plain}");
    assert!(plain["f32_matmul_images_per_second"].is_null() && plain["speedup_vs_f32_matmul"].is_null(), "{plain}");
    for (args, want) in [
        (
            &["bench", "train", "--matmul-precision", "bf16", "--device", "cuda:0"][..],
            "--matmul-precision bf16 on cuda:0",
        ),
        (&["bench", "train", "--matmul-precision", "tf32", "--device", "cpu"][..], "tf32"),
    ] {
        let bad = vit(args);
        assert_ne!(bad.status.code(), Some(0), "{args:?}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn bench_train_with_patch_dropout_counts_the_flops_of_the_tokens_kept() {
    // 16 patches of 4 px, GAP: dropping 0.5 keeps 8 tokens per image, and the patch projection
    // runs on those 8 only.
    let tiny = tiny_bench_args(&["patch=4", "pool=gap"], 4, 2);
    let tiny: Vec<&str> = tiny.iter().map(String::as_str).chain(["--json"]).collect();
    let r = json(&[&["bench", "train"][..], &tiny[..], &["--patch-dropout", "0.5"][..]].concat());
    assert_eq!(r["patch_dropout"], 0.5, "{r}");
    let block = |n: f64| 2.0 * n * 32.0 * (4.0 * 32.0 + 128.0) + 4.0 * n * n * 32.0;
    let fwd = 2.0 * 8.0 * 48.0 * 32.0 + block(8.0) + 2.0 * 32.0 * 5.0;
    let per_image = r["model_flops_per_image"].as_f64().unwrap();
    assert!((per_image - 3.0 * fwd).abs() < 1e-9 * fwd, "{r}");
    assert!(r["images_per_second"].as_f64().unwrap() > 0.0 && r["error"].is_null(), "{r}");
    // The reference of the ratio is timed in the same run, with every token.
    let (rate, every) =
        (r["images_per_second"].as_f64().unwrap(), r["every_token_images_per_second"].as_f64().unwrap());
    let x = r["speedup_vs_every_token"].as_f64().unwrap();
    assert!(every > 0.0 && (x - rate / every).abs() <= 1e-12 * x, "{r}");
    let plain = json(&[&["bench", "train"][..], &tiny[..]].concat());
    assert!(plain["every_token_images_per_second"].is_null() && plain["speedup_vs_every_token"].is_null(), "{plain}");
    for (args, want) in [
        (["bench", "train", "--patch-dropout", "1"], "--patch-dropout 1: expected a fraction of the patches in [0, 1)"),
        (["bench", "infer", "--patch-dropout", "0.5"], "--patch-dropout 0.5 with infer"),
    ] {
        let bad = vit(&[&args[..], &["--device", "cpu"][..]].concat());
        assert_eq!(bad.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&bad.stderr)
        );
    }
}

#[test]
fn bench_infer_reports_forward_flops_and_gflops_on_the_cpu() {
    let tiny = tiny_bench_args(&["pool=tok"], 3, 4);
    let tiny: Vec<&str> = tiny.iter().map(String::as_str).collect();
    let r = json(&[&["bench", "infer"][..], &tiny[..], &["--json"][..]].concat());
    assert_eq!(r["what"], "infer", "{r}");
    assert_eq!(r["timed_steps"], 4, "{r}");
    assert_eq!(r["optimizer"], "none", "{r}");
    let (rate, ms) = (r["images_per_second"].as_f64().unwrap(), r["step_ms"].as_f64().unwrap());
    assert!(rate > 0.0 && (rate - 3.0 / (ms / 1e3)).abs() < 1e-6 * rate, "{r}");
    // 4 patches + the class token = 5 tokens of width 32, no MAP head: 1 × the forward FLOPs.
    let fwd =
        2.0 * 4.0 * 192.0 * 32.0 + (2.0 * 5.0 * 32.0 * (4.0 * 32.0 + 128.0) + 4.0 * 25.0 * 32.0) + 2.0 * 32.0 * 5.0;
    let per_image = r["model_flops_per_image"].as_f64().unwrap();
    assert!((per_image - fwd).abs() < 1e-9 * fwd, "{r}");
    let (tflops, gflops) = (r["model_tflops"].as_f64().unwrap(), r["model_gflops"].as_f64().unwrap());
    assert!((gflops - fwd * rate / 1e9).abs() < 1e-9 * gflops, "{r}");
    assert!((tflops * 1e3 - gflops).abs() < 1e-9 * gflops, "{r}");
    assert!(r["mfu"].is_null() && r["error"].is_null(), "{r}");
    // The text report prints GFLOP/s on the CPU (TFLOP/s would round to 0.0 here).
    let text = vit(&[&["bench", "infer"][..], &tiny[..]].concat());
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("model GFLOP/s") && !stdout.contains("TFLOP/s"), "{stdout}");
    assert!(stdout.starts_with("infer custom"), "{stdout}");
    let bad = vit(&["bench", "infer", "--steps", "0", "--device", "cpu"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--steps 0: expected at least one timed step"));
}
