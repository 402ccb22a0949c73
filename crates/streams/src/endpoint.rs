//! Where the worker's Redis is: one address, the master that Redis
//! Sentinel names (found again after every failover by each connection the
//! worker holds), or a Redis Cluster.
//!
//! A connection to a cluster is the `redis` crate's: it keeps the cluster's
//! slot map, sends each command to the master of its key's slot, follows
//! `MOVED` and `ASK`, and refreshes the map after a failover. The stream
//! reader, which has a socket of its own, asks which node owns the stream's
//! slot ([`ClusterNodes::owner_of`]) each time it connects; a `MOVED`
//! reply drops its connection, and the next one goes to the new owner.
//!
//! A [`RedisConnection`] to a Sentinel-managed master asks the sentinels for
//! the master when it first connects, and again after a call fails in a way
//! that says the master moved or went away: the socket failed, or the server
//! answered `READONLY` (it was demoted to a replica), `MASTERDOWN` or
//! `LOADING`. The call that met the fault still fails, as a standalone
//! connection's would: the caller's back-off decides when to retry, and the
//! retry goes to the master the sentinels name by then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::sync::Mutex;

/// Where Redis is.
// Made a handful of times per process: the size of the direct variant
// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RedisEndpoint {
    /// One server at a fixed address (`redis://`, `rediss://`, a Unix socket).
    Direct(redis::Client),
    /// The master of a Sentinel-managed group (`redis+sentinel://`).
    Sentinel(Arc<SentinelMaster>),
    /// The nodes of a Redis Cluster (`redis+cluster://`).
    Cluster(Arc<ClusterNodes>),
}

impl std::fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl From<redis::Client> for RedisEndpoint {
    fn from(client: redis::Client) -> Self {
        Self::Direct(client)
    }
}

impl From<SentinelMaster> for RedisEndpoint {
    fn from(master: SentinelMaster) -> Self {
        Self::Sentinel(Arc::new(master))
    }
}

/// The master a group of sentinels names: how to ask them, and what to call
/// it in messages.
pub struct SentinelMaster {
    /// Asks the sentinels; one question at a time (it keeps their
    /// connections).
    sentinels: Mutex<SentinelClient>,
    /// The master's name (`MASTER_NAME` in the URL).
    name: String,
    /// The sentinels' addresses, for messages.
    addresses: String,
    /// The database selected on the master.
    db: i64,
    /// How long finding the master may take.
    timeout: Duration,
}

impl SentinelMaster {
    /// The master named `name` that `sentinels` (reachable at `addresses`,
    /// as shown in messages) know, its connections selecting `db`; finding
    /// it may take `timeout` at most.
    pub fn new(
        sentinels: SentinelClient,
        name: impl Into<String>,
        addresses: impl Into<String>,
        db: i64,
        timeout: Duration,
    ) -> Self {
        Self {
            sentinels: Mutex::new(sentinels),
            name: name.into(),
            addresses: addresses.into(),
            db,
            timeout,
        }
    }

    /// A client for the master the sentinels name now (checked to be a
    /// master by asking it its role).
    pub async fn client(&self) -> RedisResult<redis::Client> {
        let mut sentinels = self.sentinels.lock().await;
        match tokio::time::timeout(self.timeout, sentinels.async_get_client()).await {
            Ok(found) => found,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the sentinels at {} did not name the master {:?} within {:?}",
                    self.addresses, self.name, self.timeout
                ),
            ))),
        }
    }

    /// The master's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl From<ClusterNodes> for RedisEndpoint {
    fn from(nodes: ClusterNodes) -> Self {
        Self::Cluster(Arc::new(nodes))
    }
}

/// A Redis Cluster: the client that routes commands over its nodes, and
/// what a connection to one node needs.
pub struct ClusterNodes {
    /// Routes each command to its key's node.
    client: ClusterClient,
    /// A seed node's settings: the credentials and TLS of a connection to
    /// any node, the address aside.
    node_info: ConnectionInfo,
    /// The seeds' addresses, for messages.
    addresses: String,
    /// A connection for finding a slot's owner, opened at first use.
    lookup: Mutex<Option<ClusterConnection>>,
    /// How long opening a connection and finding a slot's owner may take.
    timeout: Duration,
}

