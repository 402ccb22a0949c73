//! `lobby-worker bench`: throughput and latency, each measured against a
//! baseline in the same run, on the same Redis.
//!
//! - `raw`: a bare reader, `XREAD COUNT <batch>` in a loop, replies scanned
//!   off the socket without building values, nothing decoded or handled.
//! - `reference`: the Go reference's mode (one entry per read, one offset
//!   save per entry), no-op handler.
//! - `default`: the default settings, no-op handler.
//! - `cascade_c1` / `cascade_c64`: the cascade handler over a seeded lobby
//!   (each user in two games), concurrency 1 and 64.
//! - latency: `XADD` to handler at a steady rate, with a live (blocking)
//!   consumer.
//! - memory: peak resident memory of `lobby-worker run --drain` over a large
//!   backlog, read from the child's own report.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use lifecycle_domain::{
    BoxFuture, CascadeHandler, EntryId, EventHandler, Game, GameStatus, HandlerError,
    UserLifecycleConsumer, UserLifecycleEvent,
};
use lifecycle_redis::{redact_url, RedisLobbyStore, RedisOffsetStore};
// The raw baseline reads with the engine's own connection, which is no
// public API of the engine: it reaches it through its hidden internals.
use lifecycle_streams::internals::ReadConnection;
use lifecycle_streams::{Checkpoint, ConsumerConfig};
use lifecycle_test_support::{RedisServer, RedisServerOptions};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use tokio::io::AsyncBufReadExt;

use crate::cli::{BenchArgs, TlsArgs};
use crate::redis_conn::{connect, delete_matching, explain, RedisTarget};

/// Entries added per pipelined round trip while filling.
const FILL_CHUNK: u64 = 2_000;

/// What `bench --json` prints.
#[derive(Debug, Default, Serialize)]
struct Report {
    events: u64,
    batch_size: usize,
    raw_eps: f64,
    reference_events: u64,
    reference_eps: f64,
    default_eps: f64,
    cascade_events: u64,
    cascade_c1_eps: f64,
    cascade_c64_eps: f64,
    latency_rate_eps: u64,
    latency_samples: usize,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    memory_events: u64,
    drain_peak_rss_mib: Option<f64>,
    default_vs_raw: f64,
    default_vs_reference: f64,
    c64_vs_c1: f64,
}

/// A handler that does nothing: measures the consumer alone.
struct NoopHandler;

