//! `mpirun -np 2 vit train` (issue 12 item 2): one data-parallel rank per MPI process follows
//! the single-process run within 1e-5 relative, rank 0 alone writes the run directory, and a
//! run stopped under mpirun resumes in one process. Built and run only with the `mpi` feature
//! (`scripts/test.sh` does, where MPI is installed).
#![cfg(feature = "mpi")]

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
    "train.steps=12",
    "--set",
    "schedule.warmup_steps=3",
    "--set",
    "train.checkpoint_every=6",
    "--set",
    "train.log_every=1",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(mpi: Option<usize>, args: &[&str]) -> Output {
    let vit = env!("CARGO_BIN_EXE_vit");
    let mut cmd = match mpi {
        Some(n) => {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string(), vit]);
            c
        }
        None => Command::new(vit),
    };
    cmd.current_dir(root()).args(args).output().expect("run vit (is mpirun installed?)")
}

fn train(mpi: Option<usize>, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend_from_slice(RECIPE);
    args.extend_from_slice(extra);
    run(mpi, &args)
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn assert_close(a: &Path, b: &Path, what: &str) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!((la.len(), lb.len()), (12, 12), "{what}: one metrics line per step, written once");
    for (s, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{what}: step {} loss {x} vs {y}", s + 1);
    }
}

#[test]
fn mpirun_ranks_follow_one_process_and_resume_in_one() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let o = train(None, &one, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let two = tmp.path().join("two");
    let o = train(Some(2), &two, &[]);
    assert!(o.status.success(), "mpirun -np 2: {}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.matches("done: 12 steps").count(), 1, "rank 0 alone reports: {stdout}");
    assert_close(&one, &two, "mpirun -np 2 vs one process");
    // Stopped at step 6 under mpirun (exit 3 from every rank), resumed in one process.
    let moved = tmp.path().join("moved");
    let o = train(Some(2), &moved, &["--stop-at", "6"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(None, &["train", "--resume", moved.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(&one, &moved, "mpirun -np 2 to step 6, then one process");
    // Threads and processes at once is refused on every rank.
    let o = train(Some(2), &tmp.path().join("both"), &["--world", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected one of the two"));
}
