//! The XREAD reply scanner must not panic on any bytes from the socket, fed
//! whole or in two parts, and every entry it returns must be readable.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lifecycle_streams::internals::{Parsed, XreadParser};

fuzz_target!(|input: (u16, Vec<u8>)| {
    let (cut, bytes) = input;
    let mut parser = XreadParser::new();
    let cut = usize::from(cut).min(bytes.len());
    if let (Ok(Parsed::Incomplete), Some(head)) = (parser.parse(&bytes[..cut]), bytes.get(..cut)) {
        let _ = head;
    }
    if let Ok(Parsed::Complete(len)) = parser.parse(&bytes) {
        let batch = parser.take_batch(Bytes::copy_from_slice(&bytes[..len]));
        let mut fields = Vec::new();
        for view in batch.iter() {
            view.fields_into(&mut fields);
            let _ = lifecycle_domain::decode_user_lifecycle_event(view.id(), &fields);
        }
    }
});
