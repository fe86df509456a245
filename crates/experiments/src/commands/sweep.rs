//! `vit sweep --config sweep.toml [--out DIR] [--jobs N] [--json]`: a grid of training runs, their
//! results, scaling-law fits and plots (`vit_experiments::sweep`).

use super::CliError;
use std::path::PathBuf;
use vit_experiments::sweep::{self, PointStatus, Sweep, SweepOptions};

#[derive(clap::Args)]
pub struct Args {
    /// The sweep file: `base` (a train config), optional `set = [...]`, `[axes]` of dotted keys
    /// with lists of values, `[fit]`.
    #[arg(long)]
    config: PathBuf,
    /// The output folder: one run directory per point, results.jsonl, fit.json, the plots
    /// (default `runs/<sweep file name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// `key=value` overrides for every point, applied after the sweep file's `set` (e.g.
    /// `--set data.path=/data/fashion-mnist`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Points trained side by side; the CPU threads are split between them.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Print the points' statuses and the fits as one JSON object (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Stop every point before this step after saving a checkpoint, as if interrupted.
    #[arg(long, hide = true)]
    stop_at: Option<u64>,
}

pub fn run(args: Args) -> Result<(), CliError> {
    if args.jobs == 0 {
        return Err(CliError::Usage("--jobs 0: expected at least one job".into()));
    }
    let plan = Sweep::from_file_with_set(&args.config, &args.set)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = args.config.file_stem().map_or("sweep".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("runs").join(stem)
    });
    let log: fn(&str) = if args.json { |l| eprintln!("{l}") } else { |l| println!("{l}") };
    let opts = SweepOptions { jobs: args.jobs, threads: None, stop_at: args.stop_at, log };
    let report = sweep::run_sweep(&plan, &out, &opts)?;
    if args.json {
        let points: Vec<_> =
            report.points.iter().map(|(name, status)| serde_json::json!({ "name": name, "status": status })).collect();
        let j = serde_json::json!({
            "out": out.display().to_string(),
            "points": points,
            "fit": report.analysis,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let count = |f: fn(&PointStatus) -> bool| report.points.iter().filter(|(_, s)| f(s)).count();
    println!(
        "{} points: {} trained, {} resumed, {} finished before",
        report.points.len(),
        count(|s| *s == PointStatus::Ran),
        count(|s| matches!(s, PointStatus::Resumed { .. })),
        count(|s| *s == PointStatus::Skipped)
    );
    let c = &report.analysis.compute;
    match (&c.fit, &c.skipped) {
        (Some(f), _) => {
            let l = f.law;
            let iv = |i: Option<sweep::fit::Interval>| {
                i.map_or(String::new(), |i| format!(" [{:.3}, {:.3}]", i.low, i.high))
            };
            println!(
                "{} vs compute on the frontier ({} runs): {:.4}·(C + {:.3e})^-{:.4} + {:.4}; b = {:.4}{}, c = {:.4}{}",
                report.analysis.metric,
                c.points.len(),
                l.a,
                l.d,
                l.b,
                l.c,
                l.b,
                iv(f.intervals.map(|i| i.b)),
                l.c,
                iv(f.intervals.map(|i| i.c)),
            );
        }
        (None, Some(why)) => println!("{} vs compute: not fitted ({why})", report.analysis.metric),
        (None, None) => {}
    }
    println!("results.jsonl, fit.json, compute.svg, data.svg and model.svg in {}", out.display());
    Ok(())
}
