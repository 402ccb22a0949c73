//! What the worker's writes to Redis came to, for readiness: Redis serves
//! reads while it refuses writes (`OOM`, `MISCONF`, ...), so only the writes
//! themselves tell. The offset store's decorator lives here; the handler's
//! records into the same type (see `handler_metrics`).

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use lifecycle_domain::{
    BoxFuture, EntryId, FenceToken, SaveOutcome, StoreError, StreamOffsetStore,
};
use lifecycle_streams::{now_ms, write_refusal};

/// The outcome of the last attempt at one kind of work that writes to
/// Redis (offset saves, cascades), for readiness: failing from a failed
/// attempt until one succeeds. Redis serves reads while it refuses writes
/// (`OOM`, `MISCONF`, ...), so only the writes themselves tell.
#[derive(Debug, Default)]
pub struct LastOutcome {
    /// When an attempt last succeeded (ms since the Unix epoch; 0: never).
    succeeded_ms: AtomicU64,
    /// When an attempt last failed (ms since the Unix epoch; 0: never).
    failed_ms: AtomicU64,
    /// Redis's code when the last failure was a refused write.
    refused: Mutex<Option<&'static str>>,
}

/// A failing [`LastOutcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failing {
    /// When the last attempt failed (ms since the Unix epoch).
    pub at_ms: u64,
    /// Redis's code when it refused the write (`OOM`, `MISCONF`, ...).
    pub refused: Option<&'static str>,
}

impl LastOutcome {
    /// Records a success now.
    pub fn succeeded(&self) {
        self.succeeded_at(now_ms());
    }

    /// Records `err` now.
    pub fn failed(&self, err: &(dyn Error + 'static)) {
        self.failed_at(now_ms(), err);
    }

    pub(crate) fn succeeded_at(&self, at_ms: u64) {
        self.succeeded_ms.store(at_ms, Ordering::Relaxed);
    }

    pub(crate) fn failed_at(&self, at_ms: u64, err: &(dyn Error + 'static)) {
        *self.refused.lock().unwrap_or_else(PoisonError::into_inner) = refusal_in(err);
        self.failed_ms.store(at_ms, Ordering::Relaxed);
    }

    /// When an attempt last succeeded (ms since the Unix epoch; 0: never).
    pub fn last_success_ms(&self) -> u64 {
        self.succeeded_ms.load(Ordering::Relaxed)
    }

    /// The last failure, while no attempt succeeded after it.
    pub fn failing(&self) -> Option<Failing> {
        let failed = self.failed_ms.load(Ordering::Relaxed);
        (failed > self.last_success_ms()).then(|| Failing {
            at_ms: failed,
            refused: *self.refused.lock().unwrap_or_else(PoisonError::into_inner),
        })
    }
}

/// The code of a write Redis refused, found anywhere in `err`'s causes (a
/// handler's error wraps the store's, which wraps the client's).
pub(crate) fn refusal_in(err: &(dyn Error + 'static)) -> Option<&'static str> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(code) = err
            .downcast_ref::<redis::RedisError>()
            .and_then(write_refusal)
        {
            return Some(code);
        }
        current = err.source();
    }
    None
}

/// An offset store that records the outcome of every save, for readiness:
/// Redis may refuse the saves (`OOM`, `MISCONF`) while it serves reads.
pub struct InstrumentedOffsets<S> {
    inner: S,
    saves: Arc<LastOutcome>,
}

impl<S> InstrumentedOffsets<S> {
    /// Wraps `inner`, recording its saves' outcomes into `saves`.
    pub fn new(inner: S, saves: Arc<LastOutcome>) -> Self {
        Self { inner, saves }
    }

    fn record(&self, result: &Result<SaveOutcome, StoreError>) {
        match result {
            Ok(_) => self.saves.succeeded(),
            Err(err) => self.saves.failed(err),
        }
    }
}

impl<S: StreamOffsetStore> StreamOffsetStore for InstrumentedOffsets<S> {
    fn load<'a>(&'a self, label: &'a str) -> BoxFuture<'a, Result<Option<EntryId>, StoreError>> {
        self.inner.load(label)
    }

    fn save<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
        Box::pin(async move {
            let result = self.inner.save(label, id, expected).await;
            self.record(&result);
            result
        })
    }

    fn save_fenced<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
        fence: FenceToken,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
        Box::pin(async move {
            let result = self.inner.save_fenced(label, id, expected, fence).await;
            self.record(&result);
            result
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refused() -> StoreError {
        StoreError {
            action: "apply the cascade of entry 1-0".to_owned(),
            permanent: false,
            source: Box::new(redis::make_extension_error(
                "OOM".to_owned(),
                Some("command not allowed when used memory > 'maxmemory'.".to_owned()),
            )),
        }
    }

    /// An offset store whose saves answer with the next of `outcomes`.
    struct ScriptedOffsets(std::sync::Mutex<Vec<Result<SaveOutcome, StoreError>>>);

    impl StreamOffsetStore for ScriptedOffsets {
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
            let next = self.0.lock().unwrap().remove(0);
            Box::pin(async move { next })
        }
    }

    #[tokio::test]
    async fn offset_saves_are_recorded() {
        let saves = Arc::new(LastOutcome::default());
        let offsets = InstrumentedOffsets::new(
            ScriptedOffsets(std::sync::Mutex::new(vec![
                Err(refused()),
                Ok(SaveOutcome::Saved),
            ])),
            Arc::clone(&saves),
        );
        assert_eq!(offsets.load("label").await.unwrap(), None);
        assert_eq!(saves.failing(), None, "a load is no save");
        assert!(offsets
            .save("label", EntryId::new(1, 0), None)
            .await
            .is_err());
        assert_eq!(saves.failing().unwrap().refused, Some("OOM"));
        offsets
            .save("label", EntryId::new(1, 0), None)
            .await
            .unwrap();
        assert_eq!(saves.failing(), None);
    }
}
