//! `lobby-worker run`: the worker.

use std::sync::Arc;

use anyhow::Context;
use lifecycle_domain::{CascadeHandler, UserLifecycleConsumer, USER_LIFECYCLE_LABEL};
use lifecycle_redis::{
    open_client, redact_url, RedisLobbyStore, RedisOffsetStore, RedisUserLifecycleConsumer,
};
use lifecycle_streams::{BackoffPolicy, Checkpoint, ConsumerConfig, StopReason};
use tracing::info;

use crate::cli::{CheckpointArg, RunArgs};

/// The consumer settings `args` describe.
pub fn consumer_config(args: &RunArgs) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(args.redis.stream.clone(), USER_LIFECYCLE_LABEL);
    config.block_timeout = args.block_timeout;
    config.batch_size = args.batch_size as usize;
    config.start_from = args.start_from;
    config.checkpoint = match args.checkpoint {
        CheckpointArg::EveryEntry => Checkpoint::EveryEntry,
        CheckpointArg::EveryBatch => Checkpoint::EveryBatch,
    };
    config.handler_retry = BackoffPolicy {
        initial: args.retry_initial,
        max: args.retry_max,
    };
    config.dead_letter_after = args.dead_letter_after;
    if let Some(stream) = &args.dead_letter_stream {
        config.dead_letter_stream = stream.clone();
    }
    config.shutdown_grace = args.shutdown_grace;
    config.drain = args.drain;
    config.concurrency = args.concurrency as usize;
    config
}

/// Runs the worker until SIGINT/SIGTERM, drain's end or a permanent fault.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = consumer_config(&args);
    let client = open_client(&args.redis.redis_url)?;
    let offsets = RedisOffsetStore::new(client.clone(), &args.redis.key_prefix)
        .context("cannot set up the offset store")?;
    let lobby = RedisLobbyStore::new(client.clone(), &args.redis.key_prefix)
        .context("cannot set up the lobby store")?;
    let consumer = RedisUserLifecycleConsumer::new(client, Arc::new(offsets), config.clone())?;
    consumer.on_event(Arc::new(CascadeHandler::new(lobby)));
    info!(
        redis_url = %redact_url(&args.redis.redis_url),
        stream = %config.stream,
        key_prefix = %args.redis.key_prefix,
        batch_size = config.batch_size,
        block_timeout_ms = config.block_timeout.as_millis() as u64,
        checkpoint = ?config.checkpoint,
        dead_letter_after = ?config.dead_letter_after,
        drain = config.drain,
        concurrency = config.concurrency,
        "lobby-worker starting"
    );
    let cancel = consumer.cancellation();
    let signals = tokio::spawn(async move {
        crate::commands::shutdown_signal().await;
        info!("shutdown requested; finishing the entry in flight");
        cancel.cancel();
    });
    let report = consumer.run_to_end().await;
    signals.abort();
    let report = report?;
    let stats = consumer.stats().snapshot();
    let peak_rss_kib = peak_rss_kib();
    match report.reason {
        StopReason::Drained => {
            info!(offset = ?report.offset.map(|id| id.to_string()), handled = stats.handled, malformed = stats.malformed, unknown_type = stats.unknown_type, dead_lettered = stats.dead_lettered, peak_rss_kib, "drained")
        }
        StopReason::Cancelled => info!(handled = stats.handled, peak_rss_kib, "stopped"),
    }
    Ok(())
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
