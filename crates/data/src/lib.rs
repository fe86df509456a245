//! `vit-data`: datasets and input pipelines. This first part reads the IDX format of MNIST and
//! Fashion-MNIST (raw or gzipped) into image and label tensors.

mod error;
pub mod idx;

pub use error::DataError;
pub use idx::{load_idx_dataset, read_idx, IdxArray, IdxDataset};
