//! An image-folder dataset (torchvision's `ImageFolder` layout): one subfolder of `root` per
//! class, class names sorted (byte order) to give indices 0, 1, …, and in each the class's
//! JPEG and PNG files (`.jpg`, `.jpeg`, `.png`, any case). Files are listed when the dataset is
//! opened and read and decoded on [`Dataset::get`], always as 8-bit RGB.

use crate::{DataError, Dataset, Example, Image};
use image::ImageFormat;
use std::path::{Path, PathBuf};

/// A lazily decoded dataset of image files in class subfolders. Subfolders whose name starts
/// with `.` are skipped, as are other files (a `README`, a `.txt`) and nested folders.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    /// `(path, class index)`, classes in order, files sorted by name within each.
    files: Vec<(PathBuf, u32)>,
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["jpg", "jpeg", "png"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io { path: dir.to_path_buf(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        out.push(entry.map_err(io)?.path());
    }
    out.sort();
    Ok(out)
}

impl ImageFolder {
    /// Lists `root`'s class folders and their images. A missing `root` is [`DataError::Io`]; a
    /// `root` without class folders, or a class folder without images, is [`DataError::Format`]
    /// naming the folder.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, DataError> {
        let root = root.as_ref().to_path_buf();
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for dir in sorted_entries(&root)? {
            let name = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned);
            let Some(name) = name.filter(|n| !n.starts_with('.') && dir.is_dir()) else { continue };
            let images: Vec<PathBuf> =
                sorted_entries(&dir)?.into_iter().filter(|p| p.is_file() && is_image_file(p)).collect();
            if images.is_empty() {
                return Err(DataError::Format {
                    path: dir,
                    msg: format!("class folder {name:?} holds no images (expected .jpg, .jpeg or .png files)"),
                });
            }
            let label = classes.len() as u32;
            files.extend(images.into_iter().map(|p| (p, label)));
            classes.push(name);
        }
        if classes.is_empty() {
            return Err(DataError::Format {
                path: root,
                msg: "expected one subfolder of images per class, found no subfolders".into(),
            });
        }
        Ok(ImageFolder { root, classes, files })
    }

    /// The folder the dataset was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names, sorted; the label of class `classes()[i]` is `i`.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The examples whose file cannot be opened or does not start like a JPEG (`ff d8 ff`) or a
    /// PNG (`89 50 4e 47 0d 0a 1a 0a`), found by reading the first 8 bytes of every file (in
    /// parallel, `threads` at a time): the cheap scan that reports obviously wrong files before
    /// training starts. Truncated or corrupt files with a good header are found when decoded.
    pub fn check_headers(&self, threads: usize) -> Vec<crate::BadExample> {
        let threads = threads.clamp(1, 64);
        let chunk = self.files.len().div_ceil(threads).max(1);
        let mut bad: Vec<crate::BadExample> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .files
                .chunks(chunk)
                .enumerate()
                .map(|(c, files)| {
                    s.spawn(move || {
                        files
                            .iter()
                            .enumerate()
                            .filter_map(|(i, (path, _))| {
                                header_problem(path).map(|reason| crate::BadExample { index: c * chunk + i, reason })
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        bad.sort_by_key(|b| b.index);
        bad
    }

    /// The file of example `index`, or `None` when out of range.
    pub fn path(&self, index: usize) -> Option<&Path> {
        self.files.get(index).map(|(p, _)| p.as_path())
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Reads and decodes the file (RGB, HWC u8).
    fn get(&self, index: usize) -> Result<Example, DataError> {
        let (path, label) = self.files.get(index).ok_or(DataError::Index { index, len: self.files.len() })?;
        let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        Ok(Example { image: decode_image(path, &bytes)?, label: *label })
    }
}

/// Why the file at `path` is obviously not a readable JPEG or PNG, from its first 8 bytes.
fn header_problem(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 8];
    let read = std::fs::File::open(path).and_then(|f| {
        let mut n = 0;
        let mut f = f.take(8);
        loop {
            match f.read(&mut head[n..]) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    let n = match read {
        Ok(n) => n,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let jpeg = n >= 3 && head[..3] == [0xff, 0xd8, 0xff];
    let png = n == 8 && head == [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
    if jpeg || png {
        return None;
    }
    Some(format!("{}: {}", path.display(), not_an_image(&head[..n])))
}

/// What a file that is neither a JPEG nor a PNG starts with, for the scan's and the decoder's
/// messages.
fn not_an_image(bytes: &[u8]) -> String {
    let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("expected a JPEG (ff d8 ff) or PNG (89 50 4e 47) image, file starts with [{}]", head.join(" "))
}

/// Decodes the bytes of a JPEG or PNG file (format sniffed from the content, not the name)
/// into 8-bit RGB, HWC. `path` only names the file in errors: bytes that are neither format,
/// or that do not decode (corrupt or truncated), are a [`DataError::Format`].
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<Image<u8>, DataError> {
    let bad = |msg: String| DataError::Format { path: path.to_path_buf(), msg };
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png)) => f,
        Ok(f) => return Err(bad(format!("expected a JPEG or PNG image, found {f:?}"))),
        Err(_) => return Err(bad(format!("{} ({} bytes)", not_an_image(bytes), bytes.len()))),
    };
    if format == ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        return Err(bad(format!(
            "expected a complete JPEG ending in the EOI marker ff d9, found none ({} bytes): truncated",
            bytes.len()
        )));
    }
    let decoded = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| bad(format!("expected a decodable {format:?} image (corrupt or truncated): {e}")))?;
    let rgb = decoded.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Image::new(h, w, 3, rgb.into_raw())
}

/// Whether the JPEG's end-of-image marker `ff d9` is among its last bytes (some writers pad
/// after it). The decoder fills a truncated scan with grey rather than failing, so this is
/// what catches a file cut short.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|w| w == [0xff, 0xd9])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    #[test]
    fn the_header_scan_names_files_that_are_not_images() {
        let tmp = TempDir::new("folder-headers");
        std::fs::create_dir(tmp.join("a")).unwrap();
        RgbImage::from_pixel(4, 4, Rgb([1, 2, 3])).save(tmp.join("a/0.png")).unwrap();
        RgbImage::from_pixel(4, 4, Rgb([1, 2, 3])).save(tmp.join("a/1.jpg")).unwrap();
        std::fs::write(tmp.join("a/2.jpg"), [0x12u8, 0x34, 0x56, 0x78, 9, 9, 9, 9, 9]).unwrap();
        std::fs::write(tmp.join("a/3.png"), [0x89u8, 0x50]).unwrap();
        // A good header with a truncated body passes the scan (decoding finds it).
        let good = std::fs::read(tmp.join("a/1.jpg")).unwrap();
        std::fs::write(tmp.join("a/4.jpg"), &good[..good.len() / 2]).unwrap();
        let ds = ImageFolder::open(tmp.path()).unwrap();
        for threads in [1, 3, 16] {
            let bad = ds.check_headers(threads);
            assert_eq!(bad.iter().map(|b| b.index).collect::<Vec<_>>(), [2, 3], "{bad:?}");
            assert!(
                bad[0].reason.ends_with(
                    "2.jpg: expected a JPEG (ff d8 ff) or PNG (89 50 4e 47) image, file starts with [12 34 56 78]"
                ),
                "{}",
                bad[0].reason
            );
            assert!(bad[1].reason.contains("3.png") && bad[1].reason.ends_with("starts with [89 50]"));
        }
        assert!(ds.get(4).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn reads_classes_and_decodes_jpeg_and_png() {
        let tmp = TempDir::new("folder-read");
        for class in ["dog", "cat", "ant"] {
            std::fs::create_dir(tmp.join(class)).unwrap();
        }
        // PNG is lossless: exact pixels. JPEG of a constant colour decodes within a few levels.
        let png = RgbImage::from_fn(5, 3, |x, y| Rgb([x as u8 * 40, y as u8 * 70, 200]));
        png.save(tmp.join("cat/b.png")).unwrap();
        RgbImage::from_pixel(16, 8, Rgb([200, 40, 90])).save(tmp.join("cat/a.JPG")).unwrap();
        GrayImage::from_pixel(4, 6, Luma([77])).save(tmp.join("ant/g.png")).unwrap();
        RgbImage::from_pixel(8, 8, Rgb([1, 2, 3])).save(tmp.join("dog/x.jpeg")).unwrap();
        std::fs::write(tmp.join("dog/notes.txt"), "not an image").unwrap();
        std::fs::write(tmp.join("README"), "ignored").unwrap();
        std::fs::create_dir(tmp.join(".cache")).unwrap();

        let ds = ImageFolder::open(tmp.path()).unwrap();
        assert_eq!(ds.classes(), ["ant", "cat", "dog"]);
        assert_eq!((ds.len(), ds.num_classes()), (4, 3));
        let labels: Vec<u32> = (0..4).map(|i| ds.get(i).unwrap().label).collect();
        assert_eq!(labels, [0, 1, 1, 2]);
        assert!(ds.path(1).unwrap().ends_with("cat/a.JPG") && ds.path(4).is_none());

        let grey = ds.get(0).unwrap().image;
        assert_eq!(grey.dims(), [6, 4, 3]);
        assert!(grey.data.iter().all(|&v| v == 77), "grey PNG becomes 3 equal channels");
        let jpg = ds.get(1).unwrap().image;
        assert_eq!(jpg.dims(), [8, 16, 3]);
        for px in jpg.data.chunks(3) {
            assert!(px.iter().zip([200, 40, 90]).all(|(&a, b)| (a as i32 - b).abs() <= 4), "{px:?}");
        }
        let p = ds.get(2).unwrap().image;
        assert_eq!(p.dims(), [3, 5, 3]);
        assert_eq!(p.pixel(2, 4), &[160, 140, 200]);
        assert!(matches!(ds.get(4), Err(DataError::Index { index: 4, len: 4 })));
    }

    #[test]
    fn empty_folders_and_corrupt_files_are_clear_errors() {
        let tmp = TempDir::new("folder-bad");
        let e = ImageFolder::open(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(&tmp.path().display().to_string()) && e.contains("found no subfolders"), "{e}");

        std::fs::create_dir(tmp.join("a")).unwrap();
        std::fs::create_dir(tmp.join("b")).unwrap();
        RgbImage::from_pixel(8, 8, Rgb([9, 9, 9])).save(tmp.join("a/0.png")).unwrap();
        std::fs::write(tmp.join("b/x.txt"), "no images here").unwrap();
        let e = ImageFolder::open(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("class folder \"b\" holds no images") && e.contains(&tmp.join("b").display().to_string()),
            "{e}"
        );

        let e = ImageFolder::open(tmp.join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");

        // Corrupt: not an image at all; a JPEG cut in half; a PNG with a damaged body.
        let mut jpeg = Vec::new();
        RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8 * 4, y as u8 * 4, 7]))
            .write_to(&mut std::io::Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        let mut png = Vec::new();
        RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 7]))
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        assert!(decode_image(Path::new("ok.jpg"), &jpeg).is_ok() && decode_image(Path::new("ok.png"), &png).is_ok());
        let e = decode_image(Path::new("/d/text.jpg"), b"hello, world").unwrap_err().to_string();
        assert!(e.starts_with("/d/text.jpg: expected a JPEG") && e.contains("68 65 6c 6c"), "{e}");
        let e = decode_image(Path::new("/d/half.jpg"), &jpeg[..jpeg.len() / 2]).unwrap_err().to_string();
        assert!(e.starts_with("/d/half.jpg:") && e.contains("truncated"), "{e}");
        // Cut inside the entropy-coded scan: the decoder alone would fill the rest with grey.
        let e = decode_image(Path::new("/d/cut.jpg"), &jpeg[..jpeg.len() - 40]).unwrap_err().to_string();
        assert!(e.contains("expected a complete JPEG ending in the EOI marker ff d9"), "{e}");
        let mut broken = png.clone();
        let n = broken.len();
        broken[n / 2..n - 20].iter_mut().for_each(|b| *b = 0x5a);
        let e = decode_image(Path::new("/d/broken.png"), &broken).unwrap_err().to_string();
        assert!(e.starts_with("/d/broken.png: expected a decodable Png image"), "{e}");
        let e = decode_image(Path::new("/d/cut.png"), &png[..png.len() / 2]).unwrap_err().to_string();
        assert!(e.starts_with("/d/cut.png: expected a decodable Png image"), "{e}");

        // Through the dataset: the error names the file.
        std::fs::write(tmp.join("b/bad.jpg"), &jpeg[..100]).unwrap();
        let ds = ImageFolder::open(tmp.path()).unwrap();
        let e = ds.get(1).unwrap_err().to_string();
        assert!(e.contains(&tmp.join("b/bad.jpg").display().to_string()), "{e}");
    }
}
