//! `vit plan --model 22B/14 --devices 1024 --mesh data=256,model=4 --batch 65536 [...]`: memory,
//! FLOPs, communication and step time per device of a sharded training step
//! (`vit_experiments::plan`; formulas in docs/sharding.md).

use super::{params::OptimizerKind, CliError};
use vit_experiments::plan::{self, Mesh, ParamSharding, Plan, PlanSettings};
use vit_experiments::train::config::Precision;

#[derive(clap::Args)]
pub struct Args {
    /// A preset (e.g. B/16, 22B/14) or `custom`, as in `vit params`.
    #[arg(long, default_value = "custom")]
    model: String,
    /// Override a model config field, e.g. `--set qk_norm=true`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// Devices in all; must equal data × model of `--mesh`.
    #[arg(long)]
    devices: usize,
    /// Mesh axes and sizes, e.g. `data=256,model=4` (a missing axis has size 1).
    #[arg(long, default_value = "data=1,model=1")]
    mesh: String,
    /// Global batch, images per step (split over the data axis).
    #[arg(long)]
    batch: usize,
    /// The optimizer whose state is counted.
    #[arg(long, value_enum, default_value = "factored-adam")]
    optimizer: OptimizerKind,
    /// Activation checkpointing: keep each block's input only, recompute the block in backward.
    #[arg(long)]
    remat: bool,
    /// Activation dtype (bf16 also keeps a bf16 copy of the f32 master weights).
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// Shard the optimizer state over the data axis (ZeRO-1, `train.sharding = "optimizer"`).
    #[arg(long, value_enum, default_value = "none")]
    zero: ZeroArg,
    /// Shard parameters, gradients and optimizer state over the data axis (ViT-22B); each
    /// block's parameters are all-gathered when used.
    #[arg(long)]
    shard_params: bool,
    /// Peak dense FLOP/s of one device, in TFLOP/s (H100 SXM bf16: 989.4).
    #[arg(long, default_value_t = 989.4)]
    device_peak: f64,
    /// Fraction of the peak the compute reaches (the MFU assumption of the compute time).
    #[arg(long, default_value_t = 0.5)]
    compute_efficiency: f64,
    /// Link bandwidth per device per direction in GB/s, e.g. `data=50,model=450` (InfiniBand
    /// NDR 400 Gb/s and NVLink 4, the defaults).
    #[arg(long, default_value = "data=50,model=450")]
    link_bw: String,
    /// Memory of one device in GiB.
    #[arg(long, default_value_t = 80.0)]
    device_memory: f64,
    /// One JSON object with every field of the plan (docs/sharding.md lists them).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PrecisionArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ZeroArg {
    /// Every data replica holds the whole optimizer state.
    None,
    /// ZeRO-1: the optimizer state is split over the data axis.
    Optimizer,
}

/// `data=50,model=450` (GB/s) -> bytes/s of (data, model); a missing axis keeps its default.
fn link_bw(s: &str) -> Result<(f64, f64), CliError> {
    let (mut data, mut model) = (50e9, 450e9);
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || CliError::Usage(format!("--link-bw {s}: expected AXIS=GB/s pairs like data=50,model=450"));
        let (axis, v) = part.split_once('=').ok_or_else(bad)?;
        let v: f64 = v.trim().parse().ok().filter(|v: &f64| v.is_finite() && *v > 0.0).ok_or_else(bad)?;
        match axis.trim() {
            "data" => data = v * 1e9,
            "model" => model = v * 1e9,
            other => {
                return Err(CliError::Usage(format!(
                    "--link-bw {s}: unknown axis `{other}`; the axes are `data` and `model`"
                )))
            }
        }
    }
    Ok((data, model))
}

