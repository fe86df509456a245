//! NVRTC: compiles the embedded `kernels/*.cu` to CUBIN for one architecture, with ptxas's
//! report, and caches the result by source hash, arch and NVRTC version (design §4).
//!
//! Kernels include no CUDA headers (bf16/f16 conversions are inline PTX in `common.cuh`), so
//! NVRTC needs no include paths. A `#include "x.cuh"` of one of our own headers is expanded here.

use crate::{Error, Result};
use cudarc::nvrtc::{result, sys};
use std::{
    collections::HashMap,
    ffi::{CStr, CString},
    hash::{DefaultHasher, Hash, Hasher},
    path::PathBuf,
    sync::{Mutex, OnceLock},
};

/// Every kernel source file, by name, embedded at build time.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../../kernels/common.cuh")),
    ("vec.cuh", include_str!("../../../../kernels/vec.cuh")),
    ("elementwise.cu", include_str!("../../../../kernels/elementwise.cu")),
    ("norm.cu", include_str!("../../../../kernels/norm.cu")),
    ("softmax.cu", include_str!("../../../../kernels/softmax.cu")),
    ("attention.cu", include_str!("../../../../kernels/attention.cu")),
    ("reduce.cu", include_str!("../../../../kernels/reduce.cu")),
    ("index.cu", include_str!("../../../../kernels/index.cu")),
    ("patch.cu", include_str!("../../../../kernels/patch.cu")),
    ("im2col.cu", include_str!("../../../../kernels/im2col.cu")),
    ("layout.cu", include_str!("../../../../kernels/layout.cu")),
    ("flash_attention.cu", include_str!("../../../../kernels/flash_attention.cu")),
    ("routing.cu", include_str!("../../../../kernels/routing.cu")),
    ("moe_dispatch.cu", include_str!("../../../../kernels/moe_dispatch.cu")),
];

/// The architectures CI compiles every kernel for.
pub const CI_ARCHS: &[&str] = &["sm_90a", "sm_80"];

/// The source of `kernels/<file>` with our own `#include "*.cuh"` lines expanded.
pub fn kernel_source(file: &str) -> Option<String> {
    let raw = KERNEL_FILES.iter().find(|(n, _)| *n == file)?.1;
    Some(expand_includes(raw))
}

