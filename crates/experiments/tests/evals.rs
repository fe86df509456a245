//! `[[evals]]` (issue 17 item 1): classification, few-shot and linear-probe evaluations at
//! their own `every`, in `metrics.jsonl` as `eval/<name>/...` and in `summary.json`, with
//! `train.eval_every` as the test classification's shorthand; a resumed run evaluates alike.

mod common;

use common::{assert_same_metrics, repo_root, small_recipe};
use serde_json::Value;
use std::{
    path::Path,
    process::{Command, Output},
};

fn vit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vit")).current_dir(repo_root()).args(args).output().expect("run vit")
}

/// Trains the small recipe for 10 steps (`train.eval_every = 5`) with `evals` appended to the
/// quickstart config.
fn train(dir: &Path, evals: &str, extra: &[&str]) -> Output {
    let config = dir.with_extension("toml");
    std::fs::write(&config, format!("{}\n{evals}", vit_experiments::train::config::QUICKSTART)).unwrap();
    let recipe = small_recipe(10, 5);
    let mut args = vec!["train", "--config", config.to_str().unwrap(), "--out", dir.to_str().unwrap()];
    args.extend(recipe.iter().map(String::as_str));
    args.extend_from_slice(extra);
    vit(&args)
}

fn lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const EVALS: &str = r#"
[[evals]]
kind = "fewshot"
name = "fewshot"
shots = [1, 5]
seeds = 2
every = 4

[[evals]]
kind = "linear_probe"
name = "probe"
every = 6

[[evals]]
kind = "classification"
name = "train_split"
split = "train"
every = 5
"#;