impl EventHandler<UserLifecycleEvent> for NoopHandler {
    fn handle<'a>(
        &'a self,
        _event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Records how long each event took from `XADD` (its send time is in
/// `trace_id`, nanoseconds since the epoch) to the handler.
struct LatencyHandler {
    samples: Mutex<Vec<Duration>>,
}

impl EventHandler<UserLifecycleEvent> for LatencyHandler {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        let now = epoch_nanos();
        if let Ok(sent) = event.trace_id.parse::<u128>() {
            let latency =
                Duration::from_nanos(u64::try_from(now.saturating_sub(sent)).unwrap_or(u64::MAX));
            self.samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(latency);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

fn epoch_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos())
        .unwrap_or_default()
}

fn rate(entries: u64, elapsed: Duration) -> f64 {
    entries as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

/// Runs the benchmark and prints a table, or one JSON object.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    let server = match &args.redis_url {
        Some(_) => None,
        None => Some(
            tokio::task::spawn_blocking(|| {
                RedisServer::try_start_with(RedisServerOptions::default())
            })
            .await
            .context("cannot start a private redis-server")?
            .map_err(|err| anyhow::anyhow!("cannot start a private redis-server: {err}"))?,
        ),
    };
    let url = match (&args.redis_url, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => bail!("no Redis to benchmark against"),
    };
    let say = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    say(format!("bench: Redis at {}", redact_url(&url)));
    // Certificate files with the private (plain) server are refused here.
    let target = RedisTarget::new(&url, &args.tls)?;
    let mut conn = connect(&target).await?;
    let prefix = "bench";
    clear(&mut conn, &url, prefix).await?;
    let batch_size = ConsumerConfig::new("s", "l").batch_size;
    let mut report = Report {
        events: args.events,
        batch_size,
        reference_events: args.events.min(args.reference_events),
        cascade_events: args.events.min(args.cascade_events),
        latency_rate_eps: args.latency_rate,
        memory_events: args.memory_events,
        ..Report::default()
    };

    let main_stream = format!("{prefix}:main");
    say(format!("filling {main_stream} with {} events", args.events));
    fill(&mut conn, &url, &main_stream, args.events).await?;

    say("raw: bare XREAD reader".into());
    let client = target.client()?;
    report.raw_eps = raw_read(&target, &main_stream, batch_size, args.events).await?;

    say("default: default settings, no-op handler".into());
    let config = ConsumerConfig::new(main_stream.clone(), "default");
    report.default_eps = drain(&target, prefix, config, Arc::new(NoopHandler), args.events).await?;

    let reference_stream = format!("{prefix}:reference");
    fill(&mut conn, &url, &reference_stream, report.reference_events).await?;
    say(format!(
        "reference: batch 1, a save per entry, over {} events",
        report.reference_events
    ));
    let mut config = ConsumerConfig::new(reference_stream, "reference");
    config.batch_size = 1;
    config.checkpoint = Checkpoint::EveryEntry;
    report.reference_eps = drain(
        &target,
        prefix,
        config,
        Arc::new(NoopHandler),
        report.reference_events,
    )
    .await?;

    let cascade_stream = format!("{prefix}:cascade");
    fill(&mut conn, &url, &cascade_stream, report.cascade_events).await?;
    for concurrency in [1usize, 64] {
        let lobby_prefix = format!("{prefix}-c{concurrency}");
        say(format!("cascade_c{concurrency}: seeding {}", lobby_prefix));
        let lobby = RedisLobbyStore::new(client.clone(), &lobby_prefix)
            .context("cannot set up the lobby store")?;
        seed_lobby(&lobby, report.cascade_events).await?;
        let mut config =
            ConsumerConfig::new(cascade_stream.clone(), format!("cascade-c{concurrency}"));
        config.concurrency = concurrency;
        let handler = Arc::new(CascadeHandler::new(lobby));
        let eps = drain(&target, prefix, config, handler, report.cascade_events).await?;
        if concurrency == 1 {
            report.cascade_c1_eps = eps;
        } else {
            report.cascade_c64_eps = eps;
        }
    }

    say(format!(
        "latency: {} events/s for {:?}",
        args.latency_rate, args.latency_duration
    ));
    let samples = latency(&target, prefix, args.latency_rate, args.latency_duration).await?;
    report.latency_samples = samples.len();
    report.latency_p50_ms = percentile(&samples, 0.50);
    report.latency_p99_ms = percentile(&samples, 0.99);
    report.latency_max_ms = samples.last().map_or(0.0, |max| max.as_secs_f64() * 1e3);

    if args.memory_events > 0 {
        let memory_stream = format!("{prefix}:memory");
        say(format!(
            "memory: lobby-worker run --drain over {} events",
            args.memory_events
        ));
        fill(&mut conn, &url, &memory_stream, args.memory_events).await?;
        report.drain_peak_rss_mib =
            Some(drain_peak_rss(&url, &args.tls, &memory_stream, prefix).await?);
    }

    report.default_vs_raw = ratio(report.default_eps, report.raw_eps);
    report.default_vs_reference = ratio(report.default_eps, report.reference_eps);
    report.c64_vs_c1 = ratio(report.cascade_c64_eps, report.cascade_c1_eps);
    clear(&mut conn, &url, prefix).await?;
    drop(server);

    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &Report) {
    println!("{:<34} {:>14}", "measure", "value");
    let rows = [
        ("raw_eps (bare XREAD reader)", report.raw_eps),
        ("reference_eps (batch 1, save each)", report.reference_eps),
        ("default_eps (no-op handler)", report.default_eps),
        ("cascade_c1_eps", report.cascade_c1_eps),
        ("cascade_c64_eps", report.cascade_c64_eps),
    ];
    for (name, value) in rows {
        println!("{name:<34} {value:>14.0}");
    }
    println!("{:<34} {:>14.3}", "latency_p50_ms", report.latency_p50_ms);
    println!("{:<34} {:>14.3}", "latency_p99_ms", report.latency_p99_ms);
    println!("{:<34} {:>14.3}", "latency_max_ms", report.latency_max_ms);
    if let Some(mib) = report.drain_peak_rss_mib {
        println!("{:<34} {:>14.1}", "drain_peak_rss_mib", mib);
    }
    println!("{:<34} {:>14.2}", "default_vs_raw", report.default_vs_raw);
    println!(
        "{:<34} {:>14.1}",
        "default_vs_reference", report.default_vs_reference
    );
    println!("{:<34} {:>14.1}", "c64_vs_c1", report.c64_vs_c1);
    println!(
        "events {}, reference over {}, cascades over {}, latency samples {}, batch size {}",
        report.events,
        report.reference_events,
        report.cascade_events,
        report.latency_samples,
        report.batch_size
    );
}

fn percentile(sorted: &[Duration], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    sorted
        .get(rank.min(sorted.len() - 1))
        .map_or(0.0, |value| value.as_secs_f64() * 1e3)
}

/// Deletes every key under `prefix:` and `prefix-`.
async fn clear(conn: &mut MultiplexedConnection, url: &str, prefix: &str) -> anyhow::Result<()> {
    for pattern in [format!("{prefix}:*"), format!("{prefix}-*")] {
        delete_matching(conn, url, &pattern, "clear the benchmark's keys").await?;
    }
    Ok(())
}

/// Adds `count` deletion events for users `u0..`, pipelined.
async fn fill(
    conn: &mut MultiplexedConnection,
    url: &str,
    stream: &str,
    count: u64,
) -> anyhow::Result<()> {
    let mut next = 0;
    while next < count {
        let end = (next + FILL_CHUNK).min(count);
        let mut pipe = redis::pipe();
        for user in next..end {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("event_type")
                .arg("user.deleted")
                .arg("user_id")
                .arg(format!("u{user}"))
                .arg("occurred_at_ms")
                .arg(1_700_000_000_000_i64 + user as i64)
                .arg("source")
                .arg("bench")
                .ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|err| explain(url, "fill the stream", &err))?;
        next = end;
    }
    Ok(())
}

/// Each user `u<i>` plays in two games of four, of every status in turn.
async fn seed_lobby(lobby: &RedisLobbyStore, users: u64) -> anyhow::Result<()> {
    let statuses = ["open", "running", "finished", "cancelled"];
    let groups = users.div_ceil(4) + 1;
    for group in 0..groups {
        for (offset, name) in [(0u64, "a"), (2, "b")] {
            let first = group * 4 + offset;
            let members: BTreeSet<String> =
                (first..first + 4).map(|user| format!("u{user}")).collect();
            let status = statuses
                .get(usize::try_from(group % 4).unwrap_or_default())
                .copied()
                .unwrap_or("open");
            let game = Game {
                status: Some(GameStatus::parse(status)),
                owner_id: format!("u{first}"),
                cancel_reason: None,
                members,
                applicants: BTreeSet::new(),
                invitees: BTreeSet::new(),
                dropped: BTreeSet::new(),
            };
            lobby.put_game(&format!("{name}{group}"), &game).await?;
        }
    }
    Ok(())
}

/// The bare reader: entries per second of `XREAD COUNT <batch>` alone.
async fn raw_read(
    target: &RedisTarget,
    stream: &str,
    batch: usize,
    expected: u64,
) -> anyhow::Result<f64> {
    let client = target.client()?;
    let mut reader = ReadConnection::connect(
        client.get_connection_info(),
        target.tls.as_ref(),
        Duration::from_secs(5),
    )
    .await
    .context("cannot connect the raw reader")?;
    let started = Instant::now();
    let mut after = EntryId::ZERO;
    let mut seen = 0u64;
    loop {
        reader.send_xread(stream, after, batch, None, false).await?;
        // The bench's own entries are small: no reply limit to enforce.
        let reply = reader.receive_batch(usize::MAX).await?.batch;
        let Some(last) = reply.last_id() else {
            break;
        };
        seen += reply.len() as u64;
        after = last;
    }
    let elapsed = started.elapsed();
    if seen != expected {
        bail!("the raw reader saw {seen} entries, expected {expected}");
    }
    Ok(rate(seen, elapsed))
}

/// Drains `config.stream` with `handler`; entries per second.
async fn drain(
    target: &RedisTarget,
    prefix: &str,
    mut config: ConsumerConfig,
    handler: Arc<dyn EventHandler<UserLifecycleEvent>>,
    expected: u64,
) -> anyhow::Result<f64> {
    config.drain = true;
    let offsets = RedisOffsetStore::new(target.client()?, prefix)
        .context("cannot set up the offset store")?;
    let consumer = target.consumer(Arc::new(offsets), config)?;
    consumer.on_event(handler);
    let started = Instant::now();
    consumer.run().await?;
    let elapsed = started.elapsed();
    let finished = consumer.stats().snapshot().finished();
    if finished != expected {
        bail!("the consumer finished {finished} entries, expected {expected}");
    }
    Ok(rate(finished, elapsed))
}

/// Publishes at `rate_eps` for `duration` to a live consumer; the sorted
/// latencies from `XADD` to handler.
async fn latency(
    target: &RedisTarget,
    prefix: &str,
    rate_eps: u64,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let stream = format!("{prefix}:latency");
    let mut config = ConsumerConfig::new(stream.clone(), "latency");
    config.block_timeout = Duration::from_secs(1);
    let url = target.url.as_str();
    let offsets = RedisOffsetStore::new(target.client()?, prefix)
        .context("cannot set up the offset store")?;
    let consumer = Arc::new(target.consumer(Arc::new(offsets), config)?);
    let handler = Arc::new(LatencyHandler {
        samples: Mutex::new(Vec::new()),
    });
    consumer.on_event(handler.clone());
    let running = {
        let consumer = Arc::clone(&consumer);
        tokio::spawn(async move { consumer.run().await })
    };
    let mut conn = connect(target).await?;
    // Let the consumer reach its blocking read before the clock starts.
    let ready = Instant::now();
    while consumer.stats().snapshot().reads == 0 && ready.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let total = (rate_eps as f64 * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate_eps.max(1) as f64);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for user in 0..total {
        ticker.tick().await;
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("event_type")
            .arg("user.deleted")
            .arg("user_id")
            .arg(format!("l{user}"))
            .arg("occurred_at_ms")
            .arg(1_700_000_000_000_i64)
            .arg("trace_id")
            .arg(epoch_nanos().to_string())
            .query_async::<()>(&mut conn)
            .await
            .map_err(|err| explain(url, "publish", &err))?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumer.stats().snapshot().handled < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    consumer.shutdown();
    running.await.context("the latency consumer panicked")??;
    let mut samples = std::mem::take(
        &mut *handler
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    samples.sort_unstable();
    Ok(samples)
}

/// Runs this binary's `run --drain` over `stream` and reads the peak resident
/// memory it reports, in MiB.
async fn drain_peak_rss(
    url: &str,
    tls: &TlsArgs,
    stream: &str,
    prefix: &str,
) -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut command = tokio::process::Command::new(exe);
    command.args([
        "run",
        "--drain",
        "--log-format",
        "json",
        "--log-level",
        "info",
    ]);
    for (flag, file) in [
        ("--tls-ca-file", &tls.tls_ca_file),
        ("--tls-cert-file", &tls.tls_cert_file),
        ("--tls-key-file", &tls.tls_key_file),
    ] {
        if let Some(file) = file {
            command.arg(flag).arg(file);
        }
    }
    let mut child = command
        .args(["--stream", stream, "--key-prefix", prefix])
        .env("REDIS_URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `lobby-worker run --drain`")?;
    let stderr = child.stderr.take().context("no stderr from the child")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut peak_kib = None;
    while let Some(line) = lines.next_line().await? {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
            if let Some(kib) = value
                .get("peak_rss_kib")
                .and_then(serde_json::Value::as_u64)
            {
                peak_kib = Some(kib);
            }
        }
    }
    let status = child.wait().await?;
    if !status.success() {
        bail!("`lobby-worker run --drain` failed with {status}");
    }
    let kib = peak_kib.context("`lobby-worker run --drain` did not report its peak memory")?;
    Ok(kib as f64 / 1024.0)
}
