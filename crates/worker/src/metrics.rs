//! Prometheus metrics of `run`, all named `lobby_*`.
//!
//! The consumer's counters are read from [`ConsumerStats`] at scrape time by
//! a collector, so the hot path pays nothing for them. The handler's timing
//! comes from a decorator around the handler
//! ([`InstrumentedHandler`](crate::handler_metrics::InstrumentedHandler));
//! the lag gauges from a task that looks at the stream every few seconds
//! ([`watch`](crate::watch)). Labels are fixed words (`outcome`), never values taken
//! from entries, users or errors.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use lifecycle_domain::EntryId;
use lifecycle_redis::RedisOffsetStore;
use lifecycle_streams::{now_ms, ConsumerStats, StartFrom};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use crate::handler_metrics::HandlerMetrics;
use crate::health::Health;
use crate::stream_status::{lag, stream_state};

/// How often the lag gauges are refreshed.
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// The gauges the lag task sets.
#[derive(Debug, Default)]
pub struct LagGauges {
    length: Gauge,
    lag_entries: Gauge,
    lag_saturated: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    offset_timestamp_seconds: Gauge<f64, AtomicU64>,
    measured_timestamp_seconds: Gauge<f64, AtomicU64>,
    offset_past_end: Gauge,
    probe_failures: Counter,
}

/// Everything `/metrics` shows.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// The registry of a worker whose consumer keeps `stats`, whose handler
    /// decorator records into `handler` and whose readiness `health` tells.
    /// The lag gauges are `lag`, which the watch task sets.
    pub fn new(
        stats: Arc<ConsumerStats>,
        handler: Arc<HandlerMetrics>,
        health: Arc<Health>,
        lag: Arc<LagGauges>,
    ) -> Self {
        let mut registry = Registry::with_prefix("lobby");
        registry.register_with_unit(
            "handler_duration",
            "Duration of each handler call (one attempt; the cascade of one event)",
            Unit::Seconds,
            handler.duration.clone(),
        );
        registry.register(
            "handler_calls_in_flight",
            "Handler calls running now",
            handler.in_flight.clone(),
        );
        registry.register(
            "stream_length",
            "Entries in the stream (refreshed every 5s)",
            lag.length.clone(),
        );
        registry.register(
            "lag_entries",
            "Entries after the saved offset, counted up to 10000 (refreshed every 5s)",
            lag.lag_entries.clone(),
        );
        registry.register(
            "lag_entries_saturated",
            "1 when more than 10000 entries follow the saved offset (lobby_lag_entries then holds 10000)",
            lag.lag_saturated.clone(),
        );
        registry.register_with_unit(
            "lag",
            "The stream's last entry time minus the saved offset's entry time (refreshed every 5s)",
            Unit::Seconds,
            lag.lag_seconds.clone(),
        );
        registry.register_with_unit(
            "offset_timestamp",
            "Time part of the saved offset's entry id, as a Unix time (refreshed every 5s)",
            Unit::Seconds,
            lag.offset_timestamp_seconds.clone(),
        );
        registry.register_with_unit(
            "lag_measured_timestamp",
            "When the lag gauges were last refreshed (Unix time; 0 before the first measurement, when they mean nothing yet)",
            Unit::Seconds,
            lag.measured_timestamp_seconds.clone(),
        );
        registry.register(
            "offset_past_end",
            "1 while the stored offset lies after every id the stream gave: events added until the stream's ids pass it are skipped",
            lag.offset_past_end.clone(),
        );
        registry.register(
            "lag_probe_failures",
            "Failed refreshes of the lag gauges (they then keep their last values)",
            lag.probe_failures.clone(),
        );
        registry.register_collector(Box::new(StatsCollector { stats, health }));
        Self { registry }
    }

    /// The Prometheus text exposition (format 0.0.4).
    ///
    /// # Errors
    ///
    /// When encoding fails (it writes to a string: never in practice).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::with_capacity(4096);
        prometheus_client::encoding::prometheus_text::encode(&mut body, &self.registry)?;
        Ok(body)
    }
}

