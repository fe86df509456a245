//! `SingleProcess`: every collective is the identity, with the same checks as a group of one.

mod common;

use common::*;
use vit_collective::{Communicator, Error, ReduceOp, SingleProcess};
use vit_tensor::{DType, Device, Tensor};

#[test]
fn collectives_are_the_identity() {
    let c = SingleProcess::new();
    assert_eq!((c.rank(), c.world_size()), (0, 1));
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = input(&[3, 4], 5, 0, dtype);
        let outs = [
            c.all_reduce(&x, ReduceOp::Sum).expect("all_reduce"),
            c.all_reduce(&x, ReduceOp::Mean).expect("all_reduce"),
            c.all_reduce(&x, ReduceOp::Max).expect("all_reduce"),
            c.all_gather(&x).expect("all_gather"),
            c.reduce_scatter(&x, ReduceOp::Sum).expect("reduce_scatter"),
            c.all_to_all(&x).expect("all_to_all"),
            c.broadcast(&x, 0).expect("broadcast"),
        ];
        for y in outs {
            assert_eq!((y.dims(), y.dtype(), y.device()), (x.dims(), dtype, Device::Cpu));
            assert_eq!(bits(&y), bits(&x));
        }
    }
    c.barrier().expect("barrier");
}

#[test]
fn integer_data_movement_is_allowed() {
    let c = SingleProcess::new();
    let idx = Tensor::from_vec(vec![3u32, 1, 2], [3], Device::Cpu).expect("from_vec");
    assert_eq!(c.all_to_all(&idx).expect("all_to_all").to_vec::<u32>().expect("to_vec"), vec![3, 1, 2]);
    assert_eq!(c.all_gather(&idx).expect("all_gather").to_vec::<u32>().expect("to_vec"), vec![3, 1, 2]);
}

#[test]
fn same_checks_as_a_group() {
    let c = SingleProcess::new();
    let x = input(&[2], 6, 0, DType::F32);
    let idx = Tensor::from_vec(vec![1i32, 2], [2], Device::Cpu).expect("from_vec");
    let scalar = input(&[], 6, 0, DType::F32);
    assert_eq!(c.broadcast(&x, 1).expect_err("root").to_string(), "broadcast: expected root in 0..1, got 1");
    assert!(matches!(c.all_reduce(&idx, ReduceOp::Sum), Err(Error::DType { op: "all_reduce", got: DType::I32 })));
    assert!(matches!(c.reduce_scatter(&scalar, ReduceOp::Sum), Err(Error::Shape { op: "reduce_scatter", .. })));
    assert!(matches!(c.all_gather(&scalar), Err(Error::Shape { op: "all_gather", .. })));
    assert_eq!(c.send(&x, 1).expect_err("to").to_string(), "send: expected destination rank in 0..1, got 1");
    assert_eq!(c.recv(3).expect_err("from").to_string(), "recv: expected source rank in 0..1, got 3");
}

#[test]
fn send_to_self_is_fifo() {
    let c = SingleProcess::new();
    assert!(matches!(c.recv(0), Err(Error::Deadlock { op: "recv", .. })));
    for k in 0..3 {
        c.send(&Tensor::full(k as f32, [1], DType::F32, Device::Cpu).expect("full"), 0).expect("send");
    }
    for k in 0..3 {
        assert_eq!(values(&c.recv(0).expect("recv")), vec![k as f32]);
    }
    let x = input(&[4], 7, 0, DType::F32);
    assert_eq!(bits(&c.send_recv(&x, 0, 0).expect("send_recv")), bits(&x));
}

#[test]
fn usable_as_a_trait_object() {
    let c: Box<dyn Communicator> = Box::new(SingleProcess::new());
    let x = input(&[2, 2], 8, 0, DType::F32);
    assert_eq!(bits(&c.all_reduce(&x, ReduceOp::Mean).expect("all_reduce")), bits(&x));
}
