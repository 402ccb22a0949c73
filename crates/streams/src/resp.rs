//! Reading `XREAD` replies straight off the socket.
//!
//! A general Redis client turns every reply into a tree of owned values: one
//! allocation per field of every entry. The consumer's hot path does not need
//! that. [`XreadParser`] scans a RESP2 reply in place and records where each
//! entry's id, names and values lie in the receive buffer; the finished reply
//! becomes one shared [`Batch`] whose entries are borrowed views. The scan is
//! resumable at entry granularity, so a reply that arrives in many socket reads
//! is not rescanned from its start, and a bulk string announces its length, so
//! nothing is scanned again until it has fully arrived.
//!
//! Nothing here trusts the peer: lengths and counts are bounded, every index is
//! checked, and a reply that is not what Redis sends is a [`ProtocolError`].

use bytes::Bytes;
use lifecycle_domain::EntryId;

/// The largest bulk string Redis can send (its `proto-max-bulk-len` ceiling).
const MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Bytes the scanner keeps per string (a field name or value) it records.
pub(crate) const SPAN_BYTES: usize = std::mem::size_of::<Span>();
/// Bytes the scanner keeps per entry it records.
const SLOT_BYTES: usize = std::mem::size_of::<EntrySlot>();
/// Counts larger than this are not preallocated: memory grows with what
/// actually arrives, not with what a header claims.
const MAX_PREALLOCATED: usize = 4096;

/// A reply that is not shaped like an `XREAD` reply for one stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XREAD reply: {0}")]
pub struct ProtocolError(pub String);

fn protocol(message: impl Into<String>) -> ProtocolError {
    ProtocolError(message.into())
}

/// An error reply from the server (`-CODE message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReplyError {
    /// The first word, such as `WRONGTYPE` or `LOADING`.
    pub code: String,
    /// The whole error line.
    pub message: String,
}

/// What one call to [`XreadParser::parse`] found.
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole reply of this many bytes was parsed.
    Complete(usize),
    /// The server answered with an error of this many bytes.
    Error(usize, ServerReplyError),
}

/// Where one field name or value lies in the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// One entry's place in the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EntrySlot {
    id: EntryId,
    /// Index of its first span in `spans`.
    first: usize,
    /// How many spans (names and values alternate).
    count: usize,
    /// Bytes of names and values.
    size: usize,
}

/// Where the scan of the current reply stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Nothing of the reply parsed yet.
    Header,
    /// The header is parsed; this many entries remain.
    Entries { remaining: usize },
}

/// A resumable scanner of one `XREAD` reply at a time.
#[derive(Debug)]
pub struct XreadParser {
    stage: Stage,
    /// Position just after the last complete unit (header or entry).
    pos: usize,
    /// Buffer length needed before scanning again is worth it.
    need: usize,
    entries: Vec<EntrySlot>,
    spans: Vec<Span>,
    /// The id of the entry being parsed, once its id has arrived.
    partial_id: Option<EntryId>,
}

impl Default for XreadParser {
    fn default() -> Self {
        Self::new()
    }
}

/// A cursor over a buffer that gives up (returns `None`) when bytes run out.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Set when a bulk string's header was read but not its body: the total
    /// buffer length that would complete it.
    need: usize,
}

