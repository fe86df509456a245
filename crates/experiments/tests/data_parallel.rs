//! Data parallelism over `LocalGroup` threads (issue 12 items 3 and 5): `vit train --world N`
//! splits every global batch over N ranks and sums their gradients, so N = 2 and 4 follow the
//! same losses as one rank (within 1e-5 relative: the sums run in another order); rank 0 alone
//! writes the run directory; and a run stopped at one world size resumes at another.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const RECIPE: &[&str] = &[
    "--set",
    "model.width=32",
    "--set",
    "model.depth=2",
    "--set",
    "model.mlp_dim=64",
    "--set",
    "data.train_limit=1024",
    "--set",
    "data.test_limit=128",
    "--set",
    "train.batch_size=64",
    "--set",
    "train.steps=20",
    "--set",
    "schedule.warmup_steps=5",
    "--set",
    "train.eval_every=10",
    "--set",
    "train.checkpoint_every=10",
    "--set",
    "train.log_every=1",
];

fn vit(args: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    Command::new(env!("CARGO_BIN_EXE_vit")).current_dir(root).args(args).output().expect("run vit")
}

fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend_from_slice(RECIPE);
    args.extend_from_slice(extra);
    vit(&args)
}

/// `(step, loss, test accuracy if evaluated)` of every metrics line.
fn metrics(dir: &Path) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["test_accuracy"].as_f64())
        })
        .collect()
}

fn assert_close(a: &Path, b: &Path, what: &str) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), 20, "{what}: one metrics line per step, written once");
    assert_eq!(ma.len(), mb.len(), "{what}");
    for ((sa, la, ta), (sb, lb, tb)) in ma.iter().zip(&mb) {
        assert_eq!(sa, sb, "{what}");
        assert!((la - lb).abs() <= 1e-5 * la.abs(), "{what}: step {sa} loss {la} vs {lb}");
        if let (Some(ta), Some(tb)) = (ta, tb) {
            assert!((ta - tb).abs() <= 1.0 / 128.0, "{what}: step {sa} test accuracy {ta} vs {tb}");
        }
        assert_eq!(ta.is_some(), tb.is_some(), "{what}: step {sa} evaluated on one side only");
    }
}

#[test]
fn two_and_four_ranks_follow_one_rank_and_resume_across_world_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let o = train(&one, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for n in ["2", "4"] {
        let dir = tmp.path().join(format!("world{n}"));
        let o = train(&dir, &["--world", n]);
        assert!(o.status.success(), "world {n}: {}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(stdout.matches("step 20/20").count(), 1, "rank 0 alone prints: {stdout}");
        assert_close(&one, &dir, &format!("world {n} vs world 1"));
    }
    // Stopped at step 10 on two ranks, resumed on one (checkpoints hold the whole state).
    let moved = tmp.path().join("moved");
    let o = train(&moved, &["--world", "2", "--stop-at", "10"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", moved.to_str().unwrap(), "--world", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(&one, &moved, "world 2 to step 10, then world 1");
}

#[test]
fn a_world_that_does_not_divide_the_batch_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = train(&tmp.path().join("bad"), &["--world", "3"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("train.world = 3: expected a positive number of ranks whose product with train.grad_accum (1) divides train.batch_size (64)"), "{e}");
}
