//! `vit train [--config FILE] [--set key=value]... [--device D] [--world N] [--out DIR] [--resume DIR]`.

use super::CliError;
use std::{io::IsTerminal, path::PathBuf};
use vit_experiments::train::{self, config::TrainConfig, run_dir::RunDir, RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// The recipe (TOML); without it, configs/quickstart.toml: a small ViT on the bundled data.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value: `--set train.steps=100 --set model.width=128`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// `cpu`, `cuda` or `cuda:N` (overrides train.device).
    #[arg(long)]
    device: Option<String>,
    /// Data-parallel ranks as threads of this process (overrides train.world; CPU).
    #[arg(long)]
    world: Option<usize>,
    /// The run directory (default `runs/<config name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint, with its config.
    #[arg(long, conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Save a checkpoint and stop before this step, as if interrupted.
    #[arg(long, hide = true)]
    stop_at: Option<u64>,
}

/// Steal above this fraction of the CPU time is reported after the run: the timing is the
/// host's, not the CPU's (docs/perf.md, session 21).
const STEAL_WORTH_SAYING: f64 = 0.02;

pub fn run(args: Args) -> Result<(), CliError> {
    let mut sets = args.sets.clone();
    if let Some(d) = &args.device {
        sets.push(format!("train.device={d:?}"));
    }
    if let Some(w) = args.world {
        sets.push(format!("train.world={w}"));
    }
    let (cfg, dir) = match (&args.resume, &args.config) {
        (Some(dir), _) => (TrainConfig::from_file(&dir.join("config.toml"), &sets)?, dir.clone()),
        (None, Some(path)) => {
            let stem = path.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned());
            (TrainConfig::from_file(path, &sets)?, args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(stem)))
        }
        (None, None) => (
            TrainConfig::from_toml(train::config::QUICKSTART, &sets)?,
            args.out.clone().unwrap_or_else(|| PathBuf::from("runs/quickstart")),
        ),
    };
    let run = RunDir::create(&dir)?;
    let opts = RunOptions {
        resume: args.resume.is_some(),
        stop_at: args.stop_at,
        progress_bar: std::io::stdout().is_terminal(),
        quiet: false,
    };
    let s = train::train(&cfg, &run, &opts)?;
    if !s.lead {
        return Ok(()); // an MPI rank other than 0: rank 0 reports the run
    }
    println!(
        "done: {} steps, train loss {:.4}, test accuracy {:.4}, {:.1} images/s, {:.1} s; run in {}",
        s.steps,
        s.train_loss,
        s.test_accuracy,
        s.images_per_second,
        s.wall_seconds,
        run.path.display()
    );
    if let Some(steal) = s.cpu_steal.filter(|&f| f > STEAL_WORTH_SAYING) {
        println!(
            "note: the hypervisor took {:.0}% of the CPU during this run (steal time): its speed is not this CPU's",
            steal * 100.0
        );
    }
    Ok(())
}
