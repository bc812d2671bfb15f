//! Ranks in different processes or machines, connected over QUIC (`quinn`): encrypted with TLS
//! 1.3 (`tls`), and admitted only with the cluster token, proven over the TLS session (`auth`).
//!
//! Every pair of ranks shares one connection: a rank dials every lower rank and accepts every
//! higher one, and each side proves the token before any tensor moves.
//!
//! Each tensor travels on its own unidirectional stream: a little-endian `u32` header length, the
//! `bincode` header (tag and shape), then the raw little-endian float32 values. Sends return as
//! soon as the stream is handed to a background task, so transfers overlap computation; a
//! background task per connection reads incoming streams into an inbox keyed by tag, so
//! arrival order does not matter. A connection that drops marks its peer as lost: waiting on
//! it fails at once with [`TransportError::PeerLost`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, VarInt};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use crate::auth::{self, AuthError};
use crate::mailbox::Mailbox;
use crate::{Kind, LinkTraffic, Tag, TensorMessage, Transport, TransportError, WireDType};

/// Largest header accepted (a tag and a shape are a few dozen bytes).
const MAX_HEADER: usize = 1 << 16;
/// Largest tensor accepted: 4 GiB.
const MAX_MESSAGE: usize = 1 << 32;

/// Why a QUIC group could not be formed.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The local endpoint could not be set up.
    #[error("cannot listen on {address}: {message}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// What failed.
        message: String,
    },
    /// A peer did not join in time, or refused us.
    #[error("cannot connect to rank {rank} at {address}: {message}")]
    Connect {
        /// The peer's rank.
        rank: usize,
        /// Its address.
        address: SocketAddr,
        /// What failed.
        message: String,
    },
}

/// How to join a group.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// This process's rank.
    pub rank: usize,
    /// Every rank's address, by rank, as the others reach it. A rank listens on its own
    /// address's port: on that address when it is a loopback one, else on every interface (a
    /// node behind NAT does not own the address the others use).
    pub addresses: Vec<SocketAddr>,
    /// The shared secret every member presents.
    pub token: String,
    /// How long to wait for every peer to join.
    pub join_timeout: Duration,
    /// The number type activations and gradients travel in.
    pub wire: WireDType,
}

#[derive(Serialize, Deserialize)]
struct Header {
    tag: Tag,
    shape: Vec<usize>,
    wire: WireDType,
}

/// One rank's endpoint of a QUIC group.
pub struct QuicTransport {
    rank: usize,
    wire: WireDType,
    runtime: Runtime,
    endpoint: Endpoint,
    peers: Vec<Option<Connection>>,
    inbox: Arc<Mailbox>,
    sends: Mutex<JoinSet<()>>,
    /// What each finished send put on the link, by peer.
    links: Arc<Mutex<Vec<LinkTraffic>>>,
}

impl QuicTransport {
    /// Listens on this rank's address and connects to every other rank, waiting up to
    /// `config.join_timeout` for all of them.
    pub fn join(config: QuicConfig) -> Result<Self, QuicError> {
        let world_size = config.addresses.len();
        let rank = config.rank;
        let address = config.addresses[rank];
        let listen_error = |message: String| QuicError::Listen { address, message };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| listen_error(e.to_string()))?;
        let bind = if address.ip().is_loopback() {
            address
        } else {
            SocketAddr::new(unspecified(address), address.port())
        };
        let endpoint = {
            let _guard = runtime.enter();
            crate::tls::endpoint(bind).map_err(listen_error)?
        };
        let inbox = Arc::new(Mailbox::new(world_size));
        let deadline = Instant::now() + config.join_timeout;
        let peers = runtime.block_on(connect_all(&endpoint, &config, deadline))?;
        for (peer, connection) in peers.iter().enumerate() {
            if let Some(connection) = connection {
                runtime.spawn(receive(peer, connection.clone(), inbox.clone()));
            }
        }
        Ok(Self {
            rank,
            wire: config.wire,
            runtime,
            endpoint,
            peers,
            inbox,
            sends: Mutex::new(JoinSet::new()),
            links: Arc::new(Mutex::new(vec![LinkTraffic::default(); world_size])),
        })
    }

    fn connection(&self, rank: usize) -> Result<&Connection, TransportError> {
        match self.peers.get(rank) {
            Some(Some(connection)) => Ok(connection),
            _ => Err(TransportError::UnknownRank {
                rank,
                world_size: self.peers.len(),
            }),
        }
    }
}