/// The consumer's counters, read at scrape time.
#[derive(Debug)]
struct StatsCollector {
    stats: Arc<ConsumerStats>,
    health: Arc<Health>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    let metric_encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

fn gauge<T>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: T,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<T>: EncodeMetric,
{
    let metric = ConstGauge::new(value);
    let metric_encoder = encoder.encode_descriptor(name, help, unit, metric.metric_type())?;
    metric.encode(metric_encoder)
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.stats.snapshot();
        {
            let entries = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "entries",
                "Stream entries whose handling finished, by outcome.",
                None,
                entries.metric_type(),
            )?;
            for (outcome, value) in [
                ("handled", stats.handled),
                ("malformed", stats.malformed),
                ("unknown_type", stats.unknown_type),
                ("dead_lettered", stats.dead_lettered),
            ] {
                let labels = [("outcome", outcome)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut encoder,
            "handler_failures",
            "Handler calls that returned an error (each retry counts).",
            stats.handler_failures,
        )?;
        counter(
            &mut encoder,
            "redis_faults",
            "Redis failures met (each retry counts).",
            stats.redis_faults,
        )?;
        counter(
            &mut encoder,
            "redis_reconnects",
            "Read connections re-established after a fault.",
            stats.reconnects,
        )?;
        counter(
            &mut encoder,
            "offset_saves",
            "Offsets written to Redis.",
            stats.offset_saves,
        )?;
        counter(
            &mut encoder,
            "reads",
            "XREAD round trips sent.",
            stats.reads,
        )?;
        counter(
            &mut encoder,
            "trims_detected",
            "Times the consumer found entries trimmed or deleted before it handled them.",
            stats.trimmed,
        )?;
        counter(
            &mut encoder,
            "trims_suspected",
            "Times the stream began after the consumer's position with nothing to prove entries lay in between.",
            stats.trims_suspected,
        )?;
        counter(
            &mut encoder,
            "offset_rewinds",
            "Times the stored offset was found behind the consumer's saves (Redis lost acknowledged writes, or an operator rewound it) and the entries after it were read again.",
            stats.rewinds,
        )?;
        gauge(
            &mut encoder,
            "lease_held",
            "1 while this process holds the consumer lease and consumes; 0 while it waits as a standby.",
            None,
            to_gauge(stats.lease_held),
        )?;
        counter(
            &mut encoder,
            "lease_acquisitions",
            "Times this process took the consumer lease.",
            stats.lease_acquisitions,
        )?;
        counter(
            &mut encoder,
            "lease_lost",
            "Times this process lost the consumer lease while consuming (not renewed in time, a save or renewal refused, taken by an operator), graceful releases not counted.",
            stats.lease_lost,
        )?;
        gauge(
            &mut encoder,
            "held",
            "Memory charged for entries read but not finished (capped by --max-held-bytes).",
            Some(&Unit::Bytes),
            to_gauge(stats.held_bytes),
        )?;
        gauge(
            &mut encoder,
            "held_entries",
            "Entries read and not yet behind the saved offset.",
            None,
            to_gauge(stats.held_entries),
        )?;
        gauge(
            &mut encoder,
            "last_read_timestamp",
            "When the last XREAD reply arrived, as a Unix time (0: never).",
            Some(&Unit::Seconds),
            ms_to_seconds(stats.last_read_ms),
        )?;
        gauge(
            &mut encoder,
            "ready",
            "1 while /readyz answers 200.",
            None,
            i64::from(self.health.readiness(now_ms()).is_ready()),
        )?;
        Ok(())
    }
}

fn ms_to_seconds(ms: u64) -> f64 {
    // Exact for any millisecond count below 2^53 (the year 285 616).
    #[allow(clippy::cast_precision_loss)]
    let seconds = ms as f64 / 1000.0;
    seconds
}

fn to_gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Where the worker will read from when no offset is stored yet: `None`
/// when that is the stream's end (nothing is behind).
fn implied_offset(start_from: StartFrom) -> Option<EntryId> {
    start_from.read_after()
}

/// What the lag probe needs.
pub struct LagProbe {
    /// Its own connection; reconnects by itself.
    pub conn: lifecycle_streams::RedisConnection,
    /// Where the offset is read.
    pub offsets: RedisOffsetStore,
    /// The stream.
    pub stream: String,
    /// The offset's label.
    pub label: String,
    /// The worker's start option, for the time before it saved an offset.
    pub start_from: StartFrom,
    /// Whether to count the entries after the offset (for `/metrics` and
    /// the progress bar): a script that reads up to 10,000 entries, which on
    /// entries of thousands of fields holds Redis for long. Without it the
    /// lag is told by time alone (from the ids).
    pub count_entries: bool,
    /// What it sets.
    pub gauges: Arc<LagGauges>,
}

/// What one look at the stream found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LagReading {
    /// How far the worker is behind (`entries` 0 unless counted).
    pub lag: crate::stream_status::Lag,
    /// Whether `lag.entries` was counted.
    pub entries_counted: bool,
    /// The stored offset.
    pub offset: Option<EntryId>,
    /// The largest id the stream ever gave (`None`: no stream).
    pub last_generated_id: Option<EntryId>,
    /// Whether the stored offset lies after every id the stream gave.
    pub offset_past_end: bool,
}

