//! Token routing of one group for a V-MoE layer (reference §4; google-research/vmoe
//! `NoisyTopExpertsPerItemRouter` and `get_top_experts_per_item_dispatcher`), computed on the
//! host from the router logits `z [S, E]` of the group's S tokens:
//!
//! 1. In training `z̃ = z + ε·σ` with ε ~ N(0, 1) and σ = noise/E; at inference `z̃ = z`.
//! 2. `gates = softmax(z̃)` over all E experts; each token takes its top-k gates (ties: lower
//!    expert index first). Its combine weights are those gates, not renormalised.
//! 3. Slots: tokens are ordered by position (vanilla) or, with Batch Priority Routing, by
//!    descending top-1 gate (stable). All first choices in that order, then all second choices
//!    (k-major), each take the next free slot of their expert; an assignment to a full expert
//!    (`capacity` slots) is dropped. A token whose choices are all dropped gets 0 from the layer.
//! 4. Auxiliary losses: importance `imp_e = Σ_t softmax(z)_te` (clean logits),
//!    `L_imp = var(imp)/mean(imp)²`; load (training only) with the threshold `thr_t` = the
//!    token's k-th largest noisy logit, `p_te = 1 − Φ((thr_t − z_te)/σ)`, `load_e = mean_t p_te`,
//!    `L_load = var(load)/mean(load)²` (population variance, as vmoe's `jnp.var`).
//!
//! [`GroupRoute::backward`] returns `∂/∂z` of the combine weights' loss and of both auxiliary
//! losses; the load loss's gradient flows through the normal CDF into `z` and, through the
//! threshold, into the noisy logit of the k-th choice (the noise itself is a constant).

/// Slots per expert for a group of `tokens` tokens routed to `k` of `experts` experts with
/// capacity factor `c`: `ceil(tokens·k·c/experts)` (computed in f64 as vmoe does), at least 1,
/// rounded up to a multiple of 4.
pub fn capacity(tokens: usize, k: usize, c: f64, experts: usize) -> usize {
    let raw = ((tokens * k) as f64 * c / experts.max(1) as f64).ceil();
    let raw = if raw.is_finite() && raw >= 1.0 { raw as usize } else { 1 };
    raw.div_ceil(4) * 4
}

/// The routing of one group of S tokens over E experts: choices, slots, gates and the
/// auxiliary losses, with what [`GroupRoute::backward`] needs.
#[derive(Debug, Clone)]
pub struct GroupRoute {
    /// S, tokens in the group.
    pub tokens: usize,
    /// E, experts.
    pub experts: usize,
    /// k, choices per token.
    pub k: usize,
    /// Slots per expert.
    pub capacity: usize,
    /// The chosen experts of each token by descending gate, `[S, k]` row-major.
    pub choice: Vec<u32>,
    /// The slot of each choice in its expert's buffer, `[S, k]`; −1 where it was dropped.
    pub slot: Vec<i32>,
    /// The softmax used for routing and combining (of the noisy logits in training), `[S, E]`.
    pub gates: Vec<f32>,
    /// The softmax of the clean logits (for the importance loss), `[S, E]`.
    pub probs: Vec<f32>,
    /// The order in which the tokens claimed slots (positions, or BPR's by top-1 gate).
    pub order: Vec<usize>,
    /// `var(imp)/mean(imp)²` of this group.
    pub importance_loss: f32,
    /// `var(load)/mean(load)²` of this group; `None` without noise (inference).
    pub load_loss: Option<f32>,
    /// For the load loss: σ, the index of each token's k-th largest noisy logit `[S]`, and
    /// `u = (thr − z)/σ` `[S, E]`.
    load: Option<LoadSaved>,
}

/// The routing decisions of one group of S tokens over E experts (see [`GroupRoute`]'s fields).
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The routing softmax `[S, E]`.
    pub gates: Vec<f32>,
    /// The chosen experts `[S, k]` by descending gate.
    pub choice: Vec<u32>,
    /// The claim order, token positions in the group.
    pub order: Vec<usize>,
    /// The slot of each choice in its expert's buffer `[S, k]`, −1 where dropped.
    pub slot: Vec<i32>,
}

#[derive(Debug, Clone)]
struct LoadSaved {
    sigma: f32,
    thr_index: Vec<u32>,
    u: Vec<f32>,
}

/// Row-wise softmax of `x [rows, n]` (max subtracted, f64 sums).
fn softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks(n).zip(out.chunks_mut(n)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0f64;
        for (v, e) in o.iter_mut().zip(row) {
            *v = (e - m).exp();
            s += *v as f64;
        }
        for v in o.iter_mut() {
            *v = (*v as f64 / s) as f32;
        }
    }
    out
}

