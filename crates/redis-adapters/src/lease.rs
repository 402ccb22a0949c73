//! The consumer lease on Redis: one consuming process per label.
//!
//! Its keys share the offset key's hash slot (the offset key's name in a hash
//! tag), so that one script can check the lease and write the offset on a
//! Redis Cluster too:
//!
//! - `{<prefix>:stream_offsets:<label>}:lease`: a hash (`holder`, which is
//!   `<host>/<pid>/<nonce>`, `token`, `since_ms`) with the lease's expiry;
//! - `{<prefix>:stream_offsets:<label>}:fence`: the fencing-token counter,
//!   incremented at every change of holder, never reset;
//! - `{<prefix>:stream_offsets:<label>}:standbys`: a sorted set of the
//!   processes waiting for the lease, scored by when their presence ends;
//! - `{<prefix>:stream_offsets:<label>}:handover`: an operator's request for
//!   the lease (its holder id, with an expiry): the holder stops gracefully
//!   and releases at its next renewal, and no standby takes the lease while
//!   the request stands.

use std::sync::LazyLock;
use std::time::Duration;

use lifecycle_domain::{BoxFuture, ConsumerLease, FenceToken, Renewal, StoreError};
use lifecycle_streams::{RedisConnection, RedisEndpoint};
use redis::Script;

use crate::connect::lazy_manager;
use crate::{idempotent, store_error};

/// The key of `label`'s lease under `prefix`.
pub fn lease_key(prefix: &str, label: &str) -> String {
    format!("{{{prefix}:stream_offsets:{label}}}:lease")
}

/// The key of `label`'s fencing-token counter under `prefix`.
pub fn fence_key(prefix: &str, label: &str) -> String {
    format!("{{{prefix}:stream_offsets:{label}}}:fence")
}

/// The key of `label`'s standbys under `prefix`.
pub fn standbys_key(prefix: &str, label: &str) -> String {
    format!("{{{prefix}:stream_offsets:{label}}}:standbys")
}

/// The key of an operator's request for `label`'s lease under `prefix`.
pub fn handover_key(prefix: &str, label: &str) -> String {
    format!("{{{prefix}:stream_offsets:{label}}}:handover")
}

/// Takes the lease `KEYS[1]` for holder `ARGV[1]` with the next token of
/// `KEYS[2]`, unless it is held or an operator's request `KEYS[4]` by
/// another holder stands; `ARGV[3]` = `1` takes it regardless (fencing the
/// holder out). `ARGV[2]` is `<ttl ms> <now ms> <standby ttl ms>`: when not
/// taken, the caller is recorded in the standbys `KEYS[3]` for the
/// standby ttl. Returns the token, or 0. (Ten arguments at most: Redis
/// refuses more from a client not yet authenticated, before it could say
/// that the password is wrong.)
const ACQUIRE: &str = r"
local ttl, now, standby = string.match(ARGV[2], '^(%d+) (%d+) (%d+)$')
if not ttl then return redis.error_reply('ERR bad lease timing') end
now = tonumber(now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local handover = redis.call('GET', KEYS[4])
if ARGV[3] ~= '1' and (redis.call('EXISTS', KEYS[1]) == 1
    or (handover and handover ~= ARGV[1])) then
  redis.call('ZADD', KEYS[3], now + tonumber(standby), ARGV[1])
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', token, 'since_ms', now)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZREM', KEYS[3], ARGV[1])
return token
";

/// Extends the lease `KEYS[1]` by `ARGV[2]` ms if token `ARGV[1]` holds it:
/// `lost` otherwise; `handover` when an operator's request `KEYS[2]` from
/// another holder stands; `renewed` else.
const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 'lost'
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local handover = redis.call('GET', KEYS[2])
if handover and handover ~= redis.call('HGET', KEYS[1], 'holder') then
  return 'handover'
end
return 'renewed'
";

/// Deletes the lease `KEYS[1]` if token `ARGV[1]` holds it, and the
/// request `KEYS[2]` if it is holder `ARGV[2]`'s.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
end
return 1
";

/// Records holder `ARGV[1]`'s request for the lease at `KEYS[1]` for
/// `ARGV[2]` ms, unless another's stands; returns whether it is ours.
const REQUEST: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// The lease, the fence counter, the standbys not yet gone and the
/// lease's remaining time, at one instant: `{holder fields (flat), fence,
/// pttl, standbys (flat, member then score)}`.
const STATUS: &str = r"
local now = tonumber(ARGV[1])
return { redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or '',
  redis.call('PTTL', KEYS[1]),
  redis.call('ZRANGEBYSCORE', KEYS[3], now, '+inf', 'WITHSCORES') }
";

static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));
static REQUEST_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REQUEST));
static STATUS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(STATUS));

