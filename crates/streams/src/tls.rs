//! TLS for `rediss://` URLs: whom the connections trust and what they
//! present, loaded once and shared by the stream reader's own socket and the
//! general Redis client.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Files that configure TLS; all optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates of the authorities to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key_file: Option<PathBuf>,
}

/// Why the TLS settings cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        /// Which file it is.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds nothing usable.
    #[error("the {what} {path} holds no {expected}: {reason}")]
    Invalid {
        /// Which file it is.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What it should hold.
        expected: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A client certificate without its key, or a key without a certificate.
    #[error("a client certificate needs its private key and a key its certificate: give both files or neither")]
    Incomplete,
    /// The certificates do not make a working configuration.
    #[error("the TLS settings are not usable: {0}")]
    Config(String),
}

/// TLS settings, loaded and checked.
#[derive(Clone)]
pub struct TlsSettings {
    config: Arc<ClientConfig>,
    /// The CA file's PEM, for the general client (`None`: the system's).
    ca_pem: Option<Vec<u8>>,
    /// The client certificate's and key's PEM, for the general client.
    client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsSettings")
            .field("custom_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_pem.is_some())
            .finish()
    }
}

/// The system's trust store, for `rediss://` without a CA file; loaded once.
static SYSTEM_SETTINGS: LazyLock<Result<TlsSettings, String>> =
    LazyLock::new(|| TlsSettings::load(&TlsFiles::default()).map_err(|err| err.to_string()));

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        expected: "PEM certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(err.to_string()))?;
    if certs.is_empty() {
        return Err(invalid("no BEGIN CERTIFICATE block".into()));
    }
    Ok(certs)
}

impl TlsSettings {
    /// Loads `files`: the CA file replaces the system's trust store; the
    /// client certificate and key go together.
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the file that cannot be read or used.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        if files.cert_file.is_some() != files.key_file.is_some() {
            return Err(TlsError::Incomplete);
        }
        let mut roots = RootCertStore::empty();
        let ca_pem = match &files.ca_file {
            Some(path) => {
                let pem = read("CA certificate file", path)?;
                for cert in certificates("CA certificate file", path, &pem)? {
                    roots.add(cert).map_err(|err| TlsError::Invalid {
                        what: "CA certificate file",
                        path: path.clone(),
                        expected: "usable CA certificate",
                        reason: err.to_string(),
                    })?;
                }
                Some(pem)
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                // Unreadable entries of the system store are skipped, as
                // other TLS clients do; none at all is an error below.
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(TlsError::Config(
                        "the system has no trusted certificate authorities: give a CA certificate file"
                            .into(),
                    ));
                }
                None
            }
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let (config, client_pem) = match (&files.cert_file, &files.key_file) {
            (None, None) => (builder.with_no_client_auth(), None),
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read("client certificate file", cert_path)?;
                let chain = certificates("client certificate file", cert_path, &cert_pem)?;
                let key_pem = read("client key file", key_path)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::Invalid {
                        what: "client key file",
                        path: key_path.clone(),
                        expected: "PEM private key",
                        reason: err.to_string(),
                    })?;
                let config = builder.with_client_auth_cert(chain, key).map_err(|err| {
                    TlsError::Config(format!("client certificate and key: {err}"))
                })?;
                (config, Some((cert_pem, key_pem)))
            }
            _ => return Err(TlsError::Incomplete),
        };
        Ok(Self {
            config: Arc::new(config),
            ca_pem,
            client_pem,
        })
    }

    /// The system's trust store and no client certificate, loaded once per
    /// process.
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] when the system trusts no authority.
    pub fn system() -> Result<Self, TlsError> {
        SYSTEM_SETTINGS.clone().map_err(TlsError::Config)
    }

    /// The same settings for the `redis` crate's client
    /// (`redis::Client::build_with_tls`).
    pub fn redis_certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client_pem
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca_pem.clone(),
        }
    }

    /// A connector for the reader's own socket.
    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
    }
}

/// The TLS failure inside `err`, if the failure is one: a certificate that is
/// not trusted, a client certificate the server wants, a port that does not
/// speak TLS. Retrying cannot fix these.
pub fn tls_failure<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps, and the `redis`
        // crate keeps its I/O errors behind an `Arc`: look inside both.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if let Some(tls) = tls_failure(inner) {
                return Some(tls);
            }
        }
        if let Some(shared) = err.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            if let Some(tls) = tls_failure(shared.as_ref()) {
                return Some(tls);
            }
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> TlsFiles {
        TlsFiles {
            ca_file: ca.map(Path::to_owned),
            cert_file: cert.map(Path::to_owned),
            key_file: key.map(Path::to_owned),
        }
    }

    fn message(result: Result<TlsSettings, TlsError>) -> String {
        match result {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let path = Path::new("/nonexistent/ca.pem");
        let text = message(TlsSettings::load(&files(Some(path), None, None)));
        assert!(
            text.contains("CA certificate file /nonexistent/ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn a_file_without_certificates_is_named() {
        let dir = std::env::temp_dir().join(format!("tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-cert.pem");
        std::fs::write(&path, b"hello, not a certificate\n").unwrap();
        let text = message(TlsSettings::load(&files(Some(&path), None, None)));
        assert!(
            text.contains("not-a-cert.pem") && text.contains("no PEM certificate"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let cert = Path::new("/nonexistent/client.pem");
        let text = message(TlsSettings::load(&files(None, Some(cert), None)));
        assert!(text.contains("give both files or neither"), "{text}");
    }

    #[test]
    fn tls_failures_are_found_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(matches!(
            tls_failure(&io),
            Some(rustls::Error::InvalidCertificate(_))
        ));
        // How the `redis` crate wraps it.
        let redis_error = redis::RedisError::from(io);
        assert!(matches!(
            tls_failure(&redis_error),
            Some(rustls::Error::InvalidCertificate(_))
        ));
        let plain =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(tls_failure(&plain).is_none());
    }
}
