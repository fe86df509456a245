//! `vit predict --checkpoint CKPT --images X.safetensors --output Y.safetensors [--device D]`:
//! X holds `images` (f32 `[batch, C, H, W]`, already normalised); Y gets `logits` (f32 `[batch, classes]`).

use super::CliError;
use std::path::PathBuf;
use vit_model::{checkpoint, VisionTransformer};
use vit_tensor::{DType, Device};

#[derive(clap::Args)]
pub struct Args {
    /// A vitrs checkpoint (from `vit train` or `vit convert`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A safetensors file with the tensor `images`.
    #[arg(long)]
    images: PathBuf,
    /// Where to write the safetensors file with `logits`.
    #[arg(long)]
    output: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let device: Device = args.device.parse()?;
    let ckpt = checkpoint::load_checkpoint(&args.checkpoint, device)?;
    let model = VisionTransformer::new(&ckpt.config, DType::F32, device)?;
    ckpt.check_against_model(&model)?;
    let inputs = checkpoint::read_safetensors(&args.images)?;
    let images = inputs
        .into_iter()
        .find(|(n, _)| n == "images")
        .map(|(_, t)| t)
        .ok_or_else(|| CliError::Usage(format!("{}: no tensor named `images`", args.images.display())))?;
    if images.dtype() != DType::F32 {
        return Err(CliError::Usage(format!(
            "{}: `images` is {:?}, expected f32",
            args.images.display(),
            images.dtype()
        )));
    }
    let logits = model.predict(&ckpt.params, &images.to_device(device)?)?.to_device(Device::Cpu)?;
    checkpoint::write_safetensors(&args.output, &[("logits", &logits)])?;
    println!("wrote {} (logits {:?})", args.output.display(), logits.dims());
    Ok(())
}
