//! `vit devices [--json]`: what this machine offers vitrs.

use super::CliError;
use vit_tensor::cuda;

#[derive(clap::Args)]
pub struct Args {
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cuda_devices = cuda::device_count();
    let nvrtc = cuda::nvrtc_available().then(cuda::nvrtc::version).transpose()?;
    if args.json {
        let nvrtc = nvrtc.map(|(a, b)| format!("{a}.{b}"));
        println!("{}", serde_json::json!({ "cpu_threads": threads, "cuda_devices": cuda_devices, "nvrtc": nvrtc }));
        return Ok(());
    }
    println!("cpu       {threads} threads");
    println!(
        "cuda      {cuda_devices} device(s){}",
        if cuda_devices == 0 { " (driver not found or no GPU)" } else { "" }
    );
    match nvrtc {
        Some((a, b)) => println!("nvrtc     {a}.{b}"),
        None => println!("nvrtc     not found (kernels cannot be compiled; see scripts/cuda-env.sh)"),
    }
    Ok(())
}
