//! Collective matmul (all-gather-matmul, matmul-reduce-scatter) on `LocalGroup` with 1–4 ranks,
//! both modes, both weight layouts, f32 and bf16, against the unsharded matmul computed on one
//! thread from every rank's shards.

mod common;

use common::{bits, values};
use std::time::Duration;
use vit_collective::{
    all_gather_matmul, matmul_reduce_scatter, Communicator, Error, LinkModel, LocalGroup, MatmulComm, Throttled,
};
use vit_tensor::{DType, Device, Tensor};

const MODES: [MatmulComm; 2] = [MatmulComm::Ring, MatmulComm::Plain];
/// A hang becomes a `Timeout` error, which fails the tests that expect other errors.
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(20));

fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, seed, dtype, Device::Cpu).expect("randn")
}

/// `w` as `[N, K]` when `transpose_w`, else `[K, N]`.
fn weight(n_out: usize, k: usize, transpose_w: bool, seed: u64, dtype: DType) -> Tensor {
    let dims = if transpose_w { [n_out, k] } else { [k, n_out] };
    randn(&dims, seed, dtype)
}

/// `a · op(w)` in f64 on one thread, with `Σ|a_ik · w_kj|` per element (for the tolerance).
fn reference(a: &Tensor, w: &Tensor, transpose_w: bool) -> (Vec<f64>, Vec<f64>) {
    let (m, k) = (a.dims()[0], a.dims()[1]);
    let n = if transpose_w { w.dims()[0] } else { w.dims()[1] };
    let (av, wv) = (values(a), values(w));
    let mut out = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let wk = if transpose_w { wv[j * k + p] } else { wv[p * n + j] };
                let t = f64::from(av[i * k + p]) * f64::from(wk);
                out[i * n + j] += t;
                mag[i * n + j] += t.abs();
            }
        }
    }
    (out, mag)
}

/// Relative tolerance (to `Σ|a·w|`) of a result in `dtype` after `roundings` roundings.
fn tol(dtype: DType, roundings: usize) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 2f64.powi(-8) * (roundings as f64 + 1.0),
    }
}

fn assert_close(got: &Tensor, want: &(Vec<f64>, Vec<f64>), rel: f64, what: &str) {
    let g = values(got);
    assert_eq!(g.len(), want.0.len(), "{what}: element count");
    for (i, (&g, (&w, &m))) in g.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(err <= rel * m + 1e-6, "{what}: element {i} is {g}, the unsharded matmul gives {w} (|a·w| sum {m})");
    }
}

fn concat(ts: &[Tensor]) -> Tensor {
    vit_tensor::ops::concat(&ts.iter().collect::<Vec<_>>(), 0).expect("concat")
}

