//! The wire contract: one stream entry's fields to one [`UserLifecycleEvent`].
//!
//! A pure function of the entry id and its field/value pairs, so every rule is
//! unit-tested without a server. Values are bytes: no byte sequence, size or
//! field count can make it panic.

use std::num::IntErrorKind;

use crate::entry_id::EntryId;
use crate::event::{EventType, UserLifecycleEvent};

/// The largest entry (field names plus values, in bytes) that is decoded; a
/// larger one is absorbed as malformed rather than held in memory as an event.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// How many characters of an offending value an error message quotes.
const QUOTED_CHARS: usize = 64;

/// Why an entry is malformed. The `Display` text is the reason operators see
/// in logs and in `tail --json`; it starts with the contract's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A required field is absent, empty or only white space.
    #[error("missing {field}")]
    MissingField {
        /// The field's wire name.
        field: &'static str,
    },
    /// A required field's value is not valid UTF-8.
    #[error("invalid {field}: not valid UTF-8")]
    NotUtf8 {
        /// The field's wire name.
        field: &'static str,
    },
    /// `occurred_at_ms` is not a base-10 signed 64-bit integer.
    #[error("invalid occurred_at_ms: {value:?} is not a base-10 integer")]
    OccurredAtNotInteger {
        /// The offending value, escaped and shortened.
        value: String,
    },
    /// `occurred_at_ms` is an integer outside the signed 64-bit range.
    #[error("invalid occurred_at_ms: {value:?} is out of the signed 64-bit range")]
    OccurredAtOutOfRange {
        /// The offending value, escaped and shortened.
        value: String,
    },
    /// `occurred_at_ms` is zero or negative.
    #[error("invalid occurred_at_ms: must be positive")]
    OccurredAtNotPositive,
    /// The entry is larger than [`MAX_ENTRY_BYTES`].
    #[error("entry too large: {bytes} bytes of fields and values, the limit is {limit}")]
    EntryTooLarge {
        /// Size of the entry's names and values.
        bytes: usize,
        /// The limit it exceeded.
        limit: usize,
    },
}

fn quote(raw: &str) -> String {
    raw.chars().take(QUOTED_CHARS).collect()
}

/// The last value of each field this decoder reads; later duplicates win.
#[derive(Default)]
struct Fields<'a> {
    event_type: Option<&'a [u8]>,
    user_id: Option<&'a [u8]>,
    occurred_at_ms: Option<&'a [u8]>,
    source: Option<&'a [u8]>,
    actor_type: Option<&'a [u8]>,
    actor_id: Option<&'a [u8]>,
    reason_code: Option<&'a [u8]>,
    trace_id: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    fn collect<K, V>(pairs: &'a [(K, V)]) -> Result<Self, DecodeError>
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut fields = Fields::default();
        let mut bytes = 0usize;
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref());
            bytes = bytes.saturating_add(name.len()).saturating_add(value.len());
            let slot = match name {
                b"event_type" => &mut fields.event_type,
                b"user_id" => &mut fields.user_id,
                b"occurred_at_ms" => &mut fields.occurred_at_ms,
                b"source" => &mut fields.source,
                b"actor_type" => &mut fields.actor_type,
                b"actor_id" => &mut fields.actor_id,
                b"reason_code" => &mut fields.reason_code,
                b"trace_id" => &mut fields.trace_id,
                _ => continue,
            };
            *slot = Some(value);
        }
        if bytes > MAX_ENTRY_BYTES {
            return Err(DecodeError::EntryTooLarge {
                bytes,
                limit: MAX_ENTRY_BYTES,
            });
        }
        Ok(fields)
    }
}

/// A required field as text: present, valid UTF-8 and not blank.
fn required<'a>(value: Option<&'a [u8]>, field: &'static str) -> Result<&'a str, DecodeError> {
    let raw = value.ok_or(DecodeError::MissingField { field })?;
    let text = std::str::from_utf8(raw).map_err(|_| DecodeError::NotUtf8 { field })?;
    if text.trim().is_empty() {
        return Err(DecodeError::MissingField { field });
    }
    Ok(text)
}

fn optional(value: Option<&[u8]>) -> String {
    value
        .map(|raw| String::from_utf8_lossy(raw).into_owned())
        .unwrap_or_default()
}

fn parse_occurred_at(text: &str) -> Result<i64, DecodeError> {
    // `i64::from_str` takes exactly what Go's `strconv.ParseInt(s, 10, 64)`
    // takes: an optional sign and ASCII digits, leading zeros allowed,
    // no white space, no `_`, no exponent, no radix prefix.
    let ms = text.parse::<i64>().map_err(|err| match err.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => {
            DecodeError::OccurredAtOutOfRange { value: quote(text) }
        }
        _ => DecodeError::OccurredAtNotInteger { value: quote(text) },
    })?;
    if ms <= 0 {
        return Err(DecodeError::OccurredAtNotPositive);
    }
    Ok(ms)
}

