//! Checkpoints: a model's parameters, optional optimizer state, the step, the model config and
//! free-form metadata (RNG state and the like) in one safetensors file (design §6).
//!
//! # File layout
//!
//! A standard safetensors file. Tensor keys:
//!
//! - parameters under their own names (`blocks.3.attn.qkv.weight`), so a checkpoint's keys
//!   equal the parameter names (design §3) and other safetensors readers see plain weights;
//! - optimizer state under [`OPT_PREFIX`] + its name (`opt.m.blocks.3.attn.qkv.weight`).
//!   Parameter names may not start with `opt.`, so the two can never collide.
//!
//! `__metadata__` (string to string):
//!
//! | key | value |
//! | --- | --- |
//! | `vitrs.format_version` | [`FORMAT_VERSION`], in decimal |
//! | `vitrs.config` | the model config as TOML ([`ModelConfig::to_toml`]) |
//! | `vitrs.step` | the step, in decimal |
//! | `vitrs.params` | the parameter names in store order, one per line |
//! | `vitrs.optimizer` | the optimizer state names (without `opt.`) in store order, one per line; absent when the checkpoint has no optimizer state |
//! | `meta.<key>` | each entry of [`Checkpoint::metadata`] |
//!
//! Tensors are stored sorted by dtype (descending alignment) and name, as the safetensors crate
//! orders them, so the name lists carry the order: a loaded store lines up index by index with
//! the saved one.
//!
//! The file's bytes are a function of the checkpoint alone: the header is written here (the
//! safetensors crate keeps `__metadata__` in a `HashMap`, so its writer orders the entries
//! differently in every process) as compact JSON with `__metadata__` first, its keys in
//! byte order, then the tensors in file order, padded with spaces to a multiple of 8 bytes.
//! Reading goes through the safetensors crate. Tensors keep their dtype
//! (f32, bf16, f16, i32, u32, little-endian) and come back bit for bit.
//!
//! Writes go to `<path>.tmp-<pid>`, are synced, and are renamed over `path`, so a crash
//! while saving leaves the previous checkpoint whole.

use crate::{ModelConfig, ModelError, ParamStore, Result};
use half::{bf16, f16};
use safetensors::{
    tensor::{Metadata, TensorInfo, View},
    Dtype, SafeTensorError, SafeTensors,
};
use std::{
    borrow::Cow,
    cell::RefCell,
    collections::{BTreeMap, HashSet},
    ffi::OsString,
    fs,
    io::Write,
    path::{Path, PathBuf},
};
use vit_tensor::{DType, Device, ParamDiff, Tensor};

/// The checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of optimizer state keys in the file; parameter names may not start with it.
pub const OPT_PREFIX: &str = "opt.";
/// Prefix of [`Checkpoint::metadata`] keys in the safetensors `__metadata__`.
pub const META_PREFIX: &str = "meta.";
/// `__metadata__` key of the format version.
pub const KEY_VERSION: &str = "vitrs.format_version";
/// `__metadata__` key of the model config (TOML).
pub const KEY_CONFIG: &str = "vitrs.config";
/// `__metadata__` key of the step.
pub const KEY_STEP: &str = "vitrs.step";
/// `__metadata__` key of the parameter names, in order, one per line.
pub const KEY_PARAMS: &str = "vitrs.params";
/// `__metadata__` key of the optimizer state names, in order, one per line.
pub const KEY_OPTIMIZER: &str = "vitrs.optimizer";

/// safetensors' own limit on the JSON header.
const MAX_HEADER: u64 = 100_000_000;

