//! The IDX format (LeCun's MNIST files): a big-endian header — two zero bytes, a type code
//! (0x08 = u8), the number of dimensions — then each dimension as a big-endian u32, then the
//! elements. Files ending in `.gz` are gunzipped on the fly.

use crate::DataError;
use flate2::read::GzDecoder;
use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
};
use vit_tensor::{DType, Device, Tensor};

/// A u8 array read from an IDX file: `dims` (e.g. `[count, rows, cols]`) and the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes (type 0x08), gzipped if the name ends in `.gz`.
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray, DataError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    decode_idx(path, std::io::BufReader::new(file))
}

/// Decodes an IDX file held in memory (e.g. embedded with `include_bytes!`), gzipped if `name`
/// ends in `.gz`; `name` only labels errors.
pub fn read_idx_bytes(name: impl AsRef<Path>, bytes: &[u8]) -> Result<IdxArray, DataError> {
    decode_idx(name.as_ref(), bytes)
}

/// Reads all of `reader` (gunzipped if `path` ends in `.gz`) and parses it as IDX.
fn decode_idx(path: &Path, mut reader: impl Read) -> Result<IdxArray, DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let mut bytes = Vec::new();
    if path.extension().is_some_and(|e| e == "gz") {
        GzDecoder::new(reader).read_to_end(&mut bytes).map_err(io)?;
    } else {
        reader.read_to_end(&mut bytes).map_err(io)?;
    }
    parse_idx(path, bytes)
}

fn parse_idx(path: &Path, mut bytes: Vec<u8>) -> Result<IdxArray, DataError> {
    let bad = |msg: String| DataError::Format { path: path.to_path_buf(), msg };
    if bytes.len() < 4 {
        return Err(bad(format!("expected an IDX header of at least 4 bytes, found {} bytes", bytes.len())));
    }
    let (zero, kind, rank) = (&bytes[..2], bytes[2], bytes[3] as usize);
    if zero != [0, 0] || kind != 0x08 {
        return Err(bad(format!(
            "expected IDX magic 00 00 08 (unsigned bytes), found {:02x} {:02x} {kind:02x}",
            bytes[0], bytes[1]
        )));
    }
    let header = 4 + 4 * rank;
    if rank == 0 || bytes.len() < header {
        return Err(bad(format!("expected {rank} dimension sizes after the magic, file has {} bytes", bytes.len())));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let count: usize = dims.iter().product();
    if bytes.len() - header != count {
        return Err(bad(format!(
            "header says {dims:?} = {count} bytes of data, found {} (truncated or corrupt)",
            bytes.len() - header
        )));
    }
    bytes.drain(..header);
    Ok(IdxArray { dims, data: bytes })
}

/// Images and labels of one split.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    /// `[count, 1, rows, cols]` f32 in [-1, 1] (reference §2: ViT inputs are in [-1, 1]).
    pub images: Tensor,
    /// `[count]` I32 class labels.
    pub labels: Tensor,
}

