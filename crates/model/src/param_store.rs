//! Named tensors in a fixed order: a model's parameters, their gradients, an optimizer's
//! state. Names are stable and dotted and equal the checkpoint keys (`blocks.3.attn.qkv.weight`,
//! design §3); the order is the order of insertion, so two stores built the same way line up
//! index by index.

use crate::{ModelError, Result};
use std::collections::HashMap;
use vit_tensor::{ops, DType, Tensor};

/// An ordered map from parameter name to tensor.
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `tensor` under `name`; a name can be added once.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<()> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(ModelError::Param { name, msg: "added twice".into() });
        }
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push((name, tensor));
        Ok(())
    }

    /// The tensor named `name`, or an error naming it.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.index
            .get(name)
            .map(|&i| &self.entries[i].1)
            .ok_or_else(|| ModelError::Param { name: name.to_string(), msg: "not in the store".into() })
    }

    /// True if `name` is in the store.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Replaces the tensor named `name`, which must keep its shape and dtype.
    pub fn set(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let old = self.get(name)?;
        if old.dims() != tensor.dims() || old.dtype() != tensor.dtype() {
            return Err(ModelError::Param {
                name: name.to_string(),
                msg: format!("expected {:?} {}, got {:?} {}", old.dtype(), old.shape(), tensor.dtype(), tensor.shape()),
            });
        }
        let i = self.index[name];
        self.entries[i].1 = tensor;
        Ok(())
    }

    /// `store[name] += grad`: how layers accumulate parameter gradients (design §3), so
    /// micro-batches and shared weights add up.
    pub fn accumulate(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        let old = self.get(name)?;
        let sum = ops::add(old, &grad.cast(old.dtype())?)
            .map_err(|e| ModelError::Param { name: name.to_string(), msg: e.to_string() })?;
        let i = self.index[name];
        self.entries[i].1 = sum;
        Ok(())
    }

    /// A store with the same names and shapes, all zeros, in `dtype` (gradients, optimizer state).
    pub fn zeros_like(&self, dtype: DType) -> Result<Self> {
        let mut out = ParamStore::new();
        for (name, t) in &self.entries {
            out.insert(name.clone(), Tensor::zeros(t.shape().clone(), dtype, t.device())?)?;
        }
        Ok(out)
    }

    /// `(name, tensor)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of elements over all tensors.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.numel()).sum()
    }

    /// The tensor at position `i` (same order as [`ParamStore::iter`]).
    pub fn at(&self, i: usize) -> &Tensor {
        &self.entries[i].1
    }

    /// Replaces the tensor at position `i` (the optimizer's in-order update); shape and dtype must not change.
    pub fn set_at(&mut self, i: usize, tensor: Tensor) -> Result<()> {
        let name = self.entries[i].0.clone();
        self.set(&name, tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vit_tensor::Device;

    #[test]
    fn insert_get_accumulate_and_errors() {
        let mut s = ParamStore::new();
        let w = Tensor::randn([2, 3], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
        s.insert("blocks.0.attn.qkv.weight", w.clone()).unwrap();
        s.insert("norm.bias", Tensor::zeros([3], DType::F32, Device::Cpu).unwrap()).unwrap();
        assert_eq!(s.names().collect::<Vec<_>>(), ["blocks.0.attn.qkv.weight", "norm.bias"]);
        assert_eq!(s.numel(), 9);
        let e = s.insert("norm.bias", w.clone()).unwrap_err().to_string();
        assert_eq!(e, "parameter norm.bias: added twice");
        let mut g = s.zeros_like(DType::F32).unwrap();
        g.accumulate("blocks.0.attn.qkv.weight", &w).unwrap();
        g.accumulate("blocks.0.attn.qkv.weight", &w).unwrap();
        let twice: Vec<f32> = w.to_f32_vec().unwrap().iter().map(|x| 2.0 * x).collect();
        assert_eq!(g.get("blocks.0.attn.qkv.weight").unwrap().to_f32_vec().unwrap(), twice);
        let e = g.get("head.weight").unwrap_err().to_string();
        assert_eq!(e, "parameter head.weight: not in the store");
        let e = s.set("norm.bias", w).unwrap_err().to_string();
        assert!(e.contains("expected F32 [3], got F32 [2, 3]"), "{e}");
    }
}
