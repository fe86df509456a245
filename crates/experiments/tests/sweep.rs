//! `vit sweep` end to end on a 2 × 2 grid of a tiny ViT on the bundled data: every point runs,
//! is interrupted and resumed, is skipped once finished; results.jsonl, fit.json and the plots
//! are written; bad axes are one-line errors before anything runs.

use std::{path::Path, process::Command};
use vit_experiments::sweep::{run_sweep, PointStatus, Record, Sweep, SweepError, SweepOptions};

/// A tiny ViT (16 tokens of width 8 or 16, one block) on 256 bundled images.
const BASE: &str = r#"
[model]
image_size = 28
patch = 7
channels = 1
width = 16
depth = 1
mlp_dim = 32
heads = 2
classes = 10
pool = "gap"
posemb = "learn"

[data]
format = "idx"
path = "bundled:fashion-mnist-small"
train_limit = 256
test_limit = 128

[optimizer]
name = "adamw"
lr = 2e-3

[schedule]
decay = "cosine"

[train]
batch_size = 32
steps = 4
log_every = 1
"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn sweep_file(axes: &str) -> String {
    format!("base = \"base.toml\"\n[axes]\n{axes}\n[fit]\nresamples = 20\n")
}

fn records(out: &Path) -> Vec<Record> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_sweep_runs_resumes_skips_and_writes_results_fits_and_plots() {
    let tmp = tempfile::Builder::new().prefix("vitrs-sweep-").tempdir().unwrap();
    write(tmp.path(), "base.toml", BASE);
    let path = write(tmp.path(), "sweep.toml", &sweep_file("\"model.width\" = [8, 16]\n\"train.steps\" = [3, 5]"));
    let plan = Sweep::from_file(&path).unwrap();
    let names: Vec<&str> = plan.points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.width=8,train.steps=3",
            "model.width=8,train.steps=5",
            "model.width=16,train.steps=3",
            "model.width=16,train.steps=5"
        ]
    );
    let out = tmp.path().join("out");

    // 1. Interrupted: two points side by side stop at step 2 with a checkpoint; no other starts.
    let opts = SweepOptions { jobs: 2, threads: Some(2), stop_at: Some(2), ..Default::default() };
    match run_sweep(&plan, &out, &opts) {
        Err(SweepError::Interrupted { interrupted: 2, left: 2, done: 0 }) => {}
        other => panic!("expected 2 points interrupted and 2 not started, got {other:?}"),
    }
    for name in &names[..2] {
        assert!(out.join(name).join("step-2.safetensors").exists(), "{name}: no checkpoint");
    }
    assert!(!out.join(names[2]).exists(), "a point started after the interruption");
    assert_eq!(records(&out).len(), 0);

    // 2. Continued: the interrupted points resume from step 2, the others run.
    let opts = SweepOptions { jobs: 2, threads: Some(2), ..Default::default() };
    let report = run_sweep(&plan, &out, &opts).unwrap();
    let statuses: Vec<PointStatus> = report.points.iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(
        statuses,
        [PointStatus::Resumed { from: 2 }, PointStatus::Resumed { from: 2 }, PointStatus::Ran, PointStatus::Ran]
    );
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    assert_eq!(recs, report.records);
    for (r, p) in recs.iter().zip(&plan.points) {
        assert_eq!(r.name, p.name);
        let steps = p.config.train.steps.unwrap();
        assert_eq!(r.steps, steps, "{}", r.name);
        assert_eq!(r.images_seen, steps * 32);
        assert_eq!(r.train_images, 256);
        let m = p.config.model_config().unwrap();
        assert_eq!(r.params, vit_model::ParamCounts::of(&m).unwrap().total);
        assert_eq!(r.train_flops, m.forward_flops_per_image() * 3.0 * (steps * 32) as f64);
        assert_eq!(r.settings["model.width"], m.width as u64);
        let acc = r.metrics["test_accuracy"];
        assert!((0.0..=1.0).contains(&acc), "{}: {acc}", r.name);
        assert_eq!(r.metrics["test_error"], 1.0 - acc);
        assert!(r.metrics["test_loss"].is_finite() && r.metrics["train_loss"].is_finite());
        // Each point's run directory is a whole run: config, metrics to the last step, summary.
        let metrics = std::fs::read_to_string(out.join(&r.name).join("metrics.jsonl")).unwrap();
        let steps_logged: Vec<u64> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps_logged, (1..=steps).collect::<Vec<_>>(), "{}", r.name);
    }
    // Wider models cost more FLOPs per image.
    assert!(recs[2].forward_flops_per_image > recs[0].forward_flops_per_image);
    let fit: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("fit.json")).unwrap()).unwrap();
    assert_eq!(fit["metric"], "test_error");
    assert!(fit["compute"]["points"].as_array().is_some_and(|p| !p.is_empty()));
    // Two points per data and model curve: too few to fit, and fit.json says so.
    assert_eq!(fit["data"].as_array().unwrap().len(), 2);
    assert_eq!(fit["model"].as_array().unwrap().len(), 2);
    assert!(fit["data"][0]["skipped"].as_str().unwrap().contains("expected at least 4"), "{}", fit["data"][0]);
    for svg in ["compute.svg", "data.svg", "model.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("<circle"), "{svg}");
    }

    // 3. Again: every point is finished and skipped; the results are the same.
    let before = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let report = run_sweep(&plan, &out, &opts).unwrap();
    assert!(report.points.iter().all(|(_, s)| *s == PointStatus::Skipped), "{:?}", report.points);
    assert_eq!(std::fs::read_to_string(out.join("results.jsonl")).unwrap(), before);

    // A directory written before a config key existed (its default implicit) is still this
    // point's: here `train.comm`, added after the first sweeps.
    let cfg = out.join("model.width=8,train.steps=3").join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let older: String = text.lines().filter(|l| !l.starts_with("comm =")).map(|l| format!("{l}\n")).collect();
    assert_ne!(older, text, "the resolved config should name train.comm");
    std::fs::write(&cfg, older).unwrap();
    let report = run_sweep(&plan, &out, &opts).unwrap();
    assert!(report.points.iter().all(|(_, s)| *s == PointStatus::Skipped), "{:?}", report.points);

    // A run directory that holds another config is refused before anything runs.
    let changed = write(
        tmp.path(),
        "sweep.toml",
        &format!(
            "set = [\"optimizer.lr=1e-3\"]\n{}",
            sweep_file("\"model.width\" = [8, 16]\n\"train.steps\" = [3, 5]")
        ),
    );
    let e = run_sweep(&Sweep::from_file(&changed).unwrap(), &out, &opts).unwrap_err().to_string();
    assert!(e.contains("model.width=8,train.steps=3") && e.contains("another config"), "{e}");
    assert_eq!(e.lines().count(), 1);
}

