//! `vit-model`: the Vision Transformer model zoo of vitrs.
//!
//! This crate describes and builds Vision Transformers at every scale, from Ti/16 to
//! ViT-22B, on top of `vit-tensor`:
//!
//! - [`ModelConfig`]: the shape and layout of a model (width, depth, pooling, position
//!   embedding, sequential or parallel block, biases, QK-norm, ...), read from and written
//!   to TOML, built from named presets ([`ModelConfig::preset`]) and adjusted by
//!   command-line overrides ([`ModelConfig::set`]). Field names are the same everywhere.
//! - [`ParamCounts`] / [`ParamBreakdown`]: exact parameter counts from a config, without
//!   allocating anything, in three conventions (all parameters, Scaling-ViT "encoder
//!   only", ViT-22B block matmul weights).
//! - [`layers`]: patch and position embedding, sequential and parallel (ViT-22B) blocks with
//!   optional QK-norm, class-token / GAP / MAP pooling, each with a forward that fills a
//!   `*Saved` struct and a hand-written backward that accumulates parameter gradients
//!   (llm.c style).
//! - [`VisionTransformer`]: the model assembled from a [`ModelConfig`] (ViT, Scaling ViT and
//!   ViT-22B variants), with per-block activation checkpointing (`remat`) and parameters
//!   held in a [`ParamStore`] under stable dotted names (timm's).
//! - [`checkpoint`]: parameters, optimizer state, step and config in one safetensors file;
//!   [`import::timm`]: timm state dicts to vitrs parameters (`vit convert --from timm`).
//! - [`ModelError`]: one error type; messages name the field, the value and what was
//!   expected. Nothing here panics on user input.
//!
//! - [`TensorParallelViT`]: the same model with its blocks split over a `model` mesh axis
//!   (ViT-22B's tensor parallelism with collective matmuls), parameters split by
//!   [`ShardSpec`]s.
//! - [`MoeConfig`] and [`layers::MoeMlp`]: V-MoE's sparse mixture-of-experts MLPs with
//!   noisy top-k routing in groups, Batch Priority Routing and the auxiliary losses.
//!
//! ```
//! use vit_model::{ModelConfig, ParamCounts};
//!
//! let mut cfg = ModelConfig::preset("ViT-B/16")?;
//! cfg.set("pool=gap")?;
//! cfg.validate()?;
//! let counts = ParamCounts::of(&cfg)?;
//! assert_eq!(counts.encoder, 85_797_120); // Scaling ViT Table 2: 85.797M
//! # Ok::<(), vit_model::ModelError>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
mod expert_parallel;
mod flops;
pub mod import;
pub mod layers;
pub mod model;
pub mod moe_config;
pub mod params;
pub mod sharding;
pub mod stages;
pub mod tensor_parallel;

pub use checkpoint::{load_checkpoint, load_params_into, save_checkpoint, Checkpoint};
pub use config::{BlockKind, Gelu, ModelConfig, Pool, PosEmb, KEYS};
pub use error::{ModelError, Result};
pub use model::{ForwardSaved, MoeBlockStats, VisionTransformer};
pub use moe_config::{MoeConfig, MOE_KEYS};
pub use params::{ParamBreakdown, ParamCounts};
pub use sharding::{ShardPlan, ShardSpec};
pub use stages::{StageSaved, StagedModel, TpStages};
pub use tensor_parallel::{ModelAxis, TensorParallelViT, TpForwardSaved};
pub use vit_tensor::{ParamDiff, ParamStore};
