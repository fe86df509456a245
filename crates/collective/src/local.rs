//! [`LocalGroup`]: `n` ranks in one process, one thread per rank, exchanging tensors through
//! shared memory. The test bed for every sharding strategy (design §5).
//!
//! Every collective is a rendezvous on one shared slot table: each rank deposits its call,
//! the last to arrive closes the round, and then every rank checks all calls (so a mismatch is
//! an error on every rank) and computes its own result from all inputs in rank order (so
//! reductions are bitwise identical on every rank). A large all-reduce splits the work: each
//! rank sums one contiguous piece of the elements over all ranks' inputs (in rank order, the
//! same bits) and the ranks then exchange pieces, so the ranks' threads share the summation
//! instead of each doing all of it (a reduce-scatter and an all-gather through shared memory). Nothing can strand a rank: a rank whose
//! communicator is dropped (its thread returned or panicked) makes the others' waits on it
//! fail, and when every live rank is waiting on another the group reports the deadlock to all.

use crate::{
    call::{validate, Call, Op},
    communicator::check_split_args,
    host, Communicator, Error, ReduceOp, Result,
};
use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
};
use vit_tensor::Tensor;

/// Builds groups of in-process ranks.
///
/// ```
/// use vit_collective::{Communicator, LocalGroup, ReduceOp};
/// use vit_tensor::{DType, Device, Tensor};
/// let sums = LocalGroup::run(4, |comm| -> vit_collective::Result<Vec<f32>> {
///     let x = Tensor::full(comm.rank() as f32, [2, 3], DType::F32, Device::Cpu)?; // [2, 3]
///     Ok(comm.all_reduce(&x, ReduceOp::Sum)?.to_f32_vec()?)                        // [2, 3]
/// });
/// for s in sums {
///     assert_eq!(s?, vec![6.0; 6]); // 0 + 1 + 2 + 3
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct LocalGroup;

impl LocalGroup {
    /// One communicator per rank, in rank order, for `n` ranks; move each to its own thread.
    /// `n = 0` gives none.
    #[allow(clippy::new_ret_no_self)] // a group is its ranks' communicators; there is no group value
    pub fn new(n: usize) -> Vec<LocalCommunicator> {
        Self::with_timeout(n, None)
    }

    /// [`LocalGroup::new`] whose blocking calls give up after `timeout` without progress: a
    /// rank that waits that long in one collective or receive gets [`Error::Timeout`] naming
    /// the ranks it waited for (a rank that is stuck or far slower than the others), instead of
    /// waiting forever. `None` waits forever.
    pub fn with_timeout(n: usize, timeout: Option<std::time::Duration>) -> Vec<LocalCommunicator> {
        let shared = Shared::new(n, timeout);
        (0..n).map(|rank| LocalCommunicator { rank, shared: Arc::clone(&shared) }).collect()
    }

    /// Runs `f` on `n` scoped threads, one per rank, and returns the results in rank order.
    /// Each rank's communicator is dropped when its `f` returns, so a rank that stops early
    /// (an error, a panic) makes the others' collectives fail instead of hang. A panic in any
    /// rank is re-raised here after every thread has ended.
    pub fn run<R: Send>(n: usize, f: impl Fn(LocalCommunicator) -> R + Sync) -> Vec<R> {
        Self::run_with_timeout(n, None, f)
    }

    /// [`LocalGroup::run`] over [`LocalGroup::with_timeout`]'s communicators.
    pub fn run_with_timeout<R: Send>(
        n: usize,
        timeout: Option<std::time::Duration>,
        f: impl Fn(LocalCommunicator) -> R + Sync,
    ) -> Vec<R> {
        let f = &f;
        let joined: Vec<std::thread::Result<R>> = std::thread::scope(|s| {
            let handles: Vec<_> =
                Self::with_timeout(n, timeout).into_iter().map(|comm| s.spawn(move || f(comm))).collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut out = Vec::with_capacity(n);
        for r in joined {
            match r {
                Ok(v) => out.push(v),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    }
}

/// One rank of a [`LocalGroup`]. Works on tensors of any device (through host memory); results
/// land on the device of this rank's input. Sends are buffered: [`Communicator::send`] never
/// blocks. Use one communicator from one thread at a time.
pub struct LocalCommunicator {
    rank: usize,
    shared: Arc<Shared>,
}

impl fmt::Debug for LocalCommunicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCommunicator").field("rank", &self.rank).field("world_size", &self.shared.n).finish()
    }
}

/// Groups being made by a split: (round, color) → (the group, members yet to take it).
type SplitTable = HashMap<(u64, u32), (Arc<Shared>, usize)>;

/// State shared by the ranks of one group.
struct Shared {
    n: usize,
    /// How long one blocking call may wait (see [`LocalGroup::with_timeout`]).
    timeout: Option<std::time::Duration>,
    state: Mutex<State>,
    cv: Condvar,
    /// Groups made by [`Communicator::split`], keyed by (the split's round, color), until each
    /// member has taken its communicator: the value counts the members still to take it.
    splits: Mutex<SplitTable>,
}

/// What a rank is blocked on, for deadlock detection and messages.
#[derive(Debug, Clone, Copy)]
enum Wait {
    Collective(Op),
    /// In a split all-reduce, for the other ranks' summed pieces.
    Pieces(Op),
    Recv {
        from: usize,
    },
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::Collective(op) => write!(f, "{op}"),
            Wait::Pieces(op) => write!(f, "{op} (the other ranks' pieces)"),
            Wait::Recv { from } => write!(f, "recv from rank {from}"),
        }
    }
}

