//! The words of a call signature as the process backends (MPI, NCCL) exchange them before every
//! collective: the op with its reduce op and root, and the tensor's dtype. Each backend adds its
//! own words (shape, place) after these.

use crate::{call::Op, ReduceOp};
use vit_tensor::DType;

/// `[op code, reduce op, root]` of `op`.
pub(crate) fn op_words(op: Op) -> [u64; 3] {
    let reduce = |r: ReduceOp| match r {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
    };
    match op {
        Op::AllReduce(r) => [1, reduce(r), 0],
        Op::AllGather => [2, 0, 0],
        Op::ReduceScatter(r) => [3, reduce(r), 0],
        Op::AllToAll => [4, 0, 0],
        Op::Broadcast { root } => [5, 0, root as u64],
        Op::Barrier => [6, 0, 0],
        Op::Split => [7, 0, 0],
    }
}

/// The op of [`op_words`]' words (`w[..3]`); `None` for words no rank writes.
pub(crate) fn op_from_words(w: &[u64]) -> Option<Op> {
    let reduce = match w.get(1)? {
        0 => Some(ReduceOp::Sum),
        1 => Some(ReduceOp::Mean),
        2 => Some(ReduceOp::Max),
        _ => None,
    };
    Some(match w.first()? {
        1 => Op::AllReduce(reduce?),
        2 => Op::AllGather,
        3 => Op::ReduceScatter(reduce?),
        4 => Op::AllToAll,
        5 => Op::Broadcast { root: *w.get(2)? as usize },
        6 => Op::Barrier,
        7 => Op::Split,
        _ => return None,
    })
}

/// The code of `d` in a signature or a message header.
pub(crate) fn dtype_code(d: DType) -> u64 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::I32 => 3,
        DType::U32 => 4,
    }
}

/// The dtype of [`dtype_code`]'s code; `None` for an unknown one.
pub(crate) fn dtype_of(code: u64) -> Option<DType> {
    [DType::F32, DType::BF16, DType::F16, DType::I32, DType::U32].into_iter().find(|&d| dtype_code(d) == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_and_dtype_round_trips_and_unknown_words_are_refused() {
        let ops = [
            Op::AllReduce(ReduceOp::Sum),
            Op::AllReduce(ReduceOp::Mean),
            Op::AllReduce(ReduceOp::Max),
            Op::AllGather,
            Op::ReduceScatter(ReduceOp::Sum),
            Op::ReduceScatter(ReduceOp::Max),
            Op::AllToAll,
            Op::Broadcast { root: 3 },
            Op::Barrier,
            Op::Split,
        ];
        for op in ops {
            assert_eq!(op_from_words(&op_words(op)), Some(op));
        }
        for d in [DType::F32, DType::BF16, DType::F16, DType::I32, DType::U32] {
            assert_eq!(dtype_of(dtype_code(d)), Some(d));
        }
        assert_eq!(op_from_words(&[0, 0, 0]), None);
        assert_eq!(op_from_words(&[1, 9, 0]), None);
        assert_eq!(op_from_words(&[8, 0, 0]), None);
        assert_eq!(op_from_words(&[]), None);
        assert_eq!(dtype_of(5), None);
    }
}
