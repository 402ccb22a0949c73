//! Opening Redis clients, and keeping their passwords out of output.

use std::time::Duration;

use lifecycle_streams::TlsSettings;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::ConnectionAddr;

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL {url}: {reason}; expected redis[s]://[user:password@]host:port[/db]")]
pub struct ConnectError {
    /// The URL with its password redacted.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses `url` into a client; nothing is connected yet.
///
/// # Errors
///
/// [`ConnectError`] when the URL is malformed; the message never holds the
/// password.
pub fn open_client(url: &str) -> Result<redis::Client, ConnectError> {
    let client = redis::Client::open(url).map_err(|err| client_error(url, &err))?;
    refuse_insecure(url, &client)?;
    Ok(client)
}

/// Parses a `rediss://` `url` into a client that trusts and presents what
/// `tls` says; nothing is connected yet.
///
/// # Errors
///
/// [`ConnectError`] when the URL is malformed or does not ask for TLS.
pub fn open_tls_client(url: &str, tls: &TlsSettings) -> Result<redis::Client, ConnectError> {
    // Parsed plainly first, so that a redis:// URL gets a message of its own.
    let plain = open_client(url)?;
    if !matches!(
        plain.get_connection_info().addr(),
        ConnectionAddr::TcpTls { .. }
    ) {
        return Err(ConnectError {
            url: redact_url(url),
            reason:
                "TLS certificate files are given but the URL does not ask for TLS; use rediss://"
                    .into(),
        });
    }
    redis::Client::build_with_tls(url, tls.redis_certificates())
        .map_err(|err| client_error(url, &err))
}

fn client_error(url: &str, err: &redis::RedisError) -> ConnectError {
    ConnectError {
        url: redact_url(url),
        // The client's message can quote the URL; keep only its category.
        reason: match err.detail() {
            Some(detail) if !detail.contains(url) => format!("{} ({detail})", err.category()),
            _ => err.category().to_owned(),
        },
    }
}

/// Certificate checks stay on: `rediss://...#insecure` is refused.
fn refuse_insecure(url: &str, client: &redis::Client) -> Result<(), ConnectError> {
    match client.get_connection_info().addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => Err(ConnectError {
            url: redact_url(url),
            reason: "#insecure turns certificate checks off, which this worker does not do; give the CA that signed the server's certificate (`ca_file`) instead".into(),
        }),
        _ => Ok(()),
    }
}

/// A connection that reconnects in the background after a fault; the call
/// that met the fault still fails, and the caller decides when to retry.
pub fn lazy_manager(
    client: redis::Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// `url` with the password (if any) replaced by `***`, for logs, errors and
/// printed configuration.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = url.get(authority_start..).unwrap_or_default();
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = rest.get(..authority_len).unwrap_or_default();
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = authority.get(..at).unwrap_or_default();
    let host_and_rest = rest.get(at..).unwrap_or_default();
    let scheme = url.get(..authority_start).unwrap_or_default();
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}{user}:***{host_and_rest}"),
        // `redis://secret@host` puts the password where the user name goes.
        None if !userinfo.is_empty() => format!("{scheme}***{host_and_rest}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_only_them() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
            ("redis://alice:s3cret@host", "redis://alice:***@host"),
            (
                "rediss://alice:p@ss:w@rd@host/2",
                "rediss://alice:***@host/2",
            ),
            ("redis://s3cret@host", "redis://***@host"),
            ("redis://host/0?password=x", "redis://host/0?password=x"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn a_bad_url_is_an_error_without_the_password() {
        let err = open_client("redis://:hunter2@").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = open_client("http://:hunter2@host").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.starts_with("invalid Redis URL"), "{err}");
    }
}
