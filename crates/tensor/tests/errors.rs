//! Bad input is an `Err` that names the op, what was expected and what was given; never a panic.

use vit_tensor::{ops, DType, Device, Error, Tensor};

const CPU: Device = Device::Cpu;

fn t(shape: &[usize]) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, 1, DType::F32, CPU).unwrap()
}

fn msg(e: Error) -> String {
    e.to_string()
}

#[test]
fn shape_mismatches_name_op_and_shapes() {
    let m = msg(ops::matmul(&t(&[2, 4]), &t(&[3, 5])).unwrap_err());
    assert!(m.starts_with("matmul:") && m.contains("[2, 4]") && m.contains("[3, 5]"), "{m}");
    let m = msg(ops::add(&t(&[2, 3]), &t(&[3, 2])).unwrap_err());
    assert!(m.starts_with("add:") && m.contains("[2, 3]") && m.contains("[3, 2]"), "{m}");
    let m = msg(ops::bias_add(&t(&[2, 3]), &t(&[4])).unwrap_err());
    assert!(m.contains("bias of shape [3]") && m.contains("[4]"), "{m}");
    let m = msg(ops::layer_norm_fwd(&t(&[2, 3]), Some(&t(&[2])), None, 1e-6, ops::NormKind::LayerNorm).unwrap_err());
    assert!(m.contains("weight of shape [3]"), "{m}");
    let m = msg(ops::attention_fwd(&t(&[1, 2, 3, 4]), &t(&[1, 2, 3, 5]), &t(&[1, 2, 3, 5]), 1.0).unwrap_err());
    assert!(m.starts_with("attention_fwd:"), "{m}");
    let m = msg(ops::attention_fwd_packed(&t(&[2, 5, 30]), 4, 10, 2, 1.0).unwrap_err());
    assert!(m.starts_with("attention_fwd_packed:") && m.contains("[2, 5, 30]") && m.contains("offset 4"), "{m}");
    let m = msg(ops::attention_fwd_packed(&t(&[2, 5, 30]), 0, 10, 3, 1.0).unwrap_err());
    assert!(m.contains("heads 3"), "{m}");
    let m = msg(ops::patchify(&t(&[1, 3, 10, 10]), 4).unwrap_err());
    assert!(m.contains("patch size 4") && m.contains("10"), "{m}");
    let win = ops::ConvWindow { kernel: 3, stride: 2, pad: 1 };
    let m = msg(ops::im2col(&t(&[1, 3, 10]), win).unwrap_err());
    assert!(
        m.starts_with("im2col:") && m.contains("[batch, height, width, channels]") && m.contains("[1, 3, 10]"),
        "{m}"
    );
    let m = msg(ops::im2col(&t(&[1, 4, 4, 2]), ops::ConvWindow { kernel: 3, stride: 0, pad: 1 }).unwrap_err());
    assert!(m.contains("stride: 0") && m.contains("4x4"), "{m}");
    let m = msg(ops::im2col(&t(&[1, 4, 4, 2]), ops::ConvWindow { kernel: 2, stride: 1, pad: 2 }).unwrap_err());
    assert!(m.contains("pad < kernel"), "{m}");
    let m = msg(ops::im2col(&t(&[1, 2, 2, 1]), ops::ConvWindow { kernel: 5, stride: 1, pad: 1 }).unwrap_err());
    assert!(m.contains("kernel <= side + 2·pad") && m.contains("2x2"), "{m}");
    let m = msg(ops::col2im(&t(&[2, 5, 18]), 4, 4, 2, win).unwrap_err());
    assert!(m.starts_with("col2im:") && m.contains("[batch, 4, 18]") && m.contains("[2, 5, 18]"), "{m}");
    let m = msg(t(&[2, 3]).reshape([4, 2]).unwrap_err());
    assert!(m.contains("[2, 3]") && m.contains("[4, 2]"), "{m}");
    let m = msg(t(&[2, 3]).narrow(1, 2).unwrap_err());
    assert!(m.contains("1..3"), "{m}");
    let m = msg(Tensor::from_vec(vec![1.0f32; 5], [2, 3], CPU).unwrap_err());
    assert!(m.contains("6 elements") && m.contains("got 5"), "{m}");
    let m = msg(ops::sum(&t(&[2, 3]), 2).unwrap_err());
    assert!(m.contains("dim 2"), "{m}");
    let m = msg(ops::softmax_cross_entropy_fwd(&t(&[2, 3]), &t(&[2, 4])).unwrap_err());
    assert!(m.contains("[2, 3]") && m.contains("[2, 4]"), "{m}");
}