/// One RESP header line.
enum Line<'a> {
    Array(i64),
    Bulk(i64),
    Simple(&'a [u8]),
    Integer(&'a [u8]),
    Error(&'a [u8]),
}

impl<'a> Cursor<'a> {
    fn line(&mut self) -> Result<Option<Line<'a>>, ProtocolError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some((&kind, body)) = rest.split_first() else {
            return Ok(None);
        };
        // Lengths and counts, the common case, are parsed in the same pass
        // that finds the end of the line.
        if kind == b'*' || kind == b'$' {
            let Some((value, used)) = parse_length_line(body)? else {
                return Ok(None);
            };
            self.pos += 1 + used;
            return Ok(Some(if kind == b'*' {
                Line::Array(value)
            } else {
                Line::Bulk(value)
            }));
        }
        let Some(cr) = body.iter().position(|&byte| byte == b'\r') else {
            return Ok(None);
        };
        match body.get(cr + 1) {
            None => return Ok(None),
            Some(b'\n') => {}
            Some(_) => return Err(protocol("a line does not end with CRLF")),
        }
        let text = body.get(..cr).unwrap_or_default();
        self.pos += cr + 3;
        Ok(Some(match kind {
            b'+' => Line::Simple(text),
            b':' => Line::Integer(text),
            b'-' => Line::Error(text),
            other => {
                return Err(protocol(format!(
                    "unexpected type byte {:?}",
                    char::from(other)
                )))
            }
        }))
    }

    /// A bulk string's body of `len` bytes and its CRLF.
    fn body(&mut self, len: i64) -> Result<Option<Span>, ProtocolError> {
        let len = usize::try_from(len).map_err(|_| protocol("negative bulk length"))?;
        if len > MAX_BULK_LEN {
            return Err(protocol(format!("bulk string of {len} bytes")));
        }
        let start = self.pos;
        let end = start.saturating_add(len);
        let after = end.saturating_add(2);
        if self.buf.len() < after {
            self.need = after;
            return Ok(None);
        }
        if self.buf.get(end..after) != Some(b"\r\n".as_slice()) {
            return Err(protocol("a bulk string does not end with CRLF"));
        }
        self.pos = after;
        Ok(Some(Span { start, end }))
    }

    /// A string element: a bulk string, or (leniently) a simple string or an
    /// integer, as the span of its text. `Ok(None)`: incomplete.
    fn string(&mut self) -> Result<Option<Option<Span>>, ProtocolError> {
        let line_start = self.pos;
        match self.line()? {
            None => Ok(None),
            Some(Line::Bulk(-1)) => Ok(Some(None)),
            Some(Line::Bulk(len)) => Ok(self.body(len)?.map(Some)),
            Some(Line::Simple(text) | Line::Integer(text)) => {
                let start = line_start + 1;
                Ok(Some(Some(Span {
                    start,
                    end: start + text.len(),
                })))
            }
            Some(_) => Err(protocol("expected a string")),
        }
    }
}

/// Parses `<digits>\r\n` or `-1\r\n` at the start of `body`: the value and
/// the bytes used, or `None` when the line has not fully arrived.
fn parse_length_line(body: &[u8]) -> Result<Option<(i64, usize)>, ProtocolError> {
    let (negative, digits_start) = match body.first() {
        None => return Ok(None),
        Some(b'-') => (true, 1),
        Some(_) => (false, 0),
    };
    let mut value: i64 = 0;
    let mut index = digits_start;
    loop {
        match body.get(index) {
            None => return Ok(None),
            Some(digit @ b'0'..=b'9') => {
                value = value
                    .checked_mul(10)
                    .and_then(|value| value.checked_add(i64::from(digit - b'0')))
                    .ok_or_else(|| protocol("a length overflows"))?;
                index += 1;
            }
            Some(b'\r') => break,
            Some(_) => return Err(protocol("a length is not a number")),
        }
    }
    if index == digits_start {
        return Err(protocol("a length is not a number"));
    }
    match body.get(index + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((if negative { -value } else { value }, index + 2))),
        Some(_) => Err(protocol("a line does not end with CRLF")),
    }
}

fn count(value: i64, what: &str) -> Result<usize, ProtocolError> {
    usize::try_from(value).map_err(|_| protocol(format!("negative {what} count")))
}

impl XreadParser {
    /// A parser ready for a reply.
    pub fn new() -> Self {
        Self {
            stage: Stage::Header,
            pos: 0,
            need: 0,
            entries: Vec::new(),
            spans: Vec::new(),
            partial_id: None,
        }
    }

    /// Entries of the current reply parsed so far.
    pub fn entries_parsed(&self) -> usize {
        self.entries.len()
    }

    /// The id of the entry whose fields are still arriving, if any.
    pub fn partial_entry_id(&self) -> Option<EntryId> {
        self.partial_id
    }

