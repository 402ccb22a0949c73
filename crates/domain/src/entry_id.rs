//! Redis stream entry ids.

use std::fmt;
use std::str::FromStr;

/// A stream entry id `<ms>-<seq>`, ordered numerically (never as a string:
/// `"10-0"` sorts after `"9-0"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    /// Milliseconds part, as assigned by the Redis server that added the entry.
    pub ms: u64,
    /// Sequence number within the millisecond.
    pub seq: u64,
}

impl EntryId {
    /// The id before every entry (`0-0`): reading after it reads a whole stream.
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };
    /// The largest id a stream can hold.
    pub const MAX: EntryId = EntryId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// Builds an id from its two parts.
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The id just before this one, for turning an inclusive start into the
    /// exclusive one `XREAD` takes. `None` for `0-0`.
    pub fn predecessor(self) -> Option<EntryId> {
        if self.seq > 0 {
            Some(EntryId::new(self.ms, self.seq - 1))
        } else if self.ms > 0 {
            Some(EntryId::new(self.ms - 1, u64::MAX))
        } else {
            None
        }
    }

    /// Parses an id from raw bytes as Redis sends them.
    ///
    /// # Errors
    ///
    /// [`ParseEntryIdError`] when the bytes are not `<u64>-<u64>`.
    pub fn from_bytes(raw: &[u8]) -> Result<Self, ParseEntryIdError> {
        // The hot path of every read: digits, a dash, digits, parsed in place.
        let err = || ParseEntryIdError::new(raw);
        let dash = raw.iter().position(|&byte| byte == b'-').ok_or_else(err)?;
        let (ms, seq) = raw.split_at(dash);
        let seq = seq.get(1..).unwrap_or_default();
        Ok(EntryId::new(
            digits_value(ms).ok_or_else(err)?,
            digits_value(seq).ok_or_else(err)?,
        ))
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A text that is not a stream entry id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a stream entry id: expected <milliseconds>-<sequence>, two unsigned 64-bit integers, such as 1700000000000-0")]
pub struct ParseEntryIdError {
    /// The rejected text, lossily decoded and cut to a readable length.
    pub input: String,
}

impl ParseEntryIdError {
    fn new(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw);
        let input = text.chars().take(64).collect();
        Self { input }
    }
}

/// The value of a non-empty run of ASCII digits that fits in a `u64`.
fn digits_value(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &byte| {
        let digit = byte.checked_sub(b'0').filter(|digit| *digit <= 9)?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn parse_part(part: &str) -> Option<u64> {
    // `u64::from_str` accepts a leading `+`; an id never has one.
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    part.parse().ok()
}

impl FromStr for EntryId {
    type Err = ParseEntryIdError;

    /// Parses `<ms>-<seq>`; a bare `<ms>` means `<ms>-0`, as in Redis range
    /// commands.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseEntryIdError::new(s.as_bytes());
        match s.split_once('-') {
            Some((ms, seq)) => Ok(EntryId::new(
                parse_part(ms).ok_or_else(err)?,
                parse_part(seq).ok_or_else(err)?,
            )),
            None => Ok(EntryId::new(parse_part(s).ok_or_else(err)?, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_numerically_not_as_text() {
        let nine: EntryId = "9-0".parse().unwrap();
        let ten: EntryId = "10-0".parse().unwrap();
        assert!(ten > nine);
        assert!(EntryId::new(5, 10) > EntryId::new(5, 9));
        assert!(EntryId::new(6, 0) > EntryId::new(5, u64::MAX));
    }

    #[test]
    fn round_trips_through_text() {
        for text in ["0-0", "1-2", "18446744073709551615-18446744073709551615"] {
            let id: EntryId = text.parse().unwrap();
            assert_eq!(id.to_string(), text);
        }
        assert_eq!("42".parse::<EntryId>().unwrap(), EntryId::new(42, 0));
    }

    #[test]
    fn rejects_what_is_not_an_id() {
        for text in [
            "",
            "-",
            "1-",
            "-1",
            "+1-0",
            "1-+0",
            "a-b",
            "1-2-3",
            " 1-0",
            "1-0 ",
            "18446744073709551616-0",
            "$",
            ">",
        ] {
            assert!(text.parse::<EntryId>().is_err(), "{text:?} parsed");
        }
        assert!(EntryId::from_bytes(&[0xff, b'-', b'1']).is_err());
        for raw in [
            &b"1-"[..],
            b"-1",
            b"1-2-3",
            b"1",
            b"+1-0",
            b"18446744073709551616-0",
        ] {
            assert!(EntryId::from_bytes(raw).is_err(), "{raw:?}");
        }
        assert_eq!(EntryId::from_bytes(b"12-34").unwrap(), EntryId::new(12, 34));
    }

    #[test]
    fn predecessor_steps_back_one() {
        assert_eq!(EntryId::new(5, 3).predecessor(), Some(EntryId::new(5, 2)));
        assert_eq!(
            EntryId::new(5, 0).predecessor(),
            Some(EntryId::new(4, u64::MAX))
        );
        assert_eq!(EntryId::ZERO.predecessor(), None);
    }
}
