//! Running one training across processes and machines.
//!
//! [`launcher`] starts this machine's worker processes and watches them; [`node`] makes this
//! machine one node of a group formed through the rendezvous (`pp_transport::rendezvous`),
//! then launches its share of the workers, with the layers [`placement`] gives each, and with
//! node 0's model and data where it has no copy of its own ([`files`]). The workers themselves
//! train through [`crate::train::worker`].

pub mod files;
pub mod launcher;
pub mod node;
pub mod placement;
mod progress;

use std::net::{SocketAddr, UdpSocket};

use pp_transport::WireDType;

use crate::dtype::DType;
use crate::error::{Error, Result};
use launcher::{WorkerLaunch, Workers};

/// The cluster token reaches workers through the environment, not the command line (which
/// other users of the machine can read).
pub const TOKEN_VARIABLE: &str = "PP_CLUSTER_TOKEN";
/// Names the run's shared staging directory.
pub const RUN_VARIABLE: &str = "PP_RUN_ID";
/// Where a worker that fails writes its error, for its launcher to repeat.
pub const ERROR_FILE_VARIABLE: &str = "PP_ERROR_FILE";

/// The number type activations and gradients cross between workers in: `chosen`
/// (`--wire-dtype`), else the training dtype's, so that bf16 training crosses exactly.
pub fn wire_dtype(chosen: Option<WireDType>, dtype: DType) -> WireDType {
    chosen.unwrap_or(match dtype {
        DType::F32 => WireDType::F32,
        DType::BF16 => WireDType::Bf16,
        DType::F16 => WireDType::F16,
    })
}

/// Trains as `ranks` worker processes on this machine, over loopback, with a fresh token.
pub fn launch_local(ranks: usize) -> Result<()> {
    let addresses = free_ports(ranks, [127, 0, 0, 1].into())?
        .into_iter()
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();
    let token = pp_transport::random_token();
    let run_id = format!("{}-{}", std::process::id(), &token[..8]);
    Workers::spawn(&WorkerLaunch {
        addresses,
        first_rank: 0,
        local_workers: ranks,
        token,
        run_id,
        extra_args: Vec::new(),
    })?
    .watch(None)
}

/// `count` UDP ports free on `ip` now (bound, noted and released: the workers bind them a
/// moment later).
fn free_ports(count: usize, ip: std::net::IpAddr) -> Result<Vec<u16>> {
    (0..count)
        .map(|_| {
            UdpSocket::bind((ip, 0))
                .and_then(|socket| socket.local_addr())
                .map(|address| address.port())
                .map_err(|e| Error::Cluster(format!("cannot find a free UDP port on {ip}: {e}")))
        })
        .collect()
}
