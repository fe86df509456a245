//! `vit train --device cuda` without host round trips (issue 14 item 6): on one GPU the loss,
//! the gradient norm, the clip factor and the non-finite check stay on the device and the
//! optimizer writes the compute copy; the status is read at log, evaluation and checkpoint steps
//! only. These runs must give the numbers of the host-sync step (`VITRS_FAST_KERNELS_OFF=
//! device_step`) bit for bit, and a NaN gradient must stop the run naming its step. Every test
//! needs a CUDA device (`scripts/gpu-check.sh` runs them with `VITRS_VIT` naming its `vit`).

mod common;

use common::small_recipe;
use std::path::{Path, PathBuf};

/// The `vit` binary: `VITRS_VIT` where set (a GPU host without the build tree), else cargo's.
fn vit_bin() -> PathBuf {
    std::env::var_os("VITRS_VIT").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vit")), PathBuf::from)
}

/// `vit train --device cuda` of [`small_recipe`]`(steps, every)` with `extra` after it; the
/// host-sync step when `host_sync`; `fault` for `VITRS_INJECT_FAULT`.
fn train(
    out: &Path,
    steps: u64,
    every: u64,
    extra: &[&str],
    host_sync: bool,
    fault: Option<&str>,
) -> std::process::Output {
    let recipe = small_recipe(steps, every);
    let mut args = vec!["train", "--out", out.to_str().unwrap(), "--device", "cuda"];
    args.extend(recipe.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let mut cmd = std::process::Command::new(vit_bin());
    cmd.current_dir(out.parent().unwrap()).args(&args).env_remove("VITRS_FAST_KERNELS_OFF");
    if host_sync {
        cmd.env("VITRS_FAST_KERNELS_OFF", "device_step");
    }
    match fault {
        Some(f) => cmd.env("VITRS_INJECT_FAULT", f),
        None => cmd.env_remove("VITRS_INJECT_FAULT"),
    };
    cmd.output().expect("run vit")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `(step, loss, grad_norm, lr, test_accuracy)` of every metrics line.
fn lines(dir: &Path) -> Vec<(u64, f64, f64, f64, Option<f64>)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {l}"));
            (v["step"].as_u64().unwrap(), f("loss"), f("grad_norm"), f("lr"), v["test_accuracy"].as_f64())
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn twenty_steps_give_the_host_sync_losses_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for precision in ["f32", "bf16"] {
        let set = format!("train.precision={precision}");
        // Clipping at 0.5: some steps clipped (the device-side factor), some not.
        let extra = ["--set", &set, "--set", "optimizer.clip_norm=0.5"];
        let (host, dev) = (tmp.path().join(format!("host-{precision}")), tmp.path().join(format!("dev-{precision}")));
        let o = train(&host, 20, 10, &extra, true, None);
        assert!(o.status.success(), "host-sync {precision}: {}", text(&o));
        let o = train(&dev, 20, 10, &extra, false, None);
        assert!(o.status.success(), "device {precision}: {}", text(&o));
        let (h, d) = (lines(&host), lines(&dev));
        assert_eq!((h.len(), d.len()), (20, 20), "{precision}: one line per step");
        assert_lines_match(&d, &h, precision);
        assert!(h.iter().any(|l| l.2 > 0.5), "{precision}: the test means to clip some steps");
        println!("{precision}: 20 steps, losses {:.4} .. {:.4}", h[0].1, h[19].1);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn log_steps_read_the_same_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["--set", "train.precision=bf16", "--set", "train.log_every=5"];
    let (host, dev) = (tmp.path().join("host"), tmp.path().join("dev"));
    assert!(train(&host, 20, 20, &extra, true, None).status.success());
    let o = train(&dev, 20, 20, &extra, false, None);
    assert!(o.status.success(), "{}", text(&o));
    let d = lines(&dev);
    assert_eq!(d.iter().map(|l| l.0).collect::<Vec<_>>(), [5, 10, 15, 20]);
    assert_lines_match(&d, &lines(&host), "bf16, log_every 5");
}

/// The same steps, learning rates and evaluations; losses and gradient norms equal (the step
/// itself is bit-exact, `vit-optim`'s `cuda_device_step`; 1e-6 relative allows for a GEMM that
/// is not bit-reproducible from one process to the next), and how many lines were bit-exact.
fn assert_lines_match(d: &[(u64, f64, f64, f64, Option<f64>)], h: &[(u64, f64, f64, f64, Option<f64>)], what: &str) {
    assert_eq!(d.len(), h.len(), "{what}");
    let mut exact = 0;
    for (a, b) in d.iter().zip(h) {
        assert_eq!((a.0, a.3.to_bits()), (b.0, b.3.to_bits()), "{what}: step or lr");
        for (x, y, name) in [(a.1, b.1, "loss"), (a.2, b.2, "grad_norm")] {
            assert!((x - y).abs() <= 1e-6 * y.abs(), "{what}: step {} {name} {x} (device) vs {y} (host-sync)", a.0);
        }
        assert_eq!(a.4.is_some(), b.4.is_some(), "{what}: step {} evaluated on one side only", a.0);
        if let (Some(x), Some(y)) = (a.4, b.4) {
            assert!((x - y).abs() <= 1.0 / 128.0, "{what}: step {} test accuracy {x} vs {y}", a.0);
        }
        exact += usize::from(a == b);
    }
    println!("{what}: {exact} of {} metrics lines bit-exact", d.len());
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_nan_gradient_stops_the_run_at_the_next_read_naming_its_step() {
    let tmp = tempfile::tempdir().unwrap();
    // A NaN in the first gradient of step index 6 (the 7th step); reads every 5 steps.
    let fault = Some("train_nan_grad_at_step=6");
    let extra = ["--set", "train.log_every=5"];
    let (host, dev) = (tmp.path().join("host"), tmp.path().join("dev"));
    let h = train(&host, 20, 5, &extra, true, fault);
    let d = train(&dev, 20, 5, &extra, false, fault);
    assert_eq!((h.status.code(), d.status.code()), (Some(1), Some(1)), "{}\n{}", text(&h), text(&d));
    // The same error, naming step 6 and the same parameter.
    let error = |o: &std::process::Output| {
        let t = text(o);
        let at = t.find("gradient of ").unwrap_or_else(|| panic!("no NonFinite error in {t}"));
        let line = t[at..].lines().next().unwrap().to_string();
        line.split(';').next().unwrap().to_string()
    };
    assert_eq!(error(&d), error(&h));
    assert!(error(&d).contains("step 6 refused"), "{}", error(&d));
    // The device run logged and saved step 5 only (the read at step 10 found the bad step).
    assert_eq!(lines(&dev).iter().map(|l| l.0).collect::<Vec<_>>(), [5]);
    assert!(dev.join("step-5.safetensors").exists() && !dev.join("step-10.safetensors").exists());
    assert!(text(&d).contains("nothing was saved"), "{}", text(&d));
}
