//! orchd's side of TLS: the server certificate and key (`--tls-cert`,
//! `--tls-key`) and, with `--client-ca`, the verifier that requires a client
//! certificate signed by that CA. Everything is read and checked once at
//! start, so a bad file stops orchd with an error naming its flag instead of
//! failing the first handshake.

use std::sync::Arc;

use orchestrator::Error;
use orchestrator::tls::{check_key_matches, crypto_provider, read_certs, read_key, read_roots};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

use crate::config::ConnectionSettings;

/// The TLS configs of orchd's two ports; they differ only in the
/// application protocols offered (ALPN).
#[derive(Clone)]
pub struct ServerTls {
    /// gRPC: HTTP/2 only.
    pub grpc: Arc<ServerConfig>,
    /// REST: HTTP/1.1.
    pub rest: Arc<ServerConfig>,
    /// Whether clients must present a certificate (`--client-ca`).
    pub mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

/// The TLS configs `settings` ask for; `None` when TLS is off.
pub fn load(settings: &ConnectionSettings) -> Result<Option<ServerTls>, Error> {
    let (cert_path, key_path) = match (&settings.tls_cert, &settings.tls_key) {
        (None, None) => {
            if settings.client_ca.is_some() {
                return Err(Error::invalid(
                    "--client-ca",
                    "client certificates need TLS: set --tls-cert and --tls-key too",
                ));
            }
            return Ok(None);
        }
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(Error::invalid(
                "--tls-key",
                "--tls-cert needs --tls-key (the certificate's private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(Error::invalid(
                "--tls-cert",
                "--tls-key needs --tls-cert (the certificate it belongs to)",
            ));
        }
    };
    let chain = read_certs("--tls-cert", cert_path)?;
    let key = read_key("--tls-key", key_path)?;
    check_key_matches(&chain[0], &key, "--tls-cert", "--tls-key")?;

    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("rustls: {e}")))?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            let roots = read_roots("--client-ca", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::invalid("--client-ca", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| Error::invalid("--tls-key", e.to_string()))?;
    let with_alpn = |protocols: &[&[u8]]| {
        let mut config = config.clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    };
    Ok(Some(ServerTls {
        grpc: with_alpn(&[b"h2"]),
        rest: with_alpn(&[b"http/1.1"]),
        mutual: settings.client_ca.is_some(),
    }))
}
