//! Untyped device buffers; the tensor's dtype says how kernels read them.

use super::{backend, cuda_err, CudaBackend};
use crate::Result;
use cudarc::driver::CudaSlice;
use std::sync::Arc;

/// Bytes on one CUDA device, with the backend (stream, kernels) that owns them.
pub(crate) struct CudaStorage {
    pub(crate) buf: CudaSlice<u8>,
    pub(crate) backend: Arc<CudaBackend>,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({} bytes on cuda:{})", self.buf.len(), self.backend.ordinal)
    }
}

impl CudaStorage {
    pub(crate) fn zeros(ordinal: usize, bytes: usize) -> Result<Self> {
        let backend = backend(ordinal)?;
        Ok(CudaStorage { buf: backend.alloc(bytes)?, backend })
    }

    pub(crate) fn from_bytes(ordinal: usize, bytes: &[u8]) -> Result<Self> {
        let backend = backend(ordinal)?;
        let buf =
            if bytes.is_empty() { backend.alloc(1)? } else { backend.stream.clone_htod(bytes).map_err(cuda_err)? };
        Ok(CudaStorage { buf, backend })
    }

    /// Copies bytes `[offset, offset + len)` to the host (synchronises the stream).
    pub(crate) fn to_host(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        super::count_host_read();
        self.backend.stream.clone_dtoh(&self.buf.slice(offset..offset + len)).map_err(cuda_err)
    }

    /// Sets bytes `[offset, offset + len)` to zero (a memset on the stream, no allocation).
    pub(crate) fn zero_range(&mut self, offset: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut to = self.buf.slice_mut(offset..offset + len);
        self.backend.stream.memset_zeros(&mut to).map_err(cuda_err)
    }

    /// Copies `src` (bytes on the same device) into bytes `[offset, offset + src.len())`.
    pub(crate) fn write_at(&mut self, offset: usize, src: &CudaStorage, src_offset: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let from = src.buf.slice(src_offset..src_offset + len);
        let mut to = self.buf.slice_mut(offset..offset + len);
        self.backend.stream.memcpy_dtod(&from, &mut to).map_err(cuda_err)
    }
}
