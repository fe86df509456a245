//! `vit eval --checkpoint C [--data DIR ...] [--json]`: top-1 accuracy and loss on the test split.

use super::{data_args::DataArgs, CliError};
use std::path::PathBuf;
use vit_experiments::train::{data, evaluate};
use vit_model::{checkpoint, VisionTransformer};
use vit_tensor::{DType, Device};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The loss to report: `softmax` or `sigmoid` cross-entropy.
    #[arg(long, default_value = "softmax", value_parser = ["softmax", "sigmoid"])]
    loss: String,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let device: Device = args.device.parse()?;
    let ckpt = checkpoint::load_checkpoint(&args.checkpoint, device)?;
    let model = VisionTransformer::new(&ckpt.config, DType::F32, device)?;
    ckpt.check_against(&model.init_params(0, DType::F32, Device::Cpu)?)?;
    let section = args.data.section(&args.checkpoint)?;
    let data = data::load(&section)?;
    let loader = data.eval_loader(&data.test, args.batch_size.max(1))?;
    let (accuracy, loss) = evaluate(&model, &ckpt.params, &loader, device, args.loss == "sigmoid")?;
    let test = &data.test;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "accuracy": accuracy, "loss": loss, "examples": test.len(), "step": ckpt.step })
        );
    } else {
        println!("{}: top-1 {accuracy:.4}, loss {loss:.4} on {} test images", args.checkpoint.display(), test.len());
    }
    Ok(())
}
