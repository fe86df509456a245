//! Running a sweep: every point is a run directory `<out>/<point name>` trained by
//! [`crate::train::train`] in this process. A point whose `summary.json` says `completed` is
//! skipped, one with a checkpoint is resumed from it, any other starts fresh. `jobs` points run
//! side by side, each on its own rayon pool of `threads / jobs` threads. At the end (also after
//! an interruption) `results.jsonl`, `fit.json` and the plots are written from every finished
//! point.

use crate::sweep::{analysis, plot, Analysis, Sweep, SweepError};
use crate::train::{self, run_dir::RunDir, RunOptions, TrainError};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::Instant,
};
use train::config::TrainConfig;
use vit_model::{ModelConfig, ParamCounts};

/// Options of one `vit sweep` invocation.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Points trained side by side (at least 1).
    pub jobs: usize,
    /// CPU threads shared among the jobs (default: rayon's global pool size, i.e. the cores or
    /// `RAYON_NUM_THREADS`).
    pub threads: Option<usize>,
    /// Stop every point before this step after saving a checkpoint, as if interrupted (tests,
    /// preemption drills).
    pub stop_at: Option<u64>,
    /// Receives one line as each point starts and ends.
    pub log: fn(&str),
}

impl Default for SweepOptions {
    /// One job, every thread, no stop, no log.
    fn default() -> Self {
        SweepOptions { jobs: 1, threads: None, stop_at: None, log: |_| {} }
    }
}

/// What became of one point in this invocation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointStatus {
    /// Finished in an earlier invocation.
    Skipped,
    /// Trained from the start.
    Ran,
    /// Continued from the checkpoint of step `from`.
    Resumed { from: u64 },
    /// Stopped by a signal or `stop_at` at `step`, checkpoint saved.
    Interrupted { step: u64 },
    /// Not started (an earlier point was interrupted).
    NotStarted,
    /// Failed with this error.
    Failed { error: String },
}

/// One line of `results.jsonl`: a finished point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The point's name, also its run directory under the output folder.
    pub name: String,
    /// The axis values of the point.
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Model parameters.
    pub params: u64,
    /// Forward FLOPs per image (`ModelConfig::forward_flops_per_image`).
    pub forward_flops_per_image: f64,
    /// Images per optimizer step.
    pub batch_size: usize,
    /// Optimizer steps trained.
    pub steps: u64,
    /// Training images seen: steps × batch size.
    pub images_seen: u64,
    /// The training split's size (after `data.train_limit`).
    pub train_images: usize,
    /// Training FLOPs: forward FLOPs per image × 3 × images seen (a step under PatchDropout
    /// counted at the tokens it keeps, `ModelConfig::forward_flops_keeping`).
    pub train_flops: f64,
    /// Every numeric value of the run's `summary.json` (nested keys joined by `/`), and
    /// `test_error` = 1 − `test_accuracy`.
    pub metrics: BTreeMap<String, f64>,
}

/// What one invocation did.
#[derive(Debug, Clone)]
pub struct SweepReport {
    /// Every point's name and status, in grid order.
    pub points: Vec<(String, PointStatus)>,
    /// The finished points (what `results.jsonl` holds).
    pub records: Vec<Record>,
    /// What `fit.json` holds.
    pub analysis: Analysis,
}

/// How a point starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Start {
    Skip,
    Resume(u64),
    Fresh,
}

