//! TLS material shared by orchd, orch-worker and orchctl: the one rustls
//! crypto provider of the platform (aws-lc-rs), PEM files read with errors
//! that name the flag they came from, and the client side of every TLS
//! connection the binaries open: to orchd (gRPC and REST, optionally with a
//! client certificate), to Redis (`rediss://`) and to RabbitMQ (`amqps://`),
//! each trusting a private CA when one is given and the system's roots
//! otherwise.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// Makes aws-lc-rs the process's rustls crypto provider (once; later calls
/// do nothing). Redis and reqwest build their rustls configs from the
/// process default, so every entry point calls this before connecting.
pub fn install_crypto_provider() {
    // Err only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The crypto provider every TLS config of the platform is built with.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    install_crypto_provider();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Reads the PEM file that `flag` names; the error names the flag.
pub fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::invalid(flag, format!("cannot read {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::invalid(
            flag,
            format!("{} is not a PEM file", path.display()),
        ));
    }
    Ok(bytes)
}

/// The certificates (at least one) in the PEM file that `flag` names.
pub fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(flag, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(
            flag,
            format!("{} holds no CERTIFICATE block", path.display()),
        ));
    }
    Ok(certs)
}

/// The private key (PKCS#8, PKCS#1 or SEC1) in the PEM file `flag` names.
pub fn read_key(flag: &str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_pem(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        Error::invalid(
            flag,
            format!("{} holds no usable private key: {e}", path.display()),
        )
    })
}