/// Reads and checks the image (`[count, rows, cols]`) and label (`[count]`) files of one split.
pub(crate) fn read_idx_pair(dir: &Path, prefix: &str) -> Result<(IdxArray, IdxArray), DataError> {
    let find = |stem: String| -> Result<PathBuf, DataError> {
        let gz = dir.join(format!("{stem}.gz"));
        let raw = dir.join(&stem);
        if gz.exists() {
            Ok(gz)
        } else if raw.exists() {
            Ok(raw)
        } else {
            Err(DataError::Io {
                path: raw,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (nor .gz)"),
            })
        }
    };
    let ipath = find(format!("{prefix}-images-idx3-ubyte"))?;
    let lpath = find(format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_idx(&ipath)?;
    let labels = read_idx(&lpath)?;
    check_idx_pair(ipath, images, lpath, labels)
}

/// Checks that `images` (read from `ipath`) are `[count, rows, cols]` and `labels` (from
/// `lpath`) are `[count]`, and returns them.
pub(crate) fn check_idx_pair(
    ipath: PathBuf,
    images: IdxArray,
    lpath: PathBuf,
    labels: IdxArray,
) -> Result<(IdxArray, IdxArray), DataError> {
    if images.dims.len() != 3 {
        return Err(DataError::Format {
            path: ipath,
            msg: format!("expected image dims [count, rows, cols], found {:?}", images.dims),
        });
    }
    if labels.dims.len() != 1 || labels.dims[0] != images.dims[0] {
        return Err(DataError::Format {
            path: lpath,
            msg: format!("expected labels [{}] to match the images, found {:?}", images.dims[0], labels.dims),
        });
    }
    Ok((images, labels))
}

/// Loads `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` from `dir`
/// (`prefix` is `train` or `t10k`), keeping the first `limit` examples if given.
/// For augmentation and the batch loader use [`InMemoryDataset::from_idx`](crate::InMemoryDataset::from_idx).
pub fn load_idx_dataset(dir: impl AsRef<Path>, prefix: &str, limit: Option<usize>) -> Result<IdxDataset, DataError> {
    let (images, labels) = read_idx_pair(dir.as_ref(), prefix)?;
    let n = limit.map_or(images.dims[0], |l| l.min(images.dims[0]));
    let (rows, cols) = (images.dims[1], images.dims[2]);
    let pixels = images.data[..n * rows * cols].iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    let labels = labels.data[..n].iter().map(|&l| l as i32).collect();
    Ok(IdxDataset {
        images: Tensor::from_f32(pixels, [n, 1, rows, cols], DType::F32, Device::Cpu)?,
        labels: Tensor::from_vec(labels, [n], Device::Cpu)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's Fashion-MNIST subset (`data/fashion-mnist-small`, IDX gz).
    fn bundled_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-small")
    }

    /// The bytes after the 8-byte header of a gzipped IDX label file, gunzipped here by hand.
    fn raw_labels(path: &Path) -> Vec<u8> {
        let mut bytes = Vec::new();
        GzDecoder::new(File::open(path).unwrap()).read_to_end(&mut bytes).unwrap();
        assert_eq!(&bytes[..4], &[0, 0, 8, 1], "{}: label magic", path.display());
        bytes.split_off(8)
    }

    #[test]
    fn reads_the_real_fashion_mnist_files() {
        // The first labels of upstream Fashion-MNIST (the subset keeps the first images of
        // each split), checked against the files' own bytes too.
        let dir = bundled_dir();
        for (split, n, first) in
            [("train", 10_000, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]), ("t10k", 2_000, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])]
        {
            let raw = raw_labels(&dir.join(format!("{split}-labels-idx1-ubyte.gz")));
            assert_eq!(raw.len(), n);
            assert_eq!(raw[..10], first.map(|l| l as u8));
            let some = load_idx_dataset(&dir, split, Some(10)).unwrap();
            assert_eq!(some.images.dims(), &[10, 1, 28, 28]);
            assert_eq!(some.labels.to_vec::<i32>().unwrap(), first);
            let all = load_idx_dataset(&dir, split, None).unwrap();
            assert_eq!(all.images.dims(), &[n, 1, 28, 28]);
            let labels = all.labels.to_vec::<i32>().unwrap();
            assert!(labels.iter().zip(&raw).all(|(&l, &r)| l == r as i32), "{split}: labels differ from the file");
            let px = some.images.to_f32_vec().unwrap();
            assert!(px.iter().all(|p| (-1.0..=1.0).contains(p)) && px.iter().any(|&p| p > 0.5));
        }
    }

    #[test]
    fn malformed_and_truncated_files_are_clear_errors() {
        let p = Path::new("x.idx");
        let e = parse_idx(p, vec![0, 0, 8]).unwrap_err().to_string();
        assert!(e.contains("at least 4 bytes") && e.contains("found 3"), "{e}");
        let e = parse_idx(p, vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 0]).unwrap_err().to_string();
        assert!(e.contains("magic") && e.contains("0d"), "{e}");
        let e = parse_idx(p, vec![0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("[2, 3] = 6 bytes") && e.contains("found 3"), "{e}");
        let ok = parse_idx(p, vec![0, 0, 8, 1, 0, 0, 0, 2, 7, 9]).unwrap();
        assert_eq!(ok, IdxArray { dims: vec![2], data: vec![7, 9] });
        let e = read_idx("/nonexistent/file.gz").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/file.gz"), "{e}");
        let e = load_idx_dataset(bundled_dir(), "valid", None).unwrap_err().to_string();
        assert!(e.contains("valid-images-idx3-ubyte"), "{e}");
    }
}
