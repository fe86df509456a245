//! Determinism you can diff (issue 10): the same config trained twice in separate processes,
//! on 1 and on 3 rayon threads, the second with a different heap layout and another thread
//! allocating and computing beside it, writes the same `metrics.jsonl` (timing aside) and
//! byte-identical checkpoints; and a run stopped and resumed equals a straight one in every
//! metrics line and in its final checkpoint.

mod common;

use common::{assert_same_bytes, assert_same_metrics, metrics_without_timing};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh run directory inside `root` (removed with it).
fn tmp(root: &tempfile::TempDir, name: &str) -> PathBuf {
    root.path().join(name)
}

fn tmp_root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vitrs-determinism-test-").tempdir().unwrap()
}

/// A short run on the bundled data: a small model, 30 steps, metrics every step, an evaluation
/// and a checkpoint at step 20 and at the end.
const RECIPE: &[&str] = &[
    "--set",
    "model.width=32",
    "--set",
    "model.depth=2",
    "--set",
    "model.mlp_dim=64",
    "--set",
    "data.train_limit=2048",
    "--set",
    "data.test_limit=256",
    "--set",
    "train.batch_size=64",
    "--set",
    "train.steps=30",
    "--set",
    "schedule.warmup_steps=5",
    "--set",
    "train.eval_every=20",
    "--set",
    "train.checkpoint_every=20",
    "--set",
    "train.log_every=1",
];

/// Runs `vit train --out dir` with the recipe, `extra` arguments and environment `env`;
/// returns the exit code.
fn train(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Option<i32> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vit"));
    cmd.current_dir(root()).args(["train", "--out", dir.to_str().unwrap()]).args(RECIPE).args(extra);
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run vit");
    if !out.status.success() && out.status.code() != Some(3) {
        panic!("vit train {extra:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    out.status.code()
}

#[test]
fn two_processes_on_1_and_3_threads_write_identical_metrics_and_checkpoints() {
    let runs = tmp_root();
    let (a, b) = (tmp(&runs, "one-thread"), tmp(&runs, "three-threads"));
    assert_eq!(train(&a, &[], &[("RAYON_NUM_THREADS", "1")]), Some(0));
    // The second run: 3 threads, every heap allocation from one arena with freed memory filled
    // (glibc tunables: other addresses and alignments than the first run's, and a read of
    // uninitialised memory would show), next to a thread that allocates, fills and frees
    // buffers of odd sizes for as long as it runs.
    let stop = AtomicBool::new(false);
    let code = std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let v: Vec<u8> = vec![n as u8; 1 + (n * 7919) % (3 << 20)];
                n = n.wrapping_add(std::hint::black_box(v)[0] as usize + 1);
            }
        });
        let code = train(
            &b,
            &[],
            &[
                ("RAYON_NUM_THREADS", "3"),
                ("GLIBC_TUNABLES", "glibc.malloc.arena_max=1:glibc.malloc.perturb=165:glibc.malloc.top_pad=12345"),
            ],
        );
        stop.store(true, Ordering::Relaxed);
        code
    });
    assert_eq!(code, Some(0));
    assert_same_metrics(&a, &b, "1 vs 3 threads");
    assert_eq!(metrics_without_timing(&a).len(), 30);
    for step in [20, 30] {
        let name = format!("step-{step}.safetensors");
        assert_same_bytes(&a.join(&name), &b.join(&name), "1 vs 3 threads");
    }
}

#[test]
fn a_run_stopped_and_resumed_equals_a_straight_run_bit_for_bit() {
    let runs = tmp_root();
    let (straight, resumed) = (tmp(&runs, "straight"), tmp(&runs, "resumed"));
    assert_eq!(train(&straight, &[], &[]), Some(0));
    assert_eq!(train(&resumed, &["--stop-at", "13"], &[]), Some(3), "stopping is reported as an interruption");
    assert!(resumed.join("step-13.safetensors").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_vit"))
        .current_dir(root())
        .args(["train", "--resume", resumed.to_str().unwrap()])
        .output()
        .expect("run vit");
    assert!(out.status.success(), "resume: {}", String::from_utf8_lossy(&out.stderr));
    assert_same_metrics(&straight, &resumed, "straight vs resumed at 13");
    assert_same_bytes(
        &straight.join("step-30.safetensors"),
        &resumed.join("step-30.safetensors"),
        "straight vs resumed",
    );
}
