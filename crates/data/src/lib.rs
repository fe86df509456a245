//! `vit-data`: datasets and input pipelines.
//!
//! - Readers behind one [`Dataset`] trait (`len`, `num_classes`, `get(i) -> Example`), every
//!   example an [`Image<u8>`](Image) in HWC order plus a `u32` label:
//!   [`InMemoryDataset`] for IDX (MNIST, Fashion-MNIST; [`InMemoryDataset::from_idx`]) and
//!   CIFAR-10/100 binary batches ([`load_cifar10`], [`load_cifar100`]), decoded once;
//!   [`ImageFolder`] for JPEG/PNG files in class subfolders, decoded on `get`.
//!   ([`load_idx_dataset`] still gives a whole IDX split as `[N, 1, 28, 28]` tensors.)
//! - [`bundled`]: the Fashion-MNIST subset of the repository's `data/` embedded in the binary
//!   ([`InMemoryDataset::from_bundled`]; configs say `data.path = "bundled:fashion-mnist-small"`).
//! - Augmentation: [`Transform`]s (inception crop, random crop with padding, flip, resize,
//!   value range, normalisation, grey → RGB, RandAugment, random erasing) composed into a [`Pipeline`] that serde reads
//!   from a TOML list, random ops drawing from a seeded [`Rng`].
//! - [`Loader`]: worker threads decode and augment, a bounded window prefetches, and batches
//!   `{ images: [B, C, H, W] f32, labels: [B] i32 }` come out in an order fixed by the seed,
//!   the epoch and the step, whatever the thread count; [`Loader::iter_from`] resumes at a
//!   step without decoding the ones before.
//!
//! Malformed or truncated input is a [`DataError`] naming the file and what was expected.

pub mod augment;
pub mod bundled;
pub mod cifar;
mod dataset;
pub mod erasing;
mod error;
pub mod faults;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod mixup;
pub mod randaug;
#[cfg(test)]
mod testutil;

pub use augment::{Pipeline, Rng, Size, Transform};
pub use bundled::{bundled_name, BUNDLED_NAMES, BUNDLED_PREFIX};
pub use cifar::{load_cifar, load_cifar10, load_cifar100, CifarKind, Split};
pub use dataset::{Dataset, Example, Image, InMemoryDataset};
pub use error::DataError;
pub use folder::{decode_image, ImageFolder};
pub use idx::{load_idx_dataset, read_idx, read_idx_bytes, IdxArray, IdxDataset};
pub use loader::{BadExample, Batch, Batches, Loader, LoaderConfig, OnBadExample};