#[test]
fn all_gather_matmul_equals_the_unsharded_matmul() {
    let (r, k, n_out) = (5, 24, 7);
    for n in 1..=4 {
        for dtype in [DType::F32, DType::BF16] {
            for transpose_w in [true, false] {
                for mode in MODES {
                    let seed = 100 * n as u64;
                    let xs: Vec<Tensor> = (0..n).map(|i| randn(&[r, k], seed + i as u64, dtype)).collect();
                    // Column-sharded weights: each rank its own.
                    let ws: Vec<Tensor> =
                        (0..n).map(|i| weight(n_out, k, transpose_w, seed + 50 + i as u64, dtype)).collect();
                    let out = LocalGroup::run_with_timeout(n, TIMEOUT, |comm| {
                        let i = comm.rank();
                        all_gather_matmul(&comm, &xs[i], &ws[i], transpose_w, mode)
                    });
                    let full_x = concat(&xs);
                    for (i, o) in out.into_iter().enumerate() {
                        let what = format!("n={n} {dtype} transpose_w={transpose_w} {mode} rank {i}");
                        let (y, gathered) = o.unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_eq!(y.dims(), &[n * r, n_out], "{what}");
                        assert_eq!((y.dtype(), y.device()), (dtype, Device::Cpu), "{what}");
                        assert_eq!(gathered.dims(), &[n * r, k], "{what}");
                        assert_eq!(bits(&gathered), bits(&full_x), "{what}: gathered x");
                        assert_close(&y, &reference(&full_x, &ws[i], transpose_w), tol(dtype, 1), &what);
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_reduce_scatter_equals_the_unsharded_matmul() {
    let (r, n_out) = (3, 6);
    for n in 1..=4 {
        for dtype in [DType::F32, DType::BF16] {
            for transpose_w in [true, false] {
                for mode in MODES {
                    let seed = 1000 + 100 * n as u64;
                    // Row-sharded weights on the contracting dim: shards of 16 + 4·rank columns
                    // (uneven, as they may be), the activations' matching columns.
                    let ks: Vec<usize> = (0..n).map(|i| 16 + 4 * i).collect();
                    let xs: Vec<Tensor> = (0..n).map(|i| randn(&[n * r, ks[i]], seed + i as u64, dtype)).collect();
                    let ws: Vec<Tensor> =
                        (0..n).map(|i| weight(n_out, ks[i], transpose_w, seed + 50 + i as u64, dtype)).collect();
                    let out = LocalGroup::run_with_timeout(n, TIMEOUT, |comm| {
                        let i = comm.rank();
                        matmul_reduce_scatter(&comm, &xs[i], &ws[i], transpose_w, mode)
                    });
                    // The unsharded matmul: x with every rank's columns times w with every
                    // rank's rows of the contracting dim.
                    let full_x = {
                        let v: Vec<Vec<f32>> = xs.iter().map(values).collect();
                        let ktot: usize = ks.iter().sum();
                        let mut rows = Vec::with_capacity(n * r * ktot);
                        for row in 0..n * r {
                            for (i, vi) in v.iter().enumerate() {
                                rows.extend_from_slice(&vi[row * ks[i]..(row + 1) * ks[i]]);
                            }
                        }
                        Tensor::from_f32(rows, [n * r, ktot], DType::F32, Device::Cpu).unwrap()
                    };
                    let full_w = if transpose_w {
                        let v: Vec<Vec<f32>> = ws.iter().map(values).collect();
                        let ktot: usize = ks.iter().sum();
                        let mut rows = Vec::with_capacity(n_out * ktot);
                        for j in 0..n_out {
                            for (i, vi) in v.iter().enumerate() {
                                rows.extend_from_slice(&vi[j * ks[i]..(j + 1) * ks[i]]);
                            }
                        }
                        Tensor::from_f32(rows, [n_out, ktot], DType::F32, Device::Cpu).unwrap()
                    } else {
                        concat(&ws.iter().map(|w| w.cast(DType::F32).unwrap()).collect::<Vec<_>>())
                    };
                    let (want, mag) = reference(&full_x, &full_w, transpose_w);
                    for (i, o) in out.into_iter().enumerate() {
                        let what = format!("n={n} {dtype} transpose_w={transpose_w} {mode} rank {i}");
                        let y = o.unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_eq!(y.dims(), &[r, n_out], "{what}");
                        assert_eq!((y.dtype(), y.device()), (dtype, Device::Cpu), "{what}");
                        let rows = i * r * n_out..(i + 1) * r * n_out;
                        let want = (want[rows.clone()].to_vec(), mag[rows].to_vec());
                        assert_close(&y, &want, tol(dtype, n), &what);
                    }
                }
            }
        }
    }
}

#[test]
fn ring_gives_the_same_bits_run_to_run() {
    for n in [2, 3, 4] {
        for dtype in [DType::F32, DType::BF16] {
            let run = || {
                LocalGroup::run_with_timeout(n, TIMEOUT, |comm| {
                    let i = comm.rank() as u64;
                    // Delays that reorder the ranks' arrival differently on each run.
                    std::thread::sleep(Duration::from_micros(fastrand(i) % 3000));
                    let x = randn(&[4, 32], 7 + i, dtype);
                    let w = weight(9, 32, true, 70 + i, dtype);
                    let (y, _) = all_gather_matmul(&comm, &x, &w, true, MatmulComm::Ring).unwrap();
                    let xr = randn(&[4 * n, 32], 17 + i, dtype);
                    let z = matmul_reduce_scatter(&comm, &xr, &w, true, MatmulComm::Ring).unwrap();
                    (bits(&y), bits(&z))
                })
            };
            assert_eq!(run(), run(), "n={n} {dtype}");
        }
    }
}

/// A few pseudo-random bits from the clock and `salt`, for timing jitter only.
fn fastrand(salt: u64) -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    (t ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0x2545_F491_4F6C_DD1D) >> 7
}

#[test]
fn bad_shapes_are_errors_on_every_rank() {
    type Case = (&'static str, Vec<usize>, Vec<usize>, bool, &'static str);
    // (which op, x dims, w dims, transpose_w, what the message must name)
    let cases: Vec<Case> = vec![
        ("ag", vec![2, 3, 4], vec![5, 4], true, "expected x as [rows, K], got [2, 3, 4]"),
        ("ag", vec![2, 4], vec![5, 4, 1], true, "expected w as [N, K] (transpose_w = true), got [5, 4, 1]"),
        (
            "ag",
            vec![2, 4],
            vec![5, 3],
            true,
            "x [2, 4] and w [5, 3] (as [N, K] (transpose_w = true)) contract 4 with 3",
        ),
        ("ag", vec![2, 4], vec![5, 4], false, "contract 4 with 5"),
        ("rs", vec![3], vec![5, 4], true, "expected x as [rows, K], got [3]"),
        ("rs", vec![6, 4], vec![4, 5], true, "contract 4 with 5"),
        ("rs", vec![5, 4], vec![6, 4], true, "dim 0 of x [5, 4] is not divisible by world size 3"),
    ];
    for (op, xd, wd, tw, msg) in &cases {
        for mode in MODES {
            let out = LocalGroup::run_with_timeout(3, TIMEOUT, |comm| {
                let x = randn(xd, 1 + comm.rank() as u64, DType::F32);
                let w = randn(wd, 9, DType::F32);
                match *op {
                    "ag" => all_gather_matmul(&comm, &x, &w, *tw, mode).map(|_| ()),
                    _ => matmul_reduce_scatter(&comm, &x, &w, *tw, mode).map(|_| ()),
                }
            });
            for (rank, o) in out.into_iter().enumerate() {
                let e = o.expect_err(msg);
                assert!(matches!(e, Error::Shape { .. }), "{op} {mode} rank {rank}: {e}");
                assert!(e.to_string().contains(msg), "{op} {mode} rank {rank}: {e}");
            }
        }
    }
    // Mismatched dtypes of x and w.
    let out = LocalGroup::run_with_timeout(2, TIMEOUT, |comm| {
        let x = randn(&[2, 4], 1, DType::F32);
        let w = randn(&[3, 4], 2, DType::BF16);
        all_gather_matmul(&comm, &x, &w, true, MatmulComm::Ring)
    });
    for o in out {
        let e = o.expect_err("dtypes differ").to_string();
        assert!(e.contains("all_gather_matmul: expected dtype f32 for w (x's dtype), got BF16"), "{e}");
    }
}

#[test]
fn ranks_that_disagree_on_shapes_all_get_errors() {
    for n in [2, 4] {
        for mode in MODES {
            // Rank 1 has one row more than the others (all_gather_matmul), or twice the rows
            // (matmul_reduce_scatter): not detectable on any rank alone.
            let out = LocalGroup::run_with_timeout(n, TIMEOUT, |comm| {
                let extra = usize::from(comm.rank() == 1);
                let x = randn(&[3 + extra, 8], 1 + comm.rank() as u64, DType::F32);
                let w = randn(&[5, 8], 2, DType::F32);
                let ag = all_gather_matmul(&comm, &x, &w, true, mode).map(|_| ());
                (ag, comm.rank())
            });
            for (o, rank) in out {
                let e = o.expect_err("rows differ between ranks");
                assert!(
                    matches!(e, Error::Mismatch { .. } | Error::Disconnected { .. }),
                    "n={n} {mode} rank {rank}: {e}"
                );
            }
            let out = LocalGroup::run_with_timeout(n, TIMEOUT, |comm| {
                let rows = if comm.rank() == 1 { 2 * n } else { n };
                let x = randn(&[rows, 8], 1 + comm.rank() as u64, DType::F32);
                let w = randn(&[5, 8], 2, DType::F32);
                (matmul_reduce_scatter(&comm, &x, &w, true, mode), comm.rank())
            });
            for (o, rank) in out {
                let e = o.expect_err("rows differ between ranks");
                assert!(
                    matches!(e, Error::Mismatch { .. } | Error::Disconnected { .. }),
                    "n={n} {mode} rank {rank}: {e}"
                );
            }
        }
    }
}

#[test]
fn through_a_throttled_link_the_results_are_unchanged() {
    let link = LinkModel { bandwidth_bytes_per_s: 1e9, latency: Duration::from_micros(200) };
    for mode in MODES {
        let run = |throttle: bool| {
            LocalGroup::run_with_timeout(3, TIMEOUT, |comm| {
                let i = comm.rank() as u64;
                let x = randn(&[6, 16], 3 + i, DType::F32);
                let w = weight(5, 16, false, 30 + i, DType::F32);
                let go = |c: &dyn Communicator| {
                    let (y, _) = all_gather_matmul(c, &x, &w, false, mode).unwrap();
                    let z = matmul_reduce_scatter(c, &x, &w, false, mode).unwrap();
                    (bits(&y), bits(&z))
                };
                if throttle {
                    go(&Throttled::new(comm, link).unwrap())
                } else {
                    go(&comm)
                }
            })
        };
        assert_eq!(run(true), run(false), "{mode}");
    }
}

#[test]
fn matmul_comm_parses_and_prints() {
    for m in MODES {
        assert_eq!(m.to_string().parse::<MatmulComm>().unwrap(), m);
    }
    assert_eq!(MatmulComm::default(), MatmulComm::Ring);
    let e = "rings".parse::<MatmulComm>().unwrap_err().to_string();
    assert!(e.contains("expected \"ring\" or \"plain\", got \"rings\""), "{e}");
}