/// One rank's part of a split all-reduce: its elements summed over every rank, in f32, or the
/// reason it could not sum them.
type Piece = std::result::Result<Arc<Vec<f32>>, String>;

/// Below this many elements (4 MiB of f32) an all-reduce is not split: every rank sums the
/// whole tensor itself, which saves the second exchange (a wake-up of every rank, measured at
/// ~0.4 ms on the 2-core development VM: 1 MiB all-reduces ran 5× slower split) where the
/// summation is cheap. Gradient buckets (25 MiB by default) are split.
const SPLIT_REDUCE_MIN_ELEMS: usize = 1 << 20;

/// A closed collective round: every rank's call, kept until every rank has taken it.
struct Round {
    generation: u64,
    calls: Vec<Call>,
}

struct State {
    /// This round's calls so far, by rank.
    slots: Vec<Option<Call>>,
    arrived: usize,
    /// Number of closed rounds; the open round's number.
    generation: u64,
    /// The last closed round, until all `n` ranks have taken it (before any can join the next).
    done: Option<Arc<Round>>,
    taken: usize,
    /// A split all-reduce's summed pieces, by rank (see [`LocalCommunicator::all_reduce_split`]),
    /// until every rank has taken them all; `Err` from a rank that failed to sum its piece.
    pieces: Vec<Option<Piece>>,
    pieces_taken: usize,
    /// Point-to-point queues, `from * n + to`.
    mailboxes: Vec<VecDeque<Tensor>>,
    /// Ranks whose communicator was dropped.
    left: Vec<bool>,
    /// The same ranks in the order they left: the first is the root cause of the failures.
    departed: Vec<usize>,
    /// What each rank is blocked on; `None` while it runs or can proceed.
    waiting: Vec<Option<Wait>>,
    /// Set when a deadlock was found; every later call fails with it.
    poisoned: Option<String>,
}

impl State {
    /// True if rank `r` waits on something only a live rank could provide. A wait that a
    /// departed rank blocks is not stuck: it fails with [`Error::Disconnected`] when it wakes.
    fn stuck(&self, r: usize) -> bool {
        match self.waiting[r] {
            None => false,
            Some(Wait::Collective(_) | Wait::Pieces(_)) => self.departed.is_empty(),
            Some(Wait::Recv { from }) => !self.left[from],
        }
    }

    /// A description of the deadlock if every rank that has not left is stuck (and one is).
    fn deadlock(&self) -> Option<String> {
        let n = self.left.len();
        let all_stuck = (0..n).all(|r| self.left[r] || self.stuck(r));
        if !all_stuck || !(0..n).any(|r| self.stuck(r)) {
            return None;
        }
        let each: Vec<String> = self
            .waiting
            .iter()
            .enumerate()
            .map(|(r, w)| match w {
                Some(w) => format!("rank {r} in {w}"),
                None => format!("rank {r} has left"),
            })
            .collect();
        Some(format!("deadlock: every rank is waiting on another: {}", each.join(", ")))
    }

    /// The rank that left first, if any.
    fn first_left(&self) -> Option<usize> {
        self.departed.first().copied()
    }
}

