//! [`MoeConfig`]: the sparse mixture-of-experts MLPs of a V-MoE (Riquelme et al. 2021;
//! reference §4). Part of a [`crate::ModelConfig`] as its `moe` table:
//!
//! ```toml
//! [moe]                      # in a train config: [model.moe]
//! experts = 32               # E, experts per MoE layer
//! k = 2                      # experts each token is routed to
//! capacity = 1.05            # C: slots per expert per group = ceil(group_tokens·k·C/E), up to a multiple of 4
//! every = 2                  # MoE in every 2nd block: blocks 1, 3, 5, ... (counting from 0)
//! # last = 2                 # instead: MoE in the last 2 odd blocks
//! group_size = 8             # images per routing group
//! bpr = true                 # Batch Priority Routing (false: vanilla, by token position)
//! noise = 1.0                # router noise std in training, in units of 1/E (0 = none)
//! importance_weight = 0.005  # weight of the importance auxiliary loss
//! load_weight = 0.005        # weight of the load auxiliary loss
//! expert_parallel = false    # training: shard the experts over the data-parallel ranks
//! ```
//!
//! On the command line the keys are `moe.experts`, `moe.k`, ... (`--set moe.experts=8`), and
//! `moe=none` removes the MoE layers (the dense twin).

use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Where and how a model uses mixture-of-experts MLPs; see the module docs for the TOML form.
///
/// Floats are compared and hashed by their bits, so a config stays `Eq` and `Hash`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MoeConfig {
    /// E, the experts of each MoE layer; every expert is an MLP of the dense shape (D → M → D).
    pub experts: usize,
    /// Experts each token is routed to (top-k of the router's softmax), `1..=experts`.
    pub k: usize,
    /// Capacity factor C: each expert takes `ceil(group_tokens·k·C/E)` tokens of a group,
    /// rounded up to a multiple of 4; assignments beyond are dropped. Positive.
    pub capacity: f64,
    /// MoE in every `every`-th block, the blocks `every−1, 2·every−1, ...` (every-2: blocks 1,
    /// 3, 5, ...). Ignored when `last` is set.
    pub every: usize,
    /// MoE in the last `n` odd blocks instead (`last = 2` on 12 blocks: blocks 9 and 11).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    /// Images per routing group: capacity, routing and the auxiliary losses are per group of
    /// `group_size · tokens` tokens. A batch that is not a multiple ends in a smaller group.
    pub group_size: usize,
    /// Batch Priority Routing: tokens claim slots in order of their top-1 gate, highest first
    /// (false: in token order, "vanilla").
    pub bpr: bool,
    /// Router noise in training: Gaussian of std `noise / E` added to the logits. 0 turns the
    /// noise (and with it the load loss) off.
    pub noise: f64,
    /// Weight of the importance loss `(std(imp)/mean(imp))²`, added to the training loss.
    pub importance_weight: f64,
    /// Weight of the load loss `(std(load)/mean(load))²` (only with noise).
    pub load_weight: f64,
    /// Expert parallelism in training (`vit train --world N`): each of the N data-parallel
    /// ranks holds E/N experts of every MoE layer and the dispatched tokens travel to their
    /// experts' ranks by all-to-all ([`crate::layers::shard_experts`]). The same model and the
    /// same math as without it; E must be a multiple of N. Ignored outside training and on one
    /// rank.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expert_parallel: bool,
}

/// Every key of the `moe` table, as `--set moe.<key>=value` takes them.
pub const MOE_KEYS: &[&str] = &[
    "moe.experts",
    "moe.k",
    "moe.capacity",
    "moe.every",
    "moe.last",
    "moe.group_size",
    "moe.bpr",
    "moe.noise",
    "moe.importance_weight",
    "moe.load_weight",
    "moe.expert_parallel",
];

impl Default for MoeConfig {
    /// The paper's V-MoE: E = 32, k = 2, C = 1.05, every-2, 8 images per group, BPR, noise
    /// std 1/E, both auxiliary losses at 0.005.
    fn default() -> Self {
        MoeConfig {
            experts: 32,
            k: 2,
            capacity: 1.05,
            every: 2,
            last: None,
            group_size: 8,
            bpr: true,
            noise: 1.0,
            importance_weight: 0.005,
            load_weight: 0.005,
            expert_parallel: false,
        }
    }
}

impl MoeConfig {
    /// Whether block `index` of a model of `depth` blocks has a MoE MLP.
    pub fn is_moe_block(&self, index: usize, depth: usize) -> bool {
        match self.last {
            Some(n) => {
                let odd = depth / 2; // odd blocks 1, 3, ..., below depth
                index % 2 == 1 && index < depth && (index / 2) + n >= odd
            }
            None => self.every > 0 && index % self.every == self.every - 1,
        }
    }

