//! Classifying Redis failures into those worth retrying and those that need a
//! person, using the client's own predicates rather than message text.

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::read_conn::ReadError;
use crate::tls::tls_failure;

/// Whether a Redis failure can pass by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    /// Connection refused, reset or timed out, `LOADING`, `READONLY`,
    /// failover and the like: back off, reconnect, go on.
    Transient,
    /// The stream key holds another type (`WRONGTYPE`).
    WrongType,
    /// Authentication or authorisation failed (`NOAUTH`, `WRONGPASS`, `NOPERM`).
    Auth,
    /// The TLS handshake failed: an untrusted server certificate, a client
    /// certificate the server wants, a port that does not speak TLS.
    Tls,
    /// Anything else retrying cannot fix: invalid configuration, a command
    /// the server does not know.
    Permanent,
}

/// Server error codes that mean the server is changing state and the
/// command will succeed later.
const TRANSIENT_CODES: &[&str] = &[
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "BUSY",
    "NOREPLICAS",
    "UNBLOCKED",
];

/// Classifies `err`.
pub fn classify(err: &RedisError) -> FaultClass {
    if tls_failure(err).is_some() {
        return FaultClass::Tls;
    }
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
    {
        return FaultClass::Transient;
    }
    match err.kind() {
        ErrorKind::AuthenticationFailed => return FaultClass::Auth,
        ErrorKind::Server(ServerErrorKind::NoPerm) => return FaultClass::Auth,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::MasterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown,
        ) => return FaultClass::Transient,
        ErrorKind::InvalidClientConfig
        | ErrorKind::Client
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::RESP3NotSupported => return FaultClass::Permanent,
        _ => {}
    }
    match err.code() {
        Some(code) => classify_code(code),
        // No code and not I/O: a client-side state such as a closed
        // connection handle; a fresh connection fixes it.
        None => match err.retry_method() {
            redis::RetryMethod::NoRetry => FaultClass::Permanent,
            _ => FaultClass::Transient,
        },
    }
}

/// Classifies a server error by its code (the first word of the reply).
pub(crate) fn classify_code(code: &str) -> FaultClass {
    match code {
        "WRONGTYPE" => FaultClass::WrongType,
        "NOAUTH" | "WRONGPASS" | "NOPERM" => FaultClass::Auth,
        code if TRANSIENT_CODES.contains(&code) => FaultClass::Transient,
        // An unclassified server reply (`ERR ...`) to a well-formed command
        // means the server or its configuration rejects it: retrying would
        // loop forever.
        _ => FaultClass::Permanent,
    }
}

/// Classifies a failure of the reading connection.
pub fn classify_read(err: &ReadError) -> FaultClass {
    match err {
        ReadError::Io(err) if tls_failure(err).is_some() => FaultClass::Tls,
        ReadError::Io(_)
        | ReadError::Timeout(_)
        | ReadError::Protocol(_)
        | ReadError::ReplyTooLarge { .. } => FaultClass::Transient,
        ReadError::Server(reply) => classify_code(&reply.code),
        ReadError::Unsupported(_) => FaultClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_failures_are_transient() {
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::BrokenPipe,
        ] {
            let err = RedisError::from(std::io::Error::from(kind));
            assert_eq!(classify(&err), FaultClass::Transient, "{kind:?}");
        }
    }

    #[test]
    fn server_codes_are_classified() {
        assert_eq!(classify_code("LOADING"), FaultClass::Transient);
        assert_eq!(classify_code("READONLY"), FaultClass::Transient);
        assert_eq!(classify_code("MASTERDOWN"), FaultClass::Transient);
        assert_eq!(classify_code("WRONGTYPE"), FaultClass::WrongType);
        assert_eq!(classify_code("WRONGPASS"), FaultClass::Auth);
        assert_eq!(classify_code("NOAUTH"), FaultClass::Auth);
        assert_eq!(classify_code("ERR"), FaultClass::Permanent);
    }

    #[test]
    fn client_configuration_errors_are_permanent() {
        let err = RedisError::from((ErrorKind::InvalidClientConfig, "bad url"));
        assert_eq!(classify(&err), FaultClass::Permanent);
        let err = RedisError::from((ErrorKind::AuthenticationFailed, "nope"));
        assert_eq!(classify(&err), FaultClass::Auth);
    }
}
