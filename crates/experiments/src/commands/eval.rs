//! `vit eval --checkpoint C [--data DIR ...] [--json]`: top-1 accuracy and loss on the test split.

use super::{
    data_args::{CheckpointArgs, Loaded},
    CliError,
};
use vit_experiments::train::evaluate;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: CheckpointArgs,
    /// The loss to report: `softmax` or `sigmoid` cross-entropy.
    #[arg(long, default_value = "softmax", value_parser = ["softmax", "sigmoid"])]
    loss: String,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let c = &args.common;
    let Loaded { device, checkpoint: ckpt, model, data } = c.load()?;
    let loader = data.eval_loader(&data.test, c.batch())?;
    let (accuracy, loss) = evaluate(&model, &ckpt.params, &loader, device, args.loss == "sigmoid")?;
    let test = &data.test;
    if c.json {
        println!(
            "{}",
            serde_json::json!({ "accuracy": accuracy, "loss": loss, "examples": test.len(), "step": ckpt.step })
        );
    } else {
        println!("{}: top-1 {accuracy:.4}, loss {loss:.4} on {} test images", c.checkpoint.display(), test.len());
    }
    Ok(())
}
