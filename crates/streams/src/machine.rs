//! The consumer's decisions, without I/O or a clock (the "sans-IO" core).
//!
//! [`Machine`] is told what happened (a batch arrived, a job finished, a read
//! or a save failed, shutdown began) and answers with [`Action`]s for the
//! driver to perform: read after an id, start a job, save an offset. It owns
//! every rule the guarantees rest on:
//!
//! - the saved offset is the low watermark: never past an unfinished entry;
//! - one ordering key (user) runs one job at a time, in stream order, and
//!   with `concurrency` 1 every job runs in stream order;
//! - the bytes of entries read but not finished stay under a cap: a read is
//!   asked for only while the cap leaves room for its whole reply, and
//!   reading pauses otherwise;
//! - after shutdown begins nothing new is read or started.
//!
//! Tests drive it step by step, and a property test over random
//! interleavings checks those invariants without Redis.

use std::collections::VecDeque;
use std::time::Duration;

use lifecycle_domain::EntryId;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::config::Checkpoint;
use crate::window::{KeyHash, KeyQueues, ReadyJobs};

/// What one held entry costs beyond its bytes: its job, its slot in the
/// window, its key and the allocator's rounding.
pub(crate) const ENTRY_OVERHEAD: usize = 256;
/// What a finished entry still costs until the watermark passes it.
const SLOT_BYTES: usize = 32;

/// The settings the decisions depend on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// Entries asked for per read, at most.
    pub batch_size: usize,
    /// Jobs running at once, at most.
    pub concurrency: usize,
    /// Bytes of held entries, at most (see the module doc).
    pub max_held_bytes: usize,
    /// Bytes one read's reply may hold once parsed.
    pub max_reply_bytes: usize,
    /// When offsets are saved.
    pub checkpoint: Checkpoint,
    /// Back-off between attempts after a read fault.
    pub redis_retry: BackoffPolicy,
    /// With [`Checkpoint::EveryBatch`], while caught up with the stream
    /// (the last read returned fewer entries than asked for), a due save
    /// waits for the driver's timer ([`Machine::save_wanted`]) rather than
    /// going out after every read: one save then covers what trickled in
    /// meanwhile.
    pub defer_saves_when_caught_up: bool,
}

/// A decoded entry for the handler, with the key it is ordered by.
#[derive(Debug)]
pub(crate) struct Job<T> {
    /// The entry's id.
    pub id: EntryId,
    /// The decoded item.
    pub item: T,
    /// Its ordering key.
    pub key: KeyHash,
}

/// One entry of a batch, as the driver decoded it.
#[derive(Debug)]
pub(crate) struct Arrival<T> {
    /// The entry's id.
    pub id: EntryId,
    /// Its job, boxed once so that only a pointer moves from here to the
    /// handler; `None` for an entry absorbed at once (malformed, unknown
    /// type, too large).
    pub job: Option<Box<Job<T>>>,
    /// What the entry costs while held (see [`entry_cost`]).
    pub cost: usize,
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Its handling finished (handled, or dead-lettered): the offset may move
    /// past it.
    Finished,
    /// Shutdown came first: the offset stays before it.
    Interrupted,
}

/// What the driver is to do next.
#[derive(Debug)]
pub(crate) enum Action<T> {
    /// Read up to `count` entries after `after`, holding at most `max_bytes`
    /// of reply.
    Read {
        /// The id to read after.
        after: EntryId,
        /// Entries to ask for.
        count: usize,
        /// Parsed bytes the reply may hold.
        max_bytes: usize,
        /// Whether the reader may send the read after this one before it is
        /// asked for: the held bytes leave room for two whole replies.
        read_ahead: bool,
    },
    /// Start the handler on this job.
    Start(Box<Job<T>>),
    /// Store this offset.
    Save(EntryId),
}

/// Where reading stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// No read in flight; one may be asked for.
    Idle,
    /// A read of this many entries is in flight.
    InFlight { count: usize },
    /// After a fault: waiting for the driver's retry timer.
    Waiting,
    /// Drain mode read its last entry, or shutdown began.
    Done,
}

/// Where a check of the store stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verifying {
    /// None asked for.
    No,
    /// Asked for: the next save issued is the check (one in flight when it
    /// was asked for is not).
    Asked,
    /// The save in flight is the check.
    InFlight,
}

/// One entry held in the window.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: EntryId,
    finished: bool,
    /// Bytes charged for it now.
    cost: usize,
}

/// The consumer's state: see the module doc.
#[derive(Debug)]
pub(crate) struct Machine<T> {
    settings: Settings,
    reading: Reading,
    /// The id after which the next read starts.
    read_after: EntryId,
    /// The current read count: the configured batch, lowered while entries
    /// are large.
    batch_size: usize,
    /// Drain mode's last entry.
    drain_target: Option<EntryId>,
    /// Entries read and not yet behind the watermark, in stream order.
    window: VecDeque<Slot>,
    /// The last id of each batch not yet wholly finished: with
    /// [`Checkpoint::EveryBatch`] the offset is saved when the watermark
    /// passes one.
    batch_ends: VecDeque<EntryId>,
    held_bytes: usize,
    /// Jobs whose key is free: the oldest starts first.
    ready: ReadyJobs<Box<Job<T>>>,
    /// Jobs waiting behind their key's running job.
    queues: KeyQueues<Box<Job<T>>>,
    running: usize,
    /// The watermark: every entry up to it is finished.
    finished: EntryId,
    /// The offset known to be stored.
    saved: Option<EntryId>,
    /// The start position must be stored although nothing moved.
    save_forced: bool,
    save_in_flight: Option<EntryId>,
    checkpoint_due: bool,
    /// A save is wanted, at the driver's timer (see
    /// [`Settings::defer_saves_when_caught_up`]).
    save_wanted: bool,
    /// The last read returned fewer entries than it asked for.
    caught_up: bool,
    stopping: bool,
    /// The store went behind this machine's saves: once nothing runs and no
    /// read is in flight, start over after the first id, with the second as
    /// what is stored.
    rewind_to: Option<(EntryId, Option<EntryId>)>,
    /// A save must answer before jobs start (see [`Machine::verify`]).
    verifying: Verifying,
    redis_backoff: Backoff,
    actions: VecDeque<Action<T>>,
}

/// What an entry of `bytes` (names and values) in `fields` field/value pairs
/// costs while held: its bytes, the scanner's record of each string, and the
/// per-entry overhead. The same measure bounds a reply (see
/// [`crate::resp::XreadParser::held_bytes`]), so a reply within its limit
/// never charges more than that limit plus the overhead of its entries.
pub(crate) fn entry_cost(bytes: usize, fields: usize) -> usize {
    bytes
        .saturating_add(fields.saturating_mul(2 * crate::resp::SPAN_BYTES))
        .saturating_add(ENTRY_OVERHEAD)
}

impl<T> Machine<T> {
    /// A machine that reads after `start`; `persist_start` when the position
    /// came from the start option and must be stored before the first read.
    pub(crate) fn new(
        settings: Settings,
        start: EntryId,
        saved: Option<EntryId>,
        persist_start: bool,
        drain_target: Option<EntryId>,
    ) -> Self {
        let settings = Settings {
            batch_size: settings.batch_size.max(1),
            concurrency: settings.concurrency.max(1),
            ..settings
        };
        let mut machine = Self {
            settings,
            reading: Reading::Idle,
            read_after: start,
            batch_size: settings.batch_size,
            drain_target,
            window: VecDeque::new(),
            batch_ends: VecDeque::new(),
            held_bytes: 0,
            ready: ReadyJobs::default(),
            queues: KeyQueues::new(),
            running: 0,
            finished: start,
            saved,
            save_forced: persist_start,
            save_in_flight: None,
            checkpoint_due: persist_start,
            save_wanted: false,
            caught_up: false,
            stopping: false,
            rewind_to: None,
            verifying: Verifying::No,
            redis_backoff: Backoff::new(settings.redis_retry),
            actions: VecDeque::new(),
        };
        if drain_target.is_some_and(|target| target <= start) {
            machine.reading = Reading::Done;
        }
        machine
    }

