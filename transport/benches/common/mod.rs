//! What the transport benches share: flags and a QUIC group on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use pp_transport::{QuicConfig, QuicTransport, WireDType};

/// The number after `flag` on the command line, or `default`.
pub fn flag(flag: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// `ranks` QUIC transports joined on loopback, by rank.
pub fn quic_group(ranks: usize) -> Vec<QuicTransport> {
    let addresses: Vec<SocketAddr> = (0..ranks)
        .map(|_| {
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..ranks)
            .map(|rank| {
                let addresses = addresses.clone();
                s.spawn(move || {
                    QuicTransport::join(QuicConfig {
                        rank,
                        addresses,
                        token: "bench".into(),
                        join_timeout: Duration::from_secs(10),
                        wire: WireDType::F32,
                    })
                    .expect("loopback group")
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}
