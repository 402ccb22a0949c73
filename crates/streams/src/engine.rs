//! The consumer loop.
//!
//! One [`StreamConsumer::run`] call is a session: it loads the offset, then
//! reads batches with `XREAD COUNT <batch> BLOCK <timeout>` on a dedicated
//! connection (its response timeout is longer than the block), hands each
//! entry to the decoder and the handler in stream order, and saves the offset
//! after each batch (or each entry). Every await that can wait, reads and
//! back-off sleeps alike, is raced against the cancellation token; the loop
//! has one way out, after which the offset is saved.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifecycle_domain::{EntryId, HandlerError, StoreError, StreamOffsetStore};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{Checkpoint, ConsumerConfig, StartFrom};
use crate::decoder::{Decoded, EntryDecoder, EntryHandler};
use crate::error::ConsumerError;
use crate::fault::{classify, FaultClass};
use crate::reply::{parse_range_reply, parse_xread_reply, StreamEntry};
use crate::stats::ConsumerStats;

/// A reply larger than this halves the next read's count, so a backlog of
/// large entries cannot make one reply unbounded.
const LARGE_REPLY_BYTES: usize = 16 * 1024 * 1024;

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
        })
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
        let span = tracing::info_span!("consumer", stream = %self.config.stream, label = %self.config.label);
        let mut session = Session {
            consumer: self,
            handler,
            cancel,
            conn: None,
            redis_backoff: Backoff::new(self.config.redis_retry),
            outage: None,
            finished: EntryId::ZERO,
            saved: None,
            dirty: false,
            batch_size: self.config.batch_size,
        };
        async move {
            let outcome = session.consume().await;
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

/// A fault met while talking to Redis or the offset store.
enum Fault {
    Redis(RedisError),
    Store(StoreError),
}

/// A run of consecutive faults, logged once when it starts and once when it
/// ends rather than once per retry.
struct Outage {
    started: Instant,
    retries: u32,
}

/// What became of one entry.
enum Progress {
    /// Its handling finished: the offset may move past it.
    Finished,
    /// Shutdown came first: the offset stays before it.
    Interrupted,
}

/// The mutable state of one `run`.
struct Session<'a, D: EntryDecoder, H: ?Sized> {
    consumer: &'a StreamConsumer<D>,
    handler: &'a H,
    cancel: &'a CancellationToken,
    /// The reading connection; `None` after a fault, until reconnected.
    conn: Option<MultiplexedConnection>,
    redis_backoff: Backoff,
    outage: Option<Outage>,
    /// The last entry whose handling finished; reads continue after it.
    finished: EntryId,
    /// The offset known to be stored.
    saved: Option<EntryId>,
    /// Whether `finished` is ahead of what is stored.
    dirty: bool,
    /// The current read count: the configured batch size, lowered while
    /// replies are very large.
    batch_size: usize,
}

