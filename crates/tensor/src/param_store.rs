//! Named tensors in a fixed order, stored llm.c style in one flat buffer per dtype and device:
//! a model's parameters, their gradients, an optimizer's state.
//!
//! Names are stable and dotted and equal the checkpoint keys (`blocks.3.attn.qkv.weight`,
//! design §3); the order is the order of insertion. Each entry is a view into its buffer at a
//! fixed element offset, so
//! - two stores built the same way line up index by index *and* element by element:
//!   [`ParamStore::zeros_like`] (gradients, optimizer state) has the same buffers, offsets and
//!   shapes in another dtype, and the optimizer walks the buffers with a small per-tensor table;
//! - the gradient all-reduce of data parallelism reduces contiguous buckets of a buffer, and
//!   ZeRO shards a buffer by slices;
//! - writes ([`ParamStore::set`], [`ParamStore::accumulate`], [`ParamStore::buffer_mut`]) go
//!   into the buffer in place. Tensors are values: a tensor handed out earlier by
//!   [`ParamStore::get`] (or a clone of the store) keeps the values it had, because a buffer
//!   still shared with such a tensor is copied before the first write (copy-on-write), once.

use crate::{ops, DType, Device, Error, Result, Shape, Tensor};
use std::{collections::HashMap, fmt, sync::OnceLock};

/// One named tensor: where its elements are in which buffer.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    /// Index into [`ParamStore::buffers`].
    buffer: usize,
    /// First element in the buffer.
    offset: usize,
    shape: Shape,
    /// The view handed out by `get`, made on first use and dropped before every write.
    view: OnceLock<Tensor>,
}

/// Where a named tensor lives in a [`ParamStore`]: buffer index, first element, element count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Index of the flat buffer ([`ParamStore::buffer`]).
    pub buffer: usize,
    /// First element of the tensor in that buffer.
    pub offset: usize,
    /// Number of elements.
    pub numel: usize,
}

/// An ordered map from name to tensor, backed by one flat 1-D buffer per (dtype, device) in
/// order of first use. Each tensor starts on a 64-byte boundary of its buffer (zeros pad the
/// gaps), like a separate allocation.
///
/// ```
/// use vit_tensor::{DType, Device, ParamStore, Tensor};
/// let mut p = ParamStore::new();
/// p.insert("head.weight", Tensor::full(1.0, [2, 3], DType::F32, Device::Cpu)?)?;
/// p.insert("head.bias", Tensor::full(2.0, [3], DType::F32, Device::Cpu)?)?;
/// assert_eq!(p.buffer(0).dims(), &[19]);                  // both in one f32 buffer,
/// assert_eq!(p.placement("head.bias")?.offset, 16);         // each on a 64-byte boundary
/// let mut g = p.zeros_like(DType::F32)?;                    // same layout
/// g.accumulate("head.bias", &Tensor::full(0.5, [3], DType::F32, Device::Cpu)?)?;
/// assert_eq!(g.buffer(0).to_f32_vec()?[16..], [0.5, 0.5, 0.5]);
/// # Ok::<(), vit_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    /// Flat 1-D buffers; `buffers[b]` holds exactly the elements of the entries placed in it.
    buffers: Vec<Tensor>,
}

/// Alignment of every tensor's first element within its buffer, in bytes.
const ALIGN_BYTES: usize = 64;

