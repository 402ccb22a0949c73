//! Connections for the one-shot subcommands, with errors a person can act on.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use lifecycle_domain::{KeyLayout, StreamOffsetStore};
use lifecycle_redis::{
    check_server_version, foreign_answer, open_endpoint, redact_url, server_address, ConnectError,
    RedisLobbyStore, RedisUserLifecycleConsumer, VersionError,
};
use lifecycle_streams::{
    classify, not_redis, ConnectionTimeouts, ConsumerConfig, FaultClass, RedisConnection,
    RedisEndpoint, TlsFiles, TlsSettings,
};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError};

use crate::cli::{InputError, RedisArgs, TlsArgs};

/// Where Redis is: its URL and, when certificate files were given, the TLS
/// settings they make.
#[derive(Clone)]
pub struct RedisTarget {
    /// The URL; holds the password, so print only [`redact_url`] of it.
    pub url: String,
    /// TLS settings from `--tls-*` files (`None`: none given; `rediss://`
    /// then trusts the system's store).
    pub tls: Option<TlsSettings>,
    /// For `redis+sentinel://`: the sentinels' own password, when it is not
    /// the URL's.
    pub sentinel_password: Option<String>,
    /// How the lobby's keys are named (the cluster layout for a cluster URL
    /// unless the flags say otherwise, which is refused).
    pub key_layout: KeyLayout,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &redact_url(&self.url))
            .field("tls", &self.tls)
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "***"),
            )
            .field("key_layout", &self.key_layout)
            .finish()
    }
}

impl RedisTarget {
    /// The target the common flags describe, its certificate files loaded.
    pub fn from_args(args: &RedisArgs) -> anyhow::Result<Self> {
        let mut target = Self::new(&args.redis_url, &args.tls)?;
        target.sentinel_password = args.sentinel_password.clone();
        if target.key_layout == KeyLayout::Cluster && args.key_layout == KeyLayout::Plain {
            return Err(InputError(format!(
                "{} is a Redis Cluster, where the plain key layout cannot work (a cascade's keys would lie in many slots): give --key-layout cluster (LOBBY_KEY_LAYOUT=cluster, or key_layout = \"cluster\" in the configuration file)",
                redact_url(&target.url)
            ))
            .into());
        }
        target.key_layout = args.key_layout;
        if target.sentinel_password.is_some() && !lifecycle_redis::is_sentinel_url(&target.url) {
            return Err(InputError(
                "--sentinel-password (LOBBY_SENTINEL_PASSWORD) is for redis+sentinel:// URLs only"
                    .into(),
            )
            .into());
        }
        Ok(target)
    }

    /// `url` with the certificate files of `tls` loaded. A URL the client
    /// would misread and unusable certificate files are input errors (exit
    /// status 2), whose messages never hold a password.
    pub fn new(url: &str, tls: &TlsArgs) -> anyhow::Result<Self> {
        let files = TlsFiles {
            ca_file: tls.tls_ca_file.clone(),
            cert_file: tls.tls_cert_file.clone(),
            key_file: tls.tls_key_file.clone(),
        };
        let tls = if files == TlsFiles::default() {
            None
        } else {
            Some(TlsSettings::load(&files).map_err(|err| {
                InputError(format!(
                    "invalid TLS settings (--tls-ca-file, --tls-cert-file, --tls-key-file): {err}"
                ))
            })?)
        };
        let target = Self {
            url: url.to_owned(),
            tls,
            sentinel_password: None,
            key_layout: layout_of(url),
        };
        // A malformed URL, or certificate files with redis://, fail here.
        target.open().map_err(|err| InputError(err.to_string()))?;
        Ok(target)
    }

    /// A user-lifecycle consumer of this target, its stream reader using the
    /// target's TLS settings.
    pub fn consumer(
        &self,
        offsets: Arc<dyn StreamOffsetStore>,
        config: ConsumerConfig,
    ) -> anyhow::Result<RedisUserLifecycleConsumer> {
        let consumer = RedisUserLifecycleConsumer::new(self.endpoint()?, offsets, config)?;
        Ok(match &self.tls {
            Some(tls) => consumer.with_tls(tls.clone()),
            None => consumer,
        })
    }