impl<D: EntryDecoder, H: EntryHandler<D::Item> + ?Sized> Session<'_, D, H> {
    fn config(&self) -> &ConsumerConfig {
        &self.consumer.config
    }

    fn stats(&self) -> &ConsumerStats {
        &self.consumer.stats
    }

    /// The loop. Returns when cancelled, drained, or on a permanent fault.
    async fn consume(&mut self) -> Result<StopReason, ConsumerError> {
        let Some(start) = self.start_position().await? else {
            return Ok(StopReason::Cancelled);
        };
        self.finished = start;
        // A start position resolved from the start option (end, or a given
        // id) is stored before the first read, so a restart before the first
        // new entry cannot resolve it again and skip what arrived meanwhile.
        self.checkpoint().await?;
        let drain_target = if self.config().drain {
            match self.last_entry_id().await? {
                Some(target) => target,
                None => return Ok(StopReason::Cancelled),
            }
        } else {
            None
        };
        info!(
            start_after = %start,
            block_timeout_ms = self.config().block_timeout.as_millis() as u64,
            batch_size = self.config().batch_size,
            drain_until = ?drain_target.map(|id| id.to_string()),
            "consumer started"
        );
        loop {
            if self.cancel.is_cancelled() {
                return Ok(StopReason::Cancelled);
            }
            if let Some(target) = drain_target {
                if self.finished >= target {
                    return Ok(StopReason::Drained);
                }
            }
            let Some(entries) = self.read_batch().await? else {
                return Ok(StopReason::Cancelled);
            };
            if entries.is_empty() {
                if drain_target.is_some() {
                    // Nothing after our position although the target lies
                    // ahead: the rest was deleted. Done all the same.
                    return Ok(StopReason::Drained);
                }
                self.checkpoint().await?;
                continue;
            }
            for entry in entries {
                // Shutdown lets the handler call in flight finish, but starts
                // no new one (each would get its own grace period).
                if self.cancel.is_cancelled() {
                    return Ok(StopReason::Cancelled);
                }
                if drain_target.is_some_and(|target| entry.id > target) {
                    break;
                }
                match self.process(entry).await? {
                    Progress::Finished => {}
                    Progress::Interrupted => return Ok(StopReason::Cancelled),
                }
                if self.config().checkpoint == Checkpoint::EveryEntry {
                    self.checkpoint().await?;
                }
            }
            self.checkpoint().await?;
        }
    }

    /// The id after which reading starts: the stored offset, else per the
    /// start option. `None` when cancelled first.
    async fn start_position(&mut self) -> Result<Option<EntryId>, ConsumerError> {
        let stored = loop {
            let label = self.config().label.as_str();
            let load = self.consumer.offsets.load(label);
            let result = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Ok(None),
                result = load => result,
            };
            match result {
                Ok(stored) => break stored,
                Err(err) => {
                    if !self
                        .fault("load the stored offset", Fault::Store(err))
                        .await?
                    {
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
                    // Stored at once, so a restart before the first new entry
                    // does not skip what arrives meanwhile.
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
        let stream = self.config().stream.clone();
        let reply = self
            .with_redis("find the stream's last entry", |mut conn| {
                let stream = stream.clone();
                async move {
                    redis::cmd("XREVRANGE")
                        .arg(&stream)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query_async::<Value>(&mut conn)
                        .await
                }
            })
            .await?;
        match reply {
            None => Ok(None),
            Some(reply) => Ok(Some(
                parse_range_reply(reply)?.first().map(|entry| entry.id),
            )),
        }
    }

    /// One `XREAD`; `None` when cancelled first.
    async fn read_batch(&mut self) -> Result<Option<Vec<StreamEntry>>, ConsumerError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(self.batch_size);
        if !self.config().drain {
            cmd.arg("BLOCK")
                .arg(self.config().block_timeout.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(&self.config().stream)
            .arg(self.finished.to_string());
        let stats = Arc::clone(&self.consumer.stats);
        let reply = self
            .with_redis("read the stream", |mut conn| {
                let cmd = cmd.clone();
                stats.read();
                async move { cmd.query_async::<Value>(&mut conn).await }
            })
            .await?;
        let Some(reply) = reply else {
            return Ok(None);
        };
        let entries = parse_xread_reply(reply)?;
        self.adapt_batch_size(&entries);
        Ok(Some(entries))
    }

    fn adapt_batch_size(&mut self, entries: &[StreamEntry]) {
        let bytes = entries
            .iter()
            .map(StreamEntry::size)
            .fold(0usize, usize::saturating_add);
        let configured = self.config().batch_size;
        if bytes > LARGE_REPLY_BYTES && self.batch_size > 1 {
            self.batch_size = (self.batch_size / 2).max(1);
            warn!(
                reply_bytes = bytes,
                batch_size = self.batch_size,
                "large entries: reading fewer per batch"
            );
        } else if bytes < LARGE_REPLY_BYTES / 4 && self.batch_size < configured {
            self.batch_size = self.batch_size.saturating_mul(2).min(configured);
        }
    }

    /// Decodes and handles one entry.
    async fn process(&mut self, entry: StreamEntry) -> Result<Progress, ConsumerError> {
        let entry_id = entry.id.to_string();
        let item = match self.consumer.decoder.decode(entry.id, &entry.fields) {
            Decoded::Handle(item) => item,
            Decoded::Malformed(reason) => {
                warn!(stream_entry_id = %entry_id, err = %reason, "malformed entry absorbed");
                self.stats().malformed();
                self.finish(entry.id);
                return Ok(Progress::Finished);
            }
            Decoded::UnknownType(event_type) => {
                info!(stream_entry_id = %entry_id, event_type = ?event_type, "entry of unknown type absorbed");
                self.stats().unknown_type();
                self.finish(entry.id);
                return Ok(Progress::Finished);
            }
        };
        let mut backoff = Backoff::new(self.config().handler_retry);
        let mut attempts: u32 = 0;
        loop {
            attempts = attempts.saturating_add(1);
            let err = match self.call_handler(&item).await {
                None => return Ok(Progress::Interrupted),
                Some(Ok(())) => {
                    self.stats().handled();
                    self.finish(entry.id);
                    return Ok(Progress::Finished);
                }
                Some(Err(err)) => err,
            };
            self.stats().handler_failure();
            let event_type = self.consumer.decoder.event_type(&item);
            if self
                .config()
                .dead_letter_after
                .is_some_and(|limit| attempts >= limit)
            {
                return self.dead_letter(&entry, &err, attempts).await;
            }
            let delay = backoff.next_delay();
            warn!(
                stream_entry_id = %entry_id,
                event_type = ?event_type,
                attempt = attempts,
                retry_in_ms = delay.as_millis() as u64,
                err = %err,
                "handler failed; holding the offset and retrying"
            );
            if !self.sleep(delay).await {
                return Ok(Progress::Interrupted);
            }
        }
    }

    /// Calls the handler; on shutdown the call may finish within the grace
    /// period. `None`: it did not, and the entry stays unfinished.
    async fn call_handler(&self, item: &D::Item) -> Option<Result<(), HandlerError>> {
        let call = self.handler.handle(item);
        tokio::pin!(call);
        tokio::select! {
            biased;
            result = &mut call => Some(result),
            () = self.cancel.cancelled() => {
                let grace = self.config().shutdown_grace;
                match tokio::time::timeout(grace, &mut call).await {
                    Ok(result) => Some(result),
                    Err(_) => {
                        warn!(grace_ms = grace.as_millis() as u64, "handler did not finish within the shutdown grace period; its entry will be handled again");
                        None
                    }
                }
            }
        }
    }

    /// Copies `entry` to the dead-letter stream with the failure, then moves
    /// past it.
    async fn dead_letter(
        &mut self,
        entry: &StreamEntry,
        err: &HandlerError,
        attempts: u32,
    ) -> Result<Progress, ConsumerError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.config().dead_letter_stream).arg("*");
        for (name, value) in &entry.fields {
            cmd.arg(name.as_slice()).arg(value.as_slice());
        }
        cmd.arg("dead_letter_entry_id")
            .arg(entry.id.to_string())
            .arg("dead_letter_stream")
            .arg(&self.config().stream)
            .arg("dead_letter_error")
            .arg(err.to_string())
            .arg("dead_letter_attempts")
            .arg(attempts);
        let added = self
            .with_redis("add to the dead-letter stream", |mut conn| {
                let cmd = cmd.clone();
                async move { cmd.query_async::<Value>(&mut conn).await }
            })
            .await?;
        if added.is_none() {
            return Ok(Progress::Interrupted);
        }
        error!(
            stream_entry_id = %entry.id,
            dead_letter_stream = %self.config().dead_letter_stream,
            attempts,
            err = %err,
            "entry dead-lettered after repeated handler failures; moving past it"
        );
        self.stats().dead_lettered();
        self.finish(entry.id);
        Ok(Progress::Finished)
    }

    fn finish(&mut self, id: EntryId) {
        self.finished = id;
        self.dirty = true;
    }

    /// Saves the offset if it moved. A transient failure is left for the next
    /// checkpoint (a crash meanwhile only replays more).
    async fn checkpoint(&mut self) -> Result<(), ConsumerError> {
        if !self.dirty {
            return Ok(());
        }
        let offset = self.finished;
        match self
            .consumer
            .offsets
            .save(&self.consumer.config.label, offset)
            .await
        {
            Ok(()) => {
                self.saved = Some(offset);
                self.dirty = false;
                self.stats().offset_saved();
                debug!(offset = %offset, "offset saved");
                Ok(())
            }
            Err(err) if err.permanent => Err(ConsumerError::Store(err)),
            Err(err) => {
                self.note_fault(&Fault::Store(err));
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

    /// Runs `command` on the reading connection, reconnecting and backing off
    /// through transient faults. `None` when cancelled first.
    async fn with_redis<T, F, Fut>(
        &mut self,
        action: &'static str,
        mut command: F,
    ) -> Result<Option<T>, ConsumerError>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        loop {
            let result = match self.connection().await {
                Err(err) => Err(err),
                Ok(None) => return Ok(None),
                Ok(Some(conn)) => {
                    tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return Ok(None),
                        result = command(conn) => result,
                    }
                }
            };
            match result {
                Ok(value) => {
                    self.recovered();
                    return Ok(Some(value));
                }
                Err(err) => {
                    if let FaultClass::WrongType = classify(&err) {
                        return Err(ConsumerError::WrongType {
                            key: self.wrong_type_key(action),
                        });
                    }
                    if !self.fault(action, Fault::Redis(err)).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn wrong_type_key(&self, action: &str) -> String {
        if action.contains("dead-letter") {
            self.config().dead_letter_stream.clone()
        } else {
            self.config().stream.clone()
        }
    }

    /// The reading connection, connecting if needed. `Ok(None)` when
    /// cancelled first.
    async fn connection(&mut self) -> Result<Option<MultiplexedConnection>, RedisError> {
        if let Some(conn) = &self.conn {
            return Ok(Some(conn.clone()));
        }
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config().connect_timeout))
            .set_response_timeout(Some(self.config().read_response_timeout()));
        let connect = self
            .consumer
            .client
            .get_multiplexed_async_connection_with_config(&settings);
        let conn = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return Ok(None),
            conn = connect => conn?,
        };
        if self.outage.is_some() {
            self.stats().reconnect();
        }
        self.conn = Some(conn.clone());
        Ok(Some(conn))
    }

    /// Handles a fault: a permanent one ends the session with an error that
    /// says what to fix; a transient one drops the connection, is logged once
    /// per outage and waits out a back-off delay. Returns `false` when
    /// cancelled during the delay.
    async fn fault(&mut self, action: &'static str, fault: Fault) -> Result<bool, ConsumerError> {
        match &fault {
            Fault::Redis(err) => match classify(err) {
                FaultClass::Transient => {}
                FaultClass::Auth => {
                    let Fault::Redis(source) = fault else {
                        unreachable_fault()
                    };
                    return Err(ConsumerError::Auth { action, source });
                }
                FaultClass::WrongType | FaultClass::Permanent => {
                    let Fault::Redis(source) = fault else {
                        unreachable_fault()
                    };
                    return Err(ConsumerError::Redis { action, source });
                }
            },
            Fault::Store(err) if err.permanent => {
                let Fault::Store(err) = fault else {
                    unreachable_fault()
                };
                return Err(ConsumerError::Store(err));
            }
            Fault::Store(_) => {}
        }
        self.conn = None;
        self.note_fault(&fault);
        let delay = self.redis_backoff.next_delay();
        debug!(
            action,
            retry_in_ms = delay.as_millis() as u64,
            "retrying after a Redis fault"
        );
        Ok(self.sleep(delay).await)
    }

    /// Counts a transient fault and logs it if it starts an outage.
    fn note_fault(&mut self, fault: &Fault) {
        self.stats().redis_fault();
        let cause = match fault {
            Fault::Redis(err) => err.to_string(),
            Fault::Store(err) => err.to_string(),
        };
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

    /// Sleeps unless cancelled first; `false` when cancelled.
    async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// `fault` is matched twice (to classify, then to move its error out); the
/// second match cannot disagree with the first.
#[cold]
fn unreachable_fault() -> ! {
    unreachable!("fault variant changed between two matches of the same value")
}
