//! The custom-kernel API (`vit_tensor::cuda::kernel`) on a GPU: a caller-owned source with our
//! headers, typed arguments (tensors read and written, scalars, a Pod struct by value, an
//! uploaded Pod table, a buffer read back), and the argument checks. Needs a GPU and NVRTC:
//! `cargo test -p vit-tensor --test cuda_kernel -- --include-ignored`.

use vit_tensor::cuda::kernel::{self, Arg, DeviceBuffer, KernelSource, Launch};
use vit_tensor::{DType, Device, Error, Tensor};

/// `y[i] = (x[i] · c.scale + c.shift) · table[i % 4].w`, and `sum[0] = Σ y` (one block).
static SRC: KernelSource = KernelSource::new(
    "test_custom.cu",
    r#"#include "common.cuh"
struct Coefs { float scale, shift; int unused; };
static_assert(sizeof(Coefs) == 12, "Coefs is mirrored in tests/cuda_kernel.rs");
struct Entry { long long i; float w; int pad; };
static_assert(sizeof(Entry) == 16, "Entry is mirrored in tests/cuda_kernel.rs");
extern "C" __global__ void affine(const bf16* x, float* y, Coefs c, const Entry* table, long long n, double* sum) {
    double s = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = (to_f32(x[i]) * c.scale + c.shift) * table[i % 4].w;
        y[i] = v;
        s += v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) sum[0] = s;
}
"#,
);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Coefs {
    scale: f32,
    shift: f32,
    unused: i32,
}
const _: () = assert!(std::mem::size_of::<Coefs>() == 12);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Entry {
    i: i64,
    w: f32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<Entry>() == 16);

#[test]
#[ignore = "needs a CUDA device"]
fn a_custom_kernel_runs_with_typed_arguments() {
    let dev = Device::Cuda(0);
    let n = 1000usize;
    let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Tensor::from_f32(xs.clone(), [n], DType::BF16, dev).unwrap();
    let xr = x.to_f32_vec().unwrap();
    // SAFETY: the kernel writes all n elements.
    let y = unsafe { kernel::empty([n], DType::F32, dev) }.unwrap();
    let mut sum = DeviceBuffer::zeros(dev, 8).unwrap();
    let c = Coefs { scale: 1.5, shift: -0.25, unused: 0 };
    let table: Vec<Entry> = (0..4).map(|i| Entry { i, w: 1.0 + i as f32, pad: 0 }).collect();
    let k = SRC.load("affine", dev).unwrap();
    assert_eq!(k.name(), "test_custom.cu:affine");
    // SAFETY: the arguments match the kernel; y is ours alone; every access is within n.
    unsafe {
        k.launch(
            Launch::linear(1, 256),
            &[
                Arg::tensor(&x),
                Arg::tensor_mut(&y),
                Arg::pod(&c),
                Arg::slice(&table),
                Arg::i64(n as i64),
                Arg::buffer_mut(&mut sum),
            ],
        )
        .unwrap()
    };
    let got = y.to_vec::<f32>().unwrap();
    let mut total = 0.0f64;
    for i in 0..n {
        let want = (xr[i] * 1.5 + -0.25) * (1.0 + (i % 4) as f32);
        assert!((got[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "y[{i}] = {} != {want}", got[i]);
        total += got[i] as f64;
    }
    let s = sum.to_vec::<f64>().unwrap();
    assert!((s[0] - total).abs() <= 1e-9 * total.abs().max(1.0), "sum {} != {total}", s[0]);
    // A copy is a new buffer with the same elements.
    assert_eq!(kernel::copy(&y).unwrap().to_vec::<f32>().unwrap(), got);
    assert_ne!(kernel::device_ptr(&y).unwrap(), kernel::device_ptr(&kernel::copy(&y).unwrap()).unwrap());
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_launches_are_errors_naming_the_kernel() {
    let dev = Device::Cuda(0);
    let k = SRC.load("affine", dev).unwrap();
    // Without the driver's parameter report the argument checks cannot run (and the launches
    // below would not be refused): this test needs a CUDA 12.4+ driver.
    assert_eq!(k.param_sizes(), Some(&[8, 8, 12, 8, 8, 8][..]), "driver older than CUDA 12.4?");
    let x = Tensor::zeros([4], DType::BF16, dev).unwrap();
    let host = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
    let kernel_err = |r: vit_tensor::Result<()>| match r {
        Err(Error::Kernel { kernel, msg }) => {
            assert_eq!(kernel, "test_custom.cu:affine");
            msg
        }
        other => panic!("expected a kernel error, got {other:?}"),
    };
    // SAFETY (all below): each launch is refused before anything runs.
    let msg = kernel_err(unsafe { k.launch(Launch::linear(1, 32), &[Arg::tensor(&x)]) });
    assert!(msg.contains("6 parameters") && msg.contains("1 arguments"), "{msg}");
    let buf = DeviceBuffer::zeros(dev, 8).unwrap();
    let args =
        |c: Arg<'static>| [Arg::tensor(&x), Arg::tensor(&x), c, Arg::slice(&[0u8; 16]), Arg::i64(4), Arg::buffer(&buf)];
    let msg = kernel_err(unsafe { k.launch(Launch::linear(1, 32), &args(Arg::f32(1.0))) });
    assert!(msg.contains("argument 2 is 4 bytes") && msg.contains("12 bytes"), "{msg}");
    let mut wrong = args(Arg::pod(&Coefs { scale: 1.0, shift: 0.0, unused: 0 }));
    wrong[0] = Arg::tensor(&host);
    let msg = kernel_err(unsafe { k.launch(Launch::linear(1, 32), &wrong) });
    assert!(msg.contains("argument 0 is on cpu"), "{msg}");
    let msg = kernel_err(unsafe { k.launch(Launch::linear(0, 32), &args(Arg::f32(1.0))) });
    assert!(msg.contains("at least 1"), "{msg}");
    let mut past_end = args(Arg::pod(&Coefs { scale: 1.0, shift: 0.0, unused: 0 }));
    past_end[5] = Arg::buffer_at(&buf, 9);
    let msg = kernel_err(unsafe { k.launch(Launch::linear(1, 32), &past_end) });
    assert!(msg.contains("offset 9 beyond the buffer's 8 bytes"), "{msg}");
    let e = SRC.load("no_such_kernel", dev).unwrap_err();
    assert!(matches!(&e, Error::Kernel { kernel, .. } if kernel == "test_custom.cu:no_such_kernel"), "{e}");
    assert!(matches!(buf.to_vec::<[u8; 3]>(), Err(Error::Value { .. })));
}

/// No GPU needed (NVRTC only, which scripts/test.sh installs): the source above is valid.
#[test]
fn the_test_kernel_compiles_for_ci_archs() {
    assert!(vit_tensor::cuda::nvrtc_available(), "libnvrtc.so not found: run the tests with scripts/test.sh");
    let failures = SRC.ci_failures();
    assert!(failures.is_empty(), "{failures:?}");
}
