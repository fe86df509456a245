//! The [`Dataset`] trait, the [`Image`] and [`Example`] it hands out, and [`InMemoryDataset`]
//! (the whole split decoded in memory: IDX and CIFAR).

use crate::{bundled::bundled_idx_pair, idx::read_idx_pair, DataError, IdxArray};
use std::path::Path;

/// A decoded image in row-major HWC order: the value of channel `c` of pixel (row `y`,
/// column `x`) is `data[(y * width + x) * channels + c]`.
///
/// Datasets hand out `Image<u8>` (pixel values 0..=255, the file's own scale); the
/// augmentation [`Pipeline`](crate::Pipeline) turns it into an `Image<f32>`, and the loader
/// writes that into a batch as CHW.
#[derive(Debug, Clone, PartialEq)]
pub struct Image<T = u8> {
    /// Rows, in pixels.
    pub height: usize,
    /// Columns, in pixels.
    pub width: usize,
    /// Channels: 1 (grey) or 3 (RGB) for decoded files.
    pub channels: usize,
    /// `height * width * channels` values, HWC.
    pub data: Vec<T>,
}

impl<T: Copy> Image<T> {
    /// An image of `height × width × channels` HWC values; `data.len()` must match.
    pub fn new(height: usize, width: usize, channels: usize, data: Vec<T>) -> Result<Self, DataError> {
        if height * width * channels != data.len() || channels == 0 {
            return Err(DataError::Config(format!(
                "an image of {height}×{width}×{channels} (H×W×C) needs {} values and at least one channel, got {}",
                height * width * channels,
                data.len()
            )));
        }
        Ok(Image { height, width, channels, data })
    }

    /// `[height, width, channels]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.height, self.width, self.channels]
    }

    /// The `channels` values of pixel (row `y`, column `x`).
    pub fn pixel(&self, y: usize, x: usize) -> &[T] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }

    /// The image with every value mapped by `f` (same layout).
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> Image<U> {
        Image {
            height: self.height,
            width: self.width,
            channels: self.channels,
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }
}

impl Image<u8> {
    /// The same pixels as f32 on the 0..=255 scale.
    pub fn to_f32(&self) -> Image<f32> {
        self.map(f32::from)
    }
}

impl Image<f32> {
    /// Appends the image to `out` as CHW (`channels × height × width` values): how the loader
    /// fills a batch without zeroing it first.
    pub fn extend_chw(&self, out: &mut Vec<f32>) {
        let (c, plane, start) = (self.channels, self.height * self.width, out.len());
        if c == 1 {
            return out.extend_from_slice(&self.data);
        }
        out.resize(start + c * plane, 0.0);
        let dst = &mut out[start..];
        if c == 3 {
            let (r, gb) = dst.split_at_mut(plane);
            let (g, b) = gb.split_at_mut(plane);
            for ((px, r), (g, b)) in self.data.chunks_exact(3).zip(r).zip(g.iter_mut().zip(b)) {
                (*r, *g, *b) = (px[0], px[1], px[2]);
            }
        } else {
            for (i, px) in self.data.chunks_exact(c).enumerate() {
                for (k, &v) in px.iter().enumerate() {
                    dst[k * plane + i] = v;
                }
            }
        }
    }

    /// The image as a CHW vector.
    pub fn to_chw(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.data.len());
        self.extend_chw(&mut out);
        out
    }
}

/// One example of a dataset: a decoded image and its class.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The decoded image, HWC u8 (0..=255).
    pub image: Image<u8>,
    /// The class index, in `0..num_classes()`.
    pub label: u32,
}

/// A labelled image dataset with random access. In-memory datasets copy out of their buffer
/// in `get`; lazy ones (an [`ImageFolder`](crate::ImageFolder)) read and decode the file there.
/// `get` is called from several loader threads at once, so it takes `&self`.
pub trait Dataset: Send + Sync {
    /// The number of examples.
    fn len(&self) -> usize;

    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of classes; every label is below it.
    fn num_classes(&self) -> usize;

    /// Example `index` (`0..len()`), decoded; an index out of range is [`DataError::Index`].
    fn get(&self, index: usize) -> Result<Example, DataError>;
}

/// A split held entirely in memory as u8 HWC pixels: what the IDX and CIFAR readers build.
#[derive(Debug, Clone, PartialEq)]
pub struct InMemoryDataset {
    height: usize,
    width: usize,
    channels: usize,
    num_classes: usize,
    /// `len × height × width × channels` bytes, NHWC.
    pixels: Vec<u8>,
    labels: Vec<u32>,
}