    /// The MoE blocks of a model of `depth` blocks, ascending.
    pub fn moe_blocks(&self, depth: usize) -> Vec<usize> {
        (0..depth).filter(|&i| self.is_moe_block(i, depth)).collect()
    }

    /// Slots per expert for a group of `tokens` tokens (reference §4, vmoe `compute_capacity`):
    /// `ceil(tokens·k·C/E)`, at least 1, rounded up to a multiple of 4.
    pub fn capacity_for(&self, tokens: usize) -> usize {
        crate::layers::routing::capacity(tokens, self.k, self.capacity, self.experts)
    }

    /// Router noise std in training, `noise / E`.
    pub fn noise_std(&self) -> f64 {
        self.noise / self.experts.max(1) as f64
    }

    /// Sets `key` (without the `moe.` prefix) from its text; see [`crate::ModelConfig::set`].
    pub(crate) fn set_value(&mut self, key: &'static str, value: &str) -> Result<()> {
        let uint = |v: &str| v.parse::<usize>().map_err(|_| ModelError::bad_value(key, v, "an unsigned integer"));
        let float = |v: &str| v.parse::<f64>().map_err(|_| ModelError::bad_value(key, v, "a number"));
        let boolean = |v: &str| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            v => Err(ModelError::bad_value(key, v, "true or false")),
        };
        match key {
            "moe.experts" => self.experts = uint(value)?,
            "moe.k" => self.k = uint(value)?,
            "moe.capacity" => self.capacity = float(value)?,
            "moe.every" => self.every = uint(value)?,
            "moe.last" => {
                self.last = match value {
                    "none" => None,
                    v => Some(v.parse().map_err(|_| ModelError::bad_value(key, v, "an unsigned integer or none"))?),
                }
            }
            "moe.group_size" => self.group_size = uint(value)?,
            "moe.bpr" => self.bpr = boolean(value)?,
            "moe.expert_parallel" => self.expert_parallel = boolean(value)?,
            "moe.noise" => self.noise = float(value)?,
            "moe.importance_weight" => self.importance_weight = float(value)?,
            "moe.load_weight" => self.load_weight = float(value)?,
            _ => return Err(ModelError::UnknownKey { key: key.to_string(), valid: MOE_KEYS.join(", ") }),
        }
        Ok(())
    }

    /// Checks every field against the model's `depth`; the error names the field (`moe.k`),
    /// its value and what was expected.
    pub fn validate(&self, depth: usize) -> Result<()> {
        if self.experts == 0 {
            return Err(ModelError::invalid("moe.experts", self.experts, "a positive number of experts"));
        }
        if self.k == 0 || self.k > self.experts {
            return Err(ModelError::invalid("moe.k", self.k, format!("1 to moe.experts ({})", self.experts)));
        }
        if !(self.capacity > 0.0 && self.capacity.is_finite()) {
            return Err(ModelError::invalid("moe.capacity", self.capacity, "a positive capacity factor"));
        }
        if self.every == 0 {
            return Err(ModelError::invalid(
                "moe.every",
                self.every,
                "a positive block interval (2: blocks 1, 3, 5, ...)",
            ));
        }
        if let Some(n) = self.last {
            let odd = depth / 2;
            if n == 0 || n > odd {
                return Err(ModelError::invalid(
                    "moe.last",
                    n,
                    format!("1 to the number of odd blocks ({odd} of depth {depth})"),
                ));
            }
        }
        if self.group_size == 0 {
            return Err(ModelError::invalid(
                "moe.group_size",
                self.group_size,
                "a positive number of images per group",
            ));
        }
        for (field, v) in [
            ("moe.noise", self.noise),
            ("moe.importance_weight", self.importance_weight),
            ("moe.load_weight", self.load_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(ModelError::invalid(field, v, "a finite value >= 0"));
            }
        }
        Ok(())
    }

    fn bits(&self) -> impl PartialEq + Hash {
        (
            (self.experts, self.k, self.every, self.last, self.group_size, self.bpr, self.expert_parallel),
            [self.capacity, self.noise, self.importance_weight, self.load_weight].map(f64::to_bits),
        )
    }
}

impl PartialEq for MoeConfig {
    fn eq(&self, other: &Self) -> bool {
        self.bits() == other.bits()
    }
}

impl Eq for MoeConfig {}

impl Hash for MoeConfig {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.bits().hash(state)
    }
}
