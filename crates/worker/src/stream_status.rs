//! What a stream looks like from outside the consumer: its length and ends,
//! how far a saved offset lags behind, whether entries after the offset were
//! removed before they were handled. Shared by `status` and the lag gauges
//! of `run`.

use lifecycle_domain::EntryId;
use redis::aio::ConnectionLike;
use redis::{RedisError, Script, Value};

/// Entries counted past an offset at most; beyond, the lag is "more than".
pub const LAG_COUNT_LIMIT: u64 = 10_000;

/// Entries per `XRANGE` page of the counting script: bounds what the script
/// holds at once whatever the entries' sizes.
const COUNT_PAGE: u64 = 128;

/// Counts the entries of `KEYS[1]` from `ARGV[1]` (an `XRANGE` start such as
/// `(1700000000000-0`) on, stopping at `ARGV[2]`, page by page of `ARGV[3]`
/// entries; only the count leaves Redis.
const COUNT_AFTER: &str = r"
local limit = tonumber(ARGV[2])
local page = tonumber(ARGV[3])
local start = ARGV[1]
local n = 0
while n < limit do
  local want = math.min(page, limit - n)
  local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', want)
  n = n + #entries
  if #entries < want then break end
  start = '(' .. entries[#entries][1]
end
return n
";

/// Why a stream could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The key holds something else.
    #[error("the key {key} holds a {kind}, not a stream")]
    WrongType {
        /// The key.
        key: String,
        /// What `TYPE` says it is.
        kind: String,
    },
    /// Redis failed.
    #[error("{action}: {source}")]
    Redis {
        /// What was being done.
        action: &'static str,
        /// The failure.
        source: RedisError,
    },
}

fn redis_error(action: &'static str) -> impl FnOnce(RedisError) -> ProbeError {
    move |source| ProbeError::Redis { action, source }
}

/// A stream as `XINFO STREAM` describes it; all empty when the key is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Whether the key exists.
    pub exists: bool,
    /// Entries in it now.
    pub length: u64,
    /// Its oldest entry.
    pub first_entry_id: Option<EntryId>,
    /// Its newest entry.
    pub last_entry_id: Option<EntryId>,
    /// The largest id it ever gave an entry (`last-generated-id`).
    pub last_generated_id: Option<EntryId>,
    /// The largest id removed by `XDEL` (Redis 7; `0-0` reads as `None`).
    pub max_deleted_entry_id: Option<EntryId>,
    /// Entries ever added (Redis 7).
    pub entries_added: Option<u64>,
}

impl StreamState {
    /// Entries added and since removed (trimmed or deleted), when Redis says.
    pub fn removed(&self) -> Option<u64> {
        self.entries_added
            .map(|added| added.saturating_sub(self.length))
    }

    /// Whether entries after `offset` were removed before they could be
    /// handled:
    ///
    /// - an `XDEL` after the offset (`max-deleted-entry-id` > offset);
    /// - the stream is empty although it once held an entry after the
    ///   offset (`last-generated-id` > offset, entries removed);
    /// - entries were removed and the stream's first entry is after
    ///   `offset + 1`: the trim reached the offset. `XTRIM` does not move
    ///   `max-deleted-entry-id`, hence the count of removed entries.
    ///
    /// The last rule cannot tell a trim that stopped exactly at the offset
    /// (nothing lost yet, but the worker is as far behind as the retention
    /// allows, and the next trim removes unhandled entries) from one that
    /// went past it: Redis keeps no trace of the removed ids. Redis before 7
    /// reports no counts: `false`.
    pub fn trimmed_past(&self, offset: EntryId) -> bool {
        let deleted_after = self.max_deleted_entry_id.is_some_and(|id| id > offset);
        let removed_some = self.removed().is_some_and(|removed| removed > 0);
        let front_past = match self.first_entry_id {
            Some(first) => successor(offset).is_none_or(|next| first > next),
            None => self.last_generated_id.is_some_and(|last| last > offset),
        };
        deleted_after || (removed_some && front_past)
    }

    /// Whether `offset` lies after every id the stream ever gave (or the
    /// stream is gone): the worker would skip every event added until the
    /// stream's ids pass it. A wrong `--label` or `--stream`, an `offsets
    /// set --force`, or a Redis that lost data (restarted empty, failed over
    /// to a replica that lagged) leads there.
    pub fn ends_before(&self, offset: EntryId) -> bool {
        offset > EntryId::ZERO && self.last_generated_id.is_none_or(|last| offset > last)
    }

