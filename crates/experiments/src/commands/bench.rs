//! `vit bench`: speed and memory of whole training steps, and of inference, on synthetic data
//! (issue 14 item 9, issue 15).
//!
//! - `vit bench train --model B/16 --batch 256`: images per second, milliseconds per step
//!   (median over the timed steps), model TFLOP/s (GFLOP/s on the CPU) and MFU, and the
//!   device's peak memory.
//! - `vit bench infer --model B/16 --batch 256`: the same for forward passes only, through
//!   the forward `vit predict` runs ([`VisionTransformer::predict`]); model FLOPs are 1 × the
//!   forward instead of 3 ×. The optimizer arguments are ignored.
//! - `vit bench memory --model e/14 --batch 8`: the peak device memory of one step, and
//!   whether it ran at all (an out-of-memory error is reported, not raised).
//!
//! Synthetic data: standard-normal images and uniform labels drawn once with the seed, so the
//! numbers measure the model, backward and optimizer, not the loader. `--json` prints one object.

use super::{model_config, CliError};
use std::time::Instant;
use vit_experiments::train::{
    config::LossKind, device_steps::DeviceSteps, micro_batch_grads, micro_batch_grads_device,
};
use vit_model::layers::patch_dropout::{tokens_kept, PatchDrop};
use vit_model::{ModelConfig, VisionTransformer};
use vit_optim::{AdamWConfig, Algorithm, FactoredAdamConfig, Optimizer, OptimizerChain, OptimizerConfig, ParamGroups};
use vit_tensor::{cpu::MatmulPrecision, cuda, ops, DType, Device, Tensor};

/// Dense bf16/f16 tensor-core peak of the H100 and H200 SXM (reference §1), the MFU
/// denominator on CUDA unless `--peak-tflops` says otherwise.
const HOPPER_BF16_PEAK_TFLOPS: f64 = 989.4;
/// Their f32 peak without TF32 (f32 compute here runs cuBLAS sgemm, no TF32).
const HOPPER_F32_PEAK_TFLOPS: f64 = 66.9;

