//! Parameter initialisation as in big_vision: every tensor draws from its own stream, seeded
//! by the model seed and the parameter's name, so adding a layer never changes the others.
//! Layers declare their parameters into a [`ParamSink`].

use crate::{ParamStore, Result};
use vit_tensor::{DType, Device, Tensor};

/// Where and how parameters are created.
#[derive(Debug, Clone, Copy)]
pub struct Init {
    /// Model seed; each tensor's stream also depends on its name.
    pub seed: u64,
    /// Master-weight dtype (f32 per design §2).
    pub dtype: DType,
    /// Device the parameters are created on.
    pub device: Device,
}

/// How one tensor is initialised.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// All zeros (biases, the class token, the head kernel).
    Zeros,
    /// All ones (norm scales).
    Ones,
    /// One value everywhere (the head bias).
    Constant(f32),
    /// Normal(0, std²).
    Normal {
        /// Standard deviation.
        std: f32,
    },
    /// Uniform in ±sqrt(6 / (fan_in + fan_out)) (Glorot/Xavier), big_vision's Dense default.
    Xavier {
        /// Input features.
        fan_in: usize,
        /// Output features.
        fan_out: usize,
    },
    /// [`Fill::Xavier`] drawn once for one slice `dims[1..]` and repeated along the leading
    /// axis: stacked experts that all start from the same initialisation (V-MoE).
    XavierShared {
        /// Input features of one slice.
        fan_in: usize,
        /// Output features of one slice.
        fan_out: usize,
    },
    /// [`Fill::Normal`] drawn once for one slice `dims[1..]` and repeated along the leading axis.
    NormalShared {
        /// Standard deviation.
        std: f32,
    },
}

/// Where layers put their parameters: [`Initializer`] creates the tensors, [`ShapeList`] only
/// records names and shapes (so the parameters of a 22B model can be listed without memory).
pub trait ParamSink {
    /// Declares parameter `name` of shape `dims`, initialised by `fill`.
    fn add(&mut self, name: &str, dims: &[usize], fill: Fill) -> Result<()>;
}

/// Creates each parameter as [`Init`] says and collects them in a [`ParamStore`].
#[derive(Debug)]
pub struct Initializer {
    /// Seed, dtype and device of the parameters.
    pub init: Init,
    /// The parameters created so far.
    pub store: ParamStore,
}

/// Names and shapes of the parameters, in order; allocates no tensor.
#[derive(Debug, Default)]
pub struct ShapeList(pub Vec<(String, Vec<usize>)>);

impl ParamSink for Initializer {
    fn add(&mut self, name: &str, dims: &[usize], fill: Fill) -> Result<()> {
        let t = self.init.tensor(name, dims, fill)?;
        Ok(self.store.insert(name, t)?)
    }
}

impl ParamSink for ShapeList {
    fn add(&mut self, name: &str, dims: &[usize], _fill: Fill) -> Result<()> {
        self.0.push((name.to_string(), dims.to_vec()));
        Ok(())
    }
}

impl Init {
    fn stream(&self, name: &str) -> u64 {
        // FNV-1a of the name, mixed with the model seed.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        h ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// The tensor `name` with `dims` filled by `fill`.
    pub fn tensor(&self, name: &str, dims: &[usize], fill: Fill) -> Result<Tensor> {
        let seed = self.stream(name);
        Ok(match fill {
            Fill::Zeros => Tensor::zeros(dims.to_vec(), self.dtype, self.device)?,
            Fill::Ones => Tensor::full(1.0, dims.to_vec(), self.dtype, self.device)?,
            Fill::Constant(c) => Tensor::full(c, dims.to_vec(), self.dtype, self.device)?,
            Fill::Normal { std } => Tensor::randn(dims.to_vec(), 0.0, std, seed, self.dtype, self.device)?,
            Fill::Xavier { fan_in, fan_out } => {
                let limit = (6.0 / (fan_in + fan_out) as f32).sqrt();
                Tensor::rand_uniform(dims.to_vec(), -limit, limit, seed, self.dtype, self.device)?
            }
            Fill::XavierShared { fan_in, fan_out } => {
                let one = self.tensor(name, dims.get(1..).unwrap_or(&[]), Fill::Xavier { fan_in, fan_out })?;
                repeat_leading(&one, dims)?
            }
            Fill::NormalShared { std } => {
                let one = self.tensor(name, dims.get(1..).unwrap_or(&[]), Fill::Normal { std })?;
                repeat_leading(&one, dims)?
            }
        })
    }
}

/// `one` (of shape `dims[1..]`) repeated `dims[0]` times along a new leading axis.
fn repeat_leading(one: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let n = dims.first().copied().unwrap_or(1);
    Ok(vit_tensor::ops::broadcast(one, 0, n)?.reshape(dims.to_vec())?)
}
