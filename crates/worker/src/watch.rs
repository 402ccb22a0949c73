//! The watch task of `run`: every few seconds it looks at the stream from
//! outside the consumer, to keep the lag gauges, to warn when the stored
//! offset lies past the stream's end (the one situation in which events are
//! skipped without an error), to log the periodic summary, and to draw
//! `--drain`'s progress bar on a terminal. Its decisions are the plain types
//! [`PastEndEpisode`] and [`SummaryClock`]; the task only does the I/O.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lifecycle_streams::{ConsumerStats, StatsSnapshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{LagProbe, LagReading, LAG_INTERVAL};
use crate::stream_status::LAG_COUNT_LIMIT;

/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// What the watch task does besides the gauges.
#[derive(Clone, Copy, Debug)]
pub struct WatchSettings {
    /// How often the summary line is logged (`None`: never).
    pub summary_every: Option<Duration>,
    /// Whether to draw a progress bar on stderr.
    pub progress: bool,
}

/// Tracks whether the offset is past the stream's end, so that the warning
/// is logged once when it begins and a line when it ends, not every probe.
#[derive(Debug, Default)]
pub struct PastEndEpisode {
    ongoing: bool,
}

/// A change worth a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PastEndChange {
    /// The offset was just found past the stream's end.
    Began,
    /// It is no longer.
    Ended,
}

impl PastEndEpisode {
    /// Takes one probe's finding; says when it changes.
    pub fn observe(&mut self, past_end: bool) -> Option<PastEndChange> {
        let change = match (self.ongoing, past_end) {
            (false, true) => Some(PastEndChange::Began),
            (true, false) => Some(PastEndChange::Ended),
            _ => None,
        };
        self.ongoing = past_end;
        change
    }
}

/// What the summary line says of one interval and of the run so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Entries handled since start.
    pub handled: u64,
    /// Malformed and unknown-type entries absorbed since start.
    pub absorbed: u64,
    /// Entries dead-lettered since start.
    pub dead_lettered: u64,
    /// Handler calls that failed since start (each retry counts).
    pub failures: u64,
    /// Redis failures met since start.
    pub redis_faults: u64,
    /// Entries finished per second over the interval.
    pub per_second: f64,
}

/// Turns the consumer's counters into summary lines, remembering the last.
#[derive(Debug)]
pub struct SummaryClock {
    last_done: u64,
    last_at: Instant,
}

/// Entries finished one way or another.
fn done(stats: &StatsSnapshot) -> u64 {
    stats.handled + stats.malformed + stats.unknown_type + stats.dead_lettered
}

impl SummaryClock {
    /// Starts counting at `at`, from `stats`.
    pub fn new(stats: &StatsSnapshot, at: Instant) -> Self {
        Self {
            last_done: done(stats),
            last_at: at,
        }
    }

    /// The summary at `at`, and the start of the next interval.
    pub fn summarise(&mut self, stats: &StatsSnapshot, at: Instant) -> Summary {
        let finished = done(stats);
        let seconds = at.saturating_duration_since(self.last_at).as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let per_second = if seconds > 0.0 {
            finished.saturating_sub(self.last_done) as f64 / seconds
        } else {
            0.0
        };
        self.last_done = finished;
        self.last_at = at;
        Summary {
            handled: stats.handled,
            absorbed: stats.malformed + stats.unknown_type,
            dead_lettered: stats.dead_lettered,
            failures: stats.handler_failures,
            redis_faults: stats.redis_faults,
            per_second: (per_second * 10.0).round() / 10.0,
        }
    }
}

/// A bar on stderr: entries done, remaining (from the last probe), rate.
fn progress_bar() -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{spinner} {pos} entries done, {msg} remaining, {per_sec}, {elapsed_precise}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(style);
    bar.set_message("?");
    bar
}

fn remaining_text(reading: &LagReading) -> String {
    if reading.lag.more_than {
        format!("more than {LAG_COUNT_LIMIT}")
    } else {
        reading.lag.entries.to_string()
    }
}

