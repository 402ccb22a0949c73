//! The driver: the async loop that performs what the [`Machine`] decides.
//!
//! One [`StreamConsumer::run`] call is a session. It loads the offset, then
//! asks the machine what to do and does it: reads go to the reader task
//! ([`Reader`], which owns the socket and the reply in flight), jobs run as
//! futures here (the handler, its retries with back-off, dead-lettering), and
//! offset saves run one at a time beside them. Each outcome goes back to the
//! machine. Every future raced in the loop's `select!` is either the reader's
//! channel, a job or the save kept across passes, or a timer: dropping the
//! `select!` branch that lost never loses what was read or written.
//!
//! The loop has one way out (cancellation, drain's end, or a fault that needs
//! a person). After it, one shutdown deadline (`shutdown_timeout`) bounds the
//! rest: handler calls in flight, the save in flight and the final save.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lifecycle_domain::{
    ConsumerLease, EntryId, EventHandler, FenceToken, HandlerError, Renewal, RunOutcome,
    SaveOutcome, StopReason, StoreError, StreamOffsetStore,
};
use redis::{RedisError, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::config::{ConsumerConfig, StartFrom};
use crate::dead_letter::{self, DeadLetterOutcome};
use crate::decoder::{Decoded, EntryDecoder};
use crate::endpoint::{ConnectionTimeouts, RedisConnection, RedisEndpoint};
use crate::error::ConsumerError;
use crate::fault::{advice, advice_in, advice_read, classify, classify_read, FaultClass};
use crate::lease::{LeaseClock, LeaseGuard, LeaseStep, LeaseTiming};
use crate::machine::{entry_cost, Action, Arrival, Completion, Job, Machine, Settings};
use crate::read_conn::{ReadError, Received};
use crate::reader::{ReadRequest, Reader, ReaderEvent, ReaderSettings};
use crate::reply::{parse_range_reply, ReplyError};
use crate::stats::ConsumerStats;
use crate::tls::TlsSettings;
use crate::trim::{Finding, ReadSeen, TrimWatch};
use crate::window::KeyHash;

/// A reliable consumer of one stream, generic over how its entries decode.
pub struct StreamConsumer<D: EntryDecoder> {
    endpoint: RedisEndpoint,
    decoder: D,
    offsets: Arc<dyn StreamOffsetStore>,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
    /// For a `rediss://` client: what the reader's own socket trusts and
    /// presents (`None`: the system's trust store).
    tls: Option<TlsSettings>,
    /// The read size the last session ended with (0: none yet): a session
    /// after a lost lease starts from it rather than from a whole batch,
    /// whose reply of huge entries could hold Redis past the lease again.
    learned_batch_size: std::sync::atomic::AtomicUsize,
    /// The lease that lets one process consume the label at a time (`None`:
    /// this process consumes regardless).
    lease: Option<Arc<dyn ConsumerLease>>,
    /// The Redis outage under way, if any: one for the whole run, so that
    /// an outage a session reported is declared over even when the session
    /// ended under it (a lease lost while Redis was away).
    outage: OutageLog,
}

impl<D: EntryDecoder> StreamConsumer<D> {
    /// A consumer reading from `endpoint` (a `redis::Client`, or a
    /// Sentinel-managed master), decoding with `decoder` and keeping its
    /// offset in `offsets`.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::Config`] when the settings are inconsistent.
    pub fn new(
        endpoint: impl Into<RedisEndpoint>,
        decoder: D,
        offsets: Arc<dyn StreamOffsetStore>,
        config: ConsumerConfig,
    ) -> Result<Self, ConsumerError> {
        config.validate().map_err(ConsumerError::Config)?;
        Ok(Self {
            endpoint: endpoint.into(),
            decoder,
            offsets,
            config,
            stats: Arc::default(),
            tls: None,
            learned_batch_size: std::sync::atomic::AtomicUsize::new(0),
            lease: None,
            outage: OutageLog::default(),
        })
    }

    /// Consumes only while holding `lease` (for `lease_ttl`, renewed every
    /// third of it), waiting as a standby otherwise; every offset save is
    /// then fenced by the holder's token, and a refused one, or a renewal
    /// that cannot be confirmed before the lease may have run out, makes
    /// this process drop what it read, unsaved, and wait again. A graceful
    /// stop releases the lease, so that a standby takes over at once.
    #[must_use]
    pub fn with_lease(mut self, lease: Arc<dyn ConsumerLease>) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Uses `tls` for the reader's own connection to a `rediss://` server;
    /// give the client the same settings (`redis::Client::build_with_tls`
    /// with [`TlsSettings::redis_certificates`]).
    #[must_use]
    pub fn with_tls(mut self, tls: TlsSettings) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The consumer's live counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// The consumer's settings.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Consumes until `cancel` fires, drain mode reaches its end, or a fault
    /// that needs a person occurs.
    ///
    /// # Errors
    ///
    /// [`ConsumerError`] for permanent faults: authentication, a stream key of
    /// another type, a permanently failing offset store.
    pub async fn run<H>(
        &self,
        handler: &H,
        cancel: &CancellationToken,
    ) -> Result<RunOutcome, ConsumerError>
    where
        H: EventHandler<D::Item> + ?Sized,
    {
        match &self.lease {
            None => match self.session(handler, cancel, None).await? {
                SessionEnd::Done(outcome, _) => Ok(outcome),
                // Only a fenced save ends a session so, and only under a
                // lease.
                SessionEnd::LeaseLost => Ok(RunOutcome {
                    reason: StopReason::Cancelled,
                    offset: None,
                    offset_unsaved: true,
                }),
            },
            Some(lease) => self.run_leased(lease.as_ref(), handler, cancel).await,
        }
    }

    /// [`run`](Self::run) under a lease: standby, consuming while held,
    /// standby again when it is lost. The one stop point is the standby's
    /// wait (and the session's own, while consuming).
    async fn run_leased<H>(
        &self,
        lease: &dyn ConsumerLease,
        handler: &H,
        cancel: &CancellationToken,
    ) -> Result<RunOutcome, ConsumerError>
    where
        H: EventHandler<D::Item> + ?Sized,
    {
        let config = &self.config;
        let timing = LeaseTiming::new(config.lease_ttl);
        let label = config.label.as_str();
        let span = tracing::info_span!("lease", stream = %config.stream, label = %label);
        let mut backoff = Backoff::new(config.redis_retry);
        let outage = &self.outage;
        let mut standing_by = false;
        let stopped = RunOutcome {
            reason: StopReason::Cancelled,
            offset: None,
            offset_unsaved: false,
        };
        loop {
            let sent_at = tokio::time::Instant::now();
            let attempt = tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(stopped),
                attempt = lease.acquire(label, timing.ttl).instrument(span.clone()) => attempt,
            };
            if attempt.is_ok() {
                outage.recovered();
                self.stats.lease_checked();
            }
            let token = match attempt {
                Ok(Some(token)) => token,
                Ok(None) => {
                    backoff.reset();
                    if !standing_by {
                        standing_by = true;
                        span.in_scope(|| {
                            info!(
                                poll_ms = millis(timing.standby_poll),
                                "another process holds the lease; waiting as a standby"
                            )
                        });
                    }
                    if !sleep_unless_cancelled(cancel, timing.standby_poll).await {
                        return Ok(stopped);
                    }
                    continue;
                }
                Err(err) if err.permanent => return Err(ConsumerError::Store(err)),
                Err(err) => {
                    let delay = backoff.next_delay();
                    span.in_scope(|| outage.note(&self.stats, &err));
                    if !sleep_unless_cancelled(cancel, delay).await {
                        return Ok(stopped);
                    }
                    continue;
                }
            };
            standing_by = false;
            backoff.reset();
            let clock = LeaseClock::acquired(timing, sent_at);
            let guard = Arc::new(LeaseGuard::new(clock.valid_until()));
            self.stats.lease_acquired(token);
            span.in_scope(|| {
                info!(
                    fence_token = token,
                    ttl_ms = millis(timing.ttl),
                    "lease acquired; consuming"
                )
            });
            let session_cancel = cancel.child_token();
            let keeper_stop = CancellationToken::new();
            let fence = Fence {
                token,
                guard: Arc::clone(&guard),
            };
            let mut session = std::pin::pin!(self.session(handler, &session_cancel, Some(fence)));
            let mut keeper =
                std::pin::pin!(keep_lease(lease, label, token, clock, &guard, &keeper_stop)
                    .instrument(span.clone()));
            let ended = tokio::select! {
                ended = &mut session => Ok(ended),
                kept = &mut keeper => Err(kept),
            };
            keeper_stop.cancel();
            let ended = match ended {
                Ok(ended) => ended,
                Err(KeeperEnd::Lost(why)) => {
                    // Stop at once: what was read is dropped, unsaved; the
                    // handler calls in flight are abandoned (cascades are
                    // idempotent: the next holder applies them again).
                    guard.revoke();
                    self.stats.lease_released(true);
                    span.in_scope(|| warn!(fence_token = token, reason = why, "lease lost; stopped consuming, dropping what was read; waiting as a standby"));
                    continue;
                }
                Err(KeeperEnd::Handover) => {
                    span.in_scope(|| info!(fence_token = token, "an operator asked for the lease; stopping gracefully and handing it over"));
                    session_cancel.cancel();
                    let ended = session.await;
                    self.release(lease, label, token, &span, None).await;
                    ended?;
                    continue;
                }
                Err(KeeperEnd::Stopped) => continue,
            };
            match ended {
                Ok(SessionEnd::LeaseLost) => {
                    guard.revoke();
                    self.stats.lease_released(true);
                    span.in_scope(|| warn!(fence_token = token, "the offset save was refused: another process holds the lease now; stopped consuming, dropping what was read; waiting as a standby"));
                }
                Ok(SessionEnd::Done(outcome, shutdown)) => {
                    // Within the stop's one deadline.
                    self.release(lease, label, token, &span, Some(shutdown))
                        .await;
                    return Ok(outcome);
                }
                Err(err) => {
                    self.release(lease, label, token, &span, None).await;
                    return Err(err);
                }
            }
        }
    }

    /// Releases the lease held with `token`, once, within
    /// [`RELEASE_TIMEOUT`] and by the stop's `deadline` if there is one: a
    /// failure (or no time left) leaves it to expire.
    async fn release(
        &self,
        lease: &dyn ConsumerLease,
        label: &str,
        token: FenceToken,
        span: &tracing::Span,
        deadline: Option<Deadline>,
    ) {
        self.stats.lease_released(false);
        let mut until = tokio::time::Instant::now() + RELEASE_TIMEOUT;
        if let Some(deadline) = deadline {
            until = until.min(deadline.0);
        }
        match tokio::time::timeout_at(until, lease.release(label, token)).await {
            Ok(Ok(())) => span.in_scope(|| info!(fence_token = token, "lease released")),
            Ok(Err(err)) => span.in_scope(|| warn!(fence_token = token, err = %err, "could not release the lease; a standby takes over when it expires")),
            Err(_) => span.in_scope(|| warn!(fence_token = token, "releasing the lease timed out; a standby takes over when it expires")),
        }
    }

    /// One session: consume from the stored offset until cancelled, drained,
    /// a permanent fault, or (under a lease) a fenced save or an expired
    /// lease, after which nothing is saved.
    async fn session<H>(
        &self,
        handler: &H,
        cancel: &CancellationToken,
        fence: Option<Fence>,
    ) -> Result<SessionEnd, ConsumerError>
    where
        H: EventHandler<D::Item> + ?Sized,
    {
        let commands = self
            .endpoint
            .connection(ConnectionTimeouts {
                connect: self.config.connect_timeout,
                response: Duration::from_secs(10),
                min_reconnect_delay: None,
            })
            .map_err(|source| ConsumerError::Redis {
                action: "set up a command connection",
                advice: advice(&source),
                source: Box::new(source),
            })?;
        let ctx = Ctx {
            consumer: self,
            handler,
            cancel,
            commands,
            suspect: tokio::sync::Notify::new(),
            jobs: std::sync::Mutex::new(cancel.child_token()),
            hold: tokio::sync::watch::Sender::new(false),
            dependency_down: std::sync::atomic::AtomicBool::new(false),
            fence,
        };
        let span = tracing::info_span!("consumer", stream = %self.config.stream, label = %self.config.label);
        async move {
            let mut driver = Driver::new(&ctx);
            let outcome = driver.consume().await;
            if let Some(machine) = driver.machine.as_ref() {
                self.learned_batch_size
                    .store(machine.batch_size(), Ordering::Relaxed);
            }
            if driver.lease_lost {
                // Nothing more is saved or started: the driver, its reader
                // and its jobs are dropped here.
                return Ok(SessionEnd::LeaseLost);
            }
            let shutdown = Deadline::after(self.config.shutdown_timeout);
            let unsaved = driver.shut_down(shutdown).await;
            let reason = outcome?;
            info!(
                offset = driver.stored().map(tracing::field::display),
                reason = reason.as_str(),
                "consumer stopped"
            );
            Ok(SessionEnd::Done(
                RunOutcome {
                    reason,
                    offset: driver.stored(),
                    offset_unsaved: unsaved,
                },
                shutdown,
            ))
        }
        .instrument(span)
        .await
    }
}

