//! Classifying Redis failures into those worth retrying and those that need a
//! person, using the client's own predicates and the server's error codes
//! rather than message text.

use redis::{ErrorKind, RedisError, RetryMethod};

use crate::read_conn::ReadError;
use crate::tls::tls_failure;

/// Whether a Redis failure can pass by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    /// Connection refused, reset or timed out, `LOADING`, `READONLY`,
    /// failover, writes refused (`OOM`, `MISCONF`, `NOREPLICAS`) and the
    /// like: back off, reconnect, go on.
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
const CHANGING_STATE_CODES: &[&str] = &[
    // Loading its data set at start-up.
    "LOADING",
    // A replica lost its master and serves no stale data.
    "MASTERDOWN",
    // Cluster: a slot is migrating, or the cluster is not serving.
    "TRYAGAIN",
    "CLUSTERDOWN",
    // Cluster: the slot is served elsewhere now (a failover or a
    // resharding); the cluster client follows it at the next try.
    "MOVED",
    "ASK",
    // A blocked command was unblocked by `CLIENT UNBLOCK ... ERROR`.
    "UNBLOCKED",
];

/// Server error codes with which Redis refuses a write for a condition of
/// the server that an operator or time clears: the write succeeds once the
/// condition is gone.
const WRITE_REFUSAL_CODES: &[&str] = &[
    // `maxmemory` reached under the `noeviction` policy.
    "OOM",
    // The last RDB save or AOF write failed (`stop-writes-on-bgsave-error`).
    "MISCONF",
    // Fewer good replicas than `min-replicas-to-write`.
    "NOREPLICAS",
    // The server is a replica (a failover demoted the master we know).
    "READONLY",
    // A script or function runs past its time limit (every command is
    // refused until it ends or is killed).
    "BUSY",
];

/// Classifies `err`.
///
/// A server's error reply is classified by its code. A pipeline's or
/// transaction's failure carries the error of each failed command (`EXEC`
/// reports `EXECABORT` when a queued command was refused, for instance with
/// `OOM`): it is transient only when each of them is; otherwise the first
/// that is not decides.
pub fn classify(err: &RedisError) -> FaultClass {
    if tls_failure(err).is_some() {
        return FaultClass::Tls;
    }
    // Every failure of the socket (refused, reset, timed out, closed) has
    // this kind in the `redis` crate: `is_timeout`, `is_connection_dropped`
    // and `is_connection_refusal` imply it (pinned by the tests below).
    if err.is_io_error() {
        return FaultClass::Transient;
    }
    // The client's own verdict on the credentials (the server's replies are
    // classified by code below).
    if err.kind() == ErrorKind::AuthenticationFailed {
        return FaultClass::Auth;
    }
    // Bytes that are not the Redis protocol on a connection: Redis never
    // sends them, so the URL's port belongs to something else (an HTTP
    // server, another database, a TLS port reached with redis://). Treated
    // as permanent, so that `run` ends with one line saying so, rather than
    // retrying forever while looking alive: waiting does not turn a web
    // server into Redis, and a proxy that is restarting refuses or resets
    // connections (I/O errors, still transient) rather than answering in
    // another protocol. The supervisor's restart policy is then the retry,
    // with the reason in front of the operator; no entry is lost, as the
    // offset is stored in Redis.
    if not_redis(err) {
        return FaultClass::Permanent;
    }
    match err.clone().into_server_errors() {
        Some(errors) => {
            let codes: Vec<&str> = errors.iter().map(|(_, error)| error.code()).collect();
            deciding_code(&codes).map_or(FaultClass::Transient, classify_code)
        }
        // Neither I/O nor a server reply: a client-side state. Those the
        // client would retry (a parse failure, a sentinel without the
        // master yet) a fresh connection fixes; the others are settings or
        // types retrying cannot fix.
        None => match err.retry_method() {
            RetryMethod::NoRetry => FaultClass::Permanent,
            _ => FaultClass::Transient,
        },
    }
}

