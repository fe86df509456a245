//! `vit data check --config X [--split train|test] [--json]`: every example of a dataset read,
//! decoded and preprocessed (in parallel), shapes, channels and labels checked against the model,
//! and every bad file listed with its reason; exit 1 if anything is wrong.

use super::CliError;
use std::{io::IsTerminal, path::PathBuf};
use vit_experiments::train::{
    config::TrainConfig,
    data_check::{check_split, WhichSplit},
};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Read every example of a split and list the bad ones (exit 1 if any).
    Check(CheckArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The recipe (TOML) whose `[data]` (and `[model]`, for shapes and classes) to check.
    #[arg(long)]
    config: PathBuf,
    /// Override a config value: `--set data.path=/data/imagenet`.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// The split to check.
    #[arg(long, value_enum, default_value = "train")]
    split: WhichSplit,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let Which::Check(a) = args.which;
    let cfg = TrainConfig::from_file(&a.config, &a.sets)?;
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} batches [{elapsed_precise}<{eta_precise}]")
                .expect("valid template"),
        );
        b
    });
    let report = check_split(&cfg, a.split, |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} split {:?}: {} examples, {} bad, {} problem(s)",
            cfg.data.path,
            report.split,
            report.examples,
            report.bad.len(),
            report.problems.len()
        );
        for (index, reason) in &report.bad {
            println!("  example {index}: {reason}");
        }
        for p in &report.problems {
            println!("  problem: {p}");
        }
    }
    if report.clean() {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "split {:?} of {}: {} bad example(s) and {} problem(s)",
            report.split,
            cfg.data.path,
            report.bad.len(),
            report.problems.len()
        )))
    }
}
