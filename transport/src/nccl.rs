//! [`Collectives`] over NVIDIA's NCCL, for groups whose every rank is a CUDA device: NVLink,
//! PCIe peer copies or InfiniBand between GPUs instead of QUIC between host buffers.
//!
//! libnccl is loaded at run time (through `cudarc`), so one binary runs with or without it. The
//! group first agrees, over the ring collectives it is opened from, that every member can use
//! NCCL; only then does its rank 0 make NCCL's unique id and broadcast it, so a rank without
//! a GPU or libnccl makes every member fail with the same error instead of leaving the others
//! waiting in `ncclCommInitRank`.
//!
//! Values arrive and leave as host slices, like every [`Collectives`]: each operation copies
//! them to the device, runs there and copies the result back. NCCL's reduce-scatter and
//! all-gather take equal shards, so a buffer whose length the group does not divide travels
//! padded: shard `i` ([`shard_range`]) sits at the start of the `i`-th of `size` equal chunks.
//!
//! NCCL itself waits forever for a member that died. So each operation's completion is polled
//! against the same timeout the ring uses for a silent peer; past it the communicator is aborted
//! (which ends its kernels) and the operation, like every later one, fails with an error.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::collective::{shard_range, Collectives};
use crate::TransportError;

/// NCCL collectives of one group, each member on its own CUDA device.
pub struct NcclCollectives {
    /// An NCCL communicator takes one call at a time; the lock orders callers from several
    /// threads (each thread that runs collectives concurrently opens a group of its own).
    /// `None` once aborted after a timeout.
    comm: Mutex<Option<Comm>>,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    /// How long one operation may wait for the slowest member.
    timeout: Duration,
}

// SAFETY: `Comm` is not `Send`/`Sync` only because it holds NCCL's raw communicator pointer.
// NCCL lets any thread use a communicator as long as calls do not overlap, which the mutex
// guarantees, and every call binds the device's context to the calling thread first.
unsafe impl Send for NcclCollectives {}
unsafe impl Sync for NcclCollectives {}

/// Whether libnccl can be loaded on this machine.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn failure(what: &str, detail: impl std::fmt::Debug) -> TransportError {
    TransportError::Device(format!("NCCL {what} failed: {detail:?}"))
}

