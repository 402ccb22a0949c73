//! Dead-lettering exactly once per entry.
//!
//! A dead letter is a copy of a failing entry in the dead-letter stream: the
//! entry's own fields first, then `dead_letter_entry_id`,
//! `dead_letter_stream`, `dead_letter_error` and `dead_letter_attempts`.
//! Writing it is retried on transient faults, replayed after a crash (the
//! offset is saved only after the copy), and may be made by a second worker
//! too; none of these may append a second copy.
//!
//! So the copy is written by one server-side script, [`append_once`], which
//! also records it in a marker hash next to the dead-letter stream:
//!
//! - key [`marker_key`]: `{<dead_letter_stream>}:entries`, in the stream's
//!   Redis Cluster slot (the hash tag is the stream's whole name, which is
//!   what the stream key itself hashes; names that carry their own hash tag
//!   or a `}` get a key in the same slot too, see [`marker_key`]);
//! - field [`marker_field`]: `<entry_id> <stream>` (the source stream's name
//!   too, so two streams sharing a dead-letter stream never mistake each
//!   other's entries with equal ids for one);
//! - value: the id of the copy in the dead-letter stream.
//!
//! When the marker names a copy that is still in the stream (`XRANGE id id`),
//! the script appends nothing and returns that copy's id. When the copy is
//! gone (an operator deleted or trimmed it), a new one is appended and the
//! marker rewritten. When the whole dead-letter stream is gone, every marker
//! is stale and the hash is dropped (`UNLINK`) before the new copy is
//! recorded, so deleting the stream also frees its markers.
//!
//! The marker hash holds one field per dead-lettered entry (about 60 bytes);
//! dead letters are rare, and an operator trimming the dead-letter stream may
//! `HDEL` (or `DEL`) the matching markers.
//!
//! The script's work is bounded by the copy's size: two hash commands, one
//! single-entry `XRANGE` and one `XADD`. What it stores is bounded too: the
//! error text is capped at [`MAX_ERROR_BYTES`], and an entry with more than
//! [`MAX_COPIED_FIELDS`] fields keeps its first ones and says how many it
//! left out (`dead_letter_fields_omitted`).

use std::borrow::Cow;
use std::sync::LazyLock;

use lifecycle_domain::EntryId;
use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, Script, Value};

/// The most bytes of error text stored with a copy; a longer text is cut on
/// a character boundary and says how long it was.
pub const MAX_ERROR_BYTES: usize = 4096;

/// The most field/value pairs of the original entry copied. A script passes
/// the copy to `XADD` in one call, and Lua (as embedded in Redis) refuses to
/// spread more than about 8,000 values into one call; this leaves room for
/// the `dead_letter_*` fields.
pub const MAX_COPIED_FIELDS: usize = 3800;

/// The copy's field holding the original entry's id (`<ms>-<seq>`).
pub const ENTRY_ID_FIELD: &str = "dead_letter_entry_id";
/// The copy's field holding the name of the stream the entry came from.
pub const STREAM_FIELD: &str = "dead_letter_stream";
/// The copy's field holding why the entry failed (at most
/// [`MAX_ERROR_BYTES`]).
pub const ERROR_FIELD: &str = "dead_letter_error";
/// The copy's field holding after how many failed attempts it was copied.
pub const ATTEMPTS_FIELD: &str = "dead_letter_attempts";
/// The copy's field, present only when the entry had more than
/// [`MAX_COPIED_FIELDS`] fields, holding how many were left out.
pub const FIELDS_OMITTED_FIELD: &str = "dead_letter_fields_omitted";

/// `KEYS[1]`: the dead-letter stream; `KEYS[2]`: its marker hash.
/// `ARGV[1]`: the marker field; `ARGV[2..]`: the copy's field/value pairs.
/// Returns `{1, id}` when it appended the copy at `id`, `{0, id}` when the
/// copy the marker names is still in the stream at `id`.
const APPEND_ONCE_SCRIPT: &str = r"
local copy = redis.call('HGET', KEYS[2], ARGV[1])
if copy then
  -- pcall: a marker an operator edited into a non-id is stale, not fatal.
  local found = redis.pcall('XRANGE', KEYS[1], copy, copy)
  if type(found) == 'table' and not found.err and #found > 0 then
    return {0, copy}
  end
end
-- XADD is the script's first write: Redis refuses a script's first write
-- that may grow memory when over maxmemory, and only that one, so no other
-- write may come before it (an UNLINK first would let the copy through OOM).
local fresh = redis.call('EXISTS', KEYS[1]) == 0
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
if fresh then
  redis.call('UNLINK', KEYS[2])
end
redis.call('HSET', KEYS[2], ARGV[1], id)
return {1, id}
";