#[test]
fn bad_axes_are_one_line_errors_before_anything_runs() {
    let tmp = tempfile::Builder::new().prefix("vitrs-sweep-bad-").tempdir().unwrap();
    write(tmp.path(), "base.toml", BASE);
    for (axes, needles) in [
        ("\"train.stepz\" = [3]", &["train.stepz", "stepz"][..]),
        ("\"model.widht\" = [8]", &["model.widht", "widht"][..]),
        ("\"optimizer.lr\" = []", &["optimizer.lr", "empty list"][..]),
        ("\"train.steps\" = 3", &["train.steps", "expected a list"][..]),
        ("\"train.steps\" = [3, 0]", &["train.steps = 0", "at least 1"][..]),
        ("\"optimizer.name\" = [\"adamw\", \"adam\"]", &["optimizer.name = \"adam\"", "factored-adam"][..]),
        ("\"model.heads\" = [2, 3]", &["model.heads = 3", "heads"][..]),
        ("\"data.train_limit\" = [256, 16]", &["data.train_limit = 16", "batch_size"][..]),
        ("\"train.steps\" = [3, 3]", &["train.steps = 3", "twice"][..]),
        // Each value alone is fine; together they are not.
        ("\"model.width\" = [12, 16]\n\"model.heads\" = [4, 8]", &["point model.heads=8,model.width=12", "heads"][..]),
    ] {
        let path = write(tmp.path(), "sweep.toml", &sweep_file(axes));
        let e = Sweep::from_file(&path).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{axes}: {n:?} not in: {e}");
        }
        assert_eq!(e.lines().count(), 1, "{axes}: {e}");
    }
    for (text, needle) in [
        ("base = \"missing.toml\"\n[axes]\n\"train.steps\" = [3]", "missing.toml"),
        ("base = \"base.toml\"\n[axes]\n", "[axes] is empty"),
        ("base = \"base.toml\"\n[axes]\n\"train.steps\" = [3]\n[fit]\nmetric = \"accuracy\"", "fit.metric"),
        ("base = \"base.toml\"\n[axes]\n\"train.steps\" = [3]\n[fit]\nconfidence = 2.0", "fit.confidence"),
        ("base = \"base.toml\"\nbogus = 1\n[axes]\n\"train.steps\" = [3]", "bogus"),
    ] {
        let path = write(tmp.path(), "sweep.toml", text);
        let e = Sweep::from_file(&path).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle:?} not in: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    // Through the binary: exit code 1, one line on stderr, and no output folder made.
    let path = write(tmp.path(), "sweep.toml", &sweep_file("\"train.steps\" = [3, 0]"));
    let out = tmp.path().join("out");
    let r = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["sweep", "--config", path.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("axis train.steps = 0"), "{err}");
    assert!(!out.exists());

    // Each matmul precision is fine, but it is process-wide: points side by side must agree.
    let path = write(tmp.path(), "sweep.toml", &sweep_file("\"train.matmul_precision\" = [\"f32\", \"bf16\"]"));
    let sweep = Sweep::from_file(&path).unwrap();
    let out = tmp.path().join("out-mp");
    let opts = SweepOptions { jobs: 2, ..Default::default() };
    let e = run_sweep(&sweep, &out, &opts).unwrap_err().to_string();
    for n in ["train.matmul_precision = bf16", "--jobs 2", "process-wide"] {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
    assert_eq!(e.lines().count(), 1, "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "no point may start");
}

#[test]
fn the_binary_runs_a_sweep_and_reports_json() {
    let tmp = tempfile::Builder::new().prefix("vitrs-sweep-cli-").tempdir().unwrap();
    write(tmp.path(), "base.toml", BASE);
    let path = write(tmp.path(), "sweep.toml", &sweep_file("\"train.steps\" = [2, 3]"));
    let out = tmp.path().join("out");
    // --set applies to every point after the file's own set (here: the training split's size).
    let r = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["sweep", "--config", path.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json", "--jobs", "2"])
        .args(["--set", "data.train_limit=192"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).expect("stdout is one JSON object");
    assert_eq!(j["points"].as_array().unwrap().len(), 2);
    assert_eq!(j["points"][0]["name"], "train.steps=2");
    assert_eq!(j["points"][0]["status"], "ran");
    assert_eq!(j["fit"]["metric"], "test_error");
    // Progress went to stderr, one line per point start and end.
    assert!(String::from_utf8_lossy(&r.stderr).contains("train.steps=3: done"));
    for rec in records(&out) {
        assert_eq!(rec.train_images, 192, "{}: --set data.train_limit not applied", rec.name);
    }

    // A --set the config refuses is a one-line error before anything runs.
    let out2 = tmp.path().join("out2");
    let r = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["sweep", "--config", path.to_str().unwrap(), "--out", out2.to_str().unwrap()])
        .args(["--set", "train.batch_sise=4"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("batch_sise"), "{err}");
    assert!(!out2.exists());
}