/// How a session ended.
enum SessionEnd {
    /// Cancelled or drained (saved what it could), and the deadline its stop
    /// had.
    Done(RunOutcome, Deadline),
    /// The lease ended under it (a save was refused, or it expired): nothing
    /// was saved at the end.
    LeaseLost,
}

/// The lease a session consumes under.
struct Fence {
    /// Its fencing token, sent with every offset save.
    token: FenceToken,
    /// Until when it lets this process consume.
    guard: Arc<LeaseGuard>,
}

/// Why the lease keeper returned.
#[derive(Debug)]
enum KeeperEnd {
    /// The lease is gone, or may be: the reason, for the log.
    Lost(&'static str),
    /// An operator asked for it.
    Handover,
    /// Its stop token fired.
    Stopped,
}

/// Renews the lease held with `token` per `clock`, extending `guard` with
/// each confirmed renewal, until it is lost, asked for, or `stop` fires.
/// Performs I/O only: the timing is `clock`'s.
async fn keep_lease(
    lease: &dyn ConsumerLease,
    label: &str,
    token: FenceToken,
    mut clock: LeaseClock,
    guard: &LeaseGuard,
    stop: &CancellationToken,
) -> KeeperEnd {
    let ttl = clock.ttl();
    loop {
        let answer_by = match clock.step(tokio::time::Instant::now()) {
            LeaseStep::Expired => {
                return KeeperEnd::Lost("not renewed before it could have expired")
            }
            LeaseStep::WaitUntil(at) => {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return KeeperEnd::Stopped,
                    () = tokio::time::sleep_until(at) => continue,
                }
            }
            LeaseStep::Renew { answer_by } => answer_by,
        };
        let sent_at = tokio::time::Instant::now();
        match tokio::time::timeout_at(answer_by, lease.renew(label, token, ttl)).await {
            Err(_) => {
                return KeeperEnd::Lost(
                    "the renewal was not confirmed before the lease could have expired",
                )
            }
            Ok(Ok(Renewal::Renewed)) => {
                clock.renewed(sent_at);
                guard.extend(clock.valid_until());
            }
            Ok(Ok(Renewal::HandoverRequested)) => {
                clock.renewed(sent_at);
                guard.extend(clock.valid_until());
                return KeeperEnd::Handover;
            }
            Ok(Ok(Renewal::Lost)) => return KeeperEnd::Lost("another process holds it now"),
            Ok(Err(err)) => {
                debug!(err = %err, "lease renewal failed; retrying while the lease lasts");
                clock.renewal_failed(tokio::time::Instant::now());
            }
        }
    }
}

/// The id of the stream's last entry, or an empty string: `XREVRANGE` on
/// the server, only the id sent back.
const LAST_ENTRY_ID_SCRIPT: &str = r"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then return last[1][1] end
return ''
";

/// How long reads may go without the deletion probe while entries trickle
/// in (in a backlog of full 1024-entry reads every read takes it along: see
/// `Driver::probe_due`).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Entries read without the deletion probe, at most, before the next read
/// takes it along; bounds what the trim judgement keeps of those reads.
const PROBE_EVERY_ENTRIES: usize = 1024;

