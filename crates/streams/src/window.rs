//! Bookkeeping for handling entries concurrently without giving up the
//! guarantees: the saved offset is a low watermark, and one key's entries run
//! one at a time, in stream order.

use std::collections::{HashMap, VecDeque};

use lifecycle_domain::EntryId;

/// The entries read but not yet behind the offset, in stream order.
///
/// The watermark is the highest id such that it and every earlier entry are
/// finished: the only offset a crash can safely resume after.
#[derive(Debug, Default)]
pub struct Watermark {
    /// Unsettled entries in stream order, each with whether it finished.
    pending: VecDeque<(EntryId, bool)>,
}

impl Watermark {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries held (started, queued or finished out of order).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records an entry read from the stream; ids must arrive in increasing
    /// order (returns `false`, and records nothing, otherwise).
    pub fn push(&mut self, id: EntryId) -> bool {
        if self.pending.back().is_some_and(|(last, _)| *last >= id) {
            return false;
        }
        self.pending.push_back((id, false));
        true
    }

    /// Marks `id` finished; returns the new watermark when it moved.
    pub fn finish(&mut self, id: EntryId) -> Option<EntryId> {
        if let Ok(index) = self
            .pending
            .binary_search_by(|(pending, _)| pending.cmp(&id))
        {
            if let Some(slot) = self.pending.get_mut(index) {
                slot.1 = true;
            }
        }
        let mut moved = None;
        while let Some((front, true)) = self.pending.front().copied() {
            moved = Some(front);
            self.pending.pop_front();
        }
        moved
    }
}

/// Per-key queues: while a key has an entry running, its later entries wait
/// here, in stream order.
#[derive(Debug)]
pub struct KeyQueues<T> {
    busy: HashMap<String, VecDeque<T>>,
}

impl<T> Default for KeyQueues<T> {
    fn default() -> Self {
        Self {
            busy: HashMap::new(),
        }
    }
}

impl<T> KeyQueues<T> {
    /// No key busy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers `job` for `key`: returned to be started now when the key is
    /// idle (the key becomes busy), else queued behind the key's running job.
    pub fn offer(&mut self, key: &str, job: T) -> Option<T> {
        match self.busy.get_mut(key) {
            Some(queue) => {
                queue.push_back(job);
                None
            }
            None => {
                self.busy.insert(key.to_owned(), VecDeque::new());
                Some(job)
            }
        }
    }

    /// The running job of `key` ended: returns the key's next job to start,
    /// or marks the key idle.
    pub fn release(&mut self, key: &str) -> Option<T> {
        let next = self.busy.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.busy.remove(key);
        }
        next
    }

    /// Keys with a running job.
    pub fn busy_keys(&self) -> usize {
        self.busy.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u64) -> EntryId {
        EntryId::new(n, 0)
    }

    #[test]
    fn the_watermark_waits_for_the_oldest_unfinished_entry() {
        let mut window = Watermark::new();
        for n in 1..=5 {
            assert!(window.push(id(n)));
        }
        assert_eq!(window.finish(id(2)), None);
        assert_eq!(window.finish(id(3)), None);
        assert_eq!(window.finish(id(1)), Some(id(3)));
        assert_eq!(window.len(), 2);
        assert_eq!(window.finish(id(5)), None);
        assert_eq!(window.finish(id(4)), Some(id(5)));
        assert!(window.is_empty());
    }

    #[test]
    fn out_of_order_pushes_and_unknown_ids_are_refused() {
        let mut window = Watermark::new();
        assert!(window.push(id(5)));
        assert!(!window.push(id(5)));
        assert!(!window.push(id(4)));
        assert_eq!(window.finish(id(9)), None);
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn a_key_runs_one_job_at_a_time_in_order() {
        let mut queues = KeyQueues::new();
        assert_eq!(queues.offer("a", 1), Some(1));
        assert_eq!(queues.offer("b", 2), Some(2));
        assert_eq!(queues.offer("a", 3), None);
        assert_eq!(queues.offer("a", 4), None);
        assert_eq!(queues.busy_keys(), 2);
        assert_eq!(queues.release("a"), Some(3));
        assert_eq!(queues.release("b"), None);
        assert_eq!(queues.release("a"), Some(4));
        assert_eq!(queues.release("a"), None);
        assert_eq!(queues.busy_keys(), 0);
        assert_eq!(queues.offer("a", 5), Some(5));
    }

    proptest! {
        /// Finishing entries in any order, the watermark never passes an
        /// unfinished entry and ends at the last one.
        #[test]
        fn the_watermark_never_passes_an_unfinished_entry(order in Just((1..=40u64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut window = Watermark::new();
            for n in 1..=40 {
                window.push(id(n));
            }
            let mut finished = std::collections::BTreeSet::new();
            let mut watermark = None;
            for n in order {
                finished.insert(n);
                if let Some(moved) = window.finish(id(n)) {
                    prop_assert!(watermark < Some(moved));
                    watermark = Some(moved);
                }
                if let Some(mark) = watermark {
                    prop_assert!((1..=mark.ms).all(|k| finished.contains(&k)));
                }
            }
            prop_assert_eq!(watermark, Some(id(40)));
        }
    }
}