/// The script, hashed once: sent as `EVALSHA`, with `EVAL` when the server
/// does not know it yet.
static APPEND_ONCE: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND_ONCE_SCRIPT));

/// What [`append_once`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterOutcome {
    /// The copy was appended now, at this id.
    Appended(EntryId),
    /// A copy written earlier (a retry after a lost reply, a replay after a
    /// crash, another worker) is in the stream at this id; nothing was added.
    AlreadyThere(EntryId),
}

impl DeadLetterOutcome {
    /// The id of the entry's copy in the dead-letter stream.
    pub fn id(self) -> EntryId {
        match self {
            Self::Appended(id) | Self::AlreadyThere(id) => id,
        }
    }
}

/// Copies entry `entry_id` of `stream`, with `fields`, why it failed
/// (`error`) and after how many `attempts`, to `dead_letter_stream`, unless a
/// copy of it is already there. One atomic script; safe to retry.
///
/// # Errors
///
/// The [`RedisError`] of the call (classify it with
/// [`classify`](crate::fault::classify): a lost connection is transient, a
/// dead-letter key of another type is not), or one of kind
/// [`ErrorKind::UnexpectedReturnType`] when the reply is not the script's.
pub async fn append_once(
    conn: &mut impl ConnectionLike,
    dead_letter_stream: &str,
    stream: &str,
    entry_id: EntryId,
    fields: &[(&[u8], &[u8])],
    error: &str,
    attempts: u32,
) -> Result<DeadLetterOutcome, RedisError> {
    let mut invocation = APPEND_ONCE.key(dead_letter_stream);
    invocation
        .key(marker_key(dead_letter_stream))
        .arg(marker_field(stream, entry_id));
    let (copied, omitted) = fields.split_at(fields.len().min(MAX_COPIED_FIELDS));
    for (name, value) in copied {
        invocation.arg(*name).arg(*value);
    }
    invocation
        .arg(ENTRY_ID_FIELD)
        .arg(entry_id.to_string())
        .arg(STREAM_FIELD)
        .arg(stream)
        .arg(ERROR_FIELD)
        .arg(capped_error(error).as_ref())
        .arg(ATTEMPTS_FIELD)
        .arg(attempts);
    if !omitted.is_empty() {
        invocation.arg(FIELDS_OMITTED_FIELD).arg(omitted.len());
    }
    let reply: Value = invocation.invoke_async(conn).await?;
    parse_reply(&reply)
}

/// The marker hash of `dead_letter_stream`: a key in the same Redis Cluster
/// slot as the stream.
///
/// - A name without a hash tag and without `}` (the usual case, such as
///   `user:lifecycle_events:dead`): `{<name>}:entries`, whose tag is the
///   whole name.
/// - A name with a hash tag of its own (`{lobby}:dead`): `<name>:entries`,
///   which has the same tag.
/// - Any other name (a `}` outside a tag, `a}b`, or the empty name): no tag
///   can be the name, so the key is `{<n>}:<name>:entries` with `<n>` the
///   smallest number whose slot is the name's.
pub fn marker_key(dead_letter_stream: &str) -> String {
    let name = dead_letter_stream.as_bytes();
    if hash_tag(name).len() < name.len() {
        return format!("{dead_letter_stream}:entries");
    }
    if !name.is_empty() && !name.contains(&b'}') {
        return format!("{{{dead_letter_stream}}}:entries");
    }
    let slot = key_slot(name);
    match (0..SLOT_TAG_SEARCH).find(|n| key_slot(n.to_string().as_bytes()) == slot) {
        Some(n) => format!("{{{n}}}:{dead_letter_stream}:entries"),
        // Unreachable: every slot has a number below the bound (tested).
        None => format!("{dead_letter_stream}:entries"),
    }
}

/// The marker hash's field for entry `entry_id` of `stream`.
pub fn marker_field(stream: &str, entry_id: EntryId) -> String {
    format!("{entry_id} {stream}")
}

/// How many numbers [`marker_key`] tries for a tag in a given slot; every
/// slot is reached well below it.
const SLOT_TAG_SEARCH: u32 = 1_000_000;

/// Redis Cluster's slot of `key`: CRC16 of its hash tag (or of the whole key
/// without one), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) & 0x3fff
}

/// The part of `key` Redis Cluster hashes: what lies between the first `{`
/// and the first `}` after it, when that is not empty; else the whole key.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&byte| byte == b'{') else {
        return key;
    };
    let after = key.get(open + 1..).unwrap_or_default();
    match after.iter().position(|&byte| byte == b'}') {
        Some(close) if close > 0 => after.get(..close).unwrap_or(key),
        _ => key,
    }
}

