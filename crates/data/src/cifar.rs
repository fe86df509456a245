//! CIFAR-10 and CIFAR-100 in their binary form. Each record is the label byte(s) — CIFAR-10:
//! one label; CIFAR-100: the coarse label then the fine label — followed by 3072 pixel bytes:
//! the 1024 red values of a 32×32 image in row-major order, then the 1024 green, then the 1024
//! blue (CHW). The reader turns them into HWC and keeps the fine label for CIFAR-100.
//!
//! Files: CIFAR-10 `cifar-10-batches-bin/data_batch_{1..5}.bin` and `test_batch.bin` (10,000
//! records each); CIFAR-100 `cifar-100-binary/train.bin` (50,000) and `test.bin` (10,000).

use crate::{DataError, InMemoryDataset};
use std::path::{Path, PathBuf};

/// Side of a CIFAR image, in pixels.
pub const CIFAR_SIDE: usize = 32;
/// Pixel bytes of one CIFAR record: 3 × 32 × 32.
pub const CIFAR_PIXELS: usize = 3 * CIFAR_SIDE * CIFAR_SIDE;

/// Which CIFAR binary layout a file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// 1 label byte (10 classes) + 3072 pixel bytes = 3073-byte records.
    Cifar10,
    /// coarse label byte (20 superclasses) + fine label byte (100 classes) + 3072 pixel bytes =
    /// 3074-byte records; the fine label is kept.
    Cifar100,
}

impl CifarKind {
    /// Label bytes before the pixels of each record.
    pub fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }

    /// Bytes of one record: labels + 3072 pixels.
    pub fn record_bytes(self) -> usize {
        self.label_bytes() + CIFAR_PIXELS
    }

    /// 10 or 100 (the fine classes).
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }

    fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "CIFAR-10: 1 label byte + 3072 pixel bytes",
            CifarKind::Cifar100 => "CIFAR-100: coarse and fine label bytes + 3072 pixel bytes",
        }
    }
}

/// Which split of a CIFAR directory to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Appends the records of one binary file to `pixels` (NHWC) and `labels`.
fn read_into(path: &Path, kind: CifarKind, pixels: &mut Vec<u8>, labels: &mut Vec<u32>) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let rec = kind.record_bytes();
    let bad = |msg: String| DataError::Format { path: path.to_path_buf(), msg };
    if bytes.is_empty() || bytes.len() % rec != 0 {
        return Err(bad(format!(
            "expected a whole, non-zero number of {rec}-byte records ({}), found {} bytes = {} records + {} stray bytes \
             (truncated, or not this CIFAR variant)",
            kind.name(),
            bytes.len(),
            bytes.len() / rec,
            bytes.len() % rec
        )));
    }
    let plane = CIFAR_SIDE * CIFAR_SIDE;
    pixels.reserve(bytes.len() / rec * CIFAR_PIXELS);
    for (r, record) in bytes.chunks_exact(rec).enumerate() {
        let label = record[kind.label_bytes() - 1];
        if label as usize >= kind.num_classes() {
            return Err(bad(format!(
                "record {r} (byte offset {}): label {label} is not below {} classes ({})",
                r * rec,
                kind.num_classes(),
                kind.name()
            )));
        }
        labels.push(u32::from(label));
        let chw = &record[kind.label_bytes()..];
        for p in 0..plane {
            pixels.extend_from_slice(&[chw[p], chw[plane + p], chw[2 * plane + p]]);
        }
    }
    Ok(())
}

/// Reads CIFAR binary files of one `kind` into one in-memory dataset of 32×32×3 images, the
/// records in file order. A file whose size is not a whole number of records, or with a
/// label out of range, is a [`DataError::Format`] naming it.
pub fn load_cifar<P: AsRef<Path>>(paths: &[P], kind: CifarKind) -> Result<InMemoryDataset, DataError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for p in paths {
        read_into(p.as_ref(), kind, &mut pixels, &mut labels)?;
    }
    InMemoryDataset::new(CIFAR_SIDE, CIFAR_SIDE, 3, pixels, labels, kind.num_classes())
}