/// Everything a run needs to continue: what [`save_checkpoint`] writes and
/// [`load_checkpoint`] reads back.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model's config.
    pub config: ModelConfig,
    /// The model's parameters, in the model's order.
    pub params: ParamStore,
    /// Optimizer state (moments, factored statistics, ...), if saved.
    pub optimizer: Option<ParamStore>,
    /// Optimizer steps taken.
    pub step: u64,
    /// Free-form entries for the trainer: RNG state, data loader position, ...
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// A checkpoint at step 0 with no optimizer state and no metadata.
    pub fn new(config: ModelConfig, params: ParamStore) -> Self {
        Checkpoint { config, params, optimizer: None, step: 0, metadata: BTreeMap::new() }
    }

    /// Checks the parameters against `expected` (a freshly initialised model's store):
    /// the same names, and for each the same shape and dtype. Every difference is in the
    /// one [`ModelError::ParamMismatch`].
    pub fn check_against(&self, expected: &ParamStore) -> Result<()> {
        diff_result(ParamDiff::between(expected, &self.params), "checkpoint parameters do not match the model".into())
    }

    /// Checks the parameters against what `model` declares ([`crate::VisionTransformer::param_shapes`],
    /// f32) as [`Checkpoint::check_against`] does, without initialising (or allocating) a model:
    /// what resuming, `vit predict` and evaluation check before loading a checkpoint of any size.
    pub fn check_against_model(&self, model: &crate::VisionTransformer) -> Result<()> {
        diff_result(
            ParamDiff::against_shapes(&model.param_shapes()?, vit_tensor::DType::F32, &self.params),
            "checkpoint parameters do not match the model".into(),
        )
    }

    /// Checks the optimizer state against `expected` (a fresh optimizer's state) as
    /// [`Checkpoint::check_against`] does; an error if the checkpoint has none.
    pub fn check_optimizer_against(&self, expected: &ParamStore) -> Result<()> {
        match &self.optimizer {
            Some(found) => diff_result(
                ParamDiff::between(expected, found),
                "checkpoint optimizer state does not match the optimizer".into(),
            ),
            None => Err(ModelError::Param {
                name: "optimizer state".into(),
                msg: "the checkpoint has none (saved without an optimizer)".into(),
            }),
        }
    }
}

/// `Ok` when `diff` is empty, else [`ModelError::ParamMismatch`] about `what`.
fn diff_result(diff: ParamDiff, what: String) -> Result<()> {
    if diff.is_empty() {
        Ok(())
    } else {
        Err(ModelError::ParamMismatch { what, diff })
    }
}

// ---------------------------------------------------------------------------------------------
// Saving

/// Writes `ckpt` to `path` (conventionally `step-N.safetensors`) atomically: into
/// `<path>.tmp-<pid>`, synced, then renamed over `path`. Tensors on a GPU are copied to the
/// host one at a time. On error the temporary file is removed and `path` is untouched.
pub fn save_checkpoint(path: impl AsRef<Path>, ckpt: &Checkpoint) -> Result<()> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(ModelError::CheckpointNotAFile { path: path.to_path_buf(), found: "a directory" });
    }
    for name in ckpt.params.names() {
        check_name(name)?;
        if name.starts_with(OPT_PREFIX) {
            return Err(ModelError::Param {
                name: name.to_string(),
                msg: format!("names starting with {OPT_PREFIX:?} are reserved for optimizer state in checkpoints"),
            });
        }
    }
    if let Some(opt) = &ckpt.optimizer {
        for name in opt.names() {
            check_name(name)?;
        }
    }

    let mut meta = BTreeMap::new();
    meta.insert(KEY_VERSION.to_string(), FORMAT_VERSION.to_string());
    meta.insert(KEY_CONFIG.to_string(), ckpt.config.to_toml()?);
    meta.insert(KEY_STEP.to_string(), ckpt.step.to_string());
    meta.insert(KEY_PARAMS.to_string(), join_names(&ckpt.params));
    if let Some(opt) = &ckpt.optimizer {
        meta.insert(KEY_OPTIMIZER.to_string(), join_names(opt));
    }
    for (k, v) in &ckpt.metadata {
        meta.insert(format!("{META_PREFIX}{k}"), v.clone());
    }

    let failure = RefCell::new(None);
    let mut views: Vec<(String, HostView<'_>)> = Vec::new();
    for (name, t) in ckpt.params.iter() {
        views.push((name.to_string(), HostView { name, tensor: t, failure: &failure }));
    }
    if let Some(opt) = &ckpt.optimizer {
        for (name, t) in opt.iter() {
            views.push((format!("{OPT_PREFIX}{name}"), HostView { name, tensor: t, failure: &failure }));
        }
    }

    write_atomic(path, views, meta, &failure)
}

/// Writes plain named tensors (no vitrs metadata) to a safetensors file, atomically as
/// [`save_checkpoint`]: e.g. the `logits` of `vit predict`.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(ModelError::CheckpointNotAFile { path: path.to_path_buf(), found: "a directory" });
    }
    let failure = RefCell::new(None);
    let views: Vec<(String, HostView<'_>)> = tensors
        .iter()
        .map(|&(name, tensor)| (name.to_string(), HostView { name, tensor, failure: &failure }))
        .collect();
    write_atomic(path, views, BTreeMap::new(), &failure)
}

