//! `lobby-worker status`: where the worker stands, from Redis alone.

use anyhow::{anyhow, Context};
use lifecycle_domain::EntryId;
use lifecycle_redis::lease::read_status;
use lifecycle_redis::{Identity, LeaseStatus, RedisOffsetStore};
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
    lease: LeaseView,
}

/// The consumer lease as `status` shows it.
#[derive(Debug, Serialize)]
struct LeaseView {
    /// Who consumes now (`null`: nobody holds the lease).
    holder: Option<ProcessView>,
    /// The holder's fencing token.
    token: Option<u64>,
    /// When the holder took the lease (ms since the Unix epoch).
    since_ms: Option<u64>,
    /// How long the lease lasts without a renewal.
    remaining_ms: Option<u64>,
    /// The last fencing token handed out (0: never).
    last_token: u64,
    /// Processes seen waiting recently.
    standbys: Vec<ProcessView>,
}

/// One worker process.
#[derive(Debug, Serialize)]
struct ProcessView {
    host: String,
    pid: u32,
}

impl From<LeaseStatus> for LeaseView {
    fn from(status: LeaseStatus) -> Self {
        let process = |identity: &Identity| ProcessView {
            host: identity.host.clone(),
            pid: identity.pid,
        };
        Self {
            holder: status
                .holder
                .as_ref()
                .map(|holder| process(&holder.identity)),
            token: status.holder.as_ref().map(|holder| holder.token),
            since_ms: status.holder.as_ref().map(|holder| holder.since_ms),
            remaining_ms: status
                .remaining
                .map(|left| u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
            last_token: status.last_token,
            standbys: status
                .standbys
                .iter()
                .map(|(identity, _)| process(identity))
                .collect(),
        }
    }
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
    let store = RedisOffsetStore::new(target.endpoint()?, &args.redis.key_prefix)
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
    let lease = with_url(
        read_status(&conn, &args.redis.key_prefix, &args.label).await,
        url,
    )?;
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
        lease: LeaseView::from(lease),
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
        (
            "lease_holder",
            match (
                &status.lease.holder,
                status.lease.token,
                status.lease.since_ms,
            ) {
                (Some(holder), Some(token), Some(since_ms)) => format!(
                    "{} pid {} (token {token}, since {}, {} ms left)",
                    holder.host,
                    holder.pid,
                    crate::commands::utc(since_ms),
                    status.lease.remaining_ms.unwrap_or(0)
                ),
                _ => format!(
                    "none (last token {}): no worker consumes now",
                    status.lease.last_token
                ),
            },
        ),
        (
            "lease_standbys",
            if status.lease.standbys.is_empty() {
                "none seen recently".to_owned()
            } else {
                status
                    .lease
                    .standbys
                    .iter()
                    .map(|standby| format!("{} pid {}", standby.host, standby.pid))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
    ]
}
