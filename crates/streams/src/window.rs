//! Per-key queues: one key's entries run one at a time, in stream order; and
//! the queue of jobs ready to start, oldest first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use lifecycle_domain::EntryId;

/// An ordering key, hashed once when its entry is decoded: the queues hold
/// eight bytes per key instead of a copy of the string.
///
/// Two keys that hash alike are ordered as one key: their entries run one at
/// a time, which is stricter than needed and never looser, so a collision
/// costs concurrency, never order. With a randomly keyed 64-bit hash, one is
/// as likely as not only among some four billion keys held at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct KeyHash(u64);

impl KeyHash {
    /// The hash of `key` under `state` (one per consumer session).
    pub(crate) fn of(state: &std::hash::RandomState, key: &str) -> Self {
        Self(state.hash_one(key))
    }

    /// A key given by its hash (tests).
    #[cfg(test)]
    pub(crate) fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

/// Hashes a [`KeyHash`] to itself: it is already a hash.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is reached (`KeyHash` derives `Hash` over one
        // u64); this folds anything else in rather than ignoring it.
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// Per-key queues: while a key has an entry running, its later entries wait
/// here, in stream order.
#[derive(Debug)]
pub(crate) struct KeyQueues<T> {
    busy: HashMap<KeyHash, VecDeque<T>, BuildHasherDefault<Prehashed>>,
}

impl<T> Default for KeyQueues<T> {
    fn default() -> Self {
        Self {
            busy: HashMap::default(),
        }
    }
}

impl<T> KeyQueues<T> {
    /// No key busy.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Offers `job` for `key`: returned to be started now when the key is
    /// idle (the key becomes busy), else queued behind the key's running job.
    pub(crate) fn offer(&mut self, key: KeyHash, job: T) -> Option<T> {
        match self.busy.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut queue) => {
                queue.get_mut().push_back(job);
                None
            }
            std::collections::hash_map::Entry::Vacant(idle) => {
                idle.insert(VecDeque::new());
                Some(job)
            }
        }
    }

    /// The running job of `key` ended: returns the key's next job to start,
    /// or marks the key idle.
    pub(crate) fn release(&mut self, key: KeyHash) -> Option<T> {
        let next = self.busy.get_mut(&key).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.busy.remove(&key);
        }
        next
    }
}

/// Jobs whose key is free, handed out oldest first.
///
/// Jobs arrive two ways: admitted from a read, always newer than every job
/// admitted before (ids grow along a stream), and released from a key's
/// queue when the job before them ended, older than some admitted ones. The
/// first kind keeps its order in a plain queue; only the second, rarer kind
/// pays for a sorted map.
#[derive(Debug)]
pub(crate) struct ReadyJobs<T> {
    admitted: VecDeque<(EntryId, T)>,
    released: BTreeMap<EntryId, T>,
}

impl<T> Default for ReadyJobs<T> {
    fn default() -> Self {
        Self {
            admitted: VecDeque::new(),
            released: BTreeMap::new(),
        }
    }
}

impl<T> ReadyJobs<T> {
    /// A job just read, newer than every job admitted before it.
    pub(crate) fn admit(&mut self, id: EntryId, job: T) {
        if self.admitted.back().is_some_and(|(last, _)| *last >= id) {
            // Not from a stream: keep the order all the same.
            self.released.insert(id, job);
        } else {
            self.admitted.push_back((id, job));
        }
    }

    /// A job released by its key's queue.
    pub(crate) fn release(&mut self, id: EntryId, job: T) {
        self.released.insert(id, job);
    }

    /// The oldest ready job.
    pub(crate) fn pop_oldest(&mut self) -> Option<T> {
        let admitted = self.admitted.front().map(|(id, _)| *id);
        let released = self.released.first_key_value().map(|(id, _)| *id);
        match (admitted, released) {
            (Some(admitted), Some(released)) if released < admitted => {
                self.released.pop_first().map(|(_, job)| job)
            }
            (Some(_), _) => self.admitted.pop_front().map(|(_, job)| job),
            (None, _) => self.released.pop_first().map(|(_, job)| job),
        }
    }

    /// Whether no job is ready.
    pub(crate) fn is_empty(&self) -> bool {
        self.admitted.is_empty() && self.released.is_empty()
    }

