//! Test certificates, made at run time (no key is ever committed): a CA,
//! a server certificate for `localhost` and `127.0.0.1` signed by it, a
//! client certificate signed by it, and a second, unrelated CA with a client
//! certificate of its own (for "a certificate from another CA is refused").
//! Every certificate and key is written as a PEM file into a temporary
//! directory that lives as long as the [`TestCerts`] value.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A fresh set of certificates and keys as PEM files.
pub struct TestCerts {
    /// The CA that signed the server and client certificates.
    pub ca_cert: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// Its private key.
    pub server_key: PathBuf,
    /// Client certificate (common name `test-client`) signed by the CA.
    pub client_cert: PathBuf,
    /// Its private key.
    pub client_key: PathBuf,
    /// An unrelated CA.
    pub other_ca_cert: PathBuf,
    /// A client certificate signed by the unrelated CA.
    pub other_client_cert: PathBuf,
    /// Its private key.
    pub other_client_key: PathBuf,
    dir: TempDir,
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("self-sign the CA").pem();
        Ca { params, key, pem }
    }

    /// A certificate for `names` with `usage`, and its key, both as PEM.
    fn sign(
        &self,
        common_name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = KeyPair::generate().expect("generate a key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .expect("sign the certificate");
        (cert.pem(), key.serialize_pem())
    }
}

impl TestCerts {
    /// Makes the certificates and writes them to a new temporary directory.
    pub fn generate() -> TestCerts {
        let dir = tempfile::Builder::new()
            .prefix("orchtest-certs-")
            .tempdir()
            .expect("create a directory for test certificates");
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        };
        let ca = Ca::new("orchestrator test CA");
        let (server_cert, server_key) = ca.sign(
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            ca.sign("test-client", &[], ExtendedKeyUsagePurpose::ClientAuth);
        let other = Ca::new("some other CA");
        let (other_client_cert, other_client_key) =
            other.sign("intruder", &[], ExtendedKeyUsagePurpose::ClientAuth);
        TestCerts {
            ca_cert: write("ca.pem", &ca.pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            other_ca_cert: write("other-ca.pem", &other.pem),
            other_client_cert: write("other-client.pem", &other_client_cert),
            other_client_key: write("other-client-key.pem", &other_client_key),
            dir,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The contents of one of the files, e.g. `certs.read(&certs.ca_cert)`.
    pub fn read(&self, path: &Path) -> Vec<u8> {
        fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}
