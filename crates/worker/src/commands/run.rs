//! `lobby-worker run`: the worker.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lifecycle_domain::{CascadeHandler, StopReason, UserLifecycleConsumer};
use lifecycle_redis::{redact_url, Identity, RedisLease, RedisOffsetStore, VersionError};
use lifecycle_streams::{
    BackoffPolicy, Checkpoint, ConsumerConfig, ConsumerStats, StartFrom, DEFAULT_MAX_REPLY_BYTES,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cli::{
    format_duration, CheckpointArg, InputError, LogFormat, MetricsAddr, RunArgs,
    DEFAULT_METRICS_ADDR,
};
use crate::handler_metrics::{HandlerMetrics, InstrumentedHandler};
use crate::health::Health;
use crate::metrics::{LagGauges, LagProbe, Metrics};
use crate::outcome::InstrumentedOffsets;
use crate::outcome::LastOutcome;
use crate::redis_conn::{cluster_node_error, RedisTarget};
use crate::watch::{watch, WatchSettings};

/// Runs [`lifecycle_redis::verify_server`] on the server `endpoint` names
/// now (for a Sentinel-managed master, the sentinels are asked first; a
/// master not found yet is an outage, which the engine rides out).
async fn verify_endpoint(
    endpoint: &lifecycle_streams::RedisEndpoint,
) -> Result<lifecycle_redis::ServerCheck, VersionError> {
    // Every master of a cluster: offsets, records and games lie on all.
    let masters = endpoint
        .masters()
        .await
        .map_err(|source| VersionError::Redis {
            at: endpoint.describe(),
            source,
        })?;
    let mut merged: Option<lifecycle_redis::ServerCheck> = None;
    for master in masters {
        let check = lifecycle_redis::verify_server(&master).await?;
        merged = Some(match merged {
            None => check,
            Some(earlier) => lifecycle_redis::ServerCheck {
                version: earlier.version.or(check.version),
                evicting_policy: earlier.evicting_policy.or(check.evicting_policy),
                cluster_node: earlier.cluster_node || check.cluster_node,
            },
        });
    }
    Ok(merged.unwrap_or(lifecycle_redis::ServerCheck {
        version: None,
        evicting_policy: None,
        cluster_node: false,
    }))
}

/// The longest `--summary-interval`.
const MAX_SUMMARY_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// The logging settings, for `--print-config`.
#[derive(Clone, Copy, Debug)]
pub struct Logging<'a> {
    /// `--log-level`, if given.
    pub level: Option<&'a str>,
    /// `--log-format`.
    pub format: LogFormat,
}

/// How long the HTTP endpoints may take to finish their requests at exit.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The consumer settings `args` describe.
pub fn consumer_config(args: &RunArgs) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(args.redis.stream.clone(), args.label.clone());
    config.block_timeout = args.block_timeout;
    config.batch_size = args.batch_size as usize;
    config.start_from = args.start_from;
    config.checkpoint = match args.checkpoint {
        CheckpointArg::EveryEntry => Checkpoint::EveryEntry,
        CheckpointArg::EveryBatch => Checkpoint::EveryBatch,
    };
    config.checkpoint_delay = args.checkpoint_delay;
    config.handler_retry = BackoffPolicy {
        initial: args.retry_initial,
        max: args.retry_max,
    };
    config.dead_letter_after = args.dead_letter_after;
    if let Some(stream) = &args.dead_letter_stream {
        config.dead_letter_stream = stream.clone();
    }
    config.shutdown_timeout = args.shutdown_timeout;
    config.max_held_bytes = args.max_held_bytes;
    // A reply is at most a quarter of the budget, so that one in flight and
    // one being decoded fit beside what is held.
    config.max_reply_bytes = (args.max_held_bytes / 4).min(DEFAULT_MAX_REPLY_BYTES);
    config.drain = args.drain;
    config.concurrency = args.concurrency as usize;
    config.lease_ttl = args.lease_ttl;
    config
}