#[test]
fn dtype_and_value_errors_are_clear() {
    let ints = Tensor::from_vec(vec![1i32, 2], [2], CPU).unwrap();
    let m = msg(ops::scale(&ints, 2.0).unwrap_err());
    assert!(m.contains("scale") && m.contains("I32"), "{m}");
    let m = msg(ops::add(&t(&[2]), &t(&[2]).cast(DType::BF16).unwrap()).unwrap_err());
    assert!(m.contains("expected dtype f32") && m.contains("BF16"), "{m}");
    let m = msg(t(&[2]).to_vec::<i32>().unwrap_err());
    assert!(m.contains("to_vec") && m.contains("i32"), "{m}");
    let m = msg(ops::topk(&t(&[2, 3]), 4).unwrap_err());
    assert!(m.contains("k = 4") && m.contains("<= 3"), "{m}");
    let m = msg(ops::RowIndex::from_host(vec![0i32, 5], 3, CPU).unwrap_err());
    assert!(m.contains("index 5 at position 1") && m.contains("-1..3"), "{m}");
    let idx = Tensor::from_vec(vec![-2i32, 0], [2], CPU).unwrap();
    let m = msg(ops::RowIndex::from_tensor(idx, 3).unwrap_err());
    assert!(m.contains("index -2 at position 0"), "{m}");
    let idx = ops::RowIndex::from_host(vec![0i32, 2], 3, CPU).unwrap();
    let m = msg(ops::gather_rows(&t(&[4, 2]), &idx).unwrap_err());
    assert!(m.contains("[3, width]") && m.contains("[4, 2]"), "{m}");
    let m = msg(ops::scatter_add_rows(&t(&[3, 2]), &idx).unwrap_err());
    assert!(m.contains("[2, width]") && m.contains("[3, 2]"), "{m}");
    let m = msg(ops::layer_norm_fwd(&t(&[2, 3]), None, None, 0.0, ops::NormKind::Rms).unwrap_err());
    assert!(m.contains("eps"), "{m}");
    let labels = Tensor::from_vec(vec![0i32, 10], [2], CPU).unwrap();
    let m = msg(ops::one_hot(&labels, 10, DType::F32).unwrap_err());
    assert!(m.contains("label 10 at index 1"), "{m}");
    let m = msg(Tensor::randn([2], 0.0, -1.0, 0, DType::F32, CPU).unwrap_err());
    assert!(m.contains("std"), "{m}");
    let m = msg("gpu:0".parse::<Device>().unwrap_err());
    assert!(m.contains("gpu:0"), "{m}");
}

#[test]
fn a_missing_cuda_device_is_an_error_not_a_panic() {
    if vit_tensor::cuda::available() {
        return; // on a GPU host cuda:0 exists; ask for one past the last instead
    }
    let m = msg(t(&[2]).to_device(Device::Cuda(0)).unwrap_err());
    assert!(m.contains("cuda:0") && m.contains("0 CUDA device"), "{m}");
    let m = msg(Tensor::zeros([2], DType::F32, Device::Cuda(3)).unwrap_err());
    assert!(m.contains("cuda:3"), "{m}");
}

#[test]
fn nvrtc_version_is_an_error_not_a_panic_without_the_library() {
    // With NVRTC on the library path (scripts/test.sh) a version, else the one-line error; never a
    // panic from cudarc's loader. cargo test without scripts/test.sh takes the second branch.
    match (vit_tensor::cuda::nvrtc_available(), vit_tensor::cuda::nvrtc::version()) {
        (true, Ok((major, _))) => assert!(major >= 11, "NVRTC {major}"),
        (false, Err(e)) => assert!(e.to_string().contains("NVRTC library (libnvrtc.so) was not found"), "{e}"),
        (available, got) => panic!("nvrtc_available() = {available} but version() = {got:?}"),
    }
}

#[test]
fn bytes_round_trip_every_dtype_and_a_wrong_length_is_named() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let t = Tensor::randn([3, 5], 0.0, 1.0, 7, dtype, Device::Cpu).unwrap();
        let view = t.narrow(1, 2).unwrap(); // a view at an offset: only its elements
        let bytes = view.to_bytes().unwrap();
        assert_eq!(bytes.len(), 2 * 5 * dtype.size_in_bytes());
        let back = Tensor::from_bytes(&bytes, [2, 5], dtype, Device::Cpu).unwrap();
        assert_eq!(back.to_f32_vec().unwrap(), view.to_f32_vec().unwrap());
    }
    let i = Tensor::from_vec(vec![-3i32, 7], [2], Device::Cpu).unwrap();
    assert_eq!(
        Tensor::from_bytes(&i.to_bytes().unwrap(), [2], DType::I32, Device::Cpu).unwrap().to_vec::<i32>().unwrap(),
        [-3, 7]
    );
    let e = Tensor::from_bytes(&[0u8; 7], [2], DType::F32, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("7 bytes for a f32 tensor of shape [2]: expected 8"), "{e}");
}