    /// Scans `buf`, which holds the reply from its first byte (and possibly
    /// more after it). Call again with the same, longer buffer after
    /// [`Parsed::Incomplete`].
    ///
    /// # Errors
    ///
    /// [`ProtocolError`] when the bytes are not an `XREAD` reply; the
    /// connection must then be dropped.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Parsed, ProtocolError> {
        if buf.len() < self.need {
            return Ok(Parsed::Incomplete);
        }
        let mut cursor = Cursor {
            buf,
            pos: self.pos,
            need: 0,
        };
        let result = self.scan(&mut cursor);
        self.need = cursor.need;
        result
    }

    fn scan(&mut self, cursor: &mut Cursor<'_>) -> Result<Parsed, ProtocolError> {
        if self.stage == Stage::Header {
            match cursor.line()? {
                None => return Ok(Parsed::Incomplete),
                Some(Line::Error(text)) => {
                    let message = String::from_utf8_lossy(text).into_owned();
                    let code = message.split(' ').next().unwrap_or_default().to_owned();
                    return Ok(Parsed::Error(
                        cursor.pos,
                        ServerReplyError { code, message },
                    ));
                }
                // A block that timed out: RESP2's null array.
                Some(Line::Array(-1)) => {
                    self.pos = cursor.pos;
                    return Ok(Parsed::Complete(cursor.pos));
                }
                Some(Line::Array(1)) => {}
                Some(_) => return Err(protocol("expected one stream")),
            }
            match cursor.line()? {
                None => return Ok(Parsed::Incomplete),
                Some(Line::Array(2)) => {}
                Some(_) => return Err(protocol("expected [stream, entries]")),
            }
            match cursor.string()? {
                None => return Ok(Parsed::Incomplete),
                Some(_stream_name) => {}
            }
            let remaining = match cursor.line()? {
                None => return Ok(Parsed::Incomplete),
                Some(Line::Array(n)) => count(n, "entry")?,
                Some(_) => return Err(protocol("expected the entries array")),
            };
            self.entries.reserve(remaining.min(MAX_PREALLOCATED));
            self.stage = Stage::Entries { remaining };
            self.pos = cursor.pos;
        }
        while let Stage::Entries { remaining } = self.stage {
            if remaining == 0 {
                return Ok(Parsed::Complete(self.pos));
            }
            let spans_before = self.spans.len();
            match self.entry(cursor) {
                Ok(Some(slot)) => {
                    self.partial_id = None;
                    self.entries.push(slot);
                    self.pos = cursor.pos;
                    self.stage = Stage::Entries {
                        remaining: remaining - 1,
                    };
                }
                Ok(None) => {
                    self.spans.truncate(spans_before);
                    return Ok(Parsed::Incomplete);
                }
                Err(err) => return Err(err),
            }
        }
        Ok(Parsed::Complete(self.pos))
    }

    /// One entry `[id, [name, value, ...]]`; `Ok(None)` when incomplete.
    fn entry(&mut self, cursor: &mut Cursor<'_>) -> Result<Option<EntrySlot>, ProtocolError> {
        match cursor.line()? {
            None => return Ok(None),
            Some(Line::Array(2)) => {}
            Some(_) => return Err(protocol("expected an [id, fields] pair")),
        }
        let id_span = match cursor.string()? {
            None => return Ok(None),
            Some(Some(span)) => span,
            Some(None) => return Err(protocol("an entry without an id")),
        };
        let raw_id = cursor
            .buf
            .get(id_span.start..id_span.end)
            .unwrap_or_default();
        let id = EntryId::from_bytes(raw_id).map_err(|err| protocol(err.to_string()))?;
        self.partial_id = Some(id);
        let elements = match cursor.line()? {
            None => return Ok(None),
            // A deleted entry can come back with nil fields.
            Some(Line::Array(-1)) => 0,
            Some(Line::Array(n)) => count(n, "field")?,
            Some(_) => return Err(protocol("expected the fields array")),
        };
        let first = self.spans.len();
        let mut size = 0usize;
        for _ in 0..elements {
            let span = match cursor.string()? {
                None => return Ok(None),
                Some(span) => span.unwrap_or(Span {
                    start: cursor.pos,
                    end: cursor.pos,
                }),
            };
            size = size.saturating_add(span.end - span.start);
            self.spans.push(span);
        }
        if elements % 2 == 1 {
            // A name without a value (never sent by Redis) gets an empty one
            // rather than shifting every later pair.
            self.spans.push(Span {
                start: cursor.pos,
                end: cursor.pos,
            });
        }
        Ok(Some(EntrySlot {
            id,
            first,
            count: self.spans.len() - first,
            size,
        }))
    }

    /// Hands over the parsed reply, whose bytes are `data`, and resets for the
    /// next one.
    pub fn take_batch(&mut self, data: Bytes) -> Batch {
        let batch = Batch {
            data,
            entries: std::mem::take(&mut self.entries),
            spans: std::mem::take(&mut self.spans),
        };
        *self = Self::new();
        batch
    }

    /// Bytes held for the reply being parsed, `buffered` of which are
    /// received: the bytes and the records of what was scanned so far.
    pub fn held_bytes(&self, buffered: usize) -> usize {
        parsed_bytes(buffered, self.entries.len(), self.spans.len())
    }

    /// Forgets a partly parsed reply (after the connection was dropped).
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

