//! Every collective of `LocalGroup` with 2 and 4 ranks against a single-threaded reference
//! computed from all ranks' inputs.

mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use vit_collective::{Communicator, LocalGroup, ReduceOp};
use vit_tensor::{DType, Device, Tensor};

const WORLDS: [usize; 2] = [2, 4];
const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

#[test]
fn all_reduce_matches_reference_bitwise_on_every_rank() {
    for n in WORLDS {
        for op in OPS {
            let xs = inputs(n, &[3, 5, 7], 10, DType::F32);
            let out = on_ranks(&xs, |c, x| c.all_reduce(x, op).expect("all_reduce"));
            let want = reference_reduce(&xs, op);
            for (r, y) in out.iter().enumerate() {
                assert_eq!(y.dims(), &[3, 5, 7], "n={n} {op} rank {r}");
                assert_eq!(y.dtype(), DType::F32);
                assert_eq!(y.device(), Device::Cpu);
                assert_eq!(values(y), want, "n={n} {op} rank {r}");
                assert_eq!(bits(y), bits(&out[0]), "n={n} {op}: rank {r} differs from rank 0");
            }
        }
    }
}

#[test]
fn all_reduce_sums_in_rank_order() {
    // f32: (1e8 + 1) - 1e8 + 1 = 1 in rank order; any other order can give 0 or 2.
    let xs: Vec<Tensor> = [1e8, 1.0, -1e8, 1.0]
        .iter()
        .map(|&v| Tensor::from_f32(vec![v], [1], DType::F32, Device::Cpu).expect("from_f32"))
        .collect();
    for _ in 0..20 {
        let out = on_ranks(&xs, |c, x| {
            // Perturb arrival order.
            std::thread::sleep(std::time::Duration::from_micros(((c.rank() * 7919) % 5) as u64 * 200));
            c.all_reduce(x, ReduceOp::Sum).expect("all_reduce")
        });
        for y in &out {
            assert_eq!(values(y), vec![1.0]);
        }
    }
}

#[test]
fn all_reduce_bf16_and_f16_keep_dtype() {
    for dtype in [DType::BF16, DType::F16] {
        for n in WORLDS {
            let xs = inputs(n, &[4, 33], 20, dtype);
            let out = on_ranks(&xs, |c, x| c.all_reduce(x, ReduceOp::Sum).expect("all_reduce"));
            let want = reference_reduce(&xs, ReduceOp::Sum);
            // Exact f64 sum of the rounded inputs: the result is one rounding away from it.
            let vals: Vec<Vec<f32>> = xs.iter().map(values).collect();
            let exact: Vec<f32> =
                (0..want.len()).map(|i| vals.iter().map(|v| v[i] as f64).sum::<f64>() as f32).collect();
            for y in &out {
                assert_eq!(y.dtype(), dtype);
                assert_eq!(values(y), want, "{dtype} n={n}");
                assert_eq!(bits(y), bits(&out[0]));
                vit_tensor::testing::assert_close("all_reduce", &values(y), &exact, dtype.default_tolerance(), 1e-2);
            }
        }
    }
}

/// From 2^20 elements on, the ranks split the summation (each sums one piece over all inputs,
/// then the pieces are exchanged): uneven pieces (1,048,579 elements over 3 ranks), f32 and bf16,
/// every op, bit for bit against the single-threaded reference and between ranks.
#[test]
fn split_all_reduce_matches_reference_bitwise() {
    for n in [2, 3, 4] {
        for dtype in [DType::F32, DType::BF16] {
            for op in OPS {
                let xs = inputs(n, &[7, 149_797], 40 + n as u64, dtype);
                let out = on_ranks(&xs, |c, x| c.all_reduce(x, op).expect("all_reduce"));
                let want = reference_reduce(&xs, op);
                for (r, y) in out.iter().enumerate() {
                    assert_eq!((y.dims(), y.dtype()), (&[7, 149_797][..], dtype), "n={n} {op} rank {r}");
                    assert_eq!(values(y), want, "n={n} {dtype} {op} rank {r}");
                    assert_eq!(bits(y), bits(&out[0]), "n={n} {dtype} {op}: rank {r} differs from rank 0");
                }
            }
        }
    }
}

