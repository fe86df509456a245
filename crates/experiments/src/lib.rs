//! `vit-experiments`: the `vit` tool's building blocks, usable from other trainers too.

pub mod fewshot;
pub mod plan;
pub mod sweep;
mod thread_pools;
pub mod train;
