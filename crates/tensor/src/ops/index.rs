//! Row gather and scatter-add by index: MoE dispatch (tokens -> expert slots) and combine,
//! PatchDropout's kept tokens.

use super::{reduce::check_index, same_device, same_float_dtype};
use crate::{cpu, cuda, Device, Error, Result, Tensor};

/// Row indices into a table of [`rows`](RowIndex::rows) rows: I32 `[m]` on a device, every entry
/// in `-1..rows` (-1 = none).
///
/// The entries are checked once, where the index is made. [`gather_rows`] and
/// [`scatter_add_rows`] then need no check of their own, so on CUDA a step does not copy its
/// indices back to the host (issue 14: no host round trips in a step). Indices made on the host
/// (MoE routing, PatchDropout) are checked there by [`RowIndex::from_host`] before the upload.
#[derive(Debug, Clone)]
pub struct RowIndex {
    idx: Tensor,
    rows: usize,
}

impl RowIndex {
    /// Checks `idx` (one entry per output row) against a table of `rows` rows and puts it on
    /// `device`.
    pub fn from_host(idx: Vec<i32>, rows: usize, device: Device) -> Result<Self> {
        check_entries("row index", &idx, rows)?;
        let m = idx.len();
        Ok(Self { idx: Tensor::from_vec(idx, [m], Device::Cpu)?.to_device(device)?, rows })
    }

    /// Checks an I32 `[m]` tensor against a table of `rows` rows. On CUDA this copies the
    /// entries to the host; indices made on the host should use [`RowIndex::from_host`].
    pub fn from_tensor(idx: Tensor, rows: usize) -> Result<Self> {
        const OP: &str = "row index";
        check_index(OP, &idx)?;
        if idx.rank() != 1 {
            return Err(Error::shape(OP, format!("expected idx of shape [m], got {}", idx.shape())));
        }
        check_entries(OP, &idx.to_vec::<i32>()?, rows)?;
        Ok(Self { idx, rows })
    }

    /// The entries, I32 `[m]`.
    pub fn tensor(&self) -> &Tensor {
        &self.idx
    }

    /// The size of the table the entries index: every entry is below it.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The number of entries `m`.
    pub fn len(&self) -> usize {
        self.idx.numel()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_entries(op: &'static str, v: &[i32], n: usize) -> Result<()> {
    if let Some((i, &bad)) = v.iter().enumerate().find(|(_, &x)| x < -1 || x as i64 >= n as i64) {
        return Err(Error::value(op, format!("index {bad} at position {i} is outside -1..{n}")));
    }
    Ok(())
}

/// `out[i] = src[idx[i]]` for `src [n, d]` and an index into `n` rows; `idx[i] == -1` gives a
/// zero row. Returns `[m, d]`.
pub fn gather_rows(src: &Tensor, idx: &RowIndex) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    same_device(OP, &[src, idx.tensor()])?;
    same_float_dtype(OP, &[src])?;
    if src.rank() != 2 || src.dims()[0] != idx.rows() {
        return Err(Error::shape(
            OP,
            format!(
                "expected src [{}, width] (the rows the index was checked against), got {}",
                idx.rows(),
                src.shape()
            ),
        ));
    }
    let (m, d) = (idx.len(), src.dims()[1]);
    match src.device() {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::gather_rows(&src.cpu_f32(OP)?, idx.tensor().cpu_slice(OP)?, d),
            [m, d],
            src.dtype(),
        )),
        Device::Cuda(_) => cuda::index::gather_rows(src, idx.tensor()),
    }
}

/// `out [n, d]` with `out[idx[i]] += src[i]` for `src [m, d]` and an index of `m` entries into
/// `n` rows; entries with `idx[i] == -1` are dropped. The backward of [`gather_rows`], and of
/// this op it is [`gather_rows`].
pub fn scatter_add_rows(src: &Tensor, idx: &RowIndex) -> Result<Tensor> {
    const OP: &str = "scatter_add_rows";
    same_device(OP, &[src, idx.tensor()])?;
    same_float_dtype(OP, &[src])?;
    if src.rank() != 2 || src.dims()[0] != idx.len() {
        return Err(Error::shape(
            OP,
            format!("expected src [{}, width] (one row per index entry), got {}", idx.len(), src.shape()),
        ));
    }
    let (n, d) = (idx.rows(), src.dims()[1]);
    match src.device() {
        Device::Cpu => Ok(Tensor::cpu_like(
            cpu::scatter_add_rows(&src.cpu_f32(OP)?, idx.tensor().cpu_slice(OP)?, n, d),
            [n, d],
            src.dtype(),
        )),
        Device::Cuda(_) => cuda::index::scatter_add_rows(src, idx.tensor(), n),
    }
}