/// One range of slots and the address of the master that serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotOwner {
    /// The first slot of the range.
    pub first: u16,
    /// The last slot of the range (included).
    pub last: u16,
    /// The master's host, as the cluster announces it.
    pub host: String,
    /// The master's port.
    pub port: u16,
}

/// The masters of a `CLUSTER SLOTS` reply, by slot range; `None` when the
/// reply is not of that shape. An empty or null host (a node that does not
/// know its own address, or a cluster announcing none) is left empty, and
/// the seed's host is used for it.
pub fn parse_cluster_slots(reply: &Value) -> Option<Vec<SlotOwner>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let [Value::Int(first), Value::Int(last), Value::Array(master), ..] = parts.as_slice()
            else {
                return None;
            };
            let [host, Value::Int(port), ..] = master.as_slice() else {
                return None;
            };
            let host = match host {
                Value::BulkString(raw) => String::from_utf8(raw.clone()).ok()?,
                Value::SimpleString(text) => text.clone(),
                // `cluster-preferred-endpoint-type unknown-endpoint`.
                Value::Nil => String::new(),
                _ => return None,
            };
            Some(SlotOwner {
                first: u16::try_from(*first).ok()?,
                last: u16::try_from(*last).ok()?,
                host,
                port: u16::try_from(*port).ok()?,
            })
        })
        .collect()
}

impl ClusterNodes {
    /// The cluster `client` reaches, whose nodes take the credentials and
    /// TLS of `node_info`; `addresses` names the seeds in messages, and
    /// `timeout` bounds opening a connection and finding a slot's owner.
    pub fn new(
        client: ClusterClient,
        node_info: ConnectionInfo,
        addresses: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            node_info,
            addresses: addresses.into(),
            lookup: Mutex::new(None),
            timeout,
        }
    }

    /// A connection over the cluster, connecting at its first command.
    pub fn connection(&self, timeouts: ConnectionTimeouts) -> ClusterConnection {
        self.client.get_pending_async_connection_with_config(
            ClusterConfig::new()
                .set_connection_timeout(timeouts.connect)
                .set_response_timeout(timeouts.response),
        )
    }

    /// Sends `cmd` to some node, within the timeout.
    async fn ask(&self, cmd: &Cmd) -> RedisResult<Value> {
        let mut lookup = self.lookup.lock().await;
        let conn = lookup.get_or_insert_with(|| {
            self.connection(ConnectionTimeouts {
                connect: self.timeout,
                response: self.timeout,
                min_reconnect_delay: None,
            })
        });
        match tokio::time::timeout(self.timeout, cmd.query_async::<Value>(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                *lookup = None;
                Err(err)
            }
            Err(_) => {
                *lookup = None;
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the cluster at {} did not answer within {:?}",
                        self.addresses, self.timeout
                    ),
                )))
            }
        }
    }

    /// The masters and their slot ranges, as some node sees them now.
    pub async fn slot_owners(&self) -> RedisResult<Vec<SlotOwner>> {
        let reply = self.ask(redis::cmd("CLUSTER").arg("SLOTS")).await?;
        parse_cluster_slots(&reply).ok_or_else(|| unexpected("CLUSTER SLOTS", &reply))
    }

    /// A client for the master that serves `key`'s slot now.
    pub async fn owner_of(&self, key: &[u8]) -> RedisResult<redis::Client> {
        let reply = self
            .ask(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await?;
        let Value::Int(slot) = reply else {
            return Err(unexpected("CLUSTER KEYSLOT", &reply));
        };
        let owners = self.slot_owners().await?;
        let owner = owners
            .iter()
            .find(|owner| (i64::from(owner.first)..=i64::from(owner.last)).contains(&slot))
            .ok_or_else(|| {
                RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                    "no master serves the slot",
                    format!("slot {slot} of the cluster at {}", self.addresses),
                ))
            })?;
        self.node_client(owner)
    }

    /// A client for each master, as some node sees them now.
    pub async fn masters(&self) -> RedisResult<Vec<redis::Client>> {
        let mut owners = self.slot_owners().await?;
        owners.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        owners.dedup_by(|a, b| (&a.host, a.port) == (&b.host, b.port));
        owners.iter().map(|owner| self.node_client(owner)).collect()
    }

    /// A client for the node `owner` names, with the seeds' settings.
    fn node_client(&self, owner: &SlotOwner) -> RedisResult<redis::Client> {
        let host = if owner.host.is_empty() {
            // A node that does not know its own address: the seed's host.
            match self.node_info.addr() {
                ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
                _ => String::new(),
            }
        } else {
            owner.host.clone()
        };
        let addr = match self.node_info.addr().clone() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port: owner.port,
                insecure,
                tls_params,
            },
            _ => ConnectionAddr::Tcp(host, owner.port),
        };
        redis::Client::open(self.node_info.clone().set_addr(addr))
    }
}