#[derive(clap::Subcommand)]
pub enum Which {
    /// Images per second, step time, MFU and peak memory of training steps.
    Train(StepArgs),
    /// Images per second, step time, MFU and peak memory of forward passes (`vit predict`).
    Infer(StepArgs),
    /// Peak device memory of one training step (does it fit?).
    Memory(StepArgs),
}

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Args, Clone)]
pub struct StepArgs {
    /// Model preset (`B/16`, `L/16`, `e/14`, ...) or `custom`.
    #[arg(long, default_value = "B/16")]
    model: String,
    /// Model overrides, `--set remat=true --set image_size=384`.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Images per step.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// `cpu`, `cuda` or `cuda:N`; default `cuda:0` where a GPU is found, else `cpu`.
    #[arg(long)]
    device: Option<Device>,
    /// Compute dtype of activations and gradients: `bf16`, `f16` or `f32` (parameters and
    /// optimizer state stay f32).
    #[arg(long, default_value = "bf16", value_parser = parse_precision)]
    precision: DType,
    /// Inputs of the CPU backend's GEMMs: `f32`, or `bf16` (rounded, f32 sums; on the AMX
    /// tiles where the CPU has them), as `train.matmul_precision`. CPU only. With `bf16`, each
    /// step index runs twice, with f32 GEMMs and then bf16, and both rates are reported: the
    /// ratio is measured in the same run, step by step, so the host's drift cancels.
    #[arg(long, default_value = "f32")]
    matmul_precision: MatmulPrecision,
    /// Timed steps (`train`, `infer`; `memory` runs one).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (kernel compilation, memory pool warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Peak TFLOP/s of the device for MFU; default the H100/H200's on CUDA, none on the CPU.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// `adamw` (f32 moments, as the PyTorch baseline) or `factored-adam` (Scaling ViT: bf16
    /// momentum, factored second moment; what fits the largest models).
    #[arg(long, default_value = "adamw", value_parser = ["adamw", "factored-adam"])]
    optimizer: String,
    /// Seed of the synthetic data and the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// PatchDropout (`train` and `memory`): the fraction of each image's patch tokens dropped
    /// in every step, as `train.patch_dropout` does (0 = none). Model FLOPs count the tokens kept.
    #[arg(long, default_value_t = 0.0)]
    patch_dropout: f64,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What one `vit bench train`, `infer` or `memory` run measured.
#[derive(serde::Serialize)]
struct Report {
    what: &'static str,
    model: String,
    params: usize,
    batch: usize,
    device: String,
    precision: String,
    /// The CPU GEMMs' input precision (`--matmul-precision`).
    matmul_precision: String,
    /// The optimizer of the training steps; `none` for `infer`.
    optimizer: String,
    /// The fraction of patch tokens dropped in each training step (`--patch-dropout`).
    patch_dropout: f64,
    /// `train` with `--patch-dropout`: images/s of the same steps with every token, timed in
    /// the same run right after (fresh parameters of the same seed).
    every_token_images_per_second: Option<f64>,
    /// `images_per_second / every_token_images_per_second`: what dropping buys per image.
    speedup_vs_every_token: Option<f64>,
    /// `--matmul-precision bf16`: images/s of the same steps with f32 GEMMs, each timed right
    /// before its bf16 twin.
    f32_matmul_images_per_second: Option<f64>,
    /// `images_per_second / f32_matmul_images_per_second`: what bf16 GEMMs buy.
    speedup_vs_f32_matmul: Option<f64>,
    /// Why the every-token reference could not run, when it could not.
    reference_error: Option<String>,
    timed_steps: usize,
    /// Median wall-clock milliseconds per step (forward, backward, optimizer; the forward
    /// alone for `infer`), synchronised.
    step_ms: Option<f64>,
    images_per_second: Option<f64>,
    /// Model FLOPs of one step per image: `ModelConfig::train_flops_per_image` (3 × forward)
    /// for `train` and `memory`, `ModelConfig::forward_flops_per_image` for `infer`.
    model_flops_per_image: f64,
    /// Model TFLOP/s: `model_flops_per_image` × images/s / 10¹².
    model_tflops: Option<f64>,
    /// The same in GFLOP/s (`model_flops_per_image` × images/s / 10⁹), the unit printed on the CPU.
    model_gflops: Option<f64>,
    mfu: Option<f64>,
    peak_tflops: Option<f64>,
    /// The most device bytes in live allocations during the steps (CUDA only).
    peak_memory_bytes: Option<u64>,
    /// Device-to-host reads per timed step (`vit_tensor::cuda::host_reads`; CUDA only): each
    /// waits for the device, so each leaves the GPU idle while the host queues the next work.
    host_reads_per_step: Option<f64>,
    /// The training step's path: `device-status` (loss, norm, clip factor and the non-finite
    /// check on the device, the optimizer writing the compute copy; one status read after the
    /// last step) or `host-sync` (the loss and the gradients' norm read back every step: CPU,
    /// a failed `device_step` self-check, or `VITRS_FAST_KERNELS_OFF=device_step`).
    step_path: Option<&'static str>,
    /// Why the run stopped early (e.g. out of memory), when it did.
    error: Option<String>,
    /// The host CPU and its kernels' instruction set (`vit_tensor::cpu::CpuInfo`): CPU rates
    /// depend on it, so compare them only between runs on the same one.
    cpu: String,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let (what, a) = match args.which {
        Which::Train(a) => ("train", a),
        Which::Infer(a) => ("infer", a),
        Which::Memory(a) => ("memory", StepArgs { steps: 1, warmup: 0, ..a }),
    };
    if a.batch == 0 {
        return Err(CliError::Usage("--batch 0: expected at least one image per step".into()));
    }
    if a.steps == 0 {
        return Err(CliError::Usage("--steps 0: expected at least one timed step".into()));
    }
    if !(0.0..1.0).contains(&a.patch_dropout) {
        return Err(CliError::Usage(format!(
            "--patch-dropout {}: expected a fraction of the patches in [0, 1)",
            a.patch_dropout
        )));
    }
    if what == "infer" && a.patch_dropout > 0.0 {
        return Err(CliError::Usage(format!(
            "--patch-dropout {} with infer: expected it with train or memory only (inference keeps every token)",
            a.patch_dropout
        )));
    }
    let device = a.device.unwrap_or(if cuda::available() { Device::Cuda(0) } else { Device::Cpu });
    if a.matmul_precision != MatmulPrecision::F32 && device != Device::Cpu {
        return Err(CliError::Usage(format!(
            "--matmul-precision {} on {device}: expected it with --device cpu only (the GPU GEMMs follow --precision)",
            a.matmul_precision
        )));
    }
    vit_tensor::cpu::set_matmul_precision(a.matmul_precision);
    let cfg = model_config(&a.model, &a.sets)?;
    let kept = (a.patch_dropout > 0.0).then(|| tokens_kept(cfg.num_patches(), a.patch_dropout));
    let model = VisionTransformer::new(&cfg, a.precision, device)?;
    let params = model.init_params(a.seed, DType::F32, device)?;
    let peak = a.peak_tflops.or(match (device, a.precision) {
        (Device::Cuda(_), DType::F32) => Some(HOPPER_F32_PEAK_TFLOPS),
        (Device::Cuda(_), _) => Some(HOPPER_BF16_PEAK_TFLOPS),
        (Device::Cpu, _) => None,
    });
    let mut report = Report {
        what,
        model: a.model.clone(),
        params: params.iter().map(|(_, t)| t.numel()).sum(),
        batch: a.batch,
        device: device.to_string(),
        precision: format!("{:?}", a.precision).to_lowercase(),
        matmul_precision: a.matmul_precision.to_string(),
        optimizer: if what == "infer" { "none".to_string() } else { a.optimizer.clone() },
        timed_steps: 0,
        step_ms: None,
        images_per_second: None,
        patch_dropout: a.patch_dropout,
        every_token_images_per_second: None,
        speedup_vs_every_token: None,
        f32_matmul_images_per_second: None,
        speedup_vs_f32_matmul: None,
        reference_error: None,
        model_flops_per_image: match (what, kept) {
            ("infer", _) => cfg.forward_flops_per_image(),
            (_, Some(k)) => 3.0 * cfg.forward_flops_keeping(k),
            (_, None) => cfg.train_flops_per_image(),
        },
        model_tflops: None,
        model_gflops: None,
        mfu: None,
        peak_tflops: peak,
        peak_memory_bytes: None,
        host_reads_per_step: None,
        step_path: None,
        error: None,
        cpu: vit_tensor::cpu::CpuInfo::detect().to_string(),
    };
    let timed = if what == "infer" {
        time_forwards(&cfg, &model, &params, &a, device)
    } else {
        time_steps(&cfg, &model, params, &a, kept, device)
    };
    let times = match timed {
        Ok(t) => {
            if let Device::Cuda(_) = device {
                report.host_reads_per_step = Some(t.host_reads as f64 / t.times.len().max(1) as f64);
            }
            report.step_path = t.path;
            if !t.f32_matmul_times.is_empty() {
                report.f32_matmul_images_per_second = Some(a.batch as f64 / median(&t.f32_matmul_times));
            }
            t.times
        }
        Err(e) => {
            report.error = Some(e.to_string());
            Vec::new()
        }
    };
    if let Device::Cuda(ordinal) = device {
        report.peak_memory_bytes = cuda::memory_stats(ordinal).ok().map(|m| m.used_peak);
    }
    if !times.is_empty() {
        let step = median(&times);
        let rate = a.batch as f64 / step;
        let flops = report.model_flops_per_image * rate;
        let tflops = flops / 1e12;
        report.timed_steps = times.len();
        report.step_ms = Some(step * 1e3);
        report.images_per_second = Some(rate);
        report.model_tflops = Some(tflops);
        report.model_gflops = Some(flops / 1e9);
        report.mfu = peak.map(|p| tflops / p);
        report.speedup_vs_f32_matmul = report.f32_matmul_images_per_second.map(|f| rate / f);
        // The reference of the ratio, measured in the same run: every token kept. It runs after
        // the peak memory and host reads were read, so they are the dropping steps' own; where
        // it cannot run (out of memory with every token), the report says so and keeps the rest.
        if what == "train" && kept.is_some() {
            let reference = model
                .init_params(a.seed, DType::F32, device)
                .map_err(CliError::from)
                .and_then(|params| time_steps(&cfg, &model, params, &a, None, device));
            match reference {
                Ok(t) => {
                    let every = a.batch as f64 / median(&t.times);
                    report.every_token_images_per_second = Some(every);
                    report.speedup_vs_every_token = Some(rate / every);
                }
                Err(e) => report.reference_error = Some(format!("every-token reference: {e}")),
            }
        }
    }
    print_report(&report, a.json)?;
    match (&report.error, what) {
        // `memory` answers "does it fit?": running out is an answer, not a failure.
        (Some(_), "memory") | (None, _) => Ok(()),
        (Some(e), _) => Err(CliError::Usage(format!("vit bench {what}: {e}"))),
    }
}

/// What [`timed_steps`] measured.
struct Timed {
    /// Seconds of each timed step.
    times: Vec<f64>,
    /// `--matmul-precision bf16`: seconds of each timed step's f32-GEMM twin (else empty).
    f32_matmul_times: Vec<f64>,
    /// Device-to-host reads during the timed steps (all of them).
    host_reads: u64,
    /// The training step's path (`Report::step_path`); `None` for forwards.
    path: Option<&'static str>,
}

/// Seconds of each timed step (after `warmup` untimed ones).
fn time_steps(
    cfg: &ModelConfig,
    model: &VisionTransformer,
    mut params: vit_tensor::ParamStore,
    a: &StepArgs,
    kept: Option<usize>,
    device: Device,
) -> Result<Timed, CliError> {
    // Each step draws other tokens, as training does.
    let patch = |step: usize| kept.map(|keep| PatchDrop { keep, seed: step as u64, first_image: 0 });
    let algorithm = match a.optimizer.as_str() {
        "factored-adam" => Algorithm::FactoredAdam(FactoredAdamConfig::default()),
        _ => Algorithm::AdamW(AdamWConfig::default()),
    };
    let mut opt_cfg = OptimizerConfig::new(algorithm, 1e-3);
    opt_cfg.weight_decay = 1e-4;
    opt_cfg.grad_clip_norm = Some(1.0);
    opt_cfg.groups = ParamGroups::scaling_vit();
    let mut opt = OptimizerChain::new(opt_cfg, &params)?;
    let images = synthetic_images(cfg, a, device)?;
    let classes = cfg.classes.max(1);
    let labels: Vec<i32> =
        (0..a.batch).map(|i| ((i as u64 * 2_654_435_761 + a.seed) % classes as u64) as i32).collect();
    let targets =
        ops::one_hot(&Tensor::from_vec(labels, [a.batch], Device::Cpu)?, classes, DType::F32)?.to_device(device)?;
    // One gradient store for every step, zeroed in place, as `vit train` does.
    let mut grads = params.zeros_like(DType::F32)?;
    // As `vit train` on one GPU: no host read in a step where the self-check allows it.
    if let Some(mut dev) = DeviceSteps::new(true, &opt, device, a.precision, a.batch)? {
        let last = a.warmup + a.steps - 1;
        let mut timed = timed_steps(a, device, |step| {
            let cp = dev.compute_params(&params)?;
            grads.fill_zero()?;
            let p = patch(step);
            micro_batch_grads_device(
                model,
                &cp,
                &images,
                &targets,
                LossKind::Softmax,
                a.batch,
                p,
                &mut grads,
                &mut dev,
            )?;
            drop(cp);
            dev.step(&mut opt, &mut params, &grads)?;
            // The one read of the run (counted): the last step's loss, and any bad step before.
            if step == last {
                let (loss, _) = dev.read(&opt)?;
                if !loss.is_finite() {
                    return Err(CliError::Usage(format!("the loss became {loss} at step {step}")));
                }
            }
            Ok(())
        })?;
        timed.path = Some("device-status");
        return Ok(timed);
    }
    let mut timed = timed_steps(a, device, |step| {
        let cp = params.cast(a.precision)?;
        grads.fill_zero()?;
        let loss =
            micro_batch_grads(model, &cp, &images, &targets, LossKind::Softmax, a.batch, patch(step), &mut grads)?;
        drop(cp);
        opt.step(&mut params, &grads)?;
        if !loss.is_finite() {
            return Err(CliError::Usage(format!("the loss became {loss} at step {step}")));
        }
        Ok(())
    })?;
    timed.path = Some("host-sync");
    Ok(timed)
}

/// Seconds of each of `a.steps` timed calls of `step` (given the step index), after
/// `a.warmup` untimed ones, each synchronised with the device; the device's peak memory and
/// its device-to-host reads are counted from the first timed call.
fn timed_steps(
    a: &StepArgs,
    device: Device,
    mut step: impl FnMut(usize) -> Result<(), CliError>,
) -> Result<Timed, CliError> {
    // bf16 GEMMs: each step index also runs with f32 GEMMs just before, timed apart.
    let twins: &[MatmulPrecision] = match a.matmul_precision {
        MatmulPrecision::Bf16 => &[MatmulPrecision::F32, MatmulPrecision::Bf16],
        MatmulPrecision::F32 => &[MatmulPrecision::F32],
    };
    let mut times = Vec::with_capacity(a.steps);
    let mut f32_matmul_times = Vec::new();
    let mut reads_before = cuda::host_reads();
    for i in 0..a.warmup + a.steps {
        if i == a.warmup {
            if let Device::Cuda(o) = device {
                cuda::reset_peak_memory(o).ok();
            }
            reads_before = cuda::host_reads();
        }
        for &precision in twins {
            vit_tensor::cpu::set_matmul_precision(precision);
            sync(device)?;
            let t0 = Instant::now();
            let result = step(i);
            vit_tensor::cpu::set_matmul_precision(a.matmul_precision);
            result?;
            sync(device)?;
            if i >= a.warmup {
                let into = if precision == a.matmul_precision { &mut times } else { &mut f32_matmul_times };
                into.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    Ok(Timed { times, f32_matmul_times, host_reads: cuda::host_reads() - reads_before, path: None })
}

/// Seconds of each timed forward pass (after `warmup` untimed ones): the parameters cast to
/// the compute dtype once (as `vit predict` loads them once), then `predict` on the same
/// synthetic images each step. The last logits must be finite.
fn time_forwards(
    cfg: &ModelConfig,
    model: &VisionTransformer,
    params: &vit_tensor::ParamStore,
    a: &StepArgs,
    device: Device,
) -> Result<Timed, CliError> {
    let cp = params.cast(a.precision)?;
    let images = synthetic_images(cfg, a, device)?;
    let mut last = None;
    let times = timed_steps(a, device, |_| {
        last = Some(model.predict(&cp, &images)?);
        Ok(())
    })?;
    if let Some(logits) = last {
        if let Some(bad) = logits.to_f32_vec()?.into_iter().find(|v| !v.is_finite()) {
            return Err(CliError::Usage(format!("the logits hold {bad}, expected finite values")));
        }
    }
    Ok(times)
}

/// Standard-normal images `[batch, channels, image_size, image_size]` in the compute dtype,
/// drawn from the seed.
fn synthetic_images(cfg: &ModelConfig, a: &StepArgs, device: Device) -> Result<Tensor, CliError> {
    Ok(Tensor::randn(
        [a.batch, cfg.channels, cfg.image_size, cfg.image_size],
        0.0,
        1.0,
        a.seed ^ 0x5EED,
        a.precision,
        device,
    )?)
}

/// Waits for the device's queued work (nothing to wait for on the CPU).
fn sync(device: Device) -> Result<(), CliError> {
    if let Device::Cuda(o) = device {
        cuda::synchronize(o)?;
    }
    Ok(())
}

fn parse_precision(s: &str) -> Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        _ => Err(format!("{s:?}: expected bf16, f16 or f32")),
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_report(r: &Report, json: bool) -> Result<(), CliError> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "{} {} ({:.1}M parameters), batch {}, {} {}, {}",
        r.what,
        r.model,
        r.params as f64 / 1e6,
        r.batch,
        r.device,
        r.precision,
        if r.what == "infer" { "forward only (vit predict)" } else { &r.optimizer }
    );
    if r.device == Device::Cpu.to_string() {
        println!("  on {}", r.cpu);
    }
    if r.patch_dropout > 0.0 {
        println!("  patch dropout {}: model FLOPs counted at the tokens kept", r.patch_dropout);
    }
    if let (Some(ms), Some(rate), Some(tf), Some(gf)) = (r.step_ms, r.images_per_second, r.model_tflops, r.model_gflops)
    {
        print!("  {ms:.1} ms/step (median of {}), {rate:.1} images/s, ", r.timed_steps);
        // On a CPU a model TFLOP/s rounds to 0.1: GFLOP/s there.
        if r.device == Device::Cpu.to_string() {
            print!("{gf:.1} model GFLOP/s");
        } else {
            print!("{tf:.1} model TFLOP/s");
        }
        match (r.mfu, r.peak_tflops) {
            (Some(m), Some(p)) => println!(", MFU {:.1}% of {p} TFLOP/s", 100.0 * m),
            _ => println!(),
        }
    }
    if let (Some(every), Some(x)) = (r.every_token_images_per_second, r.speedup_vs_every_token) {
        println!("  every token (same run): {every:.1} images/s; patch dropout {}: {x:.2}x", r.patch_dropout);
    }
    if let (Some(f), Some(x)) = (r.f32_matmul_images_per_second, r.speedup_vs_f32_matmul) {
        println!("  f32 GEMMs (same run, step by step): {f:.1} images/s; bf16 GEMMs: {x:.2}x");
    }
    if let Some(b) = r.peak_memory_bytes {
        println!("  peak device memory {:.2} GiB", b as f64 / (1u64 << 30) as f64);
    }
    if let (Some(n), Some(path)) = (r.host_reads_per_step, r.step_path) {
        println!("  {n:.2} device-to-host reads per step ({path} step)");
    }
    if let Some(e) = &r.reference_error {
        println!("  no ratio: {e}");
    }
    if let Some(e) = &r.error {
        println!("  stopped: {e}");
    }
    Ok(())
}