/// What the deletion probe (run just before a read, on the same connection)
/// saw of the stream: whether it was trimmed or had entries deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeletionProbe {
    /// The oldest entry still in the stream, if any.
    pub first_entry_id: Option<EntryId>,
    /// The largest id ever removed by `XDEL` (Redis 7), if any.
    pub max_deleted_entry_id: Option<EntryId>,
    /// The id of the last entry ever added, if any.
    pub last_generated_id: Option<EntryId>,
    /// How many entries were ever added (Redis 7).
    pub entries_added: Option<u64>,
    /// How many entries the stream holds.
    pub length: Option<u64>,
}

/// The probe's script: the fields of `XINFO STREAM` that reveal deletions,
/// without shipping the first and last entries `XINFO` also returns. A
/// missing key or one of another type answers empty strings (the read that
/// follows reports the latter).
pub const DELETION_PROBE_SCRIPT: &str = r"
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[1])
if not ok then return { '', '', '', '', '' } end
local first, deleted, last, added, length = '', '', '', '', ''
for i = 1, #info, 2 do
  local name = info[i]
  if name == 'recorded-first-entry-id' then
    first = info[i + 1]
  elseif name == 'max-deleted-entry-id' then
    deleted = info[i + 1]
  elseif name == 'last-generated-id' then
    last = info[i + 1]
  elseif name == 'entries-added' then
    added = tostring(info[i + 1])
  elseif name == 'length' then
    length = tostring(info[i + 1])
  elseif name == 'first-entry' and first == '' and type(info[i + 1]) == 'table' then
    first = info[i + 1][1]
  end
end
return { first, deleted, last, added, length }
";

/// Parses the probe's reply at the start of `buf`: its length and content,
/// or `None` when it has not fully arrived. An error reply reads as a probe
/// that saw nothing.
///
/// # Errors
///
/// [`ProtocolError`] when the bytes are not such a reply.
pub fn parse_probe_reply(buf: &[u8]) -> Result<Option<(usize, DeletionProbe)>, ProtocolError> {
    let mut cursor = Cursor {
        buf,
        pos: 0,
        need: 0,
    };
    match cursor.line()? {
        None => return Ok(None),
        Some(Line::Error(_)) => return Ok(Some((cursor.pos, DeletionProbe::default()))),
        Some(Line::Array(5)) => {}
        Some(_) => return Err(protocol("expected the deletion probe's five fields")),
    }
    let mut texts: [Option<&[u8]>; 5] = [None; 5];
    for slot in &mut texts {
        match cursor.string()? {
            None => return Ok(None),
            Some(span) => *slot = span.and_then(|span| buf.get(span.start..span.end)),
        }
    }
    let id = |raw: Option<&[u8]>| {
        raw.and_then(|raw| EntryId::from_bytes(raw).ok())
            .filter(|id| *id > EntryId::ZERO)
    };
    let number = |raw: Option<&[u8]>| {
        raw.and_then(|raw| std::str::from_utf8(raw).ok())
            .and_then(|text| text.parse::<u64>().ok())
    };
    let [first, deleted, last, added, length] = texts;
    Ok(Some((
        cursor.pos,
        DeletionProbe {
            first_entry_id: id(first),
            max_deleted_entry_id: id(deleted),
            last_generated_id: id(last),
            entries_added: number(added),
            length: number(length),
        },
    )))
}

/// One `XREAD` reply: its bytes, shared by borrowed views of its entries.
#[derive(Debug, Default)]
pub struct Batch {
    data: Bytes,
    entries: Vec<EntrySlot>,
    spans: Vec<Span>,
}