    /// The next thing to do, if any.
    pub(crate) fn poll_action(&mut self) -> Option<Action<T>> {
        if self.actions.is_empty() {
            self.decide();
        }
        self.actions.pop_front()
    }

    fn decide(&mut self) {
        if self.rewind_to.is_some() {
            return;
        }
        if self.checkpoint_due && self.save_in_flight.is_none() && self.dirty() {
            self.checkpoint_due = false;
            self.save_wanted = false;
            self.save_in_flight = Some(self.finished);
            if self.verifying == Verifying::Asked {
                self.verifying = Verifying::InFlight;
            }
            self.actions.push_back(Action::Save(self.finished));
        }
        if self.stopping {
            return;
        }
        // The read goes first: Redis prepares the next batch while this
        // one's jobs run.
        if self.reading == Reading::Idle {
            if let Some(count) = self.read_count() {
                self.reading = Reading::InFlight { count };
                self.actions.push_back(Action::Read {
                    after: self.read_after,
                    count,
                    max_bytes: self.settings.max_reply_bytes,
                    read_ahead: self.room_for_two_replies(count),
                });
            }
        }
        // No job starts while an offset save is in flight: what a crash
        // replays is then what the save covers and no more (one batch, or
        // with every-entry checkpoints the reference's nothing), at the cost
        // of one round trip per save.
        let saving = self.verifying != Verifying::No || self.save_in_flight.is_some();
        while self.running < self.settings.concurrency && !saving {
            let Some(job) = self.ready.pop_oldest() else {
                break;
            };
            self.running += 1;
            self.actions.push_back(Action::Start(job));
        }
    }

    /// How many entries the next read may ask for; `None` while the held
    /// bytes leave no room for a whole reply.
    ///
    /// Once reading paused, it resumes only when room for a good part of a
    /// batch has freed up (half of what an empty window affords, at most a
    /// batch): resuming at the first free entry would read, and save, one
    /// entry at a time for as long as the handler is the slower side.
    fn read_count(&self) -> Option<usize> {
        let free = self.settings.max_held_bytes.checked_sub(self.held_bytes)?;
        let for_overhead = free.checked_sub(self.settings.max_reply_bytes)?;
        let affordable = for_overhead / ENTRY_OVERHEAD;
        let when_empty = self
            .settings
            .max_held_bytes
            .saturating_sub(self.settings.max_reply_bytes)
            / ENTRY_OVERHEAD;
        let enough = self.batch_size.min(when_empty / 2).max(1);
        (affordable >= enough).then(|| affordable.min(self.batch_size))
    }

    /// Whether the held bytes leave room for two replies of `count` entries:
    /// the one asked for and one read ahead, which the reader holds until
    /// the next read takes or drops it.
    fn room_for_two_replies(&self, count: usize) -> bool {
        let two = self
            .settings
            .max_reply_bytes
            .saturating_add(count.saturating_mul(ENTRY_OVERHEAD))
            .saturating_mul(2);
        self.held_bytes.saturating_add(two) <= self.settings.max_held_bytes
    }

    /// Whether the watermark is ahead of what is stored.
    pub(crate) fn dirty(&self) -> bool {
        self.save_forced || self.finished > self.saved.unwrap_or(EntryId::ZERO)
    }

    /// A batch arrived for the read in flight: `arrivals` in stream order,
    /// `last_id` the last entry of the reply (`None`: it was empty),
    /// `reply_bytes` what the reply held once parsed.
    pub(crate) fn batch_received(
        &mut self,
        arrivals: Vec<Arrival<T>>,
        last_id: Option<EntryId>,
        reply_bytes: usize,
    ) {
        let requested = match self.reading {
            Reading::InFlight { count } => count,
            _ => 0,
        };
        self.redis_backoff.reset();
        self.reading = if self.stopping {
            Reading::Done
        } else {
            Reading::Idle
        };
        if self.rewind_to.is_some() {
            // A reply for the position given up: dropped.
            self.finish_rewind();
            return;
        }
        let Some(last) = last_id else {
            self.caught_up = true;
            if self.drain_target.is_some() {
                // Nothing after our position although the target lies
                // ahead: the rest was deleted. Done all the same.
                self.reading = Reading::Done;
            }
            self.checkpoint_due = true;
            return;
        };
        let received = arrivals.len();
        self.caught_up = received < requested;
        for arrival in arrivals {
            self.admit(arrival);
        }
        self.read_after = self.read_after.max(last);
        if self.drain_target.is_some_and(|target| last >= target) {
            self.reading = Reading::Done;
        }
        self.adapt_batch_size(received, requested, reply_bytes);
        if self.finished < last {
            self.batch_ends.push_back(last);
        } else {
            // Every entry of the batch was absorbed at once.
            self.checkpoint_due = true;
        }
    }

    /// Sizes the next read so that its reply stays near a quarter of the
    /// reply limit, judging by this one: a backlog of large entries is read a
    /// few at a time, small ones a full batch at a time; after it was
    /// lowered, the count doubles back one full reply at a time.
    fn adapt_batch_size(&mut self, received: usize, requested: usize, reply_bytes: usize) {
        let configured = self.settings.batch_size;
        let per_entry = (reply_bytes / received.max(1)).max(1);
        let fitting = (self.settings.max_reply_bytes / 4 / per_entry).clamp(1, configured);
        if fitting < self.batch_size {
            self.batch_size = fitting;
        } else if received >= requested && self.batch_size < configured {
            self.batch_size = self.batch_size.saturating_mul(2).min(fitting);
        }
    }

    fn admit(&mut self, arrival: Arrival<T>) {
        let Arrival { id, job, cost } = arrival;
        if self.window.back().is_some_and(|last| last.id >= id) || id <= self.finished {
            // Never from Redis: ids grow along a stream.
            return;
        }
        if self.drain_target.is_some_and(|target| id > target) {
            return;
        }
        match job {
            None => {
                self.window.push_back(Slot {
                    id,
                    finished: true,
                    cost: SLOT_BYTES,
                });
                self.held_bytes += SLOT_BYTES;
                self.advance();
            }
            Some(job) => {
                self.window.push_back(Slot {
                    id,
                    finished: false,
                    cost,
                });
                self.held_bytes += cost;
                if self.settings.concurrency == 1 {
                    // One job at a time, oldest first: every key is in
                    // order without its own queue.
                    self.ready.admit(id, job);
                } else if let Some(job) = self.queues.offer(job.key, job) {
                    self.ready.admit(id, job);
                }
            }
        }
    }

    /// A job ended.
    pub(crate) fn completed(&mut self, id: EntryId, key: KeyHash, completion: Completion) {
        self.running = self.running.saturating_sub(1);
        if self.rewind_to.is_some() {
            self.finish_rewind();
            return;
        }
        if completion == Completion::Interrupted {
            return;
        }
        let next = if self.settings.concurrency > 1 {
            self.queues.release(key)
        } else {
            None
        };
        if let Some(next) = next {
            if !self.stopping {
                self.ready.release(next.id, next);
            }
        }
        // Jobs mostly end oldest first: the front is the usual place.
        let index = if self.window.front().is_some_and(|slot| slot.id == id) {
            Ok(0)
        } else {
            self.window.binary_search_by(|slot| slot.id.cmp(&id))
        };
        if let Ok(index) = index {
            if let Some(slot) = self.window.get_mut(index) {
                if !slot.finished {
                    slot.finished = true;
                    self.held_bytes = self.held_bytes.saturating_sub(slot.cost) + SLOT_BYTES;
                    slot.cost = SLOT_BYTES;
                }
            }
        }
        self.advance();
        if self.running == 0 && self.ready.is_empty() {
            // Idle: save now (or at the driver's timer) rather than after
            // the next, possibly long, blocking read.
            self.want_save();
        }
    }

    /// A save is due: now, or while caught up at the driver's timer.
    fn want_save(&mut self) {
        // Only with nothing held: entries read ahead of their handling
        // (the stream's end reached while a backlog is handled) are saved
        // batch by batch, so that a crash replays at most one batch.
        let defer = self.settings.defer_saves_when_caught_up
            && self.settings.checkpoint == Checkpoint::EveryBatch
            && self.caught_up
            && self.window.is_empty()
            && self.reading != Reading::Done;
        if defer {
            self.save_wanted = true;
        } else {
            self.checkpoint_due = true;
        }
    }

