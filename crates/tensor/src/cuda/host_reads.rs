//! A process-wide count of device-to-host reads: every copy from a CUDA device to the host
//! (`Tensor::to_device(Device::Cpu)`, `to_vec`, `to_scalar`, `DeviceBuffer::to_vec`) waits for
//! the device's stream, so each one is a host round trip that leaves the GPU idle until the host
//! queues more work. `vit bench train` reports the reads per step (issue 14 item 6: a CUDA
//! training step should need none but at log steps).

use std::sync::atomic::{AtomicU64, Ordering};

static HOST_READS: AtomicU64 = AtomicU64::new(0);

/// Device-to-host reads since the process started (all devices, all threads).
pub fn host_reads() -> u64 {
    HOST_READS.load(Ordering::Relaxed)
}

/// Counts one device-to-host read (called by the copy paths).
pub(crate) fn count_host_read() {
    HOST_READS.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_only_grows() {
        let before = host_reads();
        count_host_read();
        count_host_read();
        assert!(host_reads() >= before + 2);
    }
}