    fn parse(reply: Value) -> Self {
        let mut state = StreamState {
            exists: true,
            ..StreamState::default()
        };
        for (name, value) in pairs(reply) {
            let Some(name) = text(&name) else { continue };
            match name.as_str() {
                "length" => state.length = int(&value).unwrap_or(0),
                "first-entry" => state.first_entry_id = entry_id_of_entry(&value),
                "last-entry" => state.last_entry_id = entry_id_of_entry(&value),
                "last-generated-id" => state.last_generated_id = id(&value),
                "max-deleted-entry-id" => {
                    state.max_deleted_entry_id = id(&value).filter(|id| *id > EntryId::ZERO);
                }
                "entries-added" => state.entries_added = int(&value),
                _ => {}
            }
        }
        state
    }
}

/// How far an offset is behind a stream's last entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    /// Entries after the offset, exact up to [`LAG_COUNT_LIMIT`].
    pub entries: u64,
    /// Whether there are more than [`LAG_COUNT_LIMIT`] (then `entries` is
    /// the limit).
    pub more_than: bool,
    /// The last entry's milliseconds minus the offset's (0 when caught up).
    pub ms: u64,
}

/// The id right after `id`, `None` after the last possible one.
pub fn successor(id: EntryId) -> Option<EntryId> {
    if id.seq < u64::MAX {
        Some(EntryId::new(id.ms, id.seq + 1))
    } else if id.ms < u64::MAX {
        Some(EntryId::new(id.ms + 1, 0))
    } else {
        None
    }
}

/// Describes the stream at `key`.
///
/// # Errors
///
/// [`ProbeError::WrongType`] when the key is not a stream; Redis failures.
pub async fn stream_state<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> Result<StreamState, ProbeError> {
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(redis_error("inspect the stream"))?;
    match kind.as_str() {
        "none" => Ok(StreamState::default()),
        "stream" => {
            let reply: Value = redis::cmd("XINFO")
                .arg("STREAM")
                .arg(key)
                .query_async(conn)
                .await
                .map_err(redis_error("inspect the stream"))?;
            Ok(StreamState::parse(reply))
        }
        _ => Err(ProbeError::WrongType {
            key: key.to_owned(),
            kind,
        }),
    }
}

/// How far `offset` is behind the stream described by `state`. Costs
/// nothing when the offset is caught up or before every entry; otherwise the
/// entries after it are counted in Redis, up to the limit.
///
/// # Errors
///
/// Redis failures.
pub async fn lag<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    state: &StreamState,
    offset: EntryId,
) -> Result<Lag, ProbeError> {
    let Some(last) = state.last_entry_id.filter(|last| *last > offset) else {
        return Ok(Lag::default());
    };
    let ms = last.ms.saturating_sub(offset.ms);
    if state.first_entry_id.is_some_and(|first| first > offset) {
        // Every entry is after the offset.
        let entries = state.length.min(LAG_COUNT_LIMIT);
        return Ok(Lag {
            entries,
            more_than: state.length > LAG_COUNT_LIMIT,
            ms,
        });
    }
    let counted: u64 = Script::new(COUNT_AFTER)
        .key(key)
        .arg(format!("({offset}"))
        .arg(LAG_COUNT_LIMIT + 1)
        .arg(COUNT_PAGE)
        .invoke_async(conn)
        .await
        .map_err(redis_error("count the entries after the offset"))?;
    Ok(Lag {
        entries: counted.min(LAG_COUNT_LIMIT),
        more_than: counted > LAG_COUNT_LIMIT,
        ms,
    })
}

/// The length of the stream at `key` (0 when absent).
///
/// # Errors
///
/// [`ProbeError::WrongType`] when the key is not a stream; Redis failures.
pub async fn stream_length<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> Result<u64, ProbeError> {
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(redis_error("inspect the dead-letter stream"))?;
    match kind.as_str() {
        "none" => Ok(0),
        "stream" => redis::cmd("XLEN")
            .arg(key)
            .query_async(conn)
            .await
            .map_err(redis_error("inspect the dead-letter stream")),
        _ => Err(ProbeError::WrongType {
            key: key.to_owned(),
            kind,
        }),
    }
}

/// The name/value pairs of a RESP2 flat array or a RESP3 map.
pub fn pairs(reply: Value) -> Vec<(Value, Value)> {
    match reply {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut pairs = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(name), Some(value)) = (items.next(), items.next()) {
                pairs.push((name, value));
            }
            pairs
        }
        _ => Vec::new(),
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(raw) => String::from_utf8(raw.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other).and_then(|text| text.parse().ok()),
    }
}