    /// The lobby store under `prefix`, its keys in the target's layout.
    pub fn lobby_store(&self, prefix: &str) -> anyhow::Result<RedisLobbyStore> {
        Ok(RedisLobbyStore::new(self.endpoint()?, prefix)
            .context("cannot set up the lobby store")?
            .with_key_layout(self.key_layout))
    }

    /// Where the target is: one server, a Sentinel-managed master or a
    /// cluster; nothing is connected yet.
    pub fn endpoint(&self) -> anyhow::Result<RedisEndpoint> {
        Ok(self.open()?)
    }

    /// A client for the server to use now: the URL's, or the master the
    /// sentinels name (asking them).
    pub async fn client(&self) -> anyhow::Result<redis::Client> {
        let endpoint = self.endpoint()?;
        endpoint
            .client()
            .await
            .map_err(|err| explain(&self.url, "find the master", &err))
    }

    /// A client for the server that holds `key` now (on a cluster: the
    /// master of its slot).
    pub async fn client_for_key(&self, key: &str) -> anyhow::Result<redis::Client> {
        self.endpoint()?
            .client_for_key(key.as_bytes())
            .await
            .map_err(|err| explain(&self.url, "find the server of the stream", &err))
    }

    fn open(&self) -> Result<RedisEndpoint, ConnectError> {
        open_endpoint(
            &self.url,
            self.tls.as_ref(),
            self.sentinel_password.as_deref(),
        )
    }
}

/// The key layout a URL needs: the cluster layout for a cluster, else the
/// plain one (for the commands that use keys of their own: `bench`,
/// `demo`).
pub fn layout_of(url: &str) -> KeyLayout {
    if lifecycle_redis::is_cluster_url(url) {
        KeyLayout::Cluster
    } else {
        KeyLayout::Plain
    }
}

/// Connects to `target` once and checks that it is Redis
/// [`lifecycle_redis::MIN_REDIS_VERSION`] or later, failing with a line
/// that says what to do. To a cluster: the cluster client, checked on the
/// master of the empty key's slot.
pub async fn connect(target: &RedisTarget) -> anyhow::Result<RedisConnection> {
    let url = target.url.as_str();
    let client = target.client().await?;
    let mut conn = connect_to(&client, url).await?;
    let endpoint = target.endpoint()?;
    if !endpoint.is_cluster() && lifecycle_redis::is_cluster_node(&mut conn).await {
        return Err(cluster_node_error(url));
    }
    if endpoint.is_cluster() {
        return endpoint
            .connection(ConnectionTimeouts {
                connect: Duration::from_secs(5),
                response: Duration::from_secs(10),
                min_reconnect_delay: None,
            })
            .map_err(|err| explain(url, "connect", &err));
    }
    Ok(RedisConnection::Multiplexed(conn))
}

/// A connection to each master of `target` (one, unless it is a cluster),
/// for what each server answers for itself: `INFO`, `SLOWLOG`, `CONFIG`.
pub async fn connect_masters(target: &RedisTarget) -> anyhow::Result<Vec<RedisConnection>> {
    let url = target.url.as_str();
    let masters = target
        .endpoint()?
        .masters()
        .await
        .map_err(|err| explain(url, "find the masters", &err))?;
    let mut conns = Vec::with_capacity(masters.len());
    for master in masters {
        conns.push(RedisConnection::Multiplexed(
            connect_to(&master, url).await?,
        ));
    }
    Ok(conns)
}

/// The error for a URL that names one node of a Redis Cluster as if it
/// were a standalone server.
pub fn cluster_node_error(url: &str) -> anyhow::Error {
    anyhow!(
        "the Redis at {} is a node of a Redis Cluster: name the cluster with a redis+cluster:// URL (its nodes as seeds) and give --key-layout cluster (LOBBY_KEY_LAYOUT=cluster)",
        redact_url(url)
    )
}