/// A view of one entry of a [`Batch`].
#[derive(Clone, Copy, Debug)]
pub struct EntryView<'a> {
    batch: &'a Batch,
    slot: EntrySlot,
}

impl Batch {
    /// How many entries the reply holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the reply holds no entry (a block that timed out).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the reply.
    pub fn reply_bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes the reply holds once parsed: its bytes and the scanner's
    /// records of its entries and strings.
    pub fn parsed_bytes(&self) -> usize {
        parsed_bytes(self.data.len(), self.entries.len(), self.spans.len())
    }

    /// The entries, in stream order.
    pub fn iter(&self) -> impl Iterator<Item = EntryView<'_>> + '_ {
        self.entries.iter().map(move |slot| EntryView {
            batch: self,
            slot: *slot,
        })
    }

    /// The entry at `index` (in stream order).
    pub fn entry(&self, index: usize) -> Option<EntryView<'_>> {
        self.entries.get(index).map(|slot| EntryView {
            batch: self,
            slot: *slot,
        })
    }

    /// The id of the last entry.
    pub fn last_id(&self) -> Option<EntryId> {
        self.entries.last().map(|slot| slot.id)
    }

    fn bytes(&self, span: Span) -> &[u8] {
        self.data.get(span.start..span.end).unwrap_or_default()
    }
}

impl<'a> EntryView<'a> {
    /// The entry's id.
    pub fn id(&self) -> EntryId {
        self.slot.id
    }

    /// Bytes of its names and values.
    pub fn size(&self) -> usize {
        self.slot.size
    }

    /// How many field/value pairs it has.
    pub fn field_count(&self) -> usize {
        self.slot.count / 2
    }

    /// Its field/value pairs, written into `out` (cleared first) so one
    /// vector serves a whole batch.
    pub fn fields_into(&self, out: &mut Vec<(&'a [u8], &'a [u8])>) {
        out.clear();
        let spans = self
            .batch
            .spans
            .get(self.slot.first..self.slot.first + self.slot.count)
            .unwrap_or_default();
        out.extend(spans.chunks_exact(2).filter_map(|pair| match pair {
            [name, value] => Some((self.batch.bytes(*name), self.batch.bytes(*value))),
            _ => None,
        }));
    }
}