/// Split (large) and whole (small) all-reduces back to back, arrival order perturbed: each
/// round's pieces belong to that round.
#[test]
fn split_and_whole_all_reduces_interleave() {
    let sizes = [1_100_000, 3, 1_048_577, 1_100_000, 1, 1_048_576];
    for n in [2, 3] {
        let out = LocalGroup::run(n, |c| {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    std::thread::sleep(std::time::Duration::from_micros(((c.rank() + i) % 3) as u64 * 300));
                    let x = input(&[len], 100 + i as u64, c.rank(), DType::F32);
                    values(&c.all_reduce(&x, ReduceOp::Sum).expect("all_reduce"))
                })
                .collect::<Vec<_>>()
        });
        for (i, &len) in sizes.iter().enumerate() {
            let xs = inputs(n, &[len], 100 + i as u64, DType::F32);
            let want = reference_reduce(&xs, ReduceOp::Sum);
            for (r, got) in out.iter().enumerate() {
                assert_eq!(got[i], want, "n={n} round {i} ({len} elements) rank {r}");
            }
        }
    }
}

/// Many split all-reduces back to back without pauses: a rank that has its pieces and enters
/// the next rendezvous while another has not yet woken up is not a deadlock.
#[test]
fn split_all_reduces_back_to_back() {
    for n in [2, 3, 4] {
        let out = LocalGroup::run(n, |c| {
            let x = Tensor::full(c.rank() as f32 + 1.0, [1 << 20], DType::F32, Device::Cpu).expect("full");
            (0..100).map(|_| values(&c.all_reduce(&x, ReduceOp::Sum).expect("all_reduce"))[0]).collect::<Vec<_>>()
        });
        let want = (n * (n + 1) / 2) as f32;
        for (r, got) in out.iter().enumerate() {
            assert!(got.iter().all(|&v| v == want), "n={n} rank {r}: {:?}", &got[..4]);
        }
    }
}

/// Ranks that disagree on the size fail together, whether both sizes split or only one does.
#[test]
fn split_all_reduce_shape_mismatch_fails_on_every_rank() {
    for other in [1_048_577, 10] {
        let out = LocalGroup::run(2, |c| {
            let len = if c.rank() == 0 { 1_048_576 } else { other };
            c.all_reduce(&input(&[len], 7, c.rank(), DType::F32), ReduceOp::Sum).map(|_| ())
        });
        for (r, res) in out.iter().enumerate() {
            let err = res.as_ref().expect_err("mismatched shapes must fail").to_string();
            assert!(err.contains("all_reduce") && err.contains("1048576"), "rank {r} with {other}: {err}");
        }
    }
}

#[test]
fn all_reduce_of_a_scalar() {
    let xs: Vec<Tensor> =
        (0..4).map(|r| Tensor::full(r as f32, Vec::<usize>::new(), DType::F32, Device::Cpu).expect("full")).collect();
    let out = on_ranks(&xs, |c, x| c.all_reduce(x, ReduceOp::Mean).expect("all_reduce"));
    for y in out {
        assert_eq!(y.dims(), &[] as &[usize]);
        assert_eq!(values(&y), vec![1.5]);
    }
}

#[test]
fn all_gather_matches_reference() {
    for n in WORLDS {
        let xs = inputs(n, &[3, 5], 30, DType::F32);
        let out = on_ranks(&xs, |c, x| c.all_gather(x).expect("all_gather"));
        let want: Vec<f32> = xs.iter().flat_map(values).collect();
        for y in out {
            assert_eq!(y.dims(), &[3 * n, 5]);
            assert_eq!(values(&y), want, "n={n}");
        }
    }
}

