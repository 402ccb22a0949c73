//! The consumer loop.
//!
//! One [`StreamConsumer::run`] call is a session. It loads the offset, then
//! reads batches with `XREAD COUNT <batch> BLOCK <timeout>` on a connection of
//! its own ([`ReadConnection`]), whose replies are scanned in place. As soon as
//! a batch has arrived the next read is sent, so Redis prepares it while the
//! batch is handled. Each entry is decoded and handed to the handler:
//!
//! - with `concurrency` 1, one at a time, in stream order;
//! - with more, up to that many at once, never two of the same ordering key
//!   (user) at once, each key's entries in stream order ([`KeyQueues`]).
//!
//! The offset saved is the low watermark ([`Watermark`]): the highest id with
//! every earlier entry finished, so a crash never skips an unfinished entry.
//! Reading pauses while too many entries are held.
//!
//! Every await that can wait (reads, completions, back-off delays) is raced
//! against the cancellation token. The loop has one way out; after it, the
//! handler calls in flight may finish within the grace period and the offset
//! is saved.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use lifecycle_domain::{EntryId, HandlerError, StreamOffsetStore};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{Checkpoint, ConsumerConfig, StartFrom};
use crate::decoder::{Decoded, EntryDecoder, EntryHandler};
use crate::error::ConsumerError;
use crate::fault::{classify, classify_read, FaultClass};
use crate::read_conn::{ReadConnection, ReadError, Received};
use crate::reply::parse_range_reply;
use crate::resp::{Batch, DeletionProbe};
use crate::stats::ConsumerStats;
use crate::tls::TlsSettings;
use crate::window::{KeyQueues, Watermark};

/// Why a session ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Shutdown was requested.
    Cancelled,
    /// Drain mode reached the last entry present at start-up.
    Drained,
}

/// The outcome of a session that ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// Why it ended.
    pub reason: StopReason,
    /// The offset stored when it ended (`None`: none is stored).
    pub offset: Option<EntryId>,
    /// Whether the last offset reached could not be saved (Redis was
    /// unreachable during the grace period); the entries after the stored
    /// offset will be handled again.
    pub offset_unsaved: bool,
}

/// A reliable consumer of one stream, generic over how its entries decode.
pub struct StreamConsumer<D: EntryDecoder> {
    client: redis::Client,
    decoder: D,
    offsets: Arc<dyn StreamOffsetStore>,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
    /// For a `rediss://` client: what the reader's own socket trusts and
    /// presents (`None`: the system's trust store).
    tls: Option<TlsSettings>,
}

impl<D: EntryDecoder> StreamConsumer<D> {
    /// A consumer reading with `client`, decoding with `decoder` and keeping
    /// its offset in `offsets`.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::Config`] when the settings are inconsistent.
    pub fn new(
        client: redis::Client,
        decoder: D,
        offsets: Arc<dyn StreamOffsetStore>,
        config: ConsumerConfig,
    ) -> Result<Self, ConsumerError> {
        config.validate().map_err(ConsumerError::Config)?;
        Ok(Self {
            client,
            decoder,
            offsets,
            config,
            stats: Arc::default(),
            tls: None,
        })
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
    ) -> Result<RunReport, ConsumerError>
    where
        H: EntryHandler<D::Item> + ?Sized,
    {
        let commands = ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.config.connect_timeout))
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_number_of_retries(1),
        )
        .map_err(|source| ConsumerError::Redis {
            action: "set up a command connection",
            source: Box::new(source),
        })?;
        let ctx = Ctx {
            consumer: self,
            handler,
            cancel,
            commands,
        };
        let span = tracing::info_span!("consumer", stream = %self.config.stream, label = %self.config.label);
        let mut session = Session::new(&ctx);
        async move {
            let outcome = session.consume().await;
            session.finish_running().await;
            let unsaved = session.final_checkpoint().await;
            let reason = outcome?;
            info!(offset = ?session.saved.map(|id| id.to_string()), reason = ?reason, "consumer stopped");
            Ok(RunReport {
                reason,
                offset: session.saved,
                offset_unsaved: unsaved,
            })
        }
        .instrument(span)
        .await
    }
}

/// What the handling of one entry came to.
enum Progress {
    /// Its handling finished: the offset may move past it.
    Finished,
    /// Shutdown came first: the offset stays before it.
    Interrupted,
}

