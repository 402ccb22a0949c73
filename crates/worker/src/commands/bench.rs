//! `lobby-worker bench`: throughput and latency, each measured against a
//! baseline in the same run, on the same Redis.
//!
//! - `raw`: a bare reader, `XREAD COUNT <batch>` in a loop, replies scanned
//!   off the socket without building values, nothing decoded or handled.
//! - `reference`: the Go reference's mode (one entry per read, one offset
//!   save per entry, one at a time), no-op handler; and the commands it sent
//!   per entry.
//! - `default`: the default settings, no-op handler.
//! - `cascade_default`: the cascade handler over a seeded lobby (each user in
//!   two games) with the default settings; `cascade_c<N>`: the same at
//!   concurrency 1, 16, 32, 64, 128 and 256, the best of which is what the
//!   default is compared with; each the better of two rounds.
//! - `max_script_ms_100k_games`: the longest single script call on Redis
//!   (from its slow log) while one `user.deleted` for a user in 100,000
//!   games runs through the cascade handler; it should stay under
//!   [`MAX_SCRIPT_BUDGET_MS`].
//! - latency: `XADD` to handler completion at a steady rate, with a live
//!   (blocking) consumer and the default settings: a no-op handler, and the
//!   cascade handler over a seeded lobby; the commands the worker sent per
//!   event meanwhile (`INFO commandstats`).
//! - memory: peak resident memory of `lobby-worker run --drain` (the cascade
//!   handler on an empty lobby, the default settings but `--concurrency`),
//!   read from the child's own report, over six backlogs that each get a
//!   fresh stream and key prefix: a million small entries at concurrency 1
//!   and 64; 2,000 entries with a 900 KiB `payload` field, for one user and
//!   for 2,000 users, at concurrency 64; 10,000 entries of 5,000 fields; and
//!   1,000 entries of 100,000 empty fields. Every entry is a well-formed
//!   `user.deleted` event; the extra fields are ones the decoder ignores.
//!   Each case should stay under [`MEMORY_BUDGET_MIB`].

use lifecycle_streams::RedisConnection;
use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use lifecycle_domain::{
    BoxFuture, CascadeHandler, EntryId, EventHandler, Game, GameStatus, HandlerError,
    UserLifecycleConsumer, UserLifecycleEvent,
};
use lifecycle_private_redis::PrivateRedis;
use lifecycle_redis::{redact_url, RedisLobbyStore, RedisOffsetStore};
// The raw baseline reads with the engine's own connection, which is no
// public API of the engine: it reaches it through its hidden internals.
use lifecycle_streams::internals::ReadConnection;
use lifecycle_streams::{Checkpoint, ConsumerConfig};

use serde::Serialize;
use tokio::io::AsyncBufReadExt;

use crate::cli::{BenchArgs, InputError, TlsArgs};
use crate::redis_conn::{
    connect, connect_masters, connect_to, delete_matching, explain, RedisTarget,
};

/// Entries added per pipelined round trip while filling.
const FILL_CHUNK: u64 = 2_000;
/// Bytes of commands sent per pipelined round trip while filling with
/// large entries.
const FILL_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// Rounds of the cascade measurements (see `run`).
const CASCADE_ROUNDS: usize = 2;
/// The concurrencies the cascade is measured at besides the default.
const CASCADE_CONCURRENCIES: [usize; 6] = [1, 16, 32, 64, 128, 256];
/// The resident memory every memory case should stay under, in MiB.
const MEMORY_BUDGET_MIB: u64 = 64;

/// What `bench --json` prints.
#[derive(Debug, Default, Serialize)]
struct Report {
    events: u64,
    batch_size: usize,
    raw_eps: f64,
    reference_events: u64,
    reference_eps: f64,
    default_eps: f64,
    /// Commands the worker sent per entry in `reference` (see
    /// [`worker_commands`]).
    reference_commands_per_event: f64,
    cascade_events: u64,
    /// The default settings' concurrency, and the cascade's rate with them.
    cascade_default_concurrency: usize,
    cascade_default_eps: f64,
    cascade_c1_eps: f64,
    cascade_c64_eps: f64,
    /// Every concurrency measured: `[concurrency, events/s]`.
    cascade_sweep: Vec<(usize, f64)>,
    cascade_best_concurrency: usize,
    cascade_best_eps: f64,
    latency_rate_eps: u64,
    latency_samples: usize,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    /// `XADD` to the cascade applied (the handler's completion), default
    /// settings, seeded lobby.
    latency_cascade_samples: usize,
    latency_cascade_p50_ms: f64,
    latency_cascade_p99_ms: f64,
    latency_cascade_max_ms: f64,
    /// Commands the worker sent per event during the cascade latency run.
    commands_per_event_live: f64,
    /// The longest script call on Redis during the cascade of a user in
    /// 100,000 games, in ms (`None`: Redis refused the slow-log settings).
    max_script_ms_100k_games: Option<f64>,
    /// How long that cascade took, in seconds.
    cascade_100k_games_secs: f64,
    /// Three workers on a steady stream under the lease (default ttl): from
    /// a SIGKILL of the holder to the offset's next move, the median and the
    /// longest over `takeover_kills`, and from a SIGTERM of the holder.
    takeover_kills: u32,
    takeover_gap_kill_ms_p50: Option<f64>,
    takeover_gap_kill_ms_max: Option<f64>,
    takeover_gap_graceful_ms: Option<f64>,
    memory_events: u64,
    /// The same as `memory_small_1m_c1_peak_rss_mib` (its earlier name).
    drain_peak_rss_mib: Option<f64>,
    memory_small_1m_c1_peak_rss_mib: Option<f64>,
    memory_small_1m_c64_peak_rss_mib: Option<f64>,
    memory_900k_one_user_c64_peak_rss_mib: Option<f64>,
    memory_900k_2000_users_c64_peak_rss_mib: Option<f64>,
    memory_5000_fields_peak_rss_mib: Option<f64>,
    memory_100k_empty_fields_peak_rss_mib: Option<f64>,
    memory_budget_mib: u64,
    /// The largest peak of the cases run.
    memory_max_peak_rss_mib: Option<f64>,
    /// Whether every case run finished and stayed under the budget (`None`:
    /// no case ran).
    memory_within_budget: Option<bool>,
    /// Each case in detail: what the child reported, how long it took.
    memory_cases: Vec<MemoryCase>,
    /// `XREAD` round trips of `default`, `cascade_c1` and `cascade_c64`.
    default_reads: u64,
    cascade_c1_reads: u64,
    cascade_c64_reads: u64,
    default_vs_raw: f64,
    default_vs_reference: f64,
    c64_vs_c1: f64,
    cascade_default_vs_reference: f64,
    cascade_default_vs_best: f64,
}

