//! The decoder must not panic on any field map, and what it accepts must
//! satisfy the contract.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifecycle_domain::{decode_user_lifecycle_event, EntryId};

fuzz_target!(|input: (u64, u64, Vec<(Vec<u8>, Vec<u8>)>)| {
    let (ms, seq, fields) = input;
    if let Ok(event) = decode_user_lifecycle_event(EntryId::new(ms, seq), &fields) {
        assert!(event.occurred_at_ms > 0);
        assert!(!event.user_id.is_empty());
        assert_eq!(event.user_id.trim(), event.user_id);
        assert!(!event.event_type.as_str().trim().is_empty());
    }
});