pub fn run(args: Args) -> Result<(), CliError> {
    let cfg = super::model_config(&args.model, &args.sets)?;
    let mesh = Mesh::parse(&args.mesh)?;
    let (data_bw, model_bw) = link_bw(&args.link_bw)?;
    if !(args.device_memory.is_finite() && args.device_memory > 0.0) {
        return Err(CliError::Usage(format!(
            "--device-memory {}: expected a positive number of GiB",
            args.device_memory
        )));
    }
    let mut s = PlanSettings::new(cfg, mesh, args.batch, args.optimizer.config());
    s.devices = args.devices;
    s.remat = args.remat;
    s.precision = match args.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
    }
    .dtype();
    s.sharding = match (args.shard_params, args.zero) {
        (true, _) => ParamSharding::Full,
        (false, ZeroArg::Optimizer) => ParamSharding::Optimizer,
        (false, ZeroArg::None) => ParamSharding::None,
    };
    s.device_peak = args.device_peak * 1e12;
    s.compute_efficiency = args.compute_efficiency;
    s.data_bandwidth = data_bw;
    s.model_bandwidth = model_bw;
    s.device_memory = (args.device_memory * (1u64 << 30) as f64) as u64;
    let p = plan::plan(&s)?;
    if args.json {
        let mut j = serde_json::to_value(&p)?;
        j["model"] = args.model.clone().into();
        j["optimizer"] = format!("{:?}", args.optimizer).into();
        println!("{j}");
    } else {
        print_plan(&args.model, args.optimizer, &p);
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn print_plan(model: &str, opt: OptimizerKind, p: &Plan) {
    println!(
        "{model} on {} devices (data {} × model {}), batch {} ({} images per data replica, {} tokens each, {:.1} per device), {}, data axis shards {}, {opt:?}, remat {}",
        p.devices,
        p.mesh.data,
        p.mesh.model,
        p.batch,
        p.batch_per_replica,
        p.tokens,
        p.tokens_per_device,
        p.precision,
        match p.sharding {
            ParamSharding::None => "the batch only",
            ParamSharding::Optimizer => "the optimizer state (ZeRO-1)",
            ParamSharding::Full => "parameters, gradients and optimizer state",
        },
        if p.remat { "on" } else { "off" },
    );
    println!(
        "parameters: {:.3}M in all, {:.3}M per device",
        p.params_total as f64 / 1e6,
        p.params_per_device as f64 / 1e6
    );
    let m = &p.memory;
    println!("memory per device:");
    println!("  parameters   {:>12}", gib(m.parameters));
    println!("  gradients    {:>12}", gib(m.gradients));
    println!("  optimizer    {:>12}", gib(m.optimizer));
    println!(
        "  activations  {:>12}  (kept for backward; {} without remat, {} with)",
        gib(m.activations),
        gib(p.activations_no_remat),
        gib(p.activations_remat)
    );
    println!("  workspace    {:>12}  (backward's transient, estimated)", gib(m.workspace));
    println!("  total        {:>12}  of {}", gib(m.total), gib(p.device_memory));
    let other = if p.remat { "without" } else { "with" };
    if p.fits {
        println!("fits: yes ({} free)", gib(p.device_memory - m.total));
    } else {
        println!("fits: NO, over by {}", gib(p.over_by));
    }
    let other_fits = p.memory_total_other_remat <= p.device_memory;
    println!(
        "  {other} remat: {} ({})",
        gib(p.memory_total_other_remat),
        if other_fits {
            "fits".to_string()
        } else {
            format!("over by {}", gib(p.memory_total_other_remat - p.device_memory))
        }
    );
    println!(
        "compute per device: {:.3} PFLOP model ({:.3} executed) per step",
        p.model_flops / 1e15,
        p.executed_flops / 1e15
    );
    println!(
        "communication per device: data axis {} in {} collectives, model axis {} in {} collectives",
        gib(p.comm.data as u64),
        p.comm.data_collectives,
        gib(p.comm.model as u64),
        p.comm.model_collectives
    );
    println!(
        "time per step: compute {:.3} s ({:.1} TFLOP/s at {:.0}% of peak), data {:.3} s ({:.0} GB/s), model {:.3} s ({:.0} GB/s)",
        p.compute_time,
        p.device_peak / 1e12,
        p.compute_efficiency * 100.0,
        p.data_time,
        p.data_bandwidth / 1e9,
        p.model_time,
        p.model_bandwidth / 1e9
    );
    println!(
        "predicted step: {:.3} s with overlap (MFU {:.1}%), {:.3} s without (MFU {:.1}%)",
        p.step_time_overlap,
        p.mfu_overlap * 100.0,
        p.step_time_no_overlap,
        p.mfu_no_overlap * 100.0
    );
}