/// CRC16-CCITT (XMODEM), the checksum of Redis Cluster's key slots.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

/// `error`, cut to at most [`MAX_ERROR_BYTES`] on a character boundary, with
/// a note of its full length when cut: what a copy stores as its error.
pub fn capped_error(error: &str) -> Cow<'_, str> {
    if error.len() <= MAX_ERROR_BYTES {
        return Cow::Borrowed(error);
    }
    let note = format!(" [... cut, {} bytes in all]", error.len());
    let keep = MAX_ERROR_BYTES.saturating_sub(note.len());
    let end = (0..=keep)
        .rev()
        .find(|&at| error.is_char_boundary(at))
        .unwrap_or(0);
    Cow::Owned(format!("{}{note}", error.get(..end).unwrap_or_default()))
}

/// Reads the script's `{appended, id}` reply without trusting its shape.
fn parse_reply(reply: &Value) -> Result<DeadLetterOutcome, RedisError> {
    let unexpected = || {
        RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "unexpected reply to the dead-letter script",
            format!("{reply:?}"),
        ))
    };
    let Value::Array(items) = reply else {
        return Err(unexpected());
    };
    let [Value::Int(appended), Value::BulkString(id)] = items.as_slice() else {
        return Err(unexpected());
    };
    let id = EntryId::from_bytes(id).map_err(|_| unexpected())?;
    Ok(if *appended == 1 {
        DeadLetterOutcome::Appended(id)
    } else {
        DeadLetterOutcome::AlreadyThere(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_cluster_specification() {
        // The check value given in the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    }

    #[test]
    fn hash_tags_follow_the_cluster_rules() {
        assert_eq!(hash_tag(b"plain"), b"plain");
        assert_eq!(hash_tag(b"{user}:x"), b"user");
        assert_eq!(hash_tag(b"a{}b"), b"a{}b");
        assert_eq!(hash_tag(b"a{b"), b"a{b");
        assert_eq!(hash_tag(b"a}b{c}"), b"c");
        assert_eq!(hash_tag(b"{{a}}"), b"{a");
    }

    #[test]
    fn the_marker_key_is_in_the_streams_slot_whatever_its_name() {
        for name in [
            "user:lifecycle_events:dead",
            "{lobby}:dead",
            "a{b",
            "a}b",
            "a{}b",
            "}{x}",
            "{}",
            "",
            "dead {letters}",
        ] {
            let key = marker_key(name);
            assert_eq!(
                key_slot(key.as_bytes()),
                key_slot(name.as_bytes()),
                "{name:?} -> {key:?}"
            );
        }
        assert_eq!(
            marker_key("user:lifecycle_events:dead"),
            "{user:lifecycle_events:dead}:entries"
        );
    }

    #[test]
    fn every_slot_has_a_number_tag_within_the_search_bound() {
        let mut seen = vec![false; 16384];
        let mut missing = seen.len();
        let mut n = 0_u32;
        while missing > 0 {
            assert!(n < SLOT_TAG_SEARCH, "{missing} slots unreached");
            if let Some(slot) = seen.get_mut(usize::from(key_slot(n.to_string().as_bytes()))) {
                if !*slot {
                    *slot = true;
                    missing -= 1;
                }
            }
            n += 1;
        }
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        assert_eq!(capped_error("short"), "short");
        let exact = "e".repeat(MAX_ERROR_BYTES);
        assert_eq!(capped_error(&exact), exact);
        for text in ["x".repeat(10_000), "é".repeat(5_000), "€x".repeat(3_000)] {
            let capped = capped_error(&text);
            assert!(capped.len() <= MAX_ERROR_BYTES, "{}", capped.len());
            assert!(capped.ends_with(&format!("{} bytes in all]", text.len())));
            let kept = capped.split(" [... cut").next().unwrap_or_default();
            assert!(text.starts_with(kept) && kept.len() > MAX_ERROR_BYTES - 64);
        }
    }

    #[test]
    fn replies_of_another_shape_are_errors_not_panics() {
        let id = || Value::BulkString(b"1-2".to_vec());
        assert_eq!(
            parse_reply(&Value::Array(vec![Value::Int(1), id()])).ok(),
            Some(DeadLetterOutcome::Appended(EntryId::new(1, 2)))
        );
        assert_eq!(
            parse_reply(&Value::Array(vec![Value::Int(0), id()])).ok(),
            Some(DeadLetterOutcome::AlreadyThere(EntryId::new(1, 2)))
        );
        for reply in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Int(1), Value::BulkString(b"nope".to_vec())]),
            Value::Array(vec![Value::Int(1), id(), id()]),
        ] {
            assert!(parse_reply(&reply).is_err(), "{reply:?}");
        }
    }
}
