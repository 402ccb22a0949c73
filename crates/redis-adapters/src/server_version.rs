//! The server's version, the oldest Redis the worker runs against, and
//! telling a server that is not Redis at all.
//!
//! The worker needs Redis 7.0: its checks for entries removed before they
//! were handled (the engine's deletion probe, `status`) read `XINFO
//! STREAM`'s `entries-added`, `max-deleted-entry-id` and
//! `recorded-first-entry-id`, which 7.0 added. On 6.2 those fields are
//! missing and the checks would quietly see nothing. Nothing else it sends
//! is newer: `XREAD`, `XRANGE`/`XREVRANGE`, `XADD`, `XINFO STREAM` itself,
//! `EVAL`/`EVALSHA` with `redis.pcall`, `UNLINK`, `HSET` with several
//! fields, `SCAN ... MATCH`, `INFO server`, `INFO memory`.

use std::fmt;
use std::time::Duration;

use lifecycle_streams::{not_redis, quote_answer};
use redis::aio::ConnectionLike;
use redis::{AsyncConnectionConfig, ConnectionAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::connect::server_address;

/// The oldest Redis release the worker runs against, as people write it.
pub const MIN_REDIS_VERSION: &str = "7.0";

/// [`MIN_REDIS_VERSION`] as (major, minor).
const MIN_VERSION: (u32, u32) = (7, 0);

/// How long the check may take to connect, and to get an answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A server's version, from `INFO server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerVersion {
    /// `redis_version` as (major, minor, patch): the Redis release the
    /// server is, or whose commands it implements (Valkey 8 says 7.2.4).
    pub redis: (u32, u32, u32),
    /// `redis_version` as the server wrote it.
    pub redis_text: String,
    /// For a server that is another product, its name and own version
    /// (`Valkey 8.0.1`).
    pub product: Option<String>,
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.product {
            Some(product) => write!(f, "{product} (redis_version {})", self.redis_text),
            None => f.write_str(&self.redis_text),
        }
    }
}

/// What `INFO server` says of whether the worker can run against a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionVerdict {
    /// At least [`MIN_REDIS_VERSION`].
    Supported(ServerVersion),
    /// Older than [`MIN_REDIS_VERSION`].
    TooOld(ServerVersion),
    /// No version could be read from it (why); not held against the
    /// server.
    Unknown(String),
}

/// Judges the text of `INFO server` (or of all of `INFO`).
pub fn judge_info(info: &str) -> VersionVerdict {
    let field = |name: &str| {
        info.lines().find_map(|line| {
            let (key, value) = line.trim_end_matches('\r').split_once(':')?;
            (key == name).then(|| value.trim().to_owned())
        })
    };
    let Some(text) = field("redis_version") else {
        return VersionVerdict::Unknown("INFO server has no redis_version".into());
    };
    let Some(redis) = parse_version(&text) else {
        return VersionVerdict::Unknown(format!(
            "redis_version {:?} is not a version",
            quote_answer(text.as_bytes())
        ));
    };
    let product = [
        ("valkey_version", "Valkey"),
        ("dragonfly_version", "Dragonfly"),
    ]
    .into_iter()
    .find_map(|(name, product)| field(name).map(|version| format!("{product} {version}")));
    let version = ServerVersion {
        redis,
        redis_text: text,
        product,
    };
    if (version.redis.0, version.redis.1) >= MIN_VERSION {
        VersionVerdict::Supported(version)
    } else {
        VersionVerdict::TooOld(version)
    }
}

