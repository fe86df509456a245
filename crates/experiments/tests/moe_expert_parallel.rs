//! V-MoE expert parallelism in the trainer (issue 11 item 5): `vit train --world N --set
//! model.moe.expert_parallel=true` shards the experts over the N ranks and follows one rank
//! (losses within 1e-5 relative as data parallelism, MoE statistics of the whole batch), writes
//! checkpoints with every expert (names and shapes of world 1's), resumes across world sizes
//! with and without expert parallelism, and refuses what it cannot do with one-line errors.
//!
//! Router noise is drawn per micro-batch (seeded by its first row) and routing is per group
//! of images inside a micro-batch, so a run follows another when both cut the global batch
//! into the same micro-batches of whole groups: without noise any cut into whole groups gives
//! the same routing (the first test: the same config on 1, 2 and 4 ranks); with noise, world 1
//! takes `grad_accum = N` to draw the noise of N ranks (the second test).

mod common;

use common::{assert_losses_close, vit};
use std::path::Path;

/// A tiny V-MoE on the bundled subset: 2 blocks (block 1 a MoE of 4 experts, k = 2, capacity
/// 0.8 so that some assignments are dropped), groups of 4 images, batch 16, 12 steps with an
/// evaluation and a checkpoint every 6.
const TINY: &[&str] = &[
    "model.width=32",
    "model.depth=2",
    "model.mlp_dim=64",
    "model.moe.experts=4",
    "model.moe.k=2",
    "model.moe.capacity=0.8",
    "model.moe.group_size=4",
    "data.train_limit=512",
    "data.test_limit=128",
    "train.batch_size=16",
    "train.steps=12",
    "schedule.warmup_steps=2",
    "optimizer.lr=1e-2",
    "train.eval_every=6",
    "train.checkpoint_every=6",
    "train.log_every=1",
];

const EP: &str = "model.moe.expert_parallel=true";

/// `vit train --out OUT` of [`TINY`] with `sets` (each a `--set`) and `extra` arguments.
fn train(out: &Path, sets: &[&str], extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    for s in TINY.iter().chain(sets) {
        args.extend(["--set", s]);
    }
    args.extend_from_slice(extra);
    vit(&args)
}

fn ok(o: std::process::Output, what: &str) -> std::process::Output {
    assert!(o.status.success(), "{what}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    o
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The gradient norms (the whole model's, for clipping) agree within 1e-5 relative, and the MoE
/// statistics of every step (block 1's) within `tol` absolute: both are the whole global batch's.
fn assert_moe_stats_close(a: &Path, b: &Path, tol: f64, what: &str) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len(), "{what}");
    for (la, lb) in ma.iter().zip(&mb) {
        let (na, nb) = (la["grad_norm"].as_f64().unwrap(), lb["grad_norm"].as_f64().unwrap());
        assert!((na - nb).abs() <= 1e-5 * na, "{what}: step {} gradient norm {na} vs {nb}", la["step"]);
        let (sa, sb) = (&la["moe"]["1"], &lb["moe"]["1"]);
        assert!(sa.is_object() && sb.is_object(), "{what}: {la} / {lb}");
        let mut numbers = vec!["importance_loss", "aux_loss", "dropped"];
        if sa.get("load_loss").is_some() {
            numbers.push("load_loss");
        }
        for k in numbers {
            let (x, y) = (sa[k].as_f64().unwrap(), sb[k].as_f64().unwrap());
            assert!((x - y).abs() <= tol, "{what}: step {} {k} {x} vs {y}", la["step"]);
        }
        for (x, y) in sa["load"].as_array().unwrap().iter().zip(sb["load"].as_array().unwrap()) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= tol, "{what}: load {sa} vs {sb}");
        }
    }
}

/// Parameter names and shapes of a checkpoint.
fn shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let c = vit_model::checkpoint::load_checkpoint(path, vit_tensor::Device::Cpu).unwrap();
    let mut out: Vec<_> = c.params.iter().map(|(n, t)| (n.to_string(), t.dims().to_vec())).collect();
    let state = c.optimizer.expect("the checkpoint holds the optimizer state");
    out.extend(state.iter().map(|(n, t)| (format!("optimizer {n}"), t.dims().to_vec())));
    out
}

