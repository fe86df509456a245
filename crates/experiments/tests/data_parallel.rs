//! Data parallelism over `LocalGroup` threads (issue 12 items 3 and 5): `vit train --world N`
//! splits every global batch over N ranks and sums their gradients, so N = 2 and 4 follow the
//! same losses as one rank (within 1e-5 relative: the sums run in another order); rank 0 alone
//! writes the run directory; and a run stopped at one world size resumes at another.

mod common;

use common::{assert_losses_close, assert_same_metrics, train_small as train, vit};

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
        assert_losses_close(&one, &dir, 20, &format!("world {n} vs world 1"));
    }
    // Stopped at step 10 on two ranks, resumed on one (checkpoints hold the whole state).
    let moved = tmp.path().join("moved");
    let o = train(&moved, &["--world", "2", "--stop-at", "10"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", moved.to_str().unwrap(), "--world", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_losses_close(&one, &moved, 20, "world 2 to step 10, then world 1");
}

/// Gradients all-reduced in many small buckets on a communication thread during backward give
/// the bits of one all-reduce after it (every element is summed in rank order either way).
#[test]
fn overlapped_buckets_give_the_bits_of_one_all_reduce_after_backward() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, bucketed) = (tmp.path().join("plain"), tmp.path().join("bucketed"));
    let o = train(&plain, &["--world", "2", "--set", "train.bucket_mb=0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 2 KiB buckets: about one per parameter tensor of this model.
    let o = train(&bucketed, &["--world", "2", "--set", "train.bucket_mb=0.002"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_metrics(&plain, &bucketed, "2 KiB buckets vs one all-reduce");
    // The A/B switch: the same buckets reduced after backward instead of during it.
    let after = tmp.path().join("after");
    let o = train(&after, &["--world", "2", "--set", "train.bucket_mb=0.002", "--set", "train.overlap_comm=false"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_metrics(&bucketed, &after, "2 KiB buckets overlapped vs after backward");
    let o = train(&tmp.path().join("neg"), &["--set", "train.bucket_mb=-1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("train.bucket_mb = -1: expected a size in MiB ≥ 0"));
}

/// ZeRO-1 (`train.sharding = "optimizer"`): each rank updates its share of the parameters with
/// its share of the optimizer state; the run follows world 1, its checkpoints hold the whole
/// state (gathered), and it resumes unsharded on one rank and sharded on four.
#[test]
fn optimizer_sharding_follows_one_rank_and_resumes_across_world_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let o = train(&one, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let zero = ["--set", "train.sharding=optimizer"];
    for n in ["2", "4"] {
        let dir = tmp.path().join(format!("zero{n}"));
        let o = train(&dir, &[&["--world", n][..], &zero[..]].concat());
        assert!(o.status.success(), "world {n}: {}", String::from_utf8_lossy(&o.stderr));
        assert_losses_close(&one, &dir, 20, &format!("ZeRO-1 on {n} ranks vs world 1"));
    }
    // Sharded on 2 ranks to step 10, resumed on one rank (the checkpoint holds the whole state).
    let moved = tmp.path().join("moved");
    let o = train(&moved, &[&["--world", "2", "--stop-at", "10"][..], &zero[..]].concat());
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", moved.to_str().unwrap(), "--world", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_losses_close(&one, &moved, 20, "ZeRO-1 world 2 to step 10, then world 1");
    // Unsharded on one rank to step 10, resumed sharded on four.
    let back = tmp.path().join("back");
    let o = train(&back, &["--stop-at", "10"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", back.to_str().unwrap(), "--world", "4", "--set", "train.sharding=optimizer"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_losses_close(&one, &back, 20, "world 1 to step 10, then ZeRO-1 on 4 ranks");
}

/// ZeRO-3 (`train.sharding = "full"`): each rank keeps its share of every stage's parameters
/// and gathers a stage's when it runs; on 1, 2 and 4 ranks (and with gradient accumulation) the
/// run follows world 1 unsharded; its checkpoints hold the whole model and it resumes unsharded
/// on one rank and fully sharded on four; a V-MoE model is refused.
#[test]
fn full_sharding_follows_one_rank_and_resumes_across_world_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let o = train(&one, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = ["--set", "train.sharding=full"];
    for (n, accum) in [("1", "1"), ("2", "1"), ("4", "1"), ("2", "2")] {
        let dir = tmp.path().join(format!("full{n}x{accum}"));
        let accum_set = format!("train.grad_accum={accum}");
        let o = train(&dir, &[&["--world", n, "--set", &accum_set][..], &full[..]].concat());
        assert!(o.status.success(), "world {n}: {}", String::from_utf8_lossy(&o.stderr));
        if n != "1" {
            assert!(String::from_utf8_lossy(&o.stdout).contains("sharding full (ZeRO-3)"));
        }
        assert_losses_close(&one, &dir, 20, &format!("ZeRO-3 on {n} ranks, grad_accum {accum} vs world 1"));
    }
    let a = vit_model::load_checkpoint(one.join("step-20.safetensors"), vit_tensor::Device::Cpu).unwrap();
    let b =
        vit_model::load_checkpoint(tmp.path().join("full4x1/step-20.safetensors"), vit_tensor::Device::Cpu).unwrap();
    b.check_against(&a.params).unwrap();
    let names =
        |c: &vit_model::Checkpoint| c.optimizer.as_ref().unwrap().names().map(str::to_string).collect::<Vec<_>>();
    let (mut na, mut nb) = (names(&a), names(&b));
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "optimizer state names");
    // Fully sharded on 2 ranks to step 10, resumed unsharded on one rank.
    let moved = tmp.path().join("moved");
    let o = train(&moved, &[&["--world", "2", "--stop-at", "10"][..], &full[..]].concat());
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", moved.to_str().unwrap(), "--world", "1", "--set", "train.sharding=none"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_losses_close(&one, &moved, 20, "ZeRO-3 world 2 to step 10, then world 1 unsharded");
    // Unsharded on one rank to step 10, resumed fully sharded on four.
    let back = tmp.path().join("back");
    let o = train(&back, &["--stop-at", "10"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", back.to_str().unwrap(), "--world", "4", "--set", "train.sharding=full"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_losses_close(&one, &back, 20, "world 1 to step 10, then ZeRO-3 on 4 ranks");
    // A V-MoE model is refused with a one-line error.
    let o = train(&tmp.path().join("moe"), &[&["--set", "model.moe.experts=4"][..], &full[..]].concat());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("train.sharding = \"full\" with a V-MoE model"), "{e}");
}

/// `vit train` of the small recipe with `VITRS_INJECT_FAULT=fault`.
fn train_with_fault(out: &std::path::Path, fault: &str, extra: &[&str]) -> (std::process::Output, std::time::Duration) {
    let recipe = common::small_recipe(20, 10);
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend(recipe.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let t = std::time::Instant::now();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
        .current_dir(common::repo_root())
        .env("VITRS_INJECT_FAULT", fault)
        .args(&args)
        .output()
        .unwrap();
    (o, t.elapsed())
}

/// A rank that dies (panics) ends every rank, and the error names it; a rank stuck longer than
/// `train.collective_timeout` ends the run with an error naming it, instead of a hang.
#[test]
fn a_dead_or_stuck_rank_ends_the_run_with_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = train_with_fault(&tmp.path().join("dead"), "fault_rank=1,train_panic_at_step=5", &["--world", "4"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    let last = e.lines().last().unwrap();
    assert!(last.contains("rank 1") && last.contains("injected fault: train_panic_at_step=5"), "{e}");
    let (o, took) = train_with_fault(
        &tmp.path().join("stuck"),
        "fault_rank=1,train_stall_at_step=5,stall_seconds=6",
        &["--world", "2", "--set", "train.collective_timeout=1"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("waited 1 s for rank(s) [1] (the collective timeout)"), "{e}");
    // Rank 0 gave up after 1 s; the process ends once the stalled thread wakes (6 s).
    assert!(took.as_secs() < 60, "{took:?}");
    let o = train(&tmp.path().join("neg"), &["--set", "train.collective_timeout=-1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("train.collective_timeout = -1: expected seconds ≥ 0"));
}

#[test]
fn a_world_that_does_not_divide_the_batch_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = train(&tmp.path().join("bad"), &["--world", "3"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("train.world = 3: expected a positive number of ranks whose product with train.grad_accum (1) divides train.batch_size (64)"), "{e}");
}
