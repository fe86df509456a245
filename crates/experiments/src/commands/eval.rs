//! `vit eval --checkpoint C [--data DIR ...] [--tta flip_lr,shift] [--set
//! model.moe.capacity=0.5 ...] [--sweep model.moe.capacity=0.25,0.5,1.0] [--json]`: top-1
//! accuracy and loss on the test split, optionally with test-time augmentation; for a V-MoE
//! also the assignments dropped at capacity, with the routing knobs changed at inference or
//! swept (BPR and vanilla routing side by side).

use super::{
    data_args::{CheckpointArgs, Loaded},
    CliError,
};
use vit_experiments::train::{
    evaluate,
    moe_eval::{evaluate_routed, parse_sweep, set_inference_knob, sweep, RoutedEval, SweepRow},
    tta::{names, parse_list, view_count, TtaOp},
};
use vit_model::VisionTransformer;
use vit_tensor::DType;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: CheckpointArgs,
    /// The loss to report: `softmax` or `sigmoid` cross-entropy.
    #[arg(long, default_value = "softmax", value_parser = ["softmax", "sigmoid"])]
    loss: String,
    /// Change a V-MoE routing knob at inference: `model.moe.capacity`, `model.moe.k`,
    /// `model.moe.group_size` or `model.moe.bpr` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Evaluate a V-MoE at each value of one knob, with BPR and vanilla routing side by side:
    /// `model.moe.capacity=0.25,0.5,0.75,1.0,1.25`.
    #[arg(long, value_name = "KEY=V1,V2,...")]
    sweep: Option<String>,
    /// Test-time augmentation: classify each image by the mean logits of its views,
    /// `flip_lr` (mirror images, 2×), `shift` (one-pixel shifts, 3×) or `flip_lr,shift` (6×).
    #[arg(long, value_name = "OP,...")]
    tta: Option<String>,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let c = &args.common;
    let sigmoid = args.loss == "sigmoid";
    // The knobs are checked before the data is read.
    let sweep_spec = args.sweep.as_deref().map(parse_sweep).transpose()?;
    let tta = args.tta.as_deref().map(parse_list).transpose()?.unwrap_or_default();
    if let (Some(spec), Some(t)) = (&args.sweep, &args.tta) {
        return Err(CliError::Usage(format!(
            "--sweep {spec} with --tta {t}: expected one of the two (the capacity sweep evaluates plain images)"
        )));
    }
    let Loaded { device, checkpoint: ckpt, model, data } = c.load()?;
    let mut cfg = ckpt.config.clone();
    for s in &args.sets {
        set_inference_knob(&mut cfg, s)?;
    }
    if let Some((key, values)) = sweep_spec {
        if cfg.moe.is_none() {
            return Err(CliError::Usage(format!("--sweep {key}: the checkpoint's model has no MoE layers")));
        }
        let loader = data.eval_loader(&data.test, c.batch())?;
        let rows = sweep(&cfg, &key, &values, &ckpt.params, &loader, device, sigmoid)?;
        print_sweep(&key, &rows, data.test.len(), ckpt.step, c.json);
        return Ok(());
    }
    let loader = data.eval_loader(&data.test, c.batch())?;
    let test = &data.test;
    let Some(moe) = &cfg.moe else {
        let (accuracy, loss) = evaluate(&model, &ckpt.params, &loader, device, sigmoid, &tta)?;
        if c.json {
            println!(
                "{}",
                serde_json::json!({
                    "accuracy": accuracy, "loss": loss, "examples": test.len(), "step": ckpt.step,
                    "tta": names(&tta),
                })
            );
        } else {
            println!(
                "{}: top-1 {accuracy:.4}, loss {loss:.4} on {} test images{}",
                c.checkpoint.display(),
                test.len(),
                tta_words(&tta)
            );
        }
        return Ok(());
    };
    let model = VisionTransformer::new(&cfg, DType::F32, device)?;
    let r = evaluate_routed(&model, &ckpt.params, &loader, device, sigmoid, &tta)?;
    if c.json {
        let knobs =
            serde_json::json!({ "capacity": moe.capacity, "k": moe.k, "group_size": moe.group_size, "bpr": moe.bpr });
        println!(
            "{}",
            serde_json::json!({
                "accuracy": r.accuracy, "loss": r.loss, "examples": test.len(), "step": ckpt.step,
                "moe": knobs, "dropped": dropped_json(&r),
                "tta": names(&tta),
            })
        );
    } else {
        println!(
            "{}: top-1 {:.4}, loss {:.4} on {} test images{} (MoE capacity {}, k {}, group {}, {}: {:.2}% of assignments dropped)",
            c.checkpoint.display(),
            r.accuracy,
            r.loss,
            test.len(),
            tta_words(&tta),
            moe.capacity,
            moe.k,
            moe.group_size,
            if moe.bpr { "BPR" } else { "vanilla" },
            100.0 * r.mean_dropped()
        );
    }
    Ok(())
}

/// ` with TTA flip_lr, shift (6 views)`, or nothing without TTA.
fn tta_words(tta: &[TtaOp]) -> String {
    if tta.is_empty() {
        return String::new();
    }
    format!(" with TTA {} ({} views)", names(tta).join(", "), view_count(tta))
}

/// `{"<block>": fraction}` of one evaluation's dropped assignments.
fn dropped_json(r: &RoutedEval) -> serde_json::Value {
    r.dropped.iter().map(|(b, d)| (b.to_string(), serde_json::json!(d))).collect::<serde_json::Map<_, _>>().into()
}

fn print_sweep(key: &str, rows: &[SweepRow], examples: usize, step: u64, json: bool) {
    if json {
        let one = |r: &RoutedEval| serde_json::json!({ "accuracy": r.accuracy, "loss": r.loss, "dropped": dropped_json(r), "mean_dropped": r.mean_dropped() });
        let rows: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({ "value": r.value, "bpr": one(&r.bpr), "vanilla": one(&r.vanilla) }))
            .collect();
        println!("{}", serde_json::json!({ "key": key, "rows": rows, "examples": examples, "step": step }));
        return;
    }
    println!(
        "{key} sweep on {examples} test images (step {step}); dropped: share of assignments, mean over MoE layers"
    );
    println!(
        "{:>10}  {:>13}  {:>13}  {:>12}  {:>12}  {:>12}  {:>15}",
        "value", "BPR top-1", "vanilla top-1", "BPR loss", "vanilla loss", "BPR dropped", "vanilla dropped"
    );
    for r in rows {
        println!(
            "{:>10}  {:>13.4}  {:>13.4}  {:>12.4}  {:>12.4}  {:>11.2}%  {:>14.2}%",
            r.value,
            r.bpr.accuracy,
            r.vanilla.accuracy,
            r.bpr.loss,
            r.vanilla.loss,
            100.0 * r.bpr.mean_dropped(),
            100.0 * r.vanilla.mean_dropped()
        );
    }
}
