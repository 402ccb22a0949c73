//! In-process generated certificates for TLS tests (feature `tls`).
//!
//! [`TlsFiles::generate`] writes, into its own temporary directory, a self-signed CA, a server
//! certificate and a client certificate signed by it, and a second, unrelated CA for "wrong CA"
//! tests. Every file is PEM; keys are ECDSA P-256 in PKCS#8 (`-----BEGIN PRIVATE KEY-----`),
//! which redis-server (OpenSSL) and rustls both read.
//!
//! ```no_run
//! use lifecycle_test_support::{RedisServer, RedisServerOptions, TlsFiles};
//!
//! let files = TlsFiles::generate();
//! let server = RedisServer::start_with(RedisServerOptions {
//!     tls: Some(files.server(false)),
//!     ..RedisServerOptions::default()
//! });
//! let _url = server.tls_url().expect("TLS is enabled");
//! ```

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

use crate::ServerTls;

/// PEM certificates and PKCS#8 keys for TLS tests, in a temporary directory removed on drop.
#[derive(Debug)]
pub struct TlsFiles {
    /// The temporary directory holding every file below; removed when this value is dropped.
    pub dir: TempDir,
    /// The self-signed CA certificate that signed the server and client certificates.
    pub ca_cert: PathBuf,
    /// The server certificate (SANs: IP `127.0.0.1`, DNS `localhost`; extended key usage serverAuth).
    pub server_cert: PathBuf,
    /// The server's private key (PKCS#8 PEM).
    pub server_key: PathBuf,
    /// The client certificate (extended key usage clientAuth), signed by [`TlsFiles::ca_cert`].
    pub client_cert: PathBuf,
    /// The client's private key (PKCS#8 PEM).
    pub client_key: PathBuf,
    /// A second, unrelated self-signed CA certificate, which verifies neither the server nor the client.
    pub other_ca_cert: PathBuf,
    /// A server certificate signed by [`TlsFiles::ca_cert`] for another host only (DNS
    /// `elsewhere.invalid`), for host-name checks.
    pub misnamed_server_cert: PathBuf,
    /// The private key of [`TlsFiles::misnamed_server_cert`].
    pub misnamed_server_key: PathBuf,
}

impl TlsFiles {
    /// Generates a CA, a server and a client certificate signed by it, and an unrelated second CA; panics on failure.
    pub fn generate() -> TlsFiles {
        let dir = tempfile::Builder::new()
            .prefix("redis-tls-")
            .tempdir()
            .expect("test-support: cannot create a temporary directory for TLS files");

        let (ca, ca_key) = self_signed_ca("lifecycle test CA");
        let (other_ca, _other_ca_key) = self_signed_ca("lifecycle unrelated test CA");

        let mut server = leaf_params("lifecycle test server", ExtendedKeyUsagePurpose::ServerAuth);
        server.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName(
                "localhost"
                    .try_into()
                    .expect("test-support: `localhost` is a valid DNS name"),
            ),
        ];
        let server_key = new_key_pair();
        let server = server
            .signed_by(&server_key, &ca, &ca_key)
            .expect("test-support: cannot sign the server certificate");

        let mut misnamed = leaf_params(
            "lifecycle misnamed server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        misnamed.subject_alt_names =
            vec![SanType::DnsName("elsewhere.invalid".try_into().expect(
                "test-support: `elsewhere.invalid` is a valid DNS name",
            ))];
        let misnamed_key = new_key_pair();
        let misnamed = misnamed
            .signed_by(&misnamed_key, &ca, &ca_key)
            .expect("test-support: cannot sign the misnamed server certificate");

        let client = leaf_params("lifecycle test client", ExtendedKeyUsagePurpose::ClientAuth);
        let client_key = new_key_pair();
        let client = client
            .signed_by(&client_key, &ca, &ca_key)
            .expect("test-support: cannot sign the client certificate");

        let path = dir.path();
        TlsFiles {
            ca_cert: write_pem(path, "ca.crt", &ca.pem()),
            server_cert: write_pem(path, "server.crt", &server.pem()),
            server_key: write_pem(path, "server.key", &server_key.serialize_pem()),
            client_cert: write_pem(path, "client.crt", &client.pem()),
            client_key: write_pem(path, "client.key", &client_key.serialize_pem()),
            other_ca_cert: write_pem(path, "other-ca.crt", &other_ca.pem()),
            misnamed_server_cert: write_pem(path, "misnamed.crt", &misnamed.pem()),
            misnamed_server_key: write_pem(path, "misnamed.key", &misnamed_key.serialize_pem()),
            dir,
        }
    }

    /// Server-side TLS options using these files: server certificate and key, CA to verify clients with.
    pub fn server(&self, auth_clients: bool) -> ServerTls {
        ServerTls {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            ca_cert: self.ca_cert.clone(),
            auth_clients,
        }
    }

    /// Server-side TLS options with the certificate for another host ([`TlsFiles::misnamed_server_cert`]).
    pub fn misnamed_server(&self) -> ServerTls {
        ServerTls {
            cert: self.misnamed_server_cert.clone(),
            key: self.misnamed_server_key.clone(),
            ca_cert: self.ca_cert.clone(),
            auth_clients: false,
        }
    }
}

/// A fresh ECDSA P-256 key pair.
fn new_key_pair() -> KeyPair {
    KeyPair::generate().expect("test-support: cannot generate a key pair")
}

/// A self-signed CA certificate (may sign certificates and CRLs) with its key pair.
fn self_signed_ca(common_name: &str) -> (Certificate, KeyPair) {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = new_key_pair();
    let cert = params
        .self_signed(&key)
        .expect("test-support: cannot self-sign a CA certificate");
    (cert, key)
}

/// Parameters of an end-entity certificate for one extended key usage (`serverAuth` or `clientAuth`).
fn leaf_params(common_name: &str, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params
}

/// Writes `contents` to `dir/name` and returns the path; panics on failure.
fn write_pem(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents)
        .unwrap_or_else(|err| panic!("test-support: cannot write {}: {err}", path.display()));
    path
}