impl Shared {
    /// The state of a new group of `n` ranks.
    fn new(n: usize, timeout: Option<std::time::Duration>) -> Arc<Self> {
        Arc::new(Shared {
            n,
            timeout,
            state: Mutex::new(State {
                slots: vec![None; n],
                arrived: 0,
                generation: 0,
                done: None,
                taken: 0,
                pieces: vec![None; n],
                pieces_taken: 0,
                mailboxes: vec![VecDeque::new(); n * n],
                left: vec![false; n],
                departed: Vec::new(),
                waiting: vec![None; n],
                poisoned: None,
            }),
            cv: Condvar::new(),
            splits: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, so a poisoned mutex still holds consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LocalCommunicator {
    /// Blocks rank `self.rank` until `poll` yields a result, marking it as waiting on `wait`
    /// meanwhile. Fails when the group is poisoned, or poisons it when this wait completes a
    /// deadlock (every live rank waiting), so that no rank waits forever.
    fn block<'a, T>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        op: &'static str,
        wait: Wait,
        mut poll: impl FnMut(&mut State) -> Option<Result<T>>,
    ) -> (MutexGuard<'a, State>, Result<T>) {
        let rank = self.rank;
        let deadline = self.shared.timeout.map(|t| (t, std::time::Instant::now() + t));
        loop {
            let polled = poll(&mut st);
            if let Some(Ok(v)) = polled {
                st.waiting[rank] = None;
                return (st, Ok(v));
            }
            // A deadlock found elsewhere is the root cause of any other failure seen now
            // (ranks that got the deadlock error leave the group).
            if let Some(reason) = &st.poisoned {
                let err = Error::Poisoned { op, reason: reason.clone() };
                st.waiting[rank] = None;
                return (st, Err(err));
            }
            if let Some(Err(e)) = polled {
                st.waiting[rank] = None;
                return (st, Err(e));
            }
            st.waiting[rank] = Some(wait);
            if let Some(msg) = st.deadlock() {
                st.poisoned = Some(msg.clone());
                st.waiting[rank] = None;
                self.shared.cv.notify_all();
                return (st, Err(Error::Deadlock { op, msg }));
            }
            st = match deadline {
                None => self.shared.cv.wait(st).unwrap_or_else(PoisonError::into_inner),
                Some((t, at)) => {
                    let now = std::time::Instant::now();
                    if now >= at {
                        st.waiting[rank] = None;
                        let peers = match wait {
                            Wait::Recv { from } => vec![from],
                            Wait::Collective(_) => (0..self.shared.n).filter(|&r| st.slots[r].is_none()).collect(),
                            Wait::Pieces(_) => (0..self.shared.n).filter(|&r| st.pieces[r].is_none()).collect(),
                        };
                        return (st, Err(Error::Timeout { op, secs: t.as_secs_f64(), peers }));
                    }
                    self.shared.cv.wait_timeout(st, at - now).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
    }

    /// Joins the open round with `call` and returns the closed round once every rank is in.
    fn rendezvous(&self, call: Call) -> Result<Arc<Round>> {
        let (rank, n) = (self.rank, self.shared.n);
        let op = call.op.name();
        let wait = Wait::Collective(call.op);
        let mut st = self.shared.lock();
        if let Some(reason) = &st.poisoned {
            return Err(Error::Poisoned { op, reason: reason.clone() });
        }
        if let Some(peer) = st.first_left() {
            return Err(Error::Disconnected { op, peer });
        }
        if st.slots[rank].is_some() {
            let msg = format!("rank {rank} is already in a collective: one communicator used by two threads at once");
            return Err(Error::Deadlock { op, msg });
        }
        let generation = st.generation;
        st.slots[rank] = Some(call);
        st.arrived += 1;
        if st.arrived == n {
            let calls: Vec<Call> = st.slots.iter_mut().filter_map(Option::take).collect();
            st.arrived = 0;
            st.generation += 1;
            st.done = Some(Arc::new(Round { generation, calls }));
            st.taken = 0;
            st.waiting.iter_mut().for_each(|w| *w = None); // everyone else was waiting on this round
            self.shared.cv.notify_all();
        } else {
            let (guard, closed) = self.block(st, op, wait, |st| {
                if st.generation > generation {
                    Some(Ok(()))
                } else {
                    st.first_left().map(|peer| Err(Error::Disconnected { op, peer }))
                }
            });
            st = guard;
            if let Err(e) = closed {
                // The round never closed: take our call back so the table stays consistent.
                if st.slots[rank].take().is_some() {
                    st.arrived -= 1;
                }
                return Err(e);
            }
        }
        let round = match &st.done {
            Some(round) if round.generation == generation => Arc::clone(round),
            _ => {
                let msg = format!("rank {rank} missed the result of round {generation}");
                return Err(Error::Deadlock { op, msg });
            }
        };
        st.taken += 1;
        if st.taken == n {
            st.done = None; // frees the inputs once the last rank holds its own reference
        }
        Ok(round)
    }

    /// A collective on `x`: rendezvous, check every rank's call, compute this rank's result.
    fn collective(&self, op: Op, x: &Tensor) -> Result<Tensor> {
        let round = self.rendezvous(Call { op, tensor: Some(x.clone()) })?;
        validate(op, &round.calls)?;
        host::complete(&round.calls, self.rank, x.device())?
            .ok_or(Error::Mismatch { op: op.name(), msg: "no rank passed a tensor".into() })
    }

    /// An all-reduce with the summation split over the ranks: after the rendezvous, rank `r`
    /// reduces elements `numel·r/n .. numel·(r+1)/n` of every rank's input (in f32, rank 0
    /// first: [`host::reduce`], so each element has the bits of the unsplit reduction), deposits
    /// that piece, waits for the others' and assembles the whole result. Each rank reads `1/n`
    /// of every input instead of all of them, and converts only its piece.
    fn all_reduce_split(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let kind = Op::AllReduce(op);
        let round = self.rendezvous(Call { op: kind, tensor: Some(x.clone()) })?;
        validate(kind, &round.calls)?;
        let (n, rank, numel) = (self.shared.n, self.rank, x.numel());
        let piece = |r: usize| numel * r / n..numel * (r + 1) / n;
        let mine = piece(rank);
        let summed = reduce_piece(&round.calls, mine, op, n);
        drop(round);
        let (deposit, failure): (Piece, _) = match summed {
            Ok(v) => (Ok(Arc::new(v)), None),
            Err(e) => (Err(e.to_string()), Some(e)),
        };
        let pieces = self.exchange_pieces(kind, deposit)?;
        if let Some(e) = failure {
            return Err(e); // this rank's own failure (the others were told through its piece)
        }
        let mut out = Vec::with_capacity(numel);
        for p in &pieces {
            out.extend_from_slice(p);
        }
        Ok(Tensor::from_f32(out, x.dims().to_vec(), x.dtype(), x.device())?)
    }

    /// Deposits this rank's piece of a split all-reduce and returns every rank's, in rank
    /// order, once all are in. The pieces are cleared when the last rank has taken them, which
    /// happens before any rank can enter the next collective's rendezvous.
    fn exchange_pieces(&self, op: Op, mine: Piece) -> Result<Vec<Arc<Vec<f32>>>> {
        let name = op.name();
        let mut st = self.shared.lock();
        st.pieces[self.rank] = Some(mine);
        if st.pieces.iter().all(Option::is_some) {
            // Whoever waits for pieces can go on: not stuck, even before it wakes (as when a
            // rendezvous closes), so a rank entering the next collective sees no deadlock.
            for w in st.waiting.iter_mut().filter(|w| matches!(w, Some(Wait::Pieces(_)))) {
                *w = None;
            }
        }
        self.shared.cv.notify_all();
        let (mut st, got) = self.block(st, name, Wait::Pieces(op), |st| {
            if st.pieces.iter().all(Option::is_some) {
                Some(Ok(st.pieces.iter().flatten().cloned().collect::<Vec<Piece>>()))
            } else {
                st.first_left().map(|peer| Err(Error::Disconnected { op: name, peer }))
            }
        });
        if got.is_ok() {
            st.pieces_taken += 1;
            if st.pieces_taken == self.shared.n {
                st.pieces.iter_mut().for_each(|p| *p = None);
                st.pieces_taken = 0;
            }
        }
        drop(st);
        got?.into_iter()
            .enumerate()
            .map(|(r, p)| {
                p.map_err(|msg| Error::Backend { op: name, msg: format!("rank {r} could not sum its piece: {msg}") })
            })
            .collect()
    }

    fn check_peer(&self, op: &'static str, what: &'static str, peer: usize) -> Result<()> {
        if peer >= self.shared.n {
            return Err(Error::Rank { op, what, got: peer, world_size: self.shared.n });
        }
        Ok(())
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.n
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        // Every rank takes the same branch when the shapes agree; when they do not, both
        // branches fail in the same rendezvous's validation.
        if self.shared.n > 1 && x.numel() >= SPLIT_REDUCE_MIN_ELEMS {
            self.all_reduce_split(x, op)
        } else {
            self.collective(Op::AllReduce(op), x)
        }
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.collective(Op::AllGather, x)
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.collective(Op::ReduceScatter(op), x)
    }

    fn all_to_all(&self, x: &Tensor) -> Result<Tensor> {
        self.collective(Op::AllToAll, x)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(Op::Broadcast { root }, x)
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        let op = "send";
        self.check_peer(op, "destination rank", to)?;
        let n = self.shared.n;
        let mut st = self.shared.lock();
        if let Some(reason) = &st.poisoned {
            return Err(Error::Poisoned { op, reason: reason.clone() });
        }
        if st.left[to] {
            return Err(Error::Disconnected { op, peer: to });
        }
        st.mailboxes[self.rank * n + to].push_back(x.clone());
        if matches!(st.waiting[to], Some(Wait::Recv { from }) if from == self.rank) {
            st.waiting[to] = None; // it can proceed now
        }
        self.shared.cv.notify_all();
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        let op = "recv";
        self.check_peer(op, "source rank", from)?;
        let (rank, n) = (self.rank, self.shared.n);
        let st = self.shared.lock();
        let (_st, out) = self.block(st, op, Wait::Recv { from }, |st| {
            if let Some(t) = st.mailboxes[from * n + rank].pop_front() {
                Some(Ok(t))
            } else if from == rank {
                let msg = format!("rank {rank} receives from itself, but sent itself nothing");
                Some(Err(Error::Deadlock { op, msg }))
            } else if st.left[from] {
                Some(Err(Error::Disconnected { op, peer: from }))
            } else {
                None
            }
        });
        out
    }

    fn barrier(&self) -> Result<()> {
        let round = self.rendezvous(Call { op: Op::Barrier, tensor: None })?;
        validate(Op::Barrier, &round.calls)
    }

    /// Every rank deposits `[color, key]`; each then finds its color's members in the closed
    /// round and takes the new group's state from a table keyed by (round, color), where the
    /// first member to look creates it.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let (color, key) = check_split_args(color, key)?;
        let (color, key) = (color as u32, key as u32);
        let mine = Tensor::from_vec(vec![color, key], [2], vit_tensor::Device::Cpu)?;
        let round = self.rendezvous(Call { op: Op::Split, tensor: Some(mine) })?;
        validate(Op::Split, &round.calls)?;
        let mut members = Vec::new(); // (key, old rank) of this color
        for (r, call) in round.calls.iter().enumerate() {
            let ck = call.tensor.as_ref().map(|t| t.to_vec::<u32>()).transpose()?.unwrap_or_default();
            if ck.first() == Some(&color) {
                members.push((ck[1], r));
            }
        }
        members.sort_unstable();
        let new_rank = members.iter().position(|&(_, r)| r == self.rank).ok_or_else(|| Error::Mismatch {
            op: "split",
            msg: format!("rank {} is missing from its own color {color}", self.rank),
        })?;
        let shared = {
            let mut splits = self.shared.splits.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = splits
                .entry((round.generation, color))
                .or_insert_with(|| (Shared::new(members.len(), self.shared.timeout), members.len()));
            let shared = Arc::clone(&entry.0);
            entry.1 -= 1;
            if entry.1 == 0 {
                splits.remove(&(round.generation, color));
            }
            shared
        };
        Ok(Box::new(LocalCommunicator { rank: new_rank, shared }))
    }
}

impl Drop for LocalCommunicator {
    /// Marks this rank as gone and wakes the others: their waits on it fail, and if all that
    /// remain are waiting on each other, the deadlock is reported to them.
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.left[self.rank] = true;
        st.departed.push(self.rank);
        st.waiting[self.rank] = None;
        if st.poisoned.is_none() {
            st.poisoned = st.deadlock();
        }
        self.shared.cv.notify_all();
    }
}

/// Elements `range` (row-major) of every rank's input reduced with `op` over a world of `n`,
/// in rank order and f32: [`host::fold_into`] and [`host::finish`], the bits of the unsplit
/// reduction. f32 CPU inputs are read in place; others are converted piece by piece.
fn reduce_piece(calls: &[Call], range: std::ops::Range<usize>, op: ReduceOp, n: usize) -> Result<Vec<f32>> {
    fn piece<'a>(t: &'a Tensor, range: &std::ops::Range<usize>) -> Result<std::borrow::Cow<'a, [f32]>> {
        if t.dtype() == vit_tensor::DType::F32 && t.device() == vit_tensor::Device::Cpu {
            return Ok(std::borrow::Cow::Borrowed(&t.as_slice::<f32>()?[range.clone()]));
        }
        let flat = t.reshape([t.numel()])?.narrow(range.start, range.len())?;
        Ok(std::borrow::Cow::Owned(flat.to_f32_vec()?))
    }
    let mut acc: Option<Vec<f32>> = None;
    for c in calls {
        let Some(t) = &c.tensor else {
            return Err(Error::Mismatch { op: c.op.name(), msg: "a rank passed no tensor".into() });
        };
        match acc.as_mut() {
            None => acc = Some(piece(t, &range)?.into_owned()),
            Some(a) => host::fold_into(a, &piece(t, &range)?, op),
        }
    }
    let mut acc = acc.unwrap_or_default();
    host::finish(&mut acc, op, n);
    Ok(acc)
}
