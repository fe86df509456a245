//! `mpirun -np 2 vit train` (issue 12 item 2): one data-parallel rank per MPI process follows
//! the single-process run within 1e-5 relative, rank 0 alone writes the run directory, and a
//! run stopped under mpirun resumes in one process. Built and run only with the `mpi` feature
//! (`scripts/test.sh` does, where MPI is installed).
#![cfg(feature = "mpi")]

mod common;

use common::{assert_losses_close, repo_root, small_recipe};
use std::{
    path::Path,
    process::{Command, Output},
};

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
    cmd.current_dir(repo_root()).args(args).output().expect("run vit (is mpirun installed?)")
}

fn train(mpi: Option<usize>, out: &Path, extra: &[&str]) -> Output {
    let recipe = small_recipe(12, 6);
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend(recipe.iter().map(String::as_str));
    args.extend_from_slice(extra);
    run(mpi, &args)
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
    assert_losses_close(&one, &two, 12, "mpirun -np 2 vs one process");
    // Stopped at step 6 under mpirun (exit 3 from every rank), resumed in one process.
    let moved = tmp.path().join("moved");
    let o = train(Some(2), &moved, &["--stop-at", "6"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(None, &["train", "--resume", moved.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_losses_close(&one, &moved, 12, "mpirun -np 2 to step 6, then one process");
    // Threads and processes at once is refused on every rank.
    let o = train(Some(2), &tmp.path().join("both"), &["--world", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected one of the two"));
}
