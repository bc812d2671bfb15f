//! Admission by cluster token, bound to the TLS session.
//!
//! Each side proves it holds the token with an HMAC-SHA256, keyed by the token, over the TLS
//! session's exported keying material (RFC 5705), a role and the dialler's id. Both ends of one
//! TLS session derive the same material; two sessions never do. So the token never crosses the
//! wire, a proof seen on one connection is useless on any other, and a relay that terminates TLS
//! towards each side (certificates are not pinned) cannot forward a proof the other side will
//! accept. The dialler proves first; the listener answers with its own proof, so a dialler never
//! trusts a listener without the token either.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, Endpoint, VarInt};
use ring::hmac;

/// Opens the admission stream.
const MAGIC: &[u8; 4] = b"PPA1";
/// The exporter label (RFC 5705 labels of private use start with "EXPORTER").
const EXPORTER_LABEL: &[u8] = b"EXPORTER-pp-cluster-token";
const PROOF_LEN: usize = 32;
/// Close code and reason of a connection whose peer failed to prove the token.
pub(crate) const WRONG_TOKEN: (u32, &[u8]) = (1, b"wrong cluster token");

/// Why a peer was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The listener did not accept our proof.
    #[error("refused: the peer holds a different cluster token")]
    Refused,
    /// The peer's proof did not check out.
    #[error(
        "the peer could not prove it holds the cluster token (a different token, or a relay \
         between us)"
    )]
    Unproven,
    /// The connection failed during admission.
    #[error("{0}")]
    Link(String),
}

impl From<ConnectionError> for AuthError {
    fn from(error: ConnectionError) -> Self {
        match &error {
            ConnectionError::ApplicationClosed(close)
                if close.error_code == VarInt::from_u32(WRONG_TOKEN.0) =>
            {
                AuthError::Refused
            }
            _ => AuthError::Link(error.to_string()),
        }
    }
}

/// A fresh cluster token: 128 bits from the operating system's random source, as hex.
pub fn random_token() -> String {
    let bytes: [u8; 16] = ring::rand::generate(&ring::rand::SystemRandom::new())
        .expect("the system random source works")
        .expose();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Connects to `address` and proves the token as `id`, retrying while nobody answers there yet
/// (peers start in any order) until `deadline`; `retrying` hears each retry. A refused token
/// is final.
pub(crate) async fn dial(
    endpoint: &Endpoint,
    address: SocketAddr,
    token: &str,
    id: u32,
    deadline: Instant,
    retrying: &mut dyn FnMut(),
) -> Result<Connection, AuthError> {
    loop {
        let attempt = async {
            let connection = endpoint.connect(address, "pp").map_err(link)?.await?;
            prove_to_listener(&connection, token, id).await?;
            Ok::<_, AuthError>(connection)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(left.max(Duration::from_millis(1)), attempt).await
        {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(AuthError::Link(message))) => message,
            Ok(Err(refused)) => return Err(refused),
            Err(_) => "no answer".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(AuthError::Link(format!(
                "no answer before the join timeout ({message})"
            )));
        }
        retrying();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The dialler's side: proves the token for `id` (its rank, or 0), then checks the listener's
/// proof. A peer that fails is disconnected.
async fn prove_to_listener(connection: &Connection, token: &str, id: u32) -> Result<(), AuthError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&id.to_le_bytes());
    hello.extend_from_slice(proof(connection, token, Role::Dialler, id)?.as_ref());
    send.write_all(&hello).await.map_err(link)?;
    send.finish().map_err(link)?;
    let mut answer = [0u8; PROOF_LEN];
    if let Err(error) = recv.read_exact(&mut answer).await {
        // A refusal closes the connection: report that rather than the unfinished read.
        return Err(match connection.close_reason() {
            Some(reason) => reason.into(),
            None => link(error),
        });
    }
    check(connection, token, Role::Listener, id, &answer)
}

/// The listener's side: checks the dialler's proof, answers with its own and returns the
/// dialler's id. A peer that fails is disconnected.
pub(crate) async fn admit_dialler(connection: &Connection, token: &str) -> Result<u32, AuthError> {
    let (mut send, mut recv) = connection.accept_bi().await?;
    let mut hello = [0u8; 4 + 4 + PROOF_LEN];
    recv.read_exact(&mut hello).await.map_err(link)?;
    if &hello[..4] != MAGIC {
        refuse(connection);
        return Err(AuthError::Unproven);
    }
    let id = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
    check(connection, token, Role::Dialler, id, &hello[8..])?;
    let answer = proof(connection, token, Role::Listener, id)?;
    send.write_all(answer.as_ref()).await.map_err(link)?;
    send.finish().map_err(link)?;
    Ok(id)
}

#[derive(Clone, Copy)]
enum Role {
    Dialler,
    Listener,
}

/// What the proof of `role` signs: the role, the dialler's id and this session's keying
/// material.
fn transcript(connection: &Connection, role: Role, id: u32) -> Result<Vec<u8>, AuthError> {
    let mut material = [0u8; 32];
    connection
        .export_keying_material(&mut material, EXPORTER_LABEL, &[])
        .map_err(|_| AuthError::Link("TLS keying material is not available".into()))?;
    let mut message = match role {
        Role::Dialler => b"pp dialler".to_vec(),
        Role::Listener => b"pp listener".to_vec(),
    };
    message.extend_from_slice(&id.to_le_bytes());
    message.extend_from_slice(&material);
    Ok(message)
}

fn proof(
    connection: &Connection,
    token: &str,
    role: Role,
    id: u32,
) -> Result<hmac::Tag, AuthError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    Ok(hmac::sign(&key, &transcript(connection, role, id)?))
}