/// Runs (or continues) `sweep` under `out`; writes `results.jsonl`, `fit.json`, `compute.svg`,
/// `data.svg` and `model.svg` there. An interrupted or failed point is an error after those
/// files are written from the finished points.
pub fn run_sweep(sweep: &Sweep, out: &Path, opts: &SweepOptions) -> Result<SweepReport, SweepError> {
    let io =
        |what: &str, p: &Path, e: &dyn std::fmt::Display| SweepError::Io(format!("cannot {what} {}: {e}", p.display()));
    std::fs::create_dir_all(out).map_err(|e| io("create", out, &e))?;
    if opts.jobs == 0 {
        return Err(SweepError::File("--jobs 0: expected at least one job".into()));
    }
    // `train.matmul_precision` is process-wide (vit_tensor::cpu::set_matmul_precision): points
    // side by side must agree on it.
    if opts.jobs > 1 {
        let mut precisions = sweep.points.iter().map(|p| (p, p.config.train.matmul_precision));
        if let Some((first, want)) = precisions.next() {
            if let Some((p, other)) = precisions.find(|(_, mp)| *mp != want) {
                return Err(SweepError::Point {
                    name: p.name.clone(),
                    msg: format!(
                        "train.matmul_precision = {} with --jobs {} while {} has {}: expected one matmul precision \
                         for points that run side by side (it is process-wide), or --jobs 1",
                        other.setting(),
                        opts.jobs,
                        first.name,
                        want.setting()
                    ),
                });
            }
        }
    }
    // Before anything runs: what each point's directory holds, and that it is this point's.
    let mut starts = Vec::with_capacity(sweep.points.len());
    for p in &sweep.points {
        let dir = out.join(&p.name);
        let want = p
            .config
            .resolved()
            .and_then(|c| c.to_toml())
            .map_err(|e| SweepError::Point { name: p.name.clone(), msg: e.to_string() })?;
        let cfg_path = dir.join("config.toml");
        let start = if !cfg_path.exists() {
            Start::Fresh
        } else {
            let have = std::fs::read_to_string(&cfg_path).map_err(|e| io("read", &cfg_path, &e))?;
            // Compared as resolved configs, so a directory written before a config key was
            // added (its default left implicit there) still counts as this point's.
            let have_resolved = train::config::TrainConfig::from_toml(&have, &[])
                .and_then(|c| c.resolved())
                .and_then(|c| c.to_toml())
                .ok();
            if have != want && have_resolved.as_deref() != Some(want.as_str()) {
                return Err(SweepError::Point {
                    name: p.name.clone(),
                    msg: format!(
                        "{} holds another config than this sweep gives the point: remove the directory or choose another --out",
                        dir.display()
                    ),
                });
            }
            if summary_completed(&dir) {
                Start::Skip
            } else {
                let run = RunDir::create(&dir).map_err(|e| SweepError::Io(e.to_string()))?;
                match run.checkpoints().map_err(|e| SweepError::Io(e.to_string()))?.pop() {
                    Some((step, _)) => Start::Resume(step),
                    None => Start::Fresh,
                }
            }
        };
        starts.push(start);
    }

    let n = sweep.points.len();
    let to_run = starts.iter().filter(|s| **s != Start::Skip).count();
    let jobs = opts.jobs.min(to_run.max(1));
    let threads = opts.threads.unwrap_or_else(rayon::current_num_threads).max(1);
    let statuses: Mutex<Vec<PointStatus>> = Mutex::new(vec![PointStatus::NotStarted; n]);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let log = opts.log;
    for (i, p) in sweep.points.iter().enumerate() {
        if starts[i] == Start::Skip {
            statuses.lock().expect("not poisoned")[i] = PointStatus::Skipped;
            log(&format!("[{}/{n}] {}: finished before, skipped", i + 1, p.name));
        }
    }
    // Without pools of their own, the points run on the current one (the same bits).
    let pools = crate::thread_pools::split(jobs, threads).unwrap_or_else(|e| {
        log(&format!("warning: {e}; using the current pool"));
        Vec::new()
    });
    let work = |pool: Option<&rayon::ThreadPool>| loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let i = next.fetch_add(1, Ordering::SeqCst);
        if i >= n {
            return;
        }
        let (p, start) = (&sweep.points[i], starts[i]);
        if start == Start::Skip {
            continue;
        }
        let status = match RunDir::create(out.join(&p.name)) {
            Err(e) => PointStatus::Failed { error: e.to_string() },
            Ok(run) => {
                log(&format!(
                    "[{}/{n}] {}: {}",
                    i + 1,
                    p.name,
                    match start {
                        Start::Resume(s) => format!("resuming from step {s}"),
                        _ => "training".into(),
                    }
                ));
                let ropts = RunOptions {
                    resume: matches!(start, Start::Resume(_)),
                    stop_at: opts.stop_at,
                    progress_bar: false,
                    quiet: true,
                };
                let t0 = Instant::now();
                let result = match pool {
                    Some(pool) => pool.install(|| train::train(&p.config, &run, &ropts)),
                    None => train::train(&p.config, &run, &ropts),
                };
                match result {
                    Ok(s) => {
                        log(&format!(
                            "[{}/{n}] {}: done, test accuracy {:.4} in {:.1} s",
                            i + 1,
                            p.name,
                            s.test_accuracy,
                            t0.elapsed().as_secs_f64()
                        ));
                        match start {
                            Start::Resume(from) => PointStatus::Resumed { from },
                            _ => PointStatus::Ran,
                        }
                    }
                    Err(TrainError::Interrupted { step, .. }) => {
                        stop.store(true, Ordering::SeqCst);
                        log(&format!("[{}/{n}] {}: interrupted at step {step}, checkpoint saved", i + 1, p.name));
                        PointStatus::Interrupted { step }
                    }
                    Err(e) => {
                        log(&format!("[{}/{n}] {}: failed: {e}", i + 1, p.name));
                        PointStatus::Failed { error: e.to_string() }
                    }
                }
            }
        };
        statuses.lock().expect("not poisoned")[i] = status;
    };
    std::thread::scope(|s| {
        for job in 0..jobs {
            let pool = pools.get(job);
            s.spawn(move || work(pool));
        }
    });
    let statuses = statuses.into_inner().expect("not poisoned");

    // Results of every finished point, the fits and the plots.
    let mut records = Vec::new();
    let mut first_failure = None;
    for (p, status) in sweep.points.iter().zip(&statuses) {
        match status {
            PointStatus::Skipped | PointStatus::Ran | PointStatus::Resumed { .. } => {
                records.push(record(p, &out.join(&p.name))?);
            }
            PointStatus::Failed { .. } if first_failure.is_none() => first_failure = Some(p.name.clone()),
            _ => {}
        }
    }
    let mut lines = String::new();
    for r in &records {
        lines.push_str(&serde_json::to_string(r).map_err(|e| SweepError::Io(e.to_string()))?);
        lines.push('\n');
    }
    write_atomic(&out.join("results.jsonl"), &lines)?;
    let analysis = analysis::analyse(&records, &sweep.fit)?;
    let fit_json = serde_json::to_string_pretty(&analysis).map_err(|e| SweepError::Io(e.to_string()))?;
    write_atomic(&out.join("fit.json"), &fit_json)?;
    plot::plot_all(&records, &analysis, out)?;

    let count = |f: fn(&PointStatus) -> bool| statuses.iter().filter(|s| f(s)).count();
    let interrupted = count(|s| matches!(s, PointStatus::Interrupted { .. }));
    let failed = count(|s| matches!(s, PointStatus::Failed { .. }));
    let left = count(|s| matches!(s, PointStatus::NotStarted));
    if failed > 0 {
        let name = first_failure.expect("a failed point");
        let i = sweep.points.iter().position(|p| p.name == name).expect("a point");
        let PointStatus::Failed { error } = &statuses[i] else { unreachable!("failed") };
        return Err(SweepError::Failed {
            failed,
            done: records.len(),
            name,
            source: Box::new(TrainError::Io(error.clone())),
        });
    }
    if interrupted > 0 || left > 0 {
        return Err(SweepError::Interrupted { interrupted, left, done: records.len() });
    }
    let points = sweep.points.iter().map(|p| p.name.clone()).zip(statuses).collect();
    Ok(SweepReport { points, records, analysis })
}

