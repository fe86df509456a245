//! Layers with forward and hand-written backward (design §3, llm.c style). A layer is a light
//! description holding its parameters' names; `forward(&self, params, x)` returns the output
//! and what backward needs, `backward(&self, params, x, saved, dy, grads)` returns `dx` and
//! accumulates (`+=`) parameter gradients into `grads`.

pub mod block;
pub mod embed;
pub mod heads;
pub mod init;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod moe_parallel;
pub mod norm;
pub mod patch_dropout;
pub mod pool;
pub mod routing;
pub mod stem;

pub use block::{Block, BlockSaved};
pub use embed::{resample_posemb, sincos2d, EmbedSaved, Embedding};
pub use heads::{merge_heads, split_heads, HeadAttention, HeadSaved};
pub use init::{Fill, Init, Initializer, ParamSink, ShapeList};
pub use linear::Linear;
pub use mlp::{Mlp, MlpSaved};
pub use moe::{MoeMlp, MoeSaved, MoeStats};
pub use moe_parallel::{shard_experts, MoeParallelSaved};
pub use norm::{Norm, NormSaved, LAYER_NORM_EPS};
pub use pool::{MapHead, PoolSaved, Pooling};
pub use routing::GroupRoute;
pub use stem::{ConvStem, StemSaved, STEM_WINDOW};