/// One decoded entry waiting for, or in, the handler.
struct Job<T> {
    id: EntryId,
    item: T,
    /// The reply it came in, kept for a dead letter's copy of its fields.
    batch: Arc<Batch>,
    index: usize,
}

/// A finished job.
struct Done {
    id: EntryId,
    /// Its ordering key (only tracked when handling concurrently).
    key: Option<String>,
    outcome: Result<Progress, ConsumerError>,
}

type JobFuture<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

/// What every job shares: read-only for the whole session.
struct Ctx<'a, D: EntryDecoder, H: ?Sized> {
    consumer: &'a StreamConsumer<D>,
    handler: &'a H,
    cancel: &'a CancellationToken,
    /// For the stream's last id and dead letters; reconnects by itself.
    commands: ConnectionManager,
}

impl<D: EntryDecoder, H: EntryHandler<D::Item> + ?Sized> Ctx<'_, D, H> {
    fn config(&self) -> &ConsumerConfig {
        &self.consumer.config
    }

    /// Handles one job: retries a failing handler with back-off, dead-letters
    /// it after the configured attempts. The handler call itself is never
    /// interrupted; the caller bounds it by the grace period at shutdown.
    async fn run_job(&self, job: Job<D::Item>, key: Option<String>) -> Done {
        let mut backoff = Backoff::new(self.config().handler_retry);
        let mut attempts: u32 = 0;
        // A job queued behind its key starts only when polled; after shutdown
        // was requested it must not start at all.
        if self.cancel.is_cancelled() {
            return Done {
                id: job.id,
                key,
                outcome: Ok(Progress::Interrupted),
            };
        }
        // Failures that may be the entry's own fault count towards
        // dead-lettering; a dependency outage does not, and backs off like a
        // Redis fault (shorter ceiling, so handling resumes soon after).
        let mut own_faults: u32 = 0;
        let mut outage = Backoff::new(self.config().redis_retry);
        let outcome = loop {
            attempts = attempts.saturating_add(1);
            let err = match self.handler.handle(&job.item).await {
                Ok(()) => {
                    self.consumer.stats.handled();
                    break Ok(Progress::Finished);
                }
                Err(err) => err,
            };
            self.consumer.stats.handler_failure();
            let delay = if err.is_transient() {
                backoff.reset();
                outage.next_delay()
            } else {
                outage.reset();
                own_faults = own_faults.saturating_add(1);
                if self
                    .config()
                    .dead_letter_after
                    .is_some_and(|limit| own_faults >= limit)
                {
                    break self.dead_letter(&job, &err, own_faults).await;
                }
                backoff.next_delay()
            };
            let event_type = self.consumer.decoder.event_type(&job.item);
            let retry_in_ms = delay.as_millis() as u64;
            // An outage is reported by its first failure; its retries, by
            // the handler's dependency, at debug level.
            if err.is_transient() && outage.attempts() > 1 {
                debug!(stream_entry_id = %job.id, attempt = attempts, retry_in_ms, err = %err, "handler still failing on an unavailable dependency");
            } else {
                warn!(
                    stream_entry_id = %job.id,
                    event_type = ?event_type,
                    attempt = attempts,
                    transient = err.is_transient(),
                    retry_in_ms,
                    err = %err,
                    "handler failed; holding the offset and retrying"
                );
            }
            if !sleep_unless_cancelled(self.cancel, delay).await {
                break Ok(Progress::Interrupted);
            }
        };
        Done {
            id: job.id,
            key,
            outcome,
        }
    }

    /// Copies a job's entry to the dead-letter stream with the failure, then
    /// lets the offset move past it.
    async fn dead_letter(
        &self,
        job: &Job<D::Item>,
        err: &HandlerError,
        attempts: u32,
    ) -> Result<Progress, ConsumerError> {
        let config = self.config();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&config.dead_letter_stream).arg("*");
        if let Some(view) = job.batch.entry(job.index) {
            let mut fields = Vec::new();
            view.fields_into(&mut fields);
            for (name, value) in fields {
                cmd.arg(name).arg(value);
            }
        }
        cmd.arg("dead_letter_entry_id")
            .arg(job.id.to_string())
            .arg("dead_letter_stream")
            .arg(&config.stream)
            .arg("dead_letter_error")
            .arg(err.to_string())
            .arg("dead_letter_attempts")
            .arg(attempts);
        let added = self
            .command(
                "add to the dead-letter stream",
                &config.dead_letter_stream,
                &cmd,
            )
            .await?;
        if added.is_none() {
            return Ok(Progress::Interrupted);
        }
        error!(
            stream_entry_id = %job.id,
            dead_letter_stream = %config.dead_letter_stream,
            attempts,
            err = %err,
            "entry dead-lettered after repeated handler failures; moving past it"
        );
        self.consumer.stats.dead_lettered();
        Ok(Progress::Finished)
    }

    /// Runs `cmd` on the command connection through transient faults, backing
    /// off between attempts. `None` when cancelled first.
    async fn command(
        &self,
        action: &'static str,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<Option<Value>, ConsumerError> {
        let mut backoff = Backoff::new(self.config().redis_retry);
        loop {
            let mut conn = self.commands.clone();
            let result = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Ok(None),
                result = cmd.query_async::<Value>(&mut conn) => result,
            };
            let err = match result {
                Ok(value) => return Ok(Some(value)),
                Err(err) => err,
            };
            permanent_redis(action, key, &err)?;
            self.consumer.stats.redis_fault();
            let delay = backoff.next_delay();
            if backoff.attempts() == 1 {
                warn!(action, err = %err, "Redis unavailable; retrying with back-off");
            }
            if !sleep_unless_cancelled(self.cancel, delay).await {
                return Ok(None);
            }
        }
    }
}

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

