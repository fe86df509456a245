//! The batch loader: decodes and augments examples on worker threads, prefetching batches in
//! a bounded window, and yields them in a deterministic order.
//!
//! Everything about a batch is a pure function of `(config, step)`:
//! - epoch `e = config.epoch + step / steps_per_epoch`, and the batch's place in it;
//! - the epoch's order: a permutation of the dataset drawn from `(seed, e)` (or the identity
//!   without `shuffle`); batch `k` of an epoch is positions `k·B .. (k+1)·B` of it;
//! - each example's augmentation draws from [`Rng::for_example`]`(seed, e, index)`.
//!
//! So the worker count changes only the speed, and [`Loader::iter_from`] resumes at any
//! step without decoding the steps before it: a resumed run sees bit-for-bit the batches
//! that the uninterrupted run would have.

use crate::{DataError, Dataset, Pipeline, Rng};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, VecDeque},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
};
use vit_tensor::{DType, Device, Tensor};

fn yes() -> bool {
    true
}
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
fn default_prefetch() -> usize {
    2
}

/// How a [`Loader`] batches a dataset. Deserialisable from a config table; every field but
/// `batch_size` has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    /// Examples per batch (≥ 1).
    pub batch_size: usize,
    /// Draw a fresh permutation of the dataset for every epoch (default true); otherwise
    /// dataset order.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Seed of the permutations and of every example's augmentation (default 0).
    #[serde(default)]
    pub seed: u64,
    /// The epoch that step 0 starts (default 0); it picks the permutation and augmentation.
    #[serde(default)]
    pub epoch: u64,
    /// Go on forever: after epoch `e` comes `e + 1`, freshly shuffled (default false: one
    /// pass over `epoch`).
    #[serde(default)]
    pub repeat: bool,
    /// Drop each epoch's last batch when it would be short (default false: keep it, with
    /// `len % batch_size` examples).
    #[serde(default)]
    pub drop_last: bool,
    /// Decoding threads (default: the machine's cores); 0 makes every batch on the calling
    /// thread. Does not change the batches.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Batches that may be in progress or ready ahead of the consumer (default 2; at least
    /// `workers` are allowed so that no worker idles).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// What an example that cannot be read, decoded or augmented does (default `fail`).
    #[serde(default)]
    pub on_bad_example: OnBadExample,
    /// Which part of every batch this loader makes (default: all of it). A data-parallel rank
    /// reads only its own rows of each global batch; the rows, their order, augmentation and
    /// bad-example replacement are those of the whole batch.
    #[serde(default)]
    pub shard: Shard,
}

/// Part `index` of `count` equal-as-possible parts of every batch: of a batch of `b` rows, rows
/// `index·b/count .. (index+1)·b/count` (rank `index` of a data-parallel group of `count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    /// This part, in `0..count`.
    pub index: usize,
    /// Parts per batch (≥ 1).
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl Shard {
    /// The rows of a batch of `rows` rows that this part holds.
    pub fn rows(&self, rows: usize) -> std::ops::Range<usize> {
        self.index * rows / self.count..(self.index + 1) * rows / self.count
    }
}

/// What the loader does with an example that fails to read, decode, carry a valid label or
/// go through the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadExample {
    /// The batch is an error naming the example (and its file).
    #[default]
    Fail,
    /// The example is replaced by the next good one in dataset order (wrapping around), so the
    /// batches stay the same on every run and resume; the batch lists what it skipped
    /// ([`Batch::bad`]).
    Skip,
}

/// An example the loader skipped in [`OnBadExample::Skip`] mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadExample {
    /// Its dataset index.
    pub index: usize,
    /// Why: the error, which names the file where there is one.
    pub reason: String,
}

impl LoaderConfig {
    /// The defaults with `batch_size`: shuffled, seed 0, epoch 0, one pass, short last batch
    /// kept, one worker per core, prefetch 2.
    pub fn new(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            seed: 0,
            epoch: 0,
            repeat: false,
            drop_last: false,
            workers: default_workers(),
            prefetch: default_prefetch(),
            on_bad_example: OnBadExample::Fail,
            shard: Shard::default(),
        }
    }
}

/// One batch, on the CPU.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, C, H, W]` F32: the pipeline's outputs, CHW.
    pub images: Tensor,
    /// `[B]` I32 class labels.
    pub labels: Tensor,
    /// The step: 0 is the first batch of `config.epoch`.
    pub step: u64,
    /// The epoch the batch belongs to.
    pub epoch: u64,
    /// The dataset index of each example, in batch order (a replacement's index where a bad
    /// example was skipped).
    pub indices: Vec<usize>,
    /// The bad examples skipped while making this batch ([`OnBadExample::Skip`]), in order.
    pub bad: Vec<BadExample>,
}