fn unexpected(what: &str, reply: &Value) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "unexpected reply",
        format!("{what} answered {reply:?}"),
    ))
}

/// How long a connection may take to open, and a command to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// Opening a connection (and, through Sentinel, finding the master).
    pub connect: Duration,
    /// A command's answer.
    pub response: Duration,
    /// The shortest wait before reconnecting a standalone server's
    /// connection after a fault (`None`: the client's own).
    pub min_reconnect_delay: Option<Duration>,
}

impl RedisEndpoint {
    /// A client for the server to use now: the fixed one, or the master the
    /// sentinels name.
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Self::Direct(client) => Ok(client.clone()),
            Self::Sentinel(master) => master.client().await,
            Self::Cluster(nodes) => nodes.owner_of(b"").await,
        }
    }

    /// A client for the server that holds `key` now: the fixed one, the
    /// master the sentinels name, or the cluster's master of its slot.
    pub async fn client_for_key(&self, key: &[u8]) -> RedisResult<redis::Client> {
        match self {
            Self::Cluster(nodes) => nodes.owner_of(key).await,
            _ => self.client().await,
        }
    }

    /// A client for every master: the one server, the master the sentinels
    /// name, or each master of the cluster (for commands that each server
    /// answers for its own keys only: `SCAN`, `INFO`, `SLOWLOG`).
    pub async fn masters(&self) -> RedisResult<Vec<redis::Client>> {
        match self {
            Self::Cluster(nodes) => nodes.masters().await,
            _ => Ok(vec![self.client().await?]),
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Where it is, without credentials: `host:port`, a socket's path, or
    /// `master NAME via sentinels host:port,...`.
    pub fn describe(&self) -> String {
        match self {
            Self::Direct(client) => client.get_connection_info().addr().to_string(),
            Self::Sentinel(master) => format!(
                "master {:?} via the sentinels at {}",
                master.name, master.addresses
            ),
            Self::Cluster(nodes) => format!("the cluster at {}", nodes.addresses),
        }
    }

    /// A connection that connects at its first command and again after a
    /// fault; the call that met the fault still fails.
    pub fn connection(&self, timeouts: ConnectionTimeouts) -> RedisResult<RedisConnection> {
        match self {
            Self::Direct(client) => {
                let mut config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response))
                    .set_number_of_retries(1);
                if let Some(delay) = timeouts.min_reconnect_delay {
                    config = config.set_min_delay(delay);
                }
                Ok(RedisConnection::Direct(
                    ConnectionManager::new_lazy_with_config(client.clone(), config)?,
                ))
            }
            Self::Sentinel(master) => Ok(RedisConnection::Sentinel(Arc::new(FollowedMaster {
                master: Arc::clone(master),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response)),
                current: Mutex::new(Current::None),
                connections: AtomicU64::new(0),
            }))),
            Self::Cluster(nodes) => Ok(RedisConnection::Cluster(Arc::new(FollowedCluster {
                nodes: Arc::clone(nodes),
                timeouts,
                current: Mutex::new(None),
                connections: AtomicU64::new(0),
            }))),
        }
    }
}

/// A connection to the endpoint's server; clones share it.
#[derive(Clone)]
pub enum RedisConnection {
    /// To the fixed server, reconnecting in the background after a fault.
    Direct(ConnectionManager),
    /// To the master the sentinels name, found again after a fault.
    Sentinel(Arc<FollowedMaster>),
    /// To the nodes of a cluster, each command to its key's master; made
    /// anew after a fault that says the cluster changed.
    Cluster(Arc<FollowedCluster>),
    /// One connection already open to one server, not reopened after a
    /// fault (for one-shot commands).
    Multiplexed(MultiplexedConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(_) => f.write_str("RedisConnection::Direct"),
            Self::Sentinel(followed) => {
                write!(f, "RedisConnection::Sentinel({:?})", followed.master.name)
            }
            Self::Cluster(_) => f.write_str("RedisConnection::Cluster"),
            Self::Multiplexed(_) => f.write_str("RedisConnection::Multiplexed"),
        }
    }
}

