//! `vit params --model NAME [--set field=value]... [--json]`.

use super::CliError;
use vit_model::ParamBreakdown;

#[derive(clap::Args)]
pub struct Args {
    /// A preset (Ti/16, S/16, S/32, B/16, B/32, L/16, H/14, g/14, G/14, e/14, 22B/14; `ViT-` optional) or `custom`.
    #[arg(long, default_value = "custom")]
    model: String,
    /// Override a config field, e.g. `--set pool=gap --set classes=10`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// One JSON object with integer fields `total`, `encoder` and `matmul`.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let cfg = super::model_config(&args.model, &args.sets)?;
    let b = ParamBreakdown::of(&cfg)?;
    let c = b.counts;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "model": args.model, "total": c.total, "encoder": c.encoder, "matmul": c.matmul })
        );
        return Ok(());
    }
    let m = |n: u64| format!("{:>16} ({:.3}M)", group(n), n as f64 / 1e6);
    println!(
        "{} — width {}, depth {}, mlp {}, heads {}, patch {}, {} tokens",
        args.model,
        cfg.width,
        cfg.depth,
        cfg.mlp_dim,
        cfg.heads,
        cfg.patch,
        cfg.seq_len()
    );
    println!("  total    {}  every parameter as configured", m(c.total));
    println!("  encoder  {}  patch + position embedding + blocks + final norm (Scaling ViT Table 2)", m(c.encoder));
    println!("  matmul   {}  block matmul weights only (ViT-22B's 12·L·D²)", m(c.matmul));
    println!("  per block {}", group(b.block));
    Ok(())
}

/// `1234567` -> `1,234,567`.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