/// A run of consecutive faults, logged once when it starts and once when it
/// ends rather than once per retry.
struct Outage {
    started: Instant,
    retries: u32,
}

/// Why the dispatch of a batch stopped early.
enum Dispatch {
    /// Every entry was dispatched (or drain's end was reached).
    Done,
    /// Shutdown was requested.
    Cancelled,
}

/// The mutable state of one `run`.
struct Session<'a, D: EntryDecoder, H: ?Sized> {
    ctx: &'a Ctx<'a, D, H>,
    /// The reading connection; `None` after a fault, until reconnected.
    reader: Option<ReadConnection>,
    /// Whether an `XREAD` was sent whose reply has not been received.
    read_in_flight: bool,
    /// Where the next read starts: the last entry received.
    read_after: EntryId,
    /// Not before this instant is Redis tried again after a fault.
    retry_at: Option<tokio::time::Instant>,
    redis_backoff: Backoff,
    outage: Option<Outage>,
    /// Drain mode's last entry; `None` outside drain mode.
    drain_target: Option<EntryId>,
    /// Drain mode has read everything it will handle.
    reading_done: bool,
    /// The low watermark: every entry up to it is finished.
    finished: EntryId,
    /// The offset known to be stored.
    saved: Option<EntryId>,
    /// Whether `finished` is ahead of what is stored.
    dirty: bool,
    /// The current read count: the configured batch size, lowered while
    /// replies are very large.
    batch_size: usize,
    window: Watermark,
    /// The largest deleted id already reported as a trim past our position.
    trim_reported: EntryId,
    /// An entry found larger than the reply limit, to absorb unread.
    oversized: Option<EntryId>,
    queues: KeyQueues<Job<D::Item>>,
    running: FuturesUnordered<JobFuture<'a>>,
}

impl<'a, D: EntryDecoder, H: EntryHandler<D::Item> + ?Sized> Session<'a, D, H> {
    fn new(ctx: &'a Ctx<'a, D, H>) -> Self {
        let config = ctx.config();
        Self {
            ctx,
            reader: None,
            read_in_flight: false,
            read_after: EntryId::ZERO,
            retry_at: None,
            redis_backoff: Backoff::new(config.redis_retry),
            outage: None,
            drain_target: None,
            reading_done: false,
            finished: EntryId::ZERO,
            saved: None,
            dirty: false,
            batch_size: config.batch_size,
            window: Watermark::new(),
            trim_reported: EntryId::ZERO,
            oversized: None,
            queues: KeyQueues::new(),
            running: FuturesUnordered::new(),
        }
    }