/// Checks the peer's proof in constant time; disconnects it if wrong.
fn check(
    connection: &Connection,
    token: &str,
    role: Role,
    id: u32,
    presented: &[u8],
) -> Result<(), AuthError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    hmac::verify(&key, &transcript(connection, role, id)?, presented).map_err(|_| {
        refuse(connection);
        AuthError::Unproven
    })
}

fn refuse(connection: &Connection) {
    connection.close(VarInt::from_u32(WRONG_TOKEN.0), WRONG_TOKEN.1);
}

fn link(error: impl std::fmt::Display) -> AuthError {
    AuthError::Link(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback, and the runtime its tasks run on.
    fn listener(runtime: &tokio::runtime::Runtime) -> Endpoint {
        let _guard = runtime.enter();
        crate::tls::endpoint("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    fn dialler(runtime: &tokio::runtime::Runtime) -> Endpoint {
        let _guard = runtime.enter();
        crate::tls::client_endpoint().unwrap()
    }

    /// The listener's outcome and the dialler's, `dial_to` being where the dialler goes.
    async fn admission(
        server: &Endpoint,
        client: &Endpoint,
        dial_to: SocketAddr,
        (server_token, client_token): (&str, &str),
    ) -> (Result<u32, AuthError>, Result<Connection, AuthError>) {
        let server_token = server_token.to_string();
        let server = server.clone();
        let admitted = tokio::spawn(async move {
            let connection = server.accept().await.unwrap().await.unwrap();
            let result = admit_dialler(&connection, &server_token).await;
            // Keep the connection until the dialler has read the answer.
            tokio::time::sleep(Duration::from_millis(300)).await;
            result
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let dialled = dial(client, dial_to, client_token, 7, deadline, &mut || {}).await;
        (admitted.await.unwrap(), dialled)
    }

    #[test]
    fn the_token_admits_both_ways_and_a_wrong_one_is_refused_on_both_sides() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (server, client) = (listener(&runtime), dialler(&runtime));
        let to = server.local_addr().unwrap();
        let (admitted, dialled) =
            runtime.block_on(admission(&server, &client, to, ("secret", "secret")));
        assert_eq!(admitted.unwrap(), 7);
        dialled.unwrap();

        let (admitted, dialled) =
            runtime.block_on(admission(&server, &client, to, ("secret", "guess")));
        assert!(matches!(admitted, Err(AuthError::Unproven)), "{admitted:?}");
        let refused = dialled.unwrap_err();
        assert!(matches!(refused, AuthError::Refused), "{refused}");
        assert!(refused.to_string().contains("different cluster token"));
    }

    /// A man in the middle who terminates TLS towards each side (certificates are not pinned)
    /// and relays every byte cannot get a dialler admitted: each side's proof is bound to its
    /// own TLS session.
    #[test]
    fn a_relay_cannot_pass_on_the_proof() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (server, client) = (listener(&runtime), dialler(&runtime));
        let proxy = listener(&runtime);
        let upstream = server.local_addr().unwrap();
        let relay = proxy.clone();
        runtime.spawn(async move {
            let downstream = relay.accept().await.unwrap().await.unwrap();
            let upstream = relay.connect(upstream, "pp").unwrap().await.unwrap();
            let (mut down_send, mut down_recv) = downstream.accept_bi().await.unwrap();
            let (mut up_send, mut up_recv) = upstream.open_bi().await.unwrap();
            let forward = async {
                let mut hello = [0u8; 40];
                down_recv.read_exact(&mut hello).await.unwrap();
                up_send.write_all(&hello).await.unwrap();
            };
            forward.await;
            let mut answer = [0u8; PROOF_LEN];
            match up_recv.read_exact(&mut answer).await {
                Ok(()) => down_send.write_all(&answer).await.unwrap(),
                // Pass the refusal on, as a faithful relay would.
                Err(_) => match upstream.close_reason() {
                    Some(ConnectionError::ApplicationClosed(close)) => {
                        downstream.close(close.error_code, &close.reason)
                    }
                    _ => downstream.close(VarInt::from_u32(9), b"relay lost upstream"),
                },
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let to = proxy.local_addr().unwrap();
        let (admitted, dialled) =
            runtime.block_on(admission(&server, &client, to, ("secret", "secret")));
        assert!(matches!(admitted, Err(AuthError::Unproven)), "{admitted:?}");
        assert!(dialled.is_err(), "the relayed dialler was admitted");
    }
}
