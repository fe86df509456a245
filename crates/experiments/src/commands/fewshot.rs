//! `vit fewshot --checkpoint C [--data DIR ...] --shots 1,5,10,25 [--seeds 3] [--json]`:
//! few-shot linear evaluation on the frozen pre-logit features (reference §6).

use super::{data_args::DataArgs, CliError};
use std::path::PathBuf;
use vit_experiments::{
    fewshot::{fewshot_accuracy, Features},
    train::data::{self, Split},
};
use vit_model::{checkpoint, ParamStore, VisionTransformer};
use vit_tensor::{DType, Device};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Training images per class, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,25")]
    shots: Vec<usize>,
    /// Seeds per shot count (big_vision uses 3).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    json: bool,
}

/// Pre-logit features `[N, F]` of a split, flattened row-major.
fn features(
    model: &VisionTransformer,
    p: &ParamStore,
    split: &Split,
    batch: usize,
    device: Device,
) -> Result<(Vec<f32>, usize), CliError> {
    let mut out = Vec::new();
    let mut dim = 0;
    for start in (0..split.len()).step_by(batch) {
        let idx: Vec<usize> = (start..(start + batch).min(split.len())).collect();
        let (x, _) = split.gather(&idx)?;
        let (f, _) = model.features_and_logits(p, &x.to_device(device)?)?;
        dim = f.dims()[1];
        out.extend(f.to_f32_vec()?);
    }
    Ok((out, dim))
}

pub fn run(args: Args) -> Result<(), CliError> {
    let device: Device = args.device.parse()?;
    let ckpt = checkpoint::load_checkpoint(&args.checkpoint, device)?;
    let model = VisionTransformer::new(&ckpt.config, DType::F32, device)?;
    ckpt.check_against(&model.init_params(0, DType::F32, Device::Cpu)?)?;
    let (train, test) = data::load(&args.data.section(&args.checkpoint)?)?;
    let batch = args.batch_size.max(1);
    let (xtr, dim) = features(&model, &ckpt.params, &train, batch, device)?;
    let (xte, _) = features(&model, &ckpt.params, &test, batch, device)?;
    let classes = ckpt.config.classes.max(1 + *train.labels.iter().max().unwrap_or(&0) as usize);
    let tr = Features { x: &xtr, labels: &train.labels, dim };
    let te = Features { x: &xte, labels: &test.labels, dim };
    let mut results = serde_json::Map::new();
    for &shots in &args.shots {
        let accs: Vec<f64> = (0..args.seeds)
            .map(|seed| fewshot_accuracy(tr, te, classes, shots, seed))
            .collect::<Result<_, _>>()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let mean = accs.iter().sum::<f64>() / accs.len().max(1) as f64;
        if !args.json {
            println!(
                "{shots:>3}-shot: {mean:.4} (seeds: {})",
                accs.iter().map(|a| format!("{a:.4}")).collect::<Vec<_>>().join(", ")
            );
        }
        results.insert(format!("{shots}shot"), serde_json::json!({ "mean": mean, "per_seed": accs }));
    }
    if args.json {
        println!("{}", serde_json::Value::Object(results));
    }
    Ok(())
}
