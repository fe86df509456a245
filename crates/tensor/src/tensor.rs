//! The `Tensor` type: a contiguous row-major array on one device, cheap to clone.

use crate::{
    cuda,
    storage::{CpuStorage, Storage},
    DType, Device, Element, Error, Result, Shape,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::{borrow::Cow, sync::Arc};

/// Elements per parallel piece of [`Tensor::randn`] / [`Tensor::rand_uniform`] (the values do
/// not depend on it).
const RNG_CHUNK: usize = 1 << 14;

/// A contiguous row-major tensor. Clones share storage; [`Tensor::reshape`] and
/// [`Tensor::narrow`] (a leading-dimension slice) are views, everything else copies.
#[derive(Clone, Debug)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Shape,
    dtype: DType,
    device: Device,
    /// Offset of the first element into the storage, in elements.
    offset: usize,
}

impl Tensor {
    pub(crate) fn from_storage(storage: Storage, shape: Shape, dtype: DType, device: Device) -> Self {
        Tensor { storage: Arc::new(storage), shape, dtype, device, offset: 0 }
    }

    /// A tensor holding `data` with `shape`, on `device`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>, device: Device) -> Result<Self> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::shape(
                "from_vec",
                format!("shape {shape} needs {} elements, got {}", shape.numel(), data.len()),
            ));
        }
        Self::from_cpu(CpuStorage::from_vec(data), shape).to_device(device)
    }

    /// A float tensor of `dtype` from f32 values (rounded to nearest even for bf16/f16).
    pub fn from_f32(data: Vec<f32>, shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::shape(
                "from_f32",
                format!("shape {shape} needs {} elements, got {}", shape.numel(), data.len()),
            ));
        }
        Self::from_cpu(CpuStorage::from_f32(data, dtype), shape).to_device(device)
    }

    pub(crate) fn from_cpu(storage: CpuStorage, shape: Shape) -> Self {
        let dtype = storage.dtype();
        Self::from_storage(Storage::Cpu(storage), shape, dtype, Device::Cpu)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        match device {
            Device::Cpu => Ok(Self::from_cpu(CpuStorage::from_f32(vec![0.0; shape.numel()], dtype), shape)),
            Device::Cuda(i) => {
                let storage = cuda::CudaStorage::zeros(i, shape.numel() * dtype.size_in_bytes())?;
                Ok(Self::from_storage(Storage::Cuda(storage), shape, dtype, device))
            }
        }
    }

    /// A tensor filled with `value`.
    pub fn full(value: f32, shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        Self::from_f32(vec![value; shape.numel()], shape, dtype, device)
    }

    /// Normal(mean, std) samples: element `i` is normal `i` of the Philox4x32-10 stream of
    /// `seed` ([`crate::rng`], Box–Muller), so the same seed gives the same values on every
    /// device, dtype (before rounding), thread count and version.
    pub fn randn(
        shape: impl Into<Shape>,
        mean: f32,
        std: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if !(std >= 0.0 && std.is_finite() && mean.is_finite()) {
            return Err(Error::value(
                "randn",
                format!("expected a finite mean and a finite std >= 0, got mean {mean}, std {std}"),
            ));
        }
        let mut data = vec![0.0f32; shape.numel()];
        data.par_chunks_mut(RNG_CHUNK).enumerate().for_each(|(i, chunk)| {
            crate::rng::fill_normal(seed, (i * RNG_CHUNK) as u64, f64::from(mean), f64::from(std), chunk)
        });
        Self::from_f32(data, shape, dtype, device)
    }

    /// Uniform samples in `[low, high)`: element `i` is `low + (high − low) · u` for the
    /// uniform `u` of word `i` of the Philox4x32-10 stream of `seed` ([`crate::rng`]).
    pub fn rand_uniform(
        shape: impl Into<Shape>,
        low: f32,
        high: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if !low.is_finite() || !high.is_finite() || low >= high {
            return Err(Error::value("rand_uniform", format!("expected finite low < high, got [{low}, {high})")));
        }
        let mut data = vec![0.0f32; shape.numel()];
        data.par_chunks_mut(RNG_CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| crate::rng::fill_uniform(seed, (i * RNG_CHUNK) as u64, low, high, chunk));
        Self::from_f32(data, shape, dtype, device)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// The same elements under another shape with the same number of elements (a view).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot view {} ({} elements) as {shape} ({} elements)",
                    self.shape,
                    self.numel(),
                    shape.numel()
                ),
            ));
        }
        Ok(Tensor { shape, ..self.clone() })
    }

    /// Rows `start..start + len` of the leading dimension (a view).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let dims = self.dims();
        if dims.is_empty() || start + len > dims[0] {
            return Err(Error::shape(
                "narrow",
                format!("rows {start}..{} out of range for shape {}", start + len, self.shape),
            ));
        }
        let row = self.numel() / dims[0].max(1);
        let mut new = dims.to_vec();
        new[0] = len;
        Ok(Tensor { shape: Shape::new(new), offset: self.offset + start * row, ..self.clone() })
    }

    /// A copy on `device` (or a clone if already there).
    pub fn to_device(&self, device: Device) -> Result<Self> {
        if device == self.device {
            return Ok(self.clone());
        }
        let host = self.to_cpu_storage()?;
        match device {
            Device::Cpu => Ok(Self::from_cpu(host, self.shape.clone())),
            Device::Cuda(i) => {
                let storage = cuda::CudaStorage::from_bytes(i, host.bytes(0, self.numel()))?;
                Ok(Self::from_storage(Storage::Cuda(storage), self.shape.clone(), self.dtype, device))
            }
        }
    }

    /// A copy converted to float `dtype` (f32 ↔ bf16 ↔ f16, round to nearest even).
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        if !dtype.is_float() || !self.dtype.is_float() {
            return Err(Error::DType {
                op: "cast",
                expected: "a float dtype on both sides".into(),
                got: if dtype.is_float() { self.dtype } else { dtype },
            });
        }
        match self.device {
            Device::Cpu => {
                Ok(Self::from_cpu(CpuStorage::from_f32(self.cpu_f32("cast")?.into_owned(), dtype), self.shape.clone()))
            }
            Device::Cuda(_) => cuda::elementwise::cast(self, dtype),
        }
    }

    /// A contiguous copy of the elements as `T`, which must be this tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType { op: "to_vec", expected: T::DTYPE.to_string(), got: self.dtype });
        }
        let host = self.to_cpu_storage()?;
        Ok(host.as_slice::<T>().expect("dtype checked").to_vec())
    }

    /// The elements as raw bytes on the host, row-major, each in its dtype's little-endian
    /// layout (`numel × size_in_bytes`): what a transport (MPI) sends. [`Tensor::from_bytes`]
    /// is the inverse.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match self.storage.as_ref() {
            Storage::Cpu(s) => Ok(s.bytes(self.offset, self.numel()).to_vec()),
            Storage::Cuda(s) => {
                s.to_host(self.offset * self.dtype.size_in_bytes(), self.numel() * self.dtype.size_in_bytes())
            }
        }
    }

    /// A tensor of `shape` and `dtype` on `device` from raw bytes as [`Tensor::to_bytes`] gives
    /// them; an error when their length is not `numel × size_in_bytes`.
    pub fn from_bytes(bytes: &[u8], shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        let want = shape.numel() * dtype.size_in_bytes();
        if bytes.len() != want {
            return Err(Error::shape(
                "from_bytes",
                format!("{} bytes for a {dtype} tensor of shape {shape}: expected {want}", bytes.len()),
            ));
        }
        Self::from_cpu(CpuStorage::from_bytes(bytes, dtype), shape).to_device(device)
    }

    /// The elements as f32 values, from any float dtype, on the host.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.device {
            Device::Cpu => Ok(self.cpu_f32("to_f32_vec")?.into_owned()),
            Device::Cuda(_) => self.to_device(Device::Cpu)?.to_f32_vec(),
        }
    }

    /// The single value of a one-element float tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape("to_scalar", format!("expected one element, got shape {}", self.shape)));
        }
        Ok(self.to_f32_vec()?[0])
    }

    /// This tensor's elements copied into a fresh host storage (exactly `numel` of them).
    fn to_cpu_storage(&self) -> Result<CpuStorage> {
        match self.storage.as_ref() {
            Storage::Cpu(s) => Ok(CpuStorage::from_bytes(s.bytes(self.offset, self.numel()), self.dtype)),
            Storage::Cuda(s) => {
                let bytes =
                    s.to_host(self.offset * self.dtype.size_in_bytes(), self.numel() * self.dtype.size_in_bytes())?;
                Ok(CpuStorage::from_bytes(&bytes, self.dtype))
            }
        }
    }

    /// This tensor's storage, for writing in place. Tensors are values: when another tensor
    /// shares the storage (a clone or a view), this tensor's elements are first copied into a
    /// storage of its own, so no other tensor ever sees a write.
    fn storage_mut(&mut self) -> Result<&mut Storage> {
        if Arc::get_mut(&mut self.storage).is_none() {
            let bytes = self.numel() * self.dtype.size_in_bytes();
            let own = match self.storage.as_ref() {
                Storage::Cpu(s) => Storage::Cpu(CpuStorage::from_bytes(s.bytes(self.offset, self.numel()), self.dtype)),
                Storage::Cuda(s) => {
                    let mut own = cuda::CudaStorage::zeros(s.backend.ordinal, bytes)?;
                    own.write_at(0, s, self.offset * self.dtype.size_in_bytes(), bytes)?;
                    Storage::Cuda(own)
                }
            };
            self.storage = Arc::new(own);
            self.offset = 0;
        }
        Ok(Arc::get_mut(&mut self.storage).expect("storage is unique after the copy"))
    }

    /// Sets every element to zero in place, on any device (a memset; no new buffer while the
    /// old one is alive, so zeroing a large gradient buffer costs no extra memory). When another
    /// tensor shares the storage, this tensor gets a fresh zeroed storage instead and the other
    /// keeps its values.
    pub fn fill_zero(&mut self) -> Result<()> {
        let (n, offset) = (self.numel() * self.dtype.size_in_bytes(), self.offset * self.dtype.size_in_bytes());
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(s)) => {
                use rayon::prelude::*;
                // All-zero bytes are 0 in every dtype.
                s.bytes_mut()[offset..offset + n].par_chunks_mut(4 * crate::cpu::PAR_MIN_ELEMS).for_each(|c| c.fill(0));
            }
            Some(Storage::Cuda(s)) => s.zero_range(offset, n)?,
            None => {
                *self = Tensor::zeros(self.shape.clone(), self.dtype, self.device)?;
            }
        }
        Ok(())
    }

    /// Gives this tensor a storage of its own if another tensor (a clone or a view) shares it,
    /// by copying its elements (copy-on-write, on any device). After it, a kernel may write
    /// through [`crate::cuda::kernel::device_ptr`] of this tensor, or of views made from it
    /// afterwards, without changing any tensor made before.
    pub fn make_unique(&mut self) -> Result<()> {
        self.storage_mut().map(|_| ())
    }

    /// The elements of a CPU tensor of element type `T` (this tensor's dtype), borrowed: no copy.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType { op: "as_slice", expected: T::DTYPE.to_string(), got: self.dtype });
        }
        match self.storage.as_ref() {
            Storage::Cpu(s) => Ok(&s.as_slice::<T>().expect("dtype checked")[self.offset..self.offset + self.numel()]),
            Storage::Cuda(_) => Err(Error::Device { op: "as_slice", expected: Device::Cpu, got: self.device }),
        }
    }

    /// The elements of a CPU tensor of element type `T` (this tensor's dtype), writable in place.
    /// If another tensor shares the storage, the elements are copied first (see
    /// [`Tensor::write_at`]): writing never changes another tensor.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType { op: "as_mut_slice", expected: T::DTYPE.to_string(), got: self.dtype });
        }
        if self.device != Device::Cpu {
            return Err(Error::Device { op: "as_mut_slice", expected: Device::Cpu, got: self.device });
        }
        let (offset, n) = (self.offset, self.numel());
        match self.storage_mut()? {
            Storage::Cpu(s) => Ok(&mut s.as_mut_slice::<T>().expect("dtype checked")[offset..offset + n]),
            Storage::Cuda(_) => unreachable!("device checked"),
        }
    }

    /// Overwrites elements `[start, start + src.numel())` of this tensor (row-major order) with
    /// `src`'s, in place, on any device; `src` must have this tensor's dtype and is moved to its
    /// device if needed. Copy-on-write: if another tensor (a clone or a view) shares this one's
    /// storage, this tensor gets a storage of its own first, and the other keeps its values.
    pub fn write_at(&mut self, start: usize, src: &Tensor) -> Result<()> {
        if src.dtype != self.dtype {
            return Err(Error::DType { op: "write_at", expected: self.dtype.to_string(), got: src.dtype });
        }
        if start + src.numel() > self.numel() {
            return Err(Error::shape(
                "write_at",
                format!(
                    "elements {start}..{} out of range for a tensor of {} elements ({})",
                    start + src.numel(),
                    self.numel(),
                    self.shape
                ),
            ));
        }
        let src = src.to_device(self.device)?;
        let size = self.dtype.size_in_bytes();
        let at = (self.offset + start) * size;
        let len = src.numel() * size;
        match (self.storage_mut()?, src.storage.as_ref()) {
            (Storage::Cpu(dst), Storage::Cpu(s)) => {
                dst.bytes_mut()[at..at + len].copy_from_slice(s.bytes(src.offset, src.numel()));
            }
            (Storage::Cuda(dst), Storage::Cuda(s)) => dst.write_at(at, s, src.offset * size, len)?,
            _ => unreachable!("src was moved to this tensor's device"),
        }
        Ok(())
    }

    /// Appends `extra`'s elements to this 1-D host tensor of the same dtype, growing its vector
    /// in place when no other tensor shares it (amortised O(len(extra))), else by a copy.
    pub(crate) fn extend_host(&mut self, extra: &Tensor) -> Result<()> {
        if extra.dtype != self.dtype {
            return Err(Error::DType { op: "extend", expected: self.dtype.to_string(), got: extra.dtype });
        }
        let n = self.numel();
        let whole = matches!(self.storage.as_ref(), Storage::Cpu(s) if self.offset == 0 && s.len() == n);
        if !whole || Arc::get_mut(&mut self.storage).is_none() {
            let own = CpuStorage::from_bytes(self.cpu_bytes("extend")?, self.dtype);
            self.storage = Arc::new(Storage::Cpu(own));
            self.offset = 0;
        }
        let bytes = extra.cpu_bytes("extend")?;
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(s)) => s.extend_from_bytes(bytes),
            _ => unreachable!("unique host storage after the copy"),
        }
        self.shape = Shape::new(vec![n + extra.numel()]);
        Ok(())
    }

    /// The elements of a CPU float tensor as f32, borrowed when already f32.
    pub(crate) fn cpu_f32(&self, op: &'static str) -> Result<Cow<'_, [f32]>> {
        let range = self.offset..self.offset + self.numel();
        match self.storage.as_ref() {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(Cow::Borrowed(&v[range])),
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(Cow::Owned(v[range].iter().map(|x| bf16::to_f32(*x)).collect())),
            Storage::Cpu(CpuStorage::F16(v)) => Ok(Cow::Owned(v[range].iter().map(|x| f16::to_f32(*x)).collect())),
            Storage::Cpu(_) => Err(Error::DType { op, expected: "f32, bf16 or f16".into(), got: self.dtype }),
            Storage::Cuda(_) => Err(Error::Device { op, expected: Device::Cpu, got: self.device }),
        }
    }

    /// The elements of a CPU tensor of element type `T`, borrowed.
    pub(crate) fn cpu_slice<T: Element>(&self, op: &'static str) -> Result<&[T]> {
        match self.storage.as_ref() {
            Storage::Cpu(s) => s
                .as_slice::<T>()
                .map(|v| &v[self.offset..self.offset + self.numel()])
                .ok_or(Error::DType { op, expected: T::DTYPE.to_string(), got: self.dtype }),
            Storage::Cuda(_) => Err(Error::Device { op, expected: Device::Cpu, got: self.device }),
        }
    }

    /// The raw bytes of a CPU tensor's elements (any dtype), for layout ops.
    pub(crate) fn cpu_bytes(&self, op: &'static str) -> Result<&[u8]> {
        match self.storage.as_ref() {
            Storage::Cpu(s) => Ok(s.bytes(self.offset, self.numel())),
            Storage::Cuda(_) => Err(Error::Device { op, expected: Device::Cpu, got: self.device }),
        }
    }

    /// The device buffer and byte offset of a CUDA tensor.
    pub(crate) fn cuda_storage(&self, op: &'static str) -> Result<(&cuda::CudaStorage, usize)> {
        match self.storage.as_ref() {
            Storage::Cuda(s) => Ok((s, self.offset * self.dtype.size_in_bytes())),
            Storage::Cpu(_) => Err(Error::Device { op, expected: Device::Cuda(0), got: self.device }),
        }
    }

    /// A new CPU float tensor of this tensor's dtype holding `values` (computed in f32).
    pub(crate) fn cpu_like(values: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> Tensor {
        Self::from_cpu(CpuStorage::from_f32(values, dtype), shape.into())
    }
}