/// Whether `err` is the client's failure to read what the server sent as
/// the Redis protocol (RESP) at all, as opposed to a well-formed reply of
/// an unexpected type: the server is not Redis (see [`classify`]).
///
/// The `redis` crate gives both the kind [`ErrorKind::Parse`]; a protocol
/// failure is the one its RESP parser words as `Parse error at <position>`
/// (pinned by the tests below and by the binary's tests against a server
/// that answers HTTP).
pub fn not_redis(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Parse
        && err
            .detail()
            .is_some_and(|detail| detail.starts_with("Parse error at"))
}

/// Of the codes of the errors a pipeline or transaction failed with, the
/// one that decides its class and advice: the first that is not transient,
/// else the first.
fn deciding_code<'a>(codes: &[&'a str]) -> Option<&'a str> {
    codes
        .iter()
        .copied()
        .find(|code| classify_code(code) != FaultClass::Transient)
        .or_else(|| codes.first().copied())
}

/// Classifies a server error by its code (the first word of the reply).
pub(crate) fn classify_code(code: &str) -> FaultClass {
    match code {
        "WRONGTYPE" => FaultClass::WrongType,
        "NOAUTH" | "WRONGPASS" | "NOPERM" => FaultClass::Auth,
        code if CHANGING_STATE_CODES.contains(&code) || WRITE_REFUSAL_CODES.contains(&code) => {
            FaultClass::Transient
        }
        // An unclassified server reply (`ERR ...`) to a well-formed command
        // means the server or its configuration rejects it: retrying would
        // loop forever.
        _ => FaultClass::Permanent,
    }
}

/// The code of a refused write (`OOM`, `MISCONF`, `NOREPLICAS`,
/// `READONLY`, `BUSY`) when `err` is one, or carries one among the errors of
/// a transaction or pipeline: Redis is up, but will not take writes until
/// the condition is cleared. For telling an operator what to fix.
pub fn write_refusal(err: &RedisError) -> Option<&'static str> {
    let errors = err.clone().into_server_errors()?;
    errors.iter().find_map(|(_, error)| {
        WRITE_REFUSAL_CODES
            .iter()
            .copied()
            .find(|code| *code == error.code())
    })
}

/// Whether `err` (or one of its causes) is a Redis connection that failed
/// or a server still loading its data: what a Redis restart or failover
/// looks like to a command, unlike a refusal from a server that kept
/// running (`OOM`, `MISCONF`, ...).
pub(crate) fn connection_lost(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(redis) = err.downcast_ref::<RedisError>() {
            // `is_io_error` covers a dropped or refused connection too
            // (pinned by `the_finer_socket_predicates_imply_the_io_kind`).
            return redis.is_io_error() || redis.code() == Some("LOADING");
        }
        current = err.source();
    }
    false
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
        ReadError::Locate(err) => classify(err),
        // As for the client's connections (see `classify`); told by the
        // first answer of a fresh connection only, so that a reply our own
        // parser cannot read on a connection that spoke RESP stays
        // transient.
        ReadError::Unsupported(_) | ReadError::NotRedis { .. } => FaultClass::Permanent,
    }
}

/// What the operator is told about `err`: what it means and what to check
/// or fix. A transient fault's advice goes with the warning that starts an
/// outage; a permanent one's ends `run`'s error.
pub fn advice(err: &RedisError) -> &'static str {
    if tls_failure(err).is_some() {
        return TLS_ADVICE;
    }
    if err.is_io_error() {
        return socket_advice(err.is_connection_refusal());
    }
    if err.kind() == ErrorKind::AuthenticationFailed {
        return AUTH_ADVICE;
    }
    if not_redis(err) {
        return NOT_REDIS_ADVICE;
    }
    match err.clone().into_server_errors() {
        // The error that decides the class (see `classify`) gives the advice.
        Some(errors) => {
            let codes: Vec<&str> = errors.iter().map(|(_, error)| error.code()).collect();
            deciding_code(&codes).map_or(UNKNOWN_REPLY_ADVICE, code_advice)
        }
        None => match err.retry_method() {
            RetryMethod::NoRetry => CLIENT_ADVICE,
            _ => RECONNECT_ADVICE,
        },
    }
}

