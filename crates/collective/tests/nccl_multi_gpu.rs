//! The stream-overlapped collective matmul rings over NCCL (issue 13 item 3's GPU form), on two
//! or more GPUs of one host: NCCL refuses two ranks on one device, and with one rank the rings
//! are one matmul, so nothing here can run on a one-GPU host (`scripts/gpu-check.sh` does not
//! list this binary). On a host with several GPUs:
//!
//!     cargo test -p vit-collective --test nccl_multi_gpu -- --ignored
//!
//! Each rank compares the ring with the collective-then-matmul form on fresh random operands
//! (f32 and bf16, both ops, uneven row counts), and checks that the self-check admitted the
//! rings (a refusal prints a warning and falls back, which would hide the ring from the test).

use vit_collective::{all_gather_matmul, matmul_reduce_scatter, Communicator, MatmulComm, NcclGroup, ReduceOp};
use vit_tensor::{ops, DType, Device, Tensor};

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let (g, w) = (got.to_f32_vec().expect("to host"), want.to_f32_vec().expect("to host"));
    assert_eq!((got.dims(), g.len()), (want.dims(), w.len()), "{what}: shapes");
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: element {i}: ring {g}, plain {w}");
    }
}

#[test]
#[ignore = "needs two or more CUDA devices"]
fn rings_on_the_streams_equal_the_plain_collectives() {
    let count = vit_tensor::cuda::device_count();
    assert!(count >= 2, "this test needs two or more CUDA devices, found {count}");
    let devices: Vec<usize> = (0..count).collect();
    NcclGroup::run(&devices, |c| {
        let (n, dev) = (c.world_size(), Device::Cuda(c.device()));
        assert!(c.ring_matmul_allowed().unwrap(), "rank {}: the rings' self-check refused them", c.rank());
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 3e-2)] {
            let seed = 11 + c.rank() as u64;
            let x = Tensor::randn([45, 256], 0.0, 1.0, seed, dtype, dev).unwrap();
            let w = Tensor::randn([192, 256], 0.0, 0.1, 99, dtype, dev).unwrap();
            let (y, gathered) = all_gather_matmul(&c, &x, &w, true, MatmulComm::Ring).unwrap();
            let plain_gathered = c.all_gather(&x).unwrap();
            close(&format!("{dtype} gathered"), &gathered, &plain_gathered, 0.0);
            close(
                &format!("{dtype} all_gather_matmul"),
                &y,
                &ops::matmul_t(&plain_gathered, &w, false, true).unwrap(),
                tol,
            );

            let xs = Tensor::randn([n * 45, 256], 0.0, 1.0, seed + 50, dtype, dev).unwrap();
            let rs = matmul_reduce_scatter(&c, &xs, &w, true, MatmulComm::Ring).unwrap();
            let plain = c.reduce_scatter(&ops::matmul_t(&xs, &w, false, true).unwrap(), ReduceOp::Sum).unwrap();
            close(&format!("{dtype} matmul_reduce_scatter"), &rs, &plain, tol * n as f32);
        }
    })
    .expect("an NCCL group over the visible GPUs");
}