/// Whether `dir/summary.json` says the run completed.
fn summary_completed(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["stop_reason"] == "completed")
}

/// The record of the finished point `p` from its run directory.
fn record(p: &crate::sweep::Point, dir: &Path) -> Result<Record, SweepError> {
    let path = dir.join("summary.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| SweepError::Io(format!("cannot read {}: {e}", path.display())))?;
    let summary: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| SweepError::Io(format!("{}: {e}", path.display())))?;
    let mut metrics = BTreeMap::new();
    flatten("", &summary, &mut metrics);
    if let Some(acc) = metrics.get("test_accuracy").copied() {
        metrics.insert("test_error".into(), 1.0 - acc);
    }
    let point_err = |e: TrainError| SweepError::Point { name: p.name.clone(), msg: e.to_string() };
    let m = p.config.model_config().map_err(point_err)?;
    let params = ParamCounts::of(&m).map_err(|e| point_err(e.into()))?.total;
    let steps = summary["steps"].as_u64().unwrap_or(0);
    let batch_size = p.config.train.batch_size;
    let images_seen = steps * batch_size as u64;
    let forward = m.forward_flops_per_image();
    let train_flops = train_flops(&p.config, &m, steps, p.train_images);
    let settings = p
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null)))
        .collect();
    Ok(Record {
        name: p.name.clone(),
        settings,
        params,
        forward_flops_per_image: forward,
        batch_size,
        steps,
        images_seen,
        train_images: p.train_images,
        train_flops,
        metrics,
    })
}

