//! V-MoE token routing, the reference of `kernels/routing.cu` and, step for step, of vit-model's
//! host routing (`layers/routing.rs`): noisy softmax, top-k, Batch Priority Routing order and
//! k-major slot assignment with capacity. Shapes are checked by the ops layer.

/// One routing group as the kernels see it: first token, tokens, capacity per expert, first
/// slot of the group in every expert's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupSpan {
    pub(crate) start: usize,
    pub(crate) tokens: usize,
    pub(crate) capacity: usize,
    pub(crate) first_slot: usize,
}

/// The routing of every group: `[S, k]` choices, `[S]` claim order, `[S, k]` buffer rows and
/// weights, `[E·slots]` assignment per row.
pub(crate) struct Assignment {
    pub(crate) choice: Vec<i32>,
    pub(crate) order: Vec<i32>,
    pub(crate) pos: Vec<i32>,
    pub(crate) slot_src: Vec<i32>,
    pub(crate) weight: Vec<f32>,
}

/// `softmax(z + σ·n)` per row of `logits [S, e]` (noise `[S, e]` when given): the max
/// subtracted, `exp` in f32, the row sum in f64, each gate `(exp / sum)` rounded to f32.
pub(crate) fn route_gates(logits: &[f32], noise: Option<(&[f32], f32)>, e: usize) -> Vec<f32> {
    let mut g: Vec<f32> = match noise {
        Some((n, sigma)) => logits.iter().zip(n).map(|(z, n)| z + sigma * n).collect(),
        None => logits.to_vec(),
    };
    for row in g.chunks_mut(e.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0f64;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v as f64;
        }
        for v in row.iter_mut() {
            *v = (*v as f64 / s) as f32;
        }
    }
    g
}

/// The `k` largest entries of each row of `gates [S, e]`, descending; ties: lower index first.
pub(crate) fn route_top_k(gates: &[f32], e: usize, k: usize) -> Vec<i32> {
    let mut choice = Vec::with_capacity(gates.len() / e.max(1) * k);
    for row in gates.chunks(e.max(1)) {
        let mut idx: Vec<i32> = (0..e as i32).collect();
        // A stable sort by descending value keeps equal values in index order.
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        choice.extend_from_slice(&idx[..k]);
    }
    choice
}

/// Claim order and slots of every group (see `kernels/routing.cu`).
pub(crate) fn route_assign(
    gates: &[f32],
    choice: &[i32],
    e: usize,
    k: usize,
    groups: &[GroupSpan],
    slots: usize,
    bpr: bool,
) -> Assignment {
    let s = choice.len() / k.max(1);
    let mut order = Vec::with_capacity(s);
    let mut pos = vec![-1i32; s * k];
    let mut weight = vec![0f32; s * k];
    let mut slot_src = vec![-1i32; e * slots];
    for g in groups {
        let mut o: Vec<usize> = (g.start..g.start + g.tokens).collect();
        if bpr {
            let top1 = |t: usize| gates[t * e + choice[t * k] as usize];
            o.sort_by(|&a, &b| top1(b).total_cmp(&top1(a)));
        }
        let mut used = vec![0usize; e];
        for j in 0..k {
            for &t in &o {
                let a = t * k + j;
                let x = choice[a] as usize;
                if used[x] < g.capacity {
                    let row = x * slots + g.first_slot + used[x];
                    pos[a] = row as i32;
                    slot_src[row] = a as i32;
                    weight[a] = gates[t * e + x];
                    used[x] += 1;
                }
            }
        }
        order.extend(o.iter().map(|&t| t as i32));
    }
    Assignment { choice: choice.to_vec(), order, pos, slot_src, weight }
}