    /// Whether a save waits for the driver's timer, which then calls
    /// [`Machine::checkpoint_now`].
    pub(crate) fn save_wanted(&self) -> bool {
        self.save_wanted && !self.checkpoint_due && self.dirty()
    }

    /// Moves the watermark past the finished entries at the window's front.
    fn advance(&mut self) {
        let mut moved = false;
        while let Some(front) = self.window.front().copied() {
            if !front.finished {
                break;
            }
            self.window.pop_front();
            self.held_bytes = self.held_bytes.saturating_sub(front.cost);
            self.finished = front.id;
            moved = true;
        }
        if !moved {
            return;
        }
        while self
            .batch_ends
            .front()
            .is_some_and(|end| *end <= self.finished)
        {
            self.batch_ends.pop_front();
            self.want_save();
        }
        if self.settings.checkpoint == Checkpoint::EveryEntry {
            self.checkpoint_due = true;
        }
    }

    /// The read in flight failed; returns how long to wait before
    /// [`Machine::retry_read`].
    pub(crate) fn read_failed(&mut self) -> Duration {
        self.reading = if self.stopping {
            Reading::Done
        } else {
            Reading::Waiting
        };
        self.finish_rewind();
        self.redis_backoff.next_delay()
    }

    /// The retry timer after a read fault fired.
    pub(crate) fn retry_read(&mut self) {
        if self.reading == Reading::Waiting {
            self.reading = Reading::Idle;
        }
    }

    /// Whether a read fault's retry timer should be running.
    pub(crate) fn waiting_to_retry(&self) -> bool {
        self.reading == Reading::Waiting
    }

    /// The reply of the read in flight outgrew its limit after `entries`
    /// complete entries. Reads fewer at a time; when one entry alone is too
    /// large, returns `true` if the driver should absorb it (see
    /// [`Machine::absorb_oversized`]).
    pub(crate) fn reply_too_large(&mut self, entries: usize) -> bool {
        let count = match self.reading {
            Reading::InFlight { count } => count,
            _ => self.batch_size,
        };
        self.reading = if self.stopping {
            Reading::Done
        } else {
            Reading::Idle
        };
        if self.rewind_to.is_some() {
            self.finish_rewind();
            return false;
        }
        if entries > 0 || count > 1 {
            self.batch_size = entries.clamp(1, (count / 2).max(1));
            return false;
        }
        self.batch_size = 1;
        true
    }

    /// Moves past an entry larger than any reply may be, without reading it.
    pub(crate) fn absorb_oversized(&mut self, id: EntryId) {
        self.admit(Arrival {
            id,
            job: None,
            cost: 0,
        });
        self.read_after = self.read_after.max(id);
        if self.drain_target.is_some_and(|target| id >= target) {
            self.reading = Reading::Done;
        }
        self.checkpoint_due = true;
    }

    /// The save of `offset` succeeded.
    pub(crate) fn saved(&mut self, offset: EntryId) {
        self.save_in_flight = None;
        match self.verifying {
            // A save issued before the check was asked for: the check is
            // still to be sent.
            Verifying::Asked => {}
            Verifying::InFlight => {
                self.verifying = Verifying::No;
                self.save_forced = false;
            }
            Verifying::No => self.save_forced = false,
        }
        self.saved = Some(self.saved.map_or(offset, |saved| saved.max(offset)));
    }

    /// The save in flight failed; it is tried again at the next checkpoint.
    pub(crate) fn save_failed(&mut self) {
        self.save_in_flight = None;
        if self.verifying == Verifying::InFlight {
            self.verifying = Verifying::Asked;
        }
    }

    /// The store holds `stored` (`None`: nothing), behind what this machine
    /// saved: it lost acknowledged writes (a crash without `appendfsync
    /// always`, a failover) or an operator rewound it. Nothing new starts;
    /// once the jobs running end and the read in flight returns, reading
    /// starts over after `to` and every entry after it is handled again
    /// (cascades are idempotent), so nothing whose effect the store lost
    /// is skipped.
    pub(crate) fn rewind(&mut self, to: EntryId, stored: Option<EntryId>) {
        self.save_in_flight = None;
        if self.stopping {
            return;
        }
        self.rewind_to = Some((to, stored));
        self.verifying = Verifying::No;
        self.ready.clear();
        self.queues = KeyQueues::new();
        self.checkpoint_due = false;
        self.finish_rewind();
    }

    /// Completes a rewind once nothing runs and no read is in flight.
    fn finish_rewind(&mut self) {
        let Some((to, stored)) = self.rewind_to else {
            return;
        };
        if self.running > 0 || matches!(self.reading, Reading::InFlight { .. }) {
            return;
        }
        self.rewind_to = None;
        self.window.clear();
        self.batch_ends.clear();
        self.held_bytes = 0;
        self.read_after = to;
        self.finished = to;
        self.saved = stored;
        self.save_forced = false;
        self.batch_size = self.settings.batch_size;
        if self.reading == Reading::Done {
            self.reading = if self.drain_target.is_some_and(|target| target <= to) {
                Reading::Done
            } else {
                Reading::Idle
            };
        }
    }

    /// Whether a rewind is waiting for jobs or a read to end.
    pub(crate) fn rewinding(&self) -> bool {
        self.rewind_to.is_some()
    }

    /// Asks the store to confirm what it holds (after a reconnect: Redis may
    /// have restarted and lost writes): a save of the watermark is due even
    /// if it did not move.
    ///
    /// Until a save answers, no job starts: one started on a Redis that
    /// lost an earlier entry's effect could apply a user's later entry
    /// before that earlier one is handled again.
    pub(crate) fn verify(&mut self) {
        if self.stopping || self.rewind_to.is_some() {
            return;
        }
        self.verifying = Verifying::Asked;
        self.save_forced = true;
        self.checkpoint_due = true;
    }

    /// Whether a save must answer before jobs start or retry.
    pub(crate) fn verifying(&self) -> bool {
        self.verifying != Verifying::No
    }

    /// Shutdown began: nothing new is read or started; jobs not yet started
    /// are dropped (their entries stay after the offset); the offset is due.
    pub(crate) fn stop(&mut self) {
        // Actions decided but not yet performed (the driver stops after a
        // read to let it go out first): starts are dropped like the ready
        // jobs, a read is not sent; a save already decided stays.
        let unstarted = self
            .actions
            .iter()
            .filter(|action| matches!(action, Action::Start(_)))
            .count();
        self.running = self.running.saturating_sub(unstarted);
        self.actions
            .retain(|action| matches!(action, Action::Save(_)));
        self.stopping = true;
        self.rewind_to = None;
        self.verifying = Verifying::No;
        self.batch_ends.clear();
        self.reading = Reading::Done;
        self.ready.clear();
        self.queues = KeyQueues::new();
        self.checkpoint_due = true;
    }

    /// Asks for a save of the watermark now if it moved (before idling).
    pub(crate) fn checkpoint_now(&mut self) {
        self.checkpoint_due = true;
        self.save_wanted = false;
    }

    /// Whether drain mode has handled every entry it will and nothing is
    /// left to save.
    pub(crate) fn drained(&self) -> bool {
        self.reading == Reading::Done
            && !self.stopping
            && self.rewind_to.is_none()
            && self.drain_target.is_some()
            && self.window.is_empty()
            && self.running == 0
            && self.save_in_flight.is_none()
            && !self.dirty()
    }

    /// The id the next read starts after.
    pub(crate) fn read_after(&self) -> EntryId {
        self.read_after
    }

    /// The watermark.
    pub(crate) fn finished(&self) -> EntryId {
        self.finished
    }

