//! A Vision Transformer trainer written against the vitrs crates directly — no `vit-experiments`:
//! the model and its hand-written backward (`vit-model`), the optimizer chain (`vit-optim`), the
//! dataset, augmentation and loader (`vit-data`). Trains a small ViT on the Fashion-MNIST subset
//! that vit-data embeds (10,000 train and 2,000 test images; or the IDX files in `data dir`) and
//! prints the test accuracy.
//!
//! `cargo run --release -p custom-trainer -- [steps] [data dir]` (default: 300 steps).

use std::{error::Error, sync::Arc};
use vit_data::{Dataset, InMemoryDataset, Loader, LoaderConfig, Pipeline, Size, Transform};
use vit_model::{ModelConfig, VisionTransformer};
use vit_optim::{AdamWConfig, Algorithm, Decay, Optimizer, OptimizerChain, OptimizerConfig, Schedule};
use vit_tensor::{ops, DType, Device, ParamStore, Tensor};

const BATCH: usize = 128;

/// A ViT for 28×28 grey images: patch 7 (16 tokens), width 64, depth 4, GAP, 10 classes.
fn model_config() -> Result<ModelConfig, Box<dyn Error>> {
    let mut cfg = ModelConfig::custom();
    for kv in [
        "image_size=28",
        "patch=7",
        "channels=1",
        "width=64",
        "depth=4",
        "mlp_dim=128",
        "heads=4",
        "classes=10",
        "pool=gap",
        "posemb=learn",
    ] {
        cfg.set(kv)?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// `[batch, classes]` one-hot targets from integer labels.
fn one_hot(labels: &Tensor, classes: usize) -> Result<Tensor, Box<dyn Error>> {
    Ok(ops::one_hot(labels, classes, DType::F32)?)
}

/// Top-1 accuracy of `model` over one ordered pass of `loader`.
fn accuracy(model: &VisionTransformer, params: &ParamStore, loader: &Loader) -> Result<f64, Box<dyn Error>> {
    let (mut correct, mut seen) = (0usize, 0usize);
    for batch in loader.iter() {
        let batch = batch?;
        let predicted = ops::argmax(&model.predict(params, &batch.images)?, 1)?.to_vec::<u32>()?;
        let labels = batch.labels.to_vec::<i32>()?;
        correct += predicted.iter().zip(&labels).filter(|(p, l)| **p as i32 == **l).count();
        seen += labels.len();
    }
    Ok(correct as f64 / seen.max(1) as f64)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let split = |prefix: &str| -> Result<Arc<dyn Dataset>, Box<dyn Error>> {
        Ok(Arc::new(match args.get(2) {
            Some(dir) => InMemoryDataset::from_idx(dir, prefix, None)?,
            None => InMemoryDataset::from_bundled("fashion-mnist-small", prefix, None)?,
        }))
    };

    // Data: IDX images → in-memory datasets; pixels to [-1, 1]; random crops and flips for training.
    let (train, test) = (split("train")?, split("t10k")?);
    let to_unit = Transform::ValueRange { min: -1.0, max: 1.0, in_min: 0.0, in_max: 255.0 };
    let crop = Transform::RandomCrop { size: Size::Square(28), padding: 2 }; // pads black: before to_unit
    let augment = Pipeline::new(vec![crop, Transform::FlipLr { p: 0.5 }, to_unit.clone()]);
    let shuffled = LoaderConfig { shuffle: true, seed: 0, repeat: true, drop_last: true, ..LoaderConfig::new(BATCH) };
    let in_order = LoaderConfig { shuffle: false, repeat: false, drop_last: false, ..LoaderConfig::new(BATCH) };
    let train_loader = Loader::new(train, augment, shuffled)?;
    let test_loader = Loader::new(test, Pipeline::new(vec![to_unit]), in_order)?;

    // Model and optimizer: AdamW with a cosine schedule after 50 warm-up steps, clipping at 1.
    let model = VisionTransformer::new(&model_config()?, DType::F32, Device::Cpu)?;
    let mut params = model.init_params(0, DType::F32, Device::Cpu)?;
    let mut config = OptimizerConfig::new(Algorithm::AdamW(AdamWConfig::default()), 2e-3);
    config.grad_clip_norm = Some(1.0);
    config.schedule = Schedule::new(Decay::Cosine, 50.min(steps / 5), 0, steps)?;
    let mut optimizer = OptimizerChain::new(config, &params)?;
    println!("{} parameters in {} flat buffer(s)", params.numel(), params.buffers().len());

    // The loop: forward, softmax cross-entropy, backward into one flat gradient buffer, one step.
    for (step, batch) in train_loader.iter().take(steps as usize).enumerate() {
        let batch = batch?;
        let targets = one_hot(&batch.labels, 10)?;
        let (logits, saved) = model.forward(&params, &batch.images)?;
        let loss = ops::sum_all(&ops::softmax_cross_entropy_fwd(&logits, &targets)?)?.to_scalar()? / BATCH as f32;
        let dloss = Tensor::full(1.0 / BATCH as f32, [BATCH], DType::F32, Device::Cpu)?;
        let dlogits = ops::softmax_cross_entropy_bwd(&logits, &targets, &dloss)?;
        let mut grads = params.zeros_like(DType::F32)?;
        model.backward(&params, &saved, &dlogits, &mut grads)?;
        drop(saved); // it holds views of the parameters; without them the step updates in place
        let info = optimizer.step(&mut params, &grads)?;
        if (step + 1) % 50 == 0 || step == 0 {
            println!("step {:>4}  loss {loss:.4}  grad norm {:.3}  lr {:.2e}", step + 1, info.grad_norm, info.lr);
        }
    }
    println!("test accuracy {:.4}", accuracy(&model, &params, &test_loader)?);
    Ok(())
}