#[test]
fn all_gather_moves_integers_exactly() {
    let xs: Vec<Tensor> = (0..4)
        .map(|r| Tensor::from_vec(vec![r * 10, r * 10 + 1, i32::MAX - r], [1, 3], Device::Cpu).expect("from_vec"))
        .collect();
    let out = on_ranks(&xs, |c, x| c.all_gather(x).expect("all_gather"));
    let want: Vec<i32> = (0..4).flat_map(|r| [r * 10, r * 10 + 1, i32::MAX - r]).collect();
    for y in out {
        assert_eq!(y.dtype(), DType::I32);
        assert_eq!(y.dims(), &[4, 3]);
        assert_eq!(y.to_vec::<i32>().expect("to_vec"), want);
    }
}

#[test]
fn reduce_scatter_matches_reference() {
    for n in WORLDS {
        for op in OPS {
            let m = 3;
            let xs = inputs(n, &[n * m, 6], 40, DType::F32);
            let out = on_ranks(&xs, |c, x| c.reduce_scatter(x, op).expect("reduce_scatter"));
            let full = reference_reduce(&xs, op);
            for (r, y) in out.iter().enumerate() {
                assert_eq!(y.dims(), &[m, 6]);
                assert_eq!(values(y), full[r * m * 6..(r + 1) * m * 6], "n={n} {op} rank {r}");
            }
        }
    }
}

#[test]
fn reduce_scatter_equals_all_reduce_then_chunk() {
    for n in WORLDS {
        for dtype in [DType::F32, DType::BF16] {
            let xs = inputs(n, &[2 * n, 3, 4], 50, dtype);
            let out = on_ranks(&xs, |c, x| {
                let scattered = c.reduce_scatter(x, ReduceOp::Mean).expect("reduce_scatter");
                let reduced = c.all_reduce(x, ReduceOp::Mean).expect("all_reduce");
                (scattered, reduced)
            });
            for (r, (scattered, reduced)) in out.iter().enumerate() {
                assert_eq!(scattered.dtype(), dtype);
                assert_eq!(scattered.dims(), &[2, 3, 4]);
                assert_eq!(values(scattered), rows(reduced, 2 * r, 2), "{dtype} n={n} rank {r}");
            }
        }
    }
}

#[test]
fn all_gather_of_reduce_scatter_equals_all_reduce() {
    for n in WORLDS {
        for op in OPS {
            let xs = inputs(n, &[4 * n, 5], 60, DType::F32);
            let out = on_ranks(&xs, |c, x| {
                let shard = c.reduce_scatter(x, op).expect("reduce_scatter");
                let gathered = c.all_gather(&shard).expect("all_gather");
                let reduced = c.all_reduce(x, op).expect("all_reduce");
                (gathered, reduced)
            });
            for (gathered, reduced) in out {
                assert_eq!(gathered.dims(), reduced.dims());
                assert_eq!(bits(&gathered), bits(&reduced), "n={n} {op}");
            }
        }
    }
}

#[test]
fn all_to_all_matches_reference() {
    for n in WORLDS {
        let m = 2;
        let xs = inputs(n, &[n * m, 3], 70, DType::F32);
        let out = on_ranks(&xs, |c, x| c.all_to_all(x).expect("all_to_all"));
        for (r, y) in out.iter().enumerate() {
            // Chunk s of my result is chunk r of rank s's input.
            let want: Vec<f32> = xs.iter().flat_map(|x| rows(x, r * m, m)).collect();
            assert_eq!(y.dims(), &[n * m, 3]);
            assert_eq!(values(y), want, "n={n} rank {r}");
        }
    }
}

