//! Redis adapters of the lobby's user-lifecycle worker.
//!
//! # Layout
//!
//! - [`connect`]: opening a Redis client from a URL, after checking that the
//!   client reads the URL as meant, and redacting the URL's passwords for
//!   anything printed.
//! - [`sentinel`] and [`cluster`]: `redis+sentinel://` and
//!   `redis+cluster://` URLs, read and opened as endpoints.
//! - [`server_version`]: the oldest Redis the worker runs against
//!   ([`MIN_REDIS_VERSION`]), the check of a server's version, and telling a
//!   server that is not Redis at all.
//! - [`eviction`]: whether the server's `maxmemory-policy` may evict the
//!   worker's keys.
//! - [`offsets`]: the stream-offset store on Redis (`<prefix>:stream_offsets:<label>`),
//!   whose saves never move an offset backwards and, under a lease, are
//!   fenced.
//! - [`lease`]: the consumer lease (one consuming process per label), its
//!   fencing tokens, standbys and operators' handover requests.
//! - [`lobby`]: the lobby store on Redis; one user's cascade in bounded
//!   script calls, atomic per game, the record written last.
//! - [`memory`]: an in-memory offset store for unit tests.
//! - [`consumer`]: the user-lifecycle consumer: the generic engine of
//!   `lifecycle-streams` with the domain's decoder, behind the domain's
//!   consumer port.

/// Lua defining `id_less(a, b)`: whether stream id `a` is smaller than `b`,
/// comparing both parts as decimal integers of any length (Lua numbers are
/// doubles and would round 64-bit sequences); an unparsable `a` counts as
/// smaller, an unparsable `b` as larger. The prelude of the scripts that
/// compare ids, so that they order ids one way.
macro_rules! lua_id_less {
    () => {
        r"
local function norm(digits)
  local stripped = string.gsub(digits, '^0+', '')
  return stripped
end
local function num_less(a, b)
  a = norm(a)
  b = norm(b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_less(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if not ams then return true end
  if not bms then return false end
  if norm(ams) ~= norm(bms) then return num_less(ams, bms) end
  return num_less(aseq, bseq)
end
"
    };
}

pub mod cluster;
pub mod connect;
pub mod consumer;
pub mod eviction;
pub mod lease;
pub mod lobby;
pub mod memory;
pub mod offsets;
pub mod sentinel;
pub mod server_version;

pub use cluster::{is_cluster_url, open_cluster, parse_cluster_url, ClusterUrl};
pub use connect::{
    check_url, open_client, open_endpoint, open_tls_client, redact_url, server_address,
    ConnectError,
};
pub use consumer::{RedisUserLifecycleConsumer, UserLifecycleDecoder};
pub use eviction::{read_evicting_policy, NO_EVICTION};
pub use lease::{Identity, LeaseStatus, RedisLease};
pub use lobby::{CascadeRecord, RedisLobbyStore};
pub use memory::MemoryOffsetStore;
pub use offsets::{RedisOffsetStore, DEFAULT_KEY_PREFIX};
pub use sentinel::{is_sentinel_url, open_sentinel_master, parse_sentinel_url, SentinelUrl};
pub use server_version::{
    check_server_version, foreign_answer, is_cluster_node, judge_info, verify_server, ServerCheck,
    ServerVersion, VersionError, VersionVerdict, MIN_REDIS_VERSION,
};

use lifecycle_domain::StoreError;
use lifecycle_streams::{classify, not_redis, FaultClass};

/// Wraps a Redis failure into the domain's [`StoreError`], classified by the
/// client's own predicates.
pub(crate) fn store_error(action: String, err: redis::RedisError) -> StoreError {
    let class = classify(&err);
    let source: Box<dyn std::error::Error + Send + Sync> = match class {
        FaultClass::Auth => format!(
            "Redis refused access ({err}): check the user name and password in the Redis URL and the user's ACL permissions"
        )
        .into(),
        FaultClass::Tls => format!(
            "the TLS handshake with Redis failed ({err}): check the CA certificate (`ca_file`) and the client certificate (`cert_file`, `key_file`)"
        )
        .into(),
        _ if not_redis(&err) => "the server is not a Redis server (it answered in another protocol): is the Redis URL's port a Redis port? (a port that speaks TLS needs rediss://)".into(),
        // One line whatever the client's message holds (its parse errors
        // span several).
        _ if err.to_string().contains('\n') => err.to_string().replace('\n', " ").into(),
        _ => Box::new(err),
    };
    StoreError {
        action,
        permanent: class != FaultClass::Transient,
        source,
    }
}

/// Runs an idempotent command, and once more at once if the connection
/// turned out to be dropped: after Redis restarts, the first command on a
/// reconnecting connection fails although Redis is back, and that is no
/// outage worth a back-off and a warning.
pub(crate) async fn idempotent<T, F, Fut>(mut command: F) -> Result<T, redis::RedisError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
{
    match command().await {
        Err(err) if err.is_connection_dropped() || err.is_connection_refusal() => command().await,
        result => result,
    }
}
