//! Turning `XREAD` / `XRANGE` replies into stream entries without trusting
//! their shape: a reply that is not what Redis documents is an error, never a
//! panic.

use lifecycle_domain::EntryId;
use redis::Value;

/// One stream entry: its id and its field/value pairs as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    /// The entry's id.
    pub id: EntryId,
    /// Field/value pairs in the order Redis returned them (duplicates kept).
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A reply that does not have the shape Redis documents for the command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply from Redis: {0}")]
pub struct ReplyError(pub String);

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(raw) => Some(raw),
        Value::SimpleString(text) => Some(text.into_bytes()),
        Value::Int(number) => Some(number.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

fn array(value: Value, what: &str) -> Result<Vec<Value>, ReplyError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(ReplyError(format!(
            "{what}: expected an array, got {}",
            kind(&other)
        ))),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Int(_) => "integer",
        Value::BulkString(_) => "bulk string",
        Value::Array(_) => "array",
        Value::SimpleString(_) => "simple string",
        Value::Okay => "OK",
        Value::Map(_) => "map",
        Value::Set(_) => "set",
        Value::ServerError(_) => "error",
        _ => "other value",
    }
}

/// Parses one entry `[id, [field, value, ...]]`.
fn entry(value: Value) -> Result<StreamEntry, ReplyError> {
    let mut parts = array(value, "stream entry")?.into_iter();
    let id_raw = parts
        .next()
        .and_then(bytes)
        .ok_or_else(|| ReplyError("stream entry without an id".into()))?;
    let id = EntryId::from_bytes(&id_raw).map_err(|err| ReplyError(err.to_string()))?;
    // A deleted entry can come back with nil fields; it then has none.
    let flat = match parts.next() {
        Some(Value::Map(pairs)) => pairs
            .into_iter()
            .flat_map(|(name, value)| [name, value])
            .collect(),
        Some(value) => array(value, "stream entry fields")?,
        None => Vec::new(),
    };
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let Some(name) = flat.next() {
        // A value that is not a string (never sent by Redis) reads as empty
        // rather than shifting every later pair.
        let value = flat.next().and_then(bytes).unwrap_or_default();
        fields.push((bytes(name).unwrap_or_default(), value));
    }
    Ok(StreamEntry { id, fields })
}

/// Parses an `XRANGE` / `XREVRANGE` reply: an array of entries.
///
/// # Errors
///
/// [`ReplyError`] when the reply is not shaped like one.
pub fn parse_range_reply(reply: Value) -> Result<Vec<StreamEntry>, ReplyError> {
    array(reply, "range reply")?
        .into_iter()
        .map(entry)
        .collect()
}

/// Parses an `XREAD` reply for one stream: nil when the block timed out,
/// else `[[stream, [entry, ...]]]` (RESP2) or `{stream: [entry, ...]}` (RESP3).
///
/// # Errors
///
/// [`ReplyError`] when the reply is not shaped like one.
pub fn parse_xread_reply(reply: Value) -> Result<Vec<StreamEntry>, ReplyError> {
    let per_stream = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        other => array(other, "XREAD reply")?
            .into_iter()
            .map(|stream| {
                let mut parts = array(stream, "XREAD stream")?.into_iter();
                parts.next();
                Ok(parts.next().unwrap_or(Value::Nil))
            })
            .collect::<Result<Vec<_>, ReplyError>>()?,
    };
    let mut entries = Vec::new();
    for stream_entries in per_stream {
        for value in array(stream_entries, "XREAD entries")? {
            entries.push(entry(value)?);
        }
    }
    Ok(entries)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn entry_value(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    #[test]
    fn parses_a_resp2_xread_reply() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("user:lifecycle_events"),
            Value::Array(vec![
                entry_value("1-0", &["event_type", "user.deleted", "user_id", "u"]),
                entry_value("2-5", &["a", "b", "a", "c"]),
            ]),
        ])]);
        let entries = parse_xread_reply(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, EntryId::new(1, 0));
        assert_eq!(entries[0].fields[1], (b"user_id".to_vec(), b"u".to_vec()));
        assert_eq!(entries[1].id, EntryId::new(2, 5));
        assert_eq!(
            entries[1].fields.len(),
            2,
            "duplicates are kept for the decoder"
        );
    }

    #[test]
    fn nil_is_a_timed_out_block() {
        assert!(parse_xread_reply(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn parses_a_resp3_map_reply() {
        let reply = Value::Map(vec![(
            bulk("s"),
            Value::Array(vec![entry_value("3-1", &["k", "v"])]),
        )]);
        assert_eq!(parse_xread_reply(reply).unwrap()[0].id, EntryId::new(3, 1));
    }

    #[test]
    fn odd_field_lists_and_nil_fields_do_not_panic() {
        let reply = Value::Array(vec![
            entry_value("1-0", &["lonely"]),
            Value::Array(vec![bulk("2-0"), Value::Nil]),
            Value::Array(vec![bulk("3-0")]),
        ]);
        let entries = parse_range_reply(reply).unwrap();
        assert_eq!(entries[0].fields, vec![(b"lonely".to_vec(), Vec::new())]);
        assert!(entries[1].fields.is_empty());
        assert!(entries[2].fields.is_empty());
    }

    #[test]
    fn misshapen_replies_are_errors() {
        assert!(parse_xread_reply(Value::Int(3)).is_err());
        assert!(parse_range_reply(Value::Array(vec![Value::Int(1)])).is_err());
        assert!(parse_range_reply(Value::Array(vec![entry_value("x-y", &[])])).is_err());
        assert!(parse_range_reply(Value::Array(vec![Value::Array(vec![])])).is_err());
    }
}