/// Bytes of a reply of `bytes` bytes once parsed into `entries` entries and
/// `spans` strings.
fn parsed_bytes(bytes: usize, entries: usize, spans: usize) -> usize {
    bytes
        .saturating_add(entries.saturating_mul(SLOT_BYTES))
        .saturating_add(spans.saturating_mul(SPAN_BYTES))
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Replies built and parsed for tests.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
pub(crate) mod test_replies {
    use super::*;

    fn bulk(out: &mut Vec<u8>, text: &[u8]) {
        out.extend_from_slice(format!("${}\r\n", text.len()).as_bytes());
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    }

    /// An `XREAD` reply holding `entries` (id, then names and values).
    pub(crate) fn reply(entries: &[(&str, &[&[u8]])]) -> Vec<u8> {
        let mut out = b"*1\r\n*2\r\n".to_vec();
        bulk(&mut out, b"user:lifecycle_events");
        out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
        for (id, fields) in entries {
            out.extend_from_slice(b"*2\r\n");
            bulk(&mut out, id.as_bytes());
            out.extend_from_slice(format!("*{}\r\n", fields.len()).as_bytes());
            for field in *fields {
                bulk(&mut out, field);
            }
        }
        out
    }

    /// `bytes` parsed whole: its length and the batch.
    pub(crate) fn parse_all(bytes: &[u8]) -> (usize, Batch) {
        let mut parser = XreadParser::new();
        match parser.parse(bytes).unwrap() {
            Parsed::Complete(len) => {
                let data = Bytes::copy_from_slice(&bytes[..len]);
                (len, parser.take_batch(data))
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_replies::{parse_all, reply};
    use super::*;
    use proptest::prelude::*;

    fn pairs(view: &EntryView<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields = Vec::new();
        view.fields_into(&mut fields);
        fields
            .into_iter()
            .map(|(name, value)| (name.to_vec(), value.to_vec()))
            .collect()
    }

    #[test]
    fn parses_entries_as_views() {
        let bytes = reply(&[
            (
                "1-0",
                &[b"event_type", b"user.deleted", b"user_id", b"u\r\n1"],
            ),
            ("2-3", &[b"a", b"", b"a", b"\xff"]),
        ]);
        let (len, batch) = parse_all(&bytes);
        assert_eq!(len, bytes.len());
        assert_eq!(batch.len(), 2);
        let views: Vec<_> = batch.iter().collect();
        assert_eq!(views[0].id(), EntryId::new(1, 0));
        assert_eq!(
            pairs(&views[0]),
            vec![
                (b"event_type".to_vec(), b"user.deleted".to_vec()),
                (b"user_id".to_vec(), b"u\r\n1".to_vec())
            ]
        );
        assert_eq!(views[1].id(), EntryId::new(2, 3));
        assert_eq!(pairs(&views[1]).len(), 2);
        assert_eq!(batch.last_id(), Some(EntryId::new(2, 3)));
    }

    #[test]
    fn sizes_and_costs_are_what_memory_accounting_adds_up() {
        let bytes = reply(&[
            ("1-0", &[b"event_type", b"user.deleted", b"user_id", b"u-1"]),
            ("2-0", &[b"k", b"vvvvv"]),
            ("3-0", &[]),
        ]);
        let (_, batch) = parse_all(&bytes);
        assert_eq!(batch.reply_bytes(), bytes.len());
        let views: Vec<_> = batch.iter().collect();
        let sizes: Vec<_> = views.iter().map(EntryView::size).collect();
        assert_eq!(sizes, vec![10 + 12 + 7 + 3, 1 + 5, 0]);
        let fields: Vec<_> = views.iter().map(EntryView::field_count).collect();
        assert_eq!(fields, vec![2, 1, 0]);
        // Three entries, six strings among their fields.
        assert_eq!(
            batch.parsed_bytes(),
            bytes.len() + 3 * SLOT_BYTES + 6 * SPAN_BYTES
        );
        let cost = crate::machine::entry_cost(32, 2);
        assert_eq!(
            cost,
            32 + 2 * 2 * SPAN_BYTES + crate::machine::ENTRY_OVERHEAD
        );
        // What the entries cost once held never exceeds the parsed reply
        // plus the per-entry overhead (the bound the machine relies on).
        let held: usize = views
            .iter()
            .map(|view| crate::machine::entry_cost(view.size(), view.field_count()))
            .sum();
        assert!(held <= batch.parsed_bytes() + 3 * crate::machine::ENTRY_OVERHEAD);
    }

    #[test]
    fn a_reset_parser_forgets_the_reply_it_was_in() {
        let first = reply(&[("1-0", &[b"k", b"v"]), ("2-0", &[b"k", b"v"])]);
        let mut parser = XreadParser::new();
        let cut = first.len() - 3;
        assert!(matches!(
            parser.parse(&first[..cut]).unwrap(),
            Parsed::Incomplete
        ));
        assert_eq!(parser.entries_parsed(), 1);
        // What is held: the bytes received and the record of the entry
        // complete so far (its id and its two strings).
        assert!(
            parser.held_bytes(cut) >= cut + SLOT_BYTES + 2 * SPAN_BYTES,
            "{}",
            parser.held_bytes(cut)
        );
        parser.reset();
        assert_eq!(parser.entries_parsed(), 0);
        assert_eq!(parser.partial_entry_id(), None);
        assert_eq!(parser.held_bytes(0), 0);
        let second = reply(&[("9-0", &[b"a", b"b"])]);
        match parser.parse(&second).unwrap() {
            Parsed::Complete(len) => assert_eq!(len, second.len()),
            other => panic!("{other:?}"),
        }
        let batch = parser.take_batch(Bytes::from(second));
        let ids: Vec<_> = batch.iter().map(|view| view.id()).collect();
        assert_eq!(ids, vec![EntryId::new(9, 0)]);
    }

    #[test]
    fn a_timed_out_block_is_an_empty_batch() {
        let (len, batch) = parse_all(b"*-1\r\nextra");
        assert_eq!(len, 5);
        assert!(batch.is_empty());
        let (_, batch) = parse_all(&reply(&[("1-0", &[b"k", b"v"])]));
        assert!(!batch.is_empty());
    }

    #[test]
    fn bulk_strings_up_to_redis_ceiling_are_awaited_and_longer_refused() {
        let header = |len: usize| {
            format!("*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nk\r\n${len}\r\n")
        };
        let mut parser = XreadParser::new();
        assert!(matches!(
            parser.parse(header(MAX_BULK_LEN).as_bytes()).unwrap(),
            Parsed::Incomplete
        ));
        let mut parser = XreadParser::new();
        let err = parser
            .parse(header(MAX_BULK_LEN + 1).as_bytes())
            .unwrap_err();
        assert!(err.0.contains("bulk string of"), "{err:?}");
        assert_eq!(MAX_BULK_LEN, 536_870_912, "proto-max-bulk-len's ceiling");
    }

    #[test]
    fn simple_strings_and_integers_read_as_their_text() {
        // Redis sends bulk strings; a proxy or another server may not.
        let bytes = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*4\r\n+name\r\n:42\r\n+other\r\n$5\r\nvalue\r\n";
        let (len, batch) = parse_all(bytes);
        assert_eq!(len, bytes.len());
        let views: Vec<_> = batch.iter().collect();
        assert_eq!(
            pairs(&views[0]),
            vec![
                (b"name".to_vec(), b"42".to_vec()),
                (b"other".to_vec(), b"value".to_vec())
            ]
        );
        assert_eq!(views[0].size(), 4 + 2 + 5 + 5);
    }

    #[test]
    fn error_replies_carry_their_code() {
        let mut parser = XreadParser::new();
        match parser
            .parse(b"-WRONGTYPE Operation against a key\r\n")
            .unwrap()
        {
            Parsed::Error(len, err) => {
                assert_eq!(len, 36);
                assert_eq!(err.code, "WRONGTYPE");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_prefix_is_incomplete_and_the_whole_parses_the_same() {
        let bytes = reply(&[
            ("1-0", &[b"k", b"v"]),
            ("1-1", &[b"name", b"value with spaces"]),
            ("5-0", &[]),
        ]);
        let mut parser = XreadParser::new();
        for end in 0..bytes.len() {
            assert!(
                matches!(parser.parse(&bytes[..end]).unwrap(), Parsed::Incomplete),
                "prefix {end}"
            );
        }
        match parser.parse(&bytes).unwrap() {
            Parsed::Complete(len) => assert_eq!(len, bytes.len()),
            other => panic!("{other:?}"),
        }
        let batch = parser.take_batch(Bytes::from(bytes.clone()));
        let ids: Vec<_> = batch.iter().map(|view| view.id()).collect();
        assert_eq!(
            ids,
            vec![EntryId::new(1, 0), EntryId::new(1, 1), EntryId::new(5, 0)]
        );
        assert_eq!(
            pairs(&batch.iter().nth(1).unwrap())[0].1,
            b"value with spaces"
        );
    }

    #[test]
    fn a_large_value_is_not_rescanned_until_it_has_arrived() {
        let big = vec![b'x'; 100_000];
        let bytes = reply(&[("1-0", &[b"k", &big])]);
        let mut parser = XreadParser::new();
        assert!(matches!(
            parser.parse(&bytes[..100]).unwrap(),
            Parsed::Incomplete
        ));
        assert!(parser.need > 100_000);
        assert!(matches!(
            parser.parse(&bytes[..50_000]).unwrap(),
            Parsed::Incomplete
        ));
        assert!(matches!(parser.parse(&bytes).unwrap(), Parsed::Complete(_)));
    }

    #[test]
    fn odd_shapes_are_errors_or_lenient_never_panics() {
        for bad in [
            b"*2\r\n".as_slice(),
            b"$3\r\nabc\r\n",
            b"*1\r\n*3\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\nx-y\r\n*0\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*-5\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n$99999999999\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0XX",
            b"*x\r\n",
            b"?\r\n",
        ] {
            let mut parser = XreadParser::new();
            assert!(
                parser.parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Nil fields and an odd field count are tolerated.
        let mut bytes = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*-1\r\n".to_vec();
        bytes.extend_from_slice(b"*2\r\n$3\r\n2-0\r\n*1\r\n$4\r\nlone\r\n");
        let (_, batch) = parse_all(&bytes);
        let views: Vec<_> = batch.iter().collect();
        assert!(pairs(&views[0]).is_empty());
        assert_eq!(pairs(&views[1]), vec![(b"lone".to_vec(), Vec::new())]);
    }

    #[test]
    fn an_entry_still_arriving_is_known_by_its_id() {
        let big = vec![b'x'; 1000];
        let bytes = reply(&[("1-0", &[b"k", b"v"]), ("2-7", &[b"k", &big])]);
        let mut parser = XreadParser::new();
        let cut = bytes.len() - 500;
        assert!(matches!(
            parser.parse(&bytes[..cut]).unwrap(),
            Parsed::Incomplete
        ));
        assert_eq!(parser.entries_parsed(), 1);
        assert_eq!(parser.partial_entry_id(), Some(EntryId::new(2, 7)));
        assert!(matches!(parser.parse(&bytes).unwrap(), Parsed::Complete(_)));
        assert_eq!(parser.partial_entry_id(), None);
    }

    #[test]
    fn probe_replies_parse_whole_or_not_at_all() {
        let reply = b"*5\r\n$3\r\n5-0\r\n$3\r\n7-1\r\n$3\r\n9-0\r\n$2\r\n12\r\n$1\r\n4\r\nrest";
        let (len, probe) = parse_probe_reply(reply).unwrap().unwrap();
        assert_eq!(len, reply.len() - 4);
        assert_eq!(
            probe,
            DeletionProbe {
                first_entry_id: Some(EntryId::new(5, 0)),
                max_deleted_entry_id: Some(EntryId::new(7, 1)),
                last_generated_id: Some(EntryId::new(9, 0)),
                entries_added: Some(12),
                length: Some(4),
            }
        );
        for end in 0..len {
            assert!(parse_probe_reply(&reply[..end]).unwrap().is_none(), "{end}");
        }
        let (_, empty) =
            parse_probe_reply(b"*5\r\n$0\r\n\r\n$3\r\n0-0\r\n$0\r\n\r\n$1\r\nx\r\n$0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(empty, DeletionProbe::default());
        let (len, failed) = parse_probe_reply(b"-ERR oops\r\n").unwrap().unwrap();
        assert_eq!((len, failed), (11, DeletionProbe::default()));
        assert!(parse_probe_reply(b":1\r\n").is_err());
        assert!(parse_probe_reply(b"*2\r\n$3\r\n5-0\r\n$3\r\n7-1\r\n").is_err());
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"XREAD", b"COUNT", b"10"]);
        assert_eq!(out, b"*3\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n$2\r\n10\r\n");
    }

    proptest! {
        #[test]
        fn no_byte_sequence_panics_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut parser = XreadParser::new();
            let _ = parser.parse(&bytes);
        }

        #[test]
        fn valid_replies_round_trip(
            entries in proptest::collection::vec(
                (any::<u32>(), proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..6)),
                0..8,
            ),
            cut in any::<prop::sample::Index>(),
        ) {
            let ids: Vec<String> = entries.iter().enumerate().map(|(i, (ms, _))| format!("{ms}-{i}")).collect();
            let shaped: Vec<(&str, Vec<&[u8]>)> = ids
                .iter()
                .zip(&entries)
                .map(|(id, (_, fields))| (id.as_str(), fields.iter().map(Vec::as_slice).collect()))
                .collect();
            let borrowed: Vec<(&str, &[&[u8]])> = shaped.iter().map(|(id, f)| (*id, f.as_slice())).collect();
            let bytes = reply(&borrowed);
            let mut parser = XreadParser::new();
            let split = cut.index(bytes.len());
            prop_assert!(matches!(parser.parse(&bytes[..split]).unwrap(), Parsed::Incomplete));
            let len = match parser.parse(&bytes).unwrap() {
                Parsed::Complete(len) => len,
                other => panic!("{other:?}"),
            };
            prop_assert_eq!(len, bytes.len());
            let batch = parser.take_batch(Bytes::from(bytes));
            prop_assert_eq!(batch.len(), entries.len());
            for (view, (_, fields)) in batch.iter().zip(&entries) {
                let got = pairs(&view);
                prop_assert_eq!(got.len(), fields.len().div_ceil(2));
                for (index, (name, value)) in got.iter().enumerate() {
                    prop_assert_eq!(name, &fields[2 * index]);
                    let expected = fields.get(2 * index + 1).cloned().unwrap_or_default();
                    prop_assert_eq!(value, &expected);
                }
            }
        }
    }
}
