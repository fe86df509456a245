//! Checkpoints: bit-exact round trips of every dtype, optimizer state, step, metadata and
//! config; atomic writes; and a clear error for every way a file can be bad.

use half::{bf16, f16};
use safetensors::{tensor::TensorView, Dtype};
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
};
use vit_model::{
    checkpoint::{tmp_path, FORMAT_VERSION, KEY_CONFIG, KEY_PARAMS, KEY_STEP, KEY_VERSION},
    load_checkpoint, load_params_into, save_checkpoint, Checkpoint, ModelConfig, ModelError, ParamDiff, ParamStore,
    VisionTransformer,
};
use vit_tensor::{DType, Device, Tensor};

/// A fresh directory under the system temp dir (`tempfile`), removed when dropped (also on panic).
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new(name: &str) -> Self {
        TempDir(tempfile::Builder::new().prefix(&format!("vitrs-ckpt-test-{name}-")).tempdir().unwrap())
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.path().join(file)
    }

    /// File names in the directory, sorted.
    fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.0.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn cfg() -> ModelConfig {
    let mut c = ModelConfig::preset("Ti/16").unwrap();
    c.set("depth=2").unwrap();
    c
}

/// f32 values that a lossy path would change: signed zero, infinities, a subnormal, NaN with a payload.
fn tricky_f32() -> Vec<f32> {
    vec![0.0, -0.0, 1.0, -1.5, f32::INFINITY, f32::NEG_INFINITY, 1e-45, f32::from_bits(0x7fc0_1234), f32::MAX, 3.1]
}

/// Parameters in a deliberately unsorted order, mixing dtypes (safetensors sorts by dtype and name in the file).
fn mixed_store(seed: u64) -> ParamStore {
    let mut s = ParamStore::new();
    let randn = |shape: &[usize], dtype| Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, dtype, Device::Cpu).unwrap();
    s.insert("zeta.weight", randn(&[3, 4], DType::F32)).unwrap();
    s.insert("blocks.1.mlp.fc1.weight", randn(&[4, 2], DType::BF16)).unwrap();
    s.insert("alpha", Tensor::from_vec(tricky_f32(), [2, 5], Device::Cpu).unwrap()).unwrap();
    s.insert("blocks.0.attn.qkv.bias", randn(&[6], DType::F16)).unwrap();
    let bits: Vec<bf16> = [0x7fc1u16, 0x8000, 0x0001, 0xff80].map(bf16::from_bits).to_vec();
    s.insert("blocks.10.norm.scale", Tensor::from_vec(bits, [4], Device::Cpu).unwrap()).unwrap();
    let halfs: Vec<f16> = [0x7e01u16, 0x8000, 0x0001, 0xfc00].map(f16::from_bits).to_vec();
    s.insert("blocks.2.norm.bias", Tensor::from_vec(halfs, [2, 2], Device::Cpu).unwrap()).unwrap();
    s.insert("labels", Tensor::from_vec(vec![i32::MIN, -1, 0, 7, i32::MAX], [5], Device::Cpu).unwrap()).unwrap();
    s.insert("counts", Tensor::from_vec(vec![0u32, 1, u32::MAX], [3, 1], Device::Cpu).unwrap()).unwrap();
    s.insert("scalar", Tensor::from_vec(vec![2.5f32], Vec::<usize>::new(), Device::Cpu).unwrap()).unwrap();
    s
}

/// The tensor's elements as raw bit patterns, whatever its dtype.
fn bits(t: &Tensor) -> Vec<u32> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect(),
        DType::BF16 => t.to_vec::<bf16>().unwrap().into_iter().map(|x| x.to_bits() as u32).collect(),
        DType::F16 => t.to_vec::<f16>().unwrap().into_iter().map(|x| x.to_bits() as u32).collect(),
        DType::I32 => t.to_vec::<i32>().unwrap().into_iter().map(|x| x as u32).collect(),
        DType::U32 => t.to_vec::<u32>().unwrap(),
    }
}