fn id(value: &Value) -> Option<EntryId> {
    match value {
        Value::BulkString(raw) => EntryId::from_bytes(raw).ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

/// The id of an entry as `XINFO STREAM` shows it: `[id, [field, value, ...]]`.
fn entry_id_of_entry(value: &Value) -> Option<EntryId> {
    match value {
        Value::Array(parts) => parts.first().and_then(id),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn entry(id: &str) -> Value {
        Value::Array(vec![bulk(id), Value::Array(vec![bulk("f"), bulk("v")])])
    }

    #[test]
    fn xinfo_stream_replies_parse() {
        let reply = Value::Array(vec![
            bulk("length"),
            Value::Int(2),
            bulk("last-generated-id"),
            bulk("9-0"),
            bulk("max-deleted-entry-id"),
            bulk("0-0"),
            bulk("entries-added"),
            Value::Int(5),
            bulk("first-entry"),
            entry("7-0"),
            bulk("last-entry"),
            entry("9-0"),
            bulk("dangling"),
        ]);
        let state = StreamState::parse(reply);
        assert_eq!(
            state,
            StreamState {
                exists: true,
                length: 2,
                first_entry_id: Some(EntryId::new(7, 0)),
                last_entry_id: Some(EntryId::new(9, 0)),
                last_generated_id: Some(EntryId::new(9, 0)),
                max_deleted_entry_id: None,
                entries_added: Some(5),
            }
        );
        assert_eq!(state.removed(), Some(3));
        let empty = StreamState::parse(Value::Map(vec![
            (bulk("length"), Value::Int(0)),
            (bulk("first-entry"), Value::Nil),
        ]));
        assert_eq!(empty.first_entry_id, None);
        assert!(empty.exists);
    }

    #[test]
    fn trims_and_deletions_past_the_offset_are_told() {
        let state =
            |first: Option<u64>, last_generated: u64, deleted: Option<u64>, added, length| {
                StreamState {
                    exists: true,
                    length,
                    first_entry_id: first.map(|ms| EntryId::new(ms, 0)),
                    last_entry_id: first.map(|_| EntryId::new(last_generated, 0)),
                    last_generated_id: Some(EntryId::new(last_generated, 0)),
                    max_deleted_entry_id: deleted.map(|ms| EntryId::new(ms, 0)),
                    entries_added: Some(added),
                }
            };
        let offset = EntryId::new(5, 0);
        // Trimmed to 7-0: 6-0 (after the offset) was lost.
        assert!(state(Some(7), 9, None, 5, 3).trimmed_past(offset));
        // Trimmed, but not up to the offset.
        assert!(!state(Some(5), 9, None, 5, 5).trimmed_past(offset));
        // Trimmed up to the offset, the next entry right after it.
        let mut next = state(Some(5), 9, None, 5, 3);
        next.first_entry_id = Some(EntryId::new(5, 1));
        assert!(!next.trimmed_past(offset));
        // Nothing removed: a gap in ids is no loss.
        assert!(!state(Some(7), 9, None, 3, 3).trimmed_past(offset));
        // Trimmed to empty after an entry past the offset existed.
        assert!(state(None, 9, None, 9, 0).trimmed_past(offset));
        // Trimmed to empty, the offset at the end: nothing lost.
        assert!(!state(None, 5, None, 5, 0).trimmed_past(offset));
        // An XDEL after the offset.
        assert!(state(Some(1), 9, Some(8), 9, 8).trimmed_past(offset));
        // An XDEL before it.
        assert!(!state(Some(1), 9, Some(4), 9, 8).trimmed_past(offset));
        // Redis before 7: no counts, no verdict.
        let mut old = state(Some(7), 9, None, 5, 3);
        old.entries_added = None;
        assert!(!old.trimmed_past(offset));
    }

    #[test]
    fn an_offset_after_every_id_given_is_past_the_end() {
        let mut state = StreamState {
            exists: true,
            length: 1,
            last_generated_id: Some(EntryId::new(9, 0)),
            ..StreamState::default()
        };
        assert!(!state.ends_before(EntryId::new(9, 0)), "caught up");
        assert!(!state.ends_before(EntryId::new(8, 5)));
        assert!(state.ends_before(EntryId::new(9, 1)));
        assert!(state.ends_before(EntryId::new(99_999_999_999_999, 0)));
        state = StreamState::default();
        assert!(state.ends_before(EntryId::new(1, 0)), "the stream is gone");
        assert!(!state.ends_before(EntryId::ZERO), "0-0 skips nothing");
    }

    #[test]
    fn successors() {
        assert_eq!(successor(EntryId::new(5, 0)), Some(EntryId::new(5, 1)));
        assert_eq!(
            successor(EntryId::new(5, u64::MAX)),
            Some(EntryId::new(6, 0))
        );
        assert_eq!(successor(EntryId::MAX), None);
    }
}