/// Model FLOPs of the first `steps` steps of `cfg` (model `m`) on `train_images` images: 3 ×
/// forward FLOPs per image × images seen, where a step under PatchDropout counts at the tokens
/// its stage keeps.
fn train_flops(cfg: &TrainConfig, m: &ModelConfig, steps: u64, train_images: usize) -> f64 {
    let batch = cfg.train.batch_size as f64;
    let mut left = steps;
    let mut flops = 0.0;
    for (n, rate) in cfg.train.patch_dropout_segments(train::total_steps(cfg, train_images)) {
        let n = n.min(left);
        let kept = vit_model::layers::patch_dropout::tokens_kept(m.num_patches(), rate);
        flops += m.forward_flops_keeping(kept) * 3.0 * n as f64 * batch;
        left -= n;
    }
    flops + m.forward_flops_per_image() * 3.0 * left as f64 * batch
}

/// Every finite number in `v`, keyed by its path (`a/b`).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                out.insert(prefix.to_string(), x);
            }
        }
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}/{k}") };
                flatten(&key, v, out);
            }
        }
        _ => {}
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), SweepError> {
    let name = path.file_name().map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| SweepError::Io(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| SweepError::Io(format!("cannot rename onto {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::PatchDropoutStage;

    #[test]
    fn steps_under_patch_dropout_count_at_the_tokens_they_keep() {
        let mut cfg = TrainConfig::from_toml(train::config::QUICKSTART, &[]).unwrap();
        cfg.train.steps = Some(100);
        cfg.train.epochs = None;
        let m = cfg.model_config().unwrap();
        let (f, batch) = (m.forward_flops_per_image(), cfg.train.batch_size as f64);
        assert_eq!(train_flops(&cfg, &m, 60, 1000), f * 3.0 * 60.0 * batch);
        cfg.train.patch_dropout = 0.5;
        cfg.train.patch_dropout_until = 0.5;
        let k = m.forward_flops_keeping(vit_model::layers::patch_dropout::tokens_kept(m.num_patches(), 0.5));
        assert!(k < f);
        // Steps 0-49 drop, 50-59 keep every token.
        let want = k * 3.0 * 50.0 * batch + f * 3.0 * 10.0 * batch;
        assert!((train_flops(&cfg, &m, 60, 1000) - want).abs() <= 1e-9 * want);
        // A second stage at a quarter of the patches until step 55: 0-49 at half, 50-54 at a
        // quarter, 55-59 every token; and a count that stops inside the second stage.
        cfg.train.patch_dropout_stages = vec![PatchDropoutStage { rate: 0.25, until: 0.55 }];
        let q = m.forward_flops_keeping(vit_model::layers::patch_dropout::tokens_kept(m.num_patches(), 0.25));
        assert!(k < q && q < f);
        let want = (k * 50.0 + q * 5.0 + f * 5.0) * 3.0 * batch;
        assert!((train_flops(&cfg, &m, 60, 1000) - want).abs() <= 1e-9 * want);
        let want = (k * 50.0 + q * 2.0) * 3.0 * batch;
        assert!((train_flops(&cfg, &m, 52, 1000) - want).abs() <= 1e-9 * want);
    }
}