/// Looks at the stream every [`LAG_INTERVAL`] (and logs, draws) until
/// `cancel` fires; the one place it stops. Failures (Redis down) keep the
/// last values and count in `lobby_lag_probe_failures_total`; the consumer
/// reports outages itself.
pub async fn watch(
    mut probe: LagProbe,
    stats: Arc<ConsumerStats>,
    settings: WatchSettings,
    cancel: CancellationToken,
) {
    let mut lag_ticks = tokio::time::interval(LAG_INTERVAL);
    lag_ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let start = Instant::now();
    // Unused when there is no summary (the branch is disabled).
    let period = settings.summary_every.unwrap_or(LAG_INTERVAL);
    let mut summary_ticks = tokio::time::interval_at(start + period, period);
    summary_ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut progress_ticks = tokio::time::interval(PROGRESS_INTERVAL);
    progress_ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let bar = settings.progress.then(progress_bar);
    let mut clock = SummaryClock::new(&stats.snapshot(), start);
    let mut past_end = PastEndEpisode::default();
    let mut last = LagReading::default();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            _ = lag_ticks.tick() => {
                let looked = tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    looked = look(&mut probe, &mut past_end) => looked,
                };
                if let Some(reading) = looked {
                    if let Some(bar) = &bar {
                        bar.set_message(remaining_text(&reading));
                    }
                    last = reading;
                }
            }
            _ = summary_ticks.tick(), if settings.summary_every.is_some() => {
                // The lag as of now, not of up to LAG_INTERVAL ago.
                let looked = tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    looked = look(&mut probe, &mut past_end) => looked,
                };
                last = looked.unwrap_or(last);
                let summary = clock.summarise(&stats.snapshot(), Instant::now());
                info!(
                    handled = summary.handled,
                    absorbed = summary.absorbed,
                    dead_lettered = summary.dead_lettered,
                    failures = summary.failures,
                    redis_faults = summary.redis_faults,
                    per_second = summary.per_second,
                    lag_entries = last.entries_counted.then_some(last.lag.entries),
                    lag_entries_more_than = last.entries_counted.then_some(last.lag.more_than),
                    lag_seconds = last.lag.ms / 1000,
                    "summary"
                );
            }
            _ = progress_ticks.tick(), if bar.is_some() => {
                if let Some(bar) = &bar {
                    let finished = done(&stats.snapshot());
                    if !last.lag.more_than {
                        bar.set_length(finished.max(bar.position()) + last.lag.entries);
                    }
                    bar.set_position(finished);
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// One look at the stream: the gauges set, a change of the past-end
/// episode logged; `None` when Redis failed (counted, logged at debug).
async fn look(probe: &mut LagProbe, past_end: &mut PastEndEpisode) -> Option<LagReading> {
    match probe.refresh().await {
        Ok(reading) => {
            report_past_end(past_end.observe(reading.offset_past_end), probe, &reading);
            Some(reading)
        }
        Err(err) => {
            probe.failed();
            debug!(err = %err, "cannot refresh the lag gauges");
            None
        }
    }
}

fn report_past_end(change: Option<PastEndChange>, probe: &LagProbe, reading: &LagReading) {
    let offset = reading.offset.map(tracing::field::display);
    let last_generated_id = reading.last_generated_id.map(tracing::field::display);
    match change {
        Some(PastEndChange::Began) => warn!(
            stream = %probe.stream,
            label = %probe.label,
            offset,
            last_generated_id,
            "the stored offset is past the stream's last entry: events added until the stream's ids pass it are skipped; check --label and --stream, or move the offset with `lobby-worker offsets set`"
        ),
        Some(PastEndChange::Ended) => info!(
            stream = %probe.stream,
            label = %probe.label,
            offset,
            "the stored offset is within the stream again"
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_past_end_warning_is_once_per_episode() {
        let mut episode = PastEndEpisode::default();
        assert_eq!(episode.observe(false), None);
        assert_eq!(episode.observe(true), Some(PastEndChange::Began));
        assert_eq!(episode.observe(true), None);
        assert_eq!(episode.observe(false), Some(PastEndChange::Ended));
        assert_eq!(episode.observe(false), None);
        assert_eq!(episode.observe(true), Some(PastEndChange::Began));
    }

    #[test]
    fn summaries_count_totals_and_the_interval_rate() {
        let start = Instant::now();
        let mut stats = StatsSnapshot {
            handled: 10,
            ..StatsSnapshot::default()
        };
        let mut clock = SummaryClock::new(&stats, start);
        stats.handled = 100;
        stats.malformed = 5;
        stats.unknown_type = 5;
        stats.dead_lettered = 10;
        stats.handler_failures = 3;
        let summary = clock.summarise(&stats, start + Duration::from_secs(2));
        assert_eq!(
            summary,
            Summary {
                handled: 100,
                absorbed: 10,
                dead_lettered: 10,
                failures: 3,
                redis_faults: 0,
                per_second: 55.0,
            }
        );
        let idle = clock.summarise(&stats, start + Duration::from_secs(4));
        assert_eq!(
            idle.per_second, 0.0,
            "nothing finished in the second interval"
        );
        let instant = clock.summarise(&stats, start + Duration::from_secs(4));
        assert_eq!(
            instant.per_second, 0.0,
            "an empty interval divides by nothing"
        );
    }
}
