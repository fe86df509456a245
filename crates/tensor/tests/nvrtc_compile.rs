//! Compiles every file in `kernels/` with NVRTC for each CI architecture (sm_90a, sm_80) and
//! fails on a compile error or a register spill (design §4). Needs only the NVRTC library, no
//! GPU: `scripts/test.sh` installs it and puts it on LD_LIBRARY_PATH, so this runs in CI.

use vit_tensor::cuda::nvrtc::{self, CI_ARCHS, KERNEL_FILES};

fn require_nvrtc() {
    assert!(
        vit_tensor::cuda::nvrtc_available(),
        "libnvrtc.so not found: run the tests with scripts/test.sh, which installs NVRTC from the \
         nvidia-cuda-nvrtc wheel and sets LD_LIBRARY_PATH"
    );
}

#[test]
fn every_kernel_compiles_without_spills() {
    require_nvrtc();
    let (major, minor) = nvrtc::version().expect("nvrtcVersion");
    println!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    let mut compiled = 0;
    for (file, raw) in KERNEL_FILES.iter().filter(|(f, _)| f.ends_with(".cu")) {
        assert!(raw.contains("__global__"), "{file} defines no kernel");
        failures.extend(nvrtc::ci_failures(file, raw));
        compiled += CI_ARCHS.len();
    }
    assert!(failures.is_empty(), "kernel compile failures:\n{}", failures.join("\n"));
    println!("compiled {compiled} (file, arch) pairs");
}

#[test]
fn a_spill_and_a_compile_error_are_detected() {
    require_nvrtc();
    // A compile error names the file and carries NVRTC's log.
    let err =
        nvrtc::compile("broken.cu", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", "sm_80")
            .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("broken.cu") && msg.contains("undefined_name"), "unexpected error: {msg}");
    // A kernel forced to 16 registers with a large live array must spill, and the parser must see it.
    let src = r#"
extern "C" __global__ void __launch_bounds__(1024, 4) spill(float* x, int n) {
    float acc[96];
    #pragma unroll
    for (int i = 0; i < 96; ++i) acc[i] = x[(threadIdx.x + i * 131) % n];
    for (int r = 0; r < n; ++r) {
        #pragma unroll
        for (int i = 0; i < 96; ++i) acc[i] = acc[i] * acc[(i + r) % 96] + x[i];
    }
    float s = 0.f;
    #pragma unroll
    for (int i = 0; i < 96; ++i) s += acc[i];
    x[threadIdx.x] = s;
}"#;
    let c = nvrtc::compile("spill.cu", src, "sm_80").expect("compiles");
    assert!(!c.spills().is_empty(), "expected a spill to be reported; log:\n{}", c.log);
}

#[test]
fn a_caller_owned_source_compiles_with_our_headers() {
    require_nvrtc();
    // `#include "common.cuh"` resolves against vit-tensor's embedded kernels/ (bf16 helpers).
    let src = vit_tensor::cuda::kernel::KernelSource::new(
        "custom.cu",
        "#include \"common.cuh\"\nextern \"C\" __global__ void k(const bf16* x, float* y) { y[threadIdx.x] = to_f32(x[threadIdx.x]); }",
    );
    assert!(src.expanded().contains("float to_f32(bf16 v)") && !src.expanded().starts_with("#include"));
    assert!(src.ci_failures().is_empty(), "{:?}", src.ci_failures());
    let c = src.compile_check("sm_90a").expect("compiles");
    assert!(c.log.contains("ptxas info") && c.spills().is_empty());
    // Without the include the helpers are unknown: the check reports the error, naming the file.
    let bare = vit_tensor::cuda::kernel::KernelSource::new(
        "bare.cu",
        "extern \"C\" __global__ void k(const bf16* x, float* y) { y[threadIdx.x] = to_f32(x[threadIdx.x]); }",
    );
    let failures = bare.ci_failures();
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(failures[0].starts_with("bare.cu (sm_90a)") && failures[0].contains("bf16"), "{failures:?}");
}

#[test]
fn every_flash_attention_entry_point_the_launchers_use_exists() {
    require_nvrtc();
    // FlashVariant's tables (crates/tensor/src/cuda/flash_attention.rs) name the kernels of each
    // variant; a name the kernel file does not define would fail only at launch on a GPU.
    let src = nvrtc::kernel_source("flash_attention.cu").expect("flash_attention.cu is embedded");
    let c = nvrtc::compile_check("flash_attention.cu", &src, "sm_90a").expect("compiles");
    let defined: Vec<&str> =
        c.log.lines().filter_map(|l| l.split("Compiling entry function '").nth(1)?.split('\'').next()).collect();
    let names = vit_tensor::cuda::flash_attention::entry_points();
    assert!(names.len() > 30, "{names:?}");
    let missing: Vec<_> = names.iter().filter(|n| !defined.contains(&n.as_str())).collect();
    assert!(missing.is_empty(), "kernels the launchers use but flash_attention.cu lacks: {missing:?}");
}
