//! What the worker costs Redis, counted by Redis itself (`INFO
//! commandstats`): the commands it sends per event.

mod common;

use std::collections::HashMap;

use common::{assert_success, connect, deletion, info, pipelined, stored_offset, worker};
use lifecycle_test_support::RedisServer;

/// Calls of each command Redis ran so far, scripts' own calls included
/// under their names (`cmdstat_get` counts a script's `GET` too).
fn calls(conn: &mut redis::Connection) -> HashMap<String, u64> {
    info(conn, "commandstats")
        .into_iter()
        .filter_map(|(name, stats)| {
            let name = name.strip_prefix("cmdstat_")?.to_owned();
            let calls = stats
                .split(',')
                .find_map(|stat| stat.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name, calls))
        })
        .collect()
}

fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

/// The reference's mode, `--batch-size 1 --checkpoint every-entry
/// --concurrency 1`: per entry one `XREAD` and one offset save (a script),
/// besides the handler's own cascade (a script), nothing else; the start-up
/// (loading the offset, finding the stream's last entry) and the deletion
/// probe (once per 1024 entries or per second) are a handful in all.
#[test]
fn the_reference_mode_sends_a_read_and_a_save_per_entry() {
    const ENTRIES: u64 = 400;
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    pipelined::<String>(
        &mut conn,
        (0..ENTRIES).map(|user| deletion(&format!("u{user}"), 1_700_000_000_000)),
    );
    let before = calls(&mut conn);
    let output = worker(
        &url,
        &[
            "run",
            "--drain",
            "--metrics-addr",
            "off",
            "--batch-size",
            "1",
            "--checkpoint",
            "every-entry",
            "--concurrency",
            "1",
        ],
    );
    assert_success(&output);
    let after = calls(&mut conn);
    assert!(stored_offset(&mut conn).is_some());

    let reads = delta(&before, &after, "xread");
    let scripts = delta(&before, &after, "evalsha") + delta(&before, &after, "eval");
    let sent: u64 = ["xread", "evalsha", "eval"]
        .iter()
        .map(|name| delta(&before, &after, name))
        .sum();
    println!(
        "{ENTRIES} entries: {reads} XREAD, {scripts} scripts, {:.3} commands per entry",
        sent as f64 / ENTRIES as f64
    );
    // One read per entry, and at most one more: the read sent ahead after
    // the last entry.
    assert!(
        (ENTRIES..=ENTRIES + 1).contains(&reads),
        "{reads} reads for {ENTRIES} entries"
    );
    // One save and one cascade per entry, plus a fixed few: the start-up's
    // load and last-entry lookup, the first read's deletion probe, and on a
    // fresh server each script's first call (an EVALSHA refused with
    // NOSCRIPT, then the EVAL); the lease's acquisition and release, and a
    // renewal or two.
    assert!(
        (2 * ENTRIES..=2 * ENTRIES + 14).contains(&scripts),
        "{scripts} scripts for {ENTRIES} entries"
    );
}
