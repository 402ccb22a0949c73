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
        Some(errors) => errors
            .iter()
            .map(|(_, error)| classify_code(error.code()))
            .find(|class| *class != FaultClass::Transient)
            .unwrap_or(FaultClass::Transient),
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
            return redis.is_io_error()
                || redis.is_connection_dropped()
                || redis.is_connection_refusal()
                || redis.code() == Some("LOADING");
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
        // As for the client's connections (see `classify`); told by the
        // first answer of a fresh connection only, so that a reply our own
        // parser cannot read on a connection that spoke RESP stays
        // transient.
        ReadError::Unsupported(_) | ReadError::NotRedis { .. } => FaultClass::Permanent,
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

    /// Every code the classifier knows, with its class and a reply Redis
    /// sends with it.
    const CODES: &[(&str, FaultClass, &str)] = &[
        ("LOADING", FaultClass::Transient, "LOADING Redis is loading the dataset in memory"),
        ("READONLY", FaultClass::Transient, "READONLY You can't write against a read only replica."),
        ("MASTERDOWN", FaultClass::Transient, "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        ("TRYAGAIN", FaultClass::Transient, "TRYAGAIN Multiple keys request during rehashing of slot"),
        ("CLUSTERDOWN", FaultClass::Transient, "CLUSTERDOWN The cluster is down"),
        ("BUSY", FaultClass::Transient, "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."),
        ("UNBLOCKED", FaultClass::Transient, "UNBLOCKED client unblocked via CLIENT UNBLOCK"),
        ("OOM", FaultClass::Transient, "OOM command not allowed when used memory > 'maxmemory'."),
        ("MISCONF", FaultClass::Transient, "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk."),
        ("NOREPLICAS", FaultClass::Transient, "NOREPLICAS Not enough good replicas to write."),
        ("WRONGTYPE", FaultClass::WrongType, "WRONGTYPE Operation against a key holding the wrong kind of value"),
        ("NOAUTH", FaultClass::Auth, "NOAUTH Authentication required."),
        ("WRONGPASS", FaultClass::Auth, "WRONGPASS invalid username-password pair or user is disabled."),
        ("NOPERM", FaultClass::Auth, "NOPERM this user has no permissions to run the 'xread' command"),
        ("ERR", FaultClass::Permanent, "ERR unknown command 'XREAD'"),
        ("EXECABORT", FaultClass::Permanent, "EXECABORT Transaction discarded because of previous errors."),
        ("NOSCRIPT", FaultClass::Permanent, "NOSCRIPT No matching script. Please use EVAL."),
        ("CROSSSLOT", FaultClass::Permanent, "CROSSSLOT Keys in request don't hash to the same slot"),
    ];

    #[test]
    fn every_code_is_classified_as_a_code_and_as_a_server_reply() {
        for (code, class, line) in CODES {
            assert_eq!(classify_code(code), *class, "code {code}");
            let err = server_error(line);
            assert_eq!(err.code(), Some(*code), "{line}");
            assert_eq!(classify(&err), *class, "reply {line}");
            let read = ReadError::Server(ServerReplyError {
                code: (*code).to_owned(),
                message: (*line).to_owned(),
            });
            assert_eq!(classify_read(&read), *class, "read reply {line}");
        }
    }

    #[test]
    fn both_lists_of_passing_codes_are_transient() {
        for code in CHANGING_STATE_CODES.iter().chain(WRITE_REFUSAL_CODES) {
            assert_eq!(classify_code(code), FaultClass::Transient, "{code}");
            assert!(
                CODES.iter().any(|(known, ..)| known == code),
                "{code} untested"
            );
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
        for (code, _, line) in CODES {
            let expected = WRITE_REFUSAL_CODES.contains(code).then_some(*code);
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
    fn tls_failures_are_their_own_class() {
        let handshake = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            )
        };
        // An I/O error too: the TLS check comes first.
        let err = RedisError::from(handshake());
        assert!(err.is_io_error());
        assert_eq!(classify(&err), FaultClass::Tls);
        assert_eq!(classify_read(&ReadError::Io(handshake())), FaultClass::Tls);
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

    #[test]
    fn reading_connection_failures_are_classified() {
        assert_eq!(
            classify_read(&ReadError::NotRedis {
                answered: "HTTP/1.1 400 Bad Request".into()
            }),
            FaultClass::Permanent
        );
        assert_eq!(
            classify_read(&ReadError::Timeout(Duration::from_secs(1))),
            FaultClass::Transient
        );
        assert_eq!(
            classify_read(&ReadError::Protocol(ProtocolError("garbage".into()))),
            FaultClass::Transient
        );
        assert_eq!(
            classify_read(&ReadError::ReplyTooLarge {
                limit: 1,
                entries: 0,
                partial_entry_id: None,
            }),
            FaultClass::Transient
        );
        assert_eq!(
            classify_read(&ReadError::Unsupported("unix sockets over TLS".into())),
            FaultClass::Permanent
        );
    }
}
