//! PatchDropout in training (`train.patch_dropout`, `train.patch_dropout_until`,
//! `train.patch_dropout_stages`): it changes the steps that drop and no others, a later stage
//! changes its own steps only, a run stopped and resumed drops as a straight one (the
//! draws come from the seed and the step), two data-parallel ranks and micro-batches drop the
//! same tokens of each image as one rank does, and bad settings are one-line errors.

mod common;

use common::{assert_losses_close, assert_same_metrics, assert_stopped_and_resumed_like, losses, train_small as train};

const DROP: [&str; 2] = ["--set", "train.patch_dropout=0.5"];

/// `--set` arguments as the `&str`s that `train` takes.
fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn ok(o: std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn patch_dropout_changes_its_steps_only_resumes_exactly_and_any_split_draws_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    ok(train(&dir("plain"), &[]));
    ok(train(&dir("dropped"), &DROP));
    ok(train(&dir("half"), &[&DROP[..], &["--set", "train.patch_dropout_until=0.5"]].concat()));
    ok(train(&dir("none"), &[&DROP[..], &["--set", "train.patch_dropout_until=0"]].concat()));
    let config = std::fs::read_to_string(dir("dropped").join("config.toml")).unwrap();
    assert!(config.contains("patch_dropout = 0.5"), "{config}");
    let (plain, dropped, half) = (losses(&dir("plain")), losses(&dir("dropped")), losses(&dir("half")));
    assert_eq!((plain.len(), dropped.len()), (20, 20));
    // The zero-initialised head gives ln 10 until the first update with a nonzero learning
    // rate (step 2 of the warmup); from step 3 on, fewer tokens give other losses.
    assert!(plain[2..].iter().zip(&dropped[2..]).all(|(a, b)| a.1 != b.1));
    // Dropping until step 10 of 20 is the whole-run dropout up to there, then another run.
    assert_eq!(half[..10], dropped[..10], "the first 10 steps drop the same tokens");
    assert!(half[10..].iter().zip(&dropped[10..]).all(|(a, b)| a.1 != b.1), "steps 11-20 keep every token");
    // until = 0 drops nothing: the plain run, bit for bit.
    assert_same_metrics(&dir("plain"), &dir("none"), "patch_dropout_until = 0");

    assert_stopped_and_resumed_like(&dir("dropped"), &dir("resumed"), &DROP, "patch dropout");

    // Stages: a second stage at the first one's rate until the end is the whole-run dropout,
    // bit for bit (same draws per step); at another rate (0.25 for steps 11-15) it changes
    // steps 11-15 only, until its end, and then every token is kept, as in `half`.
    let staged = |stage: &str| -> Vec<String> {
        let first = ["--set", "train.patch_dropout=0.5", "--set", "train.patch_dropout_until=0.5", "--set"];
        first.map(String::from).into_iter().chain([format!("train.patch_dropout_stages=[{stage}]")]).collect()
    };
    ok(train(&dir("same-stage"), &args(&staged("{ rate = 0.5, until = 1.0 }"))));
    assert_same_metrics(&dir("dropped"), &dir("same-stage"), "a second stage at the same rate");
    let quarter_args = staged("{ rate = 0.25, until = 0.75 }");
    ok(train(&dir("quarter"), &args(&quarter_args)));
    let config = std::fs::read_to_string(dir("quarter").join("config.toml")).unwrap();
    assert!(config.contains("[[train.patch_dropout_stages]]") && config.contains("rate = 0.25"), "{config}");
    let quarter = losses(&dir("quarter"));
    assert_eq!(quarter[..10], half[..10], "the first stage is unchanged");
    assert!(quarter[10..15].iter().zip(&half[10..15]).all(|(a, b)| a.1 != b.1), "steps 11-15 drop a quarter");
    assert!(quarter[10..15].iter().zip(&dropped[10..15]).all(|(a, b)| a.1 != b.1), "not half");
    assert_stopped_and_resumed_like(&dir("quarter"), &dir("quarter-resumed"), &args(&quarter_args), "a second stage");

    // Each image draws from its global position in the batch: two ranks, or micro-batches of
    // 16, drop what one pass drops (the sums differ only in order).
    ok(train(&dir("two"), &[&DROP[..], &["--world", "2"]].concat()));
    assert_losses_close(&dir("dropped"), &dir("two"), 20, "patch dropout: world 2 vs world 1");
    ok(train(&dir("micro"), &[&DROP[..], &["--set", "train.grad_accum=4"]].concat()));
    assert_losses_close(&dir("dropped"), &dir("micro"), 20, "patch dropout: 4 micro-batches of 16 vs one pass");
}