/// `major.minor[.patch][suffix]` as numbers; `None` when the major or minor
/// part has no digits.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.split('.').map(|part| {
        let digits = part.get(
            ..part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len()),
        )?;
        digits.parse::<u32>().ok()
    });
    let major = parts.next().flatten()?;
    let minor = parts.next().flatten()?;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Why the version check failed.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    /// The server is older than [`MIN_REDIS_VERSION`].
    #[error("Redis at {at} is {found}; lobby-worker needs {MIN_REDIS_VERSION} or later (its checks for entries removed before they were handled read XINFO STREAM's entries-added and max-deleted-entry-id, new in 7.0)")]
    TooOld {
        /// Where the server is (`host:port` or a socket's path).
        at: String,
        /// What it reported.
        found: ServerVersion,
    },
    /// The server does not speak the Redis protocol.
    #[error("the server at {at} is not a Redis server ({}): is this a Redis port? (a port that speaks TLS needs rediss://)", answered.as_ref().map_or_else(|| "it answered in another protocol".to_owned(), |answer| format!("it answered {answer:?}")))]
    NotRedis {
        /// Where the server is.
        at: String,
        /// The start of its answer to a `PING`, when it could be read.
        answered: Option<String>,
    },
    /// Connecting or asking failed otherwise.
    #[error("cannot read the version of Redis at {at}: {source}")]
    Redis {
        /// Where the server is.
        at: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

impl VersionError {
    /// Whether waiting may fix it: the server could not be reached (a
    /// Redis that is not up yet), as opposed to the wrong server, one too
    /// old, or credentials it refuses.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis { source, .. } => {
                lifecycle_streams::classify(source) == lifecycle_streams::FaultClass::Transient
            }
            Self::TooOld { .. } | Self::NotRedis { .. } => false,
        }
    }
}

/// Reads `INFO server` on `conn` and refuses a server older than
/// [`MIN_REDIS_VERSION`]; `at` names the server in messages (see
/// [`server_address`]).
///
/// `Ok(None)` when the version cannot be told: the user's ACL forbids
/// `INFO` or the command was renamed (the worker needs neither), or the
/// answer has no readable `redis_version` (a warning is logged). Such a
/// server is not held back.
///
/// # Errors
///
/// [`VersionError::TooOld`]; [`VersionError::NotRedis`] when the answer is
/// not RESP; [`VersionError::Redis`] for any other failure (unreachable,
/// credentials refused), which [`VersionError::is_transient`] classifies.
pub async fn check_server_version<C: ConnectionLike + Send>(
    conn: &mut C,
    at: &str,
) -> Result<Option<ServerVersion>, VersionError> {
    let info = redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(conn)
        .await;
    let info = match info {
        Ok(info) => info,
        Err(err) if not_redis(&err) => {
            return Err(VersionError::NotRedis {
                at: at.to_owned(),
                answered: None,
            })
        }
        Err(err) if matches!(err.code(), Some("NOPERM" | "ERR")) => {
            tracing::debug!(at, err = %err, "INFO refused; the Redis version is not checked");
            return Ok(None);
        }
        Err(source) => {
            return Err(VersionError::Redis {
                at: at.to_owned(),
                source,
            })
        }
    };
    match judge_info(&info) {
        VersionVerdict::Supported(version) => Ok(Some(version)),
        VersionVerdict::TooOld(found) => Err(VersionError::TooOld {
            at: at.to_owned(),
            found,
        }),
        VersionVerdict::Unknown(why) => {
            tracing::warn!(
                at,
                why = %why,
                needs = MIN_REDIS_VERSION,
                "cannot tell the Redis version; going on"
            );
            Ok(None)
        }
    }
}

/// What the start-up check found of a server that answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCheck {
    /// Its version (`None`: `INFO` refused or unreadable).
    pub version: Option<ServerVersion>,
    /// Its `maxmemory-policy` when that may evict keys (see
    /// [`read_evicting_policy`](crate::read_evicting_policy)).
    pub evicting_policy: Option<String>,
    /// Whether it is a node of a Redis Cluster (see [`is_cluster_node`]).
    pub cluster_node: bool,
}

