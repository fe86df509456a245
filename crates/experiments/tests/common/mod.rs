//! Helpers shared by the integration tests that compare runs (determinism, faults).
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;

/// `metrics.jsonl` with the `images_per_second` field cut out of each line as text (parsing
/// and printing the numbers could itself change their last digits).
pub fn metrics_without_timing(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let key = "\"images_per_second\":";
            let start = line.find(key).unwrap_or_else(|| panic!("no {key} in {line}"));
            let rest = &line[start + key.len()..];
            let end = rest.find([',', '}']).unwrap();
            let tail = rest[end..].strip_prefix(',').unwrap_or(&rest[end..]);
            format!("{}{}", &line[..start], tail)
        })
        .collect()
}

pub fn assert_same_metrics(a: &Path, b: &Path, what: &str) {
    let (ma, mb) = (metrics_without_timing(a), metrics_without_timing(b));
    assert_eq!(ma.len(), mb.len(), "{what}: metrics line counts");
    for (la, lb) in ma.iter().zip(&mb) {
        assert_eq!(la, lb, "{what}: metrics differ");
    }
}

pub fn assert_same_bytes(a: &Path, b: &Path, what: &str) {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(ba.len() > 1000, "{}: {} bytes", a.display(), ba.len());
    let first = ba.iter().zip(&bb).position(|(x, y)| x != y);
    assert!(
        ba == bb,
        "{what}: {} and {} differ (sizes {} / {}, first at byte {first:?})",
        a.display(),
        b.display(),
        ba.len(),
        bb.len()
    );
}

/// The repository root (the tests run `vit` from there).
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `--set` arguments shrinking the bundled quickstart for tests: width 32, depth 2, 1024
/// training and 128 test images, batch 64, `steps` steps with a metrics line each, and an
/// evaluation and a checkpoint every `every` steps.
pub fn small_recipe(steps: u64, every: u64) -> Vec<String> {
    [
        "model.width=32".to_string(),
        "model.depth=2".into(),
        "model.mlp_dim=64".into(),
        "data.train_limit=1024".into(),
        "data.test_limit=128".into(),
        "train.batch_size=64".into(),
        format!("train.steps={steps}"),
        "schedule.warmup_steps=3".into(),
        format!("train.eval_every={every}"),
        format!("train.checkpoint_every={every}"),
        "train.log_every=1".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// `(step, loss, test accuracy if evaluated)` of every line of `dir/metrics.jsonl`.
pub fn losses(dir: &Path) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["test_accuracy"].as_f64())
        })
        .collect()
}

/// Two runs of `steps` steps (one metrics line per step, written once) follow each other: losses
/// within 1e-5 relative (data parallelism sums in another order), test accuracies within one
/// of the 128 test images, evaluated at the same steps.
pub fn assert_losses_close(a: &Path, b: &Path, steps: usize, what: &str) {
    let (ma, mb) = (losses(a), losses(b));
    assert_eq!((ma.len(), mb.len()), (steps, steps), "{what}: one metrics line per step, written once");
    for ((sa, la, ta), (sb, lb, tb)) in ma.iter().zip(&mb) {
        assert_eq!(sa, sb, "{what}");
        assert!((la - lb).abs() <= 1e-5 * la.abs(), "{what}: step {sa} loss {la} vs {lb}");
        assert_eq!(ta.is_some(), tb.is_some(), "{what}: step {sa} evaluated on one side only");
        if let (Some(ta), Some(tb)) = (ta, tb) {
            assert!((ta - tb).abs() <= 1.0 / 128.0, "{what}: step {sa} test accuracy {ta} vs {tb}");
        }
    }
}

/// Runs the `vit` binary from the repository root with `args`.
pub fn vit(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vit")).current_dir(repo_root()).args(args).output().expect("run vit")
}

/// `vit train --out OUT` of [`small_recipe`]`(20, 10)` with `extra` arguments after it.
pub fn train_small(out: &Path, extra: &[&str]) -> std::process::Output {
    let recipe = small_recipe(20, 10);
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend(recipe.iter().map(String::as_str));
    args.extend_from_slice(extra);
    vit(&args)
}

/// [`train_small`] with `extra` into `resumed`, stopped after step 7 (exit code 3) and resumed
/// with `vit train --resume`: its metrics must equal those of the straight run in `straight`.
pub fn assert_stopped_and_resumed_like(straight: &Path, resumed: &Path, extra: &[&str], what: &str) {
    let o = train_small(resumed, &[extra, &["--stop-at", "7"]].concat());
    assert_eq!(o.status.code(), Some(3), "{what}: {}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", resumed.to_str().unwrap()]);
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
    assert_same_metrics(straight, resumed, &format!("{what}: straight vs stopped at 7 and resumed"));
}
