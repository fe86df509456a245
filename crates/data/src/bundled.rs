//! Datasets embedded in the binary: the repository's `data/fashion-mnist-small/` (the first
//! 10,000 training and 2,000 test images of Fashion-MNIST, IDX gz, 5.1 MB), so `vit train`
//! works from any folder, also after `cargo install`.
//!
//! A config addresses one as `data.path = "bundled:fashion-mnist-small"` (with
//! `data.format = "idx"`); every other path is a directory on disk. Only what a program
//! references is linked, so a binary that never loads bundled data carries none of it.

use crate::{
    idx::{check_idx_pair, read_idx_bytes},
    DataError, IdxArray,
};
use std::path::PathBuf;

/// The prefix that marks a bundled dataset in a data path: `bundled:fashion-mnist-small`.
pub const BUNDLED_PREFIX: &str = "bundled:";

/// The names of the bundled datasets (what follows [`BUNDLED_PREFIX`]).
pub const BUNDLED_NAMES: &[&str] = &["fashion-mnist-small"];

/// `(file name, gzipped IDX bytes)` of the Fashion-MNIST subset, splits `train` and `t10k`.
const FASHION_MNIST_SMALL: &[(&str, &[u8])] = &[
    ("train-images-idx3-ubyte.gz", include_bytes!("../../../data/fashion-mnist-small/train-images-idx3-ubyte.gz")),
    ("train-labels-idx1-ubyte.gz", include_bytes!("../../../data/fashion-mnist-small/train-labels-idx1-ubyte.gz")),
    ("t10k-images-idx3-ubyte.gz", include_bytes!("../../../data/fashion-mnist-small/t10k-images-idx3-ubyte.gz")),
    ("t10k-labels-idx1-ubyte.gz", include_bytes!("../../../data/fashion-mnist-small/t10k-labels-idx1-ubyte.gz")),
];

/// The dataset name when `path` is `bundled:<name>`, `None` for a path on disk. The name is
/// not checked here: loading an unknown one fails with an error that names the choices.
pub fn bundled_name(path: &str) -> Option<&str> {
    path.strip_prefix(BUNDLED_PREFIX)
}

/// The image (`[count, rows, cols]`) and label (`[count]`) arrays of split `prefix` (`train`
/// or `t10k`) of the bundled dataset `name`, checked as for files on disk.
pub(crate) fn bundled_idx_pair(name: &str, prefix: &str) -> Result<(IdxArray, IdxArray), DataError> {
    let files = match name {
        "fashion-mnist-small" => FASHION_MNIST_SMALL,
        other => {
            return Err(DataError::Config(format!(
                "{BUNDLED_PREFIX}{other}: no such bundled dataset, expected one of {}",
                BUNDLED_NAMES.iter().map(|n| format!("{BUNDLED_PREFIX}{n}")).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    let read = |kind: &str| -> Result<(PathBuf, IdxArray), DataError> {
        let file = format!("{prefix}-{kind}-ubyte.gz");
        let path = PathBuf::from(format!("{BUNDLED_PREFIX}{name}/{file}"));
        let bytes = files.iter().find(|(f, _)| *f == file).map(|(_, b)| *b).ok_or_else(|| {
            DataError::Config(format!("{BUNDLED_PREFIX}{name} has no split {prefix:?}: expected \"train\" or \"t10k\""))
        })?;
        let array = read_idx_bytes(&path, bytes)?;
        Ok((path, array))
    };
    let (ipath, images) = read("images-idx3")?;
    let (lpath, labels) = read("labels-idx1")?;
    check_idx_pair(ipath, images, lpath, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dataset, InMemoryDataset};
    use std::path::Path;

    #[test]
    fn paths_with_the_prefix_are_bundled_names() {
        assert_eq!(bundled_name("bundled:fashion-mnist-small"), Some("fashion-mnist-small"));
        assert_eq!(bundled_name("data/fashion-mnist-small"), None);
        assert_eq!(bundled_name("/bundled:x"), None);
    }

    #[test]
    fn the_bundled_splits_equal_the_files_in_data() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-small");
        for (split, n) in [("train", 10_000), ("t10k", 2_000)] {
            let embedded = InMemoryDataset::from_bundled("fashion-mnist-small", split, None).unwrap();
            assert_eq!((embedded.len(), embedded.num_classes(), embedded.image_dims()), (n, 10, [28, 28, 1]));
            let on_disk = InMemoryDataset::from_idx(&dir, split, None).unwrap();
            assert!(embedded == on_disk, "bundled {split} differs from {}", dir.display());
        }
        // The two splits are different data (a swapped file table would pass the check above
        // only if the files on disk were swapped too).
        let train = InMemoryDataset::from_bundled("fashion-mnist-small", "train", Some(2_000)).unwrap();
        let test = InMemoryDataset::from_bundled("fashion-mnist-small", "t10k", None).unwrap();
        assert_ne!(train.pixels(), test.pixels());
    }

    #[test]
    fn unknown_names_and_splits_are_clear_errors() {
        let e = InMemoryDataset::from_bundled("mnist", "train", None).unwrap_err().to_string();
        assert!(e.contains("bundled:mnist") && e.contains("bundled:fashion-mnist-small"), "{e}");
        let e = InMemoryDataset::from_bundled("fashion-mnist-small", "valid", None).unwrap_err().to_string();
        assert!(e.contains("\"valid\"") && e.contains("\"t10k\""), "{e}");
    }
}
