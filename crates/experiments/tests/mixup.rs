//! Mixup in training (`data.mixup = { p = 0.2 }`, issue 17 item 6): it changes the run, a run
//! stopped and resumed mixes as a straight one (the ratio comes from the seed and the step), and
//! two data-parallel ranks mix the global batch as one rank does.

mod common;

use common::{assert_losses_close, assert_same_metrics, losses, train_small as train, vit};

const MIXUP: [&str; 2] = ["--set", "data.mixup={ p = 0.2 }"];

#[test]
fn mixup_changes_the_run_resumes_exactly_and_two_ranks_follow_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, mixed, resumed, two) =
        (tmp.path().join("plain"), tmp.path().join("mixed"), tmp.path().join("resumed"), tmp.path().join("two"));
    let o = train(&plain, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(&mixed, &MIXUP);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = std::fs::read_to_string(mixed.join("config.toml")).unwrap();
    assert!(config.contains("[data.mixup]") && config.contains("p = 0.2"), "{config}");
    // Training on mixed images and targets changes the losses (a step whose ratio is within
    // f32 rounding of 1 may not, so not every step is required to).
    let (lp, lm) = (losses(&plain), losses(&mixed));
    assert_eq!(lp.len(), lm.len());
    let changed = lp.iter().zip(&lm).filter(|(a, b)| a.1 != b.1).count();
    assert!(changed >= 10 && lp[19].1 != lm[19].1, "mixup changed only {changed} of 20 losses");

    let o = train(&resumed, &[&MIXUP[..], &["--stop-at", "7"]].concat());
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vit(&["train", "--resume", resumed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_metrics(&mixed, &resumed, "mixup: straight vs stopped at 7 and resumed");

    let o = train(&two, &[&MIXUP[..], &["--world", "2"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_losses_close(&mixed, &two, 20, "mixup: world 2 vs world 1");
}

#[test]
fn a_bad_mixup_setting_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, want) in [
        ("data.mixup={ p = 0 }", "data.mixup.p = 0: expected a positive Beta parameter"),
        ("data.mixup={ alpha = 0.2 }", "alpha"),
    ] {
        let o = train(&tmp.path().join("bad"), &["--set", set]);
        assert_eq!(o.status.code(), Some(1), "{set}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{set}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{set}: {e}");
    }
}
