//! `vit-optim`: the optimizers and learning-rate schedules of the Scaling-ViT recipe
//! (reference.md §3) over the named parameters of a [`vit_tensor::ParamStore`].
//!
//! - [`Optimizer`]: the interface a trainer drives: `step(params, grads)`, `state()` /
//!   `load_state()` as named tensors for checkpoints (bit-for-bit resume), `state_bytes()`.
//! - [`OptimizerChain`]: the implementation, big_vision's chain
//!   clip → direction → × lr·lr_mult → + wd·wd_mult·θ → × schedule(t) → θ −= update, with
//!   the direction from factored Adam (big_vision `scale_by_adafactor`), AdamW or
//!   SGD-momentum ([`Algorithm`]); the formulas are in the [`optimizer`] module docs.
//! - [`ParamGroups`]: learning-rate and weight-decay multipliers and freezing by parameter
//!   name pattern (full-match regular expressions, first matching rule wins).
//! - [`optimizer_state_bytes`]: state memory from parameter shapes alone.
//! - [`Schedule`], [`adafactor_beta2`], [`clip_by_global_norm`]: the pieces.
//!
//! Parameters on a CUDA device are updated there: `OptimizerChain::step` runs the fused
//! kernels of [`cuda`] (`kernels/optim.cu`, one launch for all of a device's parameters, same
//! results as the host math bit for bit); host parameters keep the host math, the reference.
//!
//! ```
//! use vit_tensor::ParamStore;
//! use vit_optim::{Decay, Optimizer, OptimizerChain, OptimizerConfig, Schedule};
//! use vit_tensor::{DType, Device, Tensor};
//!
//! let mut params = ParamStore::new();
//! params.insert("blocks.0.mlp.fc1.weight", Tensor::randn([64, 32], 0.0, 0.02, 1, DType::F32, Device::Cpu)?)?;
//! params.insert("blocks.0.mlp.fc1.bias", Tensor::zeros([64], DType::F32, Device::Cpu)?)?;
//! let schedule = Schedule::new(Decay::Rsqrt { timescale: 10_000 }, 10, 50, 1_000)?;
//! let mut opt = OptimizerChain::new(OptimizerConfig::scaling_vit(schedule), &params)?;
//! // The kernel's second moment is factored: 64 + 32 floats instead of 64 × 32.
//! assert_eq!(opt.state()?.get("v_row.blocks.0.mlp.fc1.weight")?.dims(), &[32]);
//! assert_eq!(opt.state()?.get("v_col.blocks.0.mlp.fc1.weight")?.dims(), &[64]);
//!
//! let grads = params.zeros_like(DType::F32)?; // filled by the model's backward
//! let info = opt.step(&mut params, &grads)?;
//! assert_eq!((info.step, opt.count()), (0, 1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod clip;
pub mod cuda;
mod error;
mod factored;
mod groups;
mod memory;
pub mod optimizer;
mod schedule;

pub use clip::{clip_by_global_norm, global_norm};
pub use error::OptimError;
pub use factored::{factored_dims, factored_update, factored_update_sharded, FactoredDims, ParamShard, SumOverShards};
pub use groups::{CompiledGroups, ParamGroups, ParamSettings, SCALING_VIT_WD_MULTS};
pub use memory::{optimizer_state_bytes, optimizer_state_bytes_split};
pub use optimizer::{
    AdamWConfig, Algorithm, DeviceStep, FactoredAdamConfig, Optimizer, OptimizerChain, OptimizerConfig, SgdConfig,
    StepInfo, STATE_COUNT, STATE_M, STATE_V, STATE_V_COL, STATE_V_ROW,
};
pub use schedule::{adafactor_beta2, Decay, Schedule};