/// CIFAR-10 from `dir` (the unpacked `cifar-10-batches-bin`): train = `data_batch_1.bin` ..
/// `data_batch_5.bin` (50,000 images), test = `test_batch.bin` (10,000).
pub fn load_cifar10(dir: impl AsRef<Path>, split: Split) -> Result<InMemoryDataset, DataError> {
    let dir = dir.as_ref();
    let files: Vec<PathBuf> = match split {
        Split::Train => (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect(),
        Split::Test => vec![dir.join("test_batch.bin")],
    };
    load_cifar(&files, CifarKind::Cifar10)
}

/// CIFAR-100 (fine labels) from `dir` (the unpacked `cifar-100-binary`): `train.bin` (50,000
/// images) or `test.bin` (10,000).
pub fn load_cifar100(dir: impl AsRef<Path>, split: Split) -> Result<InMemoryDataset, DataError> {
    let file = dir.as_ref().join(match split {
        Split::Train => "train.bin",
        Split::Test => "test.bin",
    });
    load_cifar(&[file], CifarKind::Cifar100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{testutil::TempDir, Dataset};

    /// A record whose pixel (y, x) of channel c is `(7 * r + 3 * c + y + 2 * x) % 256`.
    fn record(kind: CifarKind, r: usize, coarse: u8, fine: u8) -> Vec<u8> {
        let mut v = match kind {
            CifarKind::Cifar10 => vec![fine],
            CifarKind::Cifar100 => vec![coarse, fine],
        };
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    v.push(((7 * r + 3 * c + y + 2 * x) % 256) as u8);
                }
            }
        }
        v
    }

    #[test]
    fn reads_cifar10_and_cifar100_records_as_hwc() {
        let tmp = TempDir::new("cifar-read");
        let mut c10 = Vec::new();
        for r in 0..3 {
            c10.extend(record(CifarKind::Cifar10, r, 0, [3, 9, 0][r]));
        }
        std::fs::write(tmp.join("test_batch.bin"), &c10).unwrap();
        let ds = load_cifar10(tmp.path(), Split::Test).unwrap();
        assert_eq!((ds.len(), ds.num_classes(), ds.image_dims()), (3, 10, [32, 32, 3]));
        assert_eq!(ds.labels(), &[3, 9, 0]);
        let ex = ds.get(2).unwrap();
        // pixel (y=5, x=4) of record 2: channel c = 14 + 3c + 5 + 8
        assert_eq!(ex.image.pixel(5, 4), &[27, 30, 33]);

        let mut c100 = Vec::new();
        for r in 0..2 {
            c100.extend(record(CifarKind::Cifar100, r, 19, [99, 42][r]));
        }
        std::fs::write(tmp.join("train.bin"), &c100).unwrap();
        let ds = load_cifar100(tmp.path(), Split::Train).unwrap();
        assert_eq!((ds.len(), ds.num_classes()), (2, 100));
        assert_eq!(ds.labels(), &[99, 42], "the fine label, not the coarse one");
        assert_eq!(ds.get(1).unwrap().image.pixel(31, 31), &[(7 + 31 + 62) as u8, 103, 106]);
    }

    #[test]
    fn truncated_or_wrong_cifar_files_are_clear_errors() {
        let tmp = TempDir::new("cifar-bad");
        let mut bytes = record(CifarKind::Cifar10, 0, 0, 1);
        bytes.extend(record(CifarKind::Cifar10, 1, 0, 2));
        bytes.truncate(2 * 3073 - 5);
        let p = tmp.join("test_batch.bin");
        std::fs::write(&p, &bytes).unwrap();
        let e = load_cifar10(tmp.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("3073-byte records") && e.contains("found 6141 bytes = 1 records + 3068 stray"), "{e}");

        std::fs::write(&p, record(CifarKind::Cifar10, 0, 0, 10)).unwrap();
        let e = load_cifar10(tmp.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("record 0") && e.contains("label 10 is not below 10"), "{e}");

        std::fs::write(&p, []).unwrap();
        let e = load_cifar10(tmp.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("found 0 bytes"), "{e}");

        // Train needs data_batch_1..5: a missing one names its path.
        std::fs::write(tmp.join("data_batch_1.bin"), record(CifarKind::Cifar10, 0, 0, 1)).unwrap();
        let e = load_cifar10(tmp.path(), Split::Train).unwrap_err().to_string();
        assert!(e.contains("data_batch_2.bin"), "{e}");
    }
}
