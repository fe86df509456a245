//! GPU tests of the layout ops (permute, slice, concat, pad) against the CPU: exact copies.

use vit_tensor::{ops, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

#[test]
#[ignore = "needs a CUDA device"]
fn layout_ops_on_cuda_equal_cpu_bit_for_bit() {
    for dtype in [DType::F32, DType::BF16] {
        let x = Tensor::randn([3, 197, 4, 24], 0.0, 1.0, 1, dtype, Device::Cpu).unwrap();
        let g = x.to_device(GPU).unwrap();
        let perm = [0, 2, 1, 3];
        let want = ops::permute(&x, &perm).unwrap().to_f32_vec().unwrap();
        assert_eq!(ops::permute(&g, &perm).unwrap().to_f32_vec().unwrap(), want, "permute {dtype:?}");
        let want = ops::slice(&x, 1, 1, 196).unwrap().to_f32_vec().unwrap();
        let sliced = ops::slice(&g, 1, 1, 196).unwrap();
        assert_eq!(sliced.to_f32_vec().unwrap(), want, "slice {dtype:?}");
        let a = ops::slice(&g, 3, 0, 7).unwrap();
        let b = ops::slice(&g, 3, 7, 17).unwrap();
        assert_eq!(
            ops::concat(&[&a, &b], 3).unwrap().to_f32_vec().unwrap(),
            x.to_f32_vec().unwrap(),
            "concat {dtype:?}"
        );
        let want = ops::pad_along(&ops::slice(&x, 1, 1, 196).unwrap(), x.dims(), 1, 1).unwrap().to_f32_vec().unwrap();
        assert_eq!(ops::pad_along(&sliced, x.dims(), 1, 1).unwrap().to_f32_vec().unwrap(), want, "pad {dtype:?}");
    }
}
