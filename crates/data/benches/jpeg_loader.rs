//! Decoded + augmented JPEG images per second through the `vit-data` loader.
//!
//! Writes 256 JPEGs of 256×256 (quality 90, two classes) to a temp dir, then runs one epoch
//! of batches of 32 through big_vision's ImageNet train pipeline — `inception_crop(224)`,
//! `flip_lr`, `value_range(-1, 1)` — giving `[32, 3, 224, 224]` f32 batches, with 1 and with 2
//! worker threads. Criterion reports each; the summary after it prints images/s and the
//! ratio to 1 worker measured in the same run (median of 7 interleaved epochs each), and to
//! decoding alone on one thread. A last table puts a 2 ms sleep before each file read (slow
//! storage) and compares 1, 2 and 4 workers: the overlap that prefetching buys when reading,
//! not decoding, is the bottleneck.
//!
//! `cargo bench -p vit-data --bench jpeg_loader`

use criterion::{Criterion, Throughput};
use image::{codecs::jpeg::JpegEncoder, Rgb, RgbImage};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use vit_data::{DataError, Dataset, Example, ImageFolder, Loader, LoaderConfig, Pipeline, Rng, Size, Transform};

const IMAGES: usize = 256;
const SIDE: u32 = 256;
const BATCH: usize = 32;

/// Smooth colour fields plus noise, so the files are photo-like in size (not flat colour).
fn write_images() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new().prefix("vitrs-data-jpeg-bench-").tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(2024);
    for i in 0..IMAGES {
        let class = dir.join(if i % 2 == 0 { "even" } else { "odd" });
        std::fs::create_dir_all(&class).unwrap();
        let (fx, fy, phase) = (rng.range(0.01, 0.08), rng.range(0.01, 0.08), rng.range(0.0, 6.3));
        let img = RgbImage::from_fn(SIDE, SIDE, |x, y| {
            let base = |k: f64| 127.0 + 100.0 * (fx * x as f64 + fy * y as f64 * k + phase * k).sin();
            let noise = (rng.below(41) as f64) - 20.0;
            Rgb([0.0, 1.3, 2.1].map(|k| (base(k + 0.7) + noise).clamp(0.0, 255.0) as u8))
        });
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&img).unwrap();
        std::fs::write(class.join(format!("{i:04}.jpg")), bytes).unwrap();
    }
    tmp
}

fn pipeline() -> Pipeline {
    Pipeline::new(vec![
        Transform::InceptionCrop {
            size: Some(Size::Square(224)),
            area_min: 0.08,
            area_max: 1.0,
            aspect_min: 0.75,
            aspect_max: 4.0 / 3.0,
        },
        Transform::FlipLr { p: 0.5 },
        Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 },
    ])
}

fn loader(ds: &Arc<ImageFolder>, workers: usize) -> Loader {
    let config = LoaderConfig { workers, prefetch: 4, drop_last: true, seed: 1, ..LoaderConfig::new(BATCH) };
    Loader::new(ds.clone(), pipeline(), config).unwrap()
}

/// One epoch; returns the images seen.
fn epoch(l: &Loader) -> usize {
    l.iter().map(|b| b.unwrap().images.dims()[0]).sum()
}

fn summary(ds: &Arc<ImageFolder>) {
    let bytes: u64 = (0..IMAGES).map(|i| std::fs::metadata(ds.path(i).unwrap()).unwrap().len()).sum();
    println!(
        "\n{IMAGES} JPEGs {SIDE}×{SIDE} (mean {:.1} KB), batch {BATCH}, inception_crop(224)|flip_lr|value_range(-1,1), \
         {} cores",
        bytes as f64 / IMAGES as f64 / 1024.0,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // Reference: decoding alone (read + JPEG decode, no augmentation, no batching) on this
    // thread. Rounds interleave the settings so a change in machine load hits them alike.
    let decode = || (0..IMAGES).map(|i| ds.get(i).unwrap().image.data.len()).sum::<usize>();
    let loaders = [loader(ds, 1), loader(ds, 2)];
    decode();
    loaders.iter().for_each(|l| assert_eq!(epoch(l), IMAGES));
    let mut times = vec![Vec::new(); 3];
    for _ in 0..7 {
        let t = Instant::now();
        decode();
        times[0].push(t.elapsed().as_secs_f64());
        for (k, l) in loaders.iter().enumerate() {
            let t = Instant::now();
            assert_eq!(epoch(l), IMAGES);
            times[k + 1].push(t.elapsed().as_secs_f64());
        }
    }
    let rate: Vec<f64> = times.iter_mut().map(|t| IMAGES as f64 / median(t)).collect();
    // Other work on the machine skews the ratio to 1 worker: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average (1, 5, 15 min) at the end: {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("decode only, 1 thread: {:8.1} images/s   (reference)", rate[0]);
    for (k, workers) in [1, 2].into_iter().enumerate() {
        println!(
            "loader, {workers} worker(s):  {:8.1} images/s   ratio to 1 worker {:.2}, to decode only {:.2}",
            rate[k + 1],
            rate[k + 1] / rate[1],
            rate[k + 1] / rate[0]
        );
    }
}

/// The image folder behind a fixed read latency per file (network storage, a cold disk).
struct Slow(Arc<ImageFolder>, Duration);

impl Dataset for Slow {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn num_classes(&self) -> usize {
        self.0.num_classes()
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        std::thread::sleep(self.1);
        self.0.get(index)
    }
}

/// With 2 ms of latency per file, the workers' overlap shows even when the CPUs are busy.
fn latency_summary(ds: &Arc<ImageFolder>) {
    let slow: Arc<dyn Dataset> = Arc::new(Slow(ds.clone(), Duration::from_millis(2)));
    let counts = [1, 2, 4];
    let loaders: Vec<Loader> = counts
        .iter()
        .map(|&workers| {
            let config = LoaderConfig { workers, prefetch: 4, drop_last: true, seed: 1, ..LoaderConfig::new(BATCH) };
            Loader::new(slow.clone(), pipeline(), config).unwrap()
        })
        .collect();
    let mut times = vec![Vec::new(); counts.len()];
    for _ in 0..3 {
        for (k, l) in loaders.iter().enumerate() {
            let t = Instant::now();
            assert_eq!(epoch(l), IMAGES);
            times[k].push(t.elapsed().as_secs_f64());
        }
    }
    let rate: Vec<f64> = times.iter_mut().map(|t| IMAGES as f64 / median(t)).collect();
    println!("with 2 ms read latency per file:");
    for (k, workers) in counts.iter().enumerate() {
        println!("loader, {workers} worker(s):  {:8.1} images/s   ratio to 1 worker {:.2}", rate[k], rate[k] / rate[0]);
    }
}

fn median(t: &mut [f64]) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let tmp = write_images();
    let ds = Arc::new(ImageFolder::open(tmp.path()).unwrap());
    assert_eq!(ds.len(), IMAGES);

    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut group = c.benchmark_group("jpeg_loader");
    group.throughput(Throughput::Elements(IMAGES as u64));
    for workers in [1, 2] {
        let l = loader(&ds, workers);
        group.bench_function(format!("inception_crop224_flip_value_range/{workers}_workers"), |b| b.iter(|| epoch(&l)));
    }
    group.finish();
    c.final_summary();

    // Under `cargo test --benches` (no --bench flag) the criterion pass above ran each once.
    if std::env::args().any(|a| a == "--bench") {
        summary(&ds);
        latency_summary(&ds);
    }
    drop(tmp); // removes the images
}
