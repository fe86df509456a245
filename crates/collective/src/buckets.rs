//! Bucketed all-reduce overlapped with backward (issue 12 item 3, PyTorch DDP's scheme): the
//! flat gradient buffer is cut into buckets of about `bucket_elems` elements at parameter
//! boundaries; as backward finishes a parameter's gradient the caller marks it, and a bucket
//! whose parameters are all final is handed to a communication thread that all-reduces it while
//! backward goes on. [`OverlappedAllReduce::finish`] reduces what is left and writes every
//! result back into the buffer.
//!
//! Every element is reduced in rank order whatever the buckets, so the result has the same bits
//! as one all-reduce of the whole buffer. Ranks launch buckets in the order their parameters
//! become final, which is the same on every rank (the same model runs the same backward), and
//! `finish` launches the rest in bucket order.

use crate::{Communicator, Error, ReduceOp, Result};
use std::{ops::Range, sync::mpsc, thread::Scope};
use vit_tensor::Tensor;

/// Buckets over one flat buffer of `len` elements: contiguous ranges cut at parameter
/// boundaries, the last parameters (what backward finishes first) in the first bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    /// Element ranges, covering `0..len` without overlap.
    buckets: Vec<Range<usize>>,
    /// For each parameter (in the order given to [`BucketPlan::new`]): its bucket and its
    /// element count.
    params: Vec<(usize, usize)>,
    /// Elements of the buffer.
    len: usize,
}

impl BucketPlan {
    /// Element ranges of parameters of `sizes` elements laid out one after another from 0, and
    /// the total: the `params` and `len` of [`BucketPlan::new`] for a buffer without padding.
    pub fn contiguous_ranges(sizes: &[usize]) -> (Vec<Range<usize>>, usize) {
        let mut at = 0;
        let ranges = sizes
            .iter()
            .map(|&n| {
                at += n;
                at - n..at
            })
            .collect();
        (ranges, at)
    }

    /// The plan for parameters at element ranges `params` of a buffer of `len` elements (ranges
    /// within `0..len`, not overlapping, in any order; gaps between them are padding and ride
    /// along with a neighbour), each bucket at least `bucket_elems` elements of parameters
    /// (the first one, at the buffer's start, may be smaller). `bucket_elems = 0` cuts one
    /// bucket per parameter; `usize::MAX` makes one bucket of everything.
    pub fn new(params: &[Range<usize>], len: usize, bucket_elems: usize) -> Result<Self> {
        let mut order: Vec<usize> = (0..params.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(params[i].start));
        for w in order.windows(2) {
            let (hi, lo) = (&params[w[0]], &params[w[1]]);
            if lo.end > hi.start {
                return Err(Error::Shape {
                    op: "BucketPlan::new",
                    msg: format!("parameter ranges {lo:?} and {hi:?} overlap"),
                });
            }
        }
        if let Some(last) = order.first().map(|&i| &params[i]).filter(|r| r.end > len) {
            return Err(Error::Shape {
                op: "BucketPlan::new",
                msg: format!("parameter range {last:?} ends past the buffer's {len} elements"),
            });
        }
        // Walk from the buffer's end down, closing a bucket at a parameter's start once it holds
        // enough; the bucket nearest the start takes the rest (down to element 0).
        let mut cuts = vec![len];
        let mut filled = 0usize;
        let mut of_param = vec![(0usize, 0usize); params.len()];
        for (k, &i) in order.iter().enumerate() {
            of_param[i] = (cuts.len() - 1, params[i].len());
            filled += params[i].len();
            let last = k + 1 == order.len();
            if filled >= bucket_elems.max(1) && !last {
                cuts.push(params[i].start);
                filled = 0;
            }
        }
        cuts.push(0);
        cuts.dedup();
        let buckets: Vec<Range<usize>> = cuts.windows(2).map(|w| w[1]..w[0]).collect();
        // A plan over zero parameters is one bucket of the whole (padding-only) buffer.
        let buckets = if buckets.is_empty() { std::iter::once(0..len).collect() } else { buckets };
        Ok(BucketPlan { buckets, params: of_param, len })
    }

