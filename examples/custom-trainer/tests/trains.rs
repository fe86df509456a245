//! The example trains: run the binary for 100 steps on the bundled data, check that the
//! loss falls and the test accuracy is far above chance (0.1).

use std::process::Command;

/// The number after `key` on the first line that has it and matches `line_filter`.
fn value_after(text: &str, line_filter: &str, key: &str) -> f64 {
    let line = text.lines().find(|l| l.contains(line_filter)).unwrap_or_else(|| panic!("no {line_filter:?} in {text}"));
    let rest = line.split(key).nth(1).unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn trains_a_vit_on_the_bundled_data() {
    let out = Command::new(env!("CARGO_BIN_EXE_custom-trainer")).arg("100").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let first = value_after(&stdout, "step    1 ", "loss");
    let last = value_after(&stdout, "step  100 ", "loss");
    assert!(first > 2.0 && last < 0.8 * first, "loss {first} -> {last}\n{stdout}");
    let acc = value_after(&stdout, "test accuracy", "test accuracy");
    assert!(acc > 0.45, "test accuracy {acc}\n{stdout}");
}

#[test]
fn a_missing_data_folder_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_custom-trainer")).args(["5", "/nonexistent/data"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/data"), "{stderr}");
}