/// How long releasing the lease may take outside a stop's deadline.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// A point in time after which the stop gives up.
#[derive(Clone, Copy, Debug)]
struct Deadline(tokio::time::Instant);

/// How long before the deadline the final save makes its last attempt: the
/// time one connect and one round trip may need.
const FINAL_SAVE_LAST_TRY: Duration = Duration::from_millis(200);

impl Deadline {
    fn after(timeout: Duration) -> Self {
        Self(tokio::time::Instant::now() + timeout)
    }

    /// When the final save, failed at `now`, tries again after its back-off
    /// `delay`: then, or at its last try ([`FINAL_SAVE_LAST_TRY`] before the
    /// deadline) when `delay` would overshoot that; `None` once the last try
    /// is due or past (it was just made, or there is no time for one).
    fn retry_at(self, now: tokio::time::Instant, delay: Duration) -> Option<tokio::time::Instant> {
        let last_try = self.0.checked_sub(FINAL_SAVE_LAST_TRY)?;
        (now < last_try).then(|| (now + delay).min(last_try))
    }

    /// The instant `reserve` before the deadline (at least now).
    fn less(self, reserve: Duration) -> tokio::time::Instant {
        self.0
            .checked_sub(reserve)
            .unwrap_or(self.0)
            .max(tokio::time::Instant::now())
    }
}

/// What the handling of one job came to.
struct Done {
    id: EntryId,
    key: KeyHash,
    completion: Completion,
    /// A permanent fault met while dead-lettering.
    fault: Option<ConsumerError>,
}

type JobFuture<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;
/// A save in flight: the offset, and what the store found.
type SaveFuture<'a> =
    Pin<Box<dyn Future<Output = (EntryId, Result<SaveOutcome, StoreError>)> + Send + 'a>>;

/// Starts saving `offset`, expecting the store to hold `expected`; fenced
/// by `fence` under a lease.
fn start_save<'a>(
    offsets: &'a Arc<dyn StreamOffsetStore>,
    label: &'a str,
    offset: EntryId,
    expected: Option<EntryId>,
    fence: Option<FenceToken>,
) -> SaveFuture<'a> {
    Box::pin(async move {
        let saved = match fence {
            Some(fence) => offsets.save_fenced(label, offset, expected, fence).await,
            None => offsets.save(label, offset, expected).await,
        };
        (offset, saved)
    })
}

/// What every job shares: read-only for the whole session.
struct Ctx<'a, D: EntryDecoder, H: ?Sized> {
    consumer: &'a StreamConsumer<D>,
    handler: &'a H,
    cancel: &'a CancellationToken,
    /// For the stream's last id and dead letters; reconnects by itself.
    commands: RedisConnection,
    /// Told when a handler call failed on its dependency: Redis may have
    /// restarted and lost writes, so the driver has the store checked
    /// before the call is retried.
    suspect: tokio::sync::Notify,
    /// The jobs' token: cancelled (and replaced) when the consumer rewinds,
    /// so that no job retries on a store that lost its earlier effects.
    jobs: std::sync::Mutex<CancellationToken>,
    /// Whether jobs must wait before retrying: the store is being checked
    /// (see `Machine::verify`).
    hold: tokio::sync::watch::Sender<bool>,
    /// A handler's dependency is failing (a transient error, not yet
    /// followed by a success): the jobs failing on it log the episode
    /// once, not once each.
    dependency_down: std::sync::atomic::AtomicBool,
    /// The lease this session consumes under, if any.
    fence: Option<Fence>,
}

/// What to do after a failed handler call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Call the handler again after this long.
    After(Duration),
    /// Copy the entry to the dead-letter stream after this many own failures.
    DeadLetter(u32),
}

/// The retry decisions of one job: a dependency outage (a transient error)
/// backs off like a Redis fault and never counts towards dead-lettering;
/// any other failure may be the entry's own fault, and counts.
#[derive(Debug)]
struct Attempts {
    dead_letter_after: Option<u32>,
    own_faults: u32,
    backoff: Backoff,
    outage: Backoff,
}

impl Attempts {
    fn new(handler: BackoffPolicy, redis: BackoffPolicy, dead_letter_after: Option<u32>) -> Self {
        Self {
            dead_letter_after,
            own_faults: 0,
            backoff: Backoff::new(handler),
            outage: Backoff::new(redis),
        }
    }

    fn failed(&mut self, transient: bool) -> Retry {
        if transient {
            self.backoff.reset();
            return Retry::After(self.outage.next_delay());
        }
        self.outage.reset();
        self.own_faults = self.own_faults.saturating_add(1);
        if self
            .dead_letter_after
            .is_some_and(|limit| self.own_faults >= limit)
        {
            return Retry::DeadLetter(self.own_faults);
        }
        Retry::After(self.backoff.next_delay())
    }

    /// Whether this is a repeat within one dependency outage (logged
    /// quietly: the outage's first failure was logged).
    fn outage_repeat(&self) -> bool {
        self.outage.attempts() > 1
    }
}