fn param_err(name: &str, msg: impl Into<String>) -> Error {
    Error::Param { name: name.to_string(), msg: msg.into() }
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store of zeros with the given `(name, shape, dtype, device)` entries in order: the
    /// same layout as inserting zero tensors one by one, but each buffer is allocated (zeroed)
    /// once, so building an optimizer's state on a GPU costs no copies.
    pub fn zeros<N: Into<String>>(specs: impl IntoIterator<Item = (N, Shape, DType, Device)>) -> Result<Self> {
        let mut store = ParamStore::new();
        let mut lens: Vec<((DType, Device), usize)> = Vec::new();
        for (name, shape, dtype, device) in specs {
            let name = name.into();
            if store.index.contains_key(&name) {
                return Err(param_err(&name, "added twice"));
            }
            let b = match lens.iter().position(|(key, _)| *key == (dtype, device)) {
                Some(b) => b,
                None => {
                    lens.push(((dtype, device), 0));
                    lens.len() - 1
                }
            };
            let len = &mut lens[b].1;
            if *len > 0 {
                *len = len.next_multiple_of((ALIGN_BYTES / dtype.size_in_bytes()).max(1));
            }
            let offset = *len;
            *len += shape.numel();
            store.index.insert(name.clone(), store.entries.len());
            store.entries.push(Entry { name, buffer: b, offset, shape, view: OnceLock::new() });
        }
        store.buffers = lens
            .iter()
            .map(|&((dtype, device), len)| Tensor::zeros([len], dtype, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(store)
    }

    /// Appends `tensor` under `name` to the buffer of its dtype and device (a new buffer for a
    /// new pair); a name can be added once. Appending copies the elements into the buffer.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<()> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(param_err(&name, "added twice"));
        }
        let (dtype, device) = (tensor.dtype(), tensor.device());
        let flat = tensor.reshape([tensor.numel()])?;
        let b = match self.buffers.iter().position(|t| t.dtype() == dtype && t.device() == device) {
            Some(b) => {
                self.drop_views(b);
                // Each tensor starts on a 64-byte boundary of its buffer (zero padding between
                // tensors), as a separate allocation would: GEMMs read weights in place.
                let len = self.buffers[b].numel();
                let pad = len.next_multiple_of((ALIGN_BYTES / dtype.size_in_bytes()).max(1)) - len;
                let mut parts = vec![Tensor::zeros([pad], dtype, device)?, flat.clone()];
                parts.retain(|t| t.numel() > 0);
                match device {
                    // Host buffers grow in place (amortised), device buffers by one copy.
                    Device::Cpu => {
                        for part in &parts {
                            self.buffers[b].extend_host(part)?;
                        }
                    }
                    Device::Cuda(_) => {
                        let mut all = vec![&self.buffers[b]];
                        all.extend(parts.iter());
                        self.buffers[b] = ops::concat(&all, 0)?;
                    }
                }
                b
            }
            None => {
                // A buffer of its own, so later writes never touch the caller's tensor.
                let mut own = Tensor::zeros([flat.numel()], dtype, device)?;
                own.write_at(0, &flat)?;
                self.buffers.push(own);
                self.buffers.len() - 1
            }
        };
        let offset = self.buffers[b].numel() - flat.numel();
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(Entry { name, buffer: b, offset, shape: tensor.shape().clone(), view: OnceLock::new() });
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i]).ok_or_else(|| param_err(name, "not in the store"))
    }

    fn view_of<'a>(&'a self, e: &'a Entry) -> &'a Tensor {
        e.view.get_or_init(|| {
            self.buffers[e.buffer]
                .narrow(e.offset, e.shape.numel())
                .and_then(|t| t.reshape(e.shape.clone()))
                .expect("entries lie inside their buffer")
        })
    }

    /// Drops the views into buffer `b`, so that it is not shared through them before a write.
    fn drop_views(&mut self, b: usize) {
        for e in self.entries.iter_mut().filter(|e| e.buffer == b) {
            e.view.take();
        }
    }

    /// The tensor named `name` (a view into its buffer), or an error naming it.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        Ok(self.view_of(self.entry(name)?))
    }

    /// True if `name` is in the store.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The position of `name` in the store's order.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Where `name`'s elements are.
    pub fn placement(&self, name: &str) -> Result<Placement> {
        let e = self.entry(name)?;
        Ok(Placement { buffer: e.buffer, offset: e.offset, numel: e.shape.numel() })
    }

    /// Overwrites the tensor named `name` with `tensor`'s values, which must have its shape and
    /// dtype (moved to the store's device if needed).
    pub fn set(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let i = *self.index.get(name).ok_or_else(|| param_err(name, "not in the store"))?;
        self.set_at(i, tensor)
    }

    /// Overwrites the tensor at position `i` (as [`ParamStore::set`]).
    pub fn set_at(&mut self, i: usize, tensor: Tensor) -> Result<()> {
        let (b, offset) = {
            let e = &self.entries[i];
            let dtype = self.buffers[e.buffer].dtype();
            if e.shape.dims() != tensor.dims() || dtype != tensor.dtype() {
                return Err(param_err(
                    &e.name,
                    format!("expected {:?} {}, got {:?} {}", dtype, e.shape, tensor.dtype(), tensor.shape()),
                ));
            }
            (e.buffer, e.offset)
        };
        self.drop_views(b);
        self.buffers[b].write_at(offset, &tensor)
    }

    /// Overwrites the tensor at position `i` with f32 `values` (rounded to nearest even for a
    /// bf16/f16 buffer), in place: the optimizer's update of host parameters and state.
    pub fn write_f32_at(&mut self, i: usize, values: &[f32]) -> Result<()> {
        let (b, offset, n) = {
            let e = &self.entries[i];
            (e.buffer, e.offset, e.shape.numel())
        };
        if values.len() != n {
            let e = &self.entries[i];
            return Err(param_err(&e.name, format!("{} values given for shape {}", values.len(), e.shape)));
        }
        self.drop_views(b);
        let buf = &mut self.buffers[b];
        if buf.device() != Device::Cpu {
            let t = Tensor::from_f32(values.to_vec(), [n], buf.dtype(), buf.device())?;
            return buf.write_at(offset, &t);
        }
        match buf.dtype() {
            DType::F32 => buf.as_mut_slice::<f32>()?[offset..offset + n].copy_from_slice(values),
            DType::BF16 => buf.as_mut_slice::<half::bf16>()?[offset..offset + n]
                .iter_mut()
                .zip(values)
                .for_each(|(d, &v)| *d = half::bf16::from_f32(v)),
            DType::F16 => buf.as_mut_slice::<half::f16>()?[offset..offset + n]
                .iter_mut()
                .zip(values)
                .for_each(|(d, &v)| *d = half::f16::from_f32(v)),
            other => {
                return Err(Error::DType { op: "write_f32_at", expected: "a float dtype".into(), got: other });
            }
        }
        Ok(())
    }

    /// `store[name] += grad`: how layers accumulate parameter gradients (design §3), so
    /// micro-batches and shared weights add up. Written into the buffer in place.
    pub fn accumulate(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        let e = self.entry(name)?;
        if e.shape.dims() != grad.dims() {
            return Err(param_err(name, format!("gradient of shape {}: expected {}", grad.shape(), e.shape)));
        }
        let (b, offset, n) = (e.buffer, e.offset, e.shape.numel());
        let old = self.view_of(e).clone();
        let dtype = old.dtype();
        let grad = grad.cast(dtype).map_err(|err| param_err(name, err.to_string()))?;
        if old.device() == Device::Cpu && dtype == DType::F32 && grad.device() == Device::Cpu {
            // In place, without a temporary: the common case of the trainer's f32 gradients.
            drop(old);
            self.drop_views(b);
            let src = grad.cpu_f32("accumulate")?;
            let dst = &mut self.buffers[b].as_mut_slice::<f32>()?[offset..offset + n];
            if n >= crate::cpu::PAR_MIN_ELEMS {
                use rayon::prelude::*;
                dst.par_iter_mut().zip(&src[..]).with_min_len(crate::cpu::PAR_MIN_ELEMS / 4).for_each(|(d, g)| *d += g);
            } else {
                dst.iter_mut().zip(&src[..]).for_each(|(d, g)| *d += g);
            }
            return Ok(());
        }
        let sum = ops::add(&old, &grad.to_device(old.device())?).map_err(|err| param_err(name, err.to_string()))?;
        drop(old);
        self.drop_views(b);
        self.buffers[b].write_at(offset, &sum)
    }

    /// The tensor `name` as a view into its buffer after the buffer has been given a storage of
    /// its own (copy-on-write) and every view handed out earlier was dropped: an op may write the
    /// view's elements in place through a raw device pointer (`ops::linear_wgrad`'s `beta = 1`
    /// GEMM), which changes the store. Drop the view before the next write to the store, or that
    /// write copies the buffer.
    pub(crate) fn view_for_write(&mut self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let (b, offset, shape) = (e.buffer, e.offset, e.shape.clone());
        self.drop_views(b);
        self.buffers[b].make_unique()?;
        self.buffers[b].narrow(offset, shape.numel())?.reshape(shape)
    }

    /// Mutable slices of the f32 CPU entries at `positions` (see [`ParamStore::position`]), in
    /// that order, all at once: an optimizer updates every parameter in place in parallel.
    /// Buffers shared with other tensors are copied first (copy-on-write). An error names an
    /// entry that is not f32 on the CPU, a position out of range, or one given twice.
    pub fn f32_slices_mut(&mut self, positions: &[usize]) -> Result<Vec<&mut [f32]>> {
        let mut wanted: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(positions.len()); // (buffer, offset, len, slot)
        for (slot, &i) in positions.iter().enumerate() {
            let e = self.entries.get(i).ok_or_else(|| Error::Value {
                op: "f32_slices_mut",
                msg: format!("position {i}: the store has {} entries", self.entries.len()),
            })?;
            let buf = &self.buffers[e.buffer];
            if buf.dtype() != DType::F32 || buf.device() != Device::Cpu {
                return Err(param_err(
                    &e.name,
                    format!("{:?} on {}: expected f32 on the CPU", buf.dtype(), buf.device()),
                ));
            }
            wanted.push((e.buffer, e.offset, e.shape.numel(), slot));
        }
        wanted.sort_unstable();
        if let Some(w) = wanted.windows(2).find(|w| w[0].0 == w[1].0 && w[0].1 + w[0].2 > w[1].1) {
            let name = &self.entries[positions[w[1].3]].name;
            return Err(param_err(name, "asked for twice"));
        }
        for b in 0..self.buffers.len() {
            if wanted.iter().any(|w| w.0 == b) {
                self.drop_views(b);
            }
        }
        let mut out: Vec<Option<&mut [f32]>> = (0..positions.len()).map(|_| None).collect();
        let mut buffers: Vec<Option<&mut [f32]>> = self
            .buffers
            .iter_mut()
            .enumerate()
            .map(|(b, t)| if wanted.iter().any(|w| w.0 == b) { t.as_mut_slice::<f32>().map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        // Cut each buffer front to back at the wanted (sorted, disjoint) ranges.
        let mut consumed = vec![0usize; buffers.len()];
        for (b, offset, len, slot) in wanted {
            let rest = buffers[b].take().expect("buffer taken above");
            let (_, from) = rest.split_at_mut(offset - consumed[b]);
            let (mine, rest) = from.split_at_mut(len);
            buffers[b] = Some(rest);
            consumed[b] = offset + len;
            out[slot] = Some(mine);
        }
        Ok(out.into_iter().map(|s| s.expect("every position filled")).collect())
    }

    /// Sets every element to zero in place, keeping names, shapes and layout: a gradient store
    /// reused step after step instead of a new [`ParamStore::zeros_like`] each step (whose
    /// buffers, larger than the allocator keeps, came back from the kernel as fresh pages to
    /// fault in: 3% of an S/16 CPU step). Each buffer is zeroed in place ([`Tensor::fill_zero`]:
    /// filled in parallel on the CPU, a memset on a GPU).
    pub fn fill_zero(&mut self) -> Result<()> {
        for b in 0..self.buffers.len() {
            self.drop_views(b);
            // In place on every device: a fresh zero buffer made while the old one is alive
            // would double the gradients' memory at the peak (e/14: +15.5 GB on a GPU).
            self.buffers[b].fill_zero()?;
        }
        Ok(())
    }

    /// A store with the same names, shapes, buffers and offsets, all zeros, in `dtype`
    /// (gradients, optimizer state).
    pub fn zeros_like(&self, dtype: DType) -> Result<Self> {
        let buffers =
            self.buffers.iter().map(|b| Tensor::zeros([b.numel()], dtype, b.device())).collect::<Result<Vec<_>>>()?;
        Ok(self.with_buffers(buffers))
    }

    /// The same layout over other buffers (each of the old one's length).
    fn with_buffers(&self, buffers: Vec<Tensor>) -> Self {
        let entries = self.entries.iter().map(|e| Entry { view: OnceLock::new(), ..e.clone() }).collect();
        ParamStore { entries, index: self.index.clone(), buffers }
    }

    /// A copy with every buffer on `device` (one transfer per buffer).
    pub fn to_device(&self, device: Device) -> Result<Self> {
        let buffers = self.buffers.iter().map(|b| b.to_device(device)).collect::<Result<Vec<_>>>()?;
        let mut out = self.with_buffers(buffers);
        out.merge_same_kind_buffers()?;
        Ok(out)
    }

    /// A copy with every float buffer cast to `dtype` (one cast per buffer): e.g. the bf16
    /// compute copy of f32 master weights.
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        let buffers = self
            .buffers
            .iter()
            .map(|b| if b.dtype().is_float() { b.cast(dtype) } else { Ok(b.clone()) })
            .collect::<Result<Vec<_>>>()?;
        let mut out = self.with_buffers(buffers);
        out.merge_same_kind_buffers()?;
        Ok(out)
    }

    /// Keeps the invariant "one buffer per (dtype, device)" after a cast or move made two
    /// buffers alike: entries move to the first buffer of their kind, in order.
    fn merge_same_kind_buffers(&mut self) -> Result<()> {
        let kinds: Vec<(DType, Device)> = self.buffers.iter().map(|b| (b.dtype(), b.device())).collect();
        let first = |k: (DType, Device)| kinds.iter().position(|&x| x == k).expect("present");
        if (0..kinds.len()).all(|b| first(kinds[b]) == b) {
            return Ok(());
        }
        let old = std::mem::take(self);
        for (name, t) in old.iter() {
            self.insert(name, t.clone())?;
        }
        Ok(())
    }

    /// The flat buffers, in order of first use.
    pub fn buffers(&self) -> &[Tensor] {
        &self.buffers
    }

    /// Flat buffer `b` (1-D).
    pub fn buffer(&self, b: usize) -> &Tensor {
        &self.buffers[b]
    }

    /// Flat buffer `b`, to be written in place (e.g. through [`Tensor::as_mut_slice`] or a
    /// kernel); its length, dtype and device must not change. Views handed out earlier keep
    /// their values (see the module docs).
    pub fn buffer_mut(&mut self, b: usize) -> &mut Tensor {
        self.drop_views(b);
        &mut self.buffers[b]
    }

    /// `(name, tensor)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|e| (e.name.as_str(), self.view_of(e)))
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of elements over all tensors (the buffers also hold the padding that
    /// aligns each tensor to 64 bytes).
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|e| e.shape.numel()).sum()
    }

    /// The tensor at position `i` (same order as [`ParamStore::iter`]).
    pub fn at(&self, i: usize) -> &Tensor {
        self.view_of(&self.entries[i])
    }
}

