//! Why a consumer's `run` ended other than by shutdown: each variant says what
//! to fix, naming the settings involved in backticks (`` `stream` ``,
//! `` `ca_file` ``) rather than any program's flags.

use lifecycle_domain::StoreError;

use crate::reply::ReplyError;

/// The underlying failure of a permanent fault.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A fault that retrying cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// `run` was called before a handler was registered.
    #[error("no event handler is registered: register one (on_event) before run")]
    NoHandler,
    /// The settings are inconsistent.
    #[error("invalid consumer settings: {0}")]
    Config(String),
    /// The stream key exists and is not a stream.
    #[error("the Redis key {key:?} holds a value that is not a stream (WRONGTYPE): set `stream` to a stream key, or rename or delete that key")]
    WrongType {
        /// The offending key.
        key: String,
    },
    /// Redis refused the credentials or the ACL forbids a command.
    #[error("Redis refused access while trying to {action} ({source}): check the user name and password in the Redis URL and the user's ACL permissions")]
    Auth {
        /// What was being done.
        action: &'static str,
        /// The server's answer.
        #[source]
        source: BoxError,
    },
    /// The TLS handshake failed.
    #[error("the TLS handshake with Redis failed while trying to {action} ({source}): check that the URL's port speaks TLS, that the CA certificate file (`ca_file`) signed the server's certificate and that it names the URL's host, and give a client certificate (`cert_file`, `key_file`) if the server asks for one")]
    Tls {
        /// What was being done.
        action: &'static str,
        /// The handshake's failure.
        #[source]
        source: BoxError,
    },
    /// Redis rejected a command in a way retrying cannot change.
    #[error("Redis rejected the attempt to {action}: {source}; {advice}")]
    Redis {
        /// What was being done.
        action: &'static str,
        /// The server's answer.
        #[source]
        source: BoxError,
        /// What the operator should check or fix.
        advice: &'static str,
    },
    /// The offset store failed permanently.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis answered in a shape it never does.
    #[error(transparent)]
    Reply(#[from] ReplyError),
}