/// Who a process is, as the lease and the standbys record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The machine's host name.
    pub host: String,
    /// The process id.
    pub pid: u32,
    /// What tells two processes of one host and pid apart (restarts in a
    /// container reuse pids).
    pub nonce: String,
}

impl Identity {
    /// This process: its host name (from the kernel, else `HOSTNAME`, else
    /// `unknown`), its pid and a random nonce.
    pub fn of_this_process() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            host,
            pid: std::process::id(),
            nonce: format!("{:08x}", nonce()),
        }
    }

    /// The holder id: `<host>/<pid>/<nonce>`.
    pub fn holder_id(&self) -> String {
        format!("{}/{}/{}", self.host, self.pid, self.nonce)
    }

    /// Reads a holder id back (`None`: not one this module wrote).
    pub fn parse(holder: &str) -> Option<Self> {
        let mut parts = holder.rsplitn(3, '/');
        let nonce = parts.next()?.to_owned();
        let pid = parts.next()?.parse().ok()?;
        let host = parts.next()?.to_owned();
        Some(Self { host, pid, nonce })
    }
}

/// A random-enough 32-bit value without a random-number crate: the clock's
/// nanoseconds mixed with the address of a stack variable.
fn nonce() -> u32 {
    let marker = 0u8;
    let address = std::ptr::addr_of!(marker) as usize as u64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::from(since.subsec_nanos()));
    let mixed = (nanos ^ address.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 32) as u32
}

/// What `status` shows of a label's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The holder, if any: who, since when (ms since the Unix epoch), with
    /// which token.
    pub holder: Option<Holder>,
    /// The lease's remaining time, while held.
    pub remaining: Option<Duration>,
    /// The last fencing token handed out (0: never).
    pub last_token: FenceToken,
    /// Processes seen waiting for the lease recently, with when their
    /// presence ends (ms since the Unix epoch).
    pub standbys: Vec<(Identity, u64)>,
}

/// The current holder of a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Who holds it.
    pub identity: Identity,
    /// Its fencing token.
    pub token: FenceToken,
    /// When it took the lease (ms since the Unix epoch).
    pub since_ms: u64,
}

/// The lease on Redis, for one process (see the module doc).
#[derive(Clone)]
pub struct RedisLease {
    conn: RedisConnection,
    prefix: String,
    identity: Identity,
    standby_ttl: Duration,
}

impl std::fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLease")
            .field("prefix", &self.prefix)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

impl RedisLease {
    /// The lease under `prefix` for the process `identity`, which counts as
    /// a standby for `standby_ttl` after each failed acquisition; connects on
    /// first use.
    ///
    /// # Errors
    ///
    /// When the client's settings cannot make a connection manager.
    pub fn new(
        endpoint: impl Into<RedisEndpoint>,
        prefix: &str,
        identity: Identity,
        standby_ttl: Duration,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            conn: lazy_manager(endpoint, Duration::from_secs(5))?,
            prefix: prefix.to_owned(),
            identity,
            standby_ttl,
        })
    }

    /// Who this process is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Takes the lease; with `force`, even from a holder (which is fenced
    /// out: its next save and renewal are refused).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn try_acquire(
        &self,
        label: &str,
        ttl: Duration,
        force: bool,
    ) -> Result<Option<FenceToken>, StoreError> {
        let lease = lease_key(&self.prefix, label);
        let holder = self.identity.holder_id();
        let token: u64 = {
            let mut conn = self.conn.clone();
            let mut invocation = ACQUIRE_SCRIPT.prepare_invoke();
            invocation
                .key(&lease)
                .key(fence_key(&self.prefix, label))
                .key(standbys_key(&self.prefix, label))
                .key(handover_key(&self.prefix, label))
                .arg(&holder)
                .arg(format!(
                    "{} {} {}",
                    millis(ttl),
                    now_ms(),
                    millis(self.standby_ttl)
                ))
                .arg(if force { "1" } else { "" });
            invocation.invoke_async(&mut conn).await
        }
        .map_err(|err| store_error(format!("take the lease at {lease}"), err))?;
        Ok((token > 0).then_some(token))
    }

    /// Asks the holder to hand the lease over (for `ttl`), so that this
    /// process can take it without fencing anyone out; `false` when another
    /// process's request stands.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn request_handover(&self, label: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = handover_key(&self.prefix, label);
        let ours: i64 = idempotent(|| {
            let mut conn = self.conn.clone();
            let mut invocation = REQUEST_SCRIPT.prepare_invoke();
            invocation
                .key(&key)
                .arg(self.identity.holder_id())
                .arg(millis(ttl));
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
        .map_err(|err| store_error(format!("ask for the lease at {key}"), err))?;
        Ok(ours == 1)
    }

    /// Gives the lease up if `fence` holds it, and this process's handover
    /// request if it made one.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn give_up(&self, label: &str, fence: Option<FenceToken>) -> Result<(), StoreError> {
        let lease = lease_key(&self.prefix, label);
        let handover = handover_key(&self.prefix, label);
        let token = fence.map(|fence| fence.to_string()).unwrap_or_default();
        idempotent(|| {
            let mut conn = self.conn.clone();
            let mut invocation = RELEASE_SCRIPT.prepare_invoke();
            invocation
                .key(&lease)
                .key(&handover)
                .arg(&token)
                .arg(self.identity.holder_id());
            async move { invocation.invoke_async::<i64>(&mut conn).await }
        })
        .await
        .map_err(|err| store_error(format!("release the lease at {lease}"), err))?;
        Ok(())
    }

    /// The lease of `label` as `status` shows it.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails or the keys hold something else.
    pub async fn status(&self, label: &str) -> Result<LeaseStatus, StoreError> {
        read_status(&self.conn, &self.prefix, label).await
    }
}