/// Whether the server `conn` reaches runs in cluster mode (`INFO cluster`
/// says `cluster_enabled:1`); `false` when it does not say.
pub async fn is_cluster_node<C: ConnectionLike + Send>(conn: &mut C) -> bool {
    redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(conn)
        .await
        .is_ok_and(|info| info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}

/// Connects to `client`'s server once and, on that one connection, runs
/// [`check_server_version`] and reads whether its memory policy may evict
/// keys; for a start-up check.
///
/// # Errors
///
/// As [`check_server_version`]; [`VersionError::NotRedis`] quotes the
/// start of what the server answered when it can be read (see
/// [`foreign_answer`]).
pub async fn verify_server(client: &redis::Client) -> Result<ServerCheck, VersionError> {
    let at = server_address(client);
    let settings = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CHECK_TIMEOUT))
        .set_response_timeout(Some(CHECK_TIMEOUT));
    let checked = match client
        .get_multiplexed_async_connection_with_config(&settings)
        .await
    {
        Ok(mut conn) => match check_server_version(&mut conn, &at).await {
            Ok(version) => Ok(ServerCheck {
                version,
                evicting_policy: crate::read_evicting_policy(&mut conn, &at).await,
                cluster_node: is_cluster_node(&mut conn).await,
            }),
            Err(err) => Err(err),
        },
        Err(err) if not_redis(&err) => Err(VersionError::NotRedis {
            at: at.clone(),
            answered: None,
        }),
        Err(source) => Err(VersionError::Redis {
            at: at.clone(),
            source,
        }),
    };
    match checked {
        Err(VersionError::NotRedis { at, answered: None }) => Err(VersionError::NotRedis {
            answered: foreign_answer(client).await,
            at,
        }),
        other => other,
    }
}

/// What the server of `client` answers to a plain `PING`: the start of its
/// first line, printable characters only, for telling a person which
/// server the URL reaches when it is not Redis. `None` when nothing could
/// be read, or the URL asks for TLS (not tried).
pub async fn foreign_answer(client: &redis::Client) -> Option<String> {
    let asked = async {
        match client.get_connection_info().addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .ok()?;
                first_line(stream).await
            }
            ConnectionAddr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.ok()?;
                first_line(stream).await
            }
            _ => None,
        }
    };
    tokio::time::timeout(CHECK_TIMEOUT, asked)
        .await
        .ok()
        .flatten()
}