/// What the operator is told about a failure of the reading connection (see
/// [`advice`]).
pub fn advice_read(err: &ReadError) -> &'static str {
    match err {
        ReadError::Io(err) if tls_failure(err).is_some() => TLS_ADVICE,
        ReadError::Io(err) => socket_advice(err.kind() == std::io::ErrorKind::ConnectionRefused),
        ReadError::Timeout(_) => TIMEOUT_ADVICE,
        ReadError::Protocol(_) => RECONNECT_ADVICE,
        ReadError::ReplyTooLarge { .. } => REPLY_TOO_LARGE_ADVICE,
        ReadError::Server(reply) => code_advice(&reply.code),
        ReadError::Locate(err) => advice(err),
        ReadError::Unsupported(_) => CLIENT_ADVICE,
        ReadError::NotRedis { .. } => NOT_REDIS_ADVICE,
    }
}

const TLS_ADVICE: &str = "check that the URL's port speaks TLS, that the CA certificate (`ca_file`) signed the server's certificate for the URL's host, and give a client certificate (`cert_file`, `key_file`) if the server asks for one";
const AUTH_ADVICE: &str =
    "check the user name and password in the Redis URL and the user's ACL permissions";
const NOT_REDIS_ADVICE: &str = "the server answered in another protocol: is the URL's port a Redis port? (a port that speaks TLS needs rediss://)";
const REFUSED_ADVICE: &str = "nothing accepts connections at the Redis URL: start Redis or correct the URL; the worker retries with back-off and keeps its place";
const SOCKET_ADVICE: &str = "the connection to Redis failed: the worker reconnects with back-off and keeps its place; check Redis and the network if this lasts";
const TIMEOUT_ADVICE: &str = "Redis did not answer in time (busy, or the network is cut): the worker reconnects with back-off and keeps its place";
const RECONNECT_ADVICE: &str =
    "the worker could not read Redis's answer: it reconnects with back-off and keeps its place";
const REPLY_TOO_LARGE_ADVICE: &str =
    "a read's reply outgrew the reply limit (`max_reply_bytes`): the worker asks for fewer entries";
const CLIENT_ADVICE: &str =
    "the connection's settings cannot work: check the Redis URL and the TLS settings";
const UNKNOWN_REPLY_ADVICE: &str = "Redis refused the command: check that it is Redis 7.0 or later and that the user's ACL grants the commands the README lists";
const CLUSTER_ADVICE: &str = "a slot of a Redis Cluster is served by another node now (a failover or a resharding): the worker follows it and retries; if this lasts, the URL names a cluster node with redis:// where it needs redis+cluster:// and --key-layout cluster";

/// The advice for a command over keys of several cluster slots.
const CROSSSLOT_ADVICE: &str = "keys of one command lie in several slots of a Redis Cluster: on a cluster use a redis+cluster:// URL and --key-layout cluster";

/// The advice for the first Redis failure among `err` and its causes (a
/// store's error wraps the client's), if there is one.
pub(crate) fn advice_in(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(redis) = err.downcast_ref::<RedisError>() {
            return Some(advice(redis));
        }
        if let Some(read) = err.downcast_ref::<ReadError>() {
            return Some(advice_read(read));
        }
        current = err.source();
    }
    None
}

/// The advice for a server error code.
fn code_advice(code: &str) -> &'static str {
    match code {
        "LOADING" => "Redis is loading its data set after a restart: the worker retries until it serves",
        "MASTERDOWN" => "the Redis answering is a replica that lost its master: the worker retries until a master serves",
        "TRYAGAIN" | "CLUSTERDOWN" => "the cluster is resharding or down: the worker retries",
        "UNBLOCKED" => "a client unblocked the worker's read (CLIENT UNBLOCK ... ERROR): the worker reads again",
        "OOM" => "Redis reached `maxmemory` and refuses writes: free memory or raise `maxmemory`; the worker retries and keeps its place",
        "MISCONF" => "Redis cannot persist (a failed RDB save or AOF write) and refuses writes: fix its disk; the worker retries and keeps its place",
        "NOREPLICAS" => "fewer replicas than `min-replicas-to-write` are in sync and Redis refuses writes: bring the replicas back; the worker retries",
        "READONLY" => "the Redis answering is a replica (a failover under way, or a URL naming a replica): the worker retries until a master answers",
        "BUSY" => "a script runs past Redis's busy limit and Redis serves no one: end it (SCRIPT KILL) or wait; the worker retries",
        "WRONGTYPE" => "a key of the worker's holds another type: check `stream` and `key_prefix`, or rename or delete that key",
        "NOAUTH" | "WRONGPASS" | "NOPERM" => AUTH_ADVICE,
        "MOVED" | "ASK" => CLUSTER_ADVICE,
        "CROSSSLOT" => CROSSSLOT_ADVICE,
        "NOSCRIPT" => "Redis dropped the worker's script between loading and running it (SCRIPT FLUSH): restart the worker",
        _ => UNKNOWN_REPLY_ADVICE,
    }
}