impl LagProbe {
    /// One look at the stream: sets the gauges and returns what it found.
    ///
    /// # Errors
    ///
    /// Redis failures, as text (the gauges then keep their values).
    pub async fn refresh(&mut self) -> Result<LagReading, String> {
        // The offset first: read after it, the stream's state already holds
        // every entry the worker had saved past, so a save racing the probe
        // cannot look like an offset past the stream's end.
        let stored = self
            .offsets
            .get(&self.label)
            .await
            .map_err(|err| err.to_string())?;
        let state = stream_state(&mut self.conn, &self.stream)
            .await
            .map_err(|err| err.to_string())?;
        let gauges = &self.gauges;
        gauges.length.set(to_gauge(state.length));
        let offset = match stored {
            Some(offset) => {
                gauges
                    .offset_timestamp_seconds
                    .set(ms_to_seconds(offset.ms));
                Some(offset)
            }
            None => {
                gauges.offset_timestamp_seconds.set(0.0);
                // Before the worker's first save, it reads from where its
                // start option says; "just before the first entry" for the
                // beginning, so that the time lag spans the backlog.
                implied_offset(self.start_from).map(|offset| match state.first_entry_id {
                    Some(first) if offset < first => first.predecessor().unwrap_or(offset),
                    _ => offset,
                })
            }
        };
        let measured = match offset {
            Some(offset) if self.count_entries => lag(&mut self.conn, &self.stream, &state, offset)
                .await
                .map_err(|err| err.to_string())?,
            Some(offset) => crate::stream_status::Lag {
                ms: state
                    .last_entry_id
                    .filter(|last| *last > offset)
                    .map_or(0, |last| last.ms.saturating_sub(offset.ms)),
                ..crate::stream_status::Lag::default()
            },
            None => crate::stream_status::Lag::default(),
        };
        gauges.lag_entries.set(to_gauge(measured.entries));
        gauges.lag_saturated.set(i64::from(measured.more_than));
        gauges.lag_seconds.set(ms_to_seconds(measured.ms));
        let offset_past_end = stored.is_some_and(|offset| state.ends_before(offset));
        gauges.offset_past_end.set(i64::from(offset_past_end));
        gauges
            .measured_timestamp_seconds
            .set(ms_to_seconds(now_ms()));
        Ok(LagReading {
            lag: measured,
            entries_counted: self.count_entries,
            offset: stored,
            last_generated_id: state.last_generated_id,
            offset_past_end,
        })
    }

    /// Counts a failed refresh.
    pub fn failed(&self) {
        self.gauges.probe_failures.inc();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_the_prefix() {
        let stats = Arc::new(ConsumerStats::default());
        let handler = Arc::new(HandlerMetrics::default());
        let health = Arc::new(Health::new(
            Arc::clone(&stats),
            Arc::clone(&handler),
            Arc::default(),
            Duration::from_secs(5),
        ));
        let metrics = Metrics::new(stats, Arc::clone(&handler), health, Arc::default());
        handler.duration.observe(0.002);
        let body = metrics.render().unwrap();
        for line in [
            "lobby_entries_total{outcome=\"handled\"} 0",
            "lobby_entries_total{outcome=\"malformed\"} 0",
            "lobby_entries_total{outcome=\"unknown_type\"} 0",
            "lobby_entries_total{outcome=\"dead_lettered\"} 0",
            "lobby_handler_failures_total 0",
            "lobby_redis_faults_total 0",
            "lobby_redis_reconnects_total 0",
            "lobby_offset_saves_total 0",
            "lobby_reads_total 0",
            "lobby_trims_suspected_total 0",
            "lobby_offset_rewinds_total 0",
            "lobby_held_bytes 0",
            "lobby_held_entries 0",
            "lobby_handler_duration_seconds_count 1",
            "lobby_handler_calls_in_flight 0",
            "lobby_lag_entries 0",
            "lobby_lag_seconds 0.0",
            "lobby_offset_timestamp_seconds 0.0",
            "lobby_lag_measured_timestamp_seconds 0.0",
            "lobby_offset_past_end 0",
            "lobby_ready 0",
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
        }
        assert!(body.contains("# TYPE lobby_handler_duration_seconds histogram"));
    }

    #[test]
    fn the_implied_offset_follows_the_start_option() {
        assert_eq!(implied_offset(StartFrom::Beginning), Some(EntryId::ZERO));
        assert_eq!(
            implied_offset(StartFrom::Id(EntryId::new(5, 0))),
            Some(EntryId::new(4, u64::MAX))
        );
        assert_eq!(implied_offset(StartFrom::End), None);
    }
}