/// Same names in the same order, same shapes, dtypes and bits.
fn assert_same_store(a: &ParamStore, b: &ParamStore) {
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    for ((name, x), (_, y)) in a.iter().zip(b.iter()) {
        assert_eq!(x.dims(), y.dims(), "{name}");
        assert_eq!(x.dtype(), y.dtype(), "{name}");
        assert_eq!(bits(x), bits(y), "{name}");
    }
}

fn err_of<T: std::fmt::Debug>(r: Result<T, ModelError>) -> String {
    let msg = r.unwrap_err().to_string();
    assert!(!msg.contains('\n'), "error messages are one line: {msg}");
    msg
}

/// Writes a safetensors file by hand: `meta` as `__metadata__`, F32 tensors `(name, values)`.
fn write_raw(path: &Path, meta: &[(&str, &str)], tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> =
        tensors.iter().map(|(n, dt, shape, bytes)| (*n, TensorView::new(*dt, shape.clone(), bytes).unwrap())).collect();
    let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A minimal valid vitrs header with one f32 parameter `w` of shape [2], changed by `edit`.
fn write_vitrs_raw(path: &Path, edit: impl FnOnce(&mut BTreeMap<&'static str, String>)) {
    let mut meta = BTreeMap::new();
    meta.insert(KEY_VERSION, FORMAT_VERSION.to_string());
    meta.insert(KEY_CONFIG, cfg().to_toml().unwrap());
    meta.insert(KEY_STEP, "3".to_string());
    meta.insert(KEY_PARAMS, "w".to_string());
    edit(&mut meta);
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    write_raw(path, &meta, &[("w", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))]);
}

#[test]
fn round_trip_is_bit_exact_in_every_dtype_and_keeps_order() {
    let dir = TempDir::new("roundtrip");
    let path = dir.path("step-1.safetensors");
    let params = mixed_store(1);
    save_checkpoint(&path, &Checkpoint::new(cfg(), params.clone())).unwrap();
    let back = load_checkpoint(&path, Device::Cpu).unwrap();
    assert_same_store(&params, &back.params);
    assert!(back.params.iter().all(|(_, t)| t.device() == Device::Cpu));
    assert!(back.optimizer.is_none());
    assert_eq!(back.step, 0);
    assert!(back.metadata.is_empty());
    // Parameter keys in the file are the parameter names (design §3), readable by any safetensors reader.
    let bytes = fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys = st.names();
    keys.sort_unstable();
    let mut names: Vec<&str> = params.names().collect();
    names.sort_unstable();
    assert_eq!(keys, names);
    assert_eq!(st.tensor("blocks.1.mlp.fc1.weight").unwrap().dtype(), Dtype::BF16);
}

#[test]
fn optimizer_state_step_and_metadata_round_trip() {
    let dir = TempDir::new("optimizer");
    let path = dir.path("step-123.safetensors");
    let params = mixed_store(2);
    // Optimizer state named exactly like the parameters: the `opt.` prefix in the file keeps them apart.
    let mut opt = ParamStore::new();
    for (name, t) in mixed_store(3).iter() {
        opt.insert(name, t.clone()).unwrap();
    }
    opt.insert("m.zeta.weight", Tensor::randn([3, 4], 0.0, 1.0, 4, DType::BF16, Device::Cpu).unwrap()).unwrap();
    let mut metadata = BTreeMap::new();
    metadata.insert("rng".to_string(), "pcg64 state=0x1234\nstream=7".to_string());
    metadata.insert("vitrs.step".to_string(), "a user key that looks reserved".to_string());
    metadata.insert("data.epoch".to_string(), String::new());
    let ckpt =
        Checkpoint { config: cfg(), params: params.clone(), optimizer: Some(opt.clone()), step: u64::MAX, metadata };
    save_checkpoint(&path, &ckpt).unwrap();
    let back = load_checkpoint(&path, Device::Cpu).unwrap();
    assert_same_store(&params, &back.params);
    assert_same_store(&opt, back.optimizer.as_ref().unwrap());
    assert_eq!(back.step, u64::MAX);
    assert_eq!(back.metadata, ckpt.metadata);

    // An empty optimizer store is not the same as none.
    let empty = Checkpoint { optimizer: Some(ParamStore::new()), step: 5, ..Checkpoint::new(cfg(), params) };
    save_checkpoint(&path, &empty).unwrap();
    let back = load_checkpoint(&path, Device::Cpu).unwrap();
    assert!(back.optimizer.unwrap().is_empty());
    assert_eq!(back.step, 5);
}

#[test]
fn config_round_trips() {
    let dir = TempDir::new("config");
    let path = dir.path("c.safetensors");
    let mut config = ModelConfig::preset("S/16").unwrap();
    for s in ["pool=gap", "posemb=sincos2d", "prelogits=384", "classes=10", "qk_norm=true", "remat=true"] {
        config.set(s).unwrap();
    }
    config.validate().unwrap();
    save_checkpoint(&path, &Checkpoint::new(config.clone(), mixed_store(4))).unwrap();
    assert_eq!(load_checkpoint(&path, Device::Cpu).unwrap().config, config);
}

#[test]
fn save_is_atomic_and_leaves_no_temp_file() {
    let dir = TempDir::new("atomic");
    let path = dir.path("step-7.safetensors");
    let first = Checkpoint { step: 7, ..Checkpoint::new(cfg(), mixed_store(5)) };
    save_checkpoint(&path, &first).unwrap();
    assert_eq!(dir.listing(), ["step-7.safetensors"]);
    assert!(!tmp_path(&path).exists());
    assert_eq!(
        tmp_path(&path).file_name().unwrap().to_string_lossy(),
        format!("step-7.safetensors.tmp-{}", std::process::id())
    );

    // Overwriting replaces the file whole.
    let second = Checkpoint { step: 8, ..Checkpoint::new(cfg(), mixed_store(6)) };
    save_checkpoint(&path, &second).unwrap();
    assert_eq!(dir.listing(), ["step-7.safetensors"]);
    let back = load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(back.step, 8);
    assert_same_store(&second.params, &back.params);

    // A stale temp file from a crashed writer does not get in the way, and is consumed.
    fs::write(tmp_path(&path), b"half-written garbage").unwrap();
    save_checkpoint(&path, &first).unwrap();
    assert_eq!(dir.listing(), ["step-7.safetensors"]);
    assert_eq!(load_checkpoint(&path, Device::Cpu).unwrap().step, 7);

    // A save that fails leaves the last good checkpoint and no temp file.
    let mut bad = mixed_store(7);
    bad.insert("opt.m", Tensor::zeros([1], DType::F32, Device::Cpu).unwrap()).unwrap();
    let e = err_of(save_checkpoint(&path, &Checkpoint::new(cfg(), bad)));
    assert_eq!(e, "parameter opt.m: names starting with \"opt.\" are reserved for optimizer state in checkpoints");
    assert_eq!(dir.listing(), ["step-7.safetensors"]);
    assert_eq!(load_checkpoint(&path, Device::Cpu).unwrap().step, 7);

    // Saving onto a directory is refused.
    let sub = dir.path("sub");
    fs::create_dir(&sub).unwrap();
    let e = err_of(save_checkpoint(&sub, &first));
    assert_eq!(e, format!("checkpoint {}: not a file: it is a directory", sub.display()));
}

#[test]
fn check_against_reports_every_difference_at_once() {
    let dir = TempDir::new("check");
    let path = dir.path("m.safetensors");
    let z = |shape: &[usize], dtype| Tensor::zeros(shape.to_vec(), dtype, Device::Cpu).unwrap();
    let mut saved = ParamStore::new();
    saved.insert("patch.weight", z(&[4, 3], DType::F32)).unwrap();
    saved.insert("head.weight", z(&[1000, 4], DType::F32)).unwrap();
    saved.insert("norm.scale", z(&[4], DType::BF16)).unwrap();
    saved.insert("extra.a", z(&[1], DType::F32)).unwrap();
    saved.insert("pos.emb", z(&[2, 4], DType::F16)).unwrap();
    saved.insert("extra.b", z(&[1], DType::F32)).unwrap();
    let mut model = ParamStore::new();
    model.insert("pos.emb", z(&[5, 4], DType::F32)).unwrap();
    model.insert("patch.weight", z(&[4, 3], DType::F32)).unwrap();
    model.insert("head.weight", z(&[10, 4], DType::F32)).unwrap();
    model.insert("head.bias", z(&[10], DType::F32)).unwrap();
    model.insert("norm.scale", z(&[4], DType::F32)).unwrap();
    model.insert("cls", z(&[1, 1, 4], DType::F32)).unwrap();
    save_checkpoint(&path, &Checkpoint::new(cfg(), saved)).unwrap();

    let ckpt = load_checkpoint(&path, Device::Cpu).unwrap();
    let diff = ParamDiff::between(&model, &ckpt.params);
    assert_eq!(diff.missing, ["head.bias", "cls"]);
    assert_eq!(diff.unexpected, ["extra.a", "extra.b"]);
    assert_eq!(
        diff.misshaped,
        [("pos.emb".to_string(), vec![5, 4], vec![2, 4]), ("head.weight".to_string(), vec![10, 4], vec![1000, 4])]
    );
    assert_eq!(
        diff.wrong_dtype,
        [("pos.emb".to_string(), DType::F32, DType::F16), ("norm.scale".to_string(), DType::F32, DType::BF16)]
    );
    let details = "missing 2 [head.bias, cls]; unexpected 2 [extra.a, extra.b]; \
        misshaped 2 [pos.emb: expected [5, 4], found [2, 4], head.weight: expected [10, 4], found [1000, 4]]; \
        wrong dtype 2 [pos.emb: expected f32, found f16, norm.scale: expected f32, found bf16]";
    assert_eq!(err_of(ckpt.check_against(&model)), format!("checkpoint parameters do not match the model: {details}"));
    let before = model.clone();
    assert_eq!(
        err_of(load_params_into(&path, &mut model)),
        format!("checkpoint {}: parameters do not match the model: {details}", path.display())
    );
    assert_same_store(&before, &model); // untouched on error
    assert!(ckpt.check_against(&ckpt.params).is_ok());
    assert_eq!(
        err_of(ckpt.check_optimizer_against(&model)),
        "parameter optimizer state: the checkpoint has none (saved without an optimizer)"
    );
}

#[test]
fn load_params_into_copies_in_the_models_order() {
    let dir = TempDir::new("into");
    let path = dir.path("p.safetensors");
    let saved = mixed_store(8);
    let mut opt = ParamStore::new();
    opt.insert("v.alpha", Tensor::randn([2, 5], 0.0, 1.0, 9, DType::F32, Device::Cpu).unwrap()).unwrap();
    save_checkpoint(
        &path,
        &Checkpoint { optimizer: Some(opt.clone()), step: 42, ..Checkpoint::new(cfg(), saved.clone()) },
    )
    .unwrap();
    // A "fresh model" with the same names in another order, other values.
    let mut model = ParamStore::new();
    let mut names: Vec<&str> = saved.names().collect();
    names.reverse();
    for name in &names {
        let t = saved.get(name).unwrap();
        model.insert(*name, Tensor::zeros(t.shape().clone(), t.dtype(), Device::Cpu).unwrap()).unwrap();
    }
    let ckpt = load_params_into(&path, &mut model).unwrap();
    assert_eq!(model.names().collect::<Vec<_>>(), names);
    assert_eq!(ckpt.params.names().collect::<Vec<_>>(), names);
    for name in names {
        assert_eq!(bits(model.get(name).unwrap()), bits(saved.get(name).unwrap()), "{name}");
    }
    assert_eq!(ckpt.step, 42);
    ckpt.check_optimizer_against(&opt).unwrap();
    assert_same_store(&opt, ckpt.optimizer.as_ref().unwrap());
}

#[test]
fn not_a_file_or_missing() {
    let dir = TempDir::new("notafile");
    let e = err_of(load_checkpoint(dir.0.path(), Device::Cpu));
    assert_eq!(e, format!("checkpoint {}: not a file: it is a directory", dir.0.path().display()));
    let missing = dir.path("nope.safetensors");
    let e = err_of(load_checkpoint(&missing, Device::Cpu));
    assert!(e.starts_with(&format!("checkpoint {}: cannot open: ", missing.display())), "{e}");
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn truncated_files_say_truncated() {
    let dir = TempDir::new("truncated");
    let good = dir.path("good.safetensors");
    save_checkpoint(&good, &Checkpoint::new(cfg(), mixed_store(9))).unwrap();
    let bytes = fs::read(&good).unwrap();
    let len = bytes.len();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let cut = dir.path("cut.safetensors");
    let load_cut = |n: usize| {
        fs::write(&cut, &bytes[..n]).unwrap();
        err_of(load_checkpoint(&cut, Device::Cpu))
    };
    let p = cut.display();

    // Cut inside the tensor data: the most likely interrupted copy.
    assert_eq!(
        load_cut(len - 1),
        format!("checkpoint {p}: truncated: {} bytes, expected {len} (1 bytes of tensor data missing)", len - 1)
    );
    let data = len - 8 - header;
    assert_eq!(
        load_cut(8 + header),
        format!(
            "checkpoint {p}: truncated: {} bytes, expected {len} ({data} bytes of tensor data missing)",
            8 + header
        )
    );
    // Cut inside the header.
    assert_eq!(
        load_cut(8 + header / 2),
        format!(
            "checkpoint {p}: truncated: {} bytes, but the header alone needs {} (cut short inside the header)",
            8 + header / 2,
            8 + header
        )
    );
    // Cut inside the length prefix, and empty.
    for n in [5, 0] {
        assert_eq!(
            load_cut(n),
            format!(
                "checkpoint {p}: truncated: {n} bytes; a safetensors file starts with an 8-byte header length \
                 (empty file or cut short?)"
            )
        );
    }
    // The good file still loads, and extra bytes at the end are corruption, not truncation.
    load_checkpoint(&good, Device::Cpu).unwrap();
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"xyz");
    fs::write(&cut, &longer).unwrap();
    assert_eq!(
        err_of(load_checkpoint(&cut, Device::Cpu)),
        format!("checkpoint {p}: corrupt: 3 unexpected bytes after the tensor data")
    );
}

#[test]
fn corrupt_headers_say_corrupt() {
    let dir = TempDir::new("corrupt");
    let path = dir.path("bad.safetensors");
    let p = path.display().to_string();

    // Plain garbage: the length prefix makes no sense.
    fs::write(&path, b"this is not a checkpoint, just some text\n").unwrap();
    let e = err_of(load_checkpoint(&path, Device::Cpu));
    assert_eq!(
        e,
        format!(
            "checkpoint {p}: corrupt: header length {} bytes is impossible (expected 2..=100000000): \
             not a safetensors file",
            u64::from_le_bytes(*b"this is ")
        )
    );

    // A valid file whose header bytes are overwritten with garbage (not UTF-8).
    save_checkpoint(&path, &Checkpoint::new(cfg(), mixed_store(10))).unwrap();
    let good = fs::read(&path).unwrap();
    let mut bytes = good.clone();
    bytes[8..40].fill(0xff);
    fs::write(&path, &bytes).unwrap();
    let e = err_of(load_checkpoint(&path, Device::Cpu));
    assert!(e.starts_with(&format!("checkpoint {p}: corrupt: header is not UTF-8 (")), "{e}");
    assert!(e.ends_with("): garbage bytes?"), "{e}");

    // Valid UTF-8 that is not JSON.
    let mut bytes = good.clone();
    bytes[8..40].copy_from_slice(b"hello, world! not json at all...");
    fs::write(&path, &bytes).unwrap();
    let e = err_of(load_checkpoint(&path, Device::Cpu));
    assert!(e.starts_with(&format!("checkpoint {p}: corrupt: header is not a safetensors JSON table: ")), "{e}");

    // JSON whose tensor table is inconsistent (a tensor's bytes do not match its shape).
    write_raw(&path, &[], &[("w", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))]);
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.windows(11).position(|w| w == b"\"shape\":[2]").unwrap();
    bytes[at + 9] = b'3';
    fs::write(&path, &bytes).unwrap();
    let e = err_of(load_checkpoint(&path, Device::Cpu));
    assert_eq!(e, format!("checkpoint {p}: corrupt: bad tensor table: invalid shape, data type, or offset for tensor"));
}

