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
