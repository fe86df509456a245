//! `vit train` end to end on the bundled data: it learns, a resumed run equals a straight one
//! exactly, and bad input ends with one line and exit code 1 (issue 5).

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vit")).current_dir(root()).args(args).output().expect("run vit")
}

/// A fresh temp folder for one test's run directories, removed when dropped.
fn tmp_root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vitrs-train-test-").tempdir().unwrap()
}

/// A tiny, fast recipe on the bundled subset.
const TINY: &[&str] = &[
    "--set",
    "model.width=32",
    "--set",
    "model.depth=2",
    "--set",
    "model.mlp_dim=64",
    "--set",
    "data.train_limit=1024",
    "--set",
    "data.test_limit=256",
    "--set",
    "train.batch_size=32",
    "--set",
    "train.steps=40",
    "--set",
    "schedule.warmup_steps=5",
    "--set",
    "optimizer.lr=1e-2",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.log_every=1",
];

fn losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn run_ok(args: &[&str]) {
    let out = vit(args);
    assert!(
        out.status.success(),
        "vit {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tiny_run_lowers_the_loss_and_writes_its_run_directory() {
    let root_tmp = tmp_root();
    let tmp = |name: &str| root_tmp.path().join(name);
    let dir = tmp("tiny");
    let mut args = vec!["train", "--out", dir.to_str().unwrap()];
    args.extend(TINY);
    run_ok(&args);
    let l = losses(&dir);
    assert_eq!(l.len(), 40);
    let (first, last) = (l[..5].iter().sum::<f64>() / 5.0, l[35..].iter().sum::<f64>() / 5.0);
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    for f in ["config.toml", "metrics.jsonl", "curves.svg", "summary.json", "step-40.safetensors"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    for k in ["steps", "train_loss", "test_accuracy", "images_per_second", "wall_seconds"] {
        assert!(s[k].is_number(), "summary.json lacks {k}: {s}");
    }
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.3, "{s}");
    // The CPU it ran on, as the kernels see it (rates depend on it).
    assert_eq!(s["cpu"].as_str(), Some(vit_tensor::cpu::CpuInfo::detect().to_string().as_str()), "{s}");
    // eval and the trainer's final evaluation agree with an accuracy computed here from the
    // checkpoint and the IDX files; fewshot runs on the frozen features.
    let ckpt = dir.join("step-40.safetensors");
    let want = checkpoint_accuracy(&ckpt, 256);
    let out = vit(&["eval", "--checkpoint", ckpt.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["examples"].as_u64(), Some(256));
    assert_eq!(e["accuracy"].as_f64(), Some(want), "vit eval against the accuracy counted here");
    assert_eq!(s["test_accuracy"].as_f64(), Some(want), "the trainer's evaluation against the one counted here");
    let out = vit(&["fewshot", "--checkpoint", ckpt.to_str().unwrap(), "--shots", "1,5", "--seeds", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["1shot", "5shot"] {
        let m = f[k]["mean"].as_f64().unwrap();
        assert!(m > 0.15 && m <= 1.0, "{k}: {f}");
        assert_eq!(f[k]["per_seed"].as_array().unwrap().len(), 2);
    }
    // Linear probe from the checkpoint: only the head changes.
    let probe = tmp("probe");
    let mut args = vec!["train", "--out", probe.to_str().unwrap()];
    args.extend(TINY);
    args.extend(["--set", "optimizer.train_only=[\"head\\\\..*\"]"]);
    let init = format!("train.init_from={:?}", ckpt.to_str().unwrap());
    args.extend(["--set", init.as_str(), "--set", "train.steps=5", "--set", "schedule.warmup_steps=1"]);
    run_ok(&args);
    let before = vit_model::checkpoint::load_checkpoint(&ckpt, vit_tensor::Device::Cpu).unwrap();
    let after =
        vit_model::checkpoint::load_checkpoint(probe.join("step-5.safetensors"), vit_tensor::Device::Cpu).unwrap();
    for (name, t) in before.params.iter() {
        let same = t.to_f32_vec().unwrap() == after.params.get(name).unwrap().to_f32_vec().unwrap();
        assert_eq!(same, !name.starts_with("head."), "{name}");
    }
    // Weight-decay multiplier rules reach the optimizer: with every learning rate scaled to
    // ~nothing, 5 steps of constant schedule shrink each kernel by (1 - wd·mult)^5, fc1 of the
    // first block by its own rule (0.5), fc2 by Scaling ViT's kernel rule behind it (1), and
    // a LayerNorm scale not at all (0).
    let decayed = tmp("decayed");
    let mut args = vec!["train", "--out", decayed.to_str().unwrap()];
    args.extend(TINY);
    args.extend(["--set", "optimizer.wd_mults=[{ pattern = 'blocks\\.0\\.mlp\\.fc1\\.weight', mult = 0.5 }]"]);
    args.extend([
        "--set",
        "optimizer.lr_mults=[{ pattern = '.*', mult = 1e-9 }]",
        "--set",
        "optimizer.weight_decay=0.01",
    ]);
    args.extend(["--set", init.as_str(), "--set", "train.steps=5", "--set", "schedule.warmup_steps=0"]);
    args.extend(["--set", "schedule.decay=\"constant\""]);
    run_ok(&args);
    let after =
        vit_model::checkpoint::load_checkpoint(decayed.join("step-5.safetensors"), vit_tensor::Device::Cpu).unwrap();
    for (name, mult) in
        [("blocks.0.mlp.fc1.weight", 0.5), ("blocks.0.mlp.fc2.weight", 1.0), ("blocks.0.norm1.weight", 0.0)]
    {
        let (b, a) = (
            before.params.get(name).unwrap().to_f32_vec().unwrap(),
            after.params.get(name).unwrap().to_f32_vec().unwrap(),
        );
        let shrink = (1.0 - 0.01 * mult as f32).powi(5);
        for (x, y) in b.iter().zip(&a) {
            assert!((y - x * shrink).abs() <= 4e-6 * x.abs().max(1e-3), "{name}: {x} -> {y}, expected x·{shrink}");
        }
    }
    // A rule that matches no parameter is refused before training.
    let out = vit(&[
        "train",
        "--out",
        tmp("typo").to_str().unwrap(),
        "--set",
        "optimizer.wd_mults=[{ pattern = 'haed', mult = 1.0 }]",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("optimizer.wd_mults[0]: pattern \"haed\" matches no parameter"),
        "{err}"
    );
    // Distillation from the checkpoint as teacher runs and learns.
    let student = tmp("student");
    let mut args = vec!["train", "--out", student.to_str().unwrap()];
    args.extend(TINY);
    let teacher = format!("train.teacher={:?}", ckpt.to_str().unwrap());
    args.extend(["--set", teacher.as_str(), "--set", "train.distill_weight=0.5"]);
    run_ok(&args);
    let ls = losses(&student);
    assert!(ls[35..].iter().sum::<f64>() < ls[..5].iter().sum::<f64>(), "distillation did not lower the loss: {ls:?}");
    // The sigmoid loss trains too (JFT-style heads).
    let sig = tmp("sigmoid");
    let mut args = vec!["train", "--out", sig.to_str().unwrap()];
    args.extend(TINY);
    args.extend(["--set", "train.loss=sigmoid"]);
    run_ok(&args);
    let lsig = losses(&sig);
    assert!(lsig[35..].iter().sum::<f64>() < 0.8 * lsig[..5].iter().sum::<f64>(), "sigmoid loss: {lsig:?}");
    // The resolved config reproduces the run.
    let again = tmp("again");
    run_ok(&["train", "--config", dir.join("config.toml").to_str().unwrap(), "--out", again.to_str().unwrap()]);
    assert_eq!(losses(&again), l);
}

/// Top-1 accuracy of the checkpoint at `path` on the first `n` test images of the repository's
/// Fashion-MNIST subset, by a route of its own: the IDX files read from disk, pixels mapped to
/// [-1, 1] here (`p / 255 · 2 − 1`, the trainer's default `value_range(-1, 1)`), one forward
/// pass of the model over all `n` images, argmax against the labels counted here.
fn checkpoint_accuracy(path: &std::path::Path, n: usize) -> f64 {
    use vit_data::Dataset;
    use vit_tensor::{ops, DType, Device, Tensor};
    let ckpt = vit_model::checkpoint::load_checkpoint(path, Device::Cpu).unwrap();
    let model = vit_model::VisionTransformer::new(&ckpt.config, DType::F32, Device::Cpu).unwrap();
    let test = vit_data::InMemoryDataset::from_idx(root().join("data/fashion-mnist-small"), "t10k", Some(n)).unwrap();
    assert_eq!((test.len(), test.image_dims()), (n, [28, 28, 1]));
    let pixels: Vec<f32> = test.pixels().iter().map(|&p| p as f32 / 255.0 * 2.0 - 1.0).collect();
    let images = Tensor::from_f32(pixels, [n, 1, 28, 28], DType::F32, Device::Cpu).unwrap();
    let logits = model.predict(&ckpt.params, &images).unwrap();
    assert_eq!(logits.dims(), &[n, 10]);
    let pred = ops::argmax(&logits, 1).unwrap().to_vec::<u32>().unwrap();
    let correct = pred.iter().zip(test.labels()).filter(|(p, l)| p == l).count();
    correct as f64 / n as f64
}

#[test]
fn resuming_at_step_15_of_40_ends_exactly_like_a_straight_run() {
    let root_tmp = tmp_root();
    let (straight, resumed) = (root_tmp.path().join("straight"), root_tmp.path().join("resumed"));
    let mut args = vec!["train", "--out", straight.to_str().unwrap(), "--set", "optimizer.name=factored-adam"];
    args.extend(TINY);
    run_ok(&args);
    let mut args =
        vec!["train", "--out", resumed.to_str().unwrap(), "--set", "optimizer.name=factored-adam", "--stop-at", "15"];
    args.extend(TINY);
    let out = vit(&args);
    assert_eq!(out.status.code(), Some(3), "stopping is reported as an interruption (exit code 3)");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by --stop-at at step 15"));
    assert!(resumed.join("step-15.safetensors").exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("summary.json")).unwrap()).unwrap();
    assert_eq!((summary["stop_reason"].as_str(), summary["steps"].as_u64()), (Some("stop_at"), Some(15)));
    run_ok(&["train", "--resume", resumed.to_str().unwrap()]);
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "the resumed run's losses differ from the straight run's");
}

#[test]
fn bad_input_ends_with_one_line_and_exit_code_1() {
    let root_tmp = tmp_root();
    let dir = root_tmp.path();
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[model\npreset = 1").unwrap();
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("config.toml"), vit_experiments::train::config::QUICKSTART).unwrap();
    std::fs::write(corrupt.join("step-3.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let out_dir = dir.join("out");
    let o = out_dir.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--config", broken.to_str().unwrap(), "--out", o], "broken.toml"),
        (vec!["train", "--config", "/nonexistent/x.toml", "--out", o], "/nonexistent/x.toml"),
        (vec!["train", "--out", o, "--set", "model.preset=B/17"], "unknown model \"B/17\""),
        (vec!["train", "--out", o, "--set", "train.batch_size=-4"], "batch_size"),
        (vec!["train", "--out", o, "--set", "data.path=/nonexistent/data"], "/nonexistent/data"),
        (vec!["train", "--out", o, "--set", "train.nonsense=1"], "nonsense"),
        (vec!["train", "--out", o, "--set", "schedule.decay=cosin"], "unknown variant `cosin`"),
        (vec!["train", "--out", o, "--device", "gpu"], "train.device"),
        (vec!["train", "--out", o, "--set", "data.path=bundled:mnist"], "bundled:fashion-mnist-small"),
        (vec!["train", "--resume", corrupt.to_str().unwrap()], "step-3.safetensors"),
        // Fashion-MNIST has 10 classes: a 5-class model is refused before training.
        (vec!["train", "--out", o, "--set", "model.classes=5"], "model.classes = 5"),
    ];
    for (args, needle) in cases {
        let out = vit(&args);
        assert_eq!(out.status.code(), Some(1), "vit {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "vit {args:?}: not one line: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "vit {args:?}: {err}");
    }
}

#[test]
fn every_shipped_config_parses_and_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let is_sweep = path.file_name().is_some_and(|f| f.to_string_lossy().starts_with("sweep-"));
        if is_sweep {
            // A sweep file: every point of its grid validates, on the bundled data here (the
            // shipped path is the full dataset, which tests may not read).
            let set = ["data.path=\"bundled:fashion-mnist-small\"".to_string()];
            let sweep = vit_experiments::sweep::Sweep::from_file_with_set(&path, &set);
            assert!(sweep.is_ok(), "{}: {}", path.display(), sweep.unwrap_err());
            n += 1;
        } else if path.extension().is_some_and(|e| e == "toml") {
            let cfg = vit_experiments::train::config::TrainConfig::from_file(&path, &[]);
            assert!(cfg.is_ok(), "{}: {}", path.display(), cfg.unwrap_err());
            n += 1;
        }
    }
    assert!(n >= 4, "expected the four recipes in configs/, found {n}");
}

/// The dense twin of `configs/vmoe-fashion-mnist.toml` (`--set model.moe=none`, the command in
/// the config and in docs/reproduce.md) differs from the V-MoE only in `model.moe`: the same
/// data, optimizer, schedule, steps and seed, and the same model otherwise.
#[test]
fn the_vmoe_fashion_mnist_config_and_its_dense_twin_differ_only_in_model_moe() {
    use vit_experiments::train::config::TrainConfig;
    let path = root().join("configs/vmoe-fashion-mnist.toml");
    let moe = TrainConfig::from_file(&path, &[]).unwrap();
    let dense = TrainConfig::from_file(&path, &["model.moe=none".to_string()]).unwrap();
    let (moe_model, dense_model) = (moe.model_config().unwrap(), dense.model_config().unwrap());
    let experts = moe_model.moe.as_ref().map(|m| (m.experts, m.k));
    assert_eq!(experts, Some((8, 2)), "the V-MoE config has 8 experts, k = 2");
    assert!(dense_model.moe.is_none(), "model.moe=none leaves MoE in: {:?}", dense_model.moe);
    let mut moe_without = moe_model.clone();
    moe_without.moe = None;
    assert_eq!(moe_without, dense_model, "the models differ outside model.moe");
    assert_eq!(
        (&moe.data, &moe.optimizer, &moe.schedule, &moe.train, &moe.evals),
        (&dense.data, &dense.optimizer, &dense.schedule, &dense.train, &dense.evals),
        "the recipes differ"
    );
    // The override is not a no-op on the written config either: the run directory's
    // config.toml of the dense twin has no [model.moe].
    let written = dense.resolved().unwrap().to_toml().unwrap();
    assert!(!written.contains("moe"), "dense twin's resolved config mentions moe:\n{written}");
    assert!(moe.resolved().unwrap().to_toml().unwrap().contains("[model.moe]"));
}

/// SIGTERM (preemption) and SIGINT (Ctrl-C) mid-run: the step in flight finishes, a checkpoint
/// and `summary.json` (stop reason `signal`) are written, `vit` exits with 3, and `--resume`
/// continues to exactly the straight run's losses.
#[test]
fn sigterm_and_sigint_save_a_checkpoint_and_the_run_resumes_exactly() {
    let root_tmp = tmp_root();
    let straight = root_tmp.path().join("straight");
    let steps = ["--set", "train.steps=300"];
    let mut args = vec!["train", "--out", straight.to_str().unwrap()];
    args.extend(TINY);
    args.extend(steps);
    run_ok(&args);
    for signal in ["TERM", "INT"] {
        let stopped = root_tmp.path().join(signal);
        let mut args = vec!["train", "--out", stopped.to_str().unwrap()];
        args.extend(TINY);
        args.extend(steps);
        let child = Command::new(env!("CARGO_BIN_EXE_vit"))
            .current_dir(root())
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Signal once a few steps are logged (the handler is installed before the first step).
        let metrics = stopped.join("metrics.jsonl");
        let started = std::time::Instant::now();
        while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
            assert!(started.elapsed().as_secs() < 120, "no metrics from vit train after 120 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let sent = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -{signal}");
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "SIG{signal}: {stderr}");
        assert!(stderr.contains("interrupted by a signal at step"), "SIG{signal}: {stderr}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(stopped.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["stop_reason"].as_str(), Some("signal"), "SIG{signal}");
        let step = summary["steps"].as_u64().unwrap();
        assert!((3..300).contains(&step), "SIG{signal}: stopped at step {step}");
        assert!(stopped.join(format!("step-{step}.safetensors")).exists(), "SIG{signal}: no checkpoint");
        assert_eq!(losses(&stopped).len() as u64, step, "SIG{signal}: metrics up to the saved step");
        run_ok(&["train", "--resume", stopped.to_str().unwrap()]);
        assert_eq!(losses(&stopped), losses(&straight), "SIG{signal}: the resumed run differs from the straight one");
    }
}