/// Serialises `views` with `meta` into `<path>.tmp-<pid>`, syncs it and renames it over `path`;
/// on error removes the temporary file and leaves `path` untouched.
fn write_atomic(
    path: &Path,
    views: Vec<(String, HostView<'_>)>,
    meta: BTreeMap<String, String>,
    failure: &RefCell<Option<(String, vit_tensor::Error)>>,
) -> Result<()> {
    let tmp = tmp_path(path);
    let io = |action: &'static str, source: std::io::Error| ModelError::CheckpointIo {
        path: path.to_path_buf(),
        action,
        source,
    };
    let result = (|| {
        write_safetensors_file(&tmp, views, &meta).map_err(|e| io("write", e))?;
        if let Some((name, e)) = failure.borrow_mut().take() {
            return Err(ModelError::Param {
                name,
                msg: format!("copying to the host for checkpoint {}: {e}", path.display()),
            });
        }
        fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io("sync", e))?;
        fs::rename(&tmp, path).map_err(|e| io("rename the temporary file onto", e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; not every platform can sync a directory, so best effort.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Writes a safetensors file whose bytes depend only on `views` and `meta`: tensors sorted by
/// descending dtype and then name (as `safetensors::serialize` sorts them), a compact JSON
/// header with `__metadata__` first (omitted when empty, keys in byte order), then the tensors
/// in file order, padded with spaces to a multiple of 8 bytes.
fn write_safetensors_file(
    path: &Path,
    mut views: Vec<(String, HostView<'_>)>,
    meta: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    views.sort_by(|(a, x), (b, y)| y.dtype().cmp(&x.dtype()).then(a.cmp(b)));
    let json = |e: serde_json::Error| std::io::Error::other(format!("header JSON: {e}"));
    let mut header = String::from("{");
    if !meta.is_empty() {
        header.push_str("\"__metadata__\":");
        header.push_str(&serde_json::to_string(meta).map_err(json)?);
    }
    let mut offset = 0;
    for (name, view) in &views {
        let len = view.data_len();
        let info =
            TensorInfo { dtype: view.dtype(), shape: view.shape().to_vec(), data_offsets: (offset, offset + len) };
        offset += len;
        if header.len() > 1 {
            header.push(',');
        }
        header.push_str(&serde_json::to_string(name).map_err(json)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&info).map_err(json)?);
    }
    header.push('}');
    let padded = header.len().next_multiple_of(8);
    if padded as u64 > MAX_HEADER {
        return Err(std::io::Error::other(format!(
            "header of {padded} bytes exceeds the safetensors limit of {MAX_HEADER} bytes"
        )));
    }
    let mut out = std::io::BufWriter::new(fs::File::create(path)?);
    out.write_all(&(padded as u64).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    out.write_all(&vec![b' '; padded - header.len()])?;
    for (_, view) in &views {
        out.write_all(&view.data())?;
    }
    out.into_inner().map_err(|e| e.into_error())?.flush()
}

/// `<path>.tmp-<pid>`: where [`save_checkpoint`] writes before renaming.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(s)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('\n') {
        return Err(ModelError::Param {
            name: format!("{name:?}"),
            msg: "a checkpoint name must be non-empty and hold no newline".into(),
        });
    }
    Ok(())
}

fn join_names(store: &ParamStore) -> String {
    store.names().collect::<Vec<_>>().join("\n")
}

/// One tensor as safetensors sees it: bytes are copied to the host (and to little-endian)
/// only when the writer asks for them, so at most one tensor's host copy is alive at a time.
/// `View::data` cannot fail, so a failed copy is recorded in `failure` and reported after.
struct HostView<'a> {
    name: &'a str,
    tensor: &'a Tensor,
    failure: &'a RefCell<Option<(String, vit_tensor::Error)>>,
}

impl View for HostView<'_> {
    fn dtype(&self) -> Dtype {
        match self.tensor.dtype() {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
            DType::I32 => Dtype::I32,
            DType::U32 => Dtype::U32,
        }
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match host_bytes(self.tensor) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.failure.borrow_mut().get_or_insert((self.name.to_string(), e));
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.dtype().size_in_bytes()
    }
}

/// The tensor's elements as little-endian bytes, copied to the host.
fn host_bytes(t: &Tensor) -> vit_tensor::Result<Vec<u8>> {
    fn le<T, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    Ok(match t.dtype() {
        DType::F32 => le(t.to_vec::<f32>()?, f32::to_le_bytes),
        DType::BF16 => le(t.to_vec::<bf16>()?, bf16::to_le_bytes),
        DType::F16 => le(t.to_vec::<f16>()?, f16::to_le_bytes),
        DType::I32 => le(t.to_vec::<i32>()?, i32::to_le_bytes),
        DType::U32 => le(t.to_vec::<u32>()?, u32::to_le_bytes),
    })
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Reads a checkpoint written by [`save_checkpoint`], putting every tensor on `device`.
/// Stores come back in the saved order. Errors name the path and what is wrong: not a
/// file, truncated, corrupt header or tensor table, missing or unknown format version,
/// a config that does not parse, ...
pub fn load_checkpoint(path: impl AsRef<Path>, device: Device) -> Result<Checkpoint> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let (table, data) = parse(path, &bytes)?;
    let meta = table.metadata().clone().unwrap_or_default();

    let get = |key: &'static str| {
        meta.get(key).ok_or_else(|| ModelError::CheckpointMetadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            msg: "missing".into(),
        })
    };
    match meta.get(KEY_VERSION) {
        Some(v) if v.trim() == FORMAT_VERSION.to_string() => {}
        found => return Err(ModelError::CheckpointVersion { path: path.to_path_buf(), found: found.cloned() }),
    }
    let config = ModelConfig::from_toml(get(KEY_CONFIG)?).map_err(|e| ModelError::CheckpointMetadata {
        path: path.to_path_buf(),
        key: KEY_CONFIG.into(),
        msg: e.to_string(),
    })?;
    let step_text = get(KEY_STEP)?;
    let step = step_text.trim().parse::<u64>().map_err(|_| ModelError::CheckpointMetadata {
        path: path.to_path_buf(),
        key: KEY_STEP.into(),
        msg: format!("{step_text:?}: expected a non-negative integer"),
    })?;

    let mut listed = HashSet::new();
    let mut read_store = |names: &str, prefix: &str| -> Result<ParamStore> {
        let mut store = ParamStore::new();
        for name in names.split('\n').filter(|n| !n.is_empty()) {
            let key = format!("{prefix}{name}");
            let tensor_err =
                |msg: String| ModelError::CheckpointTensor { path: path.to_path_buf(), name: key.clone(), msg };
            let info =
                table.info(&key).ok_or_else(|| tensor_err("listed in the metadata but not in the file".into()))?;
            // On the host first: the store's flat buffers then move to `device` in one copy each.
            let tensor = to_tensor(info, data, Device::Cpu).map_err(tensor_err)?;
            store.insert(name, tensor).map_err(|_| ModelError::CheckpointMetadata {
                path: path.to_path_buf(),
                key: if prefix.is_empty() { KEY_PARAMS } else { KEY_OPTIMIZER }.into(),
                msg: format!("{name} is listed twice"),
            })?;
            listed.insert(key);
        }
        Ok(store.to_device(device)?)
    };
    let params = read_store(get(KEY_PARAMS)?, "")?;
    let optimizer = meta.get(KEY_OPTIMIZER).map(|names| read_store(names, OPT_PREFIX)).transpose()?;
    let stray: Vec<String> = table.offset_keys().into_iter().filter(|k| !listed.contains(k)).collect();
    if !stray.is_empty() {
        return Err(ModelError::CheckpointTensor {
            path: path.to_path_buf(),
            name: stray.join(", "),
            msg: format!("in the file but not listed in the metadata ({KEY_PARAMS} / {KEY_OPTIMIZER})"),
        });
    }

    let metadata =
        meta.iter().filter_map(|(k, v)| Some((k.strip_prefix(META_PREFIX)?.to_string(), v.clone()))).collect();
    Ok(Checkpoint { config, params, optimizer, step, metadata })
}