#[test]
fn every_kind_evaluates_at_its_steps_into_metrics_and_summary_and_resumes_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = train(&run, EVALS, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&run);
    assert_eq!(ls.len(), 10);
    let has = |l: &Value, k: &str| l.get(k).and_then(Value::as_f64).is_some();
    for l in &ls {
        let step = l["step"].as_u64().unwrap();
        let last = step == 10;
        for (key, every) in [
            ("eval/fewshot/1shot_accuracy", 4),
            ("eval/fewshot/5shot_error", 4),
            ("eval/probe/accuracy", 6),
            ("eval/train_split/loss", 5),
            ("eval/test/accuracy", 5),
            ("test_accuracy", 5),
        ] {
            assert_eq!(has(l, key), last || step % every == 0, "step {step}: {key} in {l}");
        }
        if has(l, "eval/test/accuracy") {
            assert_eq!(l["eval/test/accuracy"], l["test_accuracy"], "the shorthand's entry is the test accuracy");
            assert_eq!(l["eval/test/loss"], l["test_loss"]);
        }
        for name in ["fewshot/1shot", "fewshot/5shot", "probe/", "train_split/", "test/"] {
            let (acc, err) = (
                format!("eval/{name}{}accuracy", if name.ends_with('/') { "" } else { "_" }),
                format!("eval/{name}{}error", if name.ends_with('/') { "" } else { "_" }),
            );
            if let (Some(a), Some(e)) = (l[&acc].as_f64(), l[&err].as_f64()) {
                assert!((0.0..=1.0).contains(&a) && (a + e - 1.0).abs() < 1e-12, "{acc} {a}, {err} {e}");
            }
        }
    }
    // The features of even a briefly trained ViT carry the classes (chance is 0.1).
    let end = &ls[9];
    assert!(end["eval/probe/accuracy"].as_f64().unwrap() > 0.3, "{end}");
    assert!(end["eval/fewshot/5shot_accuracy"].as_f64().unwrap() > 0.2, "{end}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for (name, metric) in
        [("fewshot", "5shot_accuracy"), ("probe", "accuracy"), ("train_split", "accuracy"), ("test", "loss")]
    {
        assert_eq!(summary["eval"][name][metric], end[format!("eval/{name}/{metric}")], "summary eval.{name}.{metric}");
    }
    assert_eq!(summary["eval"]["test"]["accuracy"], summary["test_accuracy"]);

    // Stopped at step 5 and resumed: the same metrics, evaluations included.
    let resumed = tmp.path().join("resumed");
    let o = train(&resumed, EVALS, &["--stop-at", "5"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", resumed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_metrics(&run, &resumed, "evals: straight vs resumed at 5");
}

#[test]
fn an_entry_on_the_test_split_replaces_eval_every() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let entry = "[[evals]]\nkind = \"classification\"\nname = \"val\"\nevery = 3\n";
    let o = train(&run, entry, &["--set", "train.eval_every=0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for l in lines(&run) {
        let step = l["step"].as_u64().unwrap();
        assert_eq!(l.get("eval/val/accuracy").is_some(), step % 3 == 0 || step == 10, "step {step}: {l}");
        assert_eq!(l.get("test_accuracy"), l.get("eval/val/accuracy"), "step {step}");
        assert!(l.get("eval/test/accuracy").is_none(), "no shorthand entry besides val: {l}");
    }
    // Both at once is an error before anything runs.
    let o = train(&tmp.path().join("both"), entry, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("train.eval_every = 5: expected 0 when an [[evals]] entry already evaluates the test split"),
        "{e}"
    );
}

/// Test-time augmentation (`tta` of a classification entry, `vit eval --tta`): the entry's
/// accuracy and loss are those of the mean logits of each test image and its mirror image,
/// computed here by hand from the final checkpoint; the plain test evaluation stays the legacy
/// `test_accuracy`, and `vit eval --tta flip_lr` gives the entry's numbers.
#[test]
fn a_tta_entry_classifies_by_the_mean_logits_of_the_image_and_its_mirror() {
    use vit_experiments::train::{config::TrainConfig, data, evaluate, tta::TtaOp};
    use vit_model::{checkpoint::load_checkpoint, VisionTransformer};
    use vit_tensor::{DType, Device, Tensor};

    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let entry = "[[evals]]\nkind = \"classification\"\nname = \"test_tta\"\ntta = [\"flip_lr\"]\nevery = 5\n";
    let o = train(&run, entry, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = lines(&run);
    for l in &ls {
        let step = l["step"].as_u64().unwrap();
        assert_eq!(l.get("eval/test_tta/accuracy").is_some(), step % 5 == 0, "step {step}: {l}");
        assert_eq!(l.get("test_accuracy"), l.get("eval/test/accuracy"), "the legacy metric stays plain: {l}");
    }
    let end = &ls[9];

    // By hand: the logits of every test image and of its mirror image, averaged.
    let cfg = TrainConfig::from_file(&run.join("config.toml"), &[]).unwrap();
    let ckpt = load_checkpoint(run.join("step-10.safetensors"), Device::Cpu).unwrap();
    let model = VisionTransformer::new(&ckpt.config, DType::F32, Device::Cpu).unwrap();
    let d = data::load(&cfg.data).unwrap();
    let loader = d.eval_loader(&d.test, 50).unwrap();
    let (mut correct, mut loss, mut n) = (0usize, 0f64, 0usize);
    for b in loader.iter() {
        let b = b.unwrap();
        let dims = b.images.dims().to_vec();
        let w = dims[3];
        let x = b.images.to_f32_vec().unwrap();
        let mirror: Vec<f32> = x.chunks(w).flat_map(|r| r.iter().rev().copied()).collect();
        let mirror = Tensor::from_f32(mirror, dims, DType::F32, Device::Cpu).unwrap();
        let (_, a) = model.features_and_logits(&ckpt.params, &b.images).unwrap();
        let (_, m) = model.features_and_logits(&ckpt.params, &mirror).unwrap();
        let (a, m) = (a.to_f32_vec().unwrap(), m.to_f32_vec().unwrap());
        assert_ne!(a, m, "the mirror images give other logits");
        let classes = ckpt.config.classes;
        for (i, label) in b.labels.to_vec::<i32>().unwrap().into_iter().enumerate() {
            let mean: Vec<f64> =
                (0..classes).map(|c| (a[i * classes + c] as f64 + m[i * classes + c] as f64) / 2.0).collect();
            let best = (0..classes).max_by(|&p, &q| mean[p].total_cmp(&mean[q])).unwrap();
            correct += usize::from(best as i32 == label);
            let top = mean.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = top + mean.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
            loss += lse - mean[label as usize];
            n += 1;
        }
    }
    let (acc, loss) = (correct as f64 / n as f64, loss / n as f64);
    assert_eq!(end["eval/test_tta/accuracy"].as_f64(), Some(acc), "{end}");
    assert!((end["eval/test_tta/loss"].as_f64().unwrap() - loss).abs() < 1e-5, "{end} against {loss}");
    // The library call with the entry's ops gives the same (its batches of 50 round the loss's
    // sum differently from training's), and differs from the plain one.
    let (lib_acc, lib_loss) = evaluate(&model, &ckpt.params, &loader, Device::Cpu, false, &[TtaOp::FlipLr]).unwrap();
    assert_eq!(lib_acc, acc);
    assert!((lib_loss - loss).abs() < 1e-5, "{lib_loss} against {loss}");
    let plain = evaluate(&model, &ckpt.params, &loader, Device::Cpu, false, &[]).unwrap();
    assert!((plain.1 - end["eval/test/loss"].as_f64().unwrap()).abs() < 1e-5, "{plain:?} {end}");
    assert!((plain.1 - lib_loss).abs() > 1e-4, "TTA changes the loss: {plain:?} against {lib_loss}");

    // `vit eval --tta flip_lr` on the checkpoint: the same numbers.
    let ckpt_path = run.join("step-10.safetensors");
    let o = vit(&["eval", "--checkpoint", ckpt_path.to_str().unwrap(), "--tta", "flip_lr", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["accuracy"], end["eval/test_tta/accuracy"], "{e}");
    assert_eq!(e["tta"], serde_json::json!(["flip_lr"]));
    let o = vit(&["eval", "--checkpoint", ckpt_path.to_str().unwrap(), "--tta", "flip_lr,mirror"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tta op \"mirror\": expected flip_lr"), "{err}");
}