/// Sends `PING` on `stream` and reads the first line of the answer.
async fn first_line<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Option<String> {
    stream.write_all(b"PING\r\n").await.ok()?;
    let mut buf = [0_u8; 256];
    let len = stream.read(&mut buf).await.ok()?;
    let line = quote_answer(buf.get(..len)?);
    (!line.is_empty()).then_some(line)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use lifecycle_test_support::RedisServer;

    fn info(lines: &[&str]) -> String {
        let mut text = String::from("# Server\r\n");
        for line in lines {
            text.push_str(line);
            text.push_str("\r\n");
        }
        text
    }

    fn version(redis: (u32, u32, u32), text: &str, product: Option<&str>) -> ServerVersion {
        ServerVersion {
            redis,
            redis_text: text.into(),
            product: product.map(str::to_owned),
        }
    }

    #[test]
    fn versions_are_judged_against_the_minimum() {
        use VersionVerdict::{Supported, TooOld};
        for (lines, verdict) in [
            (
                vec!["redis_version:6.2.14", "redis_mode:standalone"],
                TooOld(version((6, 2, 14), "6.2.14", None)),
            ),
            (
                vec!["redis_version:6.0.20"],
                TooOld(version((6, 0, 20), "6.0.20", None)),
            ),
            (
                vec!["redis_version:5.0.7"],
                TooOld(version((5, 0, 7), "5.0.7", None)),
            ),
            (
                vec!["redis_version:7.0.15", "gcc_version:12.2.0"],
                Supported(version((7, 0, 15), "7.0.15", None)),
            ),
            (
                vec!["redis_version:7.0.0"],
                Supported(version((7, 0, 0), "7.0.0", None)),
            ),
            (
                vec!["redis_version:7.2.4"],
                Supported(version((7, 2, 4), "7.2.4", None)),
            ),
            (
                vec!["redis_version:8.0.0"],
                Supported(version((8, 0, 0), "8.0.0", None)),
            ),
            (
                vec!["redis_version:7.9.240", "redis_git_sha1:00000000"],
                Supported(version((7, 9, 240), "7.9.240", None)),
            ),
            // An unstable build.
            (
                vec!["redis_version:255.255.255"],
                Supported(version((255, 255, 255), "255.255.255", None)),
            ),
            (
                vec!["redis_version:7.2.0-rc1"],
                Supported(version((7, 2, 0), "7.2.0-rc1", None)),
            ),
            (
                vec!["redis_version:7.0"],
                Supported(version((7, 0, 0), "7.0", None)),
            ),
            // Valkey reports the Redis version it is compatible with, and
            // its own.
            (
                vec![
                    "redis_version:7.2.4",
                    "server_name:valkey",
                    "valkey_version:8.0.1",
                ],
                Supported(version((7, 2, 4), "7.2.4", Some("Valkey 8.0.1"))),
            ),
            (
                vec!["redis_version:6.2.4", "dragonfly_version:df-v0.1"],
                TooOld(version((6, 2, 4), "6.2.4", Some("Dragonfly df-v0.1"))),
            ),
        ] {
            assert_eq!(judge_info(&info(&lines)), verdict, "{lines:?}");
        }
    }

    #[test]
    fn garbage_is_unknown_not_refused() {
        for lines in [
            vec![],
            vec!["redis_version:"],
            vec!["redis_version:garbage"],
            vec!["redis_version:7"],
            vec!["redis_version:.1.2"],
            vec!["redis_version:\u{1b}[31mred"],
            vec!["redis_versions:7.0.0"],
            vec!["valkey_version:8.0.1"],
        ] {
            match judge_info(&info(&lines)) {
                VersionVerdict::Unknown(why) => {
                    assert!(!why.contains('\u{1b}'), "{why}");
                }
                other => panic!("{lines:?}: {other:?}"),
            }
        }
        assert!(matches!(
            judge_info("no lines at all"),
            VersionVerdict::Unknown(_)
        ));
    }

    #[test]
    fn the_refusal_is_one_line_naming_both_versions() {
        let err = VersionError::TooOld {
            at: "127.0.0.1:6379".into(),
            found: version((6, 2, 6), "6.2.6", None),
        }
        .to_string();
        assert!(
            err.starts_with("Redis at 127.0.0.1:6379 is 6.2.6; lobby-worker needs 7.0 or later"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let valkey = version((7, 2, 4), "7.2.4", Some("Valkey 8.0.1")).to_string();
        assert_eq!(valkey, "Valkey 8.0.1 (redis_version 7.2.4)");
        let not_redis = VersionError::NotRedis {
            at: "127.0.0.1:80".into(),
            answered: Some("HTTP/1.1 400 Bad Request".into()),
        }
        .to_string();
        assert!(
            not_redis.starts_with(
                "the server at 127.0.0.1:80 is not a Redis server (it answered \"HTTP/1.1 400 Bad Request\")"
            ),
            "{not_redis}"
        );
        assert_eq!(
            MIN_VERSION,
            parse_version(MIN_REDIS_VERSION)
                .map(|(a, b, _)| (a, b))
                .unwrap()
        );
    }

    #[tokio::test]
    async fn a_real_redis_passes_with_its_version() {
        let server = RedisServer::start();
        let client = crate::open_client(&server.url()).unwrap();
        let found = verify_server(&client).await.unwrap().version.unwrap();
        assert!((found.redis.0, found.redis.1) >= MIN_VERSION, "{found}");
    }

    #[tokio::test]
    async fn a_redis_that_is_not_up_is_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = crate::open_client(&format!("redis://127.0.0.1:{port}")).unwrap();
        let err = verify_server(&client).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[tokio::test]
    async fn a_server_answering_http_is_named_not_redis() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for mut stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = stream.read(&mut [0_u8; 1024]);
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            }
        });
        let client = crate::open_client(&format!("redis://127.0.0.1:{port}")).unwrap();
        let err = verify_server(&client).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "the server at 127.0.0.1:{port} is not a Redis server (it answered \"HTTP/1.1 400 Bad Request\")"
            )),
            "{text}"
        );
    }
}
