//! `vitrs`: Vision Transformers at every scale, in Rust. This root crate re-exports the
//! workspace's crates so one dependency brings them all; each can also be used alone.

pub use vit_collective as collective;
pub use vit_data as data;
pub use vit_model as model;
pub use vit_optim as optim;
pub use vit_tensor as tensor;
