//! The CPU this process runs on, as the kernels see it: its name and the widest vector
//! instructions the dispatched kernels use.
//!
//! A run's speed depends on both. The same 2-core VM has run on a CPU with AVX-512 and on a
//! Zen 3 without it, and the second ran the GEMMs at about half the speed (docs/perf.md).
//! The `gemm` crate's microkernels for the two instruction sets also sum in different orders,
//! so the last bits of a result can differ between them: a run resumes bit for bit on a CPU
//! with the same kernels. `vit train` writes this into `summary.json`, and `vit bench` prints it.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

/// The widest vector instructions that `gemm` and the `multiversion!` kernels dispatch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SimdLevel {
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Neither: the target's baseline (SSE2 on x86-64, or a non-x86 CPU).
    Baseline,
}

/// [`SimdLevel::detect`]'s answer once known: 0 not yet, else the level's code + 1.
static DETECTED: AtomicU8 = AtomicU8::new(0);

impl SimdLevel {
    /// The level of this CPU: `Avx512` where it has AVX-512F, AVX2 and FMA (what the AVX-512
    /// copies of the kernels are compiled for), `Avx2` where it has AVX2 and FMA. Detected on
    /// the first call and then one relaxed load, since `multiversion!` asks on every call.
    #[inline]
    pub fn detect() -> SimdLevel {
        match DETECTED.load(Ordering::Relaxed) {
            1 => SimdLevel::Avx512,
            2 => SimdLevel::Avx2,
            3 => SimdLevel::Baseline,
            _ => {
                let level = Self::probe();
                DETECTED.store(level as u8 + 1, Ordering::Relaxed);
                level
            }
        }
    }

    fn probe() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2_fma = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            if avx2_fma && std::arch::is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            if avx2_fma {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Baseline
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SimdLevel::Avx512 => "AVX-512",
            SimdLevel::Avx2 => "AVX2+FMA",
            SimdLevel::Baseline => "baseline SIMD",
        })
    }
}

/// What a run reports about its CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// The model name, with the x86 family and model numbers where the OS gives them
    /// (`AMD EPYC (family 25, model 1)`); `unknown CPU` where it does not.
    pub model: String,
    /// The kernels' instruction set.
    pub simd: SimdLevel,
    /// Whether bf16 GEMMs (`MatmulPrecision::Bf16`) run on AMX tiles ([`super::amx_available`]).
    pub amx: bool,
}

impl CpuInfo {
    /// This machine's CPU (Linux: from `/proc/cpuinfo`).
    pub fn detect() -> CpuInfo {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        CpuInfo { model: model_from_cpuinfo(&text), simd: SimdLevel::detect(), amx: super::amx_available() }
    }
}

impl fmt::Display for CpuInfo {
    /// `AMD EPYC (family 25, model 1), AVX2+FMA kernels`, and `, AMX tiles for bf16 GEMMs`
    /// where the CPU has them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, {} kernels", self.model, self.simd)?;
        if self.amx {
            f.write_str(", AMX tiles for bf16 GEMMs")?;
        }
        Ok(())
    }
}

/// The first processor's `model name`, `cpu family` and `model` lines of a `/proc/cpuinfo` text.
fn model_from_cpuinfo(text: &str) -> String {
    // The first block describes processor 0; a VM's processors are all alike.
    let block = text.split("\n\n").next().unwrap_or("");
    let field = |key: &str| {
        block.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string()).filter(|v| !v.is_empty())
        })
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".to_string());
    match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!("{name} (family {family}, model {model})"),
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_line_names_the_first_processor_with_its_family_and_model() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n\
                    model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\ncpu family\t: 26\n\
                    model\t\t: 2\nmodel name\t: Other\n";
        assert_eq!(model_from_cpuinfo(text), "AMD EPYC (family 25, model 1)");
        // No family (an ARM /proc/cpuinfo), no name, nothing at all.
        assert_eq!(model_from_cpuinfo("processor : 0\nmodel name : Neoverse-N1\n"), "Neoverse-N1");
        assert_eq!(
            model_from_cpuinfo("processor : 0\ncpu family : 6\nmodel : 85\n"),
            "unknown CPU (family 6, model 85)"
        );
        assert_eq!(model_from_cpuinfo(""), "unknown CPU");
    }

    #[test]
    fn the_level_is_the_one_the_dispatched_kernels_take() {
        let level = SimdLevel::detect();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f");
            assert_eq!(level == SimdLevel::Avx512, avx512);
            assert_eq!(level == SimdLevel::Avx2, !avx512 && avx2);
        }
        // The cached answer is the probed one, call after call.
        assert_eq!((SimdLevel::detect(), SimdLevel::probe()), (level, level));
        let shown = CpuInfo { model: "X".into(), simd: level, amx: false }.to_string();
        assert!(shown.starts_with("X, ") && shown.ends_with(" kernels"), "{shown}");
        let shown = CpuInfo { model: "X".into(), simd: level, amx: true }.to_string();
        assert!(shown.ends_with(" kernels, AMX tiles for bf16 GEMMs"), "{shown}");
    }
}