    /// The buckets' element ranges, from the buffer's end to its start.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Elements of the buffer the plan covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a plan over an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parameters the plan was made for.
    pub fn params(&self) -> usize {
        self.params.len()
    }

    /// A 64-bit FNV-1a hash of the buffer length and every bucket's range: ranks whose plans
    /// differ (and would call NCCL with different counts) have different fingerprints.
    pub(crate) fn fingerprint(&self) -> u64 {
        let words = std::iter::once(self.len).chain(self.buckets.iter().flat_map(|r| [r.start, r.end]));
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for w in words {
            for b in (w as u64).to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

/// Which buckets of a [`BucketPlan`] backward has completed: each parameter is marked once as
/// its gradient becomes final, and the mark that completes a bucket says so. The bookkeeping of
/// the device all-reduce ([`crate::NcclOverlappedAllReduce`]), where a bucket launched early
/// would be reduced before backward wrote it, so a parameter marked twice or outside the plan
/// is an error instead of being ignored.
#[derive(Debug, Clone)]
pub struct BucketCountdown<'a> {
    plan: &'a BucketPlan,
    /// Parameters each bucket still waits for.
    pending: Vec<usize>,
    marked: Vec<bool>,
}

impl<'a> BucketCountdown<'a> {
    /// Every bucket waiting for all its parameters.
    pub fn new(plan: &'a BucketPlan) -> Self {
        let mut pending = vec![0; plan.buckets.len()];
        for &(b, _) in &plan.params {
            pending[b] += 1;
        }
        BucketCountdown { plan, pending, marked: vec![false; plan.params.len()] }
    }

    /// Marks parameter `param` (an index into the ranges given to [`BucketPlan::new`]) final:
    /// `Some(bucket)` (an index into [`BucketPlan::buckets`]) when that was the bucket's last
    /// parameter, `None` otherwise. Errors, changing nothing: `param` outside the plan, or
    /// marked before.
    pub fn ready(&mut self, param: usize) -> Result<Option<usize>> {
        const OP: &str = "BucketCountdown::ready";
        let Some(&(b, _)) = self.plan.params.get(param) else {
            return Err(Error::Value {
                op: OP,
                msg: format!(
                    "parameter {param} is not in the bucket plan (expected an index in 0..{})",
                    self.plan.params.len()
                ),
            });
        };
        if self.marked[param] {
            return Err(Error::Value {
                op: OP,
                msg: format!("parameter {param} was marked ready twice (expected each once per backward)"),
            });
        }
        self.marked[param] = true;
        self.pending[b] -= 1;
        Ok((self.pending[b] == 0).then_some(b))
    }
}

/// One step's bucketed all-reduce of a flat buffer, with a communication thread (see the
/// module docs). Made with [`OverlappedAllReduce::start`] inside a [`std::thread::scope`].
pub struct OverlappedAllReduce<'a> {
    plan: &'a BucketPlan,
    /// Parameter elements each bucket still waits for.
    pending: Vec<usize>,
    launched: Vec<bool>,
    to_comm: Option<mpsc::Sender<(usize, Tensor)>>,
    from_comm: mpsc::Receiver<(usize, Result<Tensor>)>,
    /// The first error met while launching (reported by `finish`).
    failed: Option<Error>,
}

impl<'a> OverlappedAllReduce<'a> {
    /// Starts the communication thread in `scope`; it all-reduces with `op` over `comm` each
    /// bucket it is handed, in the order handed.
    pub fn start<'scope>(
        scope: &'scope Scope<'scope, 'a>,
        comm: &'a dyn Communicator,
        plan: &'a BucketPlan,
        op: ReduceOp,
    ) -> Self {
        let (to_comm, jobs) = mpsc::channel::<(usize, Tensor)>();
        let (done, from_comm) = mpsc::channel();
        scope.spawn(move || {
            for (i, t) in jobs {
                let r = comm.all_reduce(&t, op);
                let failed = r.is_err();
                if done.send((i, r)).is_err() || failed {
                    return;
                }
            }
        });
        let mut pending = vec![0; plan.buckets.len()];
        for &(b, n) in &plan.params {
            pending[b] += n;
        }
        OverlappedAllReduce {
            plan,
            pending,
            launched: vec![false; plan.buckets.len()],
            to_comm: Some(to_comm),
            from_comm,
            failed: None,
        }
    }