/// Loads `path`, checks its parameters against `params` (names, shapes, dtypes; every
/// difference in one [`ModelError::ParamMismatch`] naming the path) and copies them into
/// `params`, each onto the device of the tensor it replaces. Optimizer state goes to the
/// device of `params`' first tensor (the CPU for an empty store). The returned checkpoint's
/// `params` are in `params`' order and share their storage.
pub fn load_params_into(path: impl AsRef<Path>, params: &mut ParamStore) -> Result<Checkpoint> {
    let path = path.as_ref();
    let device = if params.is_empty() { Device::Cpu } else { params.at(0).device() };
    let mut ckpt = load_checkpoint(path, device)?;
    diff_result(
        ParamDiff::between(params, &ckpt.params),
        format!("checkpoint {}: parameters do not match the model", path.display()),
    )?;
    let names: Vec<String> = params.names().map(str::to_string).collect();
    for name in &names {
        let target = params.get(name)?.device();
        params.set(name, ckpt.params.get(name)?.to_device(target)?)?;
    }
    ckpt.params = params.clone();
    Ok(ckpt)
}

/// Reads any safetensors file (timm weights, test fixtures; no vitrs metadata needed) as
/// `(key, tensor)` pairs on the CPU, in the order of the file's data section. Same errors as
/// [`load_checkpoint`] for a missing, truncated or corrupt file, or a dtype other than f32,
/// bf16, f16, i32, u32.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let (table, data) = parse(path, &bytes)?;
    table
        .offset_keys()
        .into_iter()
        .map(|key| {
            let info = table.info(&key).expect("a key of the table");
            match to_tensor(info, data, Device::Cpu) {
                Ok(t) => Ok((key, t)),
                Err(msg) => Err(ModelError::CheckpointTensor { path: path.to_path_buf(), name: key, msg }),
            }
        })
        .collect()
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let io = |action: &'static str, source| ModelError::CheckpointIo { path: path.to_path_buf(), action, source };
    let md = fs::metadata(path).map_err(|e| io("open", e))?;
    if !md.is_file() {
        let found = if md.is_dir() { "a directory" } else { "not a regular file" };
        return Err(ModelError::CheckpointNotAFile { path: path.to_path_buf(), found });
    }
    fs::read(path).map_err(|e| io("read", e))
}