/// Connects to the one server `client` names, checking its version.
pub async fn connect_to(
    client: &redis::Client,
    url: &str,
) -> anyhow::Result<MultiplexedConnection> {
    let settings = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    let mut conn = match client
        .get_multiplexed_async_connection_with_config(&settings)
        .await
    {
        Ok(conn) => conn,
        Err(err) => return Err(connect_failed(client, url, &err).await),
    };
    // A connection can open without a password and fail at the first command.
    if let Err(err) = redis::cmd("PING").query_async::<()>(&mut conn).await {
        return Err(connect_failed(client, url, &err).await);
    }
    match check_server_version(&mut conn, &server_address(client)).await {
        Ok(_) => Ok(conn),
        Err(VersionError::Redis { source, .. }) => Err(explain(url, "connect", &source)),
        Err(VersionError::NotRedis { .. }) => Err(not_redis_error(client).await),
        Err(err) => Err(err.into()),
    }
}

/// The error for a failure to connect to `client` (whose URL is `url`).
async fn connect_failed(client: &redis::Client, url: &str, err: &RedisError) -> anyhow::Error {
    if not_redis(err) {
        not_redis_error(client).await
    } else {
        explain(url, "connect", err)
    }
}

/// The error for a server at `client`'s address that does not speak the
/// Redis protocol, quoting what it answers when that can be read.
async fn not_redis_error(client: &redis::Client) -> anyhow::Error {
    anyhow!(
        "cannot connect: {}",
        VersionError::NotRedis {
            at: server_address(client),
            answered: foreign_answer(client).await,
        }
    )
}

/// Turns a Redis failure into an error that says what to fix.
pub fn explain(url: &str, action: &str, err: &RedisError) -> anyhow::Error {
    let shown = redact_url(url);
    if not_redis(err) {
        // Where it connected, without the URL's credentials.
        let at = url
            .into_connection_info()
            .map_or(shown, |info| info.addr().to_string());
        return anyhow!(
            "cannot {action}: the server at {at} is not a Redis server (it answered in another protocol): is --redis-url (REDIS_URL) a Redis port? (a port that speaks TLS needs rediss://)"
        );
    }
    match classify(err) {
        FaultClass::Transient if err.is_connection_refusal() => anyhow!(
            "cannot {action}: Redis at {shown} refused the connection; start Redis or point --redis-url (REDIS_URL) at it"
        ),
        FaultClass::Transient => anyhow!(
            "cannot {action}: Redis at {shown} is unreachable ({err}); check that it runs and that --redis-url (REDIS_URL) is right (rediss:// for a port that speaks TLS, redis:// for one that does not)"
        ),
        FaultClass::Auth => anyhow!(
            "cannot {action}: Redis at {shown} refused access ({err}); check the user name and password in --redis-url (REDIS_URL)"
        ),
        FaultClass::Tls => anyhow!(
            "cannot {action}: the TLS handshake with Redis at {shown} failed ({err}); check that the port speaks TLS, that --tls-ca-file (LOBBY_TLS_CA_FILE) holds the CA that signed the server's certificate for that host, and give --tls-cert-file and --tls-key-file if the server asks for a client certificate"
        ),
        FaultClass::WrongType => anyhow!(
            "cannot {action}: a key holds a value of the wrong type ({err}); check --stream and --key-prefix"
        ),
        FaultClass::Permanent => anyhow!("cannot {action}: Redis at {shown} answered: {err}"),
    }
}

/// Adds the redacted URL to a store error's context.
pub fn with_url<T, E>(result: Result<T, E>, url: &str) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    result.with_context(|| format!("Redis at {}", redact_url(url)))
}

/// Deletes every key matching `pattern` (a `SCAN MATCH` glob) on every
/// master of `target` (a cluster's keys are spread over them), a page at a
/// time; `action` names the work in errors.
pub async fn delete_matching(
    target: &RedisTarget,
    pattern: &str,
    action: &str,
) -> anyhow::Result<()> {
    let url = target.url.as_str();
    let masters = target
        .endpoint()?
        .masters()
        .await
        .map_err(|err| explain(url, action, &err))?;
    for master in masters {
        let mut conn = connect_to(&master, url).await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut conn)
                .await
                .map_err(|err| explain(url, action, &err))?;
            if !keys.is_empty() {
                // One key per command: a cluster node refuses a command
                // over keys of several slots.
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("UNLINK").arg(key).ignore();
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|err| explain(url, action, &err))?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}