    /// Parameter `param` (an index into the ranges given to [`BucketPlan::new`]) has its final
    /// value in `buffer`: if that completes its bucket, a copy of the bucket goes to the
    /// communication thread. Marking a parameter twice is harmless only if the bucket was not
    /// complete yet; backward marks each once.
    pub fn ready(&mut self, buffer: &Tensor, param: usize) {
        let Some(&(b, n)) = self.plan.params.get(param) else { return };
        self.pending[b] = self.pending[b].saturating_sub(n);
        if self.pending[b] == 0 {
            self.launch(buffer, b);
        }
    }

    fn launch(&mut self, buffer: &Tensor, b: usize) {
        if self.launched[b] || self.failed.is_some() {
            return;
        }
        self.launched[b] = true;
        let r = &self.plan.buckets[b];
        // A copy, not a view: the caller goes on writing other parts of the buffer, and a view
        // would make each of those writes copy the whole buffer (copy-on-write).
        let copy = buffer
            .narrow(r.start, r.len())
            .and_then(|v| v.to_f32_vec())
            .and_then(|v| Tensor::from_f32(v, [r.len()], buffer.dtype(), buffer.device()));
        match copy {
            Ok(t) => {
                if let Some(tx) = &self.to_comm {
                    // A send fails only when the thread stopped after an error: `finish` reports it.
                    let _ = tx.send((b, t));
                }
            }
            Err(e) => self.failed = Some(e.into()),
        }
    }

