//! The consumer's per-entry CPU cost, without Redis: scanning an `XREAD`
//! reply of 1024 entries, and decoding each entry per the contract.

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lifecycle_domain::{decode_user_lifecycle_event, EntryId};
use lifecycle_streams::internals::{Batch, Parsed, XreadParser};

const ENTRIES: usize = 1024;

fn bulk(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", text.len()).as_bytes());
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// A reply shaped like a real backlog: five fields per entry.
fn reply() -> Vec<u8> {
    let mut out = b"*1\r\n*2\r\n".to_vec();
    bulk(&mut out, b"user:lifecycle_events");
    out.extend_from_slice(format!("*{ENTRIES}\r\n").as_bytes());
    for index in 0..ENTRIES {
        out.extend_from_slice(b"*2\r\n");
        bulk(&mut out, format!("1700000000{index:03}-{index}").as_bytes());
        out.extend_from_slice(b"*10\r\n");
        for field in [
            b"event_type".as_slice(),
            b"user.deleted",
            b"user_id",
            format!("user-{index}").as_bytes(),
            b"occurred_at_ms",
            b"1700000000123",
            b"source",
            b"user-service",
            b"trace_id",
            b"4bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            bulk(&mut out, field);
        }
    }
    out
}

fn parse_reply(bytes: &[u8]) -> Batch {
    let mut parser = XreadParser::new();
    match parser.parse(bytes).unwrap() {
        Parsed::Complete(len) => parser.take_batch(Bytes::copy_from_slice(&bytes[..len])),
        other => panic!("{other:?}"),
    }
}

fn read_path(c: &mut Criterion) {
    let bytes = reply();
    let mut group = c.benchmark_group("read_path");
    group.throughput(Throughput::Elements(ENTRIES as u64));
    group.bench_function("scan_xread_reply", |b| {
        b.iter(|| parse_reply(std::hint::black_box(&bytes)).len())
    });
    let batch = parse_reply(&bytes);
    group.bench_function("decode_entries", |b| {
        let mut fields = Vec::new();
        b.iter(|| {
            let mut known = 0;
            for view in batch.iter() {
                view.fields_into(&mut fields);
                if decode_user_lifecycle_event(view.id(), &fields).is_ok() {
                    known += 1;
                }
            }
            known
        })
    });
    group.finish();
    let fields: Vec<(&[u8], &[u8])> = vec![
        (b"event_type", b"user.deleted"),
        (b"user_id", b"  user-42 "),
        (b"occurred_at_ms", b"1700000000123"),
        (b"source", b"user-service"),
    ];
    c.bench_function("decode_one_event", |b| {
        b.iter_batched(
            || EntryId::new(1_700_000_000_000, 0),
            |id| decode_user_lifecycle_event(id, std::hint::black_box(&fields)),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, read_path);
criterion_main!(benches);
