//! `mpirun -np 2 vit train` (issue 12 item 2): one data-parallel rank per MPI process follows
//! the single-process run within 1e-5 relative, rank 0 alone writes the run directory, and a
//! run stopped under mpirun resumes in one process; ZeRO-1 and ZeRO-3 runs under mpirun follow
//! it as well; 4 processes on a 2 × 2 data × model mesh (issue 13 item 1) follow it too, and so
//! do 2 processes sharing a V-MoE's experts (`model.moe.expert_parallel`, issue 11 item 5).
//! Built and run only with the `mpi` feature
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

/// Runs `cmd` (an mpirun with a faulty rank) to its end: its status, output and duration; a
/// hang (still running after 120 s) kills it and fails with `what`.
fn run_to_exit(mut cmd: Command, what: &str) -> (std::process::ExitStatus, Output, std::time::Duration) {
    let mut child = cmd.spawn().expect("run mpirun");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed().as_secs() > 120 {
            let _ = child.kill();
            panic!("mpirun still running 120 s after {what}: a hang");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let took = start.elapsed();
    (status, child.wait_with_output().unwrap(), took)
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
    // Every sharding mode under mpirun follows one process too.
    for mode in ["optimizer", "full"] {
        let dir = tmp.path().join(mode);
        let o = train(Some(2), &dir, &["--set", &format!("train.sharding={mode}")]);
        assert!(o.status.success(), "mpirun -np 2, sharding {mode}: {}", String::from_utf8_lossy(&o.stderr));
        assert_losses_close(&one, &dir, 12, &format!("mpirun -np 2, sharding {mode} vs one process"));
    }
    // A 2 × 2 data × model mesh of processes (MPI_Comm_split per axis) follows one process.
    let mesh = tmp.path().join("mesh");
    let o = train(Some(4), &mesh, &["--set", "train.mesh.model=2"]);
    assert!(o.status.success(), "mpirun -np 4 with a 2 x 2 mesh: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("mesh data=2,model=2"));
    assert_losses_close(&one, &mesh, 12, "mpirun -np 4 on a 2 x 2 mesh vs one process");
    // Threads and processes at once is refused on every rank.
    let o = train(Some(2), &tmp.path().join("both"), &["--world", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected one of the two"));
}

/// A V-MoE with its experts sharded over 2 processes follows one process (no router noise, so
/// the cut into ranks does not change the routing) and its checkpoint holds every expert.
#[test]
fn mpirun_expert_parallel_follows_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let moe = ["model.moe.experts=4", "model.moe.noise=0", "model.moe.group_size=8", "model.moe.capacity=0.8"];
    let sets: Vec<&str> = moe.iter().flat_map(|s| ["--set", s]).collect();
    let one = tmp.path().join("one");
    let o = train(None, &one, &sets);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ep = tmp.path().join("ep");
    let o = train(Some(2), &ep, &[&sets[..], &["--set", "model.moe.expert_parallel=true"]].concat());
    assert!(o.status.success(), "mpirun -np 2 with expert parallelism: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 experts per rank (expert parallel)"));
    assert_losses_close(&one, &ep, 12, "mpirun -np 2 expert parallel vs one process");
    let c = vit_model::load_checkpoint(ep.join("step-12.safetensors"), vit_tensor::Device::Cpu).unwrap();
    assert_eq!(c.params.get("blocks.1.moe.experts.fc1.weight").unwrap().dims(), &[4, 64, 32]);
}

/// A rank that dies mid-run (an injected panic on rank 1) ends the whole `mpirun` job with a
/// failure, not a hang: the process exits with an error and mpirun stops the others.
#[test]
fn a_rank_that_dies_under_mpirun_ends_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = small_recipe(12, 6);
    let out = tmp.path().join("dead");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_vit"), "train", "--out"])
        .arg(&out)
        .args(&recipe)
        .env("VITRS_INJECT_FAULT", "fault_rank=1,train_panic_at_step=3")
        .current_dir(repo_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (status, o, _) = run_to_exit(cmd, "rank 1 died");
    assert!(!status.success(), "a dead rank must fail the job");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("injected fault: train_panic_at_step=3"), "{e}");
}

/// A rank that is stuck (alive, never reaching the next collective) ends the job within
/// `train.collective_timeout` plus the 10 s grace: the other rank times out in its collective,
/// reports it, and calls MPI_Abort (issue 12 item 6).
#[test]
fn a_stuck_rank_under_mpirun_ends_the_job_within_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = small_recipe(12, 6);
    let out = tmp.path().join("stuck");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_vit"), "train", "--out"])
        .arg(&out)
        .args(&recipe)
        .args(["--set", "train.collective_timeout=2"])
        .env("VITRS_INJECT_FAULT", "fault_rank=1,train_stall_at_step=3,stall_seconds=600")
        .current_dir(repo_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (status, o, took) = run_to_exit(cmd, "rank 1 got stuck (the timeout did not end it)");
    assert!(!status.success(), "a stuck rank must fail the job");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("waited 2 s for") && e.contains("(the collective timeout)"), "{e}");
    assert!(took.as_secs() < 90, "{took:?}");
}
