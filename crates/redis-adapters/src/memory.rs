//! An in-memory offset store, for unit tests of code that needs one.

use std::collections::HashMap;
use std::sync::Mutex;

use lifecycle_domain::{BoxFuture, EntryId, StoreError, StreamOffsetStore};

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

    fn save<'a>(&'a self, label: &'a str, id: EntryId) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut offsets = self
            .offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = offsets.entry(label.to_owned()).or_insert(id);
        *slot = (*slot).max(id);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_never_move_backwards() {
        let store = MemoryOffsetStore::new();
        assert_eq!(store.load("a").await.ok().flatten(), None);
        store.save("a", EntryId::new(10, 0)).await.ok();
        store.save("a", EntryId::new(9, 5)).await.ok();
        assert_eq!(store.get("a"), Some(EntryId::new(10, 0)));
        store.save("a", EntryId::new(10, 1)).await.ok();
        assert_eq!(store.get("a"), Some(EntryId::new(10, 1)));
        assert_eq!(store.get("b"), None);
    }
}