/// Parses the safetensors header and tensor table (checking it covers the file exactly) and
/// returns it with the data section; safetensors' errors become ones that say truncated or
/// corrupt and why.
fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<(Metadata, &'a [u8])> {
    let len = bytes.len() as u64;
    let truncated = |detail: String| ModelError::CheckpointTruncated { path: path.to_path_buf(), detail };
    let corrupt = |detail: String| ModelError::CheckpointCorrupt { path: path.to_path_buf(), detail };
    if len < 8 {
        return Err(truncated(format!(
            "{len} bytes; a safetensors file starts with an 8-byte header length (empty file or cut short?)"
        )));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if !(2..=MAX_HEADER).contains(&n) {
        return Err(corrupt(format!(
            "header length {n} bytes is impossible (expected 2..={MAX_HEADER}): not a safetensors file"
        )));
    }
    if 8 + n > len {
        return Err(truncated(format!(
            "{len} bytes, but the header alone needs {} (cut short inside the header)",
            8 + n
        )));
    }
    let header = &bytes[8..8 + n as usize];
    let (_, table) = SafeTensors::read_metadata(bytes).map_err(|e| match e {
        SafeTensorError::InvalidHeader(e) => corrupt(format!("header is not UTF-8 ({e}): garbage bytes?")),
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            corrupt(format!("header is not a safetensors JSON table: {e}"))
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            let data = len - 8 - n;
            match declared_data_len(header) {
                Some(want) if want > data => truncated(format!(
                    "{len} bytes, expected {} ({} bytes of tensor data missing)",
                    8 + n + want,
                    want - data
                )),
                Some(want) => corrupt(format!("{} unexpected bytes after the tensor data", data - want)),
                None => corrupt("the tensor table does not cover the file's data (truncated?)".into()),
            }
        }
        other => corrupt(format!("bad tensor table: {other}")),
    })?;
    Ok((table, &bytes[8 + n as usize..]))
}

/// The end of the data section as the header declares it: the largest `data_offsets` end.
/// Only for error messages, after safetensors has parsed the header as JSON.
fn declared_data_len(header: &[u8]) -> Option<u64> {
    let text: String = std::str::from_utf8(header).ok()?.chars().filter(|c| !c.is_whitespace()).collect();
    let mut end = 0;
    for part in text.split("\"data_offsets\":[").skip(1) {
        let pair = part.split(']').next()?;
        end = end.max(pair.split(',').nth(1)?.parse::<u64>().ok()?);
    }
    Some(end)
}

/// A tensor from its entry in the table and the data section, on `device`; the error says
/// what is wrong.
fn to_tensor(info: &TensorInfo, data: &[u8], device: Device) -> std::result::Result<Tensor, String> {
    fn from_le<T, const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        data.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N bytes"))).collect()
    }
    let shape = info.shape.clone();
    // read_metadata checked that the offsets tile the data section and match shape × dtype.
    let data = &data[info.data_offsets.0..info.data_offsets.1];
    let t = match info.dtype {
        Dtype::F32 => Tensor::from_vec(from_le(data, f32::from_le_bytes), shape, device),
        Dtype::BF16 => Tensor::from_vec(from_le(data, bf16::from_le_bytes), shape, device),
        Dtype::F16 => Tensor::from_vec(from_le(data, f16::from_le_bytes), shape, device),
        Dtype::I32 => Tensor::from_vec(from_le(data, i32::from_le_bytes), shape, device),
        Dtype::U32 => Tensor::from_vec(from_le(data, u32::from_le_bytes), shape, device),
        other => return Err(format!("dtype {other}: expected one of f32, bf16, f16, i32, u32")),
    };
    t.map_err(|e| e.to_string())
}
