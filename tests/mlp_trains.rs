//! Cross-crate: a two-layer MLP on real Fashion-MNIST, built from `vit-tensor` ops with
//! hand-written backward (llm.c style), fed by `vit-data` and stepped with a `vit-optim`
//! schedule, lowers its loss and beats chance on held-out images.

use vitrs::{
    data::load_idx_dataset,
    optim::{Decay, Schedule},
    tensor::{
        ops::{self, Gelu},
        DType, Device, Result, Tensor,
    },
};

struct Mlp {
    w1: Tensor, // [784, hidden]
    b1: Tensor, // [hidden]
    w2: Tensor, // [hidden, 10]
    b2: Tensor, // [10]
}

/// Mean loss over the batch, and the gradients of every parameter.
fn loss_and_grads(m: &Mlp, x: &Tensor, targets: &Tensor) -> Result<(f32, [Tensor; 4])> {
    let b = x.dims()[0];
    let h_pre = ops::bias_add(&ops::matmul(x, &m.w1)?, &m.b1)?;
    let h = ops::gelu_fwd(&h_pre, Gelu::Tanh)?;
    let logits = ops::bias_add(&ops::matmul(&h, &m.w2)?, &m.b2)?;
    let losses = ops::softmax_cross_entropy_fwd(&logits, targets)?;
    let loss = ops::sum_all(&losses)?.to_scalar()? / b as f32;
    let dloss = Tensor::full(1.0 / b as f32, [b], DType::F32, Device::Cpu)?;
    let dlogits = ops::softmax_cross_entropy_bwd(&logits, targets, &dloss)?;
    let (dh, dw2) = ops::matmul_bwd(&h, &m.w2, &dlogits, false, false)?;
    let db2 = ops::bias_add_bwd(&dlogits)?;
    let dh_pre = ops::gelu_bwd(&h_pre, &dh, Gelu::Tanh)?;
    let (_, dw1) = ops::matmul_bwd(x, &m.w1, &dh_pre, false, false)?;
    let db1 = ops::bias_add_bwd(&dh_pre)?;
    Ok((loss, [dw1, db1, dw2, db2]))
}

fn accuracy(m: &Mlp, x: &Tensor, labels: &[i32]) -> Result<f32> {
    let h = ops::gelu_fwd(&ops::bias_add(&ops::matmul(x, &m.w1)?, &m.b1)?, Gelu::Tanh)?;
    let pred = ops::argmax(&ops::bias_add(&ops::matmul(&h, &m.w2)?, &m.b2)?, 1)?.to_vec::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| **p as i32 == **l).count() as f32 / labels.len() as f32)
}

#[test]
fn mlp_on_fashion_mnist_lowers_its_loss() -> Result<()> {
    // The repository's subset: the first 10,000 training and 2,000 test images.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist-small");
    let train = load_idx_dataset(dir, "train", Some(2048)).expect("Fashion-MNIST subset in data/");
    let test = load_idx_dataset(dir, "t10k", Some(1000)).expect("Fashion-MNIST test split");
    let flat = |t: &Tensor| t.reshape([t.dims()[0], 784]);
    let (xtr, xte) = (flat(&train.images)?, flat(&test.images)?);
    let hidden = 64;
    let mut m = Mlp {
        w1: Tensor::randn([784, hidden], 0.0, 784f32.powf(-0.5), 1, DType::F32, Device::Cpu)?,
        b1: Tensor::zeros([hidden], DType::F32, Device::Cpu)?,
        w2: Tensor::randn([hidden, 10], 0.0, (hidden as f32).powf(-0.5), 2, DType::F32, Device::Cpu)?,
        b2: Tensor::zeros([10], DType::F32, Device::Cpu)?,
    };
    let steps = 150;
    let schedule = Schedule::new(Decay::Cosine, 5, 0, steps).expect("valid schedule");
    let batch = 128;
    let mut first = None;
    let mut last = 0.0;
    for step in 0..steps {
        let start = (step as usize * batch) % 2048;
        let x = xtr.narrow(start, batch)?;
        let t = ops::one_hot(&train.labels.narrow(start, batch)?, 10, DType::F32)?;
        let (loss, grads) = loss_and_grads(&m, &x, &t)?;
        first.get_or_insert(loss);
        last = loss;
        let lr = 0.2 * schedule.factor(step) as f32;
        for (p, g) in [&mut m.w1, &mut m.b1, &mut m.w2, &mut m.b2].into_iter().zip(&grads) {
            *p = ops::sub(p, &ops::scale(g, lr)?)?;
        }
    }
    let first = first.unwrap();
    assert!(last < 0.3 * first, "loss went from {first} to {last}");
    let acc = accuracy(&m, &xte, &test.labels.to_vec::<i32>()?)?;
    assert!(acc > 0.75, "test accuracy {acc} after {steps} steps");
    Ok(())
}