/// Decodes one stream entry into an event, following the contract table in
/// the README ("The wire contract"): `event_type` kept as sent, `user_id` trimmed, `occurred_at_ms`
/// a positive signed 64-bit integer exactly as sent, optional fields kept as
/// sent (lossily decoded), unknown fields ignored, the last of duplicated
/// field names winning.
///
/// # Errors
///
/// [`DecodeError`] when the entry is malformed; the caller absorbs it.
pub fn decode_user_lifecycle_event<K, V>(
    entry_id: EntryId,
    pairs: &[(K, V)],
) -> Result<UserLifecycleEvent, DecodeError>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let fields = Fields::collect(pairs)?;
    let event_type = required(fields.event_type, "event_type")?;
    let user_id = required(fields.user_id, "user_id")?;
    let occurred_at = required(fields.occurred_at_ms, "occurred_at_ms")?;
    let occurred_at_ms = parse_occurred_at(occurred_at)?;
    Ok(UserLifecycleEvent {
        entry_id,
        event_type: EventType::from_wire(event_type),
        user_id: user_id.trim().to_owned(),
        occurred_at_ms,
        source: optional(fields.source),
        actor_type: optional(fields.actor_type),
        actor_id: optional(fields.actor_id),
        reason_code: optional(fields.reason_code),
        trace_id: optional(fields.trace_id),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: EntryId = EntryId::new(1_700_000_000_000, 7);

    fn decode(pairs: &[(&str, &str)]) -> Result<UserLifecycleEvent, DecodeError> {
        decode_user_lifecycle_event(ID, pairs)
    }

    fn with(field: &str, value: &str) -> Vec<(String, String)> {
        let mut pairs = vec![
            ("event_type".to_owned(), "user.deleted".to_owned()),
            ("user_id".to_owned(), "u-1".to_owned()),
            ("occurred_at_ms".to_owned(), "1700000000000".to_owned()),
        ];
        pairs.retain(|(name, _)| name != field);
        pairs.push((field.to_owned(), value.to_owned()));
        pairs
    }

    fn error_for(field: &str, value: &str) -> String {
        decode_user_lifecycle_event(ID, &with(field, value))
            .unwrap_err()
            .to_string()
    }

    fn occurred_at(value: &str) -> Result<i64, String> {
        decode_user_lifecycle_event(ID, &with("occurred_at_ms", value))
            .map(|event| event.occurred_at_ms)
            .map_err(|err| err.to_string())
    }

    #[test]
    fn decodes_a_complete_entry() {
        let event = decode(&[
            ("event_type", "user.permanently_blocked"),
            ("user_id", "u-42"),
            ("occurred_at_ms", "1700000000123"),
            ("source", "user-service"),
            ("actor_type", "admin"),
            ("actor_id", "a-1"),
            ("reason_code", "fraud"),
            ("trace_id", "t-9"),
            ("unrelated", "ignored"),
        ])
        .unwrap();
        assert_eq!(
            event,
            UserLifecycleEvent {
                entry_id: ID,
                event_type: EventType::UserPermanentlyBlocked,
                user_id: "u-42".into(),
                occurred_at_ms: 1_700_000_000_123,
                source: "user-service".into(),
                actor_type: "admin".into(),
                actor_id: "a-1".into(),
                reason_code: "fraud".into(),
                trace_id: "t-9".into(),
            }
        );
    }

    #[test]
    fn absent_optional_fields_are_empty() {
        let event = decode_user_lifecycle_event(ID, &with("source", "s")).unwrap();
        assert_eq!(event.source, "s");
        assert_eq!(event.actor_type, "");
        assert_eq!(event.actor_id, "");
        assert_eq!(event.reason_code, "");
        assert_eq!(event.trace_id, "");
    }

    #[test]
    fn missing_empty_or_blank_required_fields_are_missing() {
        for field in ["event_type", "user_id", "occurred_at_ms"] {
            let mut absent = with(field, "x");
            absent.retain(|(name, _)| name != field);
            assert_eq!(
                decode_user_lifecycle_event(ID, &absent)
                    .unwrap_err()
                    .to_string(),
                format!("missing {field}")
            );
            for blank in ["", " ", "\t\n\r", "\u{a0}", "\u{2003}\u{3000}", "\u{85}"] {
                assert_eq!(
                    error_for(field, blank),
                    format!("missing {field}"),
                    "{blank:?}"
                );
            }
        }
    }

    #[test]
    fn required_fields_are_checked_in_contract_order() {
        assert_eq!(decode(&[]).unwrap_err().to_string(), "missing event_type");
        assert_eq!(
            decode(&[("event_type", "x")]).unwrap_err().to_string(),
            "missing user_id"
        );
        assert_eq!(
            decode(&[("event_type", "x"), ("user_id", "u")])
                .unwrap_err()
                .to_string(),
            "missing occurred_at_ms"
        );
    }

    #[test]
    fn event_type_is_kept_exactly_as_sent() {
        let event = decode_user_lifecycle_event(ID, &with("event_type", " user.deleted ")).unwrap();
        assert_eq!(
            event.event_type,
            EventType::Unknown(" user.deleted ".into())
        );
        assert!(!event.event_type.is_known());
        let event = decode_user_lifecycle_event(ID, &with("event_type", "user.created")).unwrap();
        assert_eq!(event.event_type.as_str(), "user.created");
    }

    #[test]
    fn user_id_is_trimmed_of_unicode_white_space() {
        for (sent, kept) in [
            ("  u-1  ", "u-1"),
            ("\tu-1\n", "u-1"),
            ("\u{a0}u-1\u{2029}", "u-1"),
            ("\u{3000}u 1\u{85}", "u 1"),
        ] {
            let event = decode_user_lifecycle_event(ID, &with("user_id", sent)).unwrap();
            assert_eq!(event.user_id, kept, "{sent:?}");
        }
        // U+200B ZERO WIDTH SPACE is not White_Space, so it stays.
        let event = decode_user_lifecycle_event(ID, &with("user_id", "\u{200b}u")).unwrap();
        assert_eq!(event.user_id, "\u{200b}u");
    }

    #[test]
    fn optional_fields_are_kept_exactly_as_sent() {
        let event = decode_user_lifecycle_event(ID, &with("reason_code", "  spaced \n")).unwrap();
        assert_eq!(event.reason_code, "  spaced \n");
    }

    #[test]
    fn occurred_at_accepts_signs_and_leading_zeros() {
        assert_eq!(occurred_at("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(occurred_at("+1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(occurred_at("0001700000000000"), Ok(1_700_000_000_000));
        assert_eq!(occurred_at("1"), Ok(1));
        assert_eq!(occurred_at("9223372036854775807"), Ok(i64::MAX));
    }

    #[test]
    fn occurred_at_must_be_positive() {
        for value in [
            "0",
            "-0",
            "+0",
            "000",
            "-1",
            "-1700000000000",
            "-9223372036854775808",
        ] {
            assert_eq!(
                occurred_at(value),
                Err("invalid occurred_at_ms: must be positive".into()),
                "{value:?}"
            );
        }
    }

    #[test]
    fn occurred_at_rejects_what_go_rejects() {
        for value in [
            " 1700000000000",
            "1700000000000 ",
            "\t1",
            "1e3",
            "0x10",
            "1_000",
            "1.5",
            "++1",
            "+-1",
            "-",
            "+",
            "١٢٣",
            "12abc",
        ] {
            let err = occurred_at(value).unwrap_err();
            assert!(
                err.starts_with("invalid occurred_at_ms: "),
                "{value:?}: {err}"
            );
            assert!(
                err.ends_with("is not a base-10 integer"),
                "{value:?}: {err}"
            );
        }
    }

    #[test]
    fn occurred_at_overflow_is_out_of_range() {
        for value in [
            "9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999999",
        ] {
            let err = occurred_at(value).unwrap_err();
            assert!(err.starts_with("invalid occurred_at_ms: "), "{err}");
            assert!(err.ends_with("out of the signed 64-bit range"), "{err}");
        }
    }

    #[test]
    fn the_last_duplicate_wins() {
        let event = decode(&[
            ("event_type", "user.created"),
            ("user_id", "first"),
            ("occurred_at_ms", "5"),
            ("event_type", "user.deleted"),
            ("user_id", "second"),
        ])
        .unwrap();
        assert_eq!(event.event_type, EventType::UserDeleted);
        assert_eq!(event.user_id, "second");
        // A later blank value also wins, and makes the entry malformed.
        let err = decode(&[
            ("event_type", "user.deleted"),
            ("user_id", "u"),
            ("occurred_at_ms", "5"),
            ("user_id", " "),
        ])
        .unwrap_err();
        assert_eq!(err, DecodeError::MissingField { field: "user_id" });
    }

    #[test]
    fn non_utf8_required_fields_are_malformed_naming_the_field() {
        for field in ["event_type", "user_id", "occurred_at_ms"] {
            let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = with(field, "x")
                .into_iter()
                .filter(|(name, _)| name != field)
                .map(|(n, v)| (n.into_bytes(), v.into_bytes()))
                .collect();
            pairs.push((field.as_bytes().to_vec(), vec![b'u', 0xff, 0xfe]));
            let err = decode_user_lifecycle_event(ID, &pairs).unwrap_err();
            assert_eq!(err.to_string(), format!("invalid {field}: not valid UTF-8"));
        }
    }

    #[test]
    fn non_utf8_optional_fields_decode_lossily() {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = with("source", "x")
            .into_iter()
            .map(|(n, v)| (n.into_bytes(), v.into_bytes()))
            .collect();
        pairs.push((b"trace_id".to_vec(), vec![b't', 0xff, b'!']));
        let event = decode_user_lifecycle_event(ID, &pairs).unwrap();
        assert_eq!(event.trace_id, "t\u{fffd}!");
    }

    #[test]
    fn error_messages_quote_values_escaped_and_short() {
        let long = format!("\n\u{1b}[31m{}", "9".repeat(10_000));
        let err = occurred_at(&long).unwrap_err();
        assert!(!err.contains('\n') && !err.contains('\u{1b}'), "{err}");
        assert!(err.len() < 200, "{}", err.len());
        // The start of the value is quoted, cut to its first characters.
        let err = occurred_at("12ab").unwrap_err();
        assert!(err.contains("\"12ab\""), "{err}");
        let err = occurred_at(&"7".repeat(100)).unwrap_err();
        let quoted = "7".repeat(QUOTED_CHARS);
        assert!(err.contains(&format!("\"{quoted}\"")), "{err}");
    }

    #[test]
    fn very_large_values_decode_up_to_the_limit() {
        let big = "x".repeat(MAX_ENTRY_BYTES - 200);
        let event = decode_user_lifecycle_event(ID, &with("trace_id", &big)).unwrap();
        assert_eq!(event.trace_id.len(), big.len());
        // An entry of exactly the limit decodes; one byte more does not.
        let mut at_limit = with("trace_id", "");
        let others: usize = at_limit.iter().map(|(k, v)| k.len() + v.len()).sum();
        if let Some((_, value)) = at_limit.iter_mut().find(|(k, _)| k == "trace_id") {
            *value = "x".repeat(MAX_ENTRY_BYTES - others);
        }
        assert!(decode_user_lifecycle_event(ID, &at_limit).is_ok());
        if let Some((_, value)) = at_limit.iter_mut().find(|(k, _)| k == "trace_id") {
            value.push('x');
        }
        let err = decode_user_lifecycle_event(ID, &at_limit).unwrap_err();
        assert!(
            matches!(err, DecodeError::EntryTooLarge { bytes, limit } if bytes == MAX_ENTRY_BYTES + 1 && limit == MAX_ENTRY_BYTES),
            "{err}"
        );
        let too_big = "x".repeat(MAX_ENTRY_BYTES);
        let err = decode_user_lifecycle_event(ID, &with("trace_id", &too_big)).unwrap_err();
        assert!(err.to_string().starts_with("entry too large"), "{err}");
        // Ignored fields count too: they are held in memory all the same.
        let err = decode_user_lifecycle_event(ID, &with("padding", &too_big)).unwrap_err();
        assert!(matches!(err, DecodeError::EntryTooLarge { .. }));
    }

    #[test]
    fn thousands_of_fields_decode() {
        let mut pairs = with("source", "s");
        for i in 0..5000 {
            pairs.push((format!("f{i}"), "v".into()));
        }
        pairs.push((String::new(), String::new()));
        assert!(decode_user_lifecycle_event(ID, &pairs).is_ok());
    }

    fn field_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"event_type".to_vec()),
            Just(b"user_id".to_vec()),
            Just(b"occurred_at_ms".to_vec()),
            Just(b"source".to_vec()),
            Just(b"trace_id".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ]
    }

    fn field_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            "[ +\\-0-9\u{a0}\u{3000}]{0,24}".prop_map(String::into_bytes),
            Just(b"user.deleted".to_vec()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn no_field_map_panics_the_decoder(
            ms in any::<u64>(),
            seq in any::<u64>(),
            pairs in proptest::collection::vec((field_name(), field_value()), 0..24),
        ) {
            match decode_user_lifecycle_event(EntryId::new(ms, seq), &pairs) {
                Ok(event) => {
                    prop_assert!(event.occurred_at_ms > 0);
                    prop_assert!(!event.user_id.is_empty());
                    prop_assert_eq!(event.user_id.trim(), event.user_id.as_str());
                    prop_assert_eq!(event.entry_id, EntryId::new(ms, seq));
                }
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }
    }
}