impl<D: EntryDecoder, H: EventHandler<D::Item> + ?Sized> Ctx<'_, D, H> {
    fn config(&self) -> &ConsumerConfig {
        &self.consumer.config
    }

    fn stats(&self) -> &ConsumerStats {
        &self.consumer.stats
    }

    /// Whether this session may still consume: always without a lease.
    fn lease_valid(&self) -> bool {
        self.fence.as_ref().is_none_or(|fence| fence.guard.valid())
    }

    /// The token to fence saves with, under a lease.
    fn fence_token(&self) -> Option<FenceToken> {
        self.fence.as_ref().map(|fence| fence.token)
    }

    /// Waits while the store is being checked after a dependency failure
    /// (Redis may have restarted and lost writes); `false` when `stop` came
    /// first (a rewind or shutdown).
    async fn held_while_checked(&self, stop: &CancellationToken) -> bool {
        let mut hold = self.hold.subscribe();
        tokio::select! {
            biased;
            () = stop.cancelled() => false,
            released = hold.wait_for(|held| !*held) => released.is_ok(),
        }
    }

    /// The token the jobs started now stop on.
    fn jobs_token(&self) -> CancellationToken {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops the jobs running (their retries end, their entries are
    /// handled again after a rewind) and gives later jobs a fresh token.
    fn stop_jobs(&self) {
        let mut jobs = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        jobs.cancel();
        *jobs = self.cancel.child_token();
    }

    /// Handles one job: retries a failing handler with back-off, dead-letters
    /// it after the configured attempts. The handler call itself is never
    /// interrupted; the driver bounds it by the shutdown deadline.
    async fn run_job(&self, job: Box<Job<D::Item>>) -> Done {
        let span = self.consumer.decoder.span(&job.item);
        self.run_job_in_span(job).instrument(span).await
    }

    async fn run_job_in_span(&self, job: Box<Job<D::Item>>) -> Done {
        let (id, key) = (job.id, job.key);
        let item = &job.item;
        let stop = self.jobs_token();
        let mut attempts = Attempts::new(
            self.config().handler_retry,
            self.config().redis_retry,
            self.config().dead_letter_after,
        );
        let mut calls: u32 = 0;
        let (completion, fault) = loop {
            if (stop.is_cancelled() && calls == 0) || !self.lease_valid() {
                break (Completion::Interrupted, None);
            }
            calls = calls.saturating_add(1);
            let err = match self.handler.handle(item).await {
                Ok(()) => {
                    self.stats().handled();
                    if self.dependency_down.load(Ordering::Relaxed) {
                        self.dependency_down.store(false, Ordering::Relaxed);
                    }
                    break (Completion::Finished, None);
                }
                Err(err) => err,
            };
            self.stats().handler_failure();
            // A dependency that lost its connection may be a Redis that
            // restarted and lost writes: have the store checked, and retry
            // only once it answered (or rewound).
            let restarted = err.is_transient() && crate::fault::connection_lost(&err);
            if restarted {
                self.suspect.notify_one();
            }
            let delay = match attempts.failed(err.is_transient()) {
                Retry::DeadLetter(own_faults) => {
                    // Boxed: kept out of every job's future, which is
                    // allocated per entry and rarely dead-letters.
                    break match Box::pin(self.dead_letter(id, &err, own_faults)).await {
                        Ok(completion) => (completion, None),
                        Err(fault) => (Completion::Interrupted, Some(fault)),
                    };
                }
                Retry::After(delay) => delay,
            };
            let retry_in_ms = millis(delay);
            let episode_logged =
                err.is_transient() && self.dependency_down.swap(true, Ordering::Relaxed);
            if err.is_transient() && (attempts.outage_repeat() || episode_logged) {
                debug!(stream_entry_id = %id, attempt = calls, retry_in_ms, err = %err, "handler still failing on an unavailable dependency");
            } else {
                warn!(
                    stream_entry_id = %id,
                    event_type = self.consumer.decoder.event_type(item),
                    attempt = calls,
                    transient = err.is_transient(),
                    retry_in_ms,
                    err = %err,
                    "handler failed; holding the offset and retrying"
                );
            }
            if !sleep_unless_cancelled(&stop, delay).await {
                break (Completion::Interrupted, None);
            }
            if restarted && !self.held_while_checked(&stop).await {
                break (Completion::Interrupted, None);
            }
        };
        Done {
            id,
            key,
            completion,
            fault,
        }
    }

    /// Copies the entry `id` to the dead-letter stream with the failure (once:
    /// a copy already there from a lost reply, a crash or another worker is
    /// not added again), then lets the offset move past it. The entry's
    /// fields are read again from the stream: no reply is kept alive for a
    /// dead letter that may never be needed.
    async fn dead_letter(
        &self,
        id: EntryId,
        err: &HandlerError,
        attempts: u32,
    ) -> Result<Completion, ConsumerError> {
        let config = self.config();
        let mut range = redis::cmd("XRANGE");
        let id_text = id.to_string();
        range.arg(&config.stream).arg(&id_text).arg(&id_text);
        let Some(reply) = self
            .command("read an entry to dead-letter", &config.stream, &range)
            .await?
        else {
            return Ok(Completion::Interrupted);
        };
        let owned = parse_range_reply(reply)?
            .into_iter()
            .next()
            .map(|entry| entry.fields)
            .unwrap_or_default();
        let fields: Vec<(&[u8], &[u8])> = owned
            .iter()
            .map(|(name, value)| (name.as_slice(), value.as_slice()))
            .collect();
        let error = err.to_string();
        let outcome = self
            .retrying(
                "add to the dead-letter stream",
                &config.dead_letter_stream,
                |mut conn| {
                    let (fields, error) = (&fields, &error);
                    async move {
                        dead_letter::append_once(
                            &mut conn,
                            &config.dead_letter_stream,
                            &config.stream,
                            id,
                            fields,
                            error,
                            attempts,
                        )
                        .await
                    }
                },
            )
            .await?;
        match outcome {
            None => return Ok(Completion::Interrupted),
            Some(DeadLetterOutcome::Appended(copy)) => error!(
                stream_entry_id = %id,
                dead_letter_stream = %config.dead_letter_stream,
                dead_letter_id = %copy,
                attempts,
                err = %err,
                "entry dead-lettered after repeated handler failures; moving past it"
            ),
            Some(DeadLetterOutcome::AlreadyThere(copy)) => warn!(
                stream_entry_id = %id,
                dead_letter_stream = %config.dead_letter_stream,
                dead_letter_id = %copy,
                attempts,
                err = %err,
                "entry already in the dead-letter stream (a retried write, a replay after a crash, or another worker); not copied again, moving past it"
            ),
        }
        self.stats().dead_lettered();
        Ok(Completion::Finished)
    }

    /// Runs `cmd` on the command connection through transient faults, backing
    /// off between attempts. `None` when cancelled first.
    async fn command(
        &self,
        action: &'static str,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<Option<Value>, ConsumerError> {
        self.retrying(action, key, |mut conn| async move {
            cmd.query_async::<Value>(&mut conn).await
        })
        .await
    }

    /// Runs `attempt` on the command connection through transient faults,
    /// backing off between attempts; only for idempotent work. `None` when
    /// cancelled first.
    async fn retrying<T, F, Fut>(
        &self,
        action: &'static str,
        key: &str,
        mut attempt: F,
    ) -> Result<Option<T>, ConsumerError>
    where
        F: FnMut(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut backoff = Backoff::new(self.config().redis_retry);
        loop {
            let result = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Ok(None),
                result = attempt(self.commands.clone()) => result,
            };
            let err = match result {
                Ok(value) => return Ok(Some(value)),
                Err(err) => err,
            };
            permanent_redis(action, key, &err)?;
            self.stats().redis_fault();
            let delay = backoff.next_delay();
            if backoff.attempts() == 1 {
                warn!(action, err = %err, advice = advice(&err), "Redis unavailable; retrying with back-off");
            }
            if !sleep_unless_cancelled(self.cancel, delay).await {
                return Ok(None);
            }
        }
    }
}

/// What the operator is told of a fault that is not Redis's own.
const RETRY_ADVICE: &str = "the worker retries with back-off and keeps its place";

/// What the operator is told when the reader task is gone: never expected.
const READER_STOPPED_ADVICE: &str =
    "a fault of the worker itself: report it with the log; restarting the worker resumes from its offset";

/// The error to end the session with, when `err` is permanent.
fn permanent_redis(action: &'static str, key: &str, err: &RedisError) -> Result<(), ConsumerError> {
    match classify(err) {
        FaultClass::Transient => Ok(()),
        FaultClass::WrongType => Err(ConsumerError::WrongType {
            key: key.to_owned(),
        }),
        FaultClass::Auth => Err(ConsumerError::Auth {
            action,
            source: Box::new(err.clone()),
        }),
        FaultClass::Tls => Err(ConsumerError::Tls {
            action,
            source: Box::new(err.clone()),
        }),
        FaultClass::Permanent => Err(ConsumerError::Redis {
            action,
            source: Box::new(err.clone()),
            advice: advice(err),
        }),
    }
}

/// Sleeps unless cancelled first; `false` when cancelled.
async fn sleep_unless_cancelled(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        biased;
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A run of faults, logged once when it starts and once when it ends
/// rather than once per retry.
#[derive(Debug, Default)]
struct OutageLog {
    started: std::sync::Mutex<Option<(Instant, u32)>>,
}

impl OutageLog {
    fn started(&self) -> std::sync::MutexGuard<'_, Option<(Instant, u32)>> {
        // The state is a plain value: a panic elsewhere leaves it usable.
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, stats: &ConsumerStats, cause: &(dyn std::error::Error + 'static)) {
        stats.redis_fault();
        let mut started = self.started();
        match &mut *started {
            Some((_, retries)) => {
                *retries = retries.saturating_add(1);
                debug!(err = %cause, retries = *retries, "Redis still unavailable");
            }
            None => {
                let advice = advice_in(cause).unwrap_or(RETRY_ADVICE);
                warn!(err = %cause, advice, "Redis unavailable; retrying with back-off, keeping our place");
                *started = Some((Instant::now(), 1));
            }
        }
    }

    fn recovered(&self) {
        let ended = self.started().take();
        if let Some((started, retries)) = ended {
            info!(
                outage_ms = millis(started.elapsed()),
                retries, "Redis reachable again; carrying on"
            );
        }
    }
}

/// The mutable state of one `run`.
struct Driver<'a, D: EntryDecoder, H: ?Sized> {
    ctx: &'a Ctx<'a, D, H>,
    machine: Option<Machine<D::Item>>,
    reader: Reader,
    /// The read in flight: how many entries the machine asked for, and
    /// whether one more was asked for as a look-ahead.
    read_in_flight: Option<(usize, bool)>,
    /// What one entry of the last reply cost once parsed (the whole limit
    /// after a reply outgrew it).
    entry_bytes: usize,
    running: FuturesUnordered<JobFuture<'a>>,
    save: Option<SaveFuture<'a>>,
    /// After a read fault: when to read again.
    read_retry_at: Option<tokio::time::Instant>,
    /// After a failed save: when to try again.
    save_retry_at: Option<tokio::time::Instant>,
    /// While caught up: when the save the machine wants goes out.
    deferred_save_at: Option<tokio::time::Instant>,
    save_backoff: Backoff,
    trim: TrimWatch,
    /// The offset known to be stored before the machine existed.
    stored_at_start: Option<EntryId>,
    /// A permanent fault met by a job or a save, ending the session.
    fault: Option<ConsumerError>,
    /// How ordering keys are hashed in this session.
    keys: std::hash::RandomState,
    /// When the last deletion probe was answered.
    probed_at: Option<tokio::time::Instant>,
    /// The lease ended under this session (a save was refused, or it may
    /// have expired): stop at once, saving nothing.
    lease_lost: bool,
}

