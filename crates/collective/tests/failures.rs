//! Bad calls on `LocalGroup`: every rank gets an error naming the op and the values (never a
//! hang, never a panic), and the group stays usable after a checked error.

mod common;

use common::*;
use std::sync::Mutex;
use vit_collective::{Communicator, Error, LocalCommunicator, LocalGroup, ReduceOp};
use vit_tensor::{DType, Device, Tensor};

/// Runs `f` on every rank, then checks the group still all-reduces correctly afterwards.
fn then_still_works<R: Send>(n: usize, f: impl Fn(&LocalCommunicator) -> R + Sync) -> Vec<R> {
    LocalGroup::run(n, |c| {
        let out = f(&c);
        let x = Tensor::full(1.0, [2], DType::F32, Device::Cpu).expect("full");
        let y = c.all_reduce(&x, ReduceOp::Sum).expect("the group works after an error");
        assert_eq!(values(&y), vec![n as f32; 2]);
        out
    })
}

fn randn(shape: &[usize], rank: usize) -> Tensor {
    input(shape, 1, rank, DType::F32)
}

#[test]
fn shape_mismatch_is_an_error_on_every_rank_for_every_collective() {
    type Call = fn(&LocalCommunicator, &Tensor) -> vit_collective::Result<Tensor>;
    let calls: [(&str, Call); 5] = [
        ("all_reduce", |c, x| c.all_reduce(x, ReduceOp::Sum)),
        ("all_gather", |c, x| c.all_gather(x)),
        ("reduce_scatter", |c, x| c.reduce_scatter(x, ReduceOp::Mean)),
        ("all_to_all", |c, x| c.all_to_all(x)),
        ("broadcast", |c, x| c.broadcast(x, 0)),
    ];
    for n in [2, 4] {
        for (name, call) in calls {
            let out = then_still_works(n, |c| {
                let cols = if c.rank() == n - 1 { 5 } else { 3 };
                call(c, &randn(&[4, cols], c.rank()))
            });
            for (r, res) in out.into_iter().enumerate() {
                let err = res.expect_err("mismatch must fail");
                assert!(matches!(err, Error::Mismatch { op, .. } if op == name), "{err}");
                let msg = err.to_string();
                assert!(msg.starts_with(&format!("{name}: expected the same shape and dtype")), "rank {r}: {msg}");
                assert!(msg.contains("rank 0: [4, 3] f32"), "rank {r}: {msg}");
                assert!(msg.contains(&format!("rank {}: [4, 5] f32", n - 1)), "rank {r}: {msg}");
            }
        }
    }
}

#[test]
fn dtype_mismatch_is_an_error_on_every_rank() {
    let out = then_still_works(2, |c| {
        let dtype = if c.rank() == 0 { DType::F32 } else { DType::BF16 };
        c.all_reduce(&input(&[3], 2, c.rank(), dtype), ReduceOp::Sum)
    });
    for res in out {
        let msg = res.expect_err("mismatch").to_string();
        assert!(msg.contains("rank 0: [3] f32, rank 1: [3] bf16"), "{msg}");
    }
}

#[test]
fn different_collectives_are_an_error_on_every_rank() {
    let out = then_still_works(4, |c| {
        let x = randn(&[4, 2], c.rank());
        match c.rank() {
            2 => c.all_gather(&x).map(|_| ()),
            3 => c.barrier(),
            _ => c.all_reduce(&x, ReduceOp::Sum).map(|_| ()),
        }
    });
    for (r, res) in out.into_iter().enumerate() {
        let msg = res.expect_err("mismatch").to_string();
        let want = "ranks made different calls: rank 0: all_reduce(sum), rank 1: all_reduce(sum), \
                    rank 2: all_gather, rank 3: barrier";
        assert!(msg.ends_with(want), "rank {r}: {msg}");
    }
}

#[test]
fn different_reduce_ops_are_an_error_on_every_rank() {
    let out = then_still_works(2, |c| {
        let op = if c.rank() == 0 { ReduceOp::Sum } else { ReduceOp::Mean };
        c.reduce_scatter(&randn(&[4], c.rank()), op)
    });
    for res in out {
        let msg = res.expect_err("mismatch").to_string();
        assert_eq!(
            msg,
            "reduce_scatter: ranks made different calls: rank 0: reduce_scatter(sum), rank 1: reduce_scatter(mean)"
        );
    }
}