/// One memory case, in detail.
#[derive(Debug, Default, Serialize)]
struct MemoryCase {
    name: &'static str,
    entries: u64,
    concurrency: u32,
    /// Fields of one entry (the event's four included).
    fields_per_entry: usize,
    /// Bytes of one entry's names and values (about).
    entry_bytes: usize,
    /// The child's peak resident memory (its own report; for a child
    /// stopped at the timeout, its `VmHWM` read just before).
    peak_rss_mib: Option<f64>,
    /// Whether `run --drain` ended by itself, successfully.
    finished: bool,
    handled: Option<u64>,
    malformed: Option<u64>,
    /// The child's `XREAD` round trips and offset saves.
    reads: Option<u64>,
    offset_saves: Option<u64>,
    /// The most bytes the engine charged for held entries at once.
    held_bytes_peak_mib: Option<f64>,
    /// Redis's `used_memory` once the stream was filled.
    redis_used_memory_mib: Option<f64>,
    fill_secs: f64,
    drain_secs: f64,
    /// The child's warnings and errors (distinct messages, at most five).
    warnings: Vec<String>,
    /// Why the case did not run.
    skipped: Option<String>,
    /// Why it did not finish.
    error: Option<String>,
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
/// `trace_id`, nanoseconds since the epoch) to the completion of the
/// handler it wraps.
struct LatencyHandler {
    inner: Arc<dyn EventHandler<UserLifecycleEvent>>,
    samples: Mutex<Vec<Duration>>,
}

impl EventHandler<UserLifecycleEvent> for LatencyHandler {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let result = self.inner.handle(event).await;
            let now = epoch_nanos();
            if let (Ok(()), Ok(sent)) = (&result, event.trace_id.parse::<u128>()) {
                let latency = Duration::from_nanos(
                    u64::try_from(now.saturating_sub(sent)).unwrap_or(u64::MAX),
                );
                self.samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(latency);
            }
            result
        })
    }
}

/// The commands a worker sends on its own: `XREAD` and the scripts it
/// calls (`EVALSHA`, or `EVAL` when Redis lacks the script). A script counts
/// once, whatever it runs inside Redis; so does nothing a benchmark sends
/// (`XADD`, `INFO`).
const WORKER_COMMANDS: [&str; 3] = ["xread", "evalsha", "eval"];

/// How many [`WORKER_COMMANDS`] Redis has run so far (`INFO
/// commandstats`).
/// Summed over every master (of a cluster).
async fn worker_commands(target: &RedisTarget) -> anyhow::Result<u64> {
    let mut calls = 0;
    for mut conn in connect_masters(target).await? {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .map_err(|err| explain(&target.url, "read INFO commandstats", &err))?;
        calls += commands_in(&info);
    }
    Ok(calls)
}

