//! `vit-collective`: collectives for vitrs (design §5). The [`Communicator`] trait gives
//! all-reduce, all-gather, reduce-scatter, all-to-all, broadcast, send/recv and barrier on
//! tensors, with one behaviour on every backend:
//!
//! - [`LocalGroup`]: `n` ranks as `n` threads of one process (the test bed for every
//!   sharding strategy);
//! - [`SingleProcess`]: a world of one, where every collective is the identity;
//! - `MpiCommunicator` (cargo feature `mpi`): one rank per process over the system's MPI, on
//!   one machine or many (`mpirun`, `srun`).
//! - [`NcclCommunicator`]: one rank per GPU over NCCL (opened at run time; [`nccl_available`]),
//!   on device tensors and the device's stream: threads of one process ([`NcclGroup::run`]) or
//!   ranks that share another backend, e.g. MPI processes
//!   ([`NcclCommunicator::from_communicator`], `from_mpi`).
//!
//! [`Communicator::split`] makes sub-groups, and [`Mesh`] lays a group out on named axes
//! (`data × model`) with one sub-communicator per axis. On top of the trait: the bucketed
//! all-reduce overlapped with backward ([`OverlappedAllReduce`] on a communication thread;
//! [`NcclOverlappedAllReduce`] on a second CUDA stream, in place), collective matmul
//! ([`all_gather_matmul`], [`matmul_reduce_scatter`]: the ring in which transfers overlap the
//! matmuls), and [`Throttled`], a test double of a slow link for measuring overlap on one machine.
//!
//! ```
//! use vit_collective::{Communicator, LocalGroup};
//! use vit_tensor::{DType, Device, Tensor};
//! let gathered = LocalGroup::run(2, |comm| -> vit_collective::Result<Vec<f32>> {
//!     let x = Tensor::full(comm.rank() as f32, [1, 2], DType::F32, Device::Cpu)?; // [1, 2]
//!     Ok(comm.all_gather(&x)?.to_f32_vec()?)                                       // [2, 2]
//! });
//! for g in gathered {
//!     assert_eq!(g?, vec![0.0, 0.0, 1.0, 1.0]);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod buckets;
mod bytes;
mod call;
mod collective_matmul;
mod collective_matmul_nccl;
mod communicator;
mod error;
mod host;
mod local;
mod mesh;
#[cfg(feature = "mpi")]
mod mpi;
mod nccl;
mod nccl_overlap;
mod single;
mod throttled;
mod wire;

pub use buckets::{BucketCountdown, BucketPlan, OverlappedAllReduce};
pub use bytes::all_gather_bytes;
pub use collective_matmul::{all_gather_matmul, matmul_reduce_scatter, MatmulComm};
pub use communicator::{Communicator, ReduceOp};
pub use error::{Error, Result};
pub use local::{LocalCommunicator, LocalGroup};
pub use mesh::{Axis, Mesh, MeshShape};
#[cfg(feature = "mpi")]
pub use mpi::MpiCommunicator;
pub use nccl::{nccl_available, nccl_version, NcclCommunicator, NcclGroup};
pub use nccl_overlap::{NcclOverlappedAllReduce, SELF_CHECK_NAME as NCCL_OVERLAP_CHECK};
pub use single::SingleProcess;
pub use throttled::{LinkModel, Throttled};