/// `dx = y ⊙ (dy − Σ y·dy)` per row, added into `dx`.
fn softmax_bwd_rows(y: &[f32], dy: &[f32], n: usize, dx: &mut [f32]) {
    for ((yr, dyr), dxr) in y.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
        let dot: f64 = yr.iter().zip(dyr).map(|(a, b)| *a as f64 * *b as f64).sum();
        for ((d, a), b) in dxr.iter_mut().zip(yr).zip(dyr) {
            *d += (*a as f64 * (*b as f64 - dot)) as f32;
        }
    }
}

/// The indices of the `k` largest entries of `row`, descending; ties: lower index first.
fn top_k(row: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    // A stable sort by descending value keeps equal values in index order.
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.truncate(k);
    idx
}

/// `(var(v)/mean(v)², ∂/∂v)` with the population variance; 0 and no gradient when the mean is 0.
pub fn cv_squared(v: &[f64]) -> (f64, Vec<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if mean == 0.0 || !mean.is_finite() {
        return (0.0, vec![0.0; v.len()]);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let loss = var / (mean * mean);
    // ∂var/∂v_e = 2(v_e − mean)/n; ∂mean/∂v_e = 1/n.
    let grad = v.iter().map(|x| 2.0 * (x - mean) / n / (mean * mean) - 2.0 * var / (mean * mean * mean) / n).collect();
    (loss, grad)
}

/// `1 − Φ(u)`, the standard normal's upper tail.
fn normal_upper_tail(u: f64) -> f64 {
    0.5 * vit_tensor::cpu::erfc(u / std::f64::consts::SQRT_2)
}

/// The standard normal density φ(u).
fn normal_pdf(u: f64) -> f64 {
    (-0.5 * u * u).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

impl GroupRoute {
    /// Routes one group: `logits` `[S, E]` (clean), `noise` the standard-normal draws `[S, E]`
    /// and σ in training (`None` at inference), `k` choices per token, `capacity` slots per
    /// expert, `bpr` for Batch Priority Routing. `logits.len()` must be a multiple of `experts`.
    pub fn new(
        logits: &[f32],
        experts: usize,
        noise: Option<(&[f32], f32)>,
        k: usize,
        capacity: usize,
        bpr: bool,
    ) -> Self {
        let e = experts;
        let s = logits.len() / e;
        let noisy: Option<Vec<f32>> =
            noise.map(|(n, sigma)| logits.iter().zip(n).map(|(z, n)| z + sigma * n).collect());
        let gates = softmax_rows(noisy.as_deref().unwrap_or(logits), e);
        let mut choice = Vec::with_capacity(s * k);
        for row in gates.chunks(e) {
            choice.extend(top_k(row, k));
        }
        let mut order: Vec<usize> = (0..s).collect();
        if bpr {
            let top1 = |t: usize| gates[t * e + choice[t * k] as usize];
            order.sort_by(|&a, &b| top1(b).total_cmp(&top1(a)));
        }
        let mut slot = vec![-1i32; s * k];
        let mut used = vec![0usize; e];
        for j in 0..k {
            for &t in &order {
                let ex = choice[t * k + j] as usize;
                if used[ex] < capacity {
                    slot[t * k + j] = used[ex] as i32;
                    used[ex] += 1;
                }
            }
        }
        Self::from_assignment(logits, experts, noise, k, capacity, Assignment { gates, choice, order, slot })
    }

    /// The route of one group whose decisions were taken elsewhere (the CUDA routing kernels,
    /// `vit_tensor::ops::moe_route`): `a` holds the gates, choices, claim order and slots as
    /// [`GroupRoute::new`] computes them; the auxiliary losses are computed here from the
    /// `logits` and `noise` they came from.
    pub fn from_assignment(
        logits: &[f32],
        experts: usize,
        noise: Option<(&[f32], f32)>,
        k: usize,
        capacity: usize,
        a: Assignment,
    ) -> Self {
        let e = experts;
        let s = logits.len() / e;
        let Assignment { gates, choice, order, slot } = a;
        let probs = if noise.is_some() { softmax_rows(logits, e) } else { gates.clone() };
        let noisy: Option<Vec<f32>> =
            noise.map(|(n, sigma)| logits.iter().zip(n).map(|(z, n)| z + sigma * n).collect());
        let mut imp = vec![0f64; e];
        for row in probs.chunks(e) {
            for (i, p) in imp.iter_mut().zip(row) {
                *i += *p as f64;
            }
        }
        let importance_loss = cv_squared(&imp).0 as f32;
        let (load_loss, load) = match (&noisy, noise) {
            (Some(zn), Some((_, sigma))) if sigma > 0.0 => {
                let mut thr_index = Vec::with_capacity(s);
                let mut u = vec![0f32; s * e];
                let mut load = vec![0f64; e];
                for t in 0..s {
                    let row = &zn[t * e..(t + 1) * e];
                    let idx = top_k(row, k)[k - 1];
                    thr_index.push(idx);
                    let thr = row[idx as usize];
                    for x in 0..e {
                        let ut = (thr as f64 - logits[t * e + x] as f64) / sigma as f64;
                        u[t * e + x] = ut as f32;
                        load[x] += normal_upper_tail(ut) / s as f64;
                    }
                }
                (Some(cv_squared(&load).0 as f32), Some(LoadSaved { sigma, thr_index, u }))
            }
            _ => (None, None),
        };
        GroupRoute {
            tokens: s,
            experts: e,
            k,
            capacity,
            choice,
            slot,
            gates,
            probs,
            order,
            importance_loss,
            load_loss,
            load,
        }
    }

    /// The combine weight of choice `j` of token `t`: its gate, or 0 where it was dropped.
    pub fn weight(&self, t: usize, j: usize) -> f32 {
        if self.slot[t * self.k + j] < 0 {
            0.0
        } else {
            self.gates[t * self.experts + self.choice[t * self.k + j] as usize]
        }
    }

    /// Assignments (of S·k) dropped because their expert was full.
    pub fn dropped(&self) -> usize {
        self.slot.iter().filter(|s| **s < 0).count()
    }

    /// Assignments routed to each expert `[E]`, dropped or not.
    pub fn routed_per_expert(&self) -> Vec<usize> {
        let mut n = vec![0usize; self.experts];
        for c in &self.choice {
            n[*c as usize] += 1;
        }
        n
    }

    /// `∂L/∂z` `[S, E]` for `L = Σ dweight·weight + imp_scale·L_imp + load_scale·L_load`, with
    /// `dweight` `[S, k]` the gradient of the combine weights (dropped choices ignored).
    pub fn backward(&self, dweight: &[f32], imp_scale: f32, load_scale: f32) -> Vec<f32> {
        let (s, e, k) = (self.tokens, self.experts, self.k);
        let mut dz = vec![0f32; s * e];
        // Combine weights: gates of the chosen experts, through the (noisy) softmax; the noise
        // is a constant, so ∂z̃ = ∂z.
        let mut dgates = vec![0f32; s * e];
        for t in 0..s {
            for j in 0..k {
                if self.slot[t * k + j] >= 0 {
                    dgates[t * e + self.choice[t * k + j] as usize] += dweight[t * k + j];
                }
            }
        }
        softmax_bwd_rows(&self.gates, &dgates, e, &mut dz);
        // Importance: ∂L/∂imp_e is the same for every token's probability of expert e.
        if imp_scale != 0.0 {
            let mut imp = vec![0f64; e];
            for row in self.probs.chunks(e) {
                for (i, p) in imp.iter_mut().zip(row) {
                    *i += *p as f64;
                }
            }
            let dimp: Vec<f32> = cv_squared(&imp).1.iter().map(|g| (g * imp_scale as f64) as f32).collect();
            let dprobs: Vec<f32> = (0..s * e).map(|i| dimp[i % e]).collect();
            softmax_bwd_rows(&self.probs, &dprobs, e, &mut dz);
        }
        // Load: p = 1 − Φ(u), u = (thr − z)/σ, thr = z̃ of the k-th choice.
        if let (Some(l), true) = (&self.load, load_scale != 0.0) {
            let sigma = l.sigma as f64;
            let mut load = vec![0f64; e];
            for row in l.u.chunks(e) {
                for (ld, u) in load.iter_mut().zip(row) {
                    *ld += normal_upper_tail(*u as f64) / s as f64;
                }
            }
            let dload = cv_squared(&load).1;
            for t in 0..s {
                let mut dthr = 0f64;
                for x in 0..e {
                    let dp = dload[x] * load_scale as f64 / s as f64;
                    let du = -normal_pdf(l.u[t * e + x] as f64) * dp;
                    dz[t * e + x] += (-du / sigma) as f32;
                    dthr += du / sigma;
                }
                dz[t * e + l.thr_index[t] as usize] += dthr as f32;
            }
        }
        dz
    }
}