    /// Launches the buckets not launched yet (in bucket order), waits for every result and
    /// writes it into `buffer`, which then holds the reduction of every rank's buffer.
    pub fn finish(mut self, buffer: &mut Tensor) -> Result<()> {
        if buffer.dims() != [self.plan.len] {
            return Err(Error::Shape {
                op: "OverlappedAllReduce::finish",
                msg: format!("a buffer of shape {}: expected the plan's [{}]", buffer.shape(), self.plan.len),
            });
        }
        for b in 0..self.plan.buckets.len() {
            self.launch(buffer, b);
        }
        let expected = self.launched.iter().filter(|&&l| l).count();
        self.to_comm = None; // the thread ends after the last job
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut results = Vec::with_capacity(expected);
        for _ in 0..expected {
            match self.from_comm.recv() {
                Ok((b, Ok(t))) => results.push((b, t)),
                Ok((_, Err(e))) => return Err(e),
                Err(_) => {
                    return Err(Error::Backend {
                        op: "OverlappedAllReduce::finish",
                        msg: "the communication thread ended early".into(),
                    })
                }
            }
        }
        for (b, t) in results {
            buffer.write_at(self.plan.buckets[b].start, &t)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalGroup;
    use vit_tensor::{DType, Device};

    #[test]
    fn contiguous_ranges_tile_the_buffer_in_order() {
        let (ranges, len) = BucketPlan::contiguous_ranges(&[3, 0, 5, 1]);
        assert_eq!(ranges, vec![0..3, 3..3, 3..8, 8..9]);
        assert_eq!(len, 9);
        assert_eq!(BucketPlan::contiguous_ranges(&[]), (vec![], 0));
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // lists of ranges, some of one
    fn buckets_cut_at_parameter_boundaries_from_the_end() {
        // Params [0,4) [4,6) [8,16) [16,20), buffer of 20 (6..8 padding).
        let p = [0..4, 4..6, 8..16, 16..20];
        let plan = BucketPlan::new(&p, 20, 6).unwrap();
        assert_eq!(plan.buckets(), &[8..20, 0..8]);
        assert_eq!(plan.params, vec![(1, 4), (1, 2), (0, 8), (0, 4)]);
        assert_eq!(BucketPlan::new(&p, 20, 0).unwrap().buckets(), &[16..20, 8..16, 4..8, 0..4]);
        assert_eq!(BucketPlan::new(&p, 20, usize::MAX).unwrap().buckets(), &[0..20]);
        let e = BucketPlan::new(&[0..4, 3..6], 6, 1).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
        let e = BucketPlan::new(&[0..4], 3, 1).unwrap_err().to_string();
        assert!(e.contains("past the buffer's 3 elements"), "{e}");
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // lists of ranges, some of one
    fn the_countdown_completes_each_bucket_at_its_last_parameter_and_refuses_bad_marks() {
        // Buckets [8..20) (params 2, 3) and [0..8) (params 0, 1).
        let plan = BucketPlan::new(&[0..4, 4..6, 8..16, 16..20], 20, 6).unwrap();
        let mut c = BucketCountdown::new(&plan);
        assert_eq!(c.ready(3).unwrap(), None);
        assert_eq!(c.ready(2).unwrap(), Some(0));
        let e = c.ready(2).unwrap_err().to_string();
        assert!(e.contains("parameter 2 was marked ready twice"), "{e}");
        let e = c.ready(4).unwrap_err().to_string();
        assert!(e.contains("parameter 4 is not in the bucket plan") && e.contains("0..4"), "{e}");
        assert_eq!(c.ready(0).unwrap(), None);
        assert_eq!(c.ready(1).unwrap(), Some(1));
        // Plans that cut differently have different fingerprints; equal plans equal ones.
        let same = BucketPlan::new(&[0..4, 4..6, 8..16, 16..20], 20, 6).unwrap();
        assert_eq!(plan.fingerprint(), same.fingerprint());
        let other = BucketPlan::new(&[0..4, 4..6, 8..16, 16..20], 20, 0).unwrap();
        assert_ne!(plan.fingerprint(), other.fingerprint());
        assert_ne!(plan.fingerprint(), BucketPlan::new(&[0..4], 20, 6).unwrap().fingerprint());
        assert_eq!((plan.len(), plan.params(), plan.is_empty()), (20, 4, false));
    }

    #[test]
    fn overlapped_buckets_give_the_bits_of_one_all_reduce() {
        let p: Vec<Range<usize>> = (0..7).map(|i| i * 10..i * 10 + 7 + i % 3).collect();
        for bucket in [0, 15, usize::MAX] {
            let got = LocalGroup::run(3, |comm| -> Result<(Vec<f32>, Vec<f32>)> {
                let plan = BucketPlan::new(&p, 70, bucket)?;
                let x = Tensor::randn([70], 0.0, 1.0, 11 + comm.rank() as u64, DType::F32, Device::Cpu)?;
                let whole = comm.all_reduce(&x, ReduceOp::Sum)?.to_f32_vec()?;
                let mut buf = x.clone();
                std::thread::scope(|s| {
                    let mut red = OverlappedAllReduce::start(s, &comm, &plan, ReduceOp::Sum);
                    // As backward would: the last parameters first, some never marked.
                    for i in (2..7).rev() {
                        red.ready(&buf, i);
                    }
                    red.finish(&mut buf)
                })?;
                Ok((buf.to_f32_vec()?, whole))
            });
            for r in got {
                let (bucketed, whole) = r.unwrap();
                assert_eq!(bucketed, whole, "bucket size {bucket}");
            }
        }
    }
}
