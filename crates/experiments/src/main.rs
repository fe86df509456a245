//! `vit`: the command-line tool of vitrs. Every failure ends with a one-line error naming the
//! thing and what was expected, and exit code 1 (design §6). `vit train` stopped by SIGINT,
//! SIGTERM or SIGHUP (or `--stop-at`) saves a checkpoint and exits with 3
//! ([`vit_experiments::train::EXIT_INTERRUPTED`]); a second signal exits at once with 130.

mod commands;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "vit", version, about = "Vision Transformers at every scale: train, evaluate, inspect")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a recipe (default: a small ViT on the bundled Fashion-MNIST subset).
    Train(commands::train::Args),
    /// A grid of training runs with scaling-law fits and plots (`vit sweep --config sweep.toml`).
    Sweep(commands::sweep::Args),
    /// Top-1 accuracy and loss of a checkpoint on a test split.
    Eval(commands::eval::Args),
    /// Few-shot linear evaluation of a checkpoint's frozen features (1, 5, 10, 25 shots).
    Fewshot(commands::fewshot::Args),
    /// Parameter counts of a model preset or config, without building it.
    Params(commands::params::Args),
    /// Memory, FLOPs, communication and step time per device of a sharded training step.
    Plan(commands::plan::Args),
    /// The compute devices vitrs can use here (CPU threads, CUDA devices, NVRTC).
    Devices(commands::devices::Args),
    /// Speed and memory of training steps and forward passes on synthetic data (`vit bench train --model B/16`).
    Bench(commands::bench::Args),
    /// Check a dataset: `vit data check --config X [--split train|test]` lists every bad file.
    Data(commands::data::Args),
    /// Convert another framework's weights (timm) into a vitrs checkpoint.
    Convert(commands::convert::Args),
    /// Logits of a checkpoint on images stored in a safetensors file.
    Predict(commands::predict::Args),
}

fn main() -> ExitCode {
    // Reuse activation buffers across steps instead of faulting fresh pages in (docs/perf.md).
    vit_tensor::cpu::retain_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => commands::train::run(a),
        Command::Sweep(a) => commands::sweep::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Fewshot(a) => commands::fewshot::run(a),
        Command::Params(a) => commands::params::run(a),
        Command::Plan(a) => commands::plan::run(a),
        Command::Devices(a) => commands::devices::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Data(a) => commands::data::run(a),
        Command::Predict(a) => commands::predict::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if e.interrupted() {
                ExitCode::from(vit_experiments::train::EXIT_INTERRUPTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
