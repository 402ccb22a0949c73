//! The stream-offset store on Redis.
//!
//! One string key per label, `<prefix>:stream_offsets:<label>`, holding the id
//! of the last entry whose handling finished, so an operator can `GET` it with
//! redis-cli. The consumer's saves go through a server-side script that
//! compares ids numerically and keeps the larger, atomically: two workers by
//! mistake, or a late save after a restart, can never move an offset back.
//! The same script refuses a save when the stored offset is behind what the
//! saver last stored (an operator rewound it, or Redis lost the save), or
//! when the server is not the process the store last spoke to for that
//! label (its `run_id` changed: a restart or a failover). Redis may then
//! have lost writes it had acknowledged — the handler's cascades as well as
//! offset saves, and with `appendfsync everysec` usually only the former —
//! so the consumer replays every entry after what is stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lifecycle_domain::{
    BoxFuture, EntryId, FenceToken, SaveOutcome, StoreError, StreamOffsetStore,
};
use lifecycle_streams::{RedisConnection, RedisEndpoint};
use redis::{AsyncCommands, Script};

use crate::connect::lazy_manager;
use crate::{idempotent, store_error};

/// The default key prefix of every key the lobby owns.
pub const DEFAULT_KEY_PREFIX: &str = "lobby";

/// Lua defining `run_id()`: the server process's `run_id` (from `INFO
/// server`), which a restart or a failover changes; empty when the user's
/// ACL does not allow `INFO` (the check is then skipped).
macro_rules! lua_run_id {
    () => {
        r"
local function run_id()
  local ok, info = pcall(redis.call, 'INFO', 'server')
  if not ok or type(info) ~= 'string' then return '' end
  return string.match(info, 'run_id:(%x+)') or ''
end
"
    };
}

/// Stores `ARGV[1]` at `KEYS[1]` unless, with `ARGV[4]` (the saver's
/// fencing token), the lease at `KEYS[2]` is not held with that token;
/// unless the key holds a stream id at least as large (see `lua_id_less!`);
/// unless, with `ARGV[2]` (the offset the saver expects), the stored offset
/// is behind it or gone; and unless, with `ARGV[3]`, the server's `run_id`
/// differs from it. Returns `{outcome, stored, run_id}` with outcome
/// `saved`, `kept`, `behind` or `fenced`.
const SAVE_CHECKED: &str = concat!(
    lua_id_less!(),
    lua_run_id!(),
    r"
if not string.match(ARGV[1], '^%d+-%d+$') then
  return redis.error_reply('ERR offset to save is not a stream id')
end
local current = redis.call('GET', KEYS[1])
local server = run_id()
if ARGV[4] ~= '' and redis.call('HGET', KEYS[2], 'token') ~= ARGV[4] then
  return { 'fenced', current or '', server }
end
if (ARGV[3] ~= '' and server ~= '' and ARGV[3] ~= server)
    or (ARGV[2] ~= '' and (not current or id_less(current, ARGV[2]))) then
  return { 'behind', current or '', server }
end
if current and not id_less(current, ARGV[1]) then
  return { 'kept', current, server }
end
redis.call('SET', KEYS[1], ARGV[1])
return { 'saved', ARGV[1], server }
"
);

/// With the lease `KEYS[2]` held by token `ARGV[1]`: sets `KEYS[1]` to
/// `ARGV[2]`, or deletes it when `ARGV[2]` is empty. Returns `{outcome,
/// previous}`, outcome `done` or `fenced` (nothing written).
const WRITE_FENCED: &str = r"
local previous = redis.call('GET', KEYS[1]) or ''
if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] then
  return { 'fenced', previous }
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return { 'done', previous }
";

/// The offset at `KEYS[1]` (or an empty string) and the server's `run_id`,
/// read at one instant.
const LOAD_WITH_RUN_ID: &str = concat!(
    lua_run_id!(),
    r"
return { redis.call('GET', KEYS[1]) or '', run_id() }
"
);

/// Offsets on Redis.
#[derive(Clone)]
pub struct RedisOffsetStore {
    conn: RedisConnection,
    prefix: String,
    save_script: Script,
    load_script: Script,
    write_script: Script,
    /// Per label, the `run_id` of the server the last load or save spoke to
    /// (shared by clones, which speak for the same consumer).
    servers: Arc<Mutex<HashMap<String, String>>>,
}

