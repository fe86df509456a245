//! `vit fewshot --checkpoint C [--data DIR ...] --shots 1,5,10,25 [--seeds 3] [--json]`:
//! few-shot linear evaluation on the frozen pre-logit features (reference §6).

use super::{
    data_args::{CheckpointArgs, Loaded},
    CliError,
};
use vit_data::Loader;
use vit_experiments::fewshot::{fewshot_accuracy, Features};
use vit_model::{ParamStore, VisionTransformer};
use vit_tensor::Device;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: CheckpointArgs,
    /// Training images per class, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,25")]
    shots: Vec<usize>,
    /// Seeds per shot count (big_vision uses 3).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
}

/// Pre-logit features `[N, F]` (flattened row-major), the feature width, and the labels of one
/// ordered pass of `loader`.
fn features(
    model: &VisionTransformer,
    p: &ParamStore,
    loader: &Loader,
    device: Device,
) -> Result<(Vec<f32>, usize, Vec<i32>), CliError> {
    let (mut out, mut labels, mut dim) = (Vec::new(), Vec::new(), 0);
    for b in loader.iter() {
        let b = b.map_err(vit_experiments::train::TrainError::from)?;
        let (f, _) = model.features_and_logits(p, &b.images.to_device(device)?)?;
        dim = f.dims()[1];
        out.extend(f.to_f32_vec()?);
        labels.extend(b.labels.to_vec::<i32>()?);
    }
    Ok((out, dim, labels))
}

pub fn run(args: Args) -> Result<(), CliError> {
    let c = &args.common;
    let Loaded { device, checkpoint: ckpt, model, data } = c.load()?;
    let batch = c.batch();
    let (xtr, dim, ytr) = features(&model, &ckpt.params, &data.eval_loader(&data.train, batch)?, device)?;
    let (xte, _, yte) = features(&model, &ckpt.params, &data.eval_loader(&data.test, batch)?, device)?;
    let classes = data.train.num_classes().max(data.test.num_classes());
    let tr = Features { x: &xtr, labels: &ytr, dim };
    let te = Features { x: &xte, labels: &yte, dim };
    let mut results = serde_json::Map::new();
    for &shots in &args.shots {
        let accs: Vec<f64> = (0..args.seeds)
            .map(|seed| fewshot_accuracy(tr, te, classes, shots, seed))
            .collect::<Result<_, _>>()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let mean = accs.iter().sum::<f64>() / accs.len().max(1) as f64;
        if !c.json {
            println!(
                "{shots:>3}-shot: {mean:.4} (seeds: {})",
                accs.iter().map(|a| format!("{a:.4}")).collect::<Vec<_>>().join(", ")
            );
        }
        results.insert(format!("{shots}shot"), serde_json::json!({ "mean": mean, "per_seed": accs }));
    }
    if c.json {
        println!("{}", serde_json::Value::Object(results));
    }
    Ok(())
}