#[test]
fn expert_parallel_on_2_and_4_ranks_follows_one_rank_and_resumes_across_world_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    // Without router noise: the same config on any world size (every micro-batch whole groups).
    let quiet = "model.moe.noise=0";
    let one = tmp.path().join("one");
    ok(train(&one, &[quiet], &[]), "world 1");
    let dropped = metrics(&one)[0]["moe"]["1"]["dropped"].as_f64().unwrap();
    assert!(dropped > 0.0, "capacity 0.8 drops assignments: {dropped}");
    let one_ckpt = shapes(&one.join("step-12.safetensors"));
    assert!(one_ckpt.iter().any(|(n, d)| n == "blocks.1.moe.experts.fc1.weight" && d == &[4, 64, 32]));
    for n in ["2", "4"] {
        let dir = tmp.path().join(format!("ep{n}"));
        let o = ok(train(&dir, &[quiet, EP], &["--world", n]), &format!("EP world {n}"));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let per_rank = 4 / n.parse::<usize>().unwrap();
        assert!(stdout.contains(&format!("{per_rank} experts per rank (expert parallel)")), "{stdout}");
        assert_losses_close(&one, &dir, 12, &format!("EP world {n} vs world 1"));
        assert_moe_stats_close(&one, &dir, 1e-5, &format!("EP world {n} vs world 1"));
        assert_eq!(shapes(&dir.join("step-12.safetensors")), one_ckpt, "EP world {n}: checkpoint names and shapes");
    }
    // EP on 2 ranks to step 6, resumed on 1 rank (the checkpoint holds every expert).
    let moved = tmp.path().join("moved");
    let o = train(&moved, &[quiet, EP], &["--world", "2", "--stop-at", "6"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    ok(vit(&["train", "--resume", moved.to_str().unwrap(), "--world", "1"]), "resume on 1 rank");
    assert_losses_close(&one, &moved, 12, "EP world 2 to step 6, then world 1");
    // World 1 without EP to step 6, resumed with the experts sharded over 4 ranks.
    let back = tmp.path().join("back");
    let o = train(&back, &[quiet], &["--stop-at", "6"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    ok(vit(&["train", "--resume", back.to_str().unwrap(), "--world", "4", "--set", EP]), "resume with EP on 4 ranks");
    assert_losses_close(&one, &back, 12, "world 1 to step 6, then EP world 4");
}

#[test]
fn with_router_noise_expert_parallel_follows_one_rank_with_the_same_micro_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    ok(train(&one, &["train.grad_accum=2"], &[]), "world 1, 2 micro-batches");
    let first = &metrics(&one)[0]["moe"]["1"];
    assert!(first["load_loss"].as_f64().unwrap() > 0.0, "noise gives a load loss: {first}");
    let ep = tmp.path().join("ep2");
    ok(train(&ep, &[EP], &["--world", "2"]), "EP world 2");
    assert_losses_close(&one, &ep, 12, "EP world 2 vs world 1 with grad_accum 2");
    assert_moe_stats_close(&one, &ep, 1e-5, "EP world 2 vs world 1 with grad_accum 2");
}

#[test]
fn expert_parallel_configs_it_cannot_run_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str], &str)] = &[
        (
            &[EP, "model.moe.experts=6"],
            &["--world", "4"],
            "model.moe.experts = 6: expected a multiple of the 4 data-parallel ranks",
        ),
        (
            &[EP, "train.mesh.model=2"],
            &["--world", "2"],
            "model.moe.expert_parallel = true with train.mesh.model = 2: expected one of the two",
        ),
        (
            &[EP, "train.sharding=optimizer"],
            &["--world", "2"],
            "model.moe.expert_parallel = true with train.sharding = \"optimizer\": expected one of the two",
        ),
        (&["model.moe.expert_parallel=maybe"], &[], "moe.expert_parallel = \"maybe\": expected true or false"),
        (
            &[EP, "model.moe.experts=32", "optimizer.name=factored-adam"],
            &["--world", "2"],
            "factored-adam factors the second moment of blocks.1.moe.experts.fc1.bias [32, 64] over its expert axis",
        ),
    ];
    for (i, (sets, extra, want)) in cases.iter().enumerate() {
        let o = train(&tmp.path().join(format!("bad{i}")), sets, extra);
        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert_eq!(o.status.code(), Some(1), "{sets:?}: {err}");
        assert!(err.contains(want), "{sets:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