#[test]
fn format_version_missing_or_unknown() {
    let dir = TempDir::new("version");
    let path = dir.path("v.safetensors");
    let p = path.display().to_string();
    // A plain safetensors file (timm weights, say).
    write_raw(&path, &[("format", "pt")], &[("w", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))]);
    assert_eq!(
        err_of(load_checkpoint(&path, Device::Cpu)),
        format!("checkpoint {p}: no format version (vitrs.format_version in the safetensors metadata): not a vitrs checkpoint")
    );
    write_vitrs_raw(&path, |m| {
        m.insert(KEY_VERSION, "2".into());
    });
    assert_eq!(
        err_of(load_checkpoint(&path, Device::Cpu)),
        format!("checkpoint {p}: format version \"2\": expected 1 (written by another vitrs version?)")
    );
    // The hand-written baseline itself loads.
    write_vitrs_raw(&path, |_| {});
    let ok = load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!((ok.step, ok.params.len()), (3, 1));
}

#[test]
fn bad_metadata_names_the_key() {
    let dir = TempDir::new("metadata");
    let path = dir.path("m.safetensors");
    let p = path.display().to_string();
    let load = |edit: &dyn Fn(&mut BTreeMap<&'static str, String>)| {
        write_vitrs_raw(&path, edit);
        err_of(load_checkpoint(&path, Device::Cpu))
    };
    assert_eq!(
        load(&|m| {
            m.insert(KEY_CONFIG, "width = \"wide\"\n".into());
        }),
        format!("checkpoint {p}: metadata vitrs.config: model config TOML line 1: invalid type: string \"wide\", expected usize")
    );
    assert_eq!(
        load(&|m| {
            m.insert(KEY_CONFIG, "width = 100\n".into());
        }),
        format!("checkpoint {p}: metadata vitrs.config: model config: width = 100: expected a multiple of heads (3)")
    );
    assert_eq!(
        load(&|m| {
            m.remove(KEY_CONFIG);
        }),
        format!("checkpoint {p}: metadata vitrs.config: missing")
    );
    assert_eq!(
        load(&|m| {
            m.insert(KEY_STEP, "-1".into());
        }),
        format!("checkpoint {p}: metadata vitrs.step: \"-1\": expected a non-negative integer")
    );
    assert_eq!(
        load(&|m| {
            m.remove(KEY_PARAMS);
        }),
        format!("checkpoint {p}: metadata vitrs.params: missing")
    );
    assert_eq!(
        load(&|m| {
            m.insert(KEY_PARAMS, "w\nw".into());
        }),
        format!("checkpoint {p}: metadata vitrs.params: w is listed twice")
    );
    assert_eq!(
        load(&|m| {
            m.insert(KEY_PARAMS, "w\nhead.bias".into());
        }),
        format!("checkpoint {p}: tensor head.bias: listed in the metadata but not in the file")
    );
    assert_eq!(
        load(&|m| {
            m.insert(KEY_PARAMS, String::new());
        }),
        format!(
            "checkpoint {p}: tensor w: in the file but not listed in the metadata (vitrs.params / vitrs.optimizer)"
        )
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = TempDir::new("dtype");
    let path = dir.path("d.safetensors");
    let meta = [
        (KEY_VERSION, FORMAT_VERSION.to_string()),
        (KEY_CONFIG, cfg().to_toml().unwrap()),
        (KEY_STEP, "0".to_string()),
        (KEY_PARAMS, "w".to_string()),
    ];
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    write_raw(&path, &meta, &[("w", Dtype::F64, vec![1], 1.0f64.to_le_bytes().to_vec())]);
    assert_eq!(
        err_of(load_checkpoint(&path, Device::Cpu)),
        format!("checkpoint {}: tensor w: dtype F64: expected one of f32, bf16, f16, i32, u32", path.display())
    );
}

#[test]
fn bad_names_are_refused_at_save() {
    let dir = TempDir::new("names");
    let path = dir.path("n.safetensors");
    let mut s = ParamStore::new();
    s.insert("a\nb", Tensor::zeros([1], DType::F32, Device::Cpu).unwrap()).unwrap();
    assert_eq!(
        err_of(save_checkpoint(&path, &Checkpoint::new(cfg(), s))),
        "parameter \"a\\nb\": a checkpoint name must be non-empty and hold no newline"
    );
    assert!(dir.listing().is_empty());
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_tensors_are_saved_from_and_loaded_to_the_gpu() {
    assert!(vit_tensor::cuda::available(), "no CUDA device");
    let dir = TempDir::new("cuda");
    let path = dir.path("g.safetensors");
    let host = mixed_store(11);
    let mut gpu = ParamStore::new();
    for (name, t) in host.iter() {
        gpu.insert(name, t.to_device(Device::Cuda(0)).unwrap()).unwrap();
    }
    save_checkpoint(&path, &Checkpoint::new(cfg(), gpu)).unwrap();
    let on_cpu = load_checkpoint(&path, Device::Cpu).unwrap();
    assert_same_store(&host, &on_cpu.params);
    let on_gpu = load_checkpoint(&path, Device::Cuda(0)).unwrap();
    assert!(on_gpu.params.iter().all(|(_, t)| t.device() == Device::Cuda(0)));
    assert_same_store(&host, &on_gpu.params);
}

#[test]
fn read_safetensors_reads_plain_files_in_data_order() {
    let dir = TempDir::new("plain");
    let path = dir.path("timm.safetensors");
    write_raw(
        &path,
        &[("format", "pt")],
        &[
            ("b", Dtype::F32, vec![2], f32_bytes(&[1.0, -0.0])),
            ("a", Dtype::I32, vec![1, 1], 7i32.to_le_bytes().to_vec()),
            ("c", Dtype::BF16, vec![1], bf16::from_bits(0x7fc1).to_le_bytes().to_vec()),
        ],
    );
    let got = vit_model::checkpoint::read_safetensors(&path).unwrap();
    // safetensors lays the data out by dtype (f32, then i32, then bf16 here), then by name.
    assert_eq!(got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["b", "a", "c"]);
    assert_eq!(bits(&got[0].1), [1.0f32.to_bits(), (-0.0f32).to_bits()]);
    assert_eq!(bits(&got[1].1), [7]);
    assert_eq!(got[1].1.dims(), [1, 1]);
    assert_eq!(bits(&got[2].1), [0x7fc1]);
    assert!(got.iter().all(|(_, t)| t.device() == Device::Cpu));

    write_raw(&path, &[], &[("w", Dtype::I64, vec![1], 1i64.to_le_bytes().to_vec())]);
    assert_eq!(
        err_of(vit_model::checkpoint::read_safetensors(&path)),
        format!("checkpoint {}: tensor w: dtype I64: expected one of f32, bf16, f16, i32, u32", path.display())
    );
}

/// Checking a checkpoint against a model's declared shapes (nothing allocated) gives what
/// checking it against a freshly initialised store of that model gives, error text included.
#[test]
fn check_against_model_equals_checking_a_fresh_init() {
    let model_of = |sets: &[&str]| {
        let mut c = cfg();
        for s in sets {
            c.set(s).unwrap();
        }
        VisionTransformer::new(&c, DType::F32, Device::Cpu).unwrap()
    };
    let saved = model_of(&[]).init_params(3, DType::F32, Device::Cpu).unwrap();
    let ckpt = Checkpoint::new(cfg(), saved);
    assert!(ckpt.check_against_model(&model_of(&[])).is_ok());
    for other in [&["classes=7"][..], &["depth=3"], &["pool=tok"], &["pool=gap"], &["width=96", "heads=3"]] {
        let model = model_of(other);
        let fresh = model.init_params(0, DType::F32, Device::Cpu).unwrap();
        let want = err_of(ckpt.check_against(&fresh));
        assert!(want.starts_with("checkpoint parameters do not match the model"), "{other:?}: {want}");
        assert_eq!(err_of(ckpt.check_against_model(&model)), want, "{other:?}");
    }
    let bf16 = Checkpoint::new(cfg(), ckpt.params.cast(DType::BF16).unwrap());
    assert!(err_of(bf16.check_against_model(&model_of(&[]))).contains("wrong dtype"));
}