impl Transport for QuicTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.peers.len()
    }

    fn send(&self, to: usize, message: TensorMessage) -> Result<(), TransportError> {
        let connection = self.connection(to)?.clone();
        if self.inbox.is_lost(to) {
            return Err(TransportError::PeerLost { rank: to });
        }
        // Sums over ranks (losses, norms) stay exact; tensors may travel narrow.
        let wire = match message.tag.kind {
            Kind::Activation | Kind::Gradient => self.wire,
            Kind::TiedGradient | Kind::Reduce | Kind::Collective => WireDType::F32,
        };
        let frame = encode(&message, wire);
        let inbox = self.inbox.clone();
        let links = self.links.clone();
        let mut sends = self.sends.lock().expect("send set lock");
        // Reap finished sends so the set does not grow over a long run.
        while sends.try_join_next().is_some() {}
        sends.spawn_on(
            async move {
                let started = Instant::now();
                let sent = async {
                    let mut stream = connection.open_uni().await.ok()?;
                    stream.write_all(&frame).await.ok()?;
                    stream.finish().ok()?;
                    // Until the peer acknowledges every byte: closing the connection (when this
                    // rank is done) drops unacknowledged data, and the peer would see a lost
                    // rank instead of the last message.
                    stream.stopped().await.ok().map(|_| ())
                };
                if sent.await.is_none() {
                    inbox.mark_lost(to);
                } else {
                    let link = &mut links.lock().expect("link counters lock")[to];
                    link.bytes += frame.len() as u64;
                    link.seconds += started.elapsed().as_secs_f64();
                }
            },
            self.runtime.handle(),
        );
        Ok(())
    }

    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
    ) -> Result<TensorMessage, TransportError> {
        self.connection(from)?;
        self.inbox.take(from, tag, timeout)
    }

    fn links(&self) -> Vec<LinkTraffic> {
        self.links.lock().expect("link counters lock").clone()
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        // Deliver what is still in flight, then say goodbye.
        let sends = std::mem::take(&mut *self.sends.lock().expect("send set lock"));
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(10), sends.join_all()).await;
        });
        for connection in self.peers.iter().flatten() {
            connection.close(VarInt::from_u32(0), b"done");
        }
        self.endpoint.close(VarInt::from_u32(0), b"done");
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        });
    }
}