/// Runs the worker until SIGINT/SIGTERM, drain's end or a permanent fault;
/// with `--print-config`, prints the settings instead.
pub async fn run(args: RunArgs, logging: Logging<'_>) -> anyhow::Result<()> {
    let config = consumer_config(&args);
    // The engine names its settings; `main` prints them as flags.
    config
        .validate()
        .map_err(|reason| InputError(format!("invalid settings: {reason}")))?;
    if args.summary_interval > MAX_SUMMARY_INTERVAL {
        return Err(InputError(
            "invalid settings: --summary-interval must be at most 24h (0s turns it off)".into(),
        )
        .into());
    }
    let target = RedisTarget::from_args(&args.redis)?;
    let client = target.endpoint()?;
    if args.print_config {
        print_config(&args, &config, logging)?;
        return Ok(());
    }
    // Listening for SIGINT/SIGTERM from here on: a stop asked while Redis
    // is slow to answer the version check ends the run at once, with 0.
    let mut stop_signal = std::pin::pin!(crate::commands::shutdown_signal());
    let checked = tokio::select! {
        checked = verify_endpoint(&client) => checked,
        () = &mut stop_signal => {
            info!("shutdown requested before consuming began");
            return Ok(());
        }
    };
    match checked {
        Ok(check) => {
            if check.cluster_node && !client.is_cluster() {
                return Err(cluster_node_error(&target.url));
            }
            if let Some(version) = check.version {
                info!(redis_version = %version, "Redis version checked");
            }
            // INFO refused or unreadable: not held against the server.
            if let Some(policy) = check.evicting_policy {
                // An evicted offset loses the worker's place.
                warn!(maxmemory_policy = %policy, "Redis may evict keys under memory pressure (maxmemory-policy is not noeviction): an evicted offset or stream loses the worker's place; set maxmemory-policy noeviction on this Redis");
            }
        }
        // Too old, or not Redis at all: nothing a retry mends.
        Err(err @ (VersionError::TooOld { .. } | VersionError::NotRedis { .. })) => {
            return Err(err.into())
        }
        // Redis not up yet (the engine retries and logs the outage once), or
        // a refused password or handshake, which the engine reports with
        // its advice.
        Err(err) => debug!(err = %err, "Redis version not checked"),
    }
    let offsets = RedisOffsetStore::new(client.clone(), &args.redis.key_prefix)
        .context("cannot set up the offset store")?;
    let lobby = target.lobby_store(&args.redis.key_prefix)?;
    let offset_saves = Arc::new(LastOutcome::default());
    let identity = Identity::of_this_process();
    // A standby is listed by `status` for a few of its attempts.
    let standby_ttl =
        (config.lease_ttl / 5).clamp(Duration::from_millis(50), Duration::from_secs(1)) * 3;
    let lease = RedisLease::new(
        client.clone(),
        &args.redis.key_prefix,
        identity.clone(),
        standby_ttl,
    )
    .context("cannot set up the lease")?;
    let consumer = target.consumer(
        Arc::new(InstrumentedOffsets::new(
            offsets.clone(),
            Arc::clone(&offset_saves),
        )),
        config.clone(),
    )?;
    let consumer = if args.no_lease {
        warn!(
            "running without the lease (--no-lease): every process so started handles every event"
        );
        consumer
    } else {
        consumer.with_lease(Arc::new(lease))
    };
    let handler_metrics = Arc::new(HandlerMetrics::default());
    consumer.on_event(Arc::new(InstrumentedHandler::new(
        CascadeHandler::new(lobby),
        Arc::clone(&handler_metrics),
    )));
    // Stops at a shutdown signal, and when the run ends.
    let http_stop = CancellationToken::new();
    let lag_gauges = Arc::new(LagGauges::default());
    let endpoints = start_endpoints(
        args.metrics_addr,
        Endpoints {
            stats: consumer.stats(),
            handler: handler_metrics,
            offset_saves,
            block_timeout: config.block_timeout,
            lag: Arc::clone(&lag_gauges),
            leased: !args.no_lease,
        },
        &http_stop,
    )
    .await?;
    let progress = config.drain && std::io::stderr().is_terminal();
    let probe = LagProbe {
        conn: lifecycle_redis::connect::lazy_manager(client, Duration::from_secs(5))
            .context("cannot set up the lag probe's connection")?,
        offsets,
        stream: config.stream.clone(),
        label: config.label.clone(),
        start_from: config.start_from,
        // Only where the count is shown: /metrics, or the progress bar.
        count_entries: endpoints.is_some() || progress,
        gauges: lag_gauges,
    };
    let watching = tokio::spawn(watch(
        probe,
        consumer.stats(),
        WatchSettings {
            summary_every: Some(args.summary_interval).filter(|every| !every.is_zero()),
            progress,
        },
        http_stop.clone(),
    ));
    info!(
        redis_url = %redact_url(&args.redis.redis_url),
        stream = %config.stream,
        key_prefix = %args.redis.key_prefix,
        key_layout = %args.redis.key_layout,
        label = %config.label,
        batch_size = config.batch_size,
        block_timeout_ms = config.block_timeout.as_millis() as u64,
        checkpoint = checkpoint_name(config.checkpoint),
        dead_letter_after = config.dead_letter_after,
        drain = config.drain,
        concurrency = config.concurrency,
        lease_ttl_ms = config.lease_ttl.as_millis() as u64,
        holder_id = %identity.holder_id(),
        metrics_addr = %endpoints.as_ref().map_or_else(|| "off".to_owned(), |served| served.addr.to_string()),
        "lobby-worker starting"
    );
    // Through the consumer port: run, and shut down at SIGINT/SIGTERM.
    let mut running = consumer.run();
    // When a signal asked for the stop (`None`: drain's end or a fault).
    let mut stop_requested = None;
    let outcome = tokio::select! {
        outcome = &mut running => outcome,
        () = &mut stop_signal => {
            info!("shutdown requested; finishing the entry in flight");
            stop_requested = Some(tokio::time::Instant::now());
            consumer.shutdown();
            http_stop.cancel();
            running.await
        }
    };
    http_stop.cancel();
    // The progress bar is cleared before the last lines are logged.
    if let Err(err) = watching.await {
        error!(err = %err, "the watch task failed");
    }
    if let Some(served) = endpoints {
        served
            .stop(http_deadline(stop_requested, config.shutdown_timeout))
            .await;
    }
    let outcome = outcome?;
    let stats = consumer.stats().snapshot();
    let peak_rss_kib = peak_rss_kib();
    match outcome.reason {
        StopReason::Drained => {
            info!(
                offset = outcome.offset.map(tracing::field::display),
                handled = stats.handled,
                malformed = stats.malformed,
                unknown_type = stats.unknown_type,
                dead_lettered = stats.dead_lettered,
                reads = stats.reads,
                offset_saves = stats.offset_saves,
                held_bytes_peak = stats.held_bytes_peak,
                peak_rss_kib,
                "drained"
            )
        }
        StopReason::Cancelled => info!(handled = stats.handled, peak_rss_kib, "stopped"),
    }
    Ok(())
}

