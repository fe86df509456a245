//! V-MoE in the trainer (issue 11 item 3): the router-noise seed of each micro-batch and the
//! per-layer statistics that `metrics.jsonl` gains for a model with MoE layers.
//!
//! Each logged step of a V-MoE gets a `moe` object keyed by block index, e.g.
//! `"moe": {"1": {"importance_loss": 0.02, "load_loss": 0.03, "aux_loss": 0.00025,
//! "dropped": 0.01, "load": [0.26, 0.24, ...]}}`: the unweighted auxiliary losses, their
//! weighted sum (what the layer adds to the loss), the fraction of assignments dropped at
//! capacity and the share of assignments routed to each expert, averaged over the step's
//! micro-batches; with several data-parallel ranks, over the whole global batch
//! ([`MoeLog::all_reduce`]).

use std::collections::BTreeMap;

use vit_model::{layers::moe::mix_seed, ForwardSaved};

/// The router-noise seed of the micro-batch starting at row `first_row` of the global batch of
/// step `step`: a function of the run's seed and the data position only, so a resumed run draws
/// the same noise as a straight one.
pub fn noise_seed(seed: u64, step: u64, first_row: usize) -> u64 {
    mix_seed(mix_seed(seed ^ 0x6d6f_655f_6e6f_6973, step), first_row as u64)
}

/// The MoE statistics of one step, accumulated over its micro-batches.
#[derive(Debug, Default, Clone)]
pub struct MoeLog {
    layers: BTreeMap<usize, LayerSums>,
}

#[derive(Debug, Default, Clone)]
struct LayerSums {
    weight: f64,
    importance: f64,
    load_loss: Option<f64>,
    aux: f64,
    dropped: f64,
    load: Vec<f64>,
}

impl MoeLog {
    /// Adds the statistics of one forward pass, weighted by `weight` (its share of the batch).
    pub fn add(&mut self, saved: &ForwardSaved, weight: f64) {
        for (block, s) in saved.moe_stats() {
            let l = self.layers.entry(*block).or_default();
            l.weight += weight;
            l.importance += weight * s.importance_loss as f64;
            l.load_loss = s.load_loss.map(|v| l.load_loss.unwrap_or(0.0) + weight * v as f64);
            l.aux += weight * s.aux_loss as f64;
            l.dropped += weight * s.dropped as f64;
            l.load.resize(s.load.len(), 0.0);
            for (a, v) in l.load.iter_mut().zip(&s.load) {
                *a += weight * *v as f64;
            }
        }
    }

    /// Sums every rank's statistics over `comm` (a collective: every rank calls it, with the
    /// same model), so that each rank's log is the whole global batch's. The sums travel as f32.
    pub fn all_reduce(&mut self, comm: &dyn vit_collective::Communicator) -> Result<(), vit_collective::Error> {
        if self.is_empty() {
            return Ok(());
        }
        let mut flat = Vec::new();
        for l in self.layers.values() {
            flat.extend([l.weight, l.importance, l.load_loss.unwrap_or(0.0), l.aux, l.dropped]);
            flat.extend(&l.load);
        }
        let n = flat.len();
        let t = vit_tensor::Tensor::from_vec(
            flat.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            [n],
            vit_tensor::Device::Cpu,
        )
        .map_err(vit_collective::Error::from)?;
        let summed =
            comm.all_reduce(&t, vit_collective::ReduceOp::Sum)?.to_f32_vec().map_err(vit_collective::Error::from)?;
        let mut it = summed.into_iter().map(f64::from);
        for l in self.layers.values_mut() {
            let mut next = || it.next().unwrap_or(0.0);
            l.weight = next();
            l.importance = next();
            let load_loss = next();
            l.load_loss = l.load_loss.map(|_| load_loss);
            l.aux = next();
            l.dropped = next();
            for v in l.load.iter_mut() {
                *v = next();
            }
        }
        Ok(())
    }

    /// Whether no MoE layer was seen (a dense model): nothing to log.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Puts the step's `moe` object into a metrics line (nothing for a dense model).
    pub fn write_into(&self, line: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        let mut moe = serde_json::Map::new();
        for (block, l) in &self.layers {
            let w = l.weight.max(f64::MIN_POSITIVE);
            let mut o = serde_json::json!({
                "importance_loss": l.importance / w,
                "aux_loss": l.aux / w,
                "dropped": l.dropped / w,
                "load": l.load.iter().map(|v| v / w).collect::<Vec<_>>(),
            });
            if let Some(v) = l.load_loss {
                o["load_loss"] = (v / w).into();
            }
            moe.insert(block.to_string(), o);
        }
        line["moe"] = serde_json::Value::Object(moe);
    }
}
