//! The semantic suite on the MPI backend, one rank per process: run under
//! `mpirun --allow-run-as-root --oversubscribe -np N target/.../mpi_suite-*` (scripts/test.sh
//! does, for N = 2 and 3); started alone it is a world of one. Prints one line per rank,
//! `mpi suite rank R of N: P passed, F failed`, the failures before it, and exits 1 on any.
//! Built only with the `mpi` feature (it needs an MPI installation).

mod common;

use vit_collective::{Communicator, MpiCommunicator};

fn main() {
    let comm = match MpiCommunicator::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mpi suite: {e}");
            std::process::exit(1);
        }
    };
    let outcomes = common::suite::run(&comm);
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    for (name, r) in &failed {
        eprintln!("mpi suite rank {}: FAILED {name}: {}", comm.rank(), r.as_ref().unwrap_err());
    }
    println!(
        "mpi suite rank {} of {}: {} passed, {} failed",
        comm.rank(),
        comm.world_size(),
        outcomes.len() - failed.len(),
        failed.len()
    );
    if outcomes.len() < 40 || !failed.is_empty() {
        std::process::exit(1);
    }
}
