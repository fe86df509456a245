//! The `vit` binary end to end: outputs, and one-line errors with exit code 1.

use std::process::{Command, Output};

fn vit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vit")).args(args).output().expect("run vit")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = vit(args);
    assert!(out.status.success(), "vit {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn params_json_reproduces_reference_counts() {
    // reference.md §1, each by its own convention.
    let enc = |m: &str| json(&["params", "--model", m, "--json"])["encoder"].as_u64().unwrap();
    assert_eq!(enc("S/16"), 21_664_896);
    assert_eq!(enc("ViT-B/16"), 85_797_120);
    assert_eq!(enc("b/32"), 87_453_696);
    assert_eq!(enc("L/16"), 303_299_584);
    assert_eq!(enc("g/14"), 1_011_199_616);
    assert_eq!(enc("G/14"), 1_842_772_352);
    let h = json(&["params", "--model", "H/14", "--set", "pool=tok", "--json"]);
    assert_eq!(h["total"].as_u64(), Some(632_045_800));
    let e = json(&["params", "--model", "e/14", "--set", "classes=29593", "--json"]);
    assert_eq!(e["total"].as_u64(), Some(3_926_402_969));
    let g = json(&["params", "--model", "22B/14", "--json"]);
    assert_eq!(g["matmul"].as_u64(), Some(12 * 48 * 6144 * 6144));
}

#[test]
fn bad_input_is_one_line_and_exit_code_1() {
    for (args, needle) in [
        (&["params", "--model", "B/17"][..], "unknown model \"B/17\""),
        (&["params", "--model", "B/16", "--set", "pool=bad"][..], "pool"),
        (&["params", "--model", "B/16", "--set", "nonsense=1"][..], "nonsense"),
        (&["params", "--model", "B/16", "--set", "heads=7"][..], "heads"),
    ] {
        let out = vit(args);
        assert_eq!(out.status.code(), Some(1), "vit {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one line for {args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "vit {args:?}: {err}");
    }
}

#[test]
fn devices_reports_without_panicking() {
    let d = json(&["devices", "--json"]);
    assert!(d["cpu_threads"].as_u64().unwrap() >= 1);
    assert!(d["cuda_devices"].is_u64());
}