impl InMemoryDataset {
    /// A dataset of `labels.len()` images of `height × width × channels`, whose NHWC bytes are
    /// `pixels`; every label must be below `num_classes`.
    pub fn new(
        height: usize,
        width: usize,
        channels: usize,
        pixels: Vec<u8>,
        labels: Vec<u32>,
        num_classes: usize,
    ) -> Result<Self, DataError> {
        let per = height * width * channels;
        if per == 0 || pixels.len() != per * labels.len() {
            return Err(DataError::Config(format!(
                "{} images of {height}×{width}×{channels} need {} pixel bytes, got {}",
                labels.len(),
                per * labels.len(),
                pixels.len()
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= num_classes) {
            return Err(DataError::Config(format!(
                "label {l} of example {i} is not below num_classes = {num_classes}"
            )));
        }
        Ok(InMemoryDataset { height, width, channels, num_classes, pixels, labels })
    }

    /// Reads `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` from `dir`
    /// (`prefix` is `train` or `t10k`), keeping the first `limit` examples if given: greyscale
    /// images (`channels` = 1), `num_classes` = the largest label + 1 (10 for MNIST and
    /// Fashion-MNIST unless `limit` is tiny).
    pub fn from_idx(dir: impl AsRef<Path>, prefix: &str, limit: Option<usize>) -> Result<Self, DataError> {
        let (images, labels) = read_idx_pair(dir.as_ref(), prefix)?;
        Self::from_idx_arrays(images, labels, limit)
    }

    /// Split `prefix` (`train` or `t10k`) of a dataset embedded in the binary (see
    /// [`bundled`](crate::bundled): `name` is `fashion-mnist-small`), as [`from_idx`](Self::from_idx)
    /// reads it from files.
    pub fn from_bundled(name: &str, prefix: &str, limit: Option<usize>) -> Result<Self, DataError> {
        let (images, labels) = bundled_idx_pair(name, prefix)?;
        Self::from_idx_arrays(images, labels, limit)
    }

    /// The first `limit` examples (all if `None`) of checked IDX image and label arrays.
    fn from_idx_arrays(images: IdxArray, labels: IdxArray, limit: Option<usize>) -> Result<Self, DataError> {
        let n = limit.map_or(images.dims[0], |l| l.min(images.dims[0]));
        let (rows, cols) = (images.dims[1], images.dims[2]);
        let labels: Vec<u32> = labels.data[..n].iter().map(|&l| u32::from(l)).collect();
        let num_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
        let mut pixels = images.data;
        pixels.truncate(n * rows * cols);
        Self::new(rows, cols, 1, pixels, labels, num_classes)
    }

    /// `[height, width, channels]` of every image.
    pub fn image_dims(&self) -> [usize; 3] {
        [self.height, self.width, self.channels]
    }

    /// All labels, in example order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// All pixels, NHWC u8.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn get(&self, index: usize) -> Result<Example, DataError> {
        let label = *self.labels.get(index).ok_or(DataError::Index { index, len: self.labels.len() })?;
        let per = self.height * self.width * self.channels;
        let data = self.pixels[index * per..(index + 1) * per].to_vec();
        Ok(Example { image: Image { height: self.height, width: self.width, channels: self.channels, data }, label })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_layout_and_chw() {
        // 2×3 RGB image whose value encodes (y, x, c).
        let data: Vec<f32> = (0..2 * 3 * 3).map(|i| i as f32).collect();
        let img = Image::new(2, 3, 3, data).unwrap();
        assert_eq!(img.pixel(1, 2), &[15.0, 16.0, 17.0]);
        let chw = img.to_chw();
        // channel 1 plane: (y, x) -> (y*3 + x)*3 + 1
        assert_eq!(&chw[6..12], &[1.0, 4.0, 7.0, 10.0, 13.0, 16.0]);
        assert!(Image::new(2, 3, 3, vec![0u8; 17]).unwrap_err().to_string().contains("needs 18 values"));
    }

    #[test]
    fn in_memory_dataset_checks_and_gets() {
        let px: Vec<u8> = (0..2 * 4).map(|i| i as u8).collect();
        let ds = InMemoryDataset::new(2, 2, 1, px, vec![1, 0], 2).unwrap();
        assert_eq!((ds.len(), ds.num_classes()), (2, 2));
        let ex = ds.get(1).unwrap();
        assert_eq!((ex.image.data, ex.label), (vec![4, 5, 6, 7], 0));
        assert!(matches!(ds.get(2), Err(DataError::Index { index: 2, len: 2 })));
        let e = InMemoryDataset::new(2, 2, 1, vec![0; 8], vec![0, 5], 3).unwrap_err().to_string();
        assert!(e.contains("label 5 of example 1"), "{e}");
        let e = InMemoryDataset::new(2, 2, 1, vec![0; 7], vec![0, 1], 3).unwrap_err().to_string();
        assert!(e.contains("need 8 pixel bytes, got 7"), "{e}");
    }

    #[test]
    fn idx_as_a_dataset_matches_the_tensor_loader() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-small");
        let ds = InMemoryDataset::from_idx(&dir, "train", Some(64)).unwrap();
        assert_eq!((ds.len(), ds.num_classes(), ds.image_dims()), (64, 10, [28, 28, 1]));
        let labels: Vec<u32> = (0..10).map(|i| ds.get(i).unwrap().label).collect();
        assert_eq!(labels, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
        let t = crate::load_idx_dataset(&dir, "train", Some(64)).unwrap();
        let want = t.images.narrow(3, 1).unwrap().to_f32_vec().unwrap();
        let got: Vec<f32> = ds.get(3).unwrap().image.data.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
        assert_eq!(got, want);
    }
}