    fn config(&self) -> &'a ConsumerConfig {
        &self.ctx.consumer.config
    }

    fn stats(&self) -> &'a ConsumerStats {
        &self.ctx.consumer.stats
    }

    fn cancel(&self) -> &'a CancellationToken {
        self.ctx.cancel
    }

    /// The loop. Returns when cancelled, drained, or on a permanent fault.
    async fn consume(&mut self) -> Result<StopReason, ConsumerError> {
        let Some(start) = self.start_position().await? else {
            return Ok(StopReason::Cancelled);
        };
        self.finished = start;
        self.read_after = start;
        // A start position resolved from the start option (end, or a given
        // id) is stored before the first read, so a restart before the first
        // new entry cannot resolve it again and skip what arrived meanwhile.
        self.checkpoint().await?;
        if self.config().drain {
            match self.last_entry_id().await? {
                None => return Ok(StopReason::Cancelled),
                Some(target) => {
                    self.reading_done = target.is_none_or(|target| target <= start);
                    self.drain_target = Some(target.unwrap_or(start));
                }
            }
        }
        info!(
            start_after = %start,
            block_timeout_ms = self.config().block_timeout.as_millis() as u64,
            batch_size = self.config().batch_size,
            concurrency = self.config().concurrency,
            drain_until = ?self.drain_target.map(|id| id.to_string()),
            "consumer started"
        );
        loop {
            if self.cancel().is_cancelled() {
                return Ok(StopReason::Cancelled);
            }
            if self.reading_done && self.running.is_empty() && self.window.is_empty() {
                return Ok(StopReason::Drained);
            }
            if let Some(id) = self.oversized.take() {
                self.absorb_oversized(id).await?;
            }
            let may_read =
                !self.reading_done && self.window.len() < self.config().max_held_entries();
            if may_read && !self.read_in_flight {
                self.send_read().await?;
            }
            let cancel = self.cancel();
            let waiting_to_retry = self.retry_at;
            let reply_limit = self.config().max_reply_bytes;
            let response_timeout = self.config().read_response_timeout();
            let reader = if self.read_in_flight {
                self.reader.as_mut()
            } else {
                None
            };
            let running = &mut self.running;
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(StopReason::Cancelled),
                Some(done) = running.next(), if !running.is_empty() => {
                    self.complete(done).await?;
                    // Everything dispatched is done: save now rather than
                    // after the next (possibly long) blocking read.
                    if self.running.is_empty() {
                        self.checkpoint().await?;
                    }
                }
                received = receive(reader, reply_limit, response_timeout), if self.read_in_flight => {
                    self.read_in_flight = false;
                    match received {
                        Ok(received) => self.on_batch(received).await?,
                        Err(err) => self.read_fault(err)?,
                    }
                }
                () = sleep_until(waiting_to_retry), if waiting_to_retry.is_some() && !self.read_in_flight => {
                    self.retry_at = None;
                }
            }
        }
    }

    /// Sends the next `XREAD`, connecting first if needed. Faults set a
    /// retry time rather than blocking, so completions keep flowing.
    async fn send_read(&mut self) -> Result<(), ConsumerError> {
        if self
            .retry_at
            .is_some_and(|at| at > tokio::time::Instant::now())
        {
            return Ok(());
        }
        if self.reader.is_none() {
            let info = self.ctx.consumer.client.get_connection_info();
            let connect = ReadConnection::connect(
                info,
                self.ctx.consumer.tls.as_ref(),
                self.config().connect_timeout,
            );
            let connected = tokio::select! {
                biased;
                () = self.cancel().cancelled() => return Ok(()),
                connected = connect => connected,
            };
            match connected {
                Ok(conn) => {
                    if self.outage.is_some() {
                        self.stats().reconnect();
                    }
                    self.reader = Some(conn);
                }
                Err(err) => return self.read_fault(err),
            }
        }
        let block = (!self.config().drain).then_some(self.config().block_timeout);
        let stream = &self.config().stream;
        let (after, count) = (self.read_after, self.batch_size);
        let Some(reader) = self.reader.as_mut() else {
            return Ok(());
        };
        match reader.send_xread(stream, after, count, block, true).await {
            Ok(()) => {
                self.stats().read();
                self.read_in_flight = true;
                Ok(())
            }
            Err(err) => self.read_fault(err),
        }
    }

    /// A batch arrived: send the next read at once, then dispatch it.
    async fn on_batch(&mut self, received: Received) -> Result<(), ConsumerError> {
        let Received { batch, probe } = received;
        self.stats().read_completed();
        // Redis may serve reads while it refuses writes (OOM, MISCONF): with
        // an offset left unsaved, only a save ends the outage.
        if !self.dirty {
            self.recovered();
        }
        if batch.is_empty() {
            if self.drain_target.is_some() {
                // Nothing after our position although the target lies ahead:
                // the rest was deleted. Done all the same.
                self.reading_done = true;
            }
            return self.checkpoint().await;
        }
        self.adapt_batch_size(batch.reply_bytes(), batch.len());
        let read_from = self.read_after;
        if let Some(last) = batch.last_id() {
            self.read_after = last;
            if self.drain_target.is_some_and(|target| last >= target) {
                self.reading_done = true;
            }
        }
        if !self.reading_done && self.window.len() < self.config().max_held_entries() {
            self.send_read().await?;
        }
        if let Some(probe) = probe {
            self.detect_trim(read_from, &batch, probe);
        }
        match self.dispatch(Arc::new(batch)).await? {
            Dispatch::Done => self.checkpoint().await,
            Dispatch::Cancelled => Ok(()),
        }
    }

    /// Notices entries deleted before they were read, from the deletion probe
    /// run on the reading connection just before the read, two ways:
    ///
    /// - trimming (`XTRIM`, `XADD MAXLEN`) removes the oldest entries: when
    ///   the stream's first entry is now after where this read started (and
    ///   that was a real entry, not `0-0`), the trim reached our position and
    ///   what lay between is gone;
    /// - deleting (`XDEL`): when the stream's largest deleted id lies after
    ///   where this read started, up to the last entry returned, and is not
    ///   among them, it was deleted before we read it.
    ///
    /// The probe sees the stream as the read will, so a deletion made while a
    /// blocking read waits is noticed only when a later read's range covers
    /// it.
    ///
    /// Logged as an error with how far the stream moved past us, counted,
    /// reported once per trim or deletion seen; consuming goes on.
    fn detect_trim(&mut self, read_from: EntryId, batch: &Batch, probe: DeletionProbe) {
        let (Some(first), Some(last)) =
            (batch.iter().next().map(|entry| entry.id()), batch.last_id())
        else {
            return;
        };
        let trimmed_past = probe
            .first_entry_id
            .filter(|stream_first| read_from > EntryId::ZERO && *stream_first > read_from);
        let deleted_past = probe.max_deleted_entry_id.filter(|deleted| {
            *deleted > read_from
                && *deleted <= last
                && !batch.iter().any(|entry| entry.id() == *deleted)
        });
        let Some(evidence) = trimmed_past.or(deleted_past) else {
            return;
        };
        if evidence <= self.trim_reported {
            return;
        }
        self.trim_reported = evidence;
        self.stats().trimmed();
        error!(
            read_from = %read_from,
            first_entry_after = %first,
            stream_first_entry_id = ?probe.first_entry_id.map(|id| id.to_string()),
            max_deleted_entry_id = ?probe.max_deleted_entry_id.map(|id| id.to_string()),
            gap_ms = first.ms.saturating_sub(read_from.ms),
            "the stream was trimmed or entries deleted past our position before they were handled; those entries are lost to this worker"
        );
    }

    /// Moves past an entry larger than the reply limit without reading it.
    async fn absorb_oversized(&mut self, id: EntryId) -> Result<(), ConsumerError> {
        warn!(
            stream_entry_id = %id,
            err = %format!("entry too large: over the {} byte reply limit", self.config().max_reply_bytes),
            "malformed entry absorbed"
        );
        self.stats().malformed();
        self.read_after = id;
        if self.drain_target.is_some_and(|target| id >= target) {
            self.reading_done = true;
        }
        if self.window.push(id) {
            self.settle(id).await?;
        }
        self.checkpoint().await
    }

    /// Decodes and dispatches every entry of `batch` in stream order.
    async fn dispatch(&mut self, batch: Arc<Batch>) -> Result<Dispatch, ConsumerError> {
        let decoder = &self.ctx.consumer.decoder;
        let concurrency = self.config().concurrency;
        let mut fields = Vec::new();
        for (index, view) in batch.iter().enumerate() {
            if self.cancel().is_cancelled() {
                return Ok(Dispatch::Cancelled);
            }
            let id = view.id();
            if self.drain_target.is_some_and(|target| id > target) {
                break;
            }
            while self.window.len() >= self.config().max_held_entries() {
                if !self.complete_one().await? {
                    return Ok(Dispatch::Cancelled);
                }
            }
            view.fields_into(&mut fields);
            let decoded = decoder.decode(id, &fields);
            if !self.window.push(id) {
                // Never from Redis: ids grow along a stream.
                warn!(stream_entry_id = %id, "entry id not after the previous one; skipped");
                continue;
            }
            let item = match decoded {
                Decoded::Handle(item) => item,
                Decoded::Malformed(reason) => {
                    warn!(stream_entry_id = %id, err = %reason, "malformed entry absorbed");
                    self.stats().malformed();
                    self.settle(id).await?;
                    continue;
                }
                Decoded::UnknownType(event_type) => {
                    info!(stream_entry_id = %id, event_type = ?event_type, "entry of unknown type absorbed");
                    self.stats().unknown_type();
                    self.settle(id).await?;
                    continue;
                }
            };
            let job = Job {
                id,
                item,
                batch: Arc::clone(&batch),
                index,
            };
            if concurrency == 1 {
                let done = run_with_grace(self.ctx, job).await;
                let interrupted = matches!(done.outcome, Ok(Progress::Interrupted));
                self.complete(done).await?;
                if interrupted {
                    return Ok(Dispatch::Cancelled);
                }
                continue;
            }
            let key = decoder.ordering_key(&job.item).to_owned();
            let Some(job) = self.queues.offer(&key, job) else {
                continue;
            };
            while self.running.len() >= concurrency {
                if !self.complete_one().await? {
                    return Ok(Dispatch::Cancelled);
                }
            }
            if self.cancel().is_cancelled() {
                return Ok(Dispatch::Cancelled);
            }
            self.start(job, key);
        }
        Ok(Dispatch::Done)
    }

    fn start(&mut self, job: Job<D::Item>, key: String) {
        let ctx = self.ctx;
        self.running.push(Box::pin(ctx.run_job(job, Some(key))));
    }

    /// Waits for one running job and settles it; `false` when cancelled first.
    async fn complete_one(&mut self) -> Result<bool, ConsumerError> {
        let cancel = self.cancel();
        let done = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(false),
            done = self.running.next() => done,
        };
        match done {
            Some(done) => self.complete(done).await.map(|()| true),
            None => Ok(true),
        }
    }

    /// Settles a finished job: moves the watermark, starts the next job of
    /// its key.
    async fn complete(&mut self, done: Done) -> Result<(), ConsumerError> {
        let progress = done.outcome?;
        if let Progress::Interrupted = progress {
            return Ok(());
        }
        if let Some(key) = &done.key {
            if let Some(next) = self.queues.release(key) {
                if !self.cancel().is_cancelled() {
                    self.start(next, key.clone());
                }
            }
        }
        self.settle(done.id).await
    }

    /// Records that `id` is finished and moves the watermark if it can.
    async fn settle(&mut self, id: EntryId) -> Result<(), ConsumerError> {
        if let Some(watermark) = self.window.finish(id) {
            self.finished = watermark;
            self.dirty = true;
            if self.config().checkpoint == Checkpoint::EveryEntry {
                self.checkpoint().await?;
            }
        }
        Ok(())
    }

    /// After shutdown or a fault: lets running jobs finish within the grace
    /// period, settling those that do.
    async fn finish_running(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let grace = self.config().shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, self.running.next()).await {
                Ok(Some(done)) => {
                    if let Err(err) = self.complete(done).await {
                        error!(err = %err, "an entry failed while shutting down");
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    warn!(
                        running = self.running.len(),
                        grace_ms = grace.as_millis() as u64,
                        "handler calls did not finish within the shutdown grace period; their entries will be handled again"
                    );
                    break;
                }
            }
        }
    }

    /// The id after which reading starts: the stored offset, else per the
    /// start option. `None` when cancelled first.
    async fn start_position(&mut self) -> Result<Option<EntryId>, ConsumerError> {
        let stored = loop {
            let label = self.config().label.as_str();
            let load = self.ctx.consumer.offsets.load(label);
            let result = tokio::select! {
                biased;
                () = self.cancel().cancelled() => return Ok(None),
                result = load => result,
            };
            match result {
                Ok(stored) => break stored,
                Err(err) if err.permanent => return Err(ConsumerError::Store(err)),
                Err(err) => {
                    self.note_fault(&err.to_string());
                    let delay = self.redis_backoff.next_delay();
                    if !sleep_unless_cancelled(self.cancel(), delay).await {
                        return Ok(None);
                    }
                }
            }
        };
        self.recovered();
        if let Some(offset) = stored {
            self.saved = Some(offset);
            return Ok(Some(offset));
        }
        let start = match self.config().start_from {
            StartFrom::Beginning => EntryId::ZERO,
            StartFrom::Id(id) => {
                self.dirty = true;
                id.predecessor().unwrap_or(EntryId::ZERO)
            }
            StartFrom::End => match self.last_entry_id().await? {
                None => return Ok(None),
                Some(last) => {
                    self.dirty = true;
                    last.unwrap_or(EntryId::ZERO)
                }
            },
        };
        Ok(Some(start))
    }

    /// The id of the stream's last entry (`Some(None)`: the stream is empty
    /// or absent), or `None` when cancelled first.
    async fn last_entry_id(&mut self) -> Result<Option<Option<EntryId>>, ConsumerError> {
        let stream = &self.config().stream;
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(stream).arg("+").arg("-").arg("COUNT").arg(1);
        let reply = self
            .ctx
            .command("find the stream's last entry", stream, &cmd)
            .await?;
        match reply {
            None => Ok(None),
            Some(reply) => Ok(Some(
                parse_range_reply(reply)?.first().map(|entry| entry.id),
            )),
        }
    }

    /// Sizes the next read so that its reply stays near a quarter of the
    /// reply limit, judging by the entries of this one: a backlog of large
    /// entries is read a few at a time, small ones a full batch at a time.
    fn adapt_batch_size(&mut self, reply_bytes: usize, entries: usize) {
        let configured = self.config().batch_size;
        let per_entry = (reply_bytes / entries.max(1)).max(1);
        let fitting = (self.config().max_reply_bytes / 4 / per_entry).clamp(1, configured);
        if fitting < self.batch_size {
            debug!(
                reply_bytes,
                batch_size = fitting,
                "large entries: reading fewer per batch"
            );
            self.batch_size = fitting;
        } else if self.batch_size < configured {
            self.batch_size = self.batch_size.saturating_mul(2).min(fitting);
        }
    }

    /// Handles a failure of the reading connection: permanent ones end the
    /// session; transient ones drop the connection and schedule a retry.
    fn read_fault(&mut self, err: ReadError) -> Result<(), ConsumerError> {
        if let ReadError::ReplyTooLarge {
            entries,
            partial_entry_id,
            limit,
        } = err
        {
            // Not an outage: read again at once, fewer at a time.
            self.reader = None;
            self.read_in_flight = false;
            if entries > 0 || self.batch_size > 1 {
                self.batch_size = entries.clamp(1, self.batch_size / 2 + 1);
                warn!(
                    limit,
                    batch_size = self.batch_size,
                    "an XREAD reply outgrew the limit; reading fewer entries at a time"
                );
                return Ok(());
            }
            // One entry alone is larger than the limit: it is absorbed
            // unread, as an entry too large to decode would be.
            match partial_entry_id {
                Some(id) => self.oversized = Some(id),
                None => {
                    return Err(ConsumerError::Redis {
                        action: "read the stream",
                        source: format!(
                            "a reply larger than {limit} bytes arrived before its first entry's id"
                        )
                        .into(),
                    })
                }
            }
            return Ok(());
        }
        match classify_read(&err) {
            FaultClass::Transient => {}
            FaultClass::WrongType => {
                return Err(ConsumerError::WrongType {
                    key: self.config().stream.clone(),
                })
            }
            FaultClass::Auth => {
                return Err(ConsumerError::Auth {
                    action: "read the stream",
                    source: Box::new(err),
                })
            }
            FaultClass::Tls => {
                return Err(ConsumerError::Tls {
                    action: "read the stream",
                    source: Box::new(err),
                })
            }
            FaultClass::Permanent => {
                return Err(ConsumerError::Redis {
                    action: "read the stream",
                    source: Box::new(err),
                })
            }
        }
        self.reader = None;
        self.read_in_flight = false;
        self.note_fault(&err.to_string());
        let delay = self.redis_backoff.next_delay();
        debug!(
            retry_in_ms = delay.as_millis() as u64,
            "retrying after a Redis fault"
        );
        self.retry_at = Some(tokio::time::Instant::now() + delay);
        Ok(())
    }

    /// Saves the offset if it moved. A transient failure is left for the next
    /// checkpoint (a crash meanwhile only replays more).
    async fn checkpoint(&mut self) -> Result<(), ConsumerError> {
        if !self.dirty {
            return Ok(());
        }
        let offset = self.finished;
        let label = &self.config().label;
        match self.ctx.consumer.offsets.save(label, offset).await {
            Ok(()) => {
                self.saved = Some(offset);
                self.dirty = false;
                self.stats().offset_saved();
                self.recovered();
                Ok(())
            }
            Err(err) if err.permanent => Err(ConsumerError::Store(err)),
            Err(err) => {
                self.note_fault(&err.to_string());
                Ok(())
            }
        }
    }

    /// The last save, retried within the grace period. Returns whether an
    /// unsaved offset was left behind.
    async fn final_checkpoint(&mut self) -> bool {
        let deadline = Instant::now() + self.config().shutdown_grace;
        let mut backoff = Backoff::new(self.config().redis_retry);
        while self.dirty {
            match self.checkpoint().await {
                Ok(()) if !self.dirty => break,
                Ok(()) => {}
                Err(err) => {
                    error!(err = %err, "final offset save failed");
                    break;
                }
            }
            let delay = backoff.next_delay();
            if Instant::now() + delay > deadline {
                break;
            }
            tokio::time::sleep(delay).await;
        }
        if self.dirty {
            warn!(offset = %self.finished, stored = ?self.saved.map(|id| id.to_string()), "could not save the offset before stopping; entries after the stored offset will be handled again");
        }
        self.dirty
    }

    /// Counts a transient fault and logs it if it starts an outage.
    fn note_fault(&mut self, cause: &str) {
        self.stats().redis_fault();
        match &mut self.outage {
            Some(outage) => {
                outage.retries = outage.retries.saturating_add(1);
                debug!(err = %cause, retries = outage.retries, "Redis still unavailable");
            }
            None => {
                warn!(err = %cause, "Redis unavailable; retrying with back-off, keeping our place");
                self.outage = Some(Outage {
                    started: Instant::now(),
                    retries: 1,
                });
            }
        }
    }

    /// Ends an outage, if one was going on.
    fn recovered(&mut self) {
        if let Some(outage) = self.outage.take() {
            info!(
                outage_ms = outage.started.elapsed().as_millis() as u64,
                retries = outage.retries,
                "Redis reachable again; carrying on"
            );
        }
        self.redis_backoff.reset();
    }
}

