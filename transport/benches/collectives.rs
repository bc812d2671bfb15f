//! All-reduce throughput of a gradient bucket (25 MiB of float32, DDP's bucket) over each way
//! pp can run collectives: the ring over in-process channels and over QUIC on loopback (two
//! ranks), and NCCL over every CUDA GPU of the machine when libnccl loads (built with
//! `--features nccl`):
//! `cargo bench -p pp-transport --features nccl --bench collectives [-- --mib 25 --rounds 20]`.
//!
//! Bus bandwidth is nccl-tests' measure: the buffer's bytes over the time, times 2(n-1)/n, what
//! each link carries in a ring; with one rank, the algorithm bandwidth instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{flag, quic_group};
use pp_transport::{Collectives, InProcessHub, RingCollectives, Transport};

mod common;

fn main() {
    let (mib, rounds) = (flag("--mib", 25), flag("--rounds", 20));
    let floats = mib * (1 << 20) / 4;
    let in_process = time_rings(InProcessHub::connect(2), floats, rounds);
    report("ring, in-process", mib, rounds, 2, in_process);
    let quic = time_rings(quic_group(2), floats, rounds);
    report("ring, QUIC loopback", mib, rounds, 2, quic);
    #[cfg(feature = "nccl")]
    nccl::run(mib, floats, rounds, report);
}

fn report(name: &str, mib: usize, rounds: usize, ranks: usize, seconds: f64) {
    let bytes = (mib << 20) as f64;
    let algorithm = bytes * rounds as f64 / seconds / 1e9;
    let bus = if ranks > 1 {
        algorithm * 2.0 * (ranks - 1) as f64 / ranks as f64
    } else {
        algorithm
    };
    println!(
        "{name:<24} {ranks} ranks, {rounds} × {mib} MiB all-reduce: {:.1} ms each, bus {bus:.2} GB/s",
        seconds / rounds as f64 * 1e3
    );
}

/// Seconds for `rounds` all-reduces of `floats` values on every rank of `transports`, after
/// one round of warm-up; the slowest rank's time.
fn time_rings<T: Transport + 'static>(transports: Vec<T>, floats: usize, rounds: usize) -> f64 {
    let groups = transports
        .into_iter()
        .map(|t| {
            let ring = RingCollectives::new(Arc::new(t), Duration::from_secs(60));
            Box::new(ring) as Box<dyn Collectives>
        })
        .collect();
    time_groups(groups, floats, rounds)
}

fn time_groups(groups: Vec<Box<dyn Collectives>>, floats: usize, rounds: usize) -> f64 {
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                s.spawn(move || {
                    let mut values = vec![1.0f32; floats];
                    group.all_reduce(&mut values).expect("warm-up all-reduce");
                    group.barrier().expect("barrier");
                    let start = Instant::now();
                    for _ in 0..rounds {
                        group.all_reduce(&mut values).expect("all-reduce");
                    }
                    start.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold(0.0, f64::max)
    })
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use pp_transport::{nccl_available, NcclCollectives};

    /// NCCL over every GPU here (each rank a thread on its own device), opened through an
    /// in-process ring.
    pub fn run(
        mib: usize,
        floats: usize,
        rounds: usize,
        report: fn(&str, usize, usize, usize, f64),
    ) {
        let gpus = if nccl_available() {
            cudarc::driver::CudaContext::device_count().map_or(0, |n| n as usize)
        } else {
            0
        };
        if gpus == 0 {
            println!("NCCL: no CUDA GPU or no libnccl here");
            return;
        }
        let groups = std::thread::scope(|s| {
            let opens: Vec<_> = InProcessHub::connect(gpus)
                .into_iter()
                .map(|t| {
                    s.spawn(move || {
                        let ring = RingCollectives::new(Arc::new(t), Duration::from_secs(60));
                        let device = ring.rank();
                        let nccl =
                            NcclCollectives::open(&ring, Some(device), Duration::from_secs(60));
                        Box::new(nccl.expect("opening NCCL")) as Box<dyn Collectives>
                    })
                })
                .collect();
            opens.into_iter().map(|o| o.join().unwrap()).collect()
        });
        report(
            "NCCL (host-staged)",
            mib,
            rounds,
            gpus,
            time_groups(groups, floats, rounds),
        );
    }
}
