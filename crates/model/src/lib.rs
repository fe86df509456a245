//! `vit-model`: the Vision Transformer model zoo of vitrs.
//!
//! This crate describes and (later) builds Vision Transformers at every scale, from Ti/16
//! to ViT-22B, on top of `vit-tensor`. What is here now:
//!
//! - [`ModelConfig`]: the shape and layout of a model (width, depth, pooling, position
//!   embedding, sequential or parallel block, biases, QK-norm, ...), read from and written
//!   to TOML, built from named presets ([`ModelConfig::preset`]) and adjusted by
//!   command-line overrides ([`ModelConfig::set`]). Field names are the same everywhere.
//! - [`ParamCounts`] / [`ParamBreakdown`]: exact parameter counts from a config, without
//!   allocating anything, in three conventions (all parameters, Scaling-ViT "encoder
//!   only", ViT-22B block matmul weights).
//! - [`ModelError`]: one error type; messages name the field, the value and what was
//!   expected. Nothing here panics on user input.
//!
//! Still to come: layers with forward and hand-written backward (llm.c style: `forward`
//! fills a `Saved`, `backward` accumulates parameter gradients), the ViT / V-MoE / ViT-22B
//! models assembled from a [`ModelConfig`], per-block activation checkpointing, and
//! checkpoint import/export with stable dotted parameter names.
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
pub mod import;
pub mod layers;
pub mod model;
pub mod params;

pub use checkpoint::{load_checkpoint, load_params_into, save_checkpoint, Checkpoint};
pub use config::{BlockKind, Gelu, ModelConfig, Pool, PosEmb, KEYS};
pub use error::{ModelError, Result};
pub use model::{ForwardSaved, VisionTransformer};
pub use params::{ParamBreakdown, ParamCounts};
pub use vit_tensor::{ParamDiff, ParamStore};
