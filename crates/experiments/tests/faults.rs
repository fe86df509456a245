//! Faults never cost finished work (issue 16): each injected fault below ends `vit train` with
//! one line on stderr and exit code 1, the state of the last completed step is saved, and
//! `--resume` (with the data fixed, or in skip mode) continues exactly as a straight run.
//! SIGTERM/SIGINT are in `determinism.rs`'s neighbour `train.rs`.

mod common;

use common::{assert_same_bytes, assert_same_metrics};
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// An image-folder dataset of 16×16 RGB PNGs, 2 classes × 32 training and 2 × 8 test images,
/// with a recipe for it (`config.toml`), under `dir`; returns the recipe's path.
fn fixture(dir: &Path, steps: u64, extra_data: &str) -> PathBuf {
    for (split, per_class) in [("train", 32u32), ("test", 8)] {
        for class in ["a", "b"] {
            let folder = dir.join("data").join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..per_class {
                let shade = if class == "a" { 40u32 } else { 200 };
                let img = image::RgbImage::from_fn(16, 16, |x, y| {
                    let v = (shade + 7 * x + 5 * y + 13 * i) % 256;
                    image::Rgb([v as u8, (v / 2) as u8, (255 - v) as u8])
                });
                img.save(folder.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
    let config = format!(
        r#"[model]
preset = "custom"
image_size = 16
patch = 8
channels = 3
width = 32
depth = 1
mlp_dim = 64
heads = 2
classes = 2
pool = "gap"

[data]
format = "folder"
path = "{}"
train = "train"
test = "test"
{extra_data}

[optimizer]
name = "adamw"
lr = 1e-3

[schedule]
decay = "cosine"
warmup_steps = 2

[train]
batch_size = 16
steps = {steps}
eval_every = 0
log_every = 1
checkpoint_every = 8
seed = 0
device = "cpu"
"#,
        dir.join("data").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn vit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vit"))
}

fn train(config: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = vit();
    cmd.args(["train", "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    cmd.envs(env.iter().copied()).output().expect("run vit")
}

fn resume(out: &Path) -> Output {
    vit().args(["train", "--resume", out.to_str().unwrap()]).output().expect("run vit")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run failed with exactly one line on stderr, exit code 1; returns that line.
fn one_line_error(o: &Output, what: &str) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {e}");
    assert_eq!(e.lines().count(), 1, "{what}: expected one line, got:\n{e}");
    e.trim().to_string()
}

/// The newest `step-N.safetensors` of a run directory.
fn newest_checkpoint(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()
        })
        .max()
}

/// A straight run, then the faulty one resumed, compare equal (metrics and final checkpoint).
fn assert_resumed_equals_straight(straight: &Path, resumed: &Path, steps: u64, what: &str) {
    let r = resume(resumed);
    assert!(r.status.success(), "{what}: resume failed: {}", stderr(&r));
    assert_same_metrics(straight, resumed, what);
    let last = format!("step-{steps}.safetensors");
    assert_same_bytes(&straight.join(&last), &resumed.join(&last), what);
}

/// A fixture of `steps` steps (fail mode) in a fresh folder, and its straight run there.
fn with_straight_run(steps: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let config = fixture(tmp.path(), steps, "");
    let straight = tmp.path().join("straight");
    let o = train(&config, &straight, &[]);
    assert!(o.status.success(), "the straight run: {}", stderr(&o));
    (tmp, config, straight)
}

/// `vit train` of the recipe into `out`, in the background, its output captured.
fn spawn_train(config: &Path, out: &Path) -> std::process::Child {
    vit()
        .args(["train", "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn train_file(root: &Path, class: &str, i: u32) -> PathBuf {
    root.join("data/train").join(class).join(format!("{i:02}.png"))
}

#[test]
fn a_truncated_image_mid_run_saves_the_last_step_and_the_fixed_run_resumes_exactly() {
    let (tmp, config, straight) = with_straight_run(12);
    // Truncate one training PNG (its header stays good, so only decoding finds it). Try files
    // until one is first met after step 1 (the order is fixed by the seed, so this is too).
    for i in 0..8 {
        let file = train_file(tmp.path(), "b", i);
        let good = std::fs::read(&file).unwrap();
        std::fs::write(&file, &good[..good.len() / 2]).unwrap();
        let out = tmp.path().join(format!("faulty{i}"));
        let o = train(&config, &out, &[]);
        let line = one_line_error(&o, "truncated PNG");
        assert!(line.contains(&format!("{i:02}.png")), "the error names the file: {line}");
        std::fs::write(&file, &good).unwrap();
        let Some(saved) = newest_checkpoint(&out) else {
            continue; // met in the first step: nothing was finished, nothing to save
        };
        assert!(line.contains(&format!("the state after step {saved} is saved")), "{line}");
        let summary = std::fs::read_to_string(out.join("summary.json")).unwrap();
        assert!(summary.contains("\"stop_reason\": \"error\""), "{summary}");
        assert_resumed_equals_straight(&straight, &out, 12, "truncated PNG, fixed, resumed");
        return;
    }
    panic!("no truncated file was met after the first step");
}

#[test]
fn skip_mode_lists_bad_files_once_counts_them_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let config = fixture(tmp.path(), 16, "on_bad_example = \"skip\"\nmax_bad_fraction = 0.1");
    // A truncated PNG (found when decoded) and a file that is no image (found by the scan).
    let corrupt = || {
        let png = train_file(tmp.path(), "a", 3);
        let good = std::fs::read(&png).unwrap();
        std::fs::write(&png, &good[..good.len() / 3]).unwrap();
        std::fs::write(train_file(tmp.path(), "b", 5), b"this is not a PNG at all").unwrap();
    };
    corrupt();
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));
    let o = train(&config, &straight, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 training file(s) are not readable images"), "{}", stderr(&o));
    let listed = std::fs::read_to_string(straight.join("bad_examples.txt")).unwrap();
    let lines: Vec<&str> = listed.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 2, "each bad file once:\n{listed}");
    assert!(lines[0].starts_with("0\t") && lines[0].contains("b/05.png"), "the scan's find, at step 0: {listed}");
    assert!(lines[1].contains("a/03.png") && lines[1].contains("truncated"), "{listed}");
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    assert_eq!(last["bad_examples"], 2);
    // Stopped and resumed: the same batches, metrics, checkpoint and list.
    let mut cmd = vit();
    cmd.args(["train", "--config", config.to_str().unwrap(), "--out", resumed.to_str().unwrap(), "--stop-at", "5"]);
    assert_eq!(cmd.output().unwrap().status.code(), Some(3));
    assert_resumed_equals_straight(&straight, &resumed, 16, "skip mode, stopped at 5");
    assert_eq!(std::fs::read_to_string(resumed.join("bad_examples.txt")).unwrap(), listed);
    // Two data-parallel ranks, each decoding only its half of every batch: rank 0 lists what
    // both met, the same list and count.
    let two = tmp.path().join("two");
    let mut cmd = vit();
    cmd.args(["train", "--config", config.to_str().unwrap(), "--out", two.to_str().unwrap(), "--world", "2"]);
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(two.join("bad_examples.txt")).unwrap(), listed, "world 2");
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(two.join("metrics.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    assert_eq!(last["bad_examples"], 2, "world 2");
    // Over the allowed fraction (2 of 64 > 1%), the run stops with the list named.
    let strict = fixture(tmp.path(), 16, "on_bad_example = \"skip\"\nmax_bad_fraction = 0.01");
    corrupt();
    let o = train(&strict, &tmp.path().join("strict"), &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    let line = e.lines().last().unwrap();
    assert!(line.contains("more than data.max_bad_fraction = 0.01") && line.contains("bad_examples.txt"), "{e}");
}

/// Runs the recipe in the background, waits until `metrics.jsonl` has `lines` lines, applies
/// `fault`, and returns the finished process's output.
fn fault_mid_run(config: &Path, out: &Path, lines: usize, fault: impl FnOnce()) -> Output {
    let child = spawn_train(config, out);
    let t = Instant::now();
    let metrics = out.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < lines {
        assert!(t.elapsed() < Duration::from_secs(120), "the run did not reach step {lines}");
        std::thread::sleep(Duration::from_millis(2));
    }
    fault();
    child.wait_with_output().unwrap()
}

#[test]
fn a_file_deleted_or_made_unreadable_mid_run_saves_the_state_and_resumes_exactly() {
    let steps = 400;
    let (tmp, config, straight) = with_straight_run(steps);
    let file = train_file(tmp.path(), "a", 7);
    let good = std::fs::read(&file).unwrap();
    // Deleted after the scan (ENOENT), then replaced by a link to a directory (EISDIR:
    // unreadable, even for root). The link is renamed over the file in one step, so the loader
    // never sees the name missing in between (a remove then a mkdir raced it).
    let dir = tmp.path().join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let link = tmp.path().join("link-to-a-directory");
    for (what, expect) in [("deleted", "No such file"), ("unreadable", "Is a directory")] {
        let out = tmp.path().join(what);
        let o = fault_mid_run(&config, &out, 3, || {
            if what == "unreadable" {
                std::os::unix::fs::symlink(&dir, &link).unwrap();
                std::fs::rename(&link, &file).unwrap();
            } else {
                std::fs::remove_file(&file).unwrap();
            }
        });
        let line = one_line_error(&o, what);
        assert!(line.contains("a/07.png") && line.contains(expect), "{what}: {line}");
        let saved = newest_checkpoint(&out).expect("a checkpoint of the last completed step");
        assert!(saved >= 3 && line.contains(&format!("step {saved}")), "{what}: {line}");
        if what == "unreadable" {
            std::fs::remove_file(&file).unwrap();
        }
        std::fs::write(&file, &good).unwrap();
        assert_resumed_equals_straight(&straight, &out, steps, what);
    }
}

#[test]
fn panics_in_a_loader_worker_or_the_training_loop_save_the_state_and_resume_exactly() {
    let (tmp, config, straight) = with_straight_run(12);
    for (fault, expect) in [
        ("loader_panic_at_step=5", "data loader worker: panicked while making step 5"),
        ("train_panic_at_step=5", "internal error (please report it): injected fault: train_panic_at_step=5"),
    ] {
        let out = tmp.path().join(fault.replace('=', "-"));
        let o = train(&config, &out, &[("VITRS_INJECT_FAULT", fault)]);
        let line = one_line_error(&o, fault);
        assert!(line.contains(expect), "{fault}: {line}");
        assert!(line.ends_with(&format!("the state after step 5 is saved: continue with --resume {}", out.display())));
        assert_eq!(newest_checkpoint(&out), Some(5));
        assert_resumed_equals_straight(&straight, &out, 12, fault);
    }
}

#[test]
fn a_full_disk_during_a_checkpoint_write_is_one_error_and_the_run_resumes_exactly() {
    let (tmp, config, straight) = with_straight_run(12);
    let out = tmp.path().join("full");
    std::fs::create_dir_all(&out).unwrap();
    let child = spawn_train(&config, &out);
    // The checkpoint of step 8 is written to `step-8.safetensors.tmp-<pid>` first: make that
    // name lead to /dev/full, where every write fails with ENOSPC.
    let tmp_name = out.join(format!("step-8.safetensors.tmp-{}", child.id()));
    std::os::unix::fs::symlink("/dev/full", &tmp_name).unwrap();
    let o = child.wait_with_output().unwrap();
    let line = one_line_error(&o, "full disk");
    assert!(line.contains("No space left on device") && line.contains("step-8.safetensors"), "{line}");
    // The failed write left nothing torn; the error path saved step 8 on its second try (the
    // temporary name was cleaned up after the first).
    assert!(line.ends_with(&format!("the state after step 8 is saved: continue with --resume {}", out.display())));
    assert!(!tmp_name.exists());
    assert_resumed_equals_straight(&straight, &out, 12, "full disk");
}

#[test]
fn vit_data_check_lists_every_bad_file_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let config = fixture(tmp.path(), 4, "");
    let check = |extra: &[&str]| {
        let mut cmd = vit();
        cmd.args(["data", "check", "--config", config.to_str().unwrap()]).args(extra);
        cmd.output().unwrap()
    };
    let o = check(&["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((r["examples"].as_u64(), r["bad"].as_array().map(|b| b.len())), (Some(64), Some(0)));
    // A GIF where a PNG should be, 500 random bytes named corrupt.jpg (sorted after a/31.png:
    // example 32, so class b starts at 33), and a PNG cut short (found only by decoding).
    std::fs::write(train_file(tmp.path(), "a", 1), b"GIF89a not ours").unwrap();
    let noise: Vec<u8> = (0..500u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(tmp.path().join("data/train/a/corrupt.jpg"), noise).unwrap();
    let png = train_file(tmp.path(), "b", 2);
    let good = std::fs::read(&png).unwrap();
    std::fs::write(&png, &good[..40]).unwrap();
    let o = check(&["--json"]);
    assert_eq!(o.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["examples"], 65);
    let bad = r["bad"].as_array().unwrap();
    let found: Vec<(u64, &str)> = bad.iter().map(|b| (b[0].as_u64().unwrap(), b[1].as_str().unwrap())).collect();
    assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 32, 35], "{r}");
    assert!(found[0].1.contains("a/01.png") && found[0].1.contains("starts with [47 49 46 38]"), "{r}");
    assert!(found[1].1.contains("a/corrupt.jpg") && found[1].1.contains("expected a JPEG"), "{r}");
    assert!(found[2].1.contains("b/02.png") && found[2].1.contains("decodable"), "{r}");
    assert!(stderr(&o).contains("3 bad example(s)"));
    // The test split is clean; and training refuses the dirty train split before the first step.
    assert!(check(&["--split", "test"]).status.success());
    let o = train(&config, &tmp.path().join("refused"), &[]);
    let line = one_line_error(&o, "bad files before training");
    assert!(line.contains("2 file(s) of the train split are not readable"), "{line}");
    assert!(line.contains("a/01.png") && line.contains("a/corrupt.jpg"), "{line}");
    assert!(newest_checkpoint(&tmp.path().join("refused")).is_none());
}
