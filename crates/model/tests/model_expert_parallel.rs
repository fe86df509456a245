//! Expert parallelism of the whole model (issue 11 item 5): `forward_train_ep` and
//! `backward_notify_ep` on 2 and 4 `LocalGroup` ranks, each with its own images and its shard
//! of the experts (`shard_experts`), against the one-rank model. Routing is per rank's tokens
//! and every slot's expert output depends on its token alone, so rank r's logits equal the
//! one-rank model's on rank r's images with rank r's noise seed; the gradient of rank r's
//! experts is the sum of the one-rank gradients over every rank's images, every other gradient
//! (routers included) rank r's own part. With activation checkpointing too, and the config key.

mod common;

use common::{randomised, values};

use vit_collective::{Communicator, LocalGroup};
use vit_model::{ModelConfig, ParamStore, VisionTransformer};
use vit_tensor::{testing::assert_close, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

/// 2 blocks (block 1 a MoE of `experts` experts, k = 2, capacity 0.25, noise on), groups of 2 images.
fn tiny_vmoe(experts: usize, remat: bool) -> ModelConfig {
    let mut c = ModelConfig::custom();
    for s in [
        "image_size=8",
        "patch=4",
        "channels=2",
        "width=8",
        "depth=2",
        "mlp_dim=12",
        "heads=2",
        "classes=3",
        "moe.k=2",
        "moe.capacity=0.25",
        "moe.group_size=2",
        "moe.importance_weight=0.5",
        "moe.load_weight=0.5",
        "moe.expert_parallel=true",
    ] {
        c.set(s).unwrap();
    }
    c.set(&format!("moe.experts={experts}")).unwrap();
    c.remat = remat;
    c
}

fn check(world: usize, experts: usize, remat: bool) {
    let cfg = tiny_vmoe(experts, remat);
    let model = VisionTransformer::new(&cfg, DType::F32, CPU).unwrap();
    let p = randomised(&model.init_params(0, DType::F32, CPU).unwrap(), 7);
    let per_rank = 4;
    let images: Vec<Tensor> = (0..world)
        .map(|r| Tensor::randn([per_rank, 2, 8, 8], 0.0, 1.0, 50 + r as u64, DType::F32, CPU).unwrap())
        .collect();
    let douts: Vec<Tensor> =
        (0..world).map(|r| Tensor::randn([per_rank, 3], 0.0, 1.0, 80 + r as u64, DType::F32, CPU).unwrap()).collect();
    let seed = |r: usize| 1000 + r as u64;
    let share = 1.0 / world as f32;
    // One rank, each rank's images on their own with that rank's noise seed.
    let single: Vec<(Tensor, ParamStore, f32)> = (0..world)
        .map(|r| {
            let (y, s) = model.forward_train(&p, &images[r], seed(r)).unwrap();
            let mut g = p.zeros_like(DType::F32).unwrap();
            model.backward_scaled(&p, &s, &douts[r], share, &mut g).unwrap();
            (y, g, s.aux_loss())
        })
        .collect();
    assert!(single[0].2 > 0.0);
    let dropped = model.forward_train(&p, &images[0], seed(0)).unwrap().1.moe_stats()[0].1.dropped;
    assert!(dropped > 0.0, "the test must drop assignments");
    let experts_names = model.expert_param_names();
    assert_eq!(experts_names.len(), 4);
    let el = model.experts_per_rank(world).unwrap();

    let results = LocalGroup::run(world, |comm| {
        let r = comm.rank();
        let pr = model.shard_experts(&p, r, world).unwrap();
        let (y, s) = model.forward_train_ep(&pr, &images[r], seed(r), &comm).unwrap();
        let mut g = pr.zeros_like(DType::F32).unwrap();
        let mut seen = Vec::new();
        model
            .backward_notify_ep(
                &pr,
                &s,
                &douts[r],
                share,
                &mut g,
                &mut |_, names| seen.extend_from_slice(names),
                Some(&comm),
            )
            .unwrap();
        assert_eq!(seen.len(), pr.len(), "every gradient is reported once");
        (r, pr, y, g, s.aux_loss())
    });
    for (r, pr, y, g, aux) in results {
        let what = |s: &str| format!("{world} ranks{}, rank {r}: {s}", if remat { " (remat)" } else { "" });
        assert_close(&what("logits"), &values(&y), &values(&single[r].0), 1e-5, 1e-6);
        assert!((aux - single[r].2).abs() <= 1e-6 * single[r].2.abs().max(1.0), "{}", what("aux loss"));
        for (name, t) in pr.iter() {
            let want = if experts_names.iter().any(|n| n == name) {
                assert_eq!(t.dims()[0], el, "{}", what(name));
                let mut sum = vec![0f32; t.numel()];
                for (_, gs, _) in &single {
                    for (a, v) in sum.iter_mut().zip(values(&gs.get(name).unwrap().narrow(r * el, el).unwrap())) {
                        *a += v;
                    }
                }
                sum
            } else {
                values(single[r].1.get(name).unwrap())
            };
            assert_close(&what(name), &values(g.get(name).unwrap()), &want, 1e-4, 1e-6);
        }
    }
}

#[test]
fn two_ranks_give_the_one_rank_model_per_rank_and_the_whole_expert_gradients() {
    check(2, 4, false);
}

#[test]
fn four_ranks_with_activation_checkpointing() {
    check(4, 8, true);
}

#[test]
fn experts_the_ranks_do_not_divide_and_a_dense_model_are_errors() {
    let model = VisionTransformer::new(&tiny_vmoe(6, false), DType::F32, CPU).unwrap();
    let p = model.init_params(0, DType::F32, CPU).unwrap();
    let e = model.shard_experts(&p, 0, 4).unwrap_err().to_string();
    assert!(e.contains("moe.experts = 6: expected a multiple of the 4 expert-parallel ranks"), "{e}");
    assert_eq!(model.experts_per_rank(3).unwrap(), 2);
    let mut dense = tiny_vmoe(4, false);
    dense.set("moe=none").unwrap();
    let e = VisionTransformer::new(&dense, DType::F32, CPU).unwrap().experts_per_rank(2).unwrap_err().to_string();
    assert!(e.contains("moe.expert_parallel") && e.contains("with MoE layers"), "{e}");
    // The key: parsed, validated as a boolean, written to TOML only when set.
    let mut c = tiny_vmoe(4, false);
    assert!(c.to_toml().unwrap().contains("expert_parallel = true"));
    assert_eq!(ModelConfig::from_toml(&c.to_toml().unwrap()).unwrap(), c);
    c.set("moe.expert_parallel=false").unwrap();
    assert!(!c.to_toml().unwrap().contains("expert_parallel"));
    let e = c.set("moe.expert_parallel=yes").unwrap_err().to_string();
    assert!(e.contains("moe.expert_parallel = \"yes\": expected true or false"), "{e}");
}