    /// How many entries a read asks for now (lowered after replies that
    /// were too large, doubling back as they allow).
    pub(crate) fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Starts reading `count` entries at a time (at most the configured
    /// batch): what an earlier session of the same consumer learned, so that
    /// a stream of huge entries is not asked for a whole batch again.
    pub(crate) fn start_with_batch_size(&mut self, count: usize) {
        self.batch_size = count.clamp(1, self.settings.batch_size.max(1));
    }

    /// The offset known to be stored.
    pub(crate) fn saved_offset(&self) -> Option<EntryId> {
        self.saved
    }

    /// Bytes charged for held entries now.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Entries held in the window.
    pub(crate) fn held_entries(&self) -> usize {
        self.window.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet, HashMap};

    fn id(n: u64) -> EntryId {
        EntryId::new(n, 0)
    }

    fn settings(concurrency: usize) -> Settings {
        Settings {
            batch_size: 4,
            concurrency,
            max_held_bytes: 64 * 1024,
            max_reply_bytes: 16 * 1024,
            checkpoint: Checkpoint::EveryBatch,
            redis_retry: BackoffPolicy::default(),
            defer_saves_when_caught_up: false,
        }
    }

    /// A key's hash, the same in every run (FNV-1a).
    fn key(name: &str) -> KeyHash {
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        KeyHash::from_raw(hash)
    }

    fn job(n: u64, name: &str) -> Arrival<u64> {
        Arrival {
            id: id(n),
            job: Some(Box::new(Job {
                id: id(n),
                item: n,
                key: key(name),
            })),
            cost: 1000,
        }
    }

    fn absorbed(n: u64) -> Arrival<u64> {
        Arrival {
            id: id(n),
            job: None,
            cost: 1000,
        }
    }

    fn drain(machine: &mut Machine<u64>) -> Vec<Action<u64>> {
        std::iter::from_fn(|| machine.poll_action()).collect()
    }

    fn started(actions: &[Action<u64>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Start(job) => Some(job.item),
                _ => None,
            })
            .collect()
    }