/// How two stores differ in names, shapes and dtypes (what a checkpoint or an optimizer state
/// must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamDiff {
    /// Expected names that are absent.
    pub missing: Vec<String>,
    /// Names present that are not expected.
    pub unexpected: Vec<String>,
    /// `(name, expected shape, found shape)`.
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// `(name, expected dtype, found dtype)`.
    pub wrong_dtype: Vec<(String, DType, DType)>,
}

impl ParamDiff {
    /// Compares `found` with `expected` by name, shape and dtype.
    pub fn between(expected: &ParamStore, found: &ParamStore) -> Self {
        Self::against(expected.iter().map(|(n, t)| (n, t.dims(), t.dtype())), found)
    }

    /// Compares `found` with a list of expected `(name, shape)`, every one of dtype `dtype`
    /// (a model's `param_shapes`, with nothing allocated), as [`ParamDiff::between`] does.
    pub fn against_shapes(expected: &[(String, Vec<usize>)], dtype: DType, found: &ParamStore) -> Self {
        Self::against(expected.iter().map(|(n, d)| (n.as_str(), d.as_slice(), dtype)), found)
    }

    fn against<'a>(expected: impl Iterator<Item = (&'a str, &'a [usize], DType)>, found: &ParamStore) -> Self {
        let mut diff = ParamDiff::default();
        let mut names = std::collections::HashSet::new();
        for (name, dims, dtype) in expected {
            names.insert(name);
            let Ok(got) = found.get(name) else {
                diff.missing.push(name.to_string());
                continue;
            };
            if dims != got.dims() {
                diff.misshaped.push((name.to_string(), dims.to_vec(), got.dims().to_vec()));
            }
            if dtype != got.dtype() {
                diff.wrong_dtype.push((name.to_string(), dtype, got.dtype()));
            }
        }
        diff.unexpected = found.names().filter(|n| !names.contains(n)).map(str::to_string).collect();
        diff
    }

    /// True when the stores match.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.misshaped.is_empty()
            && self.wrong_dtype.is_empty()
    }
}

