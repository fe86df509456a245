//! Helpers shared by the integration tests that compare runs (determinism, faults).
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;

/// `metrics.jsonl` with the `images_per_second` field cut out of each line as text (parsing
/// and printing the numbers could itself change their last digits).
pub fn metrics_without_timing(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let key = "\"images_per_second\":";
            let start = line.find(key).unwrap_or_else(|| panic!("no {key} in {line}"));
            let rest = &line[start + key.len()..];
            let end = rest.find([',', '}']).unwrap();
            let tail = rest[end..].strip_prefix(',').unwrap_or(&rest[end..]);
            format!("{}{}", &line[..start], tail)
        })
        .collect()
}

pub fn assert_same_metrics(a: &Path, b: &Path, what: &str) {
    let (ma, mb) = (metrics_without_timing(a), metrics_without_timing(b));
    assert_eq!(ma.len(), mb.len(), "{what}: metrics line counts");
    for (la, lb) in ma.iter().zip(&mb) {
        assert_eq!(la, lb, "{what}: metrics differ");
    }
}

pub fn assert_same_bytes(a: &Path, b: &Path, what: &str) {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(ba.len() > 1000, "{}: {} bytes", a.display(), ba.len());
    let first = ba.iter().zip(&bb).position(|(x, y)| x != y);
    assert!(
        ba == bb,
        "{what}: {} and {} differ (sizes {} / {}, first at byte {first:?})",
        a.display(),
        b.display(),
        ba.len(),
        bb.len()
    );
}