/// A batch before its tensors are made: what workers send.
struct RawBatch {
    step: u64,
    epoch: u64,
    indices: Vec<usize>,
    /// `[C, H, W]` of every example.
    chw: [usize; 3],
    images: Vec<f32>,
    labels: Vec<i32>,
    bad: Vec<BadExample>,
}

impl RawBatch {
    fn into_batch(self) -> Result<Batch, DataError> {
        let b = self.labels.len();
        let [c, h, w] = self.chw;
        Ok(Batch {
            images: Tensor::from_f32(self.images, [b, c, h, w], DType::F32, Device::Cpu)?,
            labels: Tensor::from_vec(self.labels, [b], Device::Cpu)?,
            step: self.step,
            epoch: self.epoch,
            indices: self.indices,
            bad: self.bad,
        })
    }
}

struct Inner {
    dataset: Arc<dyn Dataset>,
    pipeline: Pipeline,
    config: LoaderConfig,
    steps_per_epoch: u64,
    /// The permutations of the last two epochs asked for (workers may straddle a boundary).
    orders: Mutex<VecDeque<(u64, Arc<Vec<usize>>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// The order of `epoch`'s examples, or `None` for dataset order.
    fn order(&self, epoch: u64) -> Option<Arc<Vec<usize>>> {
        if !self.config.shuffle {
            return None;
        }
        let mut cache = lock(&self.orders);
        if let Some((_, o)) = cache.iter().find(|(e, _)| *e == epoch) {
            return Some(o.clone());
        }
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        Rng::new(crate::augment::mix64(self.config.seed ^ 0x7368_7566_666c_6521) ^ epoch).shuffle(&mut order);
        let order = Arc::new(order);
        if cache.len() == 2 {
            cache.pop_front();
        }
        cache.push_back((epoch, order.clone()));
        Some(order)
    }

    fn check_step(&self, step: u64) -> Result<(), DataError> {
        if !self.config.repeat && step >= self.steps_per_epoch {
            return Err(DataError::Config(format!(
                "step {step} is past the end of a one-epoch loader of {} steps",
                self.steps_per_epoch
            )));
        }
        Ok(())
    }

    /// Reads, augments and collates batch `step`.
    fn raw_batch(&self, step: u64) -> Result<RawBatch, DataError> {
        self.check_step(step)?;
        crate::faults::maybe_panic_at_step(step);
        let (bs, n) = (self.config.batch_size, self.dataset.len());
        let epoch = self.config.epoch + step / self.steps_per_epoch;
        let lo = (step % self.steps_per_epoch) as usize * bs;
        let hi = (lo + bs).min(n);
        let rows = self.config.shard.rows(hi - lo);
        let (lo, hi) = (lo + rows.start, lo + rows.end);
        let order = self.order(epoch);
        let indices: Vec<usize> = (lo..hi).map(|p| order.as_ref().map_or(p, |o| o[p])).collect();
        let mut images = Vec::new();
        let mut labels = Vec::with_capacity(indices.len());
        let mut chw = [0; 3];
        let mut bad = Vec::new();
        let mut indices = indices;
        for j in 0..indices.len() {
            let (index, ex, img) = self.good_example(indices[j], epoch, &mut bad)?;
            indices[j] = index;
            let dims = [img.channels, img.height, img.width];
            if j == 0 {
                chw = dims;
                images = Vec::with_capacity(indices.len() * img.data.len());
            } else if dims != chw {
                return Err(DataError::Example {
                    index,
                    source: Box::new(DataError::Config(format!(
                        "the pipeline made a {}×{}×{} (C×H×W) image but the batch's first was {}×{}×{}: \
                     end the pipeline with a resize or crop to one size",
                        dims[0], dims[1], dims[2], chw[0], chw[1], chw[2]
                    ))),
                });
            }
            img.extend_chw(&mut images);
            labels.push(ex.label as i32);
        }
        Ok(RawBatch { step, epoch, indices, chw, images, labels, bad })
    }

    /// Example `index` read, label-checked and augmented, as `(index, example, image)`. In
    /// [`OnBadExample::Skip`] mode a bad one is recorded in `bad` and replaced by the next good
    /// example in dataset order (its own augmentation seed), so the choice depends on the data
    /// alone; an error when every example is bad.
    fn good_example(
        &self,
        index: usize,
        epoch: u64,
        bad: &mut Vec<BadExample>,
    ) -> Result<(usize, crate::Example, crate::Image<f32>), DataError> {
        let n = self.dataset.len();
        for k in 0..n {
            let at = (index + k) % n;
            match self.example(at, epoch) {
                Ok((ex, img)) => return Ok((at, ex, img)),
                Err(e) if self.config.on_bad_example == OnBadExample::Skip => {
                    let reason = match e {
                        DataError::Example { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    bad.push(BadExample { index: at, reason });
                }
                Err(e) => return Err(e),
            }
        }
        Err(DataError::Config(format!("every one of the {n} examples is bad (on_bad_example = skip)")))
    }

    /// Example `index` read, label-checked and through the pipeline; errors name the index.
    fn example(&self, index: usize, epoch: u64) -> Result<(crate::Example, crate::Image<f32>), DataError> {
        let wrap = |e| DataError::Example { index, source: Box::new(e) };
        let ex = self.dataset.get(index).map_err(wrap)?;
        if ex.label as usize >= self.dataset.num_classes() {
            let msg = format!("label {} is not below num_classes = {}", ex.label, self.dataset.num_classes());
            return Err(wrap(DataError::Config(msg)));
        }
        let mut rng = Rng::for_example(self.config.seed, epoch, index as u64);
        let img = self.pipeline.apply(&ex.image, &mut rng).map_err(wrap)?;
        Ok((ex, img))
    }
}

/// Batches of a dataset through an augmentation pipeline (see the module docs for the order).
/// Cheap to clone; each [`iter_from`](Loader::iter_from) starts its own workers.
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("len", &self.inner.dataset.len())
            .field("pipeline", &self.inner.pipeline)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Loader {
    /// A loader of `dataset` through `pipeline`. Errors: `batch_size` 0, an empty dataset,
    /// `drop_last` with fewer examples than one batch, or invalid pipeline settings.
    pub fn new(dataset: Arc<dyn Dataset>, pipeline: Pipeline, config: LoaderConfig) -> Result<Self, DataError> {
        let (n, bs) = (dataset.len(), config.batch_size);
        if bs == 0 {
            return Err(DataError::Config("batch_size must be at least 1".into()));
        }
        if n == 0 {
            return Err(DataError::Config("the dataset has no examples".into()));
        }
        let steps = if config.drop_last { n / bs } else { n.div_ceil(bs) } as u64;
        if steps == 0 {
            return Err(DataError::Config(format!(
                "drop_last with batch_size {bs} > {n} examples leaves no batch in an epoch"
            )));
        }
        let Shard { index, count } = config.shard;
        if count == 0 || index >= count {
            return Err(DataError::Config(format!("shard {index} of {count}: expected count ≥ 1 and index below it")));
        }
        pipeline.validate()?;
        Ok(Loader {
            inner: Arc::new(Inner {
                dataset,
                pipeline,
                config,
                steps_per_epoch: steps,
                orders: Mutex::new(VecDeque::new()),
            }),
        })
    }

    /// Batches per epoch: `len / B` with `drop_last`, else `ceil(len / B)`.
    pub fn steps_per_epoch(&self) -> u64 {
        self.inner.steps_per_epoch
    }

    /// Steps of the whole stream: `Some(steps_per_epoch)` for one pass, `None` with `repeat`.
    pub fn num_steps(&self) -> Option<u64> {
        (!self.inner.config.repeat).then_some(self.inner.steps_per_epoch)
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.config
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.inner.dataset
    }

    /// Makes batch `step` on the calling thread (what the workers run).
    pub fn batch(&self, step: u64) -> Result<Batch, DataError> {
        self.inner.raw_batch(step)?.into_batch()
    }

    /// The stream from step 0.
    pub fn iter(&self) -> Batches {
        self.iter_from(0)
    }

    /// The stream from `step` on, equal to `iter().skip(step)` but without making the skipped
    /// batches: how a run resumes. Starts `config.workers` threads.
    pub fn iter_from(&self, step: u64) -> Batches {
        let end = self.num_steps();
        let workers = self.inner.config.workers;
        let window = self.inner.config.prefetch.max(workers).max(1) as u64;
        let shared = Arc::new(Shared {
            claims: Mutex::new(Claims { next: step, consumed: step, stop: false }),
            cv: Condvar::new(),
        });
        let (tx, rx) = mpsc::sync_channel(window as usize);
        let handles = (0..workers)
            .map(|i| {
                let (inner, shared, tx) = (self.inner.clone(), shared.clone(), tx.clone());
                std::thread::Builder::new()
                    .name(format!("vit-data-{i}"))
                    .spawn(move || worker(&inner, &shared, &tx, window, end))
                    .expect("spawning a data loader thread")
            })
            .collect();
        Batches {
            inner: self.inner.clone(),
            shared,
            rx,
            handles,
            pending: BTreeMap::new(),
            next: step,
            end,
            finished: false,
        }
    }
}

impl IntoIterator for &Loader {
    type Item = Result<Batch, DataError>;
    type IntoIter = Batches;
    fn into_iter(self) -> Batches {
        self.iter()
    }
}

/// Which steps the workers have taken and the consumer has had.
struct Claims {
    /// The next step a worker will take.
    next: u64,
    /// The next step the consumer will yield: workers take steps below `consumed + window`.
    consumed: u64,
    stop: bool,
}

struct Shared {
    claims: Mutex<Claims>,
    cv: Condvar,
}

type Made = (u64, Result<RawBatch, DataError>);

/// Batch `step`, a panic (in a dataset's `get`, say) turned into [`DataError::Worker`].
fn make(inner: &Inner, step: u64) -> Result<RawBatch, DataError> {
    catch_unwind(AssertUnwindSafe(|| inner.raw_batch(step))).unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(DataError::Worker(format!("panicked while making step {step}: {why}")))
    })
}

fn worker(inner: &Inner, shared: &Shared, tx: &mpsc::SyncSender<Made>, window: u64, end: Option<u64>) {
    loop {
        let step = {
            let mut c = lock(&shared.claims);
            loop {
                if c.stop || end.is_some_and(|e| c.next >= e) {
                    return;
                }
                if c.next < c.consumed + window {
                    c.next += 1;
                    break c.next - 1;
                }
                c = shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
        };
        let made = make(inner, step);
        // At most `window` steps are claimed and not yet consumed, so this never blocks; it
        // fails only when the consumer is gone.
        if tx.send((step, made)).is_err() {
            return;
        }
    }
}

/// The batch stream of a [`Loader`]: `Ok(batch)` in step order; after an `Err` (a bad file, a
/// failed transform, a worker panic) it ends. Dropping it stops and joins its workers.
pub struct Batches {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Made>,
    handles: Vec<JoinHandle<()>>,
    /// Batches that arrived before their turn.
    pending: BTreeMap<u64, Result<RawBatch, DataError>>,
    next: u64,
    end: Option<u64>,
    finished: bool,
}

impl Batches {
    /// The step the next batch will have.
    pub fn next_step(&self) -> u64 {
        self.next
    }

    fn finish(&mut self) {
        self.finished = true;
        lock(&self.shared.claims).stop = true;
        self.shared.cv.notify_all();
        for h in self.handles.drain(..) {
            // A worker's panics are caught inside it; a join error cannot carry anything new.
            let _ = h.join();
        }
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let step = self.next;
        if self.end.is_some_and(|e| step >= e) {
            self.finish();
            return None;
        }
        let raw = if self.handles.is_empty() {
            make(&self.inner, step)
        } else {
            loop {
                if let Some(r) = self.pending.remove(&step) {
                    break r;
                }
                match self.rx.recv() {
                    Ok((s, r)) => {
                        self.pending.insert(s, r);
                    }
                    Err(_) => break Err(DataError::Worker(format!("the workers exited before making step {step}"))),
                }
            }
        };
        self.next += 1;
        if !self.handles.is_empty() {
            lock(&self.shared.claims).consumed = self.next;
            self.shared.cv.notify_all();
        }
        let out = raw.and_then(RawBatch::into_batch);
        if out.is_err() {
            self.finish();
        }
        Some(out)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.end {
            _ if self.finished => (0, Some(0)),
            Some(e) => {
                let left = e.saturating_sub(self.next) as usize;
                (0, Some(left))
            }
            None => (usize::MAX, None),
        }
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{testutil::TempDir, Example, Image, ImageFolder, InMemoryDataset, Size, Transform};
    use image::{Rgb, RgbImage};

    /// `n` random-looking 6×5 RGB images, label `i % 3`.
    fn toy(n: usize) -> Arc<InMemoryDataset> {
        let mut r = Rng::new(99);
        let px: Vec<u8> = (0..n * 6 * 5 * 3).map(|_| r.below(256) as u8).collect();
        Arc::new(InMemoryDataset::new(6, 5, 3, px, (0..n as u32).map(|i| i % 3).collect(), 3).unwrap())
    }

    fn aug() -> Pipeline {
        Pipeline::new(vec![
            Transform::RandomCrop { size: Size::Square(4), padding: 1 },
            Transform::FlipLr { p: 0.5 },
            Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 },
        ])
    }

    fn cfg(batch_size: usize, seed: u64, workers: usize) -> LoaderConfig {
        LoaderConfig { seed, workers, ..LoaderConfig::new(batch_size) }
    }

    /// (step, epoch, indices, images, labels) of each batch.
    type Flat = Vec<(u64, u64, Vec<usize>, Vec<f32>, Vec<i32>)>;

    fn flat(it: impl Iterator<Item = Result<Batch, DataError>>) -> Flat {
        it.map(|b| {
            let b = b.unwrap();
            (b.step, b.epoch, b.indices, b.images.to_f32_vec().unwrap(), b.labels.to_vec::<i32>().unwrap())
        })
        .collect()
    }

    #[test]
    fn one_epoch_covers_every_example_once_with_the_right_shapes() {
        let ds = toy(23);
        let l = Loader::new(ds.clone(), aug(), cfg(5, 1, 2)).unwrap();
        assert_eq!((l.steps_per_epoch(), l.num_steps()), (5, Some(5)));
        let batches: Vec<Batch> = l.iter().map(Result::unwrap).collect();
        assert_eq!(batches.len(), 5);
        assert_eq!(batches[0].images.dims(), &[5, 3, 4, 4]);
        assert_eq!(batches[4].images.dims(), &[3, 3, 4, 4], "the short last batch is kept");
        assert_eq!(batches[0].labels.dtype(), DType::I32);
        let mut all: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_ne!(all, (0..23).collect::<Vec<_>>(), "shuffled");
        all.sort();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        for b in &batches {
            let labels = b.labels.to_vec::<i32>().unwrap();
            assert_eq!(labels, b.indices.iter().map(|&i| (i % 3) as i32).collect::<Vec<_>>());
            // Each example equals the pipeline applied with its own rng, laid out CHW.
            let imgs = b.images.to_f32_vec().unwrap();
            for (j, &i) in b.indices.iter().enumerate() {
                let want = aug().apply(&ds.get(i).unwrap().image, &mut Rng::for_example(1, 0, i as u64)).unwrap();
                assert_eq!(&imgs[j * 48..(j + 1) * 48], want.to_chw().as_slice());
            }
        }
        // drop_last drops the short batch; no shuffle keeps dataset order.
        let l = Loader::new(ds, aug(), LoaderConfig { drop_last: true, shuffle: false, ..cfg(5, 1, 2) }).unwrap();
        let idx: Vec<Vec<usize>> = l.iter().map(|b| b.unwrap().indices).collect();
        assert_eq!(idx, (0..4).map(|k| (5 * k..5 * k + 5).collect()).collect::<Vec<Vec<usize>>>());
    }

    #[test]
    fn same_seed_same_batches_other_seed_other_batches() {
        let ds = toy(20);
        let a = flat(Loader::new(ds.clone(), aug(), cfg(4, 7, 2)).unwrap().iter());
        let b = flat(Loader::new(ds.clone(), aug(), cfg(4, 7, 2)).unwrap().iter());
        assert_eq!(a, b);
        let c = flat(Loader::new(ds.clone(), aug(), cfg(4, 8, 2)).unwrap().iter());
        assert_ne!(a.iter().map(|x| &x.2).collect::<Vec<_>>(), c.iter().map(|x| &x.2).collect::<Vec<_>>());
        // Without shuffling the order is the same, yet the augmentation differs with the seed.
        let noshuf = |seed| {
            flat(Loader::new(ds.clone(), aug(), LoaderConfig { shuffle: false, ..cfg(4, seed, 1) }).unwrap().iter())
        };
        let (d, e) = (noshuf(7), noshuf(8));
        assert_eq!(d.iter().map(|x| &x.2).collect::<Vec<_>>(), e.iter().map(|x| &x.2).collect::<Vec<_>>());
        assert_ne!(d.iter().map(|x| &x.3).collect::<Vec<_>>(), e.iter().map(|x| &x.3).collect::<Vec<_>>());
        // And the next epoch is another permutation with other augmentations.
        let f = flat(Loader::new(ds, aug(), LoaderConfig { epoch: 1, ..cfg(4, 7, 2) }).unwrap().iter());
        assert!(f.iter().all(|x| x.1 == 1));
        assert_ne!(a.iter().map(|x| &x.2).collect::<Vec<_>>(), f.iter().map(|x| &x.2).collect::<Vec<_>>());
    }

    #[test]
    fn order_is_independent_of_worker_count_and_prefetch() {
        let ds = toy(37);
        let repeat = |workers, prefetch| LoaderConfig { repeat: true, prefetch, ..cfg(6, 3, workers) };
        let base = flat(Loader::new(ds.clone(), aug(), repeat(0, 1)).unwrap().iter().take(20));
        assert_eq!(base.len(), 20);
        assert_eq!(base.iter().map(|x| x.0).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
        for (workers, prefetch) in [(1, 1), (2, 2), (3, 1), (4, 8)] {
            let got = flat(Loader::new(ds.clone(), aug(), repeat(workers, prefetch)).unwrap().iter().take(20));
            assert!(got == base, "{workers} workers, prefetch {prefetch}");
        }
    }

    #[test]
    fn repeat_goes_through_fresh_epochs_and_resumes_bit_for_bit() {
        let ds = toy(10);
        let l = Loader::new(ds, aug(), LoaderConfig { repeat: true, drop_last: true, ..cfg(4, 5, 2) }).unwrap();
        assert_eq!((l.steps_per_epoch(), l.num_steps()), (2, None));
        let full = flat(l.iter().take(9));
        assert_eq!(full.iter().map(|x| x.1).collect::<Vec<_>>(), [0, 0, 1, 1, 2, 2, 3, 3, 4]);
        assert!(full.iter().all(|x| x.2.len() == 4));
        let epoch = |e: usize| -> Vec<usize> { full[2 * e..2 * e + 2].iter().flat_map(|x| x.2.clone()).collect() };
        assert_ne!(epoch(0), epoch(1), "each epoch is reshuffled");
        for k in [0, 1, 3, 6] {
            let resumed = flat(l.iter_from(k).take(9 - k as usize));
            assert!(resumed == full[k as usize..], "resume at {k}");
        }
        let b = l.batch(5).unwrap();
        assert_eq!((b.step, &b.indices), (5, &full[5].2));
        assert_eq!(b.images.to_f32_vec().unwrap(), full[5].3);
        // A one-pass loader resumed at its end yields nothing.
        let once = Loader::new(toy(10), aug(), cfg(4, 5, 2)).unwrap();
        assert_eq!(once.iter_from(3).count(), 0);
        assert!(once.batch(3).unwrap_err().to_string().contains("past the end"));
        assert_eq!(flat(once.iter_from(2)), flat(once.iter().skip(2)));
    }

    #[test]
    fn image_folder_through_the_loader_with_a_corrupt_file() {
        let tmp = TempDir::new("loader-folder");
        for (c, class) in ["a", "b"].iter().enumerate() {
            std::fs::create_dir(tmp.join(class)).unwrap();
            for i in 0..6 {
                let img = RgbImage::from_fn(12 + i, 10, |x, y| Rgb([(x * 20) as u8, (y * 20) as u8, (c * 100) as u8]));
                img.save(tmp.join(&format!("{class}/{i}.{}", if i % 2 == 0 { "jpg" } else { "png" }))).unwrap();
            }
        }
        let pp = Pipeline::new(vec![
            Transform::InceptionCrop {
                size: Some(Size::Square(8)),
                area_min: 0.08,
                area_max: 1.0,
                aspect_min: 0.75,
                aspect_max: 4.0 / 3.0,
            },
            Transform::FlipLr { p: 0.5 },
            Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 },
        ]);
        let folder = Arc::new(ImageFolder::open(tmp.path()).unwrap());
        let ds: Arc<dyn Dataset> = folder.clone();
        let one = flat(Loader::new(ds.clone(), pp.clone(), cfg(5, 2, 1)).unwrap().iter());
        let two = flat(Loader::new(ds.clone(), pp.clone(), cfg(5, 2, 2)).unwrap().iter());
        assert!(one == two);
        assert_eq!(one.len(), 3);
        assert!(one.iter().flat_map(|x| &x.3).all(|v| (-1.0..=1.0).contains(v)));

        // Corrupt one file: the batch holding it is an Err naming the file, then the stream ends.
        let bad = tmp.join("b/3.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
        let bad_index = (0..ds.len()).find(|&i| folder.path(i) == Some(bad.as_path())).unwrap();
        for workers in [0, 1, 2] {
            let l = Loader::new(ds.clone(), pp.clone(), LoaderConfig { repeat: true, ..cfg(5, 2, workers) }).unwrap();
            let mut it = l.iter();
            let mut seen = 0;
            let err = loop {
                match it.next().expect("the stream ends only after the error") {
                    Ok(b) => {
                        assert!(!b.indices.contains(&bad_index));
                        seen += 1;
                    }
                    Err(e) => break e,
                }
            };
            assert!(seen < 3, "the bad file is in the first epoch");
            let msg = err.to_string();
            assert!(msg.contains(&format!("example {bad_index}")) && msg.contains(&bad.display().to_string()), "{msg}");
            assert!(it.next().is_none() && it.next().is_none());
        }
    }

    /// A dataset whose example 7 panics and whose sizes differ from example 9 on.
    struct Faulty;
    impl Dataset for Faulty {
        fn len(&self) -> usize {
            12
        }
        fn num_classes(&self) -> usize {
            2
        }
        fn get(&self, index: usize) -> Result<Example, DataError> {
            assert!(index != 7, "example 7 is cursed");
            let side = if index >= 9 { 3 } else { 2 };
            Ok(Example { image: Image::new(side, side, 1, vec![index as u8; side * side])?, label: 0 })
        }
    }

    #[test]
    fn worker_panics_and_size_mismatches_are_errors_not_hangs() {
        let pp = Pipeline::default();
        for workers in [0, 2] {
            let c = LoaderConfig { shuffle: false, ..cfg(3, 0, workers) };
            let l = Loader::new(Arc::new(Faulty), pp.clone(), c).unwrap();
            let got: Vec<Result<Batch, DataError>> = l.iter().collect();
            assert_eq!(got.len(), 3, "two good batches, then the error, then the end");
            assert!(got[0].is_ok() && got[1].is_ok());
            let e = got[2].as_ref().unwrap_err().to_string();
            assert!(e.contains("panicked while making step 2") && e.contains("example 7 is cursed"), "{e}");
        }
        let c = LoaderConfig { shuffle: false, ..cfg(4, 0, 2) };
        let l = Loader::new(Arc::new(Faulty), pp, c).unwrap();
        let e = l.iter_from(2).next().unwrap().unwrap_err().to_string();
        assert!(e.contains("example 9") && e.contains("1×3×3 (C×H×W)") && e.contains("resize or crop"), "{e}");
    }

    /// Counts `get` calls.
    struct Counting(std::sync::atomic::AtomicUsize, Arc<InMemoryDataset>);
    impl Dataset for Counting {
        fn len(&self) -> usize {
            self.1.len()
        }
        fn num_classes(&self) -> usize {
            self.1.num_classes()
        }
        fn get(&self, index: usize) -> Result<Example, DataError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.1.get(index)
        }
    }

    /// Examples 3, 4 and 11 of 12 cannot be read (11 is the last: its replacement wraps to 0).
    struct Unreadable;

    impl Dataset for Unreadable {
        fn len(&self) -> usize {
            12
        }
        fn num_classes(&self) -> usize {
            2
        }
        fn get(&self, index: usize) -> Result<Example, DataError> {
            if [3, 4, 11].contains(&index) {
                return Err(DataError::Format { path: format!("img{index}.jpg").into(), msg: "corrupt".into() });
            }
            Ok(Example { image: Image::new(2, 2, 1, vec![index as u8; 4])?, label: (index % 2) as u32 })
        }
    }

    #[test]
    fn skip_mode_replaces_bad_examples_by_the_next_good_one_and_lists_them() {
        let pp = Pipeline::default();
        let skip = |workers| LoaderConfig { shuffle: false, on_bad_example: OnBadExample::Skip, ..cfg(4, 0, workers) };
        for workers in [0, 2] {
            let l = Loader::new(Arc::new(Unreadable), pp.clone(), skip(workers)).unwrap();
            let got: Vec<Batch> = l.iter().map(|b| b.unwrap()).collect();
            assert_eq!(got.len(), 3);
            assert_eq!(got[0].indices, [0, 1, 2, 5]);
            assert_eq!(got[1].indices, [5, 5, 6, 7], "4 and 3's replacements are both 5");
            assert_eq!(got[2].indices, [8, 9, 10, 0]);
            let first: Vec<usize> = got[0].bad.iter().map(|b| b.index).collect();
            assert_eq!(first, [3, 4]);
            assert_eq!(got[0].bad[0].reason, "img3.jpg: corrupt");
            assert_eq!(got[1].bad.iter().map(|b| b.index).collect::<Vec<_>>(), [4]);
            assert_eq!(got[2].bad.iter().map(|b| b.index).collect::<Vec<_>>(), [11]);
            // The images are the replacements' own.
            assert_eq!(got[0].images.to_f32_vec().unwrap()[12..], [5.0; 4]);
        }
        // Fail mode: the batch holding example 3 is the error, naming the file.
        let l = Loader::new(Arc::new(Unreadable), pp, LoaderConfig { shuffle: false, ..cfg(4, 0, 0) }).unwrap();
        let e = l.iter().next().unwrap().unwrap_err().to_string();
        assert_eq!(e, "example 3: img3.jpg: corrupt");
    }

    #[test]
    fn shards_are_the_rows_of_the_whole_batch_and_list_their_own_bad_examples() {
        // Shuffled, augmented, repeating, with skipped bad examples: 3 ranks of a batch of 6
        // (and 4 ranks, uneven parts) together make exactly the unsharded batches.
        let pp = Pipeline::new(vec![Transform::FlipLr { p: 0.5 }]);
        let base = LoaderConfig { repeat: true, on_bad_example: OnBadExample::Skip, ..cfg(6, 9, 2) };
        let whole: Vec<Batch> = Loader::new(Arc::new(Unreadable), pp.clone(), base.clone())
            .unwrap()
            .iter_from(1)
            .take(4)
            .map(|b| b.unwrap())
            .collect();
        assert!(whole.iter().any(|b| !b.bad.is_empty()), "the test must cross a bad example");
        for count in [3, 4] {
            let parts: Vec<Vec<Batch>> = (0..count)
                .map(|index| {
                    let c = LoaderConfig { shard: Shard { index, count }, ..base.clone() };
                    Loader::new(Arc::new(Unreadable), pp.clone(), c)
                        .unwrap()
                        .iter_from(1)
                        .take(4)
                        .map(|b| b.unwrap())
                        .collect()
                })
                .collect();
            for (s, w) in whole.iter().enumerate() {
                let cat = |f: &dyn Fn(&Batch) -> Vec<f32>| parts.iter().flat_map(|p| f(&p[s])).collect::<Vec<f32>>();
                assert_eq!(
                    cat(&|b| b.images.to_f32_vec().unwrap()),
                    w.images.to_f32_vec().unwrap(),
                    "step {s}, {count} parts"
                );
                assert_eq!(
                    cat(&|b| b.labels.to_vec::<i32>().unwrap().iter().map(|&l| l as f32).collect()),
                    w.labels.to_vec::<i32>().unwrap().iter().map(|&l| l as f32).collect::<Vec<_>>()
                );
                let idx: Vec<usize> = parts.iter().flat_map(|p| p[s].indices.clone()).collect();
                assert_eq!(idx, w.indices);
                let bad: Vec<BadExample> = parts.iter().flat_map(|p| p[s].bad.clone()).collect();
                assert_eq!(bad, w.bad);
                assert_eq!(parts[0][s].labels.dims()[0], 6 / count);
            }
        }
        let e = Loader::new(toy(8), aug(), LoaderConfig { shard: Shard { index: 2, count: 2 }, ..cfg(4, 0, 0) });
        assert_eq!(e.unwrap_err().to_string(), "shard 2 of 2: expected count ≥ 1 and index below it");
    }

    #[test]
    fn prefetch_is_bounded() {
        let ds = Arc::new(Counting(0.into(), toy(100)));
        let l = Loader::new(ds.clone(), aug(), LoaderConfig { repeat: true, prefetch: 3, ..cfg(2, 0, 2) }).unwrap();
        let mut it = l.iter_from(10);
        it.next().unwrap().unwrap();
        // After one batch is taken the workers may make steps 11..=13 (a window of 3): 4
        // batches of 2 in all, and no more however long they run.
        let count = || ds.0.load(std::sync::atomic::Ordering::SeqCst);
        let t = std::time::Instant::now();
        while count() < 8 && t.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(count(), 8);
        assert_eq!(it.next().unwrap().unwrap().step, 11);
    }

    #[test]
    fn bad_settings_and_early_drop() {
        let e = |c: LoaderConfig, n: usize| Loader::new(toy(n), aug(), c).unwrap_err().to_string();
        assert!(e(cfg(0, 0, 1), 4).contains("batch_size must be at least 1"));
        assert!(e(LoaderConfig { drop_last: true, ..cfg(8, 0, 1) }, 4).contains("leaves no batch"));
        let empty = Arc::new(InMemoryDataset::new(2, 2, 1, vec![], vec![], 1).unwrap());
        assert!(Loader::new(empty, aug(), cfg(1, 0, 1)).unwrap_err().to_string().contains("no examples"));
        let bad_pp = Pipeline::new(vec![Transform::FlipLr { p: 2.0 }]);
        assert!(Loader::new(toy(4), bad_pp, cfg(1, 0, 1)).is_err());
        // Dropping an infinite stream with busy workers returns promptly.
        let l = Loader::new(toy(50), aug(), LoaderConfig { repeat: true, prefetch: 4, ..cfg(2, 0, 3) }).unwrap();
        let mut it = l.iter();
        it.next().unwrap().unwrap();
        drop(it);
        // A trainer may hand the stream to another thread.
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Loader>();
        send::<Batches>();
        // Config from TOML with defaults.
        let c: LoaderConfig = toml::from_str("batch_size = 64\nseed = 3\nrepeat = true").unwrap();
        assert_eq!(c, LoaderConfig { seed: 3, repeat: true, ..LoaderConfig::new(64) });
        assert!(toml::from_str::<LoaderConfig>("batch_size = 1\nshufle = false").is_err());
    }
}