/// A root store holding the CA certificates in the file `flag` names.
pub fn read_roots(flag: &str, path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(flag, path)? {
        roots
            .add(cert)
            .map_err(|e| Error::invalid(flag, format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// Checks that `key` is the private key of `cert` (the first certificate of
/// a chain); the error names `key_flag`.
pub fn check_key_matches(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
    cert_flag: &str,
    key_flag: &str,
) -> Result<()> {
    let provider = crypto_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| Error::invalid(key_flag, format!("unusable private key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(vec![cert.clone()], signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        // The key's public half cannot be computed for every key type;
        // rustls then checks at the first handshake instead.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(Error::invalid(
            key_flag,
            format!("the key does not belong to the certificate of {cert_flag}: {e}"),
        )),
    }
}

/// How a client reaches orchd over TLS: `--ca-cert` (trust this CA instead
/// of the system's roots), and `--client-cert` with `--client-key` (present
/// this certificate, for servers started with `--client-ca`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificate(s) to trust for the server's certificate.
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate chain presented to the server.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// Flag names of [`ClientTls`]'s fields, as orchctl and orch-worker spell
/// them.
pub const CA_CERT_FLAG: &str = "--ca-cert";
/// See [`CA_CERT_FLAG`].
pub const CLIENT_CERT_FLAG: &str = "--client-cert";
/// See [`CA_CERT_FLAG`].
pub const CLIENT_KEY_FLAG: &str = "--client-key";

impl ClientTls {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// The client certificate and key, both or neither.
    fn identity_paths(&self) -> Result<Option<(&Path, &Path)>> {
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(Error::invalid(
                CLIENT_KEY_FLAG,
                format!(
                    "{CLIENT_CERT_FLAG} needs {CLIENT_KEY_FLAG} (the certificate's private key)"
                ),
            )),
            (None, Some(_)) => Err(Error::invalid(
                CLIENT_CERT_FLAG,
                format!(
                    "{CLIENT_KEY_FLAG} needs {CLIENT_CERT_FLAG} (the certificate it belongs to)"
                ),
            )),
        }
    }

    /// Reads and checks every file, so that a bad setting is reported at
    /// start and not at the first connection. `server` is the URL the
    /// settings are for: they need `https://`.
    pub fn check(&self, server: &str) -> Result<()> {
        if self.is_set() && !server.trim().starts_with("https://") {
            let flag = if self.ca_cert.is_some() {
                CA_CERT_FLAG
            } else {
                CLIENT_CERT_FLAG
            };
            return Err(Error::invalid(
                flag,
                format!("TLS settings need an https:// server URL, got {server:?}"),
            ));
        }
        if let Some(ca) = &self.ca_cert {
            read_roots(CA_CERT_FLAG, ca)?;
        }
        if let Some((cert, key)) = self.identity_paths()? {
            let chain = read_certs(CLIENT_CERT_FLAG, cert)?;
            let key = read_key(CLIENT_KEY_FLAG, key)?;
            check_key_matches(&chain[0], &key, CLIENT_CERT_FLAG, CLIENT_KEY_FLAG)?;
        }
        Ok(())
    }

    /// tonic's TLS settings for an `https://` orchd: the CA (else the
    /// system's roots) and the client identity.
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig> {
        install_crypto_provider();
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca_cert {
            Some(ca) => {
                read_roots(CA_CERT_FLAG, ca)?;
                config.ca_certificate(tonic::transport::Certificate::from_pem(read_pem(
                    CA_CERT_FLAG,
                    ca,
                )?))
            }
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = self.identity_paths()? {
            read_certs(CLIENT_CERT_FLAG, cert)?;
            read_key(CLIENT_KEY_FLAG, key)?;
            config = config.identity(tonic::transport::Identity::from_pem(
                read_pem(CLIENT_CERT_FLAG, cert)?,
                read_pem(CLIENT_KEY_FLAG, key)?,
            ));
        }
        Ok(config)
    }

    /// A rustls client config with the same trust and identity, for HTTP
    /// clients (orchctl's REST mode). `alpn` is offered as given.
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
        let roots = match &self.ca_cert {
            Some(ca) => read_roots(CA_CERT_FLAG, ca)?,
            None => system_roots(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("rustls: {e}")))?
            .with_root_certificates(roots);
        let mut config = match self.identity_paths()? {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    read_certs(CLIENT_CERT_FLAG, cert)?,
                    read_key(CLIENT_KEY_FLAG, key)?,
                )
                .map_err(|e| Error::invalid(CLIENT_KEY_FLAG, e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// The system's trusted roots (what `--ca-cert` replaces); unreadable ones
/// are skipped.
fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    for error in &loaded.errors {
        tracing::debug!(%error, "could not load a system root certificate");
    }
    roots.add_parsable_certificates(loaded.certs);
    roots
}

/// Whether `err` (or anything in its source chain) is a failed TLS
/// handshake, and if so rustls's description of why, e.g. "invalid peer
/// certificate: UnknownIssuer". io errors wrapping a rustls error are looked
/// into too (their `source()` skips the wrapped error).
pub fn handshake_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // HTTP/2 keeps only the text of an I/O error, so an alert the
        // server sent after the handshake (TLS 1.3 refuses a client
        // certificate then) is recognised by rustls's wording.
        let text = e.to_string();
        if let Some(at) = text.find(ALERT_TEXT) {
            return Some(text[at..].to_owned());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls.to_string());
            }
            if let Some(found) = handshake_failure(inner) {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// How rustls words an alert from the peer.
const ALERT_TEXT: &str = "received fatal alert: ";

/// A Redis client for `url`; with `ca_cert` (the `--redis-ca-cert` file),
/// a `rediss://` URL trusts that CA instead of the system's roots. The
/// errors name `--redis-url` or `--redis-ca-cert`.
pub fn redis_client(url: &str, ca_cert: Option<&Path>) -> Result<redis::Client> {
    install_crypto_provider();
    let Some(ca) = ca_cert else {
        return redis::Client::open(url).map_err(|e| Error::invalid("redis_url", e.to_string()));
    };
    if !url.starts_with("rediss://") {
        return Err(Error::invalid(
            "--redis-ca-cert",
            format!(
                "a CA certificate needs a rediss:// URL, got {}",
                redact_url(url)
            ),
        ));
    }
    read_roots("--redis-ca-cert", ca)?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(read_pem("--redis-ca-cert", ca)?),
    };
    redis::Client::build_with_tls(url, certificates)
        .map_err(|e| Error::invalid("redis_url", e.to_string()))
}

/// lapin's TLS settings for an `amqps://` URL: with `ca_cert` (the
/// `--amqp-ca-cert` file) that CA is trusted besides the system's roots.
pub fn amqp_tls(url: &str, ca_cert: Option<&Path>) -> Result<lapin::tcp::OwnedTLSConfig> {
    install_crypto_provider();
    let Some(ca) = ca_cert else {
        return Ok(lapin::tcp::OwnedTLSConfig::default());
    };
    if !url.starts_with("amqps://") {
        return Err(Error::invalid(
            "--amqp-ca-cert",
            format!(
                "a CA certificate needs an amqps:// URL, got {}",
                redact_url(url)
            ),
        ));
    }
    read_roots("--amqp-ca-cert", ca)?;
    let pem = String::from_utf8(read_pem("--amqp-ca-cert", ca)?)
        .map_err(|_| Error::invalid("--amqp-ca-cert", format!("{} is not text", ca.display())))?;
    Ok(lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pem),
    })
}

/// `url` without its password, for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_non_pem_files_name_their_flag() {
        let err = read_certs("--ca-cert", Path::new("/nonexistent/ca.pem")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("invalid --ca-cert: cannot read /nonexistent/ca.pem"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let text = read_key("--client-key", &junk).unwrap_err().to_string();
        assert!(
            text.contains("--client-key") && text.contains("not a PEM file"),
            "{text}"
        );
    }

    #[test]
    fn client_settings_need_both_halves_and_https() {
        let only_cert = ClientTls {
            client_cert: Some("/c.pem".into()),
            ..ClientTls::default()
        };
        let text = only_cert
            .check("https://orchd:50051")
            .unwrap_err()
            .to_string();
        assert!(text.contains("--client-key"), "{text}");
        let only_ca = ClientTls {
            ca_cert: Some("/ca.pem".into()),
            ..ClientTls::default()
        };
        let text = only_ca.check("http://orchd:50051").unwrap_err().to_string();
        assert!(
            text.contains("--ca-cert") && text.contains("https://"),
            "{text}"
        );
        assert!(ClientTls::default().check("http://orchd:50051").is_ok());
    }

    #[test]
    fn a_ca_needs_a_tls_url() {
        let text = redis_client("redis://127.0.0.1:6379/", Some(Path::new("/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("--redis-ca-cert") && text.contains("rediss://"),
            "{text}"
        );
        let text = amqp_tls("amqp://guest:secret@h:5672/%2f", Some(Path::new("/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("--amqp-ca-cert") && text.contains("amqps://"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn handshake_failures_are_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let found = handshake_failure(&io).unwrap();
        assert!(found.contains("UnknownIssuer"), "{found}");
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(handshake_failure(&plain).is_none());
        // Only the text is left of an alert that went through HTTP/2.
        let flattened =
            std::io::Error::other("connection error: received fatal alert: CertificateRequired");
        assert_eq!(
            handshake_failure(&flattened).as_deref(),
            Some("received fatal alert: CertificateRequired")
        );
    }
}