fn unspecified(address: SocketAddr) -> std::net::IpAddr {
    match address {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn encode(message: &TensorMessage, wire: WireDType) -> Vec<u8> {
    let header = Header {
        tag: message.tag,
        shape: message.shape.clone(),
        wire,
    };
    let header = bincode::serde::encode_to_vec(&header, bincode::config::standard())
        .expect("headers serialize");
    let mut frame = Vec::with_capacity(4 + header.len() + 4 * message.values.len());
    frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
    frame.extend_from_slice(&header);
    wire.encode(&message.values, row_length(&message.shape), &mut frame);
    frame
}

/// Rows for per-row scales: the last dimension.
fn row_length(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(1)
}

fn decode(frame: &[u8]) -> Option<TensorMessage> {
    let length = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?) as usize;
    if length > MAX_HEADER {
        return None;
    }
    let (header, _): (Header, usize) =
        bincode::serde::decode_from_slice(frame.get(4..4 + length)?, bincode::config::standard())
            .ok()?;
    let count: usize = header.shape.iter().product();
    let values = header
        .wire
        .decode(frame.get(4 + length..)?, count, row_length(&header.shape))?;
    Some(TensorMessage {
        tag: header.tag,
        shape: header.shape,
        values,
    })
}

/// Reads every stream the peer opens into the inbox until the connection ends; a malformed
/// message ends it too.
async fn receive(peer: usize, connection: Connection, inbox: Arc<Mailbox>) {
    while let Ok(mut stream) = connection.accept_uni().await {
        let Ok(frame) = stream.read_to_end(MAX_MESSAGE).await else {
            break;
        };
        let Some(message) = decode(&frame) else {
            connection.close(VarInt::from_u32(2), b"malformed message");
            break;
        };
        inbox.put(peer, message);
    }
    inbox.mark_lost(peer);
}

/// Dials every lower rank (retrying until it listens) and accepts every higher one.
async fn connect_all(
    endpoint: &Endpoint,
    config: &QuicConfig,
    deadline: Instant,
) -> Result<Vec<Option<Connection>>, QuicError> {
    let world_size = config.addresses.len();
    let mut peers: Vec<Option<Connection>> = vec![None; world_size];
    for (peer, &address) in config.addresses.iter().enumerate().take(config.rank) {
        let connect_error = |message: String| QuicError::Connect {
            rank: peer,
            address,
            message,
        };
        let connection = auth::dial(
            endpoint,
            address,
            &config.token,
            config.rank as u32,
            deadline,
            &mut || {},
        )
        .await
        .map_err(|e| connect_error(e.to_string()))?;
        peers[peer] = Some(connection);
    }
    let expected = world_size - config.rank - 1;
    let mut accepted = 0;
    while accepted < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let waiting_for = || {
            let missing: Vec<usize> = (config.rank + 1..world_size)
                .filter(|&r| peers[r].is_none())
                .collect();
            missing[0]
        };
        let incoming = match tokio::time::timeout(left, endpoint.accept()).await {
            Ok(Some(incoming)) => incoming,
            _ => {
                let rank = waiting_for();
                return Err(QuicError::Connect {
                    rank,
                    address: config.addresses[rank],
                    message: "it did not join before the join timeout".into(),
                });
            }
        };
        let Ok(connection) = incoming.await else {
            continue;
        };
        let admitted = tokio::time::timeout(
            Duration::from_secs(5),
            auth::admit_dialler(&connection, &config.token),
        )
        .await;
        match admitted {
            Ok(Ok(rank)) => {
                let rank = rank as usize;
                if rank > config.rank && rank < world_size && peers[rank].is_none() {
                    peers[rank] = Some(connection);
                    accepted += 1;
                } else {
                    connection.close(VarInt::from_u32(3), b"unexpected rank");
                }
            }
            Ok(Err(refused @ (AuthError::Refused | AuthError::Unproven))) => {
                // Let the refusal reach the peer before this endpoint goes away.
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                return Err(QuicError::Connect {
                    rank: waiting_for(),
                    address: connection.remote_address(),
                    message: format!(
                        "a peer at {} was turned away: {refused}",
                        connection.remote_address()
                    ),
                });
            }
            _ => connection.close(VarInt::from_u32(1), b"no admission"),
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    fn addresses(count: usize) -> Vec<SocketAddr> {
        // Free ports: bind, note, release.
        (0..count)
            .map(|_| {
                std::net::UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect()
    }

    fn join_all(addresses: &[SocketAddr], token: &str) -> Vec<Result<QuicTransport, QuicError>> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..addresses.len())
                .map(|rank| {
                    let config = QuicConfig {
                        rank,
                        addresses: addresses.to_vec(),
                        token: token.into(),
                        join_timeout: Duration::from_secs(10),
                        wire: WireDType::F32,
                    };
                    scope.spawn(move || QuicTransport::join(config))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn message(stage: u32, values: Vec<f32>) -> TensorMessage {
        TensorMessage {
            tag: Tag {
                step: 1,
                microbatch: 2,
                stage,
                kind: Kind::Activation,
            },
            shape: vec![values.len()],
            values,
        }
    }

    #[test]
    fn three_ranks_exchange_tensors_in_any_order() {
        let addresses = addresses(3);
        let ranks: Vec<QuicTransport> = join_all(&addresses, "secret")
            .into_iter()
            .map(Result::unwrap)
            .collect();
        ranks[0].send(2, message(7, vec![1.0, 2.0])).unwrap();
        ranks[0].send(2, message(8, vec![3.0])).unwrap();
        ranks[1].send(2, message(7, vec![-1.5])).unwrap();
        let timeout = Duration::from_secs(10);
        // Asked for in a different order than sent.
        let got = ranks[2].recv(0, message(8, vec![]).tag, timeout).unwrap();
        assert_eq!(got.values, vec![3.0]);
        let got = ranks[2].recv(0, message(7, vec![]).tag, timeout).unwrap();
        assert_eq!(got.values, vec![1.0, 2.0]);
        let got = ranks[2].recv(1, message(7, vec![]).tag, timeout).unwrap();
        assert_eq!(got.values, vec![-1.5]);
        // Rank 0's link to rank 2 counts both messages once they are acknowledged; nothing
        // went to rank 1.
        let started = Instant::now();
        while ranks[0].links()[2].bytes == 0 && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(10));
        }
        let links = ranks[0].links();
        assert!(links[2].bytes > 3 * 4, "{links:?}");
        assert!(links[2].seconds > 0.0 && links[2].megabytes_per_second() > 0.0);
        assert_eq!(links[1], LinkTraffic::default());
        // A dropped peer is reported, not waited for.
        let mut ranks = ranks;
        drop(ranks.remove(0));
        let err = ranks[1]
            .recv(0, message(9, vec![]).tag, Duration::from_secs(20))
            .unwrap_err();
        assert!(matches!(err, TransportError::PeerLost { rank: 0 }), "{err}");
    }

    #[test]
    fn activations_travel_in_the_wire_dtype_and_sums_stay_exact() {
        let addresses = addresses(2);
        let ranks: Vec<QuicTransport> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let config = QuicConfig {
                        rank,
                        addresses: addresses.clone(),
                        token: "secret".into(),
                        join_timeout: Duration::from_secs(10),
                        wire: WireDType::Bf16,
                    };
                    scope.spawn(move || QuicTransport::join(config).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let precise = 1.0 + 1.0 / 1024.0; // not a bfloat16
        let activation = message(1, vec![precise]);
        let mut sum = message(1, vec![precise]);
        sum.tag.kind = Kind::Reduce;
        ranks[0].send(1, activation.clone()).unwrap();
        ranks[0].send(1, sum.clone()).unwrap();
        let timeout = Duration::from_secs(10);
        assert_eq!(
            ranks[1].recv(0, activation.tag, timeout).unwrap().values,
            vec![1.0]
        );
        assert_eq!(
            ranks[1].recv(0, sum.tag, timeout).unwrap().values,
            vec![precise]
        );
    }

    #[test]
    fn a_rank_without_the_token_is_refused() {
        let addresses = addresses(2);
        let joined = std::thread::scope(|scope| {
            let good = scope.spawn(|| {
                QuicTransport::join(QuicConfig {
                    rank: 0,
                    addresses: addresses.clone(),
                    token: "secret".into(),
                    join_timeout: Duration::from_secs(3),
                    wire: WireDType::F32,
                })
            });
            let bad = scope.spawn(|| {
                QuicTransport::join(QuicConfig {
                    rank: 1,
                    addresses: addresses.clone(),
                    token: "guess".into(),
                    join_timeout: Duration::from_secs(3),
                    wire: WireDType::F32,
                })
            });
            (good.join().unwrap(), bad.join().unwrap())
        });
        let err = joined.0.err().expect("rank 0 never admits the impostor");
        assert!(err.to_string().contains("could not prove"), "{err}");
        let err = joined.1.err().expect("the impostor is told");
        assert!(
            err.to_string().contains("rank 0")
                && err.to_string().contains("different cluster token"),
            "{err}"
        );
    }
}
