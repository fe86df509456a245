//! `vit-optim`: the optimizers and learning-rate schedules of the Scaling-ViT recipe
//! (reference.md §3). This first part holds the schedules, the Adafactor second-moment decay
//! and global-norm clipping; the optimizers themselves build on them.

mod clip;
mod error;
mod schedule;

pub use clip::{clip_by_global_norm, global_norm};
pub use error::OptimError;
pub use schedule::{adafactor_beta2, Decay, Schedule};
