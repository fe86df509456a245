//! `vit params --model NAME [--set field=value]... [--json]`.

use super::CliError;
use vit_model::{ParamBreakdown, VisionTransformer};
use vit_optim::{optimizer_state_bytes, AdamWConfig, Algorithm, FactoredAdamConfig, OptimizerConfig, SgdConfig};
use vit_tensor::{DType, Device};

#[derive(clap::Args)]
pub struct Args {
    /// A preset (Ti/16, S/16, S/32, B/16, B/32, L/16, H/14, g/14, G/14, e/14, 22B/14; `ViT-` optional;
    /// V-MoE-S/32, V-MoE-B/32, V-MoE-B/16, V-MoE-L/16, V-MoE-H/14, V-MoE-15B) or `custom`.
    #[arg(long, default_value = "custom")]
    model: String,
    /// Override a config field, e.g. `--set pool=gap --set classes=10`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// Also count this optimizer's state (bytes, with its default settings).
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// One JSON object with integer fields `total`, `encoder`, `matmul` and `active_per_token`,
    /// `forward_flops_per_image` and `dense_forward_flops_per_image` (the model with dense MLPs
    /// in place of MoE ones), and `optimizer_state_bytes` with `--optimizer`.
    #[arg(long)]
    json: bool,
}

/// The optimizers whose state `vit params` can count.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OptimizerKind {
    /// fp32 first and second moments: 8 bytes per parameter.
    Adamw,
    /// big_vision's factored Adam: bf16 momentum, factored second moment (Scaling ViT §3.4).
    FactoredAdam,
    /// SGD with a bf16 momentum accumulator.
    Sgd,
}

impl OptimizerKind {
    /// This optimizer with its default settings.
    pub fn config(self) -> OptimizerConfig {
        let algorithm = match self {
            OptimizerKind::Adamw => Algorithm::AdamW(AdamWConfig::default()),
            OptimizerKind::FactoredAdam => Algorithm::FactoredAdam(FactoredAdamConfig::default()),
            OptimizerKind::Sgd => Algorithm::Sgd(SgdConfig::default()),
        };
        OptimizerConfig::new(algorithm, 1e-3)
    }
}

/// Bytes of optimizer state for `cfg`'s parameters, from their shapes alone (no allocation).
fn state_bytes(cfg: &vit_model::ModelConfig, kind: OptimizerKind) -> Result<u64, CliError> {
    let shapes = VisionTransformer::new(cfg, DType::F32, Device::Cpu)?.param_shapes()?;
    Ok(optimizer_state_bytes(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())), &kind.config())?)
}

pub fn run(args: Args) -> Result<(), CliError> {
    let cfg = super::model_config(&args.model, &args.sets)?;
    let b = ParamBreakdown::of(&cfg)?;
    let c = b.counts;
    let opt_bytes = args.optimizer.map(|k| state_bytes(&cfg, k)).transpose()?;
    if args.json {
        let mut j = serde_json::json!({
            "model": args.model,
            "total": c.total,
            "encoder": c.encoder,
            "matmul": c.matmul,
            "active_per_token": c.active_per_token,
            "forward_flops_per_image": cfg.forward_flops_per_image(),
            "dense_forward_flops_per_image": cfg.dense_forward_flops_per_image(),
        });
        if let Some(b) = opt_bytes {
            j["optimizer_state_bytes"] = b.into();
        }
        println!("{j}");
        return Ok(());
    }
    let m = |n: u64| format!("{:>16} ({:.3}M)", group(n), n as f64 / 1e6);
    let embedding = match (&cfg.stem[..], cfg.patch_kernel) {
        ([], Some(k)) if k > cfg.patch => format!(" (overlapping {k}x{k} windows)"),
        ([], _) => String::new(),
        (stem, _) => format!(" (conv stem {stem:?})"),
    };
    println!(
        "{} — width {}, depth {}, mlp {}, heads {}, patch {}{embedding}, {} tokens",
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
    if let Some(moe) = &cfg.moe {
        println!(
            "  MoE: {} experts, k = {}, C = {} in blocks {:?}; per MoE block {}",
            moe.experts,
            moe.k,
            moe.capacity,
            moe.moe_blocks(cfg.depth),
            group(b.moe_block)
        );
        println!("  active   {}  per token (the k routed experts of each MoE layer)", m(c.active_per_token));
    }
    let gf = |f: f64| format!("{:.2} GFLOP", f / 1e9);
    match &cfg.moe {
        Some(_) => println!(
            "  forward  {} per image ({} for the dense twin)",
            gf(cfg.forward_flops_per_image()),
            gf(cfg.dense_forward_flops_per_image())
        ),
        None => println!("  forward  {} per image", gf(cfg.forward_flops_per_image())),
    }
    if let (Some(kind), Some(bytes)) = (args.optimizer, opt_bytes) {
        let ratio = bytes as f64 / (4.0 * c.total as f64);
        println!("  {kind:?} state: {} bytes ({ratio:.3}x the f32 parameter bytes)", group(bytes));
    }
    Ok(())
}

/// `1234567` -> `1,234,567`.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
