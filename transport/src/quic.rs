//! Ranks in different processes or machines, connected over QUIC (`quinn`): encrypted with TLS
//! 1.3, and admitted only with the cluster token.
//!
//! Every pair of ranks shares one connection: a rank dials every lower rank and accepts every
//! higher one. The dialler opens its connection with a hello — a magic, its rank and the
//! cluster token — and the listener closes connections whose hello is wrong. Certificates are
//! self-signed per process and not verified: TLS gives confidentiality, the token
//! authenticates (pinning certificates belongs with rendezvous).
//!
//! Each tensor travels on its own unidirectional stream: a little-endian `u32` header length, the
//! `bincode` header (tag and shape), then the raw little-endian float32 values. Sends return as
//! soon as the stream is handed to a background task, so transfers overlap computation; a
//! background task per connection reads incoming streams into an inbox keyed by tag, so
//! arrival order does not matter. A connection that drops marks its peer as lost: waiting on
//! it fails at once with [`TransportError::PeerLost`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ClientConfig, Connection, Endpoint, ServerConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use crate::{Tag, TensorMessage, Transport, TransportError};

/// Opens every connection's first stream.
const HELLO_MAGIC: &[u8; 4] = b"PPQ1";
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
    /// Every rank's listening address, by rank.
    pub addresses: Vec<SocketAddr>,
    /// The shared secret every member presents.
    pub token: String,
    /// How long to wait for every peer to join.
    pub join_timeout: Duration,
}

#[derive(Serialize, Deserialize)]
struct Header {
    tag: Tag,
    shape: Vec<usize>,
}

/// Messages that arrived and are not yet asked for, and which peers are gone.
#[derive(Default)]
struct Inbox {
    messages: HashMap<(usize, Tag), TensorMessage>,
    lost: Vec<bool>,
}

