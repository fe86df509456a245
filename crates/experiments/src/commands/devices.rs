//! `vit devices [--json]`: what this machine offers vitrs (CPU threads, CUDA devices, NVRTC,
//! NCCL), and which fast CUDA kernels passed their first-use check on each device.

use super::CliError;
use vit_tensor::cuda::{self, self_check::KernelStatus};

#[derive(clap::Args)]
pub struct Args {
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = vit_tensor::cpu::CpuInfo::detect().to_string();
    let cuda_devices = cuda::device_count();
    let nvrtc = cuda::nvrtc_available().then(cuda::nvrtc::version).transpose()?;
    let nccl = vit_collective::nccl_version();
    // The fast kernels' first-use checks (issue 14 item 7), run now on every device.
    let mut checks: Vec<(usize, &'static str, KernelStatus)> = Vec::new();
    if nvrtc.is_some() {
        // Checks of kernels outside vit-tensor (vit-optim's device-side step).
        vit_optim::cuda::register_self_checks();
        for ordinal in 0..cuda_devices {
            checks.extend(cuda::self_check::check_all(ordinal)?.into_iter().map(|(k, s)| (ordinal, k, s)));
        }
    }
    if args.json {
        let nvrtc = nvrtc.map(|(a, b)| format!("{a}.{b}"));
        let fast: Vec<_> = checks
            .iter()
            .map(|(d, k, s)| {
                serde_json::json!({ "device": format!("cuda:{d}"), "kernel": k, "passed": matches!(s, KernelStatus::Passed { .. }), "status": s.to_string() })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "cpu": cpu, "cpu_threads": threads, "cuda_devices": cuda_devices, "nvrtc": nvrtc, "nccl": nccl, "fast_kernels": fast })
        );
        return Ok(());
    }
    println!("cpu       {cpu}, {threads} threads");
    println!(
        "cuda      {cuda_devices} device(s){}",
        if cuda_devices == 0 { " (driver not found or no GPU)" } else { "" }
    );
    match nvrtc {
        Some((a, b)) => println!("nvrtc     {a}.{b}"),
        None => println!("nvrtc     not found (kernels cannot be compiled; see scripts/cuda-env.sh)"),
    }
    match nccl {
        Some(v) => println!("nccl      {v}"),
        None => {
            println!("nccl      not available (needs a CUDA device and libnccl.so >= 2.18; see scripts/cuda-env.sh)")
        }
    }
    for (ordinal, kernel, status) in &checks {
        println!("cuda:{ordinal}    {kernel:<24} {status}");
    }
    Ok(())
}