/// `src` with every `#include "x"` of a file in [`KERNEL_FILES`] (e.g. `common.cuh`) replaced
/// by that file's text, recursively; other lines are kept as they are (an unknown include is
/// left for NVRTC to report). Crates above vit-tensor use this for their own kernel sources.
pub fn expand_includes(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let included =
            line.trim().strip_prefix("#include \"").and_then(|rest| rest.strip_suffix('"')).and_then(kernel_source);
        match included {
            Some(text) => out.push_str(&text),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The CI check of one kernel source (design §4): `src` (with its includes expanded by
/// [`expand_includes`]) compiled for `arch` with ptxas's `-v` report. Errors when NVRTC is
/// missing, when the source does not compile ([`Error::Compile`] naming `name` and carrying the
/// log), or when the log holds no ptxas report; register spills are in [`Compiled::spills`].
pub fn compile_check(name: &str, src: &str, arch: &str) -> Result<Compiled> {
    let c = compile(name, &expand_includes(src), arch)?;
    if c.cubin.is_empty() || !c.log.contains("ptxas info") {
        return Err(Error::Compile {
            file: name.to_string(),
            arch: arch.to_string(),
            log: format!("expected a CUBIN and ptxas's -v report, got {} bytes and the log:\n{}", c.cubin.len(), c.log),
        });
    }
    Ok(c)
}

/// Every problem [`compile_check`] finds in `src` for each of [`CI_ARCHS`]: compile errors and
/// register spills, one line each (`name (arch): ...`); empty when the source is clean.
pub fn ci_failures(name: &str, src: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for arch in CI_ARCHS {
        match compile_check(name, src, arch) {
            Err(e) => failures.push(format!("{name} ({arch}): {e}")),
            Ok(c) => {
                for (kernel, bytes) in c.spills() {
                    failures.push(format!("{name} ({arch}): {kernel} spills {bytes} bytes"));
                }
            }
        }
    }
    failures
}

/// What NVRTC produced for one file: the CUBIN and the compiler's log (ptxas `-v` report).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

impl Compiled {
    /// Functions that spill registers to local memory, from ptxas's report: `(kernel, bytes)`.
    pub fn spills(&self) -> Vec<(String, u64)> {
        let mut current = String::new();
        let mut out = Vec::new();
        for line in self.log.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                current = rest.split('\'').next().unwrap_or("").to_string();
            }
            for part in line.split(',') {
                let part = part.trim();
                if part.ends_with("bytes spill stores") || part.ends_with("bytes spill loads") {
                    let n: u64 = part.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    if n > 0 {
                        out.push((current.clone(), n));
                    }
                }
            }
        }
        out
    }
}

/// The error for a missing NVRTC library (cudarc would panic on first use: ask first).
fn nvrtc_missing() -> Error {
    Error::Cuda(
        "the NVRTC library (libnvrtc.so) was not found; put its folder on LD_LIBRARY_PATH (scripts/test.sh installs it)"
            .into(),
    )
}

/// NVRTC's version as `(major, minor)`; an error, never a panic, when the library is missing.
pub fn version() -> Result<(i32, i32)> {
    if !super::nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// Compiles `src` (named `file` in messages) to CUBIN for `arch` (`sm_90a`, `sm_80`, ...).
pub fn compile(file: &str, src: &str, arch: &str) -> Result<Compiled> {
    if !super::nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let csrc = CString::new(src).map_err(|_| Error::Cuda(format!("{file} contains a NUL byte")))?;
    let cname = CString::new(file).map_err(|_| Error::Cuda(format!("bad kernel file name {file:?}")))?;
    let prog =
        result::create_program(&csrc, Some(&cname)).map_err(|e| Error::Cuda(format!("nvrtcCreateProgram: {e:?}")))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "-lineinfo".to_string(),
    ];
    // SAFETY: prog is a live program; options are plain strings.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = match compiled {
        Err(_) => Err(Error::Compile { file: file.to_string(), arch: arch.to_string(), log }),
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: size is an out-parameter; the buffer has exactly that many bytes.
            let cubin = unsafe {
                sys::nvrtcGetCUBINSize(prog, &mut size).result().and_then(|_| {
                    let mut buf = vec![0u8; size];
                    sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()).result().map(|_| buf)
                })
            }
            .map_err(|e| Error::Cuda(format!("nvrtcGetCUBIN for {file} ({arch}): {e:?}")))?;
            Ok(Compiled { cubin, log })
        }
    };
    // SAFETY: prog is not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// The CUBIN of `src` for `arch`, from the in-memory cache, then the disk cache
/// (`$VITRS_KERNEL_CACHE`, default `~/.cache/vitrs/kernels`), then NVRTC.
pub fn compile_cached(file: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    static MEMORY: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    let (major, minor) = version()?;
    let mut h = DefaultHasher::new();
    src.hash(&mut h);
    let key = format!("{}-{:016x}-{arch}-nvrtc{major}.{minor}", file.trim_end_matches(".cu"), h.finish());
    let memory = MEMORY.get_or_init(Default::default);
    if let Some(c) = memory.lock().expect("kernel cache poisoned").get(&key) {
        return Ok(c.clone());
    }
    let path = cache_dir().map(|d| d.join(format!("{key}.cubin")));
    let cubin = match path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        Some(c) if !c.is_empty() => c,
        _ => {
            let c = compile(file, src, arch)?.cubin;
            if let Some(p) = &path {
                // Write-then-rename so a concurrent reader never sees half a file; a cache that
                // cannot be written only costs a recompile next time.
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::create_dir_all(p.parent().expect("cache path has a parent")).is_ok()
                    && std::fs::write(&tmp, &c).is_ok()
                {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
            c
        }
    };
    memory.lock().expect("kernel cache poisoned").insert(key, cubin.clone());
    Ok(cubin)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("VITRS_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vitrs/kernels"))
}