/// The lease of `label` under `prefix`, read on `conn`.
///
/// # Errors
///
/// [`StoreError`] when Redis fails or the keys hold something else.
pub async fn read_status<C: redis::aio::ConnectionLike + Clone + Send>(
    conn: &C,
    prefix: &str,
    label: &str,
) -> Result<LeaseStatus, StoreError> {
    let lease = lease_key(prefix, label);
    type Reply = (Vec<String>, String, i64, Vec<String>);
    let (fields, fence, pttl, standbys): Reply = idempotent(|| {
        let mut conn = conn.clone();
        let mut invocation = STATUS_SCRIPT.prepare_invoke();
        invocation
            .key(&lease)
            .key(fence_key(prefix, label))
            .key(standbys_key(prefix, label))
            .arg(now_ms());
        async move { invocation.invoke_async(&mut conn).await }
    })
    .await
    .map_err(|err| store_error(format!("read the lease at {lease}"), err))?;
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|pair| pair.first().is_some_and(|key| key == name))
            .and_then(|pair| pair.get(1))
    };
    let holder = field("holder").and_then(|holder| {
        Some(Holder {
            identity: Identity::parse(holder)?,
            token: field("token")?.parse().ok()?,
            since_ms: field("since_ms")?.parse().ok()?,
        })
    });
    let standbys = standbys
        .chunks(2)
        .filter_map(|pair| {
            let identity = Identity::parse(pair.first()?)?;
            let until: f64 = pair.get(1)?.parse().ok()?;
            Some((identity, until.max(0.0) as u64))
        })
        .collect();
    Ok(LeaseStatus {
        remaining: (holder.is_some() && pttl >= 0)
            .then(|| Duration::from_millis(pttl.unsigned_abs())),
        holder,
        last_token: fence.parse().unwrap_or(0),
        standbys,
    })
}

impl ConsumerLease for RedisLease {
    fn acquire<'a>(
        &'a self,
        label: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<FenceToken>, StoreError>> {
        Box::pin(self.try_acquire(label, ttl, false))
    }

    fn renew<'a>(
        &'a self,
        label: &'a str,
        fence: FenceToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Renewal, StoreError>> {
        Box::pin(async move {
            let lease = lease_key(&self.prefix, label);
            let answer: String = idempotent(|| {
                let mut conn = self.conn.clone();
                let mut invocation = RENEW_SCRIPT.prepare_invoke();
                invocation
                    .key(&lease)
                    .key(handover_key(&self.prefix, label))
                    .arg(fence)
                    .arg(millis(ttl));
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await
            .map_err(|err| store_error(format!("renew the lease at {lease}"), err))?;
            Ok(match answer.as_str() {
                "renewed" => Renewal::Renewed,
                "handover" => Renewal::HandoverRequested,
                _ => Renewal::Lost,
            })
        })
    }

    fn release<'a>(
        &'a self,
        label: &'a str,
        fence: FenceToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.give_up(label, Some(fence)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_share_the_offset_keys_slot() {
        assert_eq!(
            lease_key("lobby", "user_lifecycle"),
            "{lobby:stream_offsets:user_lifecycle}:lease"
        );
        assert_eq!(
            fence_key("lobby", "user_lifecycle"),
            "{lobby:stream_offsets:user_lifecycle}:fence"
        );
    }

    #[test]
    fn a_holder_id_reads_back() {
        let identity = Identity {
            host: "web-1".into(),
            pid: 42,
            nonce: "00ff".into(),
        };
        assert_eq!(identity.holder_id(), "web-1/42/00ff");
        assert_eq!(Identity::parse("web-1/42/00ff"), Some(identity));
        assert_eq!(Identity::parse("garbage"), None);
        assert_eq!(Identity::parse("a/not-a-pid/x"), None);
    }
}
