//! Helpers shared by the model's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use vit_model::ParamStore;
use vit_tensor::{DType, Device, Tensor};

/// Every parameter of `p` replaced by normal(0, 0.5²) values (zero biases or a zero head would
/// hide gradients), each tensor from its own seed `seed + position`.
pub fn randomised(p: &ParamStore, seed: u64) -> ParamStore {
    let mut out = ParamStore::new();
    for (i, (name, t)) in p.iter().enumerate() {
        let r = Tensor::randn(t.shape().clone(), 0.0, 0.5, seed + i as u64, DType::F32, Device::Cpu).unwrap();
        out.insert(name, r).unwrap();
    }
    out
}

/// The values of `t` as f32.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}