#[test]
fn reduce_scatter_indivisible_dim0_names_shape_and_world_size() {
    let out = then_still_works(4, |c| c.reduce_scatter(&randn(&[6, 4], c.rank()), ReduceOp::Sum));
    for res in out {
        let err = res.expect_err("indivisible");
        assert!(matches!(err, Error::Shape { .. }));
        assert_eq!(err.to_string(), "reduce_scatter: dim 0 of [6, 4] is not divisible by world size 4");
    }
}

#[test]
fn all_to_all_indivisible_and_scalar_inputs_fail_on_every_rank() {
    let out = then_still_works(2, |c| c.all_to_all(&randn(&[3, 2], c.rank())));
    for res in out {
        assert_eq!(
            res.expect_err("indivisible").to_string(),
            "all_to_all: dim 0 of [3, 2] is not divisible by world size 2"
        );
    }
    let out = then_still_works(2, |c| c.all_gather(&randn(&[], c.rank())));
    for res in out {
        let msg = res.expect_err("scalar").to_string();
        assert_eq!(msg, "all_gather: expected a tensor of rank >= 1 to concatenate along dim 0, got shape []");
    }
}

#[test]
fn reducing_integers_is_a_dtype_error_on_every_rank() {
    let out = then_still_works(2, |c| {
        let x = Tensor::from_vec(vec![1i32, 2, 3], [3], Device::Cpu).expect("from_vec");
        c.all_reduce(&x, ReduceOp::Sum)
    });
    for res in out {
        let err = res.expect_err("int reduce");
        assert_eq!(err.to_string(), "all_reduce: expected a float dtype (f32, bf16 or f16), got i32");
    }
}

#[test]
fn broadcast_root_out_of_range_or_disagreeing() {
    let out = then_still_works(2, |c| c.broadcast(&randn(&[2], c.rank()), 2));
    for res in out {
        assert_eq!(res.expect_err("root").to_string(), "broadcast: expected root in 0..2, got 2");
    }
    let out = then_still_works(2, |c| c.broadcast(&randn(&[2], c.rank()), c.rank()));
    for res in out {
        let msg = res.expect_err("roots differ").to_string();
        assert!(msg.ends_with("rank 0: broadcast(root 0), rank 1: broadcast(root 1)"), "{msg}");
    }
}

#[test]
fn point_to_point_rank_out_of_range() {
    let out = then_still_works(2, |c| {
        let x = randn(&[2], c.rank());
        (c.send(&x, 7).expect_err("send").to_string(), c.recv(2).expect_err("recv").to_string())
    });
    for (send, recv) in out {
        assert_eq!(send, "send: expected destination rank in 0..2, got 7");
        assert_eq!(recv, "recv: expected source rank in 0..2, got 2");
    }
}

#[test]
fn recv_from_self_needs_a_send_to_self() {
    then_still_works(2, |c| {
        let err = c.recv(c.rank()).expect_err("nothing sent");
        assert!(matches!(err, Error::Deadlock { op: "recv", .. }), "{err}");
        let x = randn(&[3], c.rank());
        c.send(&x, c.rank()).expect("send to self");
        assert_eq!(bits(&c.recv(c.rank()).expect("recv from self")), bits(&x));
    });
}

#[test]
fn mutual_recv_is_a_deadlock_error_not_a_hang() {
    let out = LocalGroup::run(2, |c| {
        let first = c.recv(1 - c.rank()).expect_err("deadlock");
        let later = c.barrier().expect_err("group is poisoned");
        (first, later)
    });
    let kinds: Vec<_> = out.iter().map(|(e, _)| matches!(e, Error::Deadlock { .. })).collect();
    assert_eq!(kinds.iter().filter(|&&d| d).count(), 1, "one rank finds the deadlock: {out:?}");
    for (first, later) in &out {
        let want = "deadlock: every rank is waiting on another: rank 0 in recv from rank 1, rank 1 in recv from rank 0";
        assert!(first.to_string().starts_with("recv: ") && first.to_string().ends_with(want), "{first}");
        assert!(matches!(later, Error::Poisoned { op: "barrier", .. }), "{later}");
    }
}

#[test]
fn collective_against_recv_is_a_deadlock_error() {
    let out = LocalGroup::run(4, |c| match c.rank() {
        0 => c.recv(3).map(|_| ()),
        _ => c.all_reduce(&randn(&[2], c.rank()), ReduceOp::Sum).map(|_| ()),
    });
    for res in out {
        let msg = res.expect_err("deadlock").to_string();
        assert!(msg.contains("deadlock"), "{msg}");
    }
}

