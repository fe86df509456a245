//! Compiles vit-optim's kernel source (`kernels/optim.cu`) with NVRTC for each CI architecture
//! (sm_90a, sm_80) through vit-tensor's public compile check, and fails on a compile error or a
//! register spill (design §4). Needs only the NVRTC library, no GPU: `scripts/test.sh` installs
//! it and puts it on LD_LIBRARY_PATH; without it this test fails rather than skips.

use vit_optim::cuda::OPTIM_SOURCE;
use vit_tensor::cuda::nvrtc::CI_ARCHS;

#[test]
fn the_optimizer_kernels_compile_without_spills() {
    assert!(
        vit_tensor::cuda::nvrtc_available(),
        "libnvrtc.so not found: run the tests with scripts/test.sh, which installs NVRTC from the \
         nvidia-cuda-nvrtc wheel and sets LD_LIBRARY_PATH"
    );
    assert_eq!(CI_ARCHS, ["sm_90a", "sm_80"]);
    let failures = OPTIM_SOURCE.ci_failures();
    assert!(failures.is_empty(), "kernel compile failures:\n{}", failures.join("\n"));
    // Every kernel the host launches is in the module, with ptxas's report.
    let c = OPTIM_SOURCE.compile_check("sm_90a").expect("compiles");
    for name in [
        "adamw_step",
        "sgd_step",
        "factored_adam_step",
        "factored_stats",
        "factored_finalize",
        "factored_rowmean",
        "sum_squares",
        "sum_squares_finalize",
        "sum_squares_dev",
        "step_status_finalize",
        "loss_accumulate",
        "adamw_step_dev",
        "sgd_step_dev",
        "factored_adam_step_dev",
        "factored_stats_dev",
        "factored_finalize_dev",
    ] {
        assert!(c.log.contains(&format!("Compiling entry function '{name}'")), "no kernel {name} in:\n{}", c.log);
    }
}
