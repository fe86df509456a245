//! V-MoE at inference (issue 11 item 4): the routing knobs `vit eval --set` may change on a
//! trained checkpoint (capacity, k, group size, BPR: none of them changes a parameter's shape),
//! evaluation that also reports the assignments dropped at capacity, and the capacity sweep
//! that evaluates every value with Batch Priority Routing and with vanilla routing side by side
//! (the paper's figure: BPR degrades gracefully below C = 1, vanilla collapses).

use super::{param_dtype, targets, tta, tta::TtaOp, TrainError};
use vit_data::Loader;
use vit_model::{ModelConfig, ParamStore, VisionTransformer};
use vit_tensor::{ops, DType, Device, Tensor};

/// The model keys `vit eval --set` and `--sweep` accept, with the `model.` prefix of a train
/// config (`model.moe.capacity=0.5`; the bare `moe.capacity=0.5` is taken too).
pub const INFERENCE_KNOBS: &[&str] = &["model.moe.capacity", "model.moe.k", "model.moe.group_size", "model.moe.bpr"];

/// The knob of `assignment`'s key without its `model.` prefix (`moe.capacity`), or an error
/// naming the key and the knobs there are.
fn knob(key: &str) -> Result<&'static str, TrainError> {
    let key = key.trim();
    let bare = key.strip_prefix("model.").unwrap_or(key);
    INFERENCE_KNOBS.iter().map(|k| &k["model.".len()..]).find(|k| *k == bare).ok_or_else(|| {
        TrainError::Config(format!(
            "{key}: not an inference knob; expected one of {} (the others change the trained model)",
            INFERENCE_KNOBS.join(", ")
        ))
    })
}

/// Applies one `key=value` (`model.moe.capacity=0.5`) of [`INFERENCE_KNOBS`] to `cfg` and
/// checks the result: a model without MoE layers, another key or a bad value (`k` above the
/// experts, a capacity ≤ 0) is a one-line error naming it.
pub fn set_inference_knob(cfg: &mut ModelConfig, assignment: &str) -> Result<(), TrainError> {
    let Some((key, value)) = assignment.split_once('=') else {
        return Err(TrainError::Config(format!("{assignment}: expected key=value, e.g. model.moe.capacity=0.5")));
    };
    let bare = knob(key)?;
    if cfg.moe.is_none() {
        return Err(TrainError::Config(format!("{}: the checkpoint's model has no MoE layers", key.trim())));
    }
    cfg.set_value(bare, value)?;
    cfg.validate()?;
    Ok(())
}

/// Accuracy, loss and routing of one evaluation pass.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoutedEval {
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// Mean cross-entropy per example.
    pub loss: f64,
    /// Per MoE block (block index, fraction of its token-to-expert assignments dropped at
    /// capacity over the whole pass); empty for a dense model.
    pub dropped: Vec<(usize, f64)>,
}

impl RoutedEval {
    /// The dropped fraction averaged over the MoE blocks (0 for a dense model).
    pub fn mean_dropped(&self) -> f64 {
        if self.dropped.is_empty() {
            0.0
        } else {
            self.dropped.iter().map(|(_, d)| d).sum::<f64>() / self.dropped.len() as f64
        }
    }
}

/// [`super::evaluate`] that also collects each MoE block's dropped assignments (MoE layers
/// route without noise, as at inference). The loss is sigmoid cross-entropy when `sigmoid`.
/// With test-time augmentation `tta` (empty: none), each image's logits are the mean over its
/// views ([`super::tta`]), accuracy and loss are of those, and the dropped assignments are
/// counted on the images themselves.
pub fn evaluate_routed(
    model: &VisionTransformer,
    params: &ParamStore,
    loader: &Loader,
    device: Device,
    sigmoid: bool,
    tta: &[TtaOp],
) -> Result<RoutedEval, TrainError> {
    let classes = model.config.classes;
    let (mut correct, mut loss, mut n) = (0usize, 0f64, 0usize);
    // Per MoE block: Σ over batches of dropped fraction · images (every image has the same
    // number of assignments in a block, so this weighs each assignment equally).
    let mut dropped: Vec<(usize, f64)> = Vec::new();
    for b in loader.iter() {
        let b = b?;
        let labels = b.labels.to_vec::<i32>()?;
        let views = tta::views(&b.images, tta)?;
        let x = views[0].to_device(device)?.cast(param_dtype(params))?;
        let (_, logits, moe) = model.predict_routed(params, &x)?;
        let mut logits = logits.cast(DType::F32)?;
        if views.len() > 1 {
            logits = mean_logits(model, params, &views, logits, device)?;
        }
        let pred = ops::argmax(&logits, 1)?.to_vec::<u32>()?;
        correct += pred.iter().zip(&labels).filter(|(p, l)| **p as i32 == **l).count();
        let t = targets(&labels, classes, 0.0, None)?.to_device(logits.device())?;
        let losses = if sigmoid {
            ops::sigmoid_cross_entropy_fwd(&logits, &t)?
        } else {
            ops::softmax_cross_entropy_fwd(&logits, &t)?
        };
        loss += ops::sum_all(&losses)?.to_scalar()? as f64;
        if dropped.is_empty() {
            dropped = moe.iter().map(|(i, _)| (*i, 0.0)).collect();
        }
        for ((_, acc), (_, s)) in dropped.iter_mut().zip(&moe) {
            *acc += s.dropped as f64 * labels.len() as f64;
        }
        n += labels.len();
    }
    for (_, d) in dropped.iter_mut() {
        *d /= n.max(1) as f64;
    }
    Ok(RoutedEval { accuracy: correct as f64 / n.max(1) as f64, loss: loss / n.max(1) as f64, dropped })
}