/// Until when the HTTP endpoints may finish their requests at exit: at most
/// [`HTTP_SHUTDOWN_GRACE`] from now, and after a signal no later than the
/// shutdown deadline it started (they began closing with the signal), so
/// that a slow or half-sent request cannot hold the process past
/// `--shutdown-timeout`.
fn http_deadline(
    stop_requested: Option<tokio::time::Instant>,
    shutdown_timeout: Duration,
) -> tokio::time::Instant {
    let grace = tokio::time::Instant::now() + HTTP_SHUTDOWN_GRACE;
    stop_requested.map_or(grace, |at| grace.min(at + shutdown_timeout))
}

/// What the HTTP endpoints need.
struct Endpoints {
    stats: Arc<ConsumerStats>,
    handler: Arc<HandlerMetrics>,
    offset_saves: Arc<LastOutcome>,
    block_timeout: Duration,
    lag: Arc<LagGauges>,
    /// Whether the worker consumes only while holding the lease.
    leased: bool,
}

/// The running HTTP server.
struct Served {
    addr: std::net::SocketAddr,
    server: JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Waits until `until` for the server's graceful end (requests in
    /// progress finish), then closes what is left; `stop` must have fired.
    async fn stop(self, until: tokio::time::Instant) {
        let Served { mut server, .. } = self;
        match tokio::time::timeout_at(until, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => error!(err = %err, "the HTTP endpoints failed"),
            Ok(Err(err)) => error!(err = %err, "the HTTP endpoints' task failed"),
            Err(_) => {
                warn!("HTTP requests still running at exit; closing them");
                server.abort();
            }
        }
    }
}