/// The advice for a failed socket: refused, or anything else.
fn socket_advice(refused: bool) -> &'static str {
    if refused {
        REFUSED_ADVICE
    } else {
        SOCKET_ADVICE
    }
}

/// How much of a foreign server's answer [`quote_answer`] keeps.
pub const ANSWER_QUOTED: usize = 60;

/// The first line of what a server that is not Redis answered, fit for a
/// one-line message: printable ASCII only (anything else shown as `.`), at
/// most [`ANSWER_QUOTED`] characters.
pub fn quote_answer(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take_while(|byte| !matches!(byte, b'\r' | b'\n'))
        .take(ANSWER_QUOTED)
        .map(|&byte| {
            if byte.is_ascii_graphic() || byte == b' ' {
                char::from(byte)
            } else {
                '.'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_are_quoted_printably() {
        assert_eq!(
            super::quote_answer(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
            "HTTP/1.1 400 Bad Request"
        );
        assert_eq!(super::quote_answer(b"\x15\x03\x03"), "...");
        assert_eq!(
            super::quote_answer(&[b'x'; 300]).len(),
            super::ANSWER_QUOTED
        );
    }

    use std::io;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_lost_connection_is_told_from_a_refusal_through_wrappers() {
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(connection_lost(&dropped));
        let wrapped = lifecycle_domain::HandlerError::with_source(
            "apply the lobby cascade",
            lifecycle_domain::StoreError {
                action: "apply the cascade".into(),
                permanent: false,
                source: Box::new(dropped),
            },
        );
        assert!(connection_lost(&wrapped));
        let oom = redis::make_extension_error("OOM".to_owned(), Some("full".to_owned()));
        assert!(!connection_lost(&oom));
        let loading = redis::make_extension_error("LOADING".to_owned(), Some("wait".to_owned()));
        assert!(connection_lost(&loading));
        assert!(!connection_lost(&lifecycle_domain::HandlerError::msg(
            "own fault"
        )));
    }
    use crate::resp::{ProtocolError, ServerReplyError};

    /// The error the `redis` crate makes of the server's reply `-LINE`, as
    /// its own parser maps it (known codes get a kind of their own).
    fn server_error(line: &str) -> RedisError {
        let value = redis::parse_redis_value(format!("-{line}\r\n").as_bytes());
        match value.and_then(redis::Value::extract_error) {
            Err(err) => err,
            Ok(value) => panic!("{line:?} parsed as {value:?}"),
        }
    }

    /// A fault the worker can meet, as the table below gives it.
    #[derive(Clone, Copy, Debug)]
    enum Fault {
        /// The server's error reply (the line after `-`), on a command
        /// connection and on the reading connection.
        Reply(&'static str),
        /// A failed socket, on either connection.
        Io(io::ErrorKind),
        /// A failed TLS handshake, on either connection.
        Tls,
        /// The client's own failure, on a command connection.
        Client(ErrorKind),
        /// A server that answers in another protocol.
        NotRedis(&'static [u8]),
        /// The reading connection's own failures.
        ReadTimeout,
        ReadProtocol,
        ReadTooLarge,
        ReadUnsupported,
        ReadNotRedis,
    }

    /// Every fault the worker can meet: whether it passes by itself (the
    /// worker retries) or ends `run`, and the words of what the operator is
    /// told about it.
    const FAULTS: &[(Fault, FaultClass, &str)] = &[
        (Fault::Reply("LOADING Redis is loading the dataset in memory"), FaultClass::Transient, "loading its data set"),
        (Fault::Reply("READONLY You can't write against a read only replica."), FaultClass::Transient, "is a replica"),
        (Fault::Reply("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."), FaultClass::Transient, "lost its master"),
        (Fault::Reply("TRYAGAIN Multiple keys request during rehashing of slot"), FaultClass::Transient, "resharding"),
        (Fault::Reply("CLUSTERDOWN The cluster is down"), FaultClass::Transient, "cluster is resharding or down"),
        (Fault::Reply("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."), FaultClass::Transient, "SCRIPT KILL"),
        (Fault::Reply("UNBLOCKED client unblocked via CLIENT UNBLOCK"), FaultClass::Transient, "CLIENT UNBLOCK"),
        (Fault::Reply("OOM command not allowed when used memory > 'maxmemory'."), FaultClass::Transient, "raise `maxmemory`"),
        (Fault::Reply("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk."), FaultClass::Transient, "fix its disk"),
        (Fault::Reply("NOREPLICAS Not enough good replicas to write."), FaultClass::Transient, "`min-replicas-to-write`"),
        (Fault::Reply("WRONGTYPE Operation against a key holding the wrong kind of value"), FaultClass::WrongType, "check `stream` and `key_prefix`"),
        (Fault::Reply("NOAUTH Authentication required."), FaultClass::Auth, "password in the Redis URL"),
        (Fault::Reply("WRONGPASS invalid username-password pair or user is disabled."), FaultClass::Auth, "password in the Redis URL"),
        (Fault::Reply("NOPERM this user has no permissions to run the 'xread' command"), FaultClass::Auth, "ACL permissions"),
        (Fault::Reply("ERR unknown command 'XREAD'"), FaultClass::Permanent, "Redis 7.0 or later"),
        (Fault::Reply("EXECABORT Transaction discarded because of previous errors."), FaultClass::Permanent, "Redis 7.0 or later"),
        (Fault::Reply("NOSCRIPT No matching script. Please use EVAL."), FaultClass::Permanent, "restart the worker"),
        (Fault::Reply("CROSSSLOT Keys in request don't hash to the same slot"), FaultClass::Permanent, "--key-layout cluster"),
        (Fault::Reply("MOVED 3999 127.0.0.1:6381"), FaultClass::Transient, "follows it and retries"),
        (Fault::Reply("ASK 3999 127.0.0.1:6381"), FaultClass::Transient, "follows it and retries"),
        (Fault::Reply("SOMETHINGNEW that this client does not know"), FaultClass::Permanent, "Redis 7.0 or later"),
        (Fault::Io(io::ErrorKind::ConnectionRefused), FaultClass::Transient, "start Redis or correct the URL"),
        (Fault::Io(io::ErrorKind::ConnectionReset), FaultClass::Transient, "reconnects with back-off"),
        (Fault::Io(io::ErrorKind::ConnectionAborted), FaultClass::Transient, "reconnects with back-off"),
        (Fault::Io(io::ErrorKind::BrokenPipe), FaultClass::Transient, "reconnects with back-off"),
        (Fault::Io(io::ErrorKind::UnexpectedEof), FaultClass::Transient, "reconnects with back-off"),
        (Fault::Io(io::ErrorKind::TimedOut), FaultClass::Transient, "reconnects with back-off"),
        (Fault::Io(io::ErrorKind::NotConnected), FaultClass::Transient, "reconnects with back-off"),
        (Fault::Tls, FaultClass::Tls, "CA certificate (`ca_file`)"),
        (Fault::Client(ErrorKind::AuthenticationFailed), FaultClass::Auth, "password in the Redis URL"),
        (Fault::Client(ErrorKind::InvalidClientConfig), FaultClass::Permanent, "check the Redis URL"),
        (Fault::Client(ErrorKind::Client), FaultClass::Permanent, "check the Redis URL"),
        (Fault::Client(ErrorKind::Parse), FaultClass::Transient, "could not read Redis's answer"),
        (Fault::Client(ErrorKind::MasterNameNotFoundBySentinel), FaultClass::Transient, "reconnects with back-off"),
        (Fault::NotRedis(b"HTTP/1.1 400 Bad Request\r\n\r\n"), FaultClass::Permanent, "a Redis port?"),
        (Fault::ReadTimeout, FaultClass::Transient, "did not answer in time"),
        (Fault::ReadProtocol, FaultClass::Transient, "could not read Redis's answer"),
        (Fault::ReadTooLarge, FaultClass::Transient, "`max_reply_bytes`"),
        (Fault::ReadUnsupported, FaultClass::Permanent, "check the Redis URL"),
        (Fault::ReadNotRedis, FaultClass::Permanent, "a Redis port?"),
    ];

    /// A TLS handshake's failure as the socket reports it.
    fn handshake_failure() -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )
    }

    /// `fault` as a command connection meets it, if it can.
    fn as_command_error(fault: Fault) -> Option<RedisError> {
        match fault {
            Fault::Reply(line) => Some(server_error(line)),
            Fault::Io(kind) => Some(RedisError::from(io::Error::from(kind))),
            Fault::Tls => Some(RedisError::from(handshake_failure())),
            Fault::Client(kind) => Some(RedisError::from((kind, "client-side"))),
            Fault::NotRedis(answer) => Some(match redis::parse_redis_value(answer) {
                Err(err) => err,
                Ok(value) => panic!("{answer:?} parsed as {value:?}"),
            }),
            _ => None,
        }
    }

    /// `fault` as the reading connection meets it, if it can.
    fn as_read_error(fault: Fault) -> Option<ReadError> {
        match fault {
            Fault::Reply(line) => {
                let code = line.split(' ').next().unwrap_or(line);
                Some(ReadError::Server(ServerReplyError {
                    code: code.to_owned(),
                    message: line.to_owned(),
                }))
            }
            Fault::Io(kind) => Some(ReadError::Io(io::Error::from(kind))),
            Fault::Tls => Some(ReadError::Io(handshake_failure())),
            Fault::ReadTimeout => Some(ReadError::Timeout(Duration::from_secs(1))),
            Fault::ReadProtocol => Some(ReadError::Protocol(ProtocolError("garbage".into()))),
            Fault::ReadTooLarge => Some(ReadError::ReplyTooLarge {
                limit: 1,
                entries: 0,
                partial_entry_id: None,
            }),
            Fault::ReadUnsupported => Some(ReadError::Unsupported("unix sockets over TLS".into())),
            Fault::ReadNotRedis => Some(ReadError::NotRedis {
                answered: "HTTP/1.1 400 Bad Request".into(),
            }),
            Fault::Client(_) | Fault::NotRedis(_) => None,
        }
    }

    #[test]
    fn every_fault_has_its_class_and_what_the_operator_is_told() {
        for (fault, class, told) in FAULTS {
            let command = as_command_error(*fault);
            let read = as_read_error(*fault);
            assert!(
                command.is_some() || read.is_some(),
                "{fault:?} tested nowhere"
            );
            if let Some(err) = command {
                assert_eq!(classify(&err), *class, "{fault:?} on a command connection");
                let advice = advice(&err);
                assert!(advice.contains(told), "{fault:?}: told {advice:?}");
            }
            if let Some(err) = read {
                assert_eq!(
                    classify_read(&err),
                    *class,
                    "{fault:?} on the reading connection"
                );
                let advice = advice_read(&err);
                assert!(advice.contains(told), "{fault:?} read: told {advice:?}");
            }
            if let Fault::Reply(line) = fault {
                let code = line.split(' ').next().unwrap_or(line);
                assert_eq!(server_error(line).code(), Some(code), "{line}");
                assert_eq!(classify_code(code), *class, "code {code}");
            }
        }
    }

    /// The codes among [`FAULTS`]' replies.
    fn codes() -> impl Iterator<Item = (&'static str, &'static str)> {
        FAULTS.iter().filter_map(|(fault, ..)| match fault {
            Fault::Reply(line) => Some((line.split(' ').next().unwrap_or(line), *line)),
            _ => None,
        })
    }

    #[test]
    fn a_transaction_is_decided_by_its_first_error_that_does_not_pass() {
        assert_eq!(
            deciding_code(&["OOM", "WRONGTYPE", "NOAUTH"]),
            Some("WRONGTYPE")
        );
        assert_eq!(deciding_code(&["OOM", "READONLY"]), Some("OOM"));
        assert_eq!(deciding_code(&["ERR"]), Some("ERR"));
        assert_eq!(deciding_code(&[]), None);
    }

    #[test]
    fn the_advice_is_found_through_wrappers() {
        let oom = server_error("OOM command not allowed when used memory > 'maxmemory'.");
        let wrapped = lifecycle_domain::StoreError {
            action: "save the offset".into(),
            permanent: false,
            source: Box::new(oom.clone()),
        };
        assert_eq!(advice_in(&wrapped), Some(advice(&oom)));
        let read = ReadError::Timeout(Duration::from_secs(1));
        assert_eq!(advice_in(&read), Some(TIMEOUT_ADVICE));
        assert_eq!(
            advice_in(&lifecycle_domain::HandlerError::msg("own fault")),
            None
        );
    }

    #[test]
    fn both_lists_of_passing_codes_are_transient() {
        for code in CHANGING_STATE_CODES.iter().chain(WRITE_REFUSAL_CODES) {
            assert_eq!(classify_code(code), FaultClass::Transient, "{code}");
            assert!(codes().any(|(known, _)| known == *code), "{code} untested");
        }
        // The lists are apart: neither makes the other's codes transient.
        for code in CHANGING_STATE_CODES {
            assert!(!WRITE_REFUSAL_CODES.contains(code), "{code} in both");
        }
    }

    #[test]
    fn refused_writes_are_transient_however_redis_words_them() {
        // What Redis 7.0 answers when a write is refused: to the command
        // itself, to a script whose `redis.call` write was refused (the
        // script's name and line appended), and to a script that returns
        // the error table of a `redis.pcall` as it is.
        for line in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "OOM command not allowed when used memory > 'maxmemory'. script: 068667073f52e94b5c163dd8963ffd42cf3f8bed, on @user_script:1.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. Commands that may modify the data set are disabled, because this instance is configured to report errors during writes if RDB snapshotting fails (stop-writes-on-bgsave-error option). Please check the Redis logs for details about the RDB error. script: ae3467fcdeb040f89bcec55e6543a4593cf7396a, on @user_script:1.",
            "NOREPLICAS Not enough good replicas to write. script: ae3467fcdeb040f89bcec55e6543a4593cf7396a, on @user_script:1.",
            "READONLY You can't write against a read only replica. script: ae3467fcdeb040f89bcec55e6543a4593cf7396a, on @user_script:1.",
        ] {
            assert_eq!(classify(&server_error(line)), FaultClass::Transient, "{line}");
        }
        // Unknown codes and plain errors stay permanent, whatever words
        // follow.
        for line in [
            "ERR Error running script (call to f_0123): @user_script:1: OOM command not allowed",
            "oom lower case is not a code",
            "SOMETHINGNEW that this client does not know",
        ] {
            assert_eq!(
                classify(&server_error(line)),
                FaultClass::Permanent,
                "{line}"
            );
        }
    }

    #[test]
    fn refused_writes_are_named_by_their_code() {
        for (code, line) in codes() {
            let expected = WRITE_REFUSAL_CODES.contains(&code).then_some(code);
            assert_eq!(write_refusal(&server_error(line)), expected, "{line}");
        }
        let io = RedisError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(write_refusal(&io), None);
        let client = RedisError::from((ErrorKind::Client, "client-side"));
        assert_eq!(write_refusal(&client), None);
    }

    #[test]
    fn io_failures_are_transient() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::TimedOut,
            io::ErrorKind::WouldBlock,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::NotConnected,
            // The client itself would not retry these two; the socket's
            // trouble may still pass.
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::Unsupported,
        ] {
            let err = RedisError::from(io::Error::from(kind));
            assert_eq!(classify(&err), FaultClass::Transient, "{kind:?}");
            assert_eq!(
                classify_read(&ReadError::Io(io::Error::from(kind))),
                FaultClass::Transient,
                "read {kind:?}"
            );
        }
        let dropped = RedisError::from((ErrorKind::Io, "connection dropped"));
        assert_eq!(classify(&dropped), FaultClass::Transient);
    }

    /// `classify` asks `is_io_error` alone: the client's finer predicates
    /// imply it. Pinned, so that a client whose predicates stop implying it
    /// fails here rather than turning a socket failure permanent.
    #[test]
    fn the_finer_socket_predicates_imply_the_io_kind() {
        let mut errors: Vec<RedisError> = [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::TimedOut,
            io::ErrorKind::WouldBlock,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::NotConnected,
            io::ErrorKind::NotFound,
        ]
        .into_iter()
        .map(|kind| RedisError::from(io::Error::from(kind)))
        .collect();
        errors.push(RedisError::from((ErrorKind::Io, "connection dropped")));
        for err in &errors {
            let finer = [
                ("is_timeout", err.is_timeout()),
                ("is_connection_dropped", err.is_connection_dropped()),
                ("is_connection_refusal", err.is_connection_refusal()),
            ];
            assert!(
                finer.iter().any(|(_, holds)| *holds),
                "{err:?}: no finer predicate holds"
            );
            assert!(err.is_io_error(), "{err:?}: {finer:?} but not is_io_error");
        }
    }

    #[test]
    fn client_side_failures_are_classified_by_the_clients_retry_advice() {
        for (kind, class) in [
            // Checked by kind: the client would reconnect and retry.
            (ErrorKind::AuthenticationFailed, FaultClass::Auth),
            // Settings and types retrying cannot fix.
            (ErrorKind::InvalidClientConfig, FaultClass::Permanent),
            (ErrorKind::Client, FaultClass::Permanent),
            (ErrorKind::UnexpectedReturnType, FaultClass::Permanent),
            (ErrorKind::RESP3NotSupported, FaultClass::Permanent),
            (ErrorKind::EmptySentinelList, FaultClass::Permanent),
            (ErrorKind::Extension, FaultClass::Permanent),
            // What a fresh connection or a moment fixes.
            (ErrorKind::Parse, FaultClass::Transient),
            (
                ErrorKind::MasterNameNotFoundBySentinel,
                FaultClass::Transient,
            ),
            (
                ErrorKind::NoValidReplicasFoundBySentinel,
                FaultClass::Transient,
            ),
            (ErrorKind::ClusterConnectionNotFound, FaultClass::Transient),
        ] {
            let err = RedisError::from((kind, "client-side"));
            assert_eq!(err.code(), None, "{kind:?}");
            assert_eq!(classify(&err), class, "{kind:?}");
        }
    }

    /// What servers that are not Redis answer to a command, as the
    /// `redis` crate's own parser fails on it.
    const NOT_REDIS_ANSWERS: &[&[u8]] = &[
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        // A TLS alert, from a port that speaks TLS.
        b"\x15\x03\x03\x00\x02\x02\x46",
        b"<html>\r\n",
    ];

    #[test]
    fn a_server_that_is_not_redis_is_permanent_and_told_apart() {
        for answer in NOT_REDIS_ANSWERS {
            let err = match redis::parse_redis_value(answer) {
                Err(err) => err,
                Ok(value) => panic!("{answer:?} parsed as {value:?}"),
            };
            assert!(not_redis(&err), "{answer:?}: {err:?}");
            assert_eq!(classify(&err), FaultClass::Permanent, "{answer:?}");
        }
        // A well-formed reply of another type than asked is a parse error
        // of the same kind, but no sign of another server: unchanged.
        let conversion = RedisError::from(
            redis::from_redis_value::<i64>(redis::Value::BulkString(b"x".to_vec())).unwrap_err(),
        );
        assert_eq!(conversion.kind(), ErrorKind::Parse);
        assert!(!not_redis(&conversion), "{conversion:?}");
        assert_eq!(classify(&conversion), FaultClass::Transient);
        // Nor are the others.
        for err in [
            RedisError::from(io::Error::from(io::ErrorKind::ConnectionReset)),
            RedisError::from((ErrorKind::Parse, "client-side")),
            server_error("ERR unknown command 'XREAD'"),
        ] {
            assert!(!not_redis(&err), "{err:?}");
        }
    }
}
