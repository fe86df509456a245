//! `vit convert --from timm IN.safetensors --model NAME [--set field=value]... --out OUT.safetensors`:
//! a timm state dict to a vitrs checkpoint (parameters and the model config).

use super::{model_config, CliError};
use std::path::PathBuf;
use vit_model::{checkpoint, import, Checkpoint, VisionTransformer};
use vit_tensor::{DType, Device};

#[derive(clap::Args)]
pub struct Args {
    /// Source framework of the input file (only `timm` so far).
    #[arg(long = "from", value_name = "FORMAT")]
    format: String,
    /// The state dict to convert (safetensors).
    input: PathBuf,
    /// The model the state dict holds: a preset or `custom`, adjusted with `--set`.
    #[arg(long, default_value = "custom")]
    model: String,
    /// Override a config field, e.g. `--set pool=tok --set gelu=erf`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// Where to write the vitrs checkpoint.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<(), CliError> {
    if args.format != "timm" {
        return Err(CliError::Usage(format!("--from {}: expected timm", args.format)));
    }
    let cfg = model_config(&args.model, &args.sets)?;
    let model = VisionTransformer::new(&cfg, DType::F32, Device::Cpu)?;
    let tensors = checkpoint::read_safetensors(&args.input)?;
    let params = import::timm::params_from_timm(&model, tensors, Device::Cpu)?;
    let n = params.numel();
    checkpoint::save_checkpoint(&args.out, &Checkpoint::new(cfg, params))?;
    println!("wrote {} ({n} parameters)", args.out.display());
    Ok(())
}
