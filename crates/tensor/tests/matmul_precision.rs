//! `cpu::set_matmul_precision(Bf16)` through the public ops: the linear layer and matmul equal
//! the f32 ops on bf16-rounded inputs (up to the order of the f32 sums), products with a
//! dimension under `BF16_MIN_DIM` stay exact, and setting f32 back restores the exact bits.
//! One test, in a binary of its own, because the setting is process-wide.

use vit_tensor::{
    cpu::{self, MatmulPrecision},
    ops,
    testing::assert_close,
    DType, Device, Tensor,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
}

/// The tensor with every value rounded to bf16 (and back to f32).
fn rounded(t: &Tensor) -> Tensor {
    t.cast(DType::BF16).unwrap().cast(DType::F32).unwrap()
}

fn v(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}

#[test]
fn bf16_matmuls_round_the_inputs_of_large_products_only_and_f32_restores_the_bits() {
    eprintln!("AMX tiles: {}", cpu::amx_available());
    // A linear layer of the Fashion-MNIST recipe's shapes: [batch·tokens, 64] → 192.
    let (x, w, b) = (randn(&[3, 50, 64], 1), randn(&[192, 64], 2), randn(&[192], 3));
    let (a, bm) = (randn(&[2, 40, 96], 4), randn(&[96, 33], 5));
    // A product with k = 16 (one head's channels): below BF16_MIN_DIM.
    let (q, kt) = (randn(&[50, 16], 6), randn(&[16, 50], 7));

    cpu::set_matmul_precision(MatmulPrecision::F32);
    let exact_linear = v(&ops::linear(&x, &w, Some(&b), None, None).unwrap().y);
    let exact_matmul = v(&ops::matmul(&a, &bm).unwrap());
    let exact_small = v(&ops::matmul(&q, &kt).unwrap());
    let rounded_linear = v(&ops::linear(&rounded(&x), &rounded(&w), Some(&b), None, None).unwrap().y);
    let rounded_matmul = v(&ops::matmul(&rounded(&a), &rounded(&bm)).unwrap());

    cpu::set_matmul_precision(MatmulPrecision::Bf16);
    assert_eq!(cpu::matmul_precision(), MatmulPrecision::Bf16);
    let linear = v(&ops::linear(&x, &w, Some(&b), None, None).unwrap().y);
    let matmul = v(&ops::matmul(&a, &bm).unwrap());
    let small = v(&ops::matmul(&q, &kt).unwrap());
    // Products of bf16 values are exact in f32: only the order of the sums differs.
    assert_close("linear, bf16 inputs", &linear, &rounded_linear, 1e-5, 1e-5);
    assert_close("matmul, bf16 inputs", &matmul, &rounded_matmul, 1e-5, 1e-5);
    // And the rounding is really there: the bf16 result is not the f32 one.
    let moved = linear.iter().zip(&exact_linear).filter(|(p, q)| p != q).count();
    assert!(moved > linear.len() / 2, "only {moved} of {} outputs changed under bf16", linear.len());
    // Each input moves by up to 2⁻⁹ of itself: over k = 64 unit-normal terms the output moves
    // by about 8 · 2⁻⁸ ≈ 0.03 (one standard deviation); 0.3 is ten of them.
    assert_close("linear, bf16 vs f32", &linear, &exact_linear, 0.0, 0.3);
    assert!(small == exact_small, "a product with k = 16 must stay exact f32");

    cpu::set_matmul_precision(MatmulPrecision::F32);
    assert!(v(&ops::linear(&x, &w, Some(&b), None, None).unwrap().y) == exact_linear);
    assert!(v(&ops::matmul(&a, &bm).unwrap()) == exact_matmul);
}
