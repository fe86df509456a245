//! Byte messages over any [`Communicator`]: what a trainer needs to share that is not a
//! tensor (the bad files one rank's loader met, say). Built on `all_gather`, so it behaves the
//! same on every backend.

use crate::{Communicator, Result};
use vit_tensor::{Device, Tensor};

/// Every rank's `bytes`, in rank order, on every rank. Two collectives: the lengths, then the
/// messages padded to the longest (4 bytes to a `U32` element).
pub fn all_gather_bytes(comm: &dyn Communicator, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let len = Tensor::from_vec(vec![bytes.len() as u32], [1], Device::Cpu)?;
    let lens: Vec<usize> = comm.all_gather(&len)?.to_vec::<u32>()?.into_iter().map(|l| l as usize).collect();
    let words = lens.iter().max().copied().unwrap_or(0).div_ceil(4);
    if words == 0 {
        return Ok(vec![Vec::new(); lens.len()]);
    }
    let mut padded = bytes.to_vec();
    padded.resize(words * 4, 0);
    let packed: Vec<u32> = padded.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let all = comm.all_gather(&Tensor::from_vec(packed, [1, words], Device::Cpu)?)?.to_vec::<u32>()?;
    Ok(lens
        .iter()
        .enumerate()
        .map(|(r, &l)| all[r * words..(r + 1) * words].iter().flat_map(|w| w.to_le_bytes()).take(l).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalGroup;

    #[test]
    fn every_rank_gets_every_message_of_any_length() {
        for n in [1, 3] {
            let got = LocalGroup::run(n, |comm| {
                let mine: Vec<u8> = (0..comm.rank() * 5 + 1).map(|i| (i * 37 + comm.rank()) as u8).collect();
                all_gather_bytes(&comm, &mine)
            });
            for g in got {
                let g = g.unwrap();
                assert_eq!(g.len(), n);
                for (r, m) in g.iter().enumerate() {
                    let want: Vec<u8> = (0..r * 5 + 1).map(|i| (i * 37 + r) as u8).collect();
                    assert_eq!(m, &want);
                }
            }
        }
        let empty = LocalGroup::run(2, |comm| all_gather_bytes(&comm, &[]));
        assert!(empty.into_iter().all(|g| g.unwrap() == vec![Vec::<u8>::new(); 2]));
    }
}
