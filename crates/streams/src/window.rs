//! Per-key queues: one key's entries run one at a time, in stream order.

use std::collections::{HashMap, VecDeque};

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_runs_one_job_at_a_time_in_order() {
        let mut queues = KeyQueues::new();
        assert_eq!(queues.offer("a", 1), Some(1));
        assert_eq!(queues.offer("b", 2), Some(2));
        assert_eq!(queues.offer("a", 3), None);
        assert_eq!(queues.offer("a", 4), None);
        assert_eq!(queues.release("a"), Some(3));
        assert_eq!(queues.release("b"), None);
        assert_eq!(queues.release("a"), Some(4));
        assert_eq!(queues.release("a"), None);
        assert_eq!(queues.offer("a", 5), Some(5));
    }
}