#[test]
fn deadlock_left_by_departing_ranks_is_reported() {
    // Ranks 2 and 3 return while 0 and 1 wait on each other.
    let out = LocalGroup::run(4, |c| match c.rank() {
        0 | 1 => Some(c.recv(1 - c.rank()).expect_err("deadlock")),
        _ => {
            std::thread::sleep(std::time::Duration::from_millis(20));
            None
        }
    });
    for err in out.into_iter().flatten() {
        assert!(err.to_string().contains("rank 2 has left, rank 3 has left"), "{err}");
    }
}

#[test]
fn a_rank_that_leaves_fails_the_others_collectives() {
    let out = LocalGroup::run(4, |c| {
        if c.rank() == 2 {
            return None; // drops its communicator without joining
        }
        Some(c.all_reduce(&randn(&[2], c.rank()), ReduceOp::Sum).expect_err("rank 2 left"))
    });
    for err in out.into_iter().flatten() {
        assert_eq!(err.to_string(), "all_reduce: rank 2 has left the group (its communicator was dropped)");
    }
}

#[test]
fn messages_sent_before_leaving_are_still_delivered() {
    let out = LocalGroup::run(2, |c| {
        if c.rank() == 1 {
            c.send(&Tensor::full(5.0, [1], DType::F32, Device::Cpu).expect("full"), 0).expect("send");
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let got = values(&c.recv(1).expect("buffered message"));
        Some((got, c.recv(1).expect_err("rank 1 left").to_string(), c.send(&randn(&[1], 0), 1).is_err()))
    });
    let (got, err, send_failed) = out[0].clone().expect("rank 0 result");
    assert_eq!(got, vec![5.0]);
    assert_eq!(err, "recv: rank 1 has left the group (its communicator was dropped)");
    assert!(send_failed);
}

#[test]
fn a_panicking_rank_fails_the_others_and_the_panic_propagates() {
    let others = Mutex::new(Vec::new());
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        LocalGroup::run(4, |c| {
            if c.rank() == 1 {
                panic!("rank 1 fails");
            }
            let res = c.all_reduce(&randn(&[2], c.rank()), ReduceOp::Sum);
            others.lock().expect("lock").push(res.map(|_| ()));
        })
    }));
    assert!(caught.is_err(), "the panic propagates out of LocalGroup::run");
    let others = others.into_inner().expect("lock");
    assert_eq!(others.len(), 3);
    for res in others {
        assert!(matches!(res, Err(Error::Disconnected { peer: 1, .. })), "{res:?}");
    }
}

/// With a timeout, a rank far behind the others makes them fail with an error naming it
/// instead of waiting forever; when it arrives, it finds them gone.
#[test]
fn a_rank_slower_than_the_timeout_is_named_by_the_others() {
    let timeout = std::time::Duration::from_millis(100);
    let results = LocalGroup::run_with_timeout(3, Some(timeout), |comm| {
        if comm.rank() == 1 {
            std::thread::sleep(std::time::Duration::from_millis(600));
        }
        comm.all_reduce(&randn(&[4], comm.rank()), ReduceOp::Sum).map(|_| ())
    });
    // The first to give up names rank 1; a rank that wakes after it may see it leave instead.
    let timed_out = [0, 2].iter().filter(|&&r| matches!(&results[r], Err(Error::Timeout { op: "all_reduce", peers, secs }) if peers == &vec![1] && (secs - 0.1).abs() < 1e-9)).count();
    assert!(timed_out >= 1, "{results:?}");
    for r in [0, 2] {
        assert!(
            matches!(&results[r], Err(Error::Timeout { .. } | Error::Disconnected { .. })),
            "rank {r}: {:?}",
            results[r]
        );
    }
    let late = results[1].as_ref().unwrap_err().to_string();
    assert!(late.contains("has left the group") || late.contains("waited"), "{late}");
    let e = Error::Timeout { op: "all_reduce", secs: 300.0, peers: vec![1] }.to_string();
    assert_eq!(e, "all_reduce: waited 300 s for rank(s) [1] (the collective timeout)");
    // Receives time out too, naming the sender.
    let results = LocalGroup::run_with_timeout(2, Some(timeout), |comm| {
        if comm.rank() == 0 {
            comm.recv(1).map(|_| ())
        } else {
            std::thread::sleep(std::time::Duration::from_millis(300));
            Ok(())
        }
    });
    assert!(
        matches!(&results[0], Err(Error::Timeout { op: "recv", peers, .. }) if peers == &vec![1]),
        "{:?}",
        results[0]
    );
}
