//! The stream-offset store on Redis.
//!
//! One string key per label, `<prefix>:stream_offsets:<label>`, holding the id
//! of the last entry whose handling finished, so an operator can `GET` it with
//! redis-cli. The consumer's saves go through a server-side script that
//! compares ids numerically and keeps the larger, atomically: two workers by
//! mistake, or a late save after a restart, can never move an offset back.
//! The same script refuses a save when the stored offset is behind what the
//! saver last stored: Redis lost acknowledged writes (a crash without
//! `appendfsync always`, a failover) or an operator rewound it, and the
//! consumer replays from what is stored.

use std::time::Duration;

use lifecycle_domain::{BoxFuture, EntryId, SaveOutcome, StoreError, StreamOffsetStore};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use crate::connect::lazy_manager;
use crate::{idempotent, store_error};

/// The default key prefix of every key the lobby owns.
pub const DEFAULT_KEY_PREFIX: &str = "lobby";

/// Stores `ARGV[1]` at `KEYS[1]` unless the key holds a stream id at least as
/// large (see `lua_id_less!`), or, with `ARGV[2]` (the offset the saver
/// expects), unless the stored offset is behind it or gone. Returns
/// `{outcome, stored}` with outcome `saved`, `kept` or `behind`.
const SAVE_CHECKED: &str = concat!(
    lua_id_less!(),
    r"
if not string.match(ARGV[1], '^%d+-%d+$') then
  return redis.error_reply('ERR offset to save is not a stream id')
end
local current = redis.call('GET', KEYS[1])
if ARGV[2] ~= '' and (not current or id_less(current, ARGV[2])) then
  return { 'behind', current or '' }
end
if current and not id_less(current, ARGV[1]) then
  return { 'kept', current }
end
redis.call('SET', KEYS[1], ARGV[1])
return { 'saved', ARGV[1] }
"
);

/// Offsets on Redis.
#[derive(Clone)]
pub struct RedisOffsetStore {
    conn: ConnectionManager,
    prefix: String,
    save_script: Script,
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
    pub fn new(client: redis::Client, prefix: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            conn: lazy_manager(client, Duration::from_secs(5))?,
            prefix: prefix.to_owned(),
            save_script: Script::new(SAVE_CHECKED),
        })
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
        let key = self.key(label);
        let expected_arg = expected.map(|id| id.to_string()).unwrap_or_default();
        let (outcome, stored): (String, Vec<u8>) = idempotent(|| {
            let mut conn = self.conn.clone();
            let mut invocation = self.save_script.key(&key);
            invocation.arg(id.to_string()).arg(&expected_arg);
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
        .map_err(|err| store_error(format!("save the offset {id} at {key}"), err))?;
        let stored = (!stored.is_empty())
            .then(|| EntryId::from_bytes(&stored))
            .transpose()
            .map_err(|err| StoreError {
                action: format!("save the offset {id} at {key}"),
                permanent: true,
                source: format!(
                    "the key holds {err}; repair it with `lobby-worker offsets set <ID>` or remove it with `lobby-worker offsets reset`"
                )
                .into(),
            })?;
        match (outcome.as_str(), stored) {
            ("saved", _) => Ok(SaveOutcome::Saved),
            ("kept", Some(stored)) => Ok(SaveOutcome::Kept(stored)),
            ("behind", stored) => Ok(SaveOutcome::Behind(stored)),
            _ => Err(StoreError {
                action: format!("save the offset {id} at {key}"),
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

impl StreamOffsetStore for RedisOffsetStore {
    fn load<'a>(&'a self, label: &'a str) -> BoxFuture<'a, Result<Option<EntryId>, StoreError>> {
        Box::pin(self.get(label))
    }

    fn save<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
        Box::pin(self.save_checked(label, id, expected))
    }
}
