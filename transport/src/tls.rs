//! The QUIC endpoint every pp connection uses: TLS 1.3 with a certificate made per process,
//! keep-alives that notice a dead peer within seconds.
//!
//! Certificates are not verified: a peer is authenticated by the cluster token, proven over the
//! TLS session itself (`auth`), which a man in the middle cannot do without the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ClientConfig, Endpoint, ServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// How long a silent peer is given before its connection counts as lost.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// An endpoint that listens on `bind` and dials with the same socket; call inside a Tokio
/// runtime.
pub(crate) fn endpoint(bind: SocketAddr) -> Result<Endpoint, String> {
    endpoint_on(std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?)
}

/// [`endpoint`] on a socket already bound.
pub(crate) fn endpoint_on(socket: std::net::UdpSocket) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config()?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(client_config()?);
    Ok(endpoint)
}

/// An endpoint that only dials (from an ephemeral port).
pub(crate) fn client_endpoint() -> Result<Endpoint, String> {
    let any = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut endpoint = Endpoint::client(any).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(client_config()?);
    Ok(endpoint)
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
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("10 s is a valid timeout"),
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