/// Runs one job to its end; at shutdown the handler call in flight may
/// finish within the grace period.
async fn run_with_grace<D, H>(ctx: &Ctx<'_, D, H>, job: Job<D::Item>) -> Done
where
    D: EntryDecoder,
    H: EntryHandler<D::Item> + ?Sized,
{
    let id = job.id;
    let call = ctx.run_job(job, None);
    tokio::pin!(call);
    tokio::select! {
        biased;
        done = &mut call => done,
        () = ctx.cancel.cancelled() => {
            let grace = ctx.config().shutdown_grace;
            match tokio::time::timeout(grace, &mut call).await {
                Ok(done) => done,
                Err(_) => {
                    warn!(stream_entry_id = %id, grace_ms = grace.as_millis() as u64, "handler did not finish within the shutdown grace period; its entry will be handled again");
                    Done { id, key: None, outcome: Ok(Progress::Interrupted) }
                }
            }
        }
    }
}

/// Receives the reply of the read in flight, giving up after `timeout`: a
/// connection that went silent (a dead peer, a stalled network) is then
/// dropped and reconnected like any other fault.
async fn receive(
    reader: Option<&mut ReadConnection>,
    limit: usize,
    timeout: Duration,
) -> Result<Received, ReadError> {
    match reader {
        Some(reader) => tokio::time::timeout(timeout, reader.receive_batch(limit))
            .await
            .unwrap_or(Err(ReadError::Timeout(timeout))),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
