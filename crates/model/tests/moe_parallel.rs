//! Expert parallelism of the V-MoE layer (issue 11 item 5): experts sharded over 2 and 4
//! `LocalGroup` ranks, each rank with its own images, give the single-rank layer's output and
//! gradients on the whole batch (forward, input gradient, every expert gradient, the router's
//! gradient summed over the ranks); an expert count the ranks do not divide is an error.

use vit_collective::{Communicator, LocalGroup, ReduceOp};
use vit_model::{
    layers::{shard_experts, Init, Initializer, MoeMlp},
    MoeConfig, ParamStore,
};
use vit_tensor::{ops::Gelu, testing::assert_close, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

fn randn(dims: &[usize], std: f32, seed: u64) -> Tensor {
    Tensor::randn(dims.to_vec(), 0.0, std, seed, DType::F32, CPU).unwrap()
}

/// The layer with every parameter random (identical experts would hide a wrong shard).
fn layer(cfg: &MoeConfig, d: usize, m: usize, seed: u64) -> (MoeMlp, ParamStore) {
    let l = MoeMlp::new("moe", d, m, cfg, Gelu::Tanh);
    let mut sink = Initializer { init: Init { seed, dtype: DType::F32, device: CPU }, store: ParamStore::new() };
    l.init(&mut sink).unwrap();
    let mut p = ParamStore::new();
    for (i, (name, t)) in sink.store.iter().enumerate() {
        p.insert(name, randn(t.dims(), 0.5, seed + 10 + i as u64)).unwrap();
    }
    (l, p)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}

fn check(world: usize, experts: usize) {
    // 2 images per rank in groups of 1 image of 6 tokens, k = 2, C = 0.8: some assignments are
    // dropped, and BPR reorders the slots.
    let cfg = MoeConfig { experts, k: 2, capacity: 0.8, group_size: 1, bpr: true, ..MoeConfig::default() };
    let (d, m, t, per_rank) = (8, 12, 6, 2);
    let (l, p) = layer(&cfg, d, m, 3);
    let b = world * per_rank;
    let x = randn(&[b, t, d], 1.0, 100);
    let dy = randn(&[b, t, d], 1.0, 101);
    let (y, saved) = l.forward(&p, &x, None).unwrap();
    assert!(saved.stats.dropped > 0.0, "the test must drop assignments: {:?}", saved.stats);
    let mut g = p.zeros_like(DType::F32).unwrap();
    // Each rank's auxiliary losses are averaged over its own groups: weigh them by 1/W so
    // that the ranks' router gradients add up to the whole batch's.
    let dx = l.backward(&p, &x, &saved, &dy, 1.0, &mut g).unwrap();
    let el = experts / world;

    let results = LocalGroup::run(world, |comm| {
        let r = comm.rank();
        let pr = shard_experts(&l, &p, r, world).unwrap();
        let xr = x.narrow(r * per_rank, per_rank).unwrap();
        let dyr = dy.narrow(r * per_rank, per_rank).unwrap();
        let (yr, sr) = l.forward_parallel(&pr, &xr, None, &comm).unwrap();
        let mut gr = pr.zeros_like(DType::F32).unwrap();
        let dxr = l.backward_parallel(&pr, &xr, &sr, &dyr, 1.0 / world as f32, &mut gr, &comm).unwrap();
        let router = comm.all_reduce(gr.get(&l.router).unwrap(), ReduceOp::Sum).unwrap();
        (r, yr, dxr, gr, router)
    });
    for (r, yr, dxr, gr, router) in results {
        let what = |s: &str| format!("{world} ranks, rank {r}: {s}");
        let rows = |t: &Tensor| values(&t.narrow(r * per_rank, per_rank).unwrap());
        assert_close(&what("output"), &values(&yr), &rows(&y), 1e-5, 1e-6);
        assert_close(&what("input gradient"), &values(&dxr), &rows(&dx), 1e-5, 1e-6);
        for name in [&l.fc1_weight, &l.fc1_bias, &l.fc2_weight, &l.fc2_bias] {
            let want = values(&g.get(name).unwrap().narrow(r * el, el).unwrap());
            assert_close(&what(name), &values(gr.get(name).unwrap()), &want, 1e-5, 1e-6);
        }
        assert_close(
            &what("router gradient, summed"),
            &values(&router),
            &values(g.get(&l.router).unwrap()),
            1e-4,
            1e-6,
        );
    }
}

#[test]
fn experts_sharded_over_2_ranks_equal_one_rank() {
    check(2, 4);
}

#[test]
fn experts_sharded_over_4_ranks_equal_one_rank() {
    check(4, 8);
}

#[test]
fn an_expert_count_the_ranks_do_not_divide_is_an_error() {
    let cfg = MoeConfig { experts: 6, ..MoeConfig::default() };
    let (l, p) = layer(&cfg, 4, 8, 1);
    let err = shard_experts(&l, &p, 0, 4).unwrap_err().to_string();
    assert!(err.contains("moe.experts = 6: expected a multiple of the 4 expert-parallel ranks"), "{err}");
    assert_eq!(err.lines().count(), 1);
}