impl<'a, D: EntryDecoder, H: EventHandler<D::Item> + ?Sized> Driver<'a, D, H> {
    fn new(ctx: &'a Ctx<'a, D, H>) -> Self {
        let config = ctx.config();
        let settings = ReaderSettings {
            endpoint: ctx.consumer.endpoint.clone(),
            tls: ctx.consumer.tls.clone(),
            stream: config.stream.clone(),
            block: (!config.drain).then_some(config.block_timeout),
            connect_timeout: config.connect_timeout,
            response_timeout: config.read_response_timeout(),
        };
        Self {
            ctx,
            machine: None,
            reader: Reader::spawn(settings, ctx.cancel.child_token()),
            read_in_flight: None,
            entry_bytes: 0,
            running: FuturesUnordered::new(),
            save: None,
            read_retry_at: None,
            save_retry_at: None,
            deferred_save_at: None,
            save_backoff: Backoff::new(config.redis_retry),
            trim: TrimWatch::new(),
            stored_at_start: None,
            fault: None,
            keys: std::hash::RandomState::new(),
            probed_at: None,
            lease_lost: false,
        }
    }

    fn config(&self) -> &'a ConsumerConfig {
        &self.ctx.consumer.config
    }

    fn stats(&self) -> &'a ConsumerStats {
        &self.ctx.consumer.stats
    }

    /// The offset known to be stored.
    fn stored(&self) -> Option<EntryId> {
        self.machine
            .as_ref()
            .map_or(self.stored_at_start, Machine::saved_offset)
    }

    /// The loop. Returns when cancelled, drained, or on a permanent fault.
    async fn consume(&mut self) -> Result<StopReason, ConsumerError> {
        let Some((start, saved, persist)) = self.start_position().await? else {
            return Ok(StopReason::Cancelled);
        };
        self.stored_at_start = saved;
        let drain_target = if self.config().drain {
            match self.last_entry_id().await? {
                None => return Ok(StopReason::Cancelled),
                Some(target) => Some(target.unwrap_or(start)),
            }
        } else {
            None
        };
        let config = self.config();
        let settings = Settings {
            batch_size: config.batch_size,
            concurrency: config.concurrency,
            max_held_bytes: config.max_held_bytes,
            max_reply_bytes: config.max_reply_bytes,
            checkpoint: config.checkpoint,
            redis_retry: config.redis_retry,
            defer_saves_when_caught_up: !config.checkpoint_delay.is_zero(),
        };
        let mut machine = Machine::new(settings, start, saved, persist, drain_target);
        let learned = self.ctx.consumer.learned_batch_size.load(Ordering::Relaxed);
        if learned > 0 {
            machine.start_with_batch_size(learned);
        }
        self.machine = Some(machine);
        info!(
            start_after = %start,
            block_timeout_ms = millis(config.block_timeout),
            batch_size = config.batch_size,
            concurrency = config.concurrency,
            max_held_bytes = config.max_held_bytes,
            drain_until = drain_target.map(tracing::field::display),
            "consumer started"
        );
        let cancel = self.ctx.cancel;
        loop {
            let read_requested = self.perform()?;
            if self.lease_lost {
                return Ok(StopReason::Cancelled);
            }
            if let Some(fault) = self.fault.take() {
                return Err(fault);
            }
            let Some(machine) = self.machine.as_mut() else {
                return Ok(StopReason::Cancelled);
            };
            if machine.drained() {
                return Ok(StopReason::Drained);
            }
            if machine.save_wanted() {
                self.deferred_save_at.get_or_insert_with(|| {
                    tokio::time::Instant::now() + self.ctx.consumer.config.checkpoint_delay
                });
            }
            if read_requested {
                // The reader task shares this thread: let it send the read
                // before the jobs decided with it run, so that Redis
                // prepares the next batch meanwhile.
                tokio::task::yield_now().await;
                continue;
            }
            let read_retry = machine
                .waiting_to_retry()
                .then_some(self.read_retry_at)
                .flatten();
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(StopReason::Cancelled),
                Some(done) = self.running.next(), if !self.running.is_empty() => self.on_done(done),
                (offset, result) = poll_save(&mut self.save) => {
                    self.save = None;
                    self.on_saved(offset, result);
                }
                event = self.reader.next() => match event {
                    Some(ReaderEvent::Batch { received, reconnected }) => {
                        if reconnected {
                            self.stats().reconnect();
                            // Redis may have restarted and lost writes: the
                            // next save compares what it holds.
                            if let Some(machine) = self.machine.as_mut() {
                                machine.verify();
                            }
                        }
                        self.on_batch(received);
                    }
                    Some(ReaderEvent::Fault(err)) => self.on_read_fault(err)?,
                    None => return Err(ConsumerError::Redis {
                        action: "read the stream",
                        source: "the stream reader stopped unexpectedly".into(),
                        advice: READER_STOPPED_ADVICE,
                    }),
                },
                () = sleep_until(read_retry) => {
                    self.read_retry_at = None;
                    if let Some(machine) = self.machine.as_mut() {
                        machine.retry_read();
                    }
                }
                () = self.ctx.suspect.notified() => {
                    if let Some(machine) = self.machine.as_mut() {
                        machine.verify();
                    }
                }
                () = sleep_until(self.save_retry_at) => {
                    self.save_retry_at = None;
                    if let Some(machine) = self.machine.as_mut() {
                        machine.checkpoint_now();
                    }
                }
                () = sleep_until(self.deferred_save_at) => {
                    self.deferred_save_at = None;
                    if let Some(machine) = self.machine.as_mut() {
                        machine.checkpoint_now();
                    }
                }
            }
        }
    }

    /// Performs the actions the machine has decided on, up to a read:
    /// `true` when it stopped after requesting one (the rest wait for the
    /// next call).
    fn perform(&mut self) -> Result<bool, ConsumerError> {
        let ctx = self.ctx;
        let mut read_requested = false;
        while !read_requested {
            // Checked before anything goes out: a process resumed after a
            // pause past its lease starts, reads and saves nothing.
            if !ctx.lease_valid() {
                self.lease_lost = true;
                break;
            }
            let Some(action) = self.machine.as_mut().and_then(Machine::poll_action) else {
                break;
            };
            match action {
                Action::Read {
                    after,
                    count,
                    max_bytes,
                    read_ahead,
                } => {
                    // One entry more than dispatched, as a look-ahead for
                    // trim detection (see `trim`); not in the reference's
                    // one-entry reads, nor when two entries may not fit in
                    // one reply.
                    let look_ahead = self.config().batch_size > 1
                        && (count > 1 || self.entry_bytes.saturating_mul(4) <= max_bytes);
                    let asked = if look_ahead { count + 1 } else { count };
                    let request = ReadRequest {
                        after,
                        count: asked,
                        max_bytes,
                        dispatch: count,
                        read_ahead,
                        probe: self.probe_due(),
                    };
                    if !self.reader.request(request) {
                        return Err(ConsumerError::Redis {
                            action: "read the stream",
                            source: "the stream reader stopped unexpectedly".into(),
                            advice: READER_STOPPED_ADVICE,
                        });
                    }
                    self.stats().read();
                    self.read_in_flight = Some((count, look_ahead));
                    read_requested = true;
                }
                Action::Start(job) => {
                    // A handler that finishes without waiting (an absorbed
                    // event, a cache hit) is done here, without a trip
                    // through the set of running jobs. A job that must wait
                    // joins the set, which polls it again with its own waker.
                    let mut job: JobFuture<'a> = Box::pin(ctx.run_job(job));
                    match job.as_mut().now_or_never() {
                        Some(done) => self.on_done(done),
                        None => self.running.push(job),
                    }
                }
                Action::Save(offset) => {
                    // This save covers what a deferred one was waiting for.
                    self.deferred_save_at = None;
                    let expected = self.machine.as_ref().and_then(Machine::saved_offset);
                    self.save = Some(start_save(
                        &ctx.consumer.offsets,
                        &ctx.config().label,
                        offset,
                        expected,
                        ctx.fence_token(),
                    ));
                }
            }
        }
        if let Some(machine) = &self.machine {
            ctx.stats()
                .held(machine.held_bytes(), machine.held_entries());
            let verifying = machine.verifying();
            ctx.hold.send_if_modified(|held| {
                let changed = *held != verifying;
                *held = verifying;
                changed
            });
        }
        Ok(read_requested)
    }

    fn on_done(&mut self, done: Done) {
        if let Some(fault) = done.fault {
            self.fault = Some(fault);
        }
        if let Some(machine) = self.machine.as_mut() {
            machine.completed(done.id, done.key, done.completion);
        }
    }

    fn on_saved(&mut self, offset: EntryId, result: Result<SaveOutcome, StoreError>) {
        let Some(machine) = self.machine.as_mut() else {
            return;
        };
        match result {
            Ok(SaveOutcome::Saved | SaveOutcome::Kept(_)) => {
                machine.saved(offset);
                self.save_backoff.reset();
                self.ctx.stats().offset_saved();
                self.ctx.consumer.outage.recovered();
            }
            Ok(SaveOutcome::Behind(stored)) => {
                // Nothing stored: as at a start without an offset, except
                // that "the end" is where this worker is.
                let to = stored
                    .or_else(|| self.ctx.config().start_from.read_after())
                    .unwrap_or_else(|| machine.finished());
                error!(
                    offset = %offset,
                    expected = machine.saved_offset().map(tracing::field::display),
                    stored = stored.map(tracing::field::display),
                    replay_after = %to,
                    "the stored offset is behind what this worker saved: Redis lost acknowledged writes (a restart without appendfsync always, a failover) or an operator rewound it; handling again every entry after it"
                );
                self.ctx.stats().rewound();
                machine.rewind(to, stored);
                self.ctx.stop_jobs();
                self.trim.forget();
            }
            Ok(SaveOutcome::Fenced) => {
                // Another process holds the lease: stop at once.
                machine.save_failed();
                self.lease_lost = true;
            }
            Err(err) if err.permanent => {
                machine.save_failed();
                self.fault = Some(ConsumerError::Store(err));
            }
            Err(err) => {
                machine.save_failed();
                self.ctx.consumer.outage.note(self.ctx.stats(), &err);
                self.save_retry_at =
                    Some(tokio::time::Instant::now() + self.save_backoff.next_delay());
            }
        }
    }

    /// Whether the next read takes the deletion probe along: after a batch
    /// (at least [`PROBE_EVERY_ENTRIES`]) of entries read without one, or
    /// [`PROBE_INTERVAL`] after the last (a trim is then noticed within
    /// about that long).
    fn probe_due(&self) -> bool {
        self.trim.unprobed() >= self.config().batch_size.max(PROBE_EVERY_ENTRIES)
            || self
                .probed_at
                .is_none_or(|at| at.elapsed() >= PROBE_INTERVAL)
    }

    /// A batch arrived: decode what the machine asked for, judge deletions,
    /// hand the entries over. The reply is dropped here: jobs own their
    /// decoded items, never the reply.
    fn on_batch(&mut self, received: Received) {
        let Received { batch, probe } = received;
        self.stats().read_completed();
        if probe.is_some() {
            self.probed_at = Some(tokio::time::Instant::now());
        }
        let (requested, look_ahead) = self.read_in_flight.take().unwrap_or((batch.len(), false));
        let Some(machine) = self.machine.as_mut() else {
            return;
        };
        // Redis may serve reads while it refuses writes (OOM, MISCONF): with
        // an offset left unsaved, only a save ends the outage.
        if !machine.dirty() {
            self.ctx.consumer.outage.recovered();
        }
        let read_from = machine.read_after();
        let dispatch = if look_ahead && batch.len() > requested {
            requested
        } else {
            batch.len()
        };
        let decoder = &self.ctx.consumer.decoder;
        let stats = self.ctx.stats();
        let mut fields = Vec::new();
        let mut ids = Vec::with_capacity(dispatch);
        let mut arrivals = Vec::with_capacity(dispatch);
        for view in batch.iter().take(dispatch) {
            let id = view.id();
            view.fields_into(&mut fields);
            let job = match decoder.decode(id, &fields) {
                Decoded::Handle(item) => {
                    let key = KeyHash::of(&self.keys, decoder.ordering_key(&item));
                    Some(Box::new(Job { id, item, key }))
                }
                Decoded::Malformed(reason) => {
                    warn!(stream_entry_id = %id, err = %reason, "malformed entry absorbed");
                    stats.malformed();
                    None
                }
                Decoded::UnknownType(event_type) => {
                    info!(stream_entry_id = %id, event_type = ?lifecycle_domain::for_log(&event_type), "entry of unknown type absorbed");
                    stats.unknown_type();
                    None
                }
            };
            ids.push(id);
            arrivals.push(Arrival {
                id,
                job,
                cost: entry_cost(view.size(), view.field_count()),
            });
        }
        let extra = batch.entry(dispatch).map(|view| view.id());
        if !machine.rewinding() {
            let finding = self.trim.observe(ReadSeen {
                read_from,
                ids: &ids,
                look_ahead: extra,
                probe,
            });
            if let Some(finding) = finding {
                report_finding(stats, finding);
            }
        }
        let parsed = batch.parsed_bytes();
        if !batch.is_empty() {
            self.entry_bytes = parsed / batch.len();
        }
        drop(batch);
        machine.batch_received(arrivals, ids.last().copied(), parsed);
    }

    /// Handles a failure of the reader: permanent ones end the session;
    /// transient ones schedule a retry.
    fn on_read_fault(&mut self, err: ReadError) -> Result<(), ConsumerError> {
        self.read_in_flight = None;
        let Some(machine) = self.machine.as_mut() else {
            return Ok(());
        };
        if let ReadError::ReplyTooLarge {
            entries,
            partial_entry_id,
            limit,
        } = err
        {
            self.entry_bytes = limit;
            // Not an outage: read again at once, fewer at a time.
            if !machine.reply_too_large(entries) {
                warn!(
                    limit,
                    "an XREAD reply outgrew the limit; reading fewer entries at a time"
                );
                return Ok(());
            }
            // One entry alone is larger than the limit: it is absorbed
            // unread, as an entry too large to decode would be.
            let Some(id) = partial_entry_id else {
                return Err(ConsumerError::Redis {
                    action: "read the stream",
                    source: format!(
                        "a reply larger than {limit} bytes arrived before its first entry's id"
                    )
                    .into(),
                    advice: "raise `max_reply_bytes`",
                });
            };
            warn!(
                stream_entry_id = %id,
                err = %format!("entry too large: over the {limit} byte reply limit"),
                "malformed entry absorbed"
            );
            self.ctx.stats().malformed();
            machine.absorb_oversized(id);
            self.trim.forget();
            return Ok(());
        }
        let action = "read the stream";
        match classify_read(&err) {
            FaultClass::Transient => {}
            FaultClass::WrongType => {
                return Err(ConsumerError::WrongType {
                    key: self.ctx.config().stream.clone(),
                })
            }
            FaultClass::Auth => {
                return Err(ConsumerError::Auth {
                    action,
                    source: Box::new(err),
                })
            }
            FaultClass::Tls => {
                return Err(ConsumerError::Tls {
                    action,
                    source: Box::new(err),
                })
            }
            FaultClass::Permanent => {
                return Err(ConsumerError::Redis {
                    action,
                    advice: advice_read(&err),
                    source: Box::new(err),
                })
            }
        }
        self.ctx.consumer.outage.note(self.ctx.stats(), &err);
        let delay = machine.read_failed();
        debug!(retry_in_ms = millis(delay), "retrying after a Redis fault");
        self.read_retry_at = Some(tokio::time::Instant::now() + delay);
        Ok(())
    }

    /// The id after which reading starts (the stored offset, else per the
    /// start option), what is stored, and whether the start must be stored
    /// first. `None` when cancelled first.
    async fn start_position(
        &mut self,
    ) -> Result<Option<(EntryId, Option<EntryId>, bool)>, ConsumerError> {
        let mut backoff = Backoff::new(self.config().redis_retry);
        let stored = loop {
            let label = self.config().label.as_str();
            let load = self.ctx.consumer.offsets.load(label);
            let result = tokio::select! {
                biased;
                () = self.ctx.cancel.cancelled() => return Ok(None),
                result = load => result,
            };
            match result {
                Ok(stored) => break stored,
                Err(err) if err.permanent => return Err(ConsumerError::Store(err)),
                Err(err) => {
                    self.ctx.consumer.outage.note(self.ctx.stats(), &err);
                    if !sleep_unless_cancelled(self.ctx.cancel, backoff.next_delay()).await {
                        return Ok(None);
                    }
                }
            }
        };
        self.ctx.consumer.outage.recovered();
        if let Some(offset) = stored {
            return Ok(Some((offset, Some(offset), false)));
        }
        let start_from = self.config().start_from;
        if start_from == StartFrom::Beginning {
            return Ok(Some((EntryId::ZERO, None, false)));
        }
        let start = match start_from.read_after() {
            Some(after) => after,
            None => match self.last_entry_id().await? {
                None => return Ok(None),
                Some(last) => last.unwrap_or(EntryId::ZERO),
            },
        };
        Ok(Some((start, None, true)))
    }

    /// The id of the stream's last entry (`Some(None)`: the stream is empty
    /// or absent), or `None` when cancelled first.
    ///
    /// Only the id crosses the network: a last entry of a million fields
    /// would otherwise become a million values in this process.
    async fn last_entry_id(&mut self) -> Result<Option<Option<EntryId>>, ConsumerError> {
        let stream = &self.config().stream;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LAST_ENTRY_ID_SCRIPT).arg(1).arg(stream);
        let reply = self
            .ctx
            .command("find the stream's last entry", stream, &cmd)
            .await?;
        match reply {
            None => Ok(None),
            Some(Value::BulkString(raw)) if !raw.is_empty() => EntryId::from_bytes(&raw)
                .map(|id| Some(Some(id)))
                .map_err(|err| ReplyError(format!("the stream's last id: {err}")).into()),
            Some(Value::BulkString(_) | Value::Nil) => Ok(Some(None)),
            Some(other) => Err(ReplyError(format!(
                "the stream's last id: expected a string, got {other:?}"
            ))
            .into()),
        }
    }

    /// The stop, within `deadline`: nothing new is read or started; handler
    /// calls in flight may finish until shortly before it, leaving time for
    /// the final save. Returns whether an unsaved offset was left behind.
    async fn shut_down(&mut self, deadline: Deadline) -> bool {
        self.reader.stop();
        let Some(machine) = self.machine.as_mut() else {
            return false;
        };
        machine.stop();
        let timeout = self.ctx.config().shutdown_timeout;
        let handlers_until = deadline.less((timeout / 4).min(Duration::from_secs(2)));
        while !self.running.is_empty() {
            match tokio::time::timeout_at(handlers_until, self.running.next()).await {
                Ok(Some(done)) => {
                    if let Some(fault) = &done.fault {
                        error!(err = %fault, "an entry failed while shutting down");
                    }
                    machine.completed(done.id, done.key, done.completion);
                }
                Ok(None) => break,
                Err(_) => {
                    warn!(
                        running = self.running.len(),
                        shutdown_timeout_ms = millis(timeout),
                        "handler calls did not finish before the shutdown deadline; their entries will be handled again"
                    );
                    break;
                }
            }
        }
        self.running.clear();
        let mut backoff = Backoff::new(self.ctx.config().redis_retry);
        loop {
            if self.save.is_none() {
                if let Some(Action::Save(offset)) = machine.poll_action() {
                    self.save = Some(start_save(
                        &self.ctx.consumer.offsets,
                        &self.ctx.config().label,
                        offset,
                        machine.saved_offset(),
                        self.ctx.fence_token(),
                    ));
                }
            }
            let Some(save) = self.save.as_mut() else {
                break;
            };
            let outcome = tokio::time::timeout_at(deadline.0, save).await;
            self.save = None;
            match outcome {
                Ok((offset, Ok(SaveOutcome::Saved | SaveOutcome::Kept(_)))) => {
                    machine.saved(offset);
                    self.ctx.stats().offset_saved();
                }
                Ok((offset, Ok(SaveOutcome::Behind(stored)))) => {
                    machine.save_failed();
                    error!(
                        offset = %offset,
                        stored = stored.map(tracing::field::display),
                        "the stored offset is behind what this worker saved (Redis lost writes, or an operator rewound it); left as it is: the next start handles every entry after it again"
                    );
                    return false;
                }
                Ok((offset, Ok(SaveOutcome::Fenced))) => {
                    machine.save_failed();
                    warn!(
                        offset = %offset,
                        "the final offset save was refused: another process holds the lease now; it resumes from what is stored"
                    );
                    return false;
                }
                Ok((_, Err(err))) => {
                    machine.save_failed();
                    if err.permanent {
                        error!(err = %err, "final offset save failed");
                        break;
                    }
                    // Back off, but never past the last try: Redis back
                    // shortly before the deadline still gets the save.
                    let now = tokio::time::Instant::now();
                    let Some(retry_at) = deadline.retry_at(now, backoff.next_delay()) else {
                        break;
                    };
                    tokio::time::sleep_until(retry_at).await;
                    machine.checkpoint_now();
                }
                Err(_) => {
                    machine.save_failed();
                    break;
                }
            }
        }
        let unsaved = machine.dirty();
        if unsaved {
            warn!(
                offset = %machine.finished(),
                stored = machine.saved_offset().map(tracing::field::display),
                "could not save the offset before the shutdown deadline; entries after the stored offset will be handled again"
            );
        }
        unsaved
    }
}