/// One rank's endpoint of a QUIC group.
pub struct QuicTransport {
    rank: usize,
    runtime: Runtime,
    endpoint: Endpoint,
    peers: Vec<Option<Connection>>,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    sends: Mutex<JoinSet<()>>,
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
        let mut endpoint = {
            let _guard = runtime.enter();
            Endpoint::server(server_config().map_err(listen_error)?, address)
                .map_err(|e| listen_error(e.to_string()))?
        };
        endpoint.set_default_client_config(client_config().map_err(listen_error)?);
        let inbox = Arc::new((
            Mutex::new(Inbox {
                messages: HashMap::new(),
                lost: vec![false; world_size],
            }),
            Condvar::new(),
        ));
        let deadline = Instant::now() + config.join_timeout;
        let peers = runtime.block_on(connect_all(&endpoint, &config, deadline))?;
        for (peer, connection) in peers.iter().enumerate() {
            if let Some(connection) = connection {
                runtime.spawn(receive(peer, connection.clone(), inbox.clone()));
            }
        }
        Ok(Self {
            rank,
            runtime,
            endpoint,
            peers,
            inbox,
            sends: Mutex::new(JoinSet::new()),
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
        if self.inbox.0.lock().expect("inbox lock").lost[to] {
            return Err(TransportError::PeerLost { rank: to });
        }
        let frame = encode(&message);
        let inbox = self.inbox.clone();
        let mut sends = self.sends.lock().expect("send set lock");
        // Reap finished sends so the set does not grow over a long run.
        while sends.try_join_next().is_some() {}
        sends.spawn_on(
            async move {
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
                    mark_lost(&inbox, to);
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
        let (lock, arrived) = &*self.inbox;
        let deadline = Instant::now() + timeout;
        let mut inbox = lock.lock().expect("inbox lock");
        loop {
            if let Some(message) = inbox.messages.remove(&(from, tag)) {
                return Ok(message);
            }
            if inbox.lost[from] {
                return Err(TransportError::PeerLost { rank: from });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout {
                    tag,
                    rank: from,
                    timeout,
                });
            }
            inbox = arrived
                .wait_timeout(inbox, deadline - now)
                .expect("inbox lock")
                .0;
        }
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

fn mark_lost(inbox: &(Mutex<Inbox>, Condvar), rank: usize) {
    inbox.0.lock().expect("inbox lock").lost[rank] = true;
    inbox.1.notify_all();
}

fn encode(message: &TensorMessage) -> Vec<u8> {
    let header = Header {
        tag: message.tag,
        shape: message.shape.clone(),
    };
    let header = bincode::serde::encode_to_vec(&header, bincode::config::standard())
        .expect("headers serialize");
    let mut frame = Vec::with_capacity(4 + header.len() + 4 * message.values.len());
    frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
    frame.extend_from_slice(&header);
    for value in &message.values {
        frame.extend_from_slice(&value.to_le_bytes());
    }
    frame
}

fn decode(frame: &[u8]) -> Option<TensorMessage> {
    let length = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?) as usize;
    if length > MAX_HEADER {
        return None;
    }
    let (header, _): (Header, usize) =
        bincode::serde::decode_from_slice(frame.get(4..4 + length)?, bincode::config::standard())
            .ok()?;
    let data = frame.get(4 + length..)?;
    let count: usize = header.shape.iter().product();
    if data.len() != 4 * count {
        return None;
    }
    Some(TensorMessage {
        tag: header.tag,
        shape: header.shape,
        values: data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
    })
}

/// Reads every stream the peer opens into the inbox until the connection ends; a malformed
/// message ends it too.
async fn receive(peer: usize, connection: Connection, inbox: Arc<(Mutex<Inbox>, Condvar)>) {
    while let Ok(mut stream) = connection.accept_uni().await {
        let Ok(frame) = stream.read_to_end(MAX_MESSAGE).await else {
            break;
        };
        let Some(message) = decode(&frame) else {
            connection.close(VarInt::from_u32(2), b"malformed message");
            break;
        };
        inbox
            .0
            .lock()
            .expect("inbox lock")
            .messages
            .insert((peer, message.tag), message);
        inbox.1.notify_all();
    }
    mark_lost(&inbox, peer);
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
        let connection = loop {
            let attempt = async {
                let connection = endpoint
                    .connect(address, "pp")
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                let mut hello = connection.open_uni().await.map_err(|e| e.to_string())?;
                let mut bytes = HELLO_MAGIC.to_vec();
                bytes.extend_from_slice(&(config.rank as u32).to_le_bytes());
                bytes.extend_from_slice(config.token.as_bytes());
                hello.write_all(&bytes).await.map_err(|e| e.to_string())?;
                hello.finish().map_err(|e| e.to_string())?;
                Ok::<_, String>(connection)
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.max(Duration::from_millis(1)), attempt).await {
                Ok(Ok(connection)) => break connection,
                Ok(Err(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(message)) => return Err(connect_error(message)),
                Err(_) => return Err(connect_error("no answer before the join timeout".into())),
            }
        };
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
        // The hello: magic, rank, token. Anything else is turned away.
        let hello = async {
            let mut stream = connection.accept_uni().await.ok()?;
            stream.read_to_end(MAX_HEADER).await.ok()
        };
        let Ok(Some(bytes)) = tokio::time::timeout(Duration::from_secs(5), hello).await else {
            connection.close(VarInt::from_u32(1), b"no hello");
            continue;
        };
        let rank = (bytes.len() >= 8 && &bytes[..4] == HELLO_MAGIC)
            .then(|| u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize)
            .filter(|&r| r > config.rank && r < world_size && peers[r].is_none());
        let token_ok = bytes.get(8..) == Some(config.token.as_bytes());
        match rank {
            Some(rank) if token_ok => {
                peers[rank] = Some(connection);
                accepted += 1;
            }
            _ => connection.close(VarInt::from_u32(1), b"wrong cluster token"),
        }
    }
    Ok(peers)
}

fn server_config() -> Result<ServerConfig, String> {
    let certificate =
        rcgen::generate_simple_self_signed(vec!["pp".to_string()]).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certificate.key_pair.serialize_der(),
    ));
    let chain = vec![CertificateDer::from(certificate.cert.der().to_vec())];
    let mut config = ServerConfig::with_single_cert(chain, key).map_err(|e| e.to_string())?;
    config.transport_config(liveness());
    Ok(config)
}

/// Keep-alives every second and a 10-second idle timeout: a peer whose process died (which
/// sends no goodbye) is noticed within seconds, not after QUIC's default 30.
fn liveness() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("10 s is a valid timeout"),
    ));
    Arc::new(transport)
}

fn client_config() -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let quic = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = ClientConfig::new(Arc::new(quic));
    config.transport_config(liveness());
    Ok(config)
}

/// Accepts any server certificate (checking only its signatures): peers are authenticated by
/// the cluster token instead.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
        // A dropped peer is reported, not waited for.
        let mut ranks = ranks;
        drop(ranks.remove(0));
        let err = ranks[1]
            .recv(0, message(9, vec![]).tag, Duration::from_secs(20))
            .unwrap_err();
        assert!(matches!(err, TransportError::PeerLost { rank: 0 }), "{err}");
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
                })
            });
            let bad = scope.spawn(|| {
                QuicTransport::join(QuicConfig {
                    rank: 1,
                    addresses: addresses.clone(),
                    token: "guess".into(),
                    join_timeout: Duration::from_secs(3),
                })
            });
            (good.join().unwrap(), bad.join().unwrap())
        });
        let err = joined.0.err().expect("rank 0 never admits the impostor");
        assert!(err.to_string().contains("rank 1"), "{err}");
    }
}