    /// Drops every ready job.
    pub(crate) fn clear(&mut self) {
        self.admitted.clear();
        self.released.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u64) -> KeyHash {
        KeyHash::from_raw(n)
    }

    #[test]
    fn the_oldest_ready_job_comes_first_whichever_way_it_became_ready() {
        let mut ready = ReadyJobs::default();
        ready.admit(EntryId::new(1, 0), "admitted 1");
        ready.release(EntryId::new(5, 0), "released 5");
        ready.admit(EntryId::new(7, 0), "admitted 7");
        ready.release(EntryId::new(3, 0), "released 3");
        let order: Vec<_> = std::iter::from_fn(|| ready.pop_oldest()).collect();
        assert_eq!(
            order,
            ["admitted 1", "released 3", "released 5", "admitted 7"]
        );
        assert!(ready.is_empty());
    }

    #[test]
    fn the_prehashed_hasher_folds_stray_bytes_in() {
        let mut hasher = Prehashed::default();
        hasher.write_u64(0xFF << 56);
        // Rotated, the high byte meets the written one: they cancel.
        hasher.write(&[0xFF]);
        assert_eq!(hasher.finish(), 0);
        hasher.write(&[0x12, 0x34]);
        assert_eq!(hasher.finish(), 0x1234);
    }

    #[test]
    fn a_key_runs_one_job_at_a_time_in_order() {
        let mut queues = KeyQueues::new();
        assert_eq!(queues.offer(key(1), 1), Some(1));
        assert_eq!(queues.offer(key(2), 2), Some(2));
        assert_eq!(queues.offer(key(1), 3), None);
        assert_eq!(queues.offer(key(1), 4), None);
        assert_eq!(queues.release(key(1)), Some(3));
        assert_eq!(queues.release(key(2)), None);
        assert_eq!(queues.release(key(1)), Some(4));
        assert_eq!(queues.release(key(1)), None);
        assert_eq!(queues.offer(key(1), 5), Some(5));
    }

    #[test]
    fn equal_strings_hash_alike_and_different_ones_apart() {
        let state = std::hash::RandomState::new();
        assert_eq!(KeyHash::of(&state, "u1"), KeyHash::of(&state, "u1"));
        assert_ne!(KeyHash::of(&state, "u1"), KeyHash::of(&state, "u2"));
    }

    #[test]
    fn the_prehashed_hasher_keeps_a_key_hash_as_it_is() {
        let build = BuildHasherDefault::<Prehashed>::default();
        assert_eq!(build.hash_one(key(42)), 42);
        let mut hasher = Prehashed::default();
        hasher.write(&[1, 2]);
        assert_eq!(hasher.finish(), 0x0102);
    }

    proptest! {
        /// Whatever the mix of admitted and released jobs, they come out
        /// oldest first.
        #[test]
        fn ready_jobs_come_out_oldest_first(
            steps in proptest::collection::vec((0u8..3, 0u64..1000), 0..200),
        ) {
            let mut ready = ReadyJobs::default();
            let mut model = std::collections::BTreeSet::new();
            let mut next_admitted = 1000u64;
            for (kind, n) in steps {
                match kind {
                    0 => {
                        next_admitted += n + 1;
                        ready.admit(EntryId::new(next_admitted, 0), next_admitted);
                        model.insert(next_admitted);
                    }
                    1 => {
                        if !model.contains(&n) {
                            ready.release(EntryId::new(n, 0), n);
                            model.insert(n);
                        }
                    }
                    _ => {
                        let expected = model.pop_first();
                        prop_assert_eq!(ready.pop_oldest(), expected);
                    }
                }
                prop_assert_eq!(ready.is_empty(), model.is_empty());
            }
            while let Some(expected) = model.pop_first() {
                prop_assert_eq!(ready.pop_oldest(), Some(expected));
            }
            prop_assert_eq!(ready.pop_oldest(), None);
            ready.admit(EntryId::new(5, 0), 5);
            ready.admit(EntryId::new(3, 0), 3);
            prop_assert_eq!(ready.pop_oldest(), Some(3));
            ready.clear();
            prop_assert!(ready.is_empty());
        }
    }
}
