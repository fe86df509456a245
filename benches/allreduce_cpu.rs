//! Data-parallel communication on the CPU (issue 12 item 7), as ratios measured in one run:
//! `LocalGroup` all-reduce bus bandwidth against a memcpy of the same bytes, and the share of
//! the gradient all-reduce that the bucketed, overlapped all-reduce hides behind backward at
//! world 2: over `LocalGroup` itself (whose "transfer" is the summation, CPU work that competes
//! with backward for the same cores), and over `LocalGroup` behind [`Throttled`] links, a test
//! double of a network (the modelled transfer time sleeps, as a NIC would work beside the
//! cores; the summation still runs on them). `cargo bench --bench allreduce_cpu`

mod common;

use std::{hint::black_box, time::Instant};
use vit_collective::{BucketPlan, Communicator, LinkModel, LocalGroup, OverlappedAllReduce, ReduceOp, Throttled};
use vit_model::{ModelConfig, VisionTransformer};
use vit_tensor::{DType, Device, ParamStore, Tensor};

/// Bus bandwidth of an all-reduce of `bytes` (NCCL's definition: 2(n−1)/n · bytes / time).
fn all_reduce_bus_gbs(world: usize, elems: usize, samples: usize) -> f64 {
    let secs = LocalGroup::run(world, |comm| {
        let x = Tensor::randn([elems], 0.0, 1.0, comm.rank() as u64, DType::F32, Device::Cpu).unwrap();
        common::median_time(samples, 1, || {
            black_box(comm.all_reduce(&x, ReduceOp::Sum).unwrap());
        })
        .as_secs_f64()
    });
    let t = secs.into_iter().fold(0.0, f64::max);
    2.0 * (world - 1) as f64 / world as f64 * (elems * 4) as f64 / t / 1e9
}

fn memcpy_gbs(elems: usize, samples: usize) -> f64 {
    let src = vec![1.5f32; elems];
    let mut dst = vec![0f32; elems];
    let t = common::median_time(samples, 1, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    });
    (elems * 4) as f64 / t.as_secs_f64() / 1e9
}

/// Seconds of one rank's forward+backward at world 2 (both ranks at once): without any
/// reduction, then with one all-reduce after backward, then with 25 MiB buckets overlapped;
/// and of the all-reduce alone. With `link`, every collective goes over [`Throttled`] links.
fn overlap(cfg: &ModelConfig, batch: usize, samples: usize, link: Option<LinkModel>) -> (f64, f64, f64, f64) {
    let times = LocalGroup::run(2, |local| {
        let comm: Box<dyn Communicator> = match link {
            Some(l) => Box::new(Throttled::new(local, l).unwrap()),
            None => Box::new(local),
        };
        let comm = comm.as_ref();
        let model = VisionTransformer::new(cfg, DType::F32, Device::Cpu).unwrap();
        let p = model.init_params(0, DType::F32, Device::Cpu).unwrap();
        let layout = p.zeros_like(DType::F32).unwrap();
        let ranges: Vec<_> = layout
            .names()
            .map(|n| {
                let pl = layout.placement(n).unwrap();
                pl.offset..pl.offset + pl.numel
            })
            .collect();
        let plan = BucketPlan::new(&ranges, layout.buffer(0).numel(), 25 << 18).unwrap();
        let images =
            Tensor::randn([batch, cfg.channels, cfg.image_size, cfg.image_size], 0.0, 1.0, 1, DType::F32, Device::Cpu)
                .unwrap();
        let dout = Tensor::randn([batch, cfg.classes], 0.0, 1.0, 2, DType::F32, Device::Cpu).unwrap();
        let step = |mode: u8| {
            let (_, saved) = model.forward(&p, &images).unwrap();
            let mut g: ParamStore = p.zeros_like(DType::F32).unwrap();
            match mode {
                0 => {
                    model.backward(&p, &saved, &dout, &mut g).unwrap();
                }
                1 => {
                    model.backward(&p, &saved, &dout, &mut g).unwrap();
                    let s = comm.all_reduce(g.buffer(0), ReduceOp::Sum).unwrap();
                    *g.buffer_mut(0) = s;
                }
                _ => std::thread::scope(|scope| {
                    let mut red = OverlappedAllReduce::start(scope, comm, &plan, ReduceOp::Sum);
                    model
                        .backward_notify(&p, &saved, &dout, 1.0, &mut g, &mut |g, names| {
                            for n in names {
                                red.ready(g.buffer(0), g.position(n).unwrap());
                            }
                        })
                        .unwrap();
                    red.finish(g.buffer_mut(0)).unwrap();
                }),
            }
            black_box(g);
        };
        let mut t = [0.0; 3];
        for (mode, slot) in t.iter_mut().enumerate() {
            *slot = common::median_time(samples, 1, || step(mode as u8)).as_secs_f64();
        }
        // The all-reduce alone, on a buffer of the gradients' size.
        let g = layout.buffer(0).clone();
        comm.barrier().unwrap();
        let start = Instant::now();
        for _ in 0..samples {
            black_box(comm.all_reduce(&g, ReduceOp::Sum).unwrap());
        }
        (t[0], t[1], t[2], start.elapsed().as_secs_f64() / samples as f64)
    });
    times[0]
}