/// A V-MoE (block 1 of 2 a MoE of 4 experts, k = 2, groups of 4 images) routes only the kept
/// tokens: each group's capacity follows its token count. Router noise is off because its draw
/// follows the micro-batch (so micro-batches route differently with noise, patch dropout or not).
const MOE: [&str; 10] = [
    "--set",
    "model.moe.experts=4",
    "--set",
    "model.moe.k=2",
    "--set",
    "model.moe.group_size=4",
    "--set",
    "model.moe.capacity=0.8",
    "--set",
    "model.moe.noise=0",
];

#[test]
fn a_vmoe_with_patch_dropout_trains_resumes_exactly_and_splits_like_one_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    ok(train(&dir("moe"), &MOE));
    let dropping = [&MOE[..], &DROP[..]].concat();
    ok(train(&dir("dropped"), &dropping));
    let (plain, dropped) = (losses(&dir("moe")), losses(&dir("dropped")));
    assert_eq!((plain.len(), dropped.len()), (20, 20));
    assert!(dropped.iter().all(|l| l.1.is_finite()));
    assert!(plain[2..].iter().zip(&dropped[2..]).all(|(a, b)| a.1 != b.1), "the MoE sees fewer tokens");
    let metrics = std::fs::read_to_string(dir("dropped").join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().all(|l| l.contains("\"load\"")), "every step logs block 1's routing");

    assert_stopped_and_resumed_like(&dir("dropped"), &dir("resumed"), &dropping, "MoE with patch dropout");
    // Routing groups are whole images, so micro-batches of 16 (4 groups each) route and drop
    // as one pass does.
    ok(train(&dir("micro"), &[&dropping[..], &["--set", "train.grad_accum=4"]].concat()));
    assert_losses_close(&dir("dropped"), &dir("micro"), 20, "MoE with patch dropout: 4 micro-batches vs one pass");
}

#[test]
fn a_bad_patch_dropout_setting_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, want) in [
        (vec!["train.patch_dropout=1"], "train.patch_dropout = 1: expected a fraction of the patches in [0, 1)"),
        (vec!["train.patch_dropout=-0.1"], "train.patch_dropout = -0.1"),
        (vec!["train.patch_dropout_until=1.5"], "train.patch_dropout_until = 1.5: expected a fraction of the steps"),
        (vec!["train.patch_dropout=0.5", "train.sharding=\"full\""], "train.sharding = \"full\""),
        (
            vec!["train.patch_dropout_stages=[{ rate = 0.5, until = 0.9 }]"],
            "train.patch_dropout_stages = (1 stages): expected no stages without train.patch_dropout > 0",
        ),
        (
            vec!["train.patch_dropout=0.5", "train.patch_dropout_until=0.5", "train.patch_dropout_stages=[{ rate = 1.0, until = 0.9 }]"],
            "train.patch_dropout_stages[0].rate = 1: expected a fraction of the patches in [0, 1)",
        ),
        (
            vec![
                "train.patch_dropout=0.5",
                "train.patch_dropout_until=0.5",
                "train.patch_dropout_stages=[{ rate = 0.25, until = 0.8 }, { rate = 0.1, until = 0.7 }]",
            ],
            "train.patch_dropout_stages[1].until = 0.7: expected a fraction of the steps in (0.8, 1]",
        ),
        (
            vec!["train.patch_dropout=0.5", "train.patch_dropout_stages=[{ rate = 0.25, until = 0.9 }]"],
            "train.patch_dropout_stages[0] = { rate = 0.25, until = 0.9 }: expected no stage after one that ends the run",
        ),
    ] {
        let args: Vec<&str> = set.iter().flat_map(|s| ["--set", s]).collect();
        let o = train(&tmp.path().join("bad"), &args);
        assert_eq!(o.status.code(), Some(1), "{set:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{set:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{set:?}: {e}");
    }
}