#[test]
fn all_to_all_twice_is_the_identity_and_moves_indices_exactly() {
    for n in WORLDS {
        let xs: Vec<Tensor> = (0..n)
            .map(|r| {
                let v: Vec<u32> = (0..(3 * n * 2) as u32).map(|i| (r as u32) << 16 | i).collect();
                Tensor::from_vec(v, [3 * n, 2], Device::Cpu).expect("from_vec")
            })
            .collect();
        let out = on_ranks(&xs, |c, x| {
            let once = c.all_to_all(x).expect("all_to_all");
            c.all_to_all(&once).expect("all_to_all")
        });
        for (x, y) in xs.iter().zip(&out) {
            assert_eq!(y.dtype(), DType::U32);
            assert_eq!(y.to_vec::<u32>().expect("to_vec"), x.to_vec::<u32>().expect("to_vec"));
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for n in WORLDS {
        for root in 0..n {
            let xs = inputs(n, &[2, 3], 80, DType::BF16);
            let out = on_ranks(&xs, |c, x| c.broadcast(x, root).expect("broadcast"));
            for y in out {
                assert_eq!(y.dtype(), DType::BF16);
                assert_eq!(bits(&y), bits(&xs[root]), "n={n} root {root}");
            }
        }
    }
}

#[test]
fn send_recv_is_fifo_per_pair() {
    for n in WORLDS {
        let xs = inputs(n, &[1], 0, DType::F32); // unused; one slot per rank
        let out = on_ranks(&xs, |c, _| {
            let (me, n) = (c.rank(), c.world_size());
            // Every rank sends 5 tagged messages to every other rank, then receives in order.
            for k in 0..5 {
                for to in (0..n).filter(|&to| to != me) {
                    let tag = (me * 100 + to * 10 + k) as f32;
                    let x = Tensor::full(tag, [k + 1], DType::F32, Device::Cpu).expect("full");
                    c.send(&x, to).expect("send");
                }
            }
            let mut got = Vec::new();
            for from in (0..n).rev().filter(|&from| from != me) {
                for k in 0..5 {
                    let y = c.recv(from).expect("recv");
                    assert_eq!(y.dims(), &[k + 1]);
                    got.push((from, values(&y)[0]));
                }
            }
            got
        });
        for (me, got) in out.iter().enumerate() {
            let want: Vec<(usize, f32)> = (0..n)
                .rev()
                .filter(|&from| from != me)
                .flat_map(|from| (0..5).map(move |k| (from, (from * 100 + me * 10 + k) as f32)))
                .collect();
            assert_eq!(got, &want, "n={n} rank {me}");
        }
    }
}

#[test]
fn send_recv_around_a_ring() {
    for n in WORLDS {
        let xs = inputs(n, &[4, 2], 90, DType::F32);
        let out = on_ranks(&xs, |c, x| {
            let (me, n) = (c.rank(), c.world_size());
            // After n - 1 steps every rank has seen every other rank's tensor once.
            let mut cur = x.clone();
            let mut seen = vec![values(x)];
            for _ in 1..n {
                cur = c.send_recv(&cur, (me + 1) % n, (me + n - 1) % n).expect("send_recv");
                seen.push(values(&cur));
            }
            seen
        });
        for (me, seen) in out.iter().enumerate() {
            for (step, v) in seen.iter().enumerate() {
                assert_eq!(v, &values(&xs[(me + n - step) % n]), "n={n} rank {me} step {step}");
            }
        }
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    for n in WORLDS {
        let before = AtomicUsize::new(0);
        let seen = LocalGroup::run(n, |c| {
            std::thread::sleep(std::time::Duration::from_millis(c.rank() as u64 * 5));
            before.fetch_add(1, Ordering::SeqCst);
            c.barrier().expect("barrier");
            before.load(Ordering::SeqCst)
        });
        assert_eq!(seen, vec![n; n]);
    }
}

#[test]
fn many_rounds_back_to_back() {
    // Fast ranks race ahead into the next round while slow ones still read the last result.
    let n = 4;
    let out = LocalGroup::run(n, |c| {
        let mut acc = 0.0;
        for i in 0..200 {
            let x = Tensor::full((c.rank() + i) as f32, [3], DType::F32, Device::Cpu).expect("full");
            let y = c.all_reduce(&x, ReduceOp::Sum).expect("all_reduce");
            acc += values(&y)[0];
            if i % 50 == 0 {
                c.barrier().expect("barrier");
            }
        }
        acc
    });
    let want: f32 = (0..200).map(|i| (0..n).map(|r| (r + i) as f32).sum::<f32>()).sum();
    assert_eq!(out, vec![want; n]);
}

#[test]
fn group_of_one_is_the_identity() {
    let xs = inputs(1, &[4, 3], 100, DType::BF16);
    let out = on_ranks(&xs, |c, x| {
        vec![
            c.all_reduce(x, ReduceOp::Mean).expect("all_reduce"),
            c.all_gather(x).expect("all_gather"),
            c.reduce_scatter(x, ReduceOp::Sum).expect("reduce_scatter"),
            c.all_to_all(x).expect("all_to_all"),
            c.broadcast(x, 0).expect("broadcast"),
        ]
    });
    for y in &out[0] {
        assert_eq!(y.dims(), &[4, 3]);
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(bits(y), bits(&xs[0]));
    }
}

#[test]
fn communicators_work_as_trait_objects() {
    let comms: Vec<Box<dyn Communicator>> =
        LocalGroup::new(2).into_iter().map(|c| Box::new(c) as Box<dyn Communicator>).collect();
    let out: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let x = Tensor::full(1.0 + c.rank() as f32, [2], DType::F32, Device::Cpu).expect("full");
                    values(&c.all_reduce(&x, ReduceOp::Max).expect("all_reduce"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    assert_eq!(out, vec![vec![2.0, 2.0]; 2]);
}

#[test]
fn max_propagates_nan_from_any_rank() {
    for nan_rank in 0..4 {
        let xs: Vec<Tensor> = (0..4)
            .map(|r| {
                let v = if r == nan_rank { vec![f32::NAN, 1.0] } else { vec![r as f32, -(r as f32)] };
                Tensor::from_f32(v, [2], DType::F32, Device::Cpu).expect("from_f32")
            })
            .collect();
        let out = on_ranks(&xs, |c, x| c.all_reduce(x, ReduceOp::Max).expect("all_reduce"));
        for y in out {
            let v = values(&y);
            assert!(v[0].is_nan(), "NaN on rank {nan_rank} must survive: {v:?}");
            assert_eq!(v[1], 1.0);
        }
    }
}

#[test]
fn the_semantic_suite_of_every_backend_passes_on_1_to_4_threads() {
    for n in 1..=4 {
        for (rank, outcomes) in LocalGroup::run(n, |comm| common::suite::run(&comm)).into_iter().enumerate() {
            assert!(outcomes.len() > 40, "n={n}: only {} checks ran", outcomes.len());
            for (name, result) in outcomes {
                assert!(result.is_ok(), "n={n} rank {rank}: {name}: {}", result.unwrap_err());
            }
        }
    }
}

#[test]
fn all_reduce_in_place_reduces_its_ranges_bitwise_and_leaves_the_rest() {
    for n in WORLDS {
        let xs = inputs(n, &[50], 60, DType::BF16);
        let ranges = [30..50, 0..4, 10..29];
        let out = on_ranks(&xs, |c, x| {
            let mut buf = x.clone();
            c.all_reduce_in_place(&mut buf, &ranges, ReduceOp::Sum).expect("in place");
            let overlapping = c.all_reduce_in_place(&mut buf.clone(), &[0..5, 4..6], ReduceOp::Sum).unwrap_err();
            (buf, x.clone(), overlapping.to_string())
        });
        let want = reference_reduce(&xs, ReduceOp::Sum);
        for (rank, (buf, x, e)) in out.iter().enumerate() {
            let (got, mine) = (values(buf), values(x));
            for i in 0..50 {
                let expected = if ranges.iter().any(|r| r.contains(&i)) { want[i] } else { mine[i] };
                assert_eq!(got[i].to_bits(), expected.to_bits(), "world {n} rank {rank} element {i}");
            }
            assert_eq!(bits(x), bits(&xs[rank]), "the input sharing the buffer changed");
            assert!(e.contains("overlap"), "{e}");
        }
    }
}