    fn saves(actions: &[Action<u64>]) -> Vec<EntryId> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Save(offset) => Some(*offset),
                _ => None,
            })
            .collect()
    }

    fn reads(actions: &[Action<u64>]) -> Vec<(EntryId, usize)> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Read { after, count, .. } => Some((*after, *count)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_first_action_is_a_read_after_the_start() {
        let mut machine = Machine::<u64>::new(settings(1), id(7), Some(id(7)), false, None);
        let actions = drain(&mut machine);
        assert_eq!(reads(&actions), vec![(id(7), 4)]);
        assert!(saves(&actions).is_empty());
        assert!(
            drain(&mut machine).is_empty(),
            "one read in flight at a time"
        );
    }

    #[test]
    fn a_start_position_from_the_start_option_is_saved_before_anything() {
        let mut machine = Machine::<u64>::new(settings(1), id(7), None, true, None);
        let actions = drain(&mut machine);
        assert!(matches!(actions.first(), Some(Action::Save(offset)) if *offset == id(7)));
    }

    #[test]
    fn concurrency_one_runs_every_job_in_stream_order_across_keys() {
        let mut machine = Machine::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "a"), job(3, "b")],
            Some(id(3)),
            100,
        );
        let actions = drain(&mut machine);
        assert_eq!(started(&actions), vec![1]);
        assert_eq!(
            reads(&actions),
            vec![(id(3), 4)],
            "the next read is pipelined"
        );
        machine.completed(id(1), key("a"), Completion::Finished);
        assert_eq!(started(&drain(&mut machine)), vec![2]);
        machine.completed(id(2), key("a"), Completion::Finished);
        assert_eq!(started(&drain(&mut machine)), vec![3]);
    }

    #[test]
    fn one_key_never_runs_twice_at_once_while_keys_overlap() {
        let mut machine = Machine::new(settings(8), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), job(3, "a")],
            Some(id(3)),
            100,
        );
        assert_eq!(started(&drain(&mut machine)), vec![1, 2]);
        machine.completed(id(2), key("b"), Completion::Finished);
        assert!(started(&drain(&mut machine)).is_empty());
        machine.completed(id(1), key("a"), Completion::Finished);
        assert_eq!(started(&drain(&mut machine)), vec![3]);
    }

    #[test]
    fn the_saved_offset_is_the_watermark_behind_an_unfinished_entry() {
        let mut machine = Machine::new(settings(8), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), absorbed(3)],
            Some(id(3)),
            100,
        );
        drain(&mut machine);
        machine.completed(id(2), key("b"), Completion::Finished);
        assert!(saves(&drain(&mut machine)).is_empty(), "1 holds the offset");
        machine.completed(id(1), key("a"), Completion::Finished);
        assert_eq!(saves(&drain(&mut machine)), vec![id(3)]);
    }

    #[test]
    fn one_save_at_a_time_and_a_failed_save_is_tried_again() {
        let mut machine = Machine::new(settings(8), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![absorbed(1)], Some(id(1)), 100);
        assert_eq!(saves(&drain(&mut machine)), vec![id(1)]);
        machine.batch_received(vec![absorbed(2)], Some(id(2)), 100);
        assert!(
            saves(&drain(&mut machine)).is_empty(),
            "a save is in flight"
        );
        machine.save_failed();
        machine.checkpoint_now();
        assert_eq!(saves(&drain(&mut machine)), vec![id(2)]);
        machine.saved(id(2));
        assert!(!machine.dirty());
    }

    #[test]
    fn every_batch_saves_once_the_batch_is_finished_or_the_machine_idles() {
        let mut machine = Machine::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), job(3, "c")],
            Some(id(3)),
            100,
        );
        drain(&mut machine);
        machine.completed(id(1), key("a"), Completion::Finished);
        assert!(
            saves(&drain(&mut machine)).is_empty(),
            "the batch is not finished"
        );
        machine.completed(id(2), key("b"), Completion::Finished);
        assert!(saves(&drain(&mut machine)).is_empty());
        machine.completed(id(3), key("c"), Completion::Finished);
        assert_eq!(saves(&drain(&mut machine)), vec![id(3)]);
        machine.saved(id(3));
        // Idle with a batch still open behind a failing entry: saved as far
        // as finished.
        let mut machine = Machine::new(settings(2), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "a"), absorbed(3)],
            Some(id(3)),
            100,
        );
        drain(&mut machine);
        machine.completed(id(1), key("a"), Completion::Finished);
        assert!(saves(&drain(&mut machine)).is_empty(), "2 is ready");
        machine.completed(id(2), key("a"), Completion::Finished);
        assert_eq!(saves(&drain(&mut machine)), vec![id(3)]);
    }

    #[test]
    fn caught_up_saves_wait_for_the_timer_and_a_backlog_saves_each_batch() {
        let mut config = settings(1);
        config.defer_saves_when_caught_up = true;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        drain(&mut machine);
        // A full batch (4 asked, 4 came): a backlog, saved at once.
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), job(3, "c"), job(4, "d")],
            Some(id(4)),
            100,
        );
        drain(&mut machine);
        for (n, name) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            machine.completed(id(n), key(name), Completion::Finished);
        }
        assert_eq!(saves(&drain(&mut machine)), vec![id(4)]);
        machine.saved(id(4));
        // Entries trickling in one at a time: no save per read...
        for n in 5..=7 {
            machine.batch_received(vec![job(n, "a")], Some(id(n)), 100);
            drain(&mut machine);
            machine.completed(id(n), key("a"), Completion::Finished);
            assert!(saves(&drain(&mut machine)).is_empty(), "{n}");
            assert!(machine.save_wanted());
        }
        // ...one when the driver's timer fires, covering them all.
        machine.checkpoint_now();
        assert!(!machine.save_wanted());
        assert_eq!(saves(&drain(&mut machine)), vec![id(7)]);
        machine.saved(id(7));
        assert!(!machine.save_wanted(), "nothing left to save");
        // Stopping saves at once.
        machine.batch_received(vec![job(8, "a")], Some(id(8)), 100);
        drain(&mut machine);
        machine.completed(id(8), key("a"), Completion::Finished);
        machine.stop();
        assert_eq!(saves(&drain(&mut machine)), vec![id(8)]);
    }

    #[test]
    fn a_backlog_read_to_the_end_ahead_of_its_handling_is_saved_batch_by_batch() {
        let mut config = settings(1);
        config.defer_saves_when_caught_up = true;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        drain(&mut machine);
        let four = |from: u64| (from..from + 4).map(|n| job(n, "a")).collect::<Vec<_>>();
        machine.batch_received(four(1), Some(id(4)), 100);
        drain(&mut machine);
        // The stream's end: a short read, while the first batch runs.
        machine.batch_received(vec![job(5, "a")], Some(id(5)), 100);
        drain(&mut machine);
        for n in 1..=4 {
            machine.completed(id(n), key("a"), Completion::Finished);
        }
        assert_eq!(
            saves(&drain(&mut machine)),
            vec![id(4)],
            "entries still held: saved at the batch's end"
        );
        machine.saved(id(4));
        machine.completed(id(5), key("a"), Completion::Finished);
        assert!(saves(&drain(&mut machine)).is_empty());
        assert!(machine.save_wanted(), "nothing held: the timer saves");
    }

    #[test]
    fn a_drain_saves_its_last_entries_at_once_even_when_caught_up() {
        let mut config = settings(1);
        config.defer_saves_when_caught_up = true;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, Some(id(2)));
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        drain(&mut machine);
        machine.completed(id(1), key("a"), Completion::Finished);
        machine.completed(id(2), key("b"), Completion::Finished);
        assert_eq!(saves(&drain(&mut machine)), vec![id(2)]);
        machine.saved(id(2));
        assert!(machine.drained());
    }

    #[test]
    fn every_entry_stores_an_offset_before_the_next_entry_starts() {
        let mut config = settings(1);
        config.checkpoint = Checkpoint::EveryEntry;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        assert_eq!(started(&drain(&mut machine)), vec![1]);
        machine.completed(id(1), key("a"), Completion::Finished);
        let actions = drain(&mut machine);
        assert_eq!(saves(&actions), vec![id(1)]);
        assert!(
            started(&actions).is_empty(),
            "2 started before 1 was stored"
        );
        machine.saved(id(1));
        assert_eq!(started(&drain(&mut machine)), vec![2]);
    }

    #[test]
    fn every_entry_checkpoints_each_move_of_the_watermark() {
        let mut config = settings(1);
        config.checkpoint = Checkpoint::EveryEntry;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        let actions = drain(&mut machine);
        assert!(saves(&actions).is_empty(), "nothing finished yet");
        machine.completed(id(1), key("a"), Completion::Finished);
        assert_eq!(saves(&drain(&mut machine)), vec![id(1)]);
    }

    #[test]
    fn reading_pauses_while_held_bytes_leave_no_room_for_a_reply() {
        let mut config = settings(1);
        config.max_held_bytes = config.max_reply_bytes + ENTRY_OVERHEAD * 3;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        let first = drain(&mut machine);
        assert_eq!(reads(&first), vec![(id(0), 3)], "the count fits the budget");
        let big = |n| Arrival {
            id: id(n),
            job: Some(Box::new(Job {
                id: id(n),
                item: n,
                key: key(&format!("k{n}")),
            })),
            cost: 2 * ENTRY_OVERHEAD,
        };
        machine.batch_received(vec![big(1)], Some(id(1)), 100);
        let actions = drain(&mut machine);
        assert_eq!(reads(&actions), vec![(id(1), 1)]);
        machine.batch_received(vec![big(2)], Some(id(2)), 100);
        let actions = drain(&mut machine);
        assert!(reads(&actions).is_empty(), "no room: reading pauses");
        assert!(machine.held_bytes() <= config.max_held_bytes);
        machine.completed(id(1), key("k1"), Completion::Finished);
        assert_eq!(reads(&drain(&mut machine)).len(), 1, "room again");
    }

    #[test]
    fn the_next_read_is_sent_ahead_only_while_two_replies_fit() {
        let mut config = settings(1);
        let reply = config.max_reply_bytes + 4 * ENTRY_OVERHEAD;
        config.max_held_bytes = 2 * reply + ENTRY_OVERHEAD;
        let read_ahead = |actions: &[Action<u64>]| -> Vec<bool> {
            actions
                .iter()
                .filter_map(|action| match action {
                    Action::Read { read_ahead, .. } => Some(*read_ahead),
                    _ => None,
                })
                .collect()
        };
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        assert_eq!(read_ahead(&drain(&mut machine)), vec![true]);
        let held = |n| Arrival {
            id: id(n),
            job: Some(Box::new(Job {
                id: id(n),
                item: n,
                key: key("k"),
            })),
            cost: 2 * ENTRY_OVERHEAD,
        };
        machine.batch_received(vec![held(1)], Some(id(1)), 100);
        let actions = drain(&mut machine);
        assert_eq!(reads(&actions), vec![(id(1), 4)], "one reply still fits");
        assert_eq!(read_ahead(&actions), vec![false], "two no longer do");
        machine.completed(id(1), key("k"), Completion::Finished);
        machine.batch_received(Vec::new(), None, 0);
        assert_eq!(read_ahead(&drain(&mut machine)), vec![true], "room again");
    }

    #[test]
    fn a_store_behind_the_saves_replays_from_it_once_running_jobs_end() {
        let mut machine = Machine::new(settings(2), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), job(3, "a")],
            Some(id(3)),
            100,
        );
        let actions = drain(&mut machine);
        assert_eq!(started(&actions), vec![1, 2]);
        assert_eq!(reads(&actions), vec![(id(3), 4)]);
        machine.completed(id(1), key("a"), Completion::Finished);
        machine.completed(id(2), key("b"), Completion::Finished);
        let actions = drain(&mut machine);
        assert_eq!(started(&actions), vec![3]);
        // The save of 2 finds the store emptied (Redis lost it).
        machine.rewind(id(0), None);
        assert!(machine.rewinding());
        assert!(
            drain(&mut machine).is_empty(),
            "nothing starts, reads or saves"
        );
        machine.batch_received(vec![job(4, "c")], Some(id(4)), 100);
        assert!(
            drain(&mut machine).is_empty(),
            "the reply for the old position is dropped"
        );
        machine.completed(id(3), key("a"), Completion::Finished);
        assert!(!machine.rewinding());
        assert_eq!(machine.finished(), id(0));
        assert_eq!(machine.saved_offset(), None);
        assert_eq!(
            reads(&drain(&mut machine)),
            vec![(id(0), 4)],
            "read again from the start"
        );
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        assert_eq!(started(&drain(&mut machine)), vec![1, 2], "handled again");
    }

    #[test]
    fn a_verify_saves_the_unmoved_watermark_and_holds_jobs_until_it_answers() {
        let mut machine = Machine::new(settings(2), id(5), Some(id(5)), false, None);
        drain(&mut machine);
        machine.verify();
        assert!(machine.verifying());
        machine.batch_received(vec![job(6, "a")], Some(id(6)), 100);
        let actions = drain(&mut machine);
        assert_eq!(saves(&actions), vec![id(5)]);
        assert!(
            started(&actions).is_empty(),
            "a job started before the store answered"
        );
        machine.save_failed();
        assert!(machine.verifying(), "a failed save does not verify");
        machine.checkpoint_now();
        assert_eq!(saves(&drain(&mut machine)), vec![id(5)]);
        machine.saved(id(5));
        assert!(!machine.verifying());
        assert!(!machine.dirty());
        assert_eq!(started(&drain(&mut machine)), vec![6]);
    }

    #[test]
    fn once_paused_reading_resumes_only_with_room_for_a_good_part_of_a_batch() {
        let mut config = settings(1);
        config.max_held_bytes = config.max_reply_bytes + ENTRY_OVERHEAD * 8;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        let entry = |n: u64| Arrival {
            id: id(n),
            job: Some(Box::new(Job {
                id: id(n),
                item: n,
                key: key("k"),
            })),
            cost: ENTRY_OVERHEAD,
        };
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 4)]);
        machine.batch_received((1..=4).map(entry).collect(), Some(id(4)), 100);
        assert_eq!(reads(&drain(&mut machine)), vec![(id(4), 4)]);
        machine.batch_received((5..=8).map(entry).collect(), Some(id(8)), 100);
        assert!(reads(&drain(&mut machine)).is_empty(), "the cap is reached");
        machine.completed(id(1), key("k"), Completion::Finished);
        assert!(
            reads(&drain(&mut machine)).is_empty(),
            "one entry's room is not worth a read"
        );
        for n in 2..=4 {
            machine.completed(id(n), key("k"), Completion::Finished);
        }
        assert_eq!(reads(&drain(&mut machine)), vec![(id(8), 4)]);
    }

    #[test]
    fn after_stop_nothing_is_read_or_started_and_the_offset_is_due() {
        let mut machine = Machine::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        drain(&mut machine);
        machine.stop();
        machine.completed(id(1), key("a"), Completion::Finished);
        let actions = drain(&mut machine);
        assert!(started(&actions).is_empty());
        assert!(reads(&actions).is_empty());
        assert_eq!(saves(&actions), vec![id(1)]);
    }

    #[test]
    fn a_stop_with_actions_still_undone_drops_them_and_saves() {
        let mut machine = Machine::new(settings(4), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        // The driver performs the read and the first start, and the stop
        // comes before it takes the second.
        assert!(matches!(machine.poll_action(), Some(Action::Read { .. })));
        assert!(matches!(machine.poll_action(), Some(Action::Start(job)) if job.item == 1));
        machine.completed(id(1), key("a"), Completion::Finished);
        machine.stop();
        let actions = drain(&mut machine);
        assert_eq!(saves(&actions), vec![id(1)], "the final save goes out");
        assert!(started(&actions).is_empty(), "nothing starts after stop");
        assert!(reads(&actions).is_empty());
    }

    #[test]
    fn an_interrupted_job_holds_the_offset() {
        let mut machine = Machine::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a")], Some(id(1)), 100);
        drain(&mut machine);
        machine.stop();
        machine.completed(id(1), key("a"), Completion::Interrupted);
        assert!(saves(&drain(&mut machine)).is_empty());
        assert_eq!(machine.finished(), id(0));
    }

    #[test]
    fn drain_ends_at_the_target_and_ignores_later_entries() {
        let mut machine = Machine::new(settings(2), id(0), Some(id(0)), false, Some(id(2)));
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), job(3, "c")],
            Some(id(3)),
            100,
        );
        let actions = drain(&mut machine);
        assert_eq!(started(&actions), vec![1, 2]);
        assert!(reads(&actions).is_empty(), "the target was read");
        machine.completed(id(1), key("a"), Completion::Finished);
        machine.completed(id(2), key("b"), Completion::Finished);
        let actions = drain(&mut machine);
        assert_eq!(saves(&actions), vec![id(2)]);
        assert!(!machine.drained(), "the save is in flight");
        machine.saved(id(2));
        assert!(machine.drained());
    }

    #[test]
    fn a_drain_with_nothing_to_do_is_done_at_once() {
        let machine = Machine::<u64>::new(settings(2), id(5), Some(id(5)), false, Some(id(5)));
        assert!(machine.drained());
    }

    #[test]
    fn a_read_fault_waits_for_the_retry_timer() {
        let mut machine = Machine::<u64>::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        let delay = machine.read_failed();
        assert!(delay <= BackoffPolicy::default().initial);
        assert!(machine.waiting_to_retry());
        assert!(reads(&drain(&mut machine)).is_empty());
        machine.retry_read();
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 4)]);
    }

    #[test]
    fn a_learned_read_size_carries_over_within_the_configured_batch() {
        let mut machine: Machine<()> = Machine::new(settings(8), id(0), Some(id(0)), false, None);
        machine.start_with_batch_size(3);
        assert_eq!(machine.batch_size(), 3);
        machine.start_with_batch_size(100);
        assert_eq!(machine.batch_size(), 4, "never above the configured batch");
        machine.start_with_batch_size(0);
        assert_eq!(machine.batch_size(), 1);
    }

    #[test]
    fn a_reply_too_large_reads_fewer_then_absorbs_a_lone_oversized_entry() {
        let mut machine = Machine::<u64>::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        assert!(!machine.reply_too_large(3));
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 2)]);
        assert!(!machine.reply_too_large(0));
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 1)]);
        assert!(machine.reply_too_large(0), "one entry alone is too large");
        machine.absorb_oversized(id(1));
        let actions = drain(&mut machine);
        assert_eq!(saves(&actions), vec![id(1)]);
        assert_eq!(reads(&actions), vec![(id(1), 1)]);
        machine.batch_received(vec![absorbed(2)], Some(id(2)), 100);
        assert_eq!(reads(&drain(&mut machine)), vec![(id(2), 2)], "grows back");
    }

    /// A batch of `from..=to`, every entry absorbed at once (so that none
    /// is held and reading goes on), in a reply of `bytes_each` per entry.
    fn absorbed_batch(machine: &mut Machine<u64>, from: u64, to: u64, bytes_each: usize) {
        let arrivals: Vec<_> = (from..=to).map(absorbed).collect();
        let bytes = arrivals.len() * bytes_each;
        machine.batch_received(arrivals, Some(id(to)), bytes);
    }

    #[test]
    fn a_backlog_of_large_entries_is_read_a_few_at_a_time_and_the_count_doubles_back() {
        let mut config = settings(1);
        config.batch_size = 16;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 16)]);
        // (first id, last id, bytes an entry, then the next read's size)
        let steps = [
            // 1000 bytes an entry: a quarter of the reply limit (4096) holds 4.
            (1, 16, 1000, 4),
            // Small entries, but a short reply: nothing says a larger read
            // would come back full.
            (17, 18, 100, 4),
            // Full replies of small entries: the count doubles, one reply at
            // a time, up to the configured batch.
            (19, 22, 100, 8),
            (23, 30, 100, 16),
            (31, 46, 100, 16),
            // Entries of 1500 bytes: 4096 / 1500 leaves room for 2.
            (47, 62, 1500, 2),
        ];
        for (from, to, bytes, next) in steps {
            absorbed_batch(&mut machine, from, to, bytes);
            assert_eq!(
                reads(&drain(&mut machine)),
                vec![(id(to), next)],
                "after {from}..={to} of {bytes} bytes"
            );
        }
    }

    #[test]
    fn an_entry_too_large_for_a_read_of_one_is_absorbed_though_the_batch_is_larger() {
        let mut config = settings(1);
        // Room for one reply of one entry: reads ask for 1 of the batch's 4.
        config.max_held_bytes = config.max_reply_bytes + ENTRY_OVERHEAD;
        let mut machine = Machine::<u64>::new(config, id(0), Some(id(0)), false, None);
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 1)]);
        assert_eq!(machine.batch_size(), 4);
        assert!(
            machine.reply_too_large(0),
            "the read of one entry was too large: that entry alone is"
        );
    }

    #[test]
    fn a_reply_too_large_with_entries_complete_reads_that_many_and_absorbs_nothing() {
        let mut config = settings(1);
        config.batch_size = 16;
        let mut machine = Machine::<u64>::new(config, id(0), Some(id(0)), false, None);
        drain(&mut machine);
        assert!(!machine.reply_too_large(5));
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 5)]);
        assert!(!machine.reply_too_large(4), "at most half the read");
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 2)]);
        assert!(!machine.reply_too_large(1));
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 1)]);
        // A read of one whose entry was complete: no entry to absorb.
        assert!(!machine.reply_too_large(1));
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 1)]);
    }

    #[test]
    fn an_oversized_entry_is_absorbed_and_a_drain_ends_when_it_is_the_target() {
        let mut machine = Machine::<u64>::new(settings(1), id(0), Some(id(0)), false, Some(id(1)));
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 4)]);
        assert!(
            !machine.reply_too_large(0),
            "no entry complete in a read of 4: read 1"
        );
        assert_eq!(reads(&drain(&mut machine)), vec![(id(0), 1)]);
        assert!(machine.reply_too_large(0));
        machine.absorb_oversized(id(1));
        assert_eq!(machine.read_after(), id(1));
        assert_eq!(machine.finished(), id(1));
        let actions = drain(&mut machine);
        assert_eq!(saves(&actions), vec![id(1)]);
        assert!(reads(&actions).is_empty(), "the target was reached");
        machine.saved(id(1));
        assert_eq!(machine.saved_offset(), Some(id(1)));
        assert!(machine.drained());
    }

    #[test]
    fn a_watermark_moved_within_a_batch_is_neither_saved_nor_left_to_the_timer() {
        let mut config = settings(1);
        config.defer_saves_when_caught_up = true;
        let mut machine = Machine::new(config, id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), job(3, "c")],
            Some(id(3)),
            100,
        );
        drain(&mut machine);
        machine.completed(id(1), key("a"), Completion::Finished);
        assert_eq!(machine.finished(), id(1));
        assert_eq!(machine.saved_offset(), Some(id(0)));
        assert!(machine.dirty());
        assert!(
            !machine.save_wanted(),
            "the batch is not finished: its end is saved, not each entry"
        );
        assert!(saves(&drain(&mut machine)).is_empty());
    }

    #[test]
    fn the_retry_timer_runs_only_between_a_read_fault_and_its_retry() {
        let mut machine = Machine::<u64>::new(settings(1), id(0), Some(id(0)), false, None);
        assert!(!machine.waiting_to_retry());
        drain(&mut machine);
        assert!(!machine.waiting_to_retry(), "a read in flight");
        machine.read_failed();
        assert!(machine.waiting_to_retry());
        machine.retry_read();
        assert!(!machine.waiting_to_retry());
        drain(&mut machine);
        machine.stop();
        machine.read_failed();
        assert!(!machine.waiting_to_retry(), "stopping: no retry");
    }

    #[test]
    fn a_failed_save_outside_a_verify_holds_jobs_back_no_longer() {
        let mut machine = Machine::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![absorbed(1)], Some(id(1)), 100);
        assert_eq!(saves(&drain(&mut machine)), vec![id(1)]);
        machine.batch_received(vec![job(2, "a")], Some(id(2)), 100);
        assert!(
            started(&drain(&mut machine)).is_empty(),
            "a save is in flight"
        );
        machine.save_failed();
        assert!(!machine.verifying());
        assert_eq!(started(&drain(&mut machine)), vec![2]);
    }

    #[test]
    fn a_drain_that_read_its_target_reads_again_after_a_rewind_behind_it() {
        let mut machine = Machine::new(settings(4), id(0), Some(id(0)), false, Some(id(2)));
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        let actions = drain(&mut machine);
        assert_eq!(started(&actions), vec![1, 2]);
        assert!(reads(&actions).is_empty(), "the target was read");
        machine.completed(id(1), key("a"), Completion::Finished);
        machine.completed(id(2), key("b"), Completion::Finished);
        assert_eq!(saves(&drain(&mut machine)), vec![id(2)]);
        // The save finds the store back at 0.
        machine.rewind(id(0), Some(id(0)));
        assert!(!machine.rewinding(), "nothing runs, no read in flight");
        assert_eq!(
            reads(&drain(&mut machine)),
            vec![(id(0), 4)],
            "the target lies ahead again"
        );
        machine.batch_received(vec![job(1, "a"), job(2, "b")], Some(id(2)), 100);
        let actions = drain(&mut machine);
        assert_eq!(started(&actions), vec![1, 2], "handled again");
        assert!(reads(&actions).is_empty());
        machine.completed(id(1), key("a"), Completion::Finished);
        machine.completed(id(2), key("b"), Completion::Finished);
        assert_eq!(saves(&drain(&mut machine)), vec![id(2)]);
        machine.saved(id(2));
        assert!(machine.drained());
    }

    #[test]
    fn a_verify_during_a_stop_or_a_rewind_asks_for_nothing() {
        let mut machine = Machine::<u64>::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.stop();
        machine.verify();
        assert!(!machine.verifying(), "stopping");
        // A rewind waiting for a job: it starts over from the store anyway.
        let mut machine = Machine::new(settings(1), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(vec![job(1, "a")], Some(id(1)), 100);
        assert_eq!(started(&drain(&mut machine)), vec![1]);
        machine.batch_received(Vec::new(), None, 0);
        machine.rewind(id(0), Some(id(0)));
        machine.verify();
        assert!(!machine.verifying(), "rewinding");
        machine.completed(id(1), key("a"), Completion::Finished);
        assert!(!machine.rewinding());
        let actions = drain(&mut machine);
        assert!(saves(&actions).is_empty());
        assert_eq!(reads(&actions), vec![(id(0), 4)]);
        machine.batch_received(vec![job(1, "a")], Some(id(1)), 100);
        assert_eq!(started(&drain(&mut machine)), vec![1], "jobs start again");
    }

    #[test]
    fn only_a_drain_is_ever_drained() {
        let mut machine = Machine::<u64>::new(settings(1), id(0), Some(id(0)), false, None);
        assert!(!machine.dirty());
        assert!(!machine.drained());
        drain(&mut machine);
        machine.batch_received(Vec::new(), None, 0);
        assert!(!machine.drained(), "caught up is not drained");
    }

    #[test]
    fn held_bytes_charge_unfinished_entries_and_a_slot_for_finished_ones() {
        let mut machine = Machine::new(settings(2), id(0), Some(id(0)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(1, "a"), job(2, "b"), absorbed(3)],
            Some(id(3)),
            100,
        );
        assert_eq!(machine.read_after(), id(3));
        assert_eq!(machine.held_entries(), 3);
        assert_eq!(machine.held_bytes(), 2 * 1000 + SLOT_BYTES);
        drain(&mut machine);
        machine.completed(id(2), key("b"), Completion::Finished);
        assert_eq!(machine.held_entries(), 3, "1 holds the watermark");
        assert_eq!(machine.held_bytes(), 1000 + 2 * SLOT_BYTES);
        machine.completed(id(1), key("a"), Completion::Finished);
        assert_eq!(machine.held_entries(), 0);
        assert_eq!(machine.held_bytes(), 0);
        assert_eq!(machine.finished(), id(3));
    }

    #[test]
    fn an_entry_behind_the_watermark_or_repeated_is_not_handled_again() {
        let mut machine = Machine::new(settings(1), id(5), Some(id(5)), false, None);
        drain(&mut machine);
        machine.batch_received(
            vec![job(3, "a"), job(5, "b"), job(6, "c"), job(6, "c")],
            Some(id(6)),
            100,
        );
        assert_eq!(machine.held_entries(), 1);
        assert_eq!(started(&drain(&mut machine)), vec![6]);
        machine.completed(id(6), key("c"), Completion::Finished);
        assert!(started(&drain(&mut machine)).is_empty());
        assert_eq!(machine.finished(), id(6));
    }

    /// One step of a random interleaving.
    #[derive(Clone, Debug)]
    enum Step {
        /// The read in flight returns this many entries (keys drawn from a
        /// few users, every third entry absorbed).
        Arrive(usize, u64),
        /// The n-th running job finishes (or fails for good and is
        /// dead-lettered: the same to the machine).
        Complete(usize),
        /// The read in flight fails.
        ReadFault,
        /// The save in flight succeeds or fails.
        SaveDone(bool),
        /// The process stops; a new machine resumes from what was saved.
        Restart,
        /// The store crashes and comes back without the effects of
        /// everything after the offset it kept (perhaps its last one, perhaps
        /// an earlier one), as Redis does after losing acknowledged writes;
        /// the driver asks the machine to verify.
        StoreLost(usize),
        /// The driver's timer for a deferred save fires.
        SaveTimer,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0usize..6, any::<u64>()).prop_map(|(n, seed)| Step::Arrive(n, seed)),
            4 => (0usize..16).prop_map(Step::Complete),
            1 => Just(Step::ReadFault),
            2 => any::<bool>().prop_map(Step::SaveDone),
            1 => Just(Step::Restart),
            1 => (0usize..8).prop_map(Step::StoreLost),
            1 => Just(Step::SaveTimer),
        ]
    }

    /// A stream, the store, and machines that come and go.
    struct World {
        config: Settings,
        machine: Machine<u64>,
        /// Every entry of the stream: id -> key.
        stream: BTreeMap<u64, String>,
        stored: Option<EntryId>,
        /// Entries whose handling finished (handled at least once).
        done: BTreeSet<u64>,
        running: Vec<(u64, KeyHash)>,
        /// The save in flight and what the machine expected to be stored.
        save_in_flight: Option<(EntryId, Option<EntryId>)>,
        /// Every offset the store held, oldest first.
        history: Vec<Option<EntryId>>,
        /// The store lost writes the machine has not been told of yet.
        lost: bool,
        /// The store's identity, changed by each loss (Redis's `run_id`),
        /// and the one the store adapter last saw for this machine.
        epoch: u64,
        seen_epoch: u64,
        read_in_flight: Option<(EntryId, usize)>,
        /// Per key, the ids started by the current machine, in order.
        starts: HashMap<KeyHash, Vec<u64>>,
        /// The last id started by the current machine.
        last_start: Option<u64>,
    }

    impl World {
        fn new(config: Settings) -> Self {
            Self {
                config,
                machine: Machine::new(config, EntryId::ZERO, None, false, None),
                stream: BTreeMap::new(),
                stored: None,
                done: BTreeSet::new(),
                running: Vec::new(),
                save_in_flight: None,
                history: vec![None],
                lost: false,
                epoch: 0,
                seen_epoch: 0,
                read_in_flight: None,
                starts: HashMap::new(),
                last_start: None,
            }
        }

        fn perform(&mut self) -> Result<(), TestCaseError> {
            while let Some(action) = self.machine.poll_action() {
                match action {
                    Action::Read {
                        after,
                        count,
                        read_ahead,
                        ..
                    } => {
                        prop_assert!(self.read_in_flight.is_none());
                        // The replies this read may bring (its own, and
                        // one read ahead) fit beside what is held.
                        let replies = if read_ahead { 2 } else { 1 };
                        let reserved =
                            replies * (self.config.max_reply_bytes + count * ENTRY_OVERHEAD);
                        prop_assert!(
                            self.machine.held_bytes() + reserved <= self.config.max_held_bytes
                        );
                        self.read_in_flight = Some((after, count));
                    }
                    Action::Start(job) => {
                        prop_assert!(
                            !self.running.iter().any(|(_, key)| *key == job.key),
                            "key {:?} ran twice at once",
                            job.key
                        );
                        let order = self.starts.entry(job.key).or_default();
                        if let Some(previous) = order.last() {
                            prop_assert!(*previous < job.item, "key {:?} out of order", job.key);
                        }
                        order.push(job.item);
                        if self.config.concurrency == 1 {
                            prop_assert!(self.last_start.is_none_or(|last| last < job.item));
                            self.last_start = Some(job.item);
                        }
                        // A restarted machine starts after the stored offset.
                        prop_assert!(self.stored.is_none_or(|stored| job.id > stored));
                        self.running.push((job.item, job.key));
                    }
                    Action::Save(offset) => {
                        prop_assert!(self.save_in_flight.is_none());
                        self.save_in_flight = Some((offset, self.machine.saved_offset()));
                    }
                }
                prop_assert!(self.running.len() <= self.config.concurrency);
                prop_assert!(self.machine.held_bytes() <= self.config.max_held_bytes);
            }
            Ok(())
        }

        fn apply(&mut self, step: Step) -> Result<(), TestCaseError> {
            match step {
                Step::Arrive(n, seed) => {
                    if let Some((after, count)) = self.read_in_flight.take() {
                        // New entries reach the stream, then the read
                        // returns what follows `after`.
                        let next = self.stream.keys().last().copied().unwrap_or(0);
                        for k in 1..=n as u64 {
                            let key = format!("u{}", (seed.wrapping_add(k * 7)) % 4);
                            self.stream.insert(next + k, key);
                        }
                        let batch: Vec<_> = self
                            .stream
                            .range(after.ms + 1..)
                            .take(count)
                            .map(|(n, key)| (*n, key.clone()))
                            .collect();
                        let last = batch.last().map(|(n, _)| id(*n));
                        // Each entry may cost up to the reply's share.
                        let cost = self.config.max_reply_bytes / count.max(1) + ENTRY_OVERHEAD;
                        let arrivals = batch
                            .into_iter()
                            .map(|(n, name): (u64, String)| {
                                if n % 3 == 0 {
                                    self.done.insert(n);
                                    Arrival {
                                        id: id(n),
                                        job: None,
                                        cost,
                                    }
                                } else {
                                    Arrival {
                                        id: id(n),
                                        job: Some(Box::new(Job {
                                            id: id(n),
                                            item: n,
                                            key: key(&name),
                                        })),
                                        cost,
                                    }
                                }
                            })
                            .collect();
                        self.machine.batch_received(arrivals, last, 100);
                    }
                }
                Step::Complete(index) => {
                    if !self.running.is_empty() {
                        let (n, key) = self.running.remove(index % self.running.len());
                        self.done.insert(n);
                        self.machine.completed(id(n), key, Completion::Finished);
                    }
                }
                Step::ReadFault => {
                    if self.read_in_flight.take().is_some() {
                        self.machine.read_failed();
                        self.machine.retry_read();
                    }
                }
                Step::SaveDone(ok) => {
                    if let Some((offset, expected)) = self.save_in_flight.take() {
                        let behind = self.epoch != self.seen_epoch
                            || expected
                                .is_some_and(|expected| self.stored.is_none_or(|s| s < expected));
                        if ok {
                            self.seen_epoch = self.epoch;
                        }
                        if !ok {
                            self.machine.save_failed();
                        } else if behind {
                            self.lost = false;
                            self.starts.clear();
                            self.last_start = None;
                            let to = self.stored.unwrap_or(EntryId::ZERO);
                            self.machine.rewind(to, self.stored);
                        } else {
                            self.stored = Some(self.stored.map_or(offset, |s| s.max(offset)));
                            self.history.push(self.stored);
                            self.machine.saved(offset);
                        }
                    }
                }
                Step::StoreLost(back) => {
                    // The offset saves survive up to `back % 3` from the
                    // last (0: all of them, as is usual with `everysec`);
                    // every effect after the surviving offset is gone.
                    let keep = self.history.len().saturating_sub(back % 3).max(1);
                    self.history.truncate(keep);
                    let survived = self.history.last().copied().flatten();
                    self.stored = survived;
                    self.done.retain(|n| survived.is_some_and(|s| id(*n) <= s));
                    self.lost = true;
                    self.epoch += 1;
                    self.machine.verify();
                }
                Step::SaveTimer => {
                    if self.machine.save_wanted() {
                        self.machine.checkpoint_now();
                    }
                }
                Step::Restart => {
                    self.machine.stop();
                    for (n, key) in std::mem::take(&mut self.running) {
                        self.machine.completed(id(n), key, Completion::Interrupted);
                    }
                    self.read_in_flight = None;
                    self.save_in_flight = None;
                    self.starts.clear();
                    self.last_start = None;
                    self.lost = false;
                    self.seen_epoch = self.epoch;
                    let start = self.stored.unwrap_or(EntryId::ZERO);
                    self.machine = Machine::new(self.config, start, self.stored, false, None);
                }
            }
            self.check_offset()
        }

        fn check_offset(&self) -> Result<(), TestCaseError> {
            let watermark = self.machine.finished();
            // Until the machine learns of a store's loss its watermark is
            // ahead of what the store kept; what it may save is checked below.
            if !self.lost && !self.machine.rewinding() {
                for n in self.stream.keys().copied().filter(|n| id(*n) <= watermark) {
                    prop_assert!(
                        self.done.contains(&n),
                        "the watermark passed unfinished {n}"
                    );
                }
            }
            if let Some(stored) = self.stored {
                for n in self.stream.keys().copied().filter(|n| id(*n) <= stored) {
                    prop_assert!(self.done.contains(&n), "the offset passed unfinished {n}");
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the interleaving of arrivals, completions, faults, saves,
        /// restarts and a store losing acknowledged writes: the saved offset
        /// never passes an unfinished entry,
        /// one key never runs twice at once and its entries start in stream
        /// order, and the held bytes stay under the cap.
        #[test]
        fn the_guarantees_hold_over_random_interleavings(
            concurrency in 1usize..6,
            roomy in any::<bool>(),
            defer in any::<bool>(),
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let mut config = settings(concurrency);
            config.defer_saves_when_caught_up = defer;
            // Tight: reading pauses often; roomy: reads go ahead at times.
            let replies = if roomy { 2 } else { 1 };
            config.max_held_bytes =
                replies * (config.max_reply_bytes + 4 * ENTRY_OVERHEAD) + 8 * ENTRY_OVERHEAD;
            let mut world = World::new(config);
            world.perform()?;
            for step in steps {
                world.apply(step)?;
                world.perform()?;
            }
        }
    }
}
