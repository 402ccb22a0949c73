//! `lobby-worker status`: where the worker stands, from Redis alone.

use anyhow::{anyhow, Context};
use lifecycle_domain::EntryId;
use lifecycle_redis::RedisOffsetStore;
use serde::Serialize;

use crate::cli::StatusArgs;
use crate::redis_conn::{connect, explain, with_url, RedisTarget};
use crate::stream_status::{lag, stream_length, stream_state, ProbeError, LAG_COUNT_LIMIT};

/// What `status --json` prints, one object.
#[derive(Debug, Serialize)]
struct Status {
    stream: String,
    length: u64,
    first_entry_id: Option<String>,
    last_entry_id: Option<String>,
    offset: Option<String>,
    lag_entries: Option<u64>,
    lag_entries_more_than: bool,
    lag_ms: Option<u64>,
    trimmed_past_offset: bool,
    offset_past_end: bool,
    dead_letter_stream: String,
    dead_letter_length: u64,
}

/// Turns a probe failure into one line saying what to fix.
fn explain_probe(url: &str, flag: &str, err: ProbeError) -> anyhow::Error {
    match err {
        ProbeError::WrongType { key, kind } => {
            anyhow!("the key {key} holds a {kind}, not a stream; check {flag}")
        }
        ProbeError::Redis { action, source } => explain(url, action, &source),
    }
}

/// Prints the stream's length and ends, the saved offset, the lag, whether
/// entries were removed past the offset, and the dead letters.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let target = RedisTarget::from_args(&args.redis)?;
    let url = &target.url;
    let mut conn = connect(&target).await?;
    let stream = &args.redis.stream;
    let dead_letter_stream = args
        .dead_letter_stream
        .clone()
        .unwrap_or_else(|| format!("{stream}:dead"));
    let store = RedisOffsetStore::new(target.client()?, &args.redis.key_prefix)
        .context("cannot set up the offset store")?;
    // The offset before the stream: a running worker's save cannot then
    // look like an offset past the stream's end.
    let offset = with_url(store.get(&args.label).await, url)?;
    let state = stream_state(&mut conn, stream)
        .await
        .map_err(|err| explain_probe(url, "--stream (LOBBY_STREAM)", err))?;
    let lag = match offset {
        Some(offset) => Some(
            lag(&mut conn, stream, &state, offset)
                .await
                .map_err(|err| explain_probe(url, "--stream (LOBBY_STREAM)", err))?,
        ),
        None => None,
    };
    let dead_letter_length = stream_length(&mut conn, &dead_letter_stream)
        .await
        .map_err(|err| {
            explain_probe(url, "--dead-letter-stream (LOBBY_DEAD_LETTER_STREAM)", err)
        })?;
    let id = |id: Option<EntryId>| id.map(|id| id.to_string());
    let status = Status {
        stream: stream.clone(),
        length: state.length,
        first_entry_id: id(state.first_entry_id),
        last_entry_id: id(state.last_entry_id),
        offset: id(offset),
        lag_entries: lag.map(|lag| lag.entries),
        lag_entries_more_than: lag.is_some_and(|lag| lag.more_than),
        lag_ms: lag.map(|lag| lag.ms),
        trimmed_past_offset: offset.is_some_and(|offset| state.trimmed_past(offset)),
        offset_past_end: offset.is_some_and(|offset| state.ends_before(offset)),
        dead_letter_stream,
        dead_letter_length,
    };
    if args.json {
        let line = serde_json::to_string(&status).context("cannot encode the status as JSON")?;
        println!("{line}");
        return Ok(());
    }
    crate::commands::print_aligned(&human(&status, &args.label)).context("cannot print the status")
}

/// The `key: value` rows of the human output.
fn human(status: &Status, label: &str) -> Vec<(&'static str, String)> {
    let or_none = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".to_owned());
    vec![
        ("stream", status.stream.clone()),
        ("length", status.length.to_string()),
        ("first_entry_id", or_none(&status.first_entry_id)),
        ("last_entry_id", or_none(&status.last_entry_id)),
        (
            "offset",
            status.offset.clone().unwrap_or_else(|| {
                format!("none stored for label {label:?}; the worker starts per --start-from")
            }),
        ),
        (
            "lag_entries",
            match status.lag_entries {
                _ if status.lag_entries_more_than => format!("more than {LAG_COUNT_LIMIT}"),
                Some(entries) => entries.to_string(),
                None => "-".to_owned(),
            },
        ),
        (
            "lag_ms",
            status
                .lag_ms
                .map_or_else(|| "-".to_owned(), |ms| ms.to_string()),
        ),
        (
            "trimmed_past_offset",
            if status.trimmed_past_offset {
                "yes: the stream was trimmed up to or past the offset, or entries after it deleted"
                    .to_owned()
            } else {
                "no".to_owned()
            },
        ),
        (
            "offset_past_end",
            if status.offset_past_end {
                "yes: the offset is after the stream's last entry; events added until the stream's ids pass it are skipped (check --label and --stream, or move it with `offsets set`)"
                    .to_owned()
            } else {
                "no".to_owned()
            },
        ),
        ("dead_letter_stream", status.dead_letter_stream.clone()),
        ("dead_letter_length", status.dead_letter_length.to_string()),
    ]
}