/// Binds the metrics address and starts the endpoints.
/// `None` when turned off, or when the default address is taken (then with
/// a warning: several workers on one machine should not fail for it). An
/// address given explicitly that cannot be bound is an error.
async fn start_endpoints(
    addr: Option<MetricsAddr>,
    endpoints: Endpoints,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Served>> {
    let listener = match addr {
        Some(MetricsAddr::Off) => return Ok(None),
        Some(MetricsAddr::At(addr)) => crate::http::bind(addr).await.map_err(|err| {
            anyhow::anyhow!("{err}; choose another --metrics-addr (LOBBY_METRICS_ADDR), or `off`")
        })?,
        None => match crate::http::bind(DEFAULT_METRICS_ADDR).await {
            Ok(listener) => listener,
            Err(err) => {
                warn!(
                    err = %err,
                    "running without /metrics, /healthz and /readyz; choose a free address with --metrics-addr (LOBBY_METRICS_ADDR), or `off`"
                );
                return Ok(None);
            }
        },
    };
    let addr = listener
        .local_addr()
        .context("cannot tell the metrics listener's address")?;
    let Endpoints {
        stats,
        handler,
        offset_saves,
        block_timeout,
        lag,
        leased,
    } = endpoints;
    let health = Health::new(
        Arc::clone(&stats),
        Arc::clone(&handler),
        offset_saves,
        Health::stale_after(block_timeout),
    );
    let health = Arc::new(if leased { health.under_lease() } else { health });
    let metrics = Metrics::new(stats, handler, Arc::clone(&health), lag);
    let server = tokio::spawn(crate::http::serve(listener, metrics, health, stop.clone()));
    info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(Some(Served { addr, server }))
}

/// Prints the effective settings, one aligned `key: value` line each.
fn print_config(
    args: &RunArgs,
    config: &ConsumerConfig,
    logging: Logging<'_>,
) -> anyhow::Result<()> {
    let optional = |value: Option<String>| value.unwrap_or_else(|| "unset".to_owned());
    let log_level = logging
        .level
        .map(str::to_owned)
        .or_else(|| {
            std::env::var("RUST_LOG")
                .ok()
                .filter(|level| !level.is_empty())
        })
        .unwrap_or_else(|| "info".to_owned());
    let rows = [
        (
            "config",
            optional(
                args.redis
                    .config
                    .as_ref()
                    .map(|path| path.display().to_string()),
            ),
        ),
        ("redis_url", redact_url(&args.redis.redis_url)),
        (
            "sentinel_password",
            optional(
                args.redis
                    .sentinel_password
                    .as_ref()
                    .map(|_| "***".to_owned()),
            ),
        ),
        ("stream", config.stream.clone()),
        ("key_prefix", args.redis.key_prefix.clone()),
        ("key_layout", args.redis.key_layout.as_str().to_owned()),
        (
            "tls_ca_file",
            optional(
                args.redis
                    .tls
                    .tls_ca_file
                    .as_ref()
                    .map(|path| path.display().to_string()),
            ),
        ),
        (
            "tls_cert_file",
            optional(
                args.redis
                    .tls
                    .tls_cert_file
                    .as_ref()
                    .map(|path| path.display().to_string()),
            ),
        ),
        (
            "tls_key_file",
            optional(
                args.redis
                    .tls
                    .tls_key_file
                    .as_ref()
                    .map(|path| path.display().to_string()),
            ),
        ),
        ("label", config.label.clone()),
        (
            "offset_key",
            format!("{}:stream_offsets:{}", args.redis.key_prefix, config.label),
        ),
        ("block_timeout", format_duration(config.block_timeout)),
        ("batch_size", config.batch_size.to_string()),
        ("checkpoint", checkpoint_name(config.checkpoint).to_owned()),
        ("checkpoint_delay", format_duration(config.checkpoint_delay)),
        (
            "start_from",
            match config.start_from {
                StartFrom::Beginning => "beginning".to_owned(),
                StartFrom::End => "end".to_owned(),
                StartFrom::Id(id) => id.to_string(),
            },
        ),
        (
            "retry_initial",
            format_duration(config.handler_retry.initial),
        ),
        ("retry_max", format_duration(config.handler_retry.max)),
        (
            "dead_letter_after",
            optional(config.dead_letter_after.map(|n| n.to_string())),
        ),
        ("dead_letter_stream", config.dead_letter_stream.clone()),
        ("shutdown_timeout", format_duration(config.shutdown_timeout)),
        ("lease_ttl", format_duration(config.lease_ttl)),
        ("no_lease", args.no_lease.to_string()),
        ("max_held_bytes", config.max_held_bytes.to_string()),
        ("drain", config.drain.to_string()),
        ("concurrency", config.concurrency.to_string()),
        ("summary_interval", format_duration(args.summary_interval)),
        (
            "metrics_addr",
            args.metrics_addr
                .unwrap_or(MetricsAddr::At(DEFAULT_METRICS_ADDR))
                .to_string(),
        ),
        ("log_level", log_level),
        (
            "log_format",
            match logging.format {
                LogFormat::Text => "text".to_owned(),
                LogFormat::Json => "json".to_owned(),
            },
        ),
    ];
    crate::commands::print_aligned(&rows).context("cannot print the configuration")
}

/// The process's peak resident memory (VmHWM), in KiB; 0 where unknown.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The name `--checkpoint` takes for `checkpoint`.
fn checkpoint_name(checkpoint: Checkpoint) -> &'static str {
    match checkpoint {
        Checkpoint::EveryBatch => "every-batch",
        Checkpoint::EveryEntry => "every-entry",
    }
}