fn main() {
    let quick = common::quick();
    // The heap policy of `vit` (its main sets it): freed buffers up to 32 MiB keep their pages.
    let retained = vit_tensor::cpu::retain_freed_memory();
    println!(
        "allreduce_cpu: {} threads, LocalGroup (threads of one process), retain_freed_memory: {retained}",
        rayon::current_num_threads()
    );
    let samples = if quick { 1 } else { 5 };
    for mib in if quick { vec![1] } else { vec![1, 16, 64] } {
        let elems = mib << 18;
        let copy = memcpy_gbs(elems, samples);
        for world in [2, 4] {
            let bus = all_reduce_bus_gbs(world, elems, samples);
            println!(
                "  all_reduce {mib:>3} MiB, world {world}: bus {bus:6.2} GB/s | memcpy {copy:6.2} GB/s (ratio {:.2})",
                bus / copy
            );
        }
    }
    let mut cfg = ModelConfig::custom();
    let shape: &[&str] = if quick {
        &["image_size=8", "patch=4", "channels=1", "width=16", "depth=2", "mlp_dim=32", "heads=2", "classes=10"]
    } else {
        // ViT-B/16's body and gradients (86M parameters) on 28x28 images with patch 4, so that
        // backward takes a CPU-sized time.
        &["image_size=28", "patch=4", "channels=1", "width=768", "depth=12", "mlp_dim=3072", "heads=12", "classes=10"]
    };
    for s in shape {
        cfg.set(s).unwrap();
    }
    let params = vit_model::ParamCounts::of(&cfg).unwrap().total as f64 / 1e6;
    // Links: none (LocalGroup's own speed), then modelled networks of 1.25 GB/s (10 GbE) and
    // 0.5 GB/s per direction with 20 µs latency.
    let links: &[Option<f64>] = if quick { &[None, Some(1.25)] } else { &[None, Some(1.25), Some(0.5)] };
    for &gbs in links {
        let link =
            gbs.map(|g| LinkModel { bandwidth_bytes_per_s: g * 1e9, latency: std::time::Duration::from_micros(20) });
        let (bwd, after, overlapped, ar) = overlap(&cfg, if quick { 2 } else { 4 }, samples, link);
        let hidden = ((bwd + ar - overlapped) / ar).clamp(0.0, 1.0);
        let over = match gbs {
            Some(g) => format!("Throttled links of {g} GB/s"),
            None => "LocalGroup".into(),
        };
        println!(
            "  world 2 over {over}, {params:.1}M-parameter gradients: fwd+bwd {bwd:.3} s, all-reduce alone {ar:.3} s, \
             reduce after backward {after:.3} s, 25 MiB buckets overlapped {overlapped:.3} s: {:.0}% of the all-reduce hidden",
            100.0 * hidden
        );
    }
}