/// The calls of [`WORKER_COMMANDS`] that an `INFO commandstats` reply counts.
fn commands_in(info: &str) -> u64 {
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            if !WORKER_COMMANDS.contains(&name) {
                return None;
            }
            let calls = stats
                .split(',')
                .find_map(|stat| stat.strip_prefix("calls="))?;
            calls.parse::<u64>().ok()
        })
        .sum()
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
        return Err(InputError("--events must be at least 1".into()).into());
    }
    if args.redis_url.is_some() && !args.yes {
        return Err(InputError(
            "bench would push about a million and a half entries through the Redis of --redis-url and delete its keys bench:* and bench-*; add --yes if that Redis is yours to load, or leave --redis-url out for a private one".into(),
        )
        .into());
    }
    let server = match &args.redis_url {
        Some(_) => None,
        None => Some(
            tokio::task::spawn_blocking(PrivateRedis::start)
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
    clear(&target, prefix).await?;
    let batch_size = ConsumerConfig::new("s", "l").batch_size;
    let mut report = Report {
        events: args.events,
        batch_size,
        reference_events: args.events.min(args.reference_events),
        cascade_events: args.events.min(args.cascade_events),
        latency_rate_eps: args.latency_rate,
        memory_events: args.memory_events,
        memory_budget_mib: MEMORY_BUDGET_MIB,
        ..Report::default()
    };
    let cases = if args.memory_events == 0 {
        Vec::new()
    } else {
        select_cases(&args.memory_cases, args.memory_events)?
    };

    let main_stream = format!("{prefix}:main");
    say(format!("filling {main_stream} with {} events", args.events));
    fill(&mut conn, &url, &main_stream, args.events).await?;

    say("raw: bare XREAD reader".into());
    report.raw_eps = raw_read(&target, &main_stream, batch_size, args.events).await?;

    say("default: default settings, no-op handler".into());
    let config = ConsumerConfig::new(main_stream.clone(), "default");
    (report.default_eps, report.default_reads) =
        drain(&target, prefix, config, Arc::new(NoopHandler), args.events).await?;

    let reference_stream = format!("{prefix}:reference");
    fill(&mut conn, &url, &reference_stream, report.reference_events).await?;
    say(format!(
        "reference: batch 1, a save per entry, over {} events",
        report.reference_events
    ));
    let mut config = ConsumerConfig::new(reference_stream, "reference");
    config.batch_size = 1;
    config.checkpoint = Checkpoint::EveryEntry;
    config.concurrency = 1;
    let commands_before = worker_commands(&target).await?;
    (report.reference_eps, _) = drain(
        &target,
        prefix,
        config,
        Arc::new(NoopHandler),
        report.reference_events,
    )
    .await?;
    let commands = worker_commands(&target)
        .await?
        .saturating_sub(commands_before);
    report.reference_commands_per_event = ratio(commands as f64, report.reference_events as f64);

    let cascade_stream = format!("{prefix}:cascade");
    fill(&mut conn, &url, &cascade_stream, report.cascade_events).await?;
    report.cascade_default_concurrency =
        ConsumerConfig::new(cascade_stream.clone(), "cascade").concurrency;
    // The default settings (`None`) and each concurrency, measured in two
    // rounds in opposite orders, each keeping its better round: the same
    // settings measured twice in a row on this machine differ by up to a
    // third.
    let runs: Vec<(String, Option<usize>)> = std::iter::once(("default".to_owned(), None))
        .chain(
            CASCADE_CONCURRENCIES
                .iter()
                .map(|&concurrency| (format!("c{concurrency}"), Some(concurrency))),
        )
        .collect();
    let mut best: Vec<(f64, u64)> = vec![(0.0, 0); runs.len()];
    for round in 0..CASCADE_ROUNDS {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let Some((name, concurrency)) = runs.get(index) else {
                continue;
            };
            let mut config =
                ConsumerConfig::new(cascade_stream.clone(), format!("cascade-{name}-r{round}"));
            if let Some(concurrency) = concurrency {
                config.concurrency = *concurrency;
            }
            let lobby_prefix = format!("{prefix}-{name}");
            say(format!(
                "cascade_{name} (round {}): seeding {lobby_prefix}",
                round + 1
            ));
            let lobby = target.lobby_store(&lobby_prefix)?;
            seed_lobby(&lobby, report.cascade_events).await?;
            let handler = Arc::new(CascadeHandler::new(lobby));
            let measured = drain(&target, prefix, config, handler, report.cascade_events).await?;
            clear(&target, &lobby_prefix).await?;
            if let Some(kept) = best.get_mut(index).filter(|kept| kept.0 < measured.0) {
                *kept = measured;
            }
        }
    }
    for ((name, concurrency), measured) in runs.iter().zip(&best) {
        match concurrency {
            None => report.cascade_default_eps = measured.0,
            Some(concurrency) => report.cascade_sweep.push((*concurrency, measured.0)),
        }
        match name.as_str() {
            "c1" => (report.cascade_c1_eps, report.cascade_c1_reads) = *measured,
            "c64" => (report.cascade_c64_eps, report.cascade_c64_reads) = *measured,
            _ => {}
        }
    }
    if let Some(&(concurrency, eps)) = report
        .cascade_sweep
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        report.cascade_best_concurrency = concurrency;
        report.cascade_best_eps = eps;
    }

    say(format!(
        "latency: {} events/s for {:?}",
        args.latency_rate, args.latency_duration
    ));
    let (samples, _) = latency(
        &target,
        &format!("{prefix}:latency"),
        Arc::new(NoopHandler),
        args.latency_rate,
        args.latency_duration,
    )
    .await?;
    report.latency_samples = samples.len();
    report.latency_p50_ms = percentile(&samples, 0.50);
    report.latency_p99_ms = percentile(&samples, 0.99);
    report.latency_max_ms = samples.last().map_or(0.0, |max| max.as_secs_f64() * 1e3);

    say(format!(
        "latency_cascade: {} events/s for {:?}, seeded lobby",
        args.latency_rate, args.latency_duration
    ));
    let lobby_prefix = format!("{prefix}-latency");
    let lobby = target.lobby_store(&lobby_prefix)?;
    let live_events =
        (args.latency_rate as f64 * args.latency_duration.as_secs_f64()).round() as u64;
    seed_lobby(&lobby, live_events).await?;
    let (samples, commands) = latency(
        &target,
        &format!("{prefix}:latency-cascade"),
        Arc::new(CascadeHandler::new(lobby)),
        args.latency_rate,
        args.latency_duration,
    )
    .await?;
    report.latency_cascade_samples = samples.len();
    report.latency_cascade_p50_ms = percentile(&samples, 0.50);
    report.latency_cascade_p99_ms = percentile(&samples, 0.99);
    report.latency_cascade_max_ms = samples.last().map_or(0.0, |max| max.as_secs_f64() * 1e3);
    report.commands_per_event_live = ratio(commands as f64, samples.len() as f64);

    say(format!(
        "max_script_ms_100k_games: one user.deleted for a user in {BOUND_GAMES} games"
    ));
    (
        report.max_script_ms_100k_games,
        report.cascade_100k_games_secs,
    ) = script_bound_case(&target, &mut conn, prefix).await?;

    if args.takeover_kills > 0 {
        say(format!(
            "takeover: three workers under the lease, the holder SIGKILLed {} times, then SIGTERMed",
            args.takeover_kills
        ));
        let prefix = format!("{prefix}-takeover");
        let measured =
            super::takeover::measure(&url, &args.tls, &mut conn, &prefix, args.takeover_kills)
                .await?;
        let mut kills: Vec<Duration> = measured.after_kill.clone();
        kills.sort();
        report.takeover_kills = args.takeover_kills;
        report.takeover_gap_kill_ms_p50 = Some(percentile(&kills, 0.50));
        report.takeover_gap_kill_ms_max = kills.last().map(|max| max.as_secs_f64() * 1e3);
        report.takeover_gap_graceful_ms = Some(measured.after_sigterm.as_secs_f64() * 1e3);
    }

    for spec in &cases {
        say(format!(
            "memory {}: run --drain --concurrency {} over {} entries of {} fields, about {} bytes each",
            spec.name,
            spec.concurrency,
            spec.entries,
            spec.shape.fields(),
            spec.shape.entry_bytes()
        ));
        let case = memory_case(&target, &mut conn, &args, server.is_some(), spec).await?;
        say(format!(
            "memory {}: peak {} MiB, filled in {:.1}s, drained in {:.1}s",
            spec.name,
            case.peak_rss_mib
                .map_or_else(|| "-".to_owned(), |mib| format!("{mib:.1}")),
            case.fill_secs,
            case.drain_secs
        ));
        if let Some(reason) = case.skipped.as_ref().or(case.error.as_ref()) {
            say(format!("memory {}: {reason}", spec.name));
        }
        *(spec.field)(&mut report) = case.peak_rss_mib;
        report.memory_cases.push(case);
    }
    report.drain_peak_rss_mib = report.memory_small_1m_c1_peak_rss_mib;
    let ran: Vec<&MemoryCase> = report
        .memory_cases
        .iter()
        .filter(|case| case.skipped.is_none())
        .collect();
    report.memory_max_peak_rss_mib = ran
        .iter()
        .filter_map(|case| case.peak_rss_mib)
        .reduce(f64::max);
    report.memory_within_budget = (!ran.is_empty()).then(|| {
        ran.iter().all(|case| {
            case.finished
                && case
                    .peak_rss_mib
                    .is_some_and(|mib| mib <= MEMORY_BUDGET_MIB as f64)
        })
    });

    report.default_vs_raw = ratio(report.default_eps, report.raw_eps);
    report.default_vs_reference = ratio(report.default_eps, report.reference_eps);
    report.c64_vs_c1 = ratio(report.cascade_c64_eps, report.cascade_c1_eps);
    report.cascade_default_vs_reference = ratio(report.cascade_default_eps, report.reference_eps);
    report.cascade_default_vs_best = ratio(report.cascade_default_eps, report.cascade_best_eps);
    clear(&target, prefix).await?;
    drop(server);

    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &Report) {
    let eps = |name: &str, value: f64| println!("{name:<40} {value:>14.0}");
    let ms = |name: &str, value: f64| println!("{name:<40} {value:>14.3}");
    let times = |name: &str, value: f64| println!("{name:<40} {value:>14.2}");
    println!(
        "real path: the cascade handler over a seeded lobby (concurrency {} by default)",
        report.cascade_default_concurrency
    );
    eps("cascade_default_eps", report.cascade_default_eps);
    eps(
        &format!("cascade_best_eps (c{})", report.cascade_best_concurrency),
        report.cascade_best_eps,
    );
    times("cascade_default_vs_best", report.cascade_default_vs_best);
    times(
        "cascade_default_vs_reference",
        report.cascade_default_vs_reference,
    );
    ms("latency_cascade_p50_ms", report.latency_cascade_p50_ms);
    ms("latency_cascade_p99_ms", report.latency_cascade_p99_ms);
    ms("latency_cascade_max_ms", report.latency_cascade_max_ms);
    times("commands_per_event_live", report.commands_per_event_live);
    println!(
        "{:<40} {:>14} (budget {MAX_SCRIPT_BUDGET_MS} ms; the cascade took {:.1} s)",
        "max_script_ms_100k_games",
        report
            .max_script_ms_100k_games
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}")),
        report.cascade_100k_games_secs
    );
    let optional_ms =
        |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0}"));
    println!(
        "{:<40} {:>14} (median over {} SIGKILLs of the holder, max {} ms; default --lease-ttl 10s)",
        "takeover_gap_kill_ms_p50",
        optional_ms(report.takeover_gap_kill_ms_p50),
        report.takeover_kills,
        optional_ms(report.takeover_gap_kill_ms_max)
    );
    println!(
        "{:<40} {:>14} (a SIGTERM of the holder)",
        "takeover_gap_graceful_ms",
        optional_ms(report.takeover_gap_graceful_ms)
    );
    let sweep: Vec<String> = report
        .cascade_sweep
        .iter()
        .map(|(concurrency, eps)| format!("c{concurrency} {eps:.0}"))
        .collect();
    println!("cascade events/s by concurrency: {}", sweep.join(", "));
    println!();
    println!("the consumer alone: a no-op handler");
    eps("raw_eps (bare XREAD reader)", report.raw_eps);
    eps("reference_eps (batch 1, save each)", report.reference_eps);
    eps("default_eps (default settings)", report.default_eps);
    ms("latency_p50_ms", report.latency_p50_ms);
    ms("latency_p99_ms", report.latency_p99_ms);
    ms("latency_max_ms", report.latency_max_ms);
    times("default_vs_raw", report.default_vs_raw);
    times("default_vs_reference", report.default_vs_reference);
    times("c64_vs_c1 (cascade)", report.c64_vs_c1);
    times(
        "reference_commands_per_event",
        report.reference_commands_per_event,
    );
    println!(
        "events {}, reference over {}, cascades over {}, latency samples {} (no-op) and {} (cascade), batch size {}",
        report.events,
        report.reference_events,
        report.cascade_events,
        report.latency_samples,
        report.latency_cascade_samples,
        report.batch_size
    );
    println!(
        "XREAD round trips: default {}, cascade_c1 {}, cascade_c64 {}",
        report.default_reads, report.cascade_c1_reads, report.cascade_c64_reads
    );
    if report.memory_cases.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<22} {:>9} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7}",
        "memory (run --drain)",
        "entries",
        "c",
        "peak MiB",
        "handled",
        "malformed",
        "reads",
        "held MiB",
        "fill s",
        "drain s"
    );
    let number = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mib = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |n| format!("{n:.1}"));
    for case in &report.memory_cases {
        println!(
            "{:<22} {:>9} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7.1} {:>7.1}",
            case.name,
            case.entries,
            case.concurrency,
            mib(case.peak_rss_mib),
            number(case.handled),
            number(case.malformed),
            number(case.reads),
            mib(case.held_bytes_peak_mib),
            case.fill_secs,
            case.drain_secs
        );
        for note in case
            .skipped
            .iter()
            .chain(case.error.iter())
            .chain(case.warnings.iter())
        {
            println!("    {note}");
        }
    }
    let verdict = match report.memory_within_budget {
        Some(true) => "every case finished within it",
        Some(false) => "NOT every case finished within it",
        None => "no case ran",
    };
    println!(
        "memory budget {} MiB: {verdict} (largest peak {} MiB)",
        report.memory_budget_mib,
        mib(report.memory_max_peak_rss_mib)
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
async fn clear(target: &RedisTarget, prefix: &str) -> anyhow::Result<()> {
    // With the hash-tagged keys of the lease and the dead-letter markers.
    for pattern in [
        format!("{prefix}:*"),
        format!("{prefix}-*"),
        format!("{{{prefix}:*"),
        format!("{{{prefix}-*"),
    ] {
        delete_matching(target, &pattern, "clear the benchmark's keys").await?;
    }
    Ok(())
}

/// Adds `count` deletion events for users `u0..`, pipelined.
async fn fill(
    conn: &mut RedisConnection,
    url: &str,
    stream: &str,
    count: u64,
) -> anyhow::Result<()> {
    fill_entries(conn, url, stream, count, Shape::Small).await
}

/// Adds `count` deletion events shaped like `shape`, pipelined in chunks of
/// at most [`FILL_CHUNK`] entries and about [`FILL_CHUNK_BYTES`].
async fn fill_entries(
    conn: &mut RedisConnection,
    url: &str,
    stream: &str,
    count: u64,
    shape: Shape,
) -> anyhow::Result<()> {
    let payload = match shape {
        Shape::Payload { bytes, .. } => vec![b'p'; bytes],
        _ => Vec::new(),
    };
    let names: Vec<String> = match shape {
        Shape::Fields(_) => (0..shape.extra_fields()).map(field_name).collect(),
        _ => Vec::new(),
    };
    let per_chunk = u64::try_from(FILL_CHUNK_BYTES / shape.wire_bytes().max(1))
        .unwrap_or(FILL_CHUNK)
        .clamp(1, FILL_CHUNK);
    let mut next = 0;
    while next < count {
        let end = (next + per_chunk).min(count);
        let mut pipe = redis::pipe();
        for index in next..end {
            let user = match shape {
                Shape::Payload { one_user: true, .. } => "u0".to_owned(),
                _ => format!("u{index}"),
            };
            let command = pipe
                .cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("event_type")
                .arg("user.deleted")
                .arg("user_id")
                .arg(user)
                .arg("occurred_at_ms")
                .arg(1_700_000_000_000_i64 + index as i64)
                .arg("source")
                .arg("bench");
            match shape {
                Shape::Small => {}
                Shape::Payload { .. } => {
                    command.arg("payload").arg(payload.as_slice());
                }
                Shape::Fields(_) => {
                    for name in &names {
                        command.arg(name).arg("x");
                    }
                }
                Shape::EmptyFields(_) => {
                    for _ in 0..shape.extra_fields() {
                        command.arg("").arg("");
                    }
                }
            }
            command.ignore();
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

/// Games of the one user of [`script_bound_case`].
const BOUND_GAMES: u64 = 100_000;
/// What no single script call should exceed, in ms.
const MAX_SCRIPT_BUDGET_MS: u64 = 5;
/// The slow-log threshold of [`script_bound_case`], in µs. Not 0: Redis 7
/// logs every command a script runs too, which would be half a million
/// entries for this case; a script call of any length worth reporting is
/// far above it (below it the longest is reported as 0).
const BOUND_SLOWLOG_MICROS: u64 = 100;

/// The longest single script call (`EVAL`, `EVALSHA`, `FCALL`) on Redis, in
/// ms, while one `user.deleted` for user `u0`, who owns or plays in
/// [`BOUND_GAMES`] games of every status, runs through the worker's own
/// path (the cascade handler in a drain, as the cascade cases); and how
/// long the drain took. Read from Redis's slow log, whose settings are
/// restored afterwards; `None` when Redis refuses them (`CONFIG` disabled).
async fn script_bound_case(
    target: &RedisTarget,
    conn: &mut RedisConnection,
    prefix: &str,
) -> anyhow::Result<(Option<f64>, f64)> {
    let url = target.url.as_str();
    let lobby_prefix = format!("{prefix}-bound");
    let stream = format!("{prefix}:bound");
    let lobby = target.lobby_store(&lobby_prefix)?;
    let statuses = ["open", "running", "finished", "cancelled"];
    // Written by the store's own `put_game`, a few tasks at a time.
    let tasks: u64 = 32;
    let mut writers = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let lobby = lobby.clone();
        writers.spawn(async move {
            for index in (task..BOUND_GAMES).step_by(usize::try_from(tasks).unwrap_or(1)) {
                let user = |every: u64| {
                    if index % every == 0 {
                        BTreeSet::from(["u0".to_owned()])
                    } else {
                        BTreeSet::new()
                    }
                };
                let game = Game {
                    status: statuses
                        .get(usize::try_from(index % 4).unwrap_or_default())
                        .map(|status| GameStatus::parse(status)),
                    owner_id: if index % 3 == 0 {
                        "u0".to_owned()
                    } else {
                        format!("o{index}")
                    },
                    cancel_reason: None,
                    members: BTreeSet::from(["u0".to_owned(), format!("o{index}")]),
                    applicants: user(5),
                    invitees: user(7),
                    dropped: BTreeSet::new(),
                };
                lobby.put_game(&format!("b{index}"), &game).await?;
            }
            Ok::<(), lifecycle_domain::StoreError>(())
        });
    }
    while let Some(written) = writers.join_next().await {
        written.context("a seeding task panicked")??;
    }
    redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("event_type")
        .arg("user.deleted")
        .arg("user_id")
        .arg("u0")
        .arg("occurred_at_ms")
        .arg(1_700_000_000_000_i64)
        .query_async::<()>(conn)
        .await
        .map_err(|err| explain(url, "publish", &err))?;

    // Every master's slow log: on a cluster, the games lie on all of them.
    let mut masters = connect_masters(target).await?;
    let mut earlier = Vec::with_capacity(masters.len());
    let mut watched = true;
    for master in &mut masters {
        earlier.push((
            config_value(master, "slowlog-log-slower-than").await,
            config_value(master, "slowlog-max-len").await,
        ));
        let configured: redis::RedisResult<()> = redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(BOUND_SLOWLOG_MICROS)
            .arg("slowlog-max-len")
            .arg(100_000)
            .query_async(master)
            .await;
        watched &= configured.is_ok();
        if configured.is_ok() {
            redis::cmd("SLOWLOG")
                .arg("RESET")
                .query_async::<()>(master)
                .await
                .map_err(|err| explain(url, "reset the slow log", &err))?;
        }
    }
    let started = Instant::now();
    let handler = Arc::new(CascadeHandler::new(lobby.clone()));
    let config = ConsumerConfig::new(stream.clone(), "bound");
    let drained = drain(target, prefix, config, handler, 1).await;
    let secs = started.elapsed().as_secs_f64();
    let mut entries: redis::RedisResult<Vec<redis::Value>> = Ok(Vec::new());
    for (master, earlier) in masters.iter_mut().zip(earlier) {
        if watched {
            let read: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SLOWLOG")
                .arg("GET")
                .arg(-1)
                .query_async(master)
                .await;
            entries = match (entries, read) {
                (Ok(mut all), Ok(more)) => {
                    all.extend(more);
                    Ok(all)
                }
                (Err(err), _) | (_, Err(err)) => Err(err),
            };
        }
        if let (Some(slower_than), Some(max_len)) = earlier {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("slowlog-log-slower-than")
                .arg(slower_than)
                .arg("slowlog-max-len")
                .arg(max_len)
                .query_async::<()>(master)
                .await
                .map_err(|err| explain(url, "restore the slow-log settings", &err))?;
        }
    }
    drained?;
    let entries = entries.map_err(|err| explain(url, "read the slow log", &err))?;
    let record = lobby.cascade_record("u0").await?;
    let left = lobby.user_games("u0").await?.len();
    clear(target, &lobby_prefix).await?;
    redis::cmd("UNLINK")
        .arg(&stream)
        .query_async::<()>(conn)
        .await
        .map_err(|err| explain(url, "delete the case's stream", &err))?;
    if record.as_ref().map(|record| record.games) != Some(BOUND_GAMES) || left != 0 {
        bail!("the cascade of a user in {BOUND_GAMES} games did not complete: record {record:?}, {left} games left in the index");
    }
    let longest = entries
        .iter()
        .filter_map(|entry| {
            let redis::Value::Array(fields) = entry else {
                return None;
            };
            let (Some(redis::Value::Int(micros)), Some(redis::Value::Array(args))) =
                (fields.get(2), fields.get(3))
            else {
                return None;
            };
            let Some(redis::Value::BulkString(name)) = args.first() else {
                return None;
            };
            let name = String::from_utf8_lossy(name).to_ascii_uppercase();
            matches!(name.as_str(), "EVAL" | "EVALSHA" | "FCALL").then_some(*micros)
        })
        .max()
        .unwrap_or_default();
    Ok((watched.then(|| longest as f64 / 1e3), secs))
}

/// A Redis setting's value; `None` when Redis does not say.
async fn config_value(conn: &mut RedisConnection, name: &str) -> Option<String> {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await
        .ok()?;
    pair.get(1).cloned()
}

/// The bare reader: entries per second of `XREAD COUNT <batch>` alone.
async fn raw_read(
    target: &RedisTarget,
    stream: &str,
    batch: usize,
    expected: u64,
) -> anyhow::Result<f64> {
    let client = target.client_for_key(stream).await?;
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

/// Drains `config.stream` with `handler`; entries per second, and the
/// `XREAD` round trips it took.
async fn drain(
    target: &RedisTarget,
    prefix: &str,
    mut config: ConsumerConfig,
    handler: Arc<dyn EventHandler<UserLifecycleEvent>>,
    expected: u64,
) -> anyhow::Result<(f64, u64)> {
    config.drain = true;
    let offsets = RedisOffsetStore::new(target.endpoint()?, prefix)
        .context("cannot set up the offset store")?;
    let consumer = target.consumer(Arc::new(offsets), config)?;
    consumer.on_event(handler);
    let started = Instant::now();
    consumer.run().await?;
    let elapsed = started.elapsed();
    let stats = consumer.stats().snapshot();
    let finished = stats.finished();
    if finished != expected {
        bail!("the consumer finished {finished} entries, expected {expected}");
    }
    Ok((rate(finished, elapsed), stats.reads))
}

/// Publishes at `rate_eps` for `duration` to `stream`, for a live consumer
/// with the default settings (but a 1 s block) that runs `inner`; the sorted
/// latencies from `XADD` to the handler's completion, and the commands the
/// worker sent meanwhile ([`worker_commands`]).
async fn latency(
    target: &RedisTarget,
    stream: &str,
    inner: Arc<dyn EventHandler<UserLifecycleEvent>>,
    rate_eps: u64,
    duration: Duration,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let mut config = ConsumerConfig::new(stream, "latency");
    config.block_timeout = Duration::from_secs(1);
    let url = target.url.as_str();
    let offsets = RedisOffsetStore::new(target.endpoint()?, stream)
        .context("cannot set up the offset store")?;
    let consumer = Arc::new(target.consumer(Arc::new(offsets), config)?);
    let handler = Arc::new(LatencyHandler {
        inner,
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
    let commands_before = worker_commands(target).await?;
    for user in 0..total {
        ticker.tick().await;
        redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("event_type")
            .arg("user.deleted")
            .arg("user_id")
            .arg(format!("u{user}"))
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
    let commands = worker_commands(target)
        .await?
        .saturating_sub(commands_before);
    consumer.shutdown();
    running.await.context("the latency consumer panicked")??;
    let mut samples = std::mem::take(
        &mut *handler
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    samples.sort_unstable();
    Ok((samples, commands))
}

/// What one memory case's entries look like: each a well-formed
/// `user.deleted` event (`event_type`, `user_id`, `occurred_at_ms`,
/// `source`), plus fields the decoder ignores.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// The event alone.
    Small,
    /// The event and a `payload` field of `bytes` bytes; `one_user`: every
    /// entry for user `u0`, else one user per entry.
    Payload { bytes: usize, one_user: bool },
    /// The event and fields `f0`, `f1`, ... of value `x`, this many in all.
    Fields(usize),
    /// The event and fields of empty name and empty value, this many in all.
    EmptyFields(usize),
}

/// Fields of the event itself.
const EVENT_FIELDS: usize = 4;
/// Bytes of the event's own names and values (`u<i>` of a few digits).
const EVENT_BYTES: usize = 72;

impl Shape {
    /// Fields of one entry.
    fn fields(self) -> usize {
        match self {
            Shape::Small => EVENT_FIELDS,
            Shape::Payload { .. } => EVENT_FIELDS + 1,
            Shape::Fields(total) | Shape::EmptyFields(total) => total.max(EVENT_FIELDS),
        }
    }

    /// Fields beyond the event's.
    fn extra_fields(self) -> usize {
        self.fields() - EVENT_FIELDS
    }

    /// Bytes of one entry's names and values (about).
    fn entry_bytes(self) -> usize {
        EVENT_BYTES
            + match self {
                Shape::Small | Shape::EmptyFields(_) => 0,
                Shape::Payload { bytes, .. } => "payload".len() + bytes,
                Shape::Fields(_) => (0..self.extra_fields())
                    .map(|index| field_name(index).len() + 1)
                    .sum(),
            }
    }

    /// Bytes of one `XADD` on the wire (about).
    fn wire_bytes(self) -> usize {
        self.entry_bytes() + 12 * self.fields() + 64
    }
}

fn field_name(index: usize) -> String {
    format!("f{index}")
}

/// One memory case: a backlog, the concurrency it is drained with, and the
/// report field its peak goes to.
struct CaseSpec {
    name: &'static str,
    entries: u64,
    concurrency: u32,
    shape: Shape,
    field: fn(&mut Report) -> &mut Option<f64>,
}

/// The memory cases, in the order they run; `small` entries for the first
/// two.
fn all_cases(small: u64) -> Vec<CaseSpec> {
    let payload = 900 * 1024;
    vec![
        CaseSpec {
            name: "small_1m_c1",
            entries: small,
            concurrency: 1,
            shape: Shape::Small,
            field: |report| &mut report.memory_small_1m_c1_peak_rss_mib,
        },
        CaseSpec {
            name: "small_1m_c64",
            entries: small,
            concurrency: 64,
            shape: Shape::Small,
            field: |report| &mut report.memory_small_1m_c64_peak_rss_mib,
        },
        CaseSpec {
            name: "900k_one_user_c64",
            entries: 2_000,
            concurrency: 64,
            shape: Shape::Payload {
                bytes: payload,
                one_user: true,
            },
            field: |report| &mut report.memory_900k_one_user_c64_peak_rss_mib,
        },
        CaseSpec {
            name: "900k_2000_users_c64",
            entries: 2_000,
            concurrency: 64,
            shape: Shape::Payload {
                bytes: payload,
                one_user: false,
            },
            field: |report| &mut report.memory_900k_2000_users_c64_peak_rss_mib,
        },
        CaseSpec {
            name: "5000_fields",
            entries: 10_000,
            concurrency: 1,
            shape: Shape::Fields(5_000),
            field: |report| &mut report.memory_5000_fields_peak_rss_mib,
        },
        CaseSpec {
            name: "100k_empty_fields",
            entries: 1_000,
            concurrency: 1,
            shape: Shape::EmptyFields(100_000),
            field: |report| &mut report.memory_100k_empty_fields_peak_rss_mib,
        },
    ]
}

/// The cases `--memory-cases` names: `all`, `none`, or names separated by
/// commas.
fn select_cases(text: &str, small: u64) -> anyhow::Result<Vec<CaseSpec>> {
    let all = all_cases(small);
    let text = text.trim();
    if text.eq_ignore_ascii_case("all") {
        return Ok(all);
    }
    if text.eq_ignore_ascii_case("none") || text.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<&str> = text.split(',').map(str::trim).collect();
    for name in &wanted {
        if !all.iter().any(|case| case.name == *name) {
            let names: Vec<&str> = all.iter().map(|case| case.name).collect();
            bail!(
                "--memory-cases: no case {name:?}; the cases are {}, or all, or none",
                names.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|case| wanted.contains(&case.name))
        .collect())
}

/// Fills a fresh stream for `spec`, drains it with a `run --drain` child and
/// removes the case's keys again. Problems of the case itself (no room in
/// Redis, a failing child) are reported in the case, not as an error.
async fn memory_case(
    target: &RedisTarget,
    conn: &mut RedisConnection,
    args: &BenchArgs,
    private: bool,
    spec: &CaseSpec,
) -> anyhow::Result<MemoryCase> {
    let mut case = MemoryCase {
        name: spec.name,
        entries: spec.entries,
        concurrency: spec.concurrency,
        fields_per_entry: spec.shape.fields(),
        entry_bytes: spec.shape.entry_bytes(),
        ..MemoryCase::default()
    };
    let url = target.url.as_str();
    let needed = usize::try_from(spec.entries)
        .unwrap_or(usize::MAX)
        .saturating_mul(spec.shape.wire_bytes());
    let stream = format!("bench:mem:{}", spec.name);
    if let Some(reason) = no_room(target, &stream, needed, private).await? {
        case.skipped = Some(reason);
        return Ok(case);
    }
    let prefix = format!("bench-mem-{}", spec.name);
    drop_case_keys(target, conn, &stream, &prefix).await?;
    let started = Instant::now();
    let filled = fill_entries(conn, url, &stream, spec.entries, spec.shape).await;
    case.fill_secs = started.elapsed().as_secs_f64();
    match filled {
        Ok(()) => {
            case.redis_used_memory_mib = redis_memory(target, &stream)
                .await?
                .0
                .map(|bytes| bytes as f64 / MIB);
            let started = Instant::now();
            let child = drain_child(
                url,
                &args.tls,
                &stream,
                &prefix,
                spec.concurrency,
                args.memory_case_timeout,
            )
            .await;
            case.drain_secs = started.elapsed().as_secs_f64();
            match child {
                Ok(child) => child.into_case(&mut case),
                Err(err) => case.error = Some(format!("{err:#}")),
            }
        }
        Err(err) => case.error = Some(format!("{err:#}")),
    }
    drop_case_keys(target, conn, &stream, &prefix).await?;
    Ok(case)
}

const MIB: f64 = 1024.0 * 1024.0;

/// Why Redis has no room for about `needed` more bytes, if it has none:
/// its `maxmemory`, and for the private server this machine's available
/// memory (twice `needed`, for the server's own copies while filling).
async fn no_room(
    target: &RedisTarget,
    stream: &str,
    needed: usize,
    private: bool,
) -> anyhow::Result<Option<String>> {
    let (used, max) = redis_memory(target, stream).await?;
    let needed = u64::try_from(needed).unwrap_or(u64::MAX);
    if let (Some(used), Some(max)) = (used, max.filter(|max| *max > 0)) {
        if used.saturating_add(needed) > max {
            return Ok(Some(format!(
                "skipped: Redis's maxmemory ({:.0} MiB, {:.0} used) leaves no room for about {:.0} MiB of entries",
                max as f64 / MIB,
                used as f64 / MIB,
                needed as f64 / MIB
            )));
        }
    }
    if private {
        if let Some(available) = mem_available_bytes() {
            if needed.saturating_mul(2) > available {
                return Ok(Some(format!(
                    "skipped: this machine has {:.0} MiB available, too little for about {:.0} MiB of entries in Redis",
                    available as f64 / MIB,
                    needed as f64 / MIB
                )));
            }
        }
    }
    Ok(None)
}

/// Redis's `used_memory` and `maxmemory`, in bytes, on the server that
/// holds `stream` (on a cluster, its slot's master).
async fn redis_memory(
    target: &RedisTarget,
    stream: &str,
) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let url = target.url.as_str();
    let server = target.client_for_key(stream).await?;
    let conn = &mut connect_to(&server, url).await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|err| explain(url, "read Redis's memory use", &err))?;
    let field = |name: &str| {
        info.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Ok((field("used_memory"), field("maxmemory")))
}

/// `MemAvailable` of this machine, in bytes.
fn mem_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| {
        let kib: u64 = line
            .strip_prefix("MemAvailable:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib.saturating_mul(1024))
    })
}

/// Deletes a memory case's stream and every key under its prefix.
async fn drop_case_keys(
    target: &RedisTarget,
    conn: &mut RedisConnection,
    stream: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    let url = target.url.as_str();
    redis::cmd("UNLINK")
        .arg(stream)
        .query_async::<()>(conn)
        .await
        .map_err(|err| explain(url, "delete a memory case's stream", &err))?;
    delete_matching(target, &format!("{prefix}:*"), "clear a memory case's keys").await
}

/// What a `run --drain` child said and did.
#[derive(Debug, Default)]
struct ChildOutcome {
    peak_kib: Option<u64>,
    finished: bool,
    handled: Option<u64>,
    malformed: Option<u64>,
    reads: Option<u64>,
    offset_saves: Option<u64>,
    held_bytes_peak: Option<u64>,
    warnings: Vec<String>,
    failure: Option<String>,
}

impl ChildOutcome {
    /// Takes in one line of the child's JSON log.
    fn note_line(&mut self, line: &str) {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        let number = |name: &str| value.get(name).and_then(serde_json::Value::as_u64);
        let text = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
        if let Some(kib) = number("peak_rss_kib") {
            self.peak_kib = Some(kib);
        }
        if text("message") == Some("drained") {
            self.handled = number("handled");
            self.malformed = number("malformed");
            self.reads = number("reads");
            self.offset_saves = number("offset_saves");
            self.held_bytes_peak = number("held_bytes_peak");
        }
        if matches!(text("level"), Some("WARN" | "ERROR")) {
            let message = text("message").unwrap_or_default();
            let seen = self
                .warnings
                .iter()
                .any(|warning| warning.contains(message));
            if !seen && self.warnings.len() < 5 {
                let mut warning = format!("{}: {message}", text("level").unwrap_or_default());
                if let Some(err) = text("err") {
                    warning.push_str(&format!(" ({err})"));
                }
                self.warnings.push(warning);
            }
        }
    }

    fn into_case(self, case: &mut MemoryCase) {
        case.peak_rss_mib = self.peak_kib.map(|kib| kib as f64 / 1024.0);
        case.finished = self.finished;
        case.handled = self.handled;
        case.malformed = self.malformed;
        case.reads = self.reads;
        case.offset_saves = self.offset_saves;
        case.held_bytes_peak_mib = self.held_bytes_peak.map(|bytes| bytes as f64 / MIB);
        case.warnings = self.warnings;
        case.error = self.failure;
    }
}

/// Runs this binary's `run --drain --concurrency <concurrency>` over
/// `stream` (offset and lobby under `prefix`) and collects what it reports,
/// its peak resident memory first. A child still running after `timeout`
/// is stopped; its peak so far is read from `/proc`.
async fn drain_child(
    url: &str,
    tls: &TlsArgs,
    stream: &str,
    prefix: &str,
    concurrency: u32,
    timeout: Duration,
) -> anyhow::Result<ChildOutcome> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut command = tokio::process::Command::new(exe);
    command.args([
        "run",
        "--drain",
        "--log-format",
        "json",
        "--log-level",
        "info",
        // Without the HTTP endpoints and their lag task: the engine's
        // memory is measured, and the lag task's counting script would add
        // its own load on Redis (seconds per refresh on entries of
        // thousands of fields or of 900 KiB).
        "--metrics-addr",
        "off",
    ]);
    command.args(tls.as_flags());
    let concurrency = concurrency.to_string();
    let mut child = command
        .args(["--stream", stream, "--key-prefix", prefix])
        .args(["--concurrency", concurrency.as_str()])
        .args(["--key-layout", crate::redis_conn::layout_of(url).as_str()])
        .env("REDIS_URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `lobby-worker run --drain`")?;
    let pid = child.id();
    let stderr = child.stderr.take().context("no stderr from the child")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut outcome = ChildOutcome::default();
    let watched = async {
        while let Some(line) = lines.next_line().await? {
            outcome.note_line(&line);
        }
        child.wait().await
    };
    let result = tokio::time::timeout(timeout, watched).await;
    match result {
        Ok(status) => {
            let status = status?;
            outcome.finished = status.success();
            if !status.success() {
                outcome.failure = Some(format!("`lobby-worker run --drain` failed with {status}"));
            }
        }
        Err(_) => {
            if let Some(kib) = pid.and_then(vm_hwm_kib) {
                outcome.peak_kib = Some(kib);
            }
            child
                .kill()
                .await
                .context("cannot stop `lobby-worker run --drain`")?;
            outcome.failure = Some(format!(
                "`lobby-worker run --drain` did not finish within {}; stopped (its peak memory so far is reported)",
                crate::cli::format_duration(timeout)
            ));
        }
    }
    if outcome.peak_kib.is_none() && outcome.failure.is_none() {
        outcome.failure = Some("`lobby-worker run --drain` did not report its peak memory".into());
    }
    Ok(outcome)
}

/// The peak resident memory (`VmHWM`) of process `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_chosen_by_name() {
        assert_eq!(select_cases("all", 10).map(|c| c.len()).ok(), Some(6));
        assert_eq!(select_cases("none", 10).map(|c| c.len()).ok(), Some(0));
        let chosen = select_cases("5000_fields, small_1m_c1", 10).unwrap_or_default();
        let names: Vec<&str> = chosen.iter().map(|case| case.name).collect();
        assert_eq!(names, ["small_1m_c1", "5000_fields"]);
        assert!(select_cases("small", 10).is_err());
    }

    #[test]
    fn shapes_count_their_fields_and_bytes() {
        assert_eq!(Shape::Fields(5_000).fields(), 5_000);
        assert_eq!(Shape::EmptyFields(100_000).extra_fields(), 99_996);
        let payload = Shape::Payload {
            bytes: 900 * 1024,
            one_user: true,
        };
        assert!(payload.entry_bytes() > 900 * 1024);
        assert_eq!(Shape::EmptyFields(100_000).entry_bytes(), EVENT_BYTES);
    }

    #[test]
    fn the_child_log_is_read_for_its_numbers_and_warnings() {
        let mut outcome = ChildOutcome::default();
        outcome.note_line(
            r#"{"level":"WARN","message":"Redis unavailable; retrying","err":"timeout"}"#,
        );
        outcome
            .note_line(r#"{"level":"WARN","message":"Redis unavailable; retrying","err":"again"}"#);
        outcome.note_line(r#"{"level":"INFO","message":"drained","handled":7,"malformed":1,"reads":3,"offset_saves":2,"held_bytes_peak":1024,"peak_rss_kib":2048}"#);
        outcome.note_line("not json");
        assert_eq!(outcome.peak_kib, Some(2048));
        assert_eq!(outcome.handled, Some(7));
        assert_eq!(outcome.reads, Some(3));
        assert_eq!(
            outcome.warnings,
            ["WARN: Redis unavailable; retrying (timeout)"]
        );
    }
}
