//! An in-memory offset store, for unit tests of code that needs one.

use std::collections::HashMap;
use std::sync::Mutex;

use lifecycle_domain::{BoxFuture, EntryId, SaveOutcome, StoreError, StreamOffsetStore};

/// Offsets in a map; saves keep the larger id, like the Redis store.
#[derive(Debug, Default)]
pub struct MemoryOffsetStore {
    offsets: Mutex<HashMap<String, EntryId>>,
}

impl MemoryOffsetStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stored offset of `label`, read synchronously.
    pub fn get(&self, label: &str) -> Option<EntryId> {
        self.offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(label)
            .copied()
    }
}

impl StreamOffsetStore for MemoryOffsetStore {
    fn load<'a>(&'a self, label: &'a str) -> BoxFuture<'a, Result<Option<EntryId>, StoreError>> {
        let offset = self.get(label);
        Box::pin(async move { Ok(offset) })
    }

    fn save<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
        let mut offsets = self
            .offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = offsets.get(label).copied();
        let outcome = match (current, expected) {
            (current, Some(expected)) if current.is_none_or(|current| current < expected) => {
                SaveOutcome::Behind(current)
            }
            (Some(current), _) if current >= id => SaveOutcome::Kept(current),
            _ => {
                offsets.insert(label.to_owned(), id);
                SaveOutcome::Saved
            }
        };
        Box::pin(async move { Ok(outcome) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_never_move_backwards() {
        let store = MemoryOffsetStore::new();
        assert_eq!(store.load("a").await.ok().flatten(), None);
        let (ten, nine) = (EntryId::new(10, 0), EntryId::new(9, 5));
        assert_eq!(
            store.save("a", ten, None).await.ok(),
            Some(SaveOutcome::Saved)
        );
        assert_eq!(
            store.save("a", nine, None).await.ok(),
            Some(SaveOutcome::Kept(ten))
        );
        assert_eq!(store.get("a"), Some(ten));
        store.save("a", EntryId::new(10, 1), Some(ten)).await.ok();
        assert_eq!(store.get("a"), Some(EntryId::new(10, 1)));
        assert_eq!(store.get("b"), None);
    }

    #[tokio::test]
    async fn a_store_behind_what_the_saver_expects_is_not_written() {
        let store = MemoryOffsetStore::new();
        let (ten, twelve) = (EntryId::new(10, 0), EntryId::new(12, 0));
        assert_eq!(
            store.save("a", twelve, Some(ten)).await.ok(),
            Some(SaveOutcome::Behind(None))
        );
        store.save("a", EntryId::new(9, 0), None).await.ok();
        assert_eq!(
            store.save("a", twelve, Some(ten)).await.ok(),
            Some(SaveOutcome::Behind(Some(EntryId::new(9, 0))))
        );
        assert_eq!(store.get("a"), Some(EntryId::new(9, 0)));
    }
}