/// The connection of a [`RedisConnection::Sentinel`].
pub struct FollowedMaster {
    master: Arc<SentinelMaster>,
    config: AsyncConnectionConfig,
    current: Mutex<Current>,
    /// How many connections were opened.
    connections: AtomicU64,
}

/// What a [`FollowedMaster`] holds.
enum Current {
    /// Nothing: the next command asks the sentinels.
    None,
    /// The connection in use, and its number.
    Connected(u64, MultiplexedConnection),
    /// Finding or reaching the master failed at this instant: commands
    /// waiting behind that attempt fail with its error at once rather than
    /// each trying again in turn (the callers' back-off retries).
    Failed(Instant, RedisError),
}

/// How long a failed attempt to reach the master answers for the commands
/// waiting behind it.
const FAILURE_SHARED_FOR: Duration = Duration::from_millis(250);

impl FollowedMaster {
    /// The connection in use, opened to the master the sentinels name if
    /// there is none.
    async fn get(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut current = self.current.lock().await;
        match &*current {
            Current::Connected(number, conn) => return Ok((*number, conn.clone())),
            Current::Failed(at, err) if at.elapsed() < FAILURE_SHARED_FOR => {
                return Err(err.clone())
            }
            Current::Failed(..) | Current::None => {}
        }
        let opened = tokio::time::timeout(self.master.timeout, async {
            let client = self.master.client().await?;
            client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
        })
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the master {:?} named by the sentinels at {} could not be reached within {:?}",
                    self.master.name, self.master.addresses, self.master.timeout
                ),
            )))
        });
        match opened {
            Ok(conn) => {
                let number = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
                *current = Current::Connected(number, conn.clone());
                Ok((number, conn))
            }
            Err(err) => {
                *current = Current::Failed(Instant::now(), err.clone());
                Err(err)
            }
        }
    }

    /// After connection `number` failed with `err`: drops it when the fault
    /// says the master moved or went away, so that the next command asks
    /// the sentinels again.
    async fn failed(&self, number: u64, err: &RedisError) {
        if !master_moved(err) {
            return;
        }
        let mut current = self.current.lock().await;
        if matches!(&*current, Current::Connected(held, _) if *held == number) {
            *current = Current::None;
        }
    }
}

/// The connection of a [`RedisConnection::Cluster`]: the cluster client's
/// own, which keeps a slot map and follows `MOVED`, made anew when a fault
/// says the cluster changed under it (a node gone, a slot moved, a
/// timeout), so that a map gone stale in a failover is read again from the
/// seeds rather than retried until it heals.
pub struct FollowedCluster {
    nodes: Arc<ClusterNodes>,
    timeouts: ConnectionTimeouts,
    /// The connection in use and its number; `None`: make one.
    current: Mutex<Option<(u64, ClusterConnection)>>,
    /// How many connections were made.
    connections: AtomicU64,
}

impl FollowedCluster {
    /// The connection in use, made if there is none (it connects at its
    /// first command).
    async fn get(&self) -> (u64, ClusterConnection) {
        let mut current = self.current.lock().await;
        if let Some((number, conn)) = &*current {
            return (*number, conn.clone());
        }
        let number = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = self.nodes.connection(self.timeouts);
        *current = Some((number, conn.clone()));
        (number, conn)
    }

    /// After connection `number` failed with `err`: drops it when the
    /// fault says the cluster changed, so that the next command makes a
    /// fresh one.
    async fn failed(&self, number: u64, err: &RedisError) {
        if !cluster_changed(err) {
            return;
        }
        let mut current = self.current.lock().await;
        if matches!(&*current, Some((held, _)) if *held == number) {
            *current = None;
        }
    }
}

/// Whether `err` says that a cluster connection's view may be stale: what
/// [`master_moved`] says, a timeout, or a reply saying the slot moved or
/// the cluster is down.
pub fn cluster_changed(err: &RedisError) -> bool {
    const CHANGED: &[&str] = &["MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"];
    master_moved(err)
        || err.is_timeout()
        || err.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, error)| CHANGED.contains(&error.code()))
        })
}