/// The mean of `first` (the logits of `views[0]`) and the logits of the other views, summed in
/// the views' order on the host: `[batch, classes]` f32 on the host.
fn mean_logits(
    model: &VisionTransformer,
    params: &ParamStore,
    views: &[Tensor],
    first: Tensor,
    device: Device,
) -> Result<Tensor, TrainError> {
    let dims = first.dims().to_vec();
    let mut sum = first.to_f32_vec()?;
    for v in &views[1..] {
        let (_, logits) = model.features_and_logits(params, &v.to_device(device)?.cast(param_dtype(params))?)?;
        for (s, l) in sum.iter_mut().zip(logits.to_f32_vec()?) {
            *s += l;
        }
    }
    let n = views.len() as f32;
    sum.iter_mut().for_each(|s| *s /= n);
    Ok(Tensor::from_f32(sum, dims, DType::F32, Device::Cpu)?)
}

/// One value of a sweep: the knob's value and the evaluation with BPR and with vanilla routing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SweepRow {
    /// The value as given (`0.5`).
    pub value: String,
    /// Batch Priority Routing (`moe.bpr = true`).
    pub bpr: RoutedEval,
    /// Vanilla routing by token position (`moe.bpr = false`).
    pub vanilla: RoutedEval,
}

/// Parses `--sweep key=v1,v2,...` into the key and its values; the key is one of
/// [`INFERENCE_KNOBS`] other than `model.moe.bpr` (BPR and vanilla are the columns).
pub fn parse_sweep(spec: &str) -> Result<(String, Vec<String>), TrainError> {
    let Some((key, values)) = spec.split_once('=') else {
        return Err(TrainError::Config(format!(
            "--sweep {spec}: expected key=v1,v2,..., e.g. model.moe.capacity=0.5,1.0"
        )));
    };
    let bare = knob(key)?;
    if bare == "moe.bpr" {
        return Err(TrainError::Config(format!(
            "--sweep {}: BPR and vanilla are evaluated side by side already; sweep model.moe.capacity, k or group_size",
            key.trim()
        )));
    }
    let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
    if values.iter().any(String::is_empty) {
        return Err(TrainError::Config(format!("--sweep {spec}: expected a comma-separated list of values")));
    }
    Ok((format!("model.{bare}"), values))
}

/// Evaluates `cfg` (a MoE model; its parameters `params`) at every value of the knob `key`,
/// each with BPR and with vanilla routing, on one pass of `loader` per evaluation. Every
/// value is checked before the first evaluation.
pub fn sweep(
    cfg: &ModelConfig,
    key: &str,
    values: &[String],
    params: &ParamStore,
    loader: &Loader,
    device: Device,
    sigmoid: bool,
) -> Result<Vec<SweepRow>, TrainError> {
    let mut configs = Vec::with_capacity(values.len());
    for v in values {
        let mut c = cfg.clone();
        set_inference_knob(&mut c, &format!("{key}={v}"))?;
        configs.push(c);
    }
    let mut rows = Vec::with_capacity(values.len());
    for (v, c) in values.iter().zip(configs) {
        let eval = |bpr: bool| -> Result<RoutedEval, TrainError> {
            let mut c = c.clone();
            set_inference_knob(&mut c, &format!("model.moe.bpr={bpr}"))?;
            let model = VisionTransformer::new(&c, DType::F32, device)?;
            evaluate_routed(&model, params, loader, device, sigmoid, &[])
        };
        let (bpr, vanilla) = (eval(true)?, eval(false)?);
        rows.push(SweepRow { value: v.clone(), bpr, vanilla });
    }
    Ok(rows)
}