/// Logs and counts what the trim judgement found.
fn report_finding(stats: &ConsumerStats, finding: Finding) {
    match finding {
        Finding::Lost {
            read_from,
            evidence,
            count,
        } => {
            stats.trimmed();
            error!(
                read_from = %read_from,
                removed_entry_id = %evidence,
                removed_entries = count,
                "entries after our position were trimmed or deleted before they were handled; they are lost to this worker"
            );
        }
        Finding::PossiblyTrimmed { read_from, first } => {
            stats.trim_suspected();
            warn!(
                read_from = %read_from,
                stream_first_entry_id = %first,
                "the stream now begins after our position; entries in between, if there were any, were trimmed before they were handled"
            );
        }
        Finding::BehindPosition {
            read_from,
            last_generated,
        } => {
            stats.trimmed();
            error!(
                read_from = %read_from,
                stream_last_generated_id = %last_generated,
                "the stream's last id is below our position (deleted and re-created, or the offset set past its end): new entries are not read until they pass it; set the offset with `offsets set` if this is not intended"
            );
        }
    }
}

/// Awaits the save in flight, if any; pending otherwise. The save itself
/// lives in `save`, so dropping this future loses nothing.
async fn poll_save<'a>(
    save: &mut Option<SaveFuture<'a>>,
) -> (EntryId, Result<SaveOutcome, StoreError>) {
    match save {
        Some(save) => save.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use lifecycle_domain::BoxFuture;

    /// Items are user names; the ordering key is the name.
    struct Names;

    impl EntryDecoder for Names {
        type Item = String;

        fn decode(&self, _id: EntryId, _fields: &[(&[u8], &[u8])]) -> Decoded<String> {
            Decoded::Malformed("not used".into())
        }

        fn event_type<'a>(&self, _item: &'a String) -> &'a str {
            "test"
        }

        fn ordering_key<'a>(&self, item: &'a String) -> &'a str {
            item
        }
    }

    /// Fails the first `failures` calls, recording when each call started.
    struct Flaky {
        failures: u32,
        calls: Mutex<Vec<tokio::time::Instant>>,
        /// Fail as a dependency whose connection was lost (`None`: as the
        /// entry's own fault).
        lost_connection: Option<bool>,
    }

    impl Flaky {
        fn new(failures: u32) -> Self {
            Self {
                failures,
                calls: Mutex::new(Vec::new()),
                lost_connection: None,
            }
        }
    }

    impl EventHandler<String> for Flaky {
        fn handle<'a>(&'a self, _item: &'a String) -> BoxFuture<'a, Result<(), HandlerError>> {
            let mut calls = self.calls.lock().unwrap();
            calls.push(tokio::time::Instant::now());
            let fail = calls.len() <= self.failures as usize;
            let lost_connection = self.lost_connection;
            Box::pin(async move {
                match (fail, lost_connection) {
                    (false, _) => Ok(()),
                    (true, None) => Err(HandlerError::msg("not yet")),
                    (true, Some(true)) => Err(HandlerError::with_source(
                        "apply the cascade",
                        RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                    )
                    .transient()),
                    (true, Some(false)) => Err(HandlerError::with_source(
                        "apply the cascade",
                        redis::make_extension_error("OOM".to_owned(), None),
                    )
                    .transient()),
                }
            })
        }
    }

    /// An offset store nothing is saved to here.
    struct NoOffsets;

    impl StreamOffsetStore for NoOffsets {
        fn load<'a>(
            &'a self,
            _label: &'a str,
        ) -> BoxFuture<'a, Result<Option<EntryId>, StoreError>> {
            Box::pin(async { Ok(None) })
        }

        fn save<'a>(
            &'a self,
            _label: &'a str,
            _id: EntryId,
            _expected: Option<EntryId>,
        ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
            Box::pin(async { Ok(SaveOutcome::Saved) })
        }
    }

    /// Runs one job through `run_job` (no Redis is reached: the command
    /// connection is lazy and only dead letters would use it).
    async fn run_one(handler: &Flaky, cancel: &CancellationToken) -> Done {
        run_one_held(handler, cancel, None).await
    }

    /// [`run_one`] with the store being checked (jobs held) until
    /// `released_after`, when given.
    async fn run_one_held(
        handler: &Flaky,
        cancel: &CancellationToken,
        released_after: Option<Duration>,
    ) -> Done {
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let mut config = ConsumerConfig::new("s", "l");
        config.handler_retry = policy(100);
        let consumer =
            StreamConsumer::new(client.clone(), Names, Arc::new(NoOffsets), config).unwrap();
        let commands = RedisEndpoint::from(client)
            .connection(ConnectionTimeouts {
                connect: Duration::from_secs(1),
                response: Duration::from_secs(1),
                min_reconnect_delay: None,
            })
            .unwrap();
        let ctx = Ctx {
            consumer: &consumer,
            handler,
            cancel,
            commands,
            suspect: tokio::sync::Notify::new(),
            jobs: std::sync::Mutex::new(cancel.child_token()),
            hold: tokio::sync::watch::Sender::new(released_after.is_some()),
            dependency_down: std::sync::atomic::AtomicBool::new(false),
            fence: None,
        };
        let job = ctx.run_job(Box::new(Job {
            id: EntryId::new(1, 0),
            item: "u".to_owned(),
            key: KeyHash::from_raw(1),
        }));
        let release = async {
            if let Some(after) = released_after {
                tokio::time::sleep(after).await;
                ctx.hold.send_replace(false);
            }
        };
        let (done, ()) = tokio::join!(job, release);
        done
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_a_lost_connection_waits_for_the_store_check_and_a_refusal_does_not() {
        let check = Duration::from_secs(5);
        let mut lost = Flaky::new(1);
        lost.lost_connection = Some(true);
        let done = run_one_held(&lost, &CancellationToken::new(), Some(check)).await;
        assert_eq!(done.completion, Completion::Finished);
        let calls = lost.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2);
        assert!(
            calls[1] - calls[0] >= check,
            "retried before the check answered"
        );
        let mut refused = Flaky::new(1);
        refused.lost_connection = Some(false);
        run_one_held(&refused, &CancellationToken::new(), Some(check)).await;
        let calls = refused.calls.lock().unwrap().clone();
        assert!(calls[1] - calls[0] < check, "a refusal waited for a check");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_handler_is_retried_after_growing_delays_in_virtual_time() {
        let handler = Flaky::new(5);
        let done = run_one(&handler, &CancellationToken::new()).await;
        assert_eq!(done.completion, Completion::Finished);
        let calls = handler.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 6);
        let gaps: Vec<Duration> = calls.windows(2).map(|pair| pair[1] - pair[0]).collect();
        // Equal jitter: the n-th delay lies in [c/2, c] with the ceiling c
        // doubling from 100 ms up to 800 ms, so each delay is at least the
        // one before.
        let ceilings = [100u64, 200, 400, 800, 800];
        for (gap, ceiling) in gaps.iter().zip(ceilings) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(*gap >= ceiling / 2 && *gap <= ceiling, "{gaps:?}");
        }
        for pair in gaps.windows(2).take(3) {
            assert!(pair[1] >= pair[0], "delays shrank: {gaps:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_a_back_off_at_once_and_interrupts_the_job() {
        let handler = Flaky::new(u32::MAX);
        let cancel = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let stopper = cancel.clone();
        let (done, ()) = tokio::join!(run_one(&handler, &cancel), async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            stopper.cancel();
        });
        assert_eq!(done.completion, Completion::Interrupted);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    fn policy(ms: u64) -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(ms),
            max: Duration::from_millis(ms * 8),
        }
    }

    #[test]
    fn the_final_save_backs_off_but_always_tries_once_more_before_the_deadline() {
        let now = tokio::time::Instant::now();
        let deadline = Deadline(now + Duration::from_secs(3));
        let last_try = deadline.0 - FINAL_SAVE_LAST_TRY;
        // A delay that fits: taken as it is.
        assert_eq!(
            deadline.retry_at(now, Duration::from_millis(400)),
            Some(now + Duration::from_millis(400))
        );
        // A delay that would overshoot the deadline: shortened to the last
        // try, rather than giving up with time left.
        let late = now + Duration::from_millis(1500);
        assert_eq!(
            deadline.retry_at(late, Duration::from_millis(1600)),
            Some(last_try)
        );
        // The last try made (or no time left for one): no more.
        assert_eq!(
            deadline.retry_at(last_try, Duration::from_millis(100)),
            None
        );
        assert_eq!(
            deadline.retry_at(last_try + Duration::from_millis(1), Duration::ZERO),
            None
        );
        let short = Deadline(now + Duration::from_millis(150));
        assert_eq!(short.retry_at(now, Duration::from_millis(50)), None);
    }

    #[test]
    fn own_failures_count_towards_dead_lettering_and_outages_do_not() {
        let mut attempts = Attempts::new(policy(100), policy(10), Some(2));
        assert!(matches!(attempts.failed(false), Retry::After(_)));
        for _ in 0..10 {
            match attempts.failed(true) {
                Retry::After(delay) => assert!(delay <= Duration::from_millis(80)),
                Retry::DeadLetter(_) => panic!("an outage dead-lettered the entry"),
            }
        }
        assert_eq!(attempts.failed(false), Retry::DeadLetter(2));
    }

    #[test]
    fn without_a_limit_nothing_is_dead_lettered() {
        let mut attempts = Attempts::new(policy(100), policy(10), None);
        for _ in 0..50 {
            assert!(matches!(attempts.failed(false), Retry::After(_)));
        }
    }

    #[test]
    fn an_outage_resets_the_handler_back_off_and_repeats_are_quiet() {
        let mut attempts = Attempts::new(policy(100), policy(10), None);
        for _ in 0..4 {
            attempts.failed(false);
        }
        assert!(!attempts.outage_repeat());
        attempts.failed(true);
        assert!(
            !attempts.outage_repeat(),
            "an outage's first failure is logged"
        );
        attempts.failed(true);
        assert!(attempts.outage_repeat());
        match attempts.failed(false) {
            Retry::After(delay) => assert!(delay <= Duration::from_millis(100), "{delay:?}"),
            Retry::DeadLetter(_) => panic!("no limit"),
        }
    }
}
