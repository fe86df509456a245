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
fn train(out: &Path, steps: u64, every: u64, extra: &[&str], host_sync: bool, fault: Option<&str>) -> std::process::Output {
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
        assert_eq!(h.len(), 20, "{precision}: one line per step");
        assert_eq!(d, h, "{precision}: the device-status run differs from the host-sync run");
        assert!(h.iter().any(|l| l.2 > 0.5) , "{precision}: the test means to clip some steps");
        println!("{precision}: 20 steps, losses {:.4} .. {:.4}, equal bits", h[0].1, h[19].1);
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
    assert_eq!(d, lines(&host));
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
