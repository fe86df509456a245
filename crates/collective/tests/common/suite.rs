//! The semantic suite every backend must pass (issue 12 item 1), written against the
//! `Communicator` trait alone: each rank computes every rank's seeded input, so it knows the
//! exact expected result (reductions in f32 in rank order, bit for bit) without talking to the
//! others. Used by `local_group.rs` (threads) and `mpi_suite.rs` (processes under `mpirun`).

use super::{bits, input, reference_reduce, values};
use vit_collective::{Axis, Communicator, Error, Mesh, MeshShape, ReduceOp};
use vit_tensor::{DType, Device, Tensor};

/// One check's name and its failure, if any.
pub type Outcome = (String, Result<(), String>);

fn expect(what: &str, ok: bool, detail: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: {}", detail()))
    }
}

/// Every rank's input of `shape` for `seed`, as this rank computes them.
fn all_inputs(n: usize, shape: &[usize], seed: u64, dtype: DType) -> Vec<Tensor> {
    (0..n).map(|r| input(shape, seed, r, dtype)).collect()
}

fn concat_values(parts: impl IntoIterator<Item = Vec<f32>>) -> Vec<f32> {
    parts.into_iter().flatten().collect()
}

/// Runs every check on this rank's communicator `c`; all ranks must call it together.
pub fn run(c: &dyn Communicator) -> Vec<Outcome> {
    let (n, r) = (c.world_size(), c.rank());
    let mut out: Vec<Outcome> = Vec::new();
    let mut check = |name: String, f: &mut dyn FnMut() -> Result<(), String>| out.push((name, f()));

    // all_reduce: every op, f32/bf16/f16, sizes that do and do not divide by n.
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
            for shape in [&[3usize, 5, 7][..], &[1], &[13], &[2, 0]] {
                check(format!("all_reduce {op} {dtype} {shape:?}"), &mut || {
                    let xs = all_inputs(n, shape, 100, dtype);
                    let y = c.all_reduce(&xs[r], op).map_err(|e| e.to_string())?;
                    expect("shape and dtype", y.dims() == shape && y.dtype() == dtype, || format!("{y:?}"))?;
                    let want = reference_reduce(&xs, op);
                    let got = values(&y);
                    expect("values (bitwise)", bits(&y) == want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), || {
                        format!("got {:?}.., want {:?}..", &got[..got.len().min(4)], &want[..want.len().min(4)])
                    })
                });
            }
        }
    }
    // reduce_scatter: rank r gets rows r·m..(r+1)·m of the reduction.
    for op in [ReduceOp::Sum, ReduceOp::Max] {
        check(format!("reduce_scatter {op}"), &mut || {
            let m = 3;
            let xs = all_inputs(n, &[n * m, 4], 200, DType::F32);
            let y = c.reduce_scatter(&xs[r], op).map_err(|e| e.to_string())?;
            let full = reference_reduce(&xs, op);
            let want = &full[r * m * 4..(r + 1) * m * 4];
            expect("rows of the reduction", y.dims() == [m, 4] && values(&y) == want, || format!("{:?}", values(&y)))
        });
    }
    // all_gather: any dtype, concatenated in rank order.
    for dtype in [DType::F32, DType::BF16] {
        check(format!("all_gather {dtype}"), &mut || {
            let xs = all_inputs(n, &[2, 3], 300, dtype);
            let y = c.all_gather(&xs[r]).map_err(|e| e.to_string())?;
            let want = concat_values(xs.iter().map(values));
            expect("concatenation", y.dims() == [2 * n, 3] && values(&y) == want, || format!("{:?}", y.dims()))
        });
    }
    check("all_gather i32".into(), &mut || {
        let x =
            Tensor::from_vec(vec![r as i32 * 10, r as i32 * 10 + 1], [1, 2], Device::Cpu).map_err(|e| e.to_string())?;
        let y = c.all_gather(&x).map_err(|e| e.to_string())?;
        let want: Vec<i32> = (0..n as i32).flat_map(|q| [q * 10, q * 10 + 1]).collect();
        expect("i32 concatenation", y.to_vec::<i32>().map_err(|e| e.to_string())? == want, || format!("{y:?}"))
    });
    // all_to_all: chunk j of rank i lands at position i on rank j.
    check("all_to_all".into(), &mut || {
        let xs = all_inputs(n, &[2 * n, 3], 400, DType::F32);
        let y = c.all_to_all(&xs[r]).map_err(|e| e.to_string())?;
        let want = concat_values(xs.iter().map(|x| values(&x.narrow(2 * r, 2).expect("narrow"))));
        expect("exchanged chunks", values(&y) == want, || format!("{:?}", values(&y)))
    });
    // broadcast from every root.
    for root in 0..n {
        check(format!("broadcast root {root}"), &mut || {
            let xs = all_inputs(n, &[5], 500, DType::F16);
            let y = c.broadcast(&xs[r], root).map_err(|e| e.to_string())?;
            expect("root's values", bits(&y) == bits(&xs[root]), || format!("{:?}", values(&y)))
        });
    }
    // A ring of send_recv, then paired send/recv in both directions.
    check("send_recv ring".into(), &mut || {
        let xs = all_inputs(n, &[3, 2], 600, DType::F32);
        let y = c.send_recv(&xs[r], (r + 1) % n, (r + n - 1) % n).map_err(|e| e.to_string())?;
        expect("the left neighbour's tensor", bits(&y) == bits(&xs[(r + n - 1) % n]) && y.dims() == [3, 2], || {
            format!("{y:?}")
        })
    });
    if n > 1 {
        check("send then recv, in order".into(), &mut || {
            let xs = all_inputs(n, &[4], 700, DType::BF16);
            let ys = all_inputs(n, &[1, 2], 800, DType::F32);
            if r == 0 {
                c.send(&xs[0], 1).map_err(|e| e.to_string())?;
                c.send(&ys[0], 1).map_err(|e| e.to_string())?;
                let back = c.recv(1).map_err(|e| e.to_string())?;
                expect("reply", bits(&back) == bits(&xs[1]), || format!("{back:?}"))
            } else if r == 1 {
                let a = c.recv(0).map_err(|e| e.to_string())?;
                let b = c.recv(0).map_err(|e| e.to_string())?;
                c.send(&xs[1], 0).map_err(|e| e.to_string())?;
                expect("both messages, in order", bits(&a) == bits(&xs[0]) && bits(&b) == bits(&ys[0]), || {
                    format!("{a:?} {b:?}")
                })
            } else {
                Ok(())
            }
        });
    }
    check("barrier".into(), &mut || c.barrier().map_err(|e| e.to_string()));
    // Disagreements are errors on every rank, never hangs: different shapes, then different ops.
    if n > 1 {
        check("mismatched shapes are a Mismatch on every rank".into(), &mut || {
            let x = input(&[2, 1 + usize::from(r == 0)], 900, r, DType::F32);
            match c.all_reduce(&x, ReduceOp::Sum) {
                Err(Error::Mismatch { op: "all_reduce", .. }) => Ok(()),
                other => Err(format!("expected a Mismatch, got {other:?}")),
            }
        });
        check("mismatched ops are a Mismatch on every rank".into(), &mut || {
            let x = input(&[n, 2], 901, r, DType::F32);
            let got = if r == 0 { c.all_gather(&x).map(|_| ()) } else { c.all_reduce(&x, ReduceOp::Sum).map(|_| ()) };
            match got {
                Err(Error::Mismatch { .. }) => Ok(()),
                other => Err(format!("expected a Mismatch, got {other:?}")),
            }
        });
        // And the group is still usable afterwards.
        check("usable after a mismatch".into(), &mut || c.barrier().map_err(|e| e.to_string()));
    }
    check("reduce_scatter of an indivisible dim 0 is a Shape error".into(), &mut || {
        let x = input(&[n + 1, 2], 902, r, DType::F32);
        match (n, c.reduce_scatter(&x, ReduceOp::Sum)) {
            (1, Ok(_)) => Ok(()),
            (_, Err(Error::Shape { .. })) => Ok(()),
            (_, other) => Err(format!("expected a Shape error, got {other:?}")),
        }
    });
    // split: groups by parity, ranked in reverse (key n - r); the groups run different
    // collectives at the same time without mixing.
    check("split by parity, ranked by key".into(), &mut || {
        let g = c.split(r % 2, n - r).map_err(|e| e.to_string())?;
        let mut members: Vec<usize> = (0..n).filter(|q| q % 2 == r % 2).collect();
        members.reverse();
        expect("size and rank", g.world_size() == members.len() && members[g.rank()] == r, || {
            format!("size {} rank {}, members {members:?}", g.world_size(), g.rank())
        })?;
        let me = Tensor::from_vec(vec![r as i32], [1], Device::Cpu).map_err(|e| e.to_string())?;
        let got = g.all_gather(&me).map_err(|e| e.to_string())?.to_vec::<i32>().map_err(|e| e.to_string())?;
        let want: Vec<i32> = members.iter().map(|&q| q as i32).collect();
        expect("members in key order", got == want, || format!("got {got:?}, want {want:?}"))?;
        // Different shapes in the two groups: each group agrees within itself.
        let len = 3 + 2 * (r % 2);
        let xs: Vec<Tensor> = members.iter().map(|&q| input(&[len], 1000, q, DType::F32)).collect();
        let y = g.all_reduce(&xs[g.rank()], ReduceOp::Sum).map_err(|e| e.to_string())?;
        let want = reference_reduce(&xs, ReduceOp::Sum);
        expect("reduction within the group", values(&y) == want, || format!("{:?} vs {want:?}", values(&y)))?;
        c.barrier().map_err(|e| e.to_string())
    });
    // Mesh: data × model with model = 2 when n is even, else n × 1; each axis group is the
    // ranks sharing the other coordinate, in order of their coordinate on the axis.
    check("mesh axes are the rows and columns of the layout".into(), &mut || {
        let model = if n % 2 == 0 { 2 } else { 1 };
        let shape = MeshShape::data_model(n / model, model).map_err(|e| e.to_string())?;
        let mesh = Mesh::new(c, shape).map_err(|e| e.to_string())?;
        let (d, m) = (r / model, r % model);
        expect("coordinates", mesh.coord(Axis::Data) == d && mesh.coord(Axis::Model) == m, || format!("{mesh:?}"))?;
        let me = Tensor::from_vec(vec![r as i32], [1], Device::Cpu).map_err(|e| e.to_string())?;
        for (axis, want) in [
            (Axis::Model, (0..model).map(|j| (d * model + j) as i32).collect::<Vec<_>>()),
            (Axis::Data, (0..n / model).map(|i| (i * model + m) as i32).collect()),
        ] {
            let g = mesh.axis(axis).ok_or("axis missing")?;
            let got = g.all_gather(&me).map_err(|e| e.to_string())?.to_vec::<i32>().map_err(|e| e.to_string())?;
            expect(&format!("{axis} group"), got == want && g.rank() == mesh.coord(axis), || {
                format!("got {got:?} (rank {}), want {want:?}", g.rank())
            })?;
        }
        expect("no expert axis", mesh.axis(Axis::Expert).is_none() && mesh.size(Axis::Expert) == 1, || "".into())
    });
    check("a mesh of the wrong size is an error on every rank".into(), &mut || {
        let shape = MeshShape::data_model(n + 1, 1).map_err(|e| e.to_string())?;
        match Mesh::new(c, shape) {
            Err(Error::Mesh { msg }) if msg.contains(&format!("the world has {n}")) => Ok(()),
            other => Err(format!("expected a Mesh error, got {other:?}")),
        }
    });
    out
}