impl NcclCollectives {
    /// Opens NCCL over the members of `bootstrap`'s group, this one on CUDA device `device`
    /// (`None`: this rank has no CUDA device), each operation waiting at most `timeout` for the
    /// others. Every member must call it at the same point; it fails on every member unless all
    /// of them have a CUDA device and libnccl.
    pub fn open(
        bootstrap: &dyn Collectives,
        device: Option<usize>,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let usable = device.is_some() && nccl_available();
        let mut ready = [f32::from(u8::from(usable))];
        bootstrap.all_reduce(&mut ready)?;
        if ready[0] as usize != size {
            return Err(TransportError::Device(format!(
                "NCCL needs every rank of the group on a CUDA device with libnccl loadable \
                 (on LD_LIBRARY_PATH as libnccl.so); {} of {size} are{}",
                ready[0] as usize,
                match (device, usable) {
                    (None, _) => ", and this rank has no CUDA device",
                    (Some(_), false) => ", and this rank cannot load libnccl",
                    _ => "",
                }
            )));
        }
        let ordinal = device.expect("every rank has a device");
        // Rank 0's id reaches the others as one byte per value (exact in any float type).
        let mut id = vec![0.0f32; 128];
        if rank == 0 {
            let made = Id::new().map_err(|e| failure("ncclGetUniqueId", e.0))?;
            for (value, &byte) in id.iter_mut().zip(made.internal()) {
                *value = f32::from(byte as u8);
            }
        }
        bootstrap.broadcast(&mut id, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (byte, &value) in internal.iter_mut().zip(&id) {
            *byte = value as u8 as std::ffi::c_char;
        }
        let context = CudaContext::new(ordinal).map_err(|e| failure("opening the device", e))?;
        context
            .bind_to_thread()
            .map_err(|e| failure("binding the device", e))?;
        let stream = context
            .new_stream()
            .map_err(|e| failure("making a stream", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal))
            .map_err(|e| failure("ncclCommInitRank", e.0))?;
        Ok(Self {
            comm: Mutex::new(Some(comm)),
            context,
            stream,
            rank,
            size,
            timeout,
        })
    }

    /// Runs `op` on the device with `values` copied there, then copies `out_len` values of
    /// its result back.
    fn on_device(
        &self,
        values: &[f32],
        out_len: usize,
        what: &str,
        op: impl FnOnce(&Comm, &CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<(), TransportError>,
    ) -> Result<Vec<f32>, TransportError> {
        let mut comm = self.comm.lock().expect("NCCL communicator lock");
        let Some(live) = comm.as_ref() else {
            return Err(TransportError::Device(format!(
                "NCCL {what}: the communicator was aborted after an earlier timeout"
            )));
        };
        self.context
            .bind_to_thread()
            .map_err(|e| failure("binding the device", e))?;
        let input = self
            .stream
            .clone_htod(values)
            .map_err(|e| failure("copying to the device", e))?;
        let mut output = self
            .stream
            .alloc_zeros::<f32>(out_len)
            .map_err(|e| failure("allocating", e))?;
        op(live, &input, &mut output)?;
        if let Err(late) = self.wait_for_members(what) {
            // Aborting ends the kernels still waiting for the missing member.
            comm.take();
            return Err(late);
        }
        let mut result = vec![0.0; out_len];
        self.stream
            .memcpy_dtoh(&output, &mut result)
            .map_err(|e| failure("copying to the host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| failure("waiting for the device", e))?;
        Ok(result)
    }

    /// Waits until the work queued on the stream is done, or fails once `timeout` has passed:
    /// NCCL's own wait for a dead member never ends. (Copying to pageable host memory would
    /// block inside the driver, so the copy back comes after this.)
    fn wait_for_members(&self, what: &str) -> Result<(), TransportError> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| failure("recording an event", e))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(1);
        while !done
            .try_is_complete()
            .map_err(|e| failure("waiting for the device", e))?
        {
            if start.elapsed() > self.timeout {
                return Err(TransportError::Device(format!(
                    "NCCL {what} did not finish within {:?}: a member of the group of {} \
                     stopped or is stuck",
                    self.timeout, self.size
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The length of each of the `size` equal chunks a `len`-long buffer travels in.
    fn chunk(&self, len: usize) -> usize {
        len.div_ceil(self.size)
    }
}

impl Collectives for NcclCollectives {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, values: &mut [f32]) -> Result<(), TransportError> {
        if values.is_empty() {
            return Ok(());
        }
        let sum = self.on_device(values, values.len(), "all-reduce", |comm, input, output| {
            comm.all_reduce(input, output, &ReduceOp::Sum)
                .map(drop)
                .map_err(|e| failure("all-reduce", e.0))
        })?;
        values.copy_from_slice(&sum);
        Ok(())
    }

    fn reduce_scatter(&self, values: &[f32]) -> Result<Vec<f32>, TransportError> {
        let (len, chunk) = (values.len(), self.chunk(values.len()));
        let own = shard_range(len, self.size, self.rank);
        if chunk == 0 {
            return Ok(Vec::new());
        }
        let mut padded = vec![0.0; chunk * self.size];
        for member in 0..self.size {
            let shard = shard_range(len, self.size, member);
            padded[member * chunk..][..shard.len()].copy_from_slice(&values[shard]);
        }
        let mut sum = self.on_device(&padded, chunk, "reduce-scatter", |comm, input, output| {
            comm.reduce_scatter(input, output, &ReduceOp::Sum)
                .map(drop)
                .map_err(|e| failure("reduce-scatter", e.0))
        })?;
        sum.truncate(own.len());
        Ok(sum)
    }

    fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>, TransportError> {
        let chunk = self.chunk(len);
        if chunk == 0 {
            return Ok(Vec::new());
        }
        let mut padded = shard.to_vec();
        padded.resize(chunk, 0.0);
        let gathered = self.on_device(
            &padded,
            chunk * self.size,
            "all-gather",
            |comm, input, output| {
                comm.all_gather(input, output)
                    .map(drop)
                    .map_err(|e| failure("all-gather", e.0))
            },
        )?;
        Ok((0..self.size)
            .flat_map(|member| {
                let take = shard_range(len, self.size, member).len();
                gathered[member * chunk..][..take].iter().copied()
            })
            .collect())
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), TransportError> {
        if values.is_empty() {
            return Ok(());
        }
        let root = i32::try_from(root).expect("group ranks fit NCCL's int");
        let sent = self.on_device(values, values.len(), "broadcast", |comm, input, output| {
            comm.broadcast(Some(input), output, root)
                .map(drop)
                .map_err(|e| failure("broadcast", e.0))
        })?;
        values.copy_from_slice(&sent);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::tests::{on_ranks, sum, values};

    #[test]
    fn a_rank_without_a_cuda_device_fails_every_member_at_once() {
        // Rank 0 claims a device; whether or not libnccl loads here, rank 1 has none, so both
        // must refuse (rather than rank 0 waiting in ncclCommInitRank for rank 1).
        let results = on_ranks(2, |ring| {
            let device = (ring.rank() == 0).then_some(0);
            NcclCollectives::open(&ring, device, Duration::from_secs(5))
                .err()
                .map(|e| e.to_string())
        });
        for (rank, error) in results.into_iter().enumerate() {
            let error = error.unwrap_or_else(|| panic!("rank {rank} opened NCCL"));
            assert!(error.contains("NCCL needs every rank"), "{error}");
            if rank == 1 {
                assert!(error.contains("this rank has no CUDA device"), "{error}");
            }
        }
    }

    /// Needs as many CUDA GPUs as the group has ranks (one at least) and libnccl:
    /// `cargo test -p pp-transport --features nccl -- --ignored nccl`.
    #[test]
    #[ignore = "needs a CUDA GPU and libnccl"]
    fn nccl_collectives_equal_the_ring_on_every_gpu() {
        let gpus = cudarc::driver::CudaContext::device_count().expect("a CUDA driver") as usize;
        assert!(
            gpus > 0 && nccl_available(),
            "no CUDA GPU or no libnccl here"
        );
        for len in [0, 1, 5, 17, 1000 * gpus + 3] {
            let results = on_ranks(gpus, move |ring| {
                let (rank, n) = (ring.rank(), ring.size());
                let nccl = NcclCollectives::open(&ring, Some(rank), Duration::from_secs(60))
                    .expect("opening NCCL");
                let mut reduced = values(rank, len);
                nccl.all_reduce(&mut reduced).unwrap();
                let shard = nccl.reduce_scatter(&values(rank, len)).unwrap();
                let gathered = nccl.all_gather(&shard, len).unwrap();
                let mut broadcast = values(rank, len);
                nccl.broadcast(&mut broadcast, n - 1).unwrap();
                nccl.barrier().unwrap();
                (rank, n, reduced, shard, gathered, broadcast)
            });
            for (rank, n, reduced, shard, gathered, broadcast) in results {
                let whole = sum(n, len);
                assert_eq!(reduced, whole, "all-reduce, length {len}");
                assert_eq!(shard, whole[shard_range(len, n, rank)], "reduce-scatter");
                assert_eq!(gathered, whole, "all-gather after reduce-scatter");
                assert_eq!(broadcast, values(n - 1, len), "broadcast");
            }
        }
    }

    /// Needs two CUDA GPUs and libnccl. Rank 1 opens the group, then stops taking part without
    /// leaving it: rank 0's all-reduce must fail after its timeout instead of hanging.
    #[test]
    #[ignore = "needs two CUDA GPUs and libnccl"]
    fn a_member_that_stops_fails_the_others_after_the_timeout() {
        let timeout = Duration::from_secs(2);
        let rank_0_done = Arc::new(std::sync::Barrier::new(2));
        let results = on_ranks(2, move |ring| {
            let nccl =
                NcclCollectives::open(&ring, Some(ring.rank()), timeout).expect("opening NCCL");
            if ring.rank() == 1 {
                rank_0_done.wait();
                return None;
            }
            let start = Instant::now();
            let result = nccl.all_reduce(&mut [1.0; 1000]);
            let waited = start.elapsed();
            let again = nccl.all_reduce(&mut [1.0]);
            rank_0_done.wait();
            Some((result, waited, again))
        });
        let (result, waited, again) = results[0].as_ref().expect("rank 0 reports");
        let error = result
            .as_ref()
            .expect_err("rank 1 never took part")
            .to_string();
        assert!(error.contains("did not finish within"), "{error}");
        assert!(
            waited >= &timeout && waited < &(timeout * 5),
            "waited {waited:?}"
        );
        let again = again
            .as_ref()
            .expect_err("the communicator is aborted")
            .to_string();
        assert!(
            again.contains("aborted after an earlier timeout"),
            "{again}"
        );
    }
}