impl fmt::Display for ParamDiff {
    /// One line, e.g. `missing 1 [head.bias]; misshaped 1 [head.weight: expected [10, 192], found [1000, 192]]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing {} [{}]", self.missing.len(), self.missing.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected {} [{}]", self.unexpected.len(), self.unexpected.join(", ")));
        }
        if !self.misshaped.is_empty() {
            let items: Vec<_> =
                self.misshaped.iter().map(|(n, e, g)| format!("{n}: expected {e:?}, found {g:?}")).collect();
            parts.push(format!("misshaped {} [{}]", items.len(), items.join(", ")));
        }
        if !self.wrong_dtype.is_empty() {
            let items: Vec<_> =
                self.wrong_dtype.iter().map(|(n, e, g)| format!("{n}: expected {e}, found {g}")).collect();
            parts.push(format!("wrong dtype {} [{}]", items.len(), items.join(", ")));
        }
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zeros_lays_out_like_inserting_zeros_one_by_one() {
        let specs = [
            ("a", Shape::new([3, 5]), DType::F32, Device::Cpu),
            ("b", Shape::new([7]), DType::BF16, Device::Cpu),
            ("c", Shape::new([2, 9]), DType::F32, Device::Cpu),
            ("d", Shape::new([0]), DType::F32, Device::Cpu),
            ("e", Shape::new([33]), DType::BF16, Device::Cpu),
        ];
        let fast = ParamStore::zeros(specs.iter().cloned()).unwrap();
        let mut slow = ParamStore::new();
        for (n, s, d, _) in &specs {
            slow.insert(*n, Tensor::zeros(s.clone(), *d, Device::Cpu).unwrap()).unwrap();
        }
        assert_eq!(fast.buffers().len(), slow.buffers().len());
        for (f, s) in fast.buffers().iter().zip(slow.buffers()) {
            assert_eq!((f.dtype(), f.dims()), (s.dtype(), s.dims()));
            assert!(f.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
        }
        for (n, _, _, _) in &specs {
            assert_eq!(fast.placement(n).unwrap(), slow.placement(n).unwrap(), "{n}");
            assert_eq!(fast.get(n).unwrap().dims(), slow.get(n).unwrap().dims());
        }
        let x = ("x", Shape::new([1]), DType::F32, Device::Cpu);
        let twice = ParamStore::zeros([x.clone(), x]);
        assert!(twice.unwrap_err().to_string().contains("added twice"));
    }

    use super::*;

    fn randn(dims: &[usize], seed: u64) -> Tensor {
        Tensor::randn(dims.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    /// `f32_slices_mut` hands out disjoint slices in the order asked (writes land on the right
    /// entries, views handed out before keep their values), and refuses a position given twice,
    /// one out of range and a non-f32 entry; `fill_zero` zeroes every buffer in place.
    #[test]
    fn f32_slices_mut_and_fill_zero() {
        let mut s = ParamStore::new();
        let (a, b, c) = (randn(&[2, 3], 1), randn(&[4], 2), randn(&[5], 3));
        s.insert("a", a.clone()).unwrap();
        s.insert("h", Tensor::zeros([2], DType::BF16, Device::Cpu).unwrap()).unwrap();
        s.insert("b", b.clone()).unwrap();
        s.insert("c", c.clone()).unwrap();
        let old_c = s.get("c").unwrap().clone(); // shares the buffer: must not see the writes
        let (pa, pb, pc) = (s.position("a").unwrap(), s.position("b").unwrap(), s.position("c").unwrap());
        {
            let slices = s.f32_slices_mut(&[pc, pa, pb]).unwrap();
            assert_eq!(slices.iter().map(|x| x.len()).collect::<Vec<_>>(), [5, 6, 4]);
            for (k, sl) in slices.into_iter().enumerate() {
                sl.iter_mut().for_each(|v| *v = k as f32 + 1.0);
            }
        }
        assert_eq!(s.get("c").unwrap().to_f32_vec().unwrap(), [1.0; 5]);
        assert_eq!(s.get("a").unwrap().to_f32_vec().unwrap(), [2.0; 6]);
        assert_eq!(s.get("b").unwrap().to_f32_vec().unwrap(), [3.0; 4]);
        assert_eq!(old_c.to_f32_vec().unwrap(), c.to_f32_vec().unwrap());
        assert_eq!(s.get("a").unwrap().as_slice::<f32>().unwrap(), [2.0; 6]);
        let err = |r: Result<Vec<&mut [f32]>>| r.map(|_| ()).unwrap_err().to_string();
        assert!(err(s.f32_slices_mut(&[pa, pa])).contains("asked for twice"));
        assert!(err(s.f32_slices_mut(&[9])).contains("position 9"));
        let ph = s.position("h").unwrap();
        assert!(err(s.f32_slices_mut(&[ph])).contains("expected f32 on the CPU"));
        assert!(s.get("h").unwrap().as_slice::<f32>().is_err());
        let a_ptr = s.buffer(0).as_slice::<f32>().unwrap().as_ptr();
        s.fill_zero().unwrap();
        for (n, t) in s.iter() {
            assert!(t.to_f32_vec().unwrap().iter().all(|&v| v == 0.0), "{n}");
        }
        assert_eq!(s.get("c").unwrap().dims(), &[5]);
        assert_eq!(s.buffer(0).as_slice::<f32>().unwrap().as_ptr(), a_ptr, "zeroed in place, not replaced");
        assert_eq!(old_c.to_f32_vec().unwrap(), c.to_f32_vec().unwrap(), "a tensor handed out before keeps its values");
    }

    /// `Tensor::fill_zero` on the CPU: in place for a unique tensor (every dtype), a fresh
    /// storage where another tensor shares it, and only the view's elements.
    #[test]
    fn tensor_fill_zero_in_place_or_fresh_when_shared() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let mut t = Tensor::randn([3, 5], 0.0, 1.0, 7, dtype, Device::Cpu).unwrap();
            t.fill_zero().unwrap();
            assert!(t.to_f32_vec().unwrap().iter().all(|&v| v == 0.0), "{dtype}");
        }
        let mut t = randn(&[40_000], 8); // above the parallel chunk size
        let p = t.as_slice::<f32>().unwrap().as_ptr();
        t.fill_zero().unwrap();
        assert!(t.as_slice::<f32>().unwrap().iter().all(|&v| v == 0.0));
        assert_eq!(t.as_slice::<f32>().unwrap().as_ptr(), p, "not in place");
        let base = randn(&[6, 3], 9);
        let want = base.to_f32_vec().unwrap();
        let mut view = base.narrow(2, 3).unwrap();
        view.fill_zero().unwrap();
        assert_eq!(view.to_f32_vec().unwrap(), [0.0; 9]);
        assert_eq!(base.to_f32_vec().unwrap(), want, "the view's base changed");
    }

    #[test]
    fn insert_get_accumulate_and_errors() {
        let mut s = ParamStore::new();
        let w = randn(&[2, 3], 1);
        s.insert("blocks.0.attn.qkv.weight", w.clone()).unwrap();
        s.insert("norm.bias", Tensor::zeros([3], DType::F32, Device::Cpu).unwrap()).unwrap();
        assert_eq!(s.names().collect::<Vec<_>>(), ["blocks.0.attn.qkv.weight", "norm.bias"]);
        assert_eq!(s.numel(), 9);
        let e = s.insert("norm.bias", w.clone()).unwrap_err().to_string();
        assert_eq!(e, "parameter norm.bias: added twice");
        let mut g = s.zeros_like(DType::F32).unwrap();
        g.accumulate("blocks.0.attn.qkv.weight", &w).unwrap();
        g.accumulate("blocks.0.attn.qkv.weight", &w).unwrap();
        let twice: Vec<f32> = w.to_f32_vec().unwrap().iter().map(|x| 2.0 * x).collect();
        assert_eq!(g.get("blocks.0.attn.qkv.weight").unwrap().to_f32_vec().unwrap(), twice);
        let e = g.get("head.weight").unwrap_err().to_string();
        assert_eq!(e, "parameter head.weight: not in the store");
        let e = s.set("norm.bias", w.clone()).unwrap_err().to_string();
        assert!(e.contains("expected F32 [3], got F32 [2, 3]"), "{e}");
        let e = g.accumulate("norm.bias", &w).unwrap_err().to_string();
        assert_eq!(e, "parameter norm.bias: gradient of shape [2, 3]: expected [3]");
    }

    #[test]
    fn one_flat_buffer_per_dtype_with_stable_offsets() {
        let mut s = ParamStore::new();
        let a = randn(&[4, 5], 2);
        let b = randn(&[7], 3).cast(DType::BF16).unwrap();
        let c = randn(&[3, 2], 4);
        s.insert("a", a.clone()).unwrap();
        s.insert("b", b.clone()).unwrap();
        s.insert("c", c.clone()).unwrap();
        assert_eq!(s.buffers().len(), 2);
        // a at 0, then c at the next 64-byte boundary (16 f32): 20 → 32, zeros between.
        assert_eq!((s.buffer(0).dtype(), s.buffer(0).dims()), (DType::F32, &[38][..]));
        assert_eq!((s.buffer(1).dtype(), s.buffer(1).dims()), (DType::BF16, &[7][..]));
        assert_eq!(s.placement("c").unwrap(), Placement { buffer: 0, offset: 32, numel: 6 });
        assert_eq!(s.placement("b").unwrap(), Placement { buffer: 1, offset: 0, numel: 7 });
        assert_eq!(s.numel(), 33);
        let flat = s.buffer(0).to_f32_vec().unwrap();
        assert_eq!(flat[..20], a.to_f32_vec().unwrap()[..]);
        assert_eq!(flat[20..32], [0.0; 12]);
        assert_eq!(flat[32..], c.to_f32_vec().unwrap()[..]);
        assert_eq!(s.get("b").unwrap().to_vec::<half::bf16>().unwrap(), b.to_vec::<half::bf16>().unwrap());
        // zeros_like keeps buffers and offsets, in the new dtype.
        let z = s.zeros_like(DType::F32).unwrap();
        assert_eq!(z.buffers().len(), 2);
        assert_eq!(z.placement("c").unwrap(), s.placement("c").unwrap());
        assert_eq!(z.get("b").unwrap().dtype(), DType::F32);
        // A cast that makes both buffers f32 merges them (one buffer per dtype).
        let f = s.cast(DType::F32).unwrap();
        assert_eq!(f.buffers().len(), 1);
        assert_eq!(f.get("b").unwrap().to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        assert_eq!(f.get("c").unwrap().to_f32_vec().unwrap(), c.to_f32_vec().unwrap());
    }

    #[test]
    fn writes_never_change_tensors_handed_out_before() {
        let mut s = ParamStore::new();
        let w = randn(&[3, 4], 5);
        s.insert("w", w.clone()).unwrap();
        s.insert("b", randn(&[4], 6)).unwrap();
        let before = s.get("w").unwrap().clone();
        let snapshot = s.clone();
        let delta = randn(&[3, 4], 7);
        s.accumulate("w", &delta).unwrap();
        let want: Vec<f32> =
            w.to_f32_vec().unwrap().iter().zip(delta.to_f32_vec().unwrap()).map(|(a, b)| a + b).collect();
        assert_eq!(s.get("w").unwrap().to_f32_vec().unwrap(), want);
        assert_eq!(before.to_f32_vec().unwrap(), w.to_f32_vec().unwrap());
        assert_eq!(snapshot.get("w").unwrap().to_f32_vec().unwrap(), w.to_f32_vec().unwrap());
        // In place: set writes into the buffer, and the inserted tensor is never aliased.
        s.set("b", Tensor::full(3.0, [4], DType::F32, Device::Cpu).unwrap()).unwrap();
        assert_eq!(s.buffer(0).to_f32_vec().unwrap()[16..], [3.0; 4]);
        s.buffer_mut(0).as_mut_slice::<f32>().unwrap()[0] = 42.0;
        assert_eq!(s.get("w").unwrap().to_f32_vec().unwrap()[0], 42.0);
        assert_eq!(w.to_f32_vec().unwrap()[0], before.to_f32_vec().unwrap()[0]);
        // bf16 gradients accumulate through f32 and round once.
        let mut g = s.zeros_like(DType::BF16).unwrap();
        g.accumulate("b", &Tensor::full(0.1, [4], DType::F32, Device::Cpu).unwrap()).unwrap();
        assert_eq!(g.get("b").unwrap().to_f32_vec().unwrap(), [half::bf16::from_f32(0.1).to_f32(); 4]);
    }

    #[test]
    fn diff_names_every_difference() {
        let mut a = ParamStore::new();
        a.insert("x", randn(&[2], 1)).unwrap();
        a.insert("y", randn(&[2, 2], 2)).unwrap();
        a.insert("z", randn(&[1], 3)).unwrap();
        let mut b = ParamStore::new();
        b.insert("y", randn(&[4], 4)).unwrap();
        b.insert("z", randn(&[1], 5).cast(DType::BF16).unwrap()).unwrap();
        b.insert("extra", randn(&[1], 6)).unwrap();
        let d = ParamDiff::between(&a, &b);
        assert_eq!(
            d.to_string(),
            "missing 1 [x]; unexpected 1 [extra]; misshaped 1 [y: expected [2, 2], found [4]]; \
             wrong dtype 1 [z: expected f32, found bf16]"
        );
        assert!(ParamDiff::between(&a, &a.clone()).is_empty());
    }
}