impl std::fmt::Debug for RedisOffsetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOffsetStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisOffsetStore {
    /// A store under `prefix` (normally [`DEFAULT_KEY_PREFIX`]); it connects
    /// on first use and reconnects after faults.
    ///
    /// # Errors
    ///
    /// When the client's settings cannot make a connection manager.
    pub fn new(
        endpoint: impl Into<RedisEndpoint>,
        prefix: &str,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            conn: lazy_manager(endpoint, Duration::from_secs(5))?,
            prefix: prefix.to_owned(),
            save_script: Script::new(SAVE_CHECKED),
            load_script: Script::new(LOAD_WITH_RUN_ID),
            write_script: Script::new(WRITE_FENCED),
            servers: Arc::default(),
        })
    }

    fn server_of(&self, label: &str) -> Option<String> {
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(label)
            .cloned()
    }

    fn remember_server(&self, label: &str, run_id: String) {
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(label.to_owned(), run_id);
    }

    /// The stored offset of `label`, remembering which server answered: a
    /// later [`save_checked`](Self::save_checked) on another one (a restart,
    /// a failover) reports [`SaveOutcome::Behind`].
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails or the key holds something that is not
    /// a stream id.
    pub async fn load_tracked(&self, label: &str) -> Result<Option<EntryId>, StoreError> {
        let key = self.key(label);
        let (raw, run_id): (Vec<u8>, String) = idempotent(|| {
            let mut conn = self.conn.clone();
            let invocation = self.load_script.key(&key);
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
        .map_err(|err| store_error(format!("read the offset at {key}"), err))?;
        let offset = parse_stored(&key, "read the offset", &raw)?;
        self.remember_server(label, run_id);
        Ok(offset)
    }

    /// The key holding `label`'s offset.
    pub fn key(&self, label: &str) -> String {
        format!("{}:stream_offsets:{label}", self.prefix)
    }

    /// The stored offset of `label`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails or the key holds something that is not
    /// a stream id.
    pub async fn get(&self, label: &str) -> Result<Option<EntryId>, StoreError> {
        let key = self.key(label);
        let raw: Option<Vec<u8>> = self
            .conn
            .clone()
            .get(&key)
            .await
            .map_err(|err| store_error(format!("read the offset at {key}"), err))?;
        raw.map(|raw| {
            EntryId::from_bytes(&raw).map_err(|err| StoreError {
                action: format!("read the offset at {key}"),
                permanent: true,
                source: format!(
                    "{err}; repair it with `lobby-worker offsets set <ID>` or remove it with `lobby-worker offsets reset`"
                )
                .into(),
            })
        })
        .transpose()
    }

    /// Saves `id` for `label` unless a larger id is stored; returns whether it
    /// wrote.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails or the key is not a string.
    pub async fn save_if_larger(&self, label: &str, id: EntryId) -> Result<bool, StoreError> {
        Ok(self.save_checked(label, id, None).await? == SaveOutcome::Saved)
    }

    /// Saves `id` for `label` unless a larger id is stored, or, with
    /// `expected`, unless the stored offset is behind it (see
    /// [`StreamOffsetStore::save`]).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails, the key is not a string or holds
    /// something that is not a stream id.
    pub async fn save_checked(
        &self,
        label: &str,
        id: EntryId,
        expected: Option<EntryId>,
    ) -> Result<SaveOutcome, StoreError> {
        self.save_with(label, id, expected, None).await
    }

    /// [`save_checked`](Self::save_checked), writing only while `fence` is
    /// the token of the current holder of `label`'s lease (see
    /// [`crate::lease`]); [`SaveOutcome::Fenced`] otherwise.
    ///
    /// # Errors
    ///
    /// As [`save_checked`](Self::save_checked).
    pub async fn save_fenced_checked(
        &self,
        label: &str,
        id: EntryId,
        expected: Option<EntryId>,
        fence: FenceToken,
    ) -> Result<SaveOutcome, StoreError> {
        self.save_with(label, id, expected, Some(fence)).await
    }

    async fn save_with(
        &self,
        label: &str,
        id: EntryId,
        expected: Option<EntryId>,
        fence: Option<FenceToken>,
    ) -> Result<SaveOutcome, StoreError> {
        let key = self.key(label);
        let lease_key = crate::lease::lease_key(&self.prefix, label);
        let expected_arg = expected.map(|id| id.to_string()).unwrap_or_default();
        let server_arg = self.server_of(label).unwrap_or_default();
        let fence_arg = fence.map(|fence| fence.to_string()).unwrap_or_default();
        let action = || format!("save the offset {id} at {key}");
        let (outcome, stored, run_id): (String, Vec<u8>, String) = idempotent(|| {
            let mut conn = self.conn.clone();
            let mut invocation = self.save_script.key(&key);
            invocation
                .key(&lease_key)
                .arg(id.to_string())
                .arg(&expected_arg)
                .arg(&server_arg)
                .arg(&fence_arg);
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
        .map_err(|err| store_error(action(), err))?;
        let stored = parse_stored(&key, "save the offset", &stored)?;
        self.remember_server(label, run_id);
        match (outcome.as_str(), stored) {
            ("saved", _) => Ok(SaveOutcome::Saved),
            ("kept", Some(stored)) => Ok(SaveOutcome::Kept(stored)),
            ("behind", stored) => Ok(SaveOutcome::Behind(stored)),
            ("fenced", _) => Ok(SaveOutcome::Fenced),
            _ => Err(StoreError {
                action: action(),
                permanent: true,
                source: format!("unexpected answer {outcome:?} from the save script").into(),
            }),
        }
    }

    /// Overwrites `label`'s offset with exactly `id`, even backwards: an
    /// operator's deliberate rewind or skip.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn set(&self, label: &str, id: EntryId) -> Result<(), StoreError> {
        let key = self.key(label);
        self.conn
            .clone()
            .set::<_, _, ()>(&key, id.to_string())
            .await
            .map_err(|err| store_error(format!("set the offset at {key}"), err))
    }

    /// Overwrites (`Some`, even backwards) or deletes (`None`) `label`'s
    /// offset while `fence` holds its lease: an operator's write, which the
    /// worker that held the lease obeys. `Ok(Err(()))` when `fence` does not
    /// hold it (nothing was written); otherwise the offset stored before.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails or the key held something that is
    /// not a stream id.
    pub async fn write_fenced(
        &self,
        label: &str,
        id: Option<EntryId>,
        fence: FenceToken,
    ) -> Result<Result<Option<EntryId>, ()>, StoreError> {
        let key = self.key(label);
        let lease_key = crate::lease::lease_key(&self.prefix, label);
        let value = id.map(|id| id.to_string()).unwrap_or_default();
        let (outcome, previous): (String, Vec<u8>) = {
            let mut conn = self.conn.clone();
            let mut invocation = self.write_script.key(&key);
            invocation.key(&lease_key).arg(fence).arg(&value);
            invocation.invoke_async(&mut conn).await
        }
        .map_err(|err| store_error(format!("write the offset at {key}"), err))?;
        if outcome != "done" {
            return Ok(Err(()));
        }
        // A previous value that is not an id is reported as none: it was
        // just overwritten or deleted.
        Ok(Ok(parse_stored(&key, "write the offset", &previous)
            .ok()
            .flatten()))
    }

    /// Deletes `label`'s offset; returns whether one was stored.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn reset(&self, label: &str) -> Result<bool, StoreError> {
        let key = self.key(label);
        let removed: i64 = self
            .conn
            .clone()
            .del(&key)
            .await
            .map_err(|err| store_error(format!("delete the offset at {key}"), err))?;
        Ok(removed > 0)
    }
}

/// The offset a script read at `key` (an empty string: none).
fn parse_stored(key: &str, what: &str, raw: &[u8]) -> Result<Option<EntryId>, StoreError> {
    if raw.is_empty() {
        return Ok(None);
    }
    EntryId::from_bytes(raw).map(Some).map_err(|err| StoreError {
        action: format!("{what} at {key}"),
        permanent: true,
        source: format!(
            "the key holds {err}; repair it with `lobby-worker offsets set <ID>` or remove it with `lobby-worker offsets reset`"
        )
        .into(),
    })
}

impl StreamOffsetStore for RedisOffsetStore {
    fn load<'a>(&'a self, label: &'a str) -> BoxFuture<'a, Result<Option<EntryId>, StoreError>> {
        Box::pin(self.load_tracked(label))
    }

    fn save<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
        Box::pin(self.save_checked(label, id, expected))
    }

    fn save_fenced<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
        fence: FenceToken,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
        Box::pin(self.save_fenced_checked(label, id, expected, fence))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn debug_shows_the_prefix_and_no_connection() {
        let client = redis::Client::open("redis://:secret@127.0.0.1:1/").unwrap();
        let shown = format!("{:?}", RedisOffsetStore::new(client, "lobby").unwrap());
        assert!(shown.starts_with("RedisOffsetStore {"), "{shown}");
        assert!(shown.contains(r#"prefix: "lobby""#), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