/// Whether `err` says that the connection no longer reaches the master: the
/// socket failed, or the server is a replica now, or lost its master, or is
/// loading (a restarted former master).
pub fn master_moved(err: &RedisError) -> bool {
    const MOVED: &[&str] = &["READONLY", "MASTERDOWN", "LOADING"];
    // A server's reply (alone, or among a pipeline's or transaction's
    // errors) comes through `into_server_errors`.
    err.is_io_error()
        || err.is_unrecoverable_error()
        || err.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, error)| MOVED.contains(&error.code()))
        })
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(conn) => conn.req_packed_command(cmd),
            Self::Sentinel(followed) => Box::pin(async move {
                let (number, mut conn) = followed.get().await?;
                let result = conn.req_packed_command(cmd).await;
                if let Err(err) = &result {
                    followed.failed(number, err).await;
                }
                result
            }),
            Self::Cluster(followed) => Box::pin(async move {
                let (number, mut conn) = followed.get().await;
                let result = conn.req_packed_command(cmd).await;
                if let Err(err) = &result {
                    followed.failed(number, err).await;
                }
                result
            }),
            Self::Multiplexed(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Direct(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(followed) => Box::pin(async move {
                let (number, mut conn) = followed.get().await?;
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(err) = &result {
                    followed.failed(number, err).await;
                }
                result
            }),
            Self::Cluster(followed) => Box::pin(async move {
                let (number, mut conn) = followed.get().await;
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(err) = &result {
                    followed.failed(number, err).await;
                }
                result
            }),
            Self::Multiplexed(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(conn) => conn.get_db(),
            Self::Sentinel(followed) => followed.master.db,
            Self::Cluster(_) => 0,
            Self::Multiplexed(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reply_error(line: &str) -> RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .and_then(Value::extract_error)
        {
            Err(err) => err,
            Ok(value) => panic!("{line:?} parsed as {value:?}"),
        }
    }

    #[test]
    fn cluster_slots_replies_name_each_ranges_master() {
        let reply = redis::parse_redis_value(
            b"*2\r\n\
              *4\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7003\r\n$2\r\nid\r\n\
              *3\r\n:5461\r\n:16383\r\n*2\r\n$0\r\n\r\n:7001\r\n",
        )
        .unwrap();
        assert_eq!(
            parse_cluster_slots(&reply),
            Some(vec![
                SlotOwner {
                    first: 0,
                    last: 5460,
                    host: "127.0.0.1".into(),
                    port: 7000
                },
                SlotOwner {
                    first: 5461,
                    last: 16383,
                    host: String::new(),
                    port: 7001
                },
            ])
        );
        let null_host = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![Value::Nil, Value::Int(7002)]),
        ])]);
        assert_eq!(
            parse_cluster_slots(&null_host),
            Some(vec![SlotOwner {
                first: 0,
                last: 16383,
                host: String::new(),
                port: 7002
            }])
        );
        for bad in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(70_000),
                Value::Array(vec![Value::BulkString(b"h".to_vec()), Value::Int(1)]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(1),
                Value::Array(vec![Value::BulkString(b"h".to_vec()), Value::Int(-1)]),
            ])]),
        ] {
            assert_eq!(parse_cluster_slots(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_connection_is_dropped_when_the_master_moved_and_kept_otherwise() {
        for moved in [
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            reply_error("READONLY You can't write against a read only replica."),
            reply_error("MASTERDOWN Link with MASTER is down"),
            reply_error("LOADING Redis is loading the dataset in memory"),
        ] {
            assert!(master_moved(&moved), "{moved:?}");
        }
        for kept in [
            reply_error("OOM command not allowed when used memory > 'maxmemory'."),
            reply_error("WRONGTYPE Operation against a key holding the wrong kind of value"),
            reply_error("NOSCRIPT No matching script."),
            reply_error("ERR unknown command"),
        ] {
            assert!(!master_moved(&kept), "{kept:?}");
            assert!(!cluster_changed(&kept), "{kept:?}");
        }
        for changed in [
            reply_error("MOVED 3999 127.0.0.1:6381"),
            reply_error("ASK 3999 127.0.0.1:6381"),
            reply_error("CLUSTERDOWN The cluster is down"),
            reply_error("TRYAGAIN Multiple keys request during rehashing of slot"),
            reply_error("READONLY You can't write against a read only replica."),
            RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        ] {
            assert!(cluster_changed(&changed), "{changed:?}");
        }
    }
}
