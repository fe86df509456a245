//! Backing storage of tensors: typed host vectors or untyped device buffers.

use crate::{cuda::CudaStorage, DType, Element};
use half::{bf16, f16};

/// Host storage, one variant per dtype.
#[derive(Debug, Clone)]
pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I32(Vec<i32>),
    U32(Vec<u32>),
}

impl CpuStorage {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    /// Storage holding `v`, whose element type fixes the variant.
    pub(crate) fn from_vec<T: Element>(v: Vec<T>) -> Self {
        // T is exactly the variant's element type (Element is sealed), so these casts are identities.
        use bytemuck::allocation::cast_vec;
        match T::DTYPE {
            DType::F32 => CpuStorage::F32(cast_vec(v)),
            DType::BF16 => CpuStorage::BF16(cast_vec(v)),
            DType::F16 => CpuStorage::F16(cast_vec(v)),
            DType::I32 => CpuStorage::I32(cast_vec(v)),
            DType::U32 => CpuStorage::U32(cast_vec(v)),
        }
    }

    /// The elements as `T`, if `T` is this storage's element type.
    pub(crate) fn as_slice<T: Element>(&self) -> Option<&[T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        Some(match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::U32(v) => bytemuck::cast_slice(v),
        })
    }

    /// The elements as `T`, writable, if `T` is this storage's element type.
    pub(crate) fn as_mut_slice<T: Element>(&mut self) -> Option<&mut [T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        Some(match self {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::I32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::U32(v) => bytemuck::cast_slice_mut(v),
        })
    }

    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
        }
    }

    /// Appends elements given as the raw bytes of this storage's element type (taken from
    /// another storage of the same dtype, so aligned).
    pub(crate) fn extend_from_bytes(&mut self, bytes: &[u8]) {
        match self {
            CpuStorage::F32(v) => v.extend_from_slice(bytemuck::cast_slice(bytes)),
            CpuStorage::BF16(v) => v.extend_from_slice(bytemuck::cast_slice(bytes)),
            CpuStorage::F16(v) => v.extend_from_slice(bytemuck::cast_slice(bytes)),
            CpuStorage::I32(v) => v.extend_from_slice(bytemuck::cast_slice(bytes)),
            CpuStorage::U32(v) => v.extend_from_slice(bytemuck::cast_slice(bytes)),
        }
    }

    /// `len` zero elements of `dtype`, to be overwritten in place through [`Self::bytes_mut`]
    /// (layout ops copy bytes straight into the typed vector).
    pub(crate) fn zeroed(dtype: DType, len: usize) -> Self {
        use crate::cpu::zeroed;
        match dtype {
            DType::F32 => CpuStorage::F32(zeroed(len)),
            DType::BF16 => CpuStorage::BF16(zeroed(len)),
            DType::F16 => CpuStorage::F16(zeroed(len)),
            DType::I32 => CpuStorage::I32(zeroed(len)),
            DType::U32 => CpuStorage::U32(zeroed(len)),
        }
    }

    /// All elements as raw bytes, writable.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::I32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::U32(v) => bytemuck::cast_slice_mut(v),
        }
    }

    /// Bytes of elements `[offset, offset + len)`, for copies to a device.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(&v[offset..offset + len]),
            CpuStorage::BF16(v) => bytemuck::cast_slice(&v[offset..offset + len]),
            CpuStorage::F16(v) => bytemuck::cast_slice(&v[offset..offset + len]),
            CpuStorage::I32(v) => bytemuck::cast_slice(&v[offset..offset + len]),
            CpuStorage::U32(v) => bytemuck::cast_slice(&v[offset..offset + len]),
        }
    }

    /// Rebuilds typed storage from raw bytes copied back from a device.
    pub(crate) fn from_bytes(bytes: &[u8], dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::I32 => CpuStorage::I32(bytemuck::pod_collect_to_vec(bytes)),
            DType::U32 => CpuStorage::U32(bytemuck::pod_collect_to_vec(bytes)),
        }
    }

    /// Float storage of `dtype` from f32 values (round to nearest even for bf16/f16).
    pub(crate) fn from_f32(values: Vec<f32>, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::BF16 => CpuStorage::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::I32 => CpuStorage::I32(values.iter().map(|&x| x as i32).collect()),
            DType::U32 => CpuStorage::U32(values.iter().map(|&x| x as u32).collect()),
        }
    }
}

/// Storage on one device. Shared by tensors through an `Arc`; views add an offset.
#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}
