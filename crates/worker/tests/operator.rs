//! The operator's surface of the binary: one configuration for every
//! command, the consumer label, the offset past the stream's end, the
//! periodic summary and the progress bar, completions, the man page and the
//! exit statuses, driven through the real binary against private
//! redis-servers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    add_event, assert_success, status_json, stderr, stdout, wait_for, worker, Running, BIN, STREAM,
};
use lifecycle_test_support::RedisServer;
use serde_json::Value;

const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn run_keeps_the_offset_of_its_own_label() {
    let server = RedisServer::start();
    let url = server.url();
    let last = add_event(&server, "user.deleted", "u-1", "1700000000000");
    let output = worker(&url, &["run", "--drain", "--label", "second"]);
    assert_success(&output);
    assert_eq!(server.cli(&["GET", "lobby:stream_offsets:second"]), last);
    assert_eq!(
        server.cli(&["EXISTS", OFFSET_KEY]),
        "0",
        "the default label untouched"
    );
    // From the environment, and read back by `status` and `offsets` the same way.
    let output = Command::new(BIN)
        .args(["run", "--drain"])
        .env("REDIS_URL", &url)
        .env("LOBBY_LABEL", "third")
        .env_remove("LOBBY_METRICS_ADDR")
        .output()
        .unwrap();
    assert_success(&output);
    assert_eq!(server.cli(&["GET", "lobby:stream_offsets:third"]), last);
    assert_eq!(
        status_json(&url, &["--label", "third"])["offset"],
        last.as_str()
    );
    let output = worker(&url, &["offsets", "--label", "second", "get"]);
    assert_eq!(stdout(&output).trim(), last);
    let output = worker(&url, &["run", "--drain", "--label", " "]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[test]
fn every_command_takes_the_configuration_file() {
    let server = RedisServer::start();
    let url = server.url();
    // A file with run-only settings too: the other commands leave them.
    let file = config_file(&format!(
        "redis_url = \"{url}\"\nstream = \"mine:events\"\nkey_prefix = \"mine\"\nlabel = \"gm\"\nbatch_size = 64\nconcurrency = 4\n"
    ));
    let path = file.path().to_str().unwrap();
    let command = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--config", path])
            // The file names the Redis: no environment to fall back on.
            .env_remove("REDIS_URL")
            .env_remove("LOBBY_METRICS_ADDR")
            .output()
            .unwrap()
    };
    let output = command(&[
        "publish",
        "--event-type",
        "user.deleted",
        "--user-id",
        "u-7",
    ]);
    assert_success(&output);
    let id = stdout(&output).trim().to_owned();
    assert_eq!(server.cli(&["XLEN", "mine:events"]), "1");
    assert_eq!(server.cli(&["EXISTS", STREAM]), "0");

    let output = command(&["tail", "--json"]);
    assert_success(&output);
    assert!(stdout(&output).contains("\"u-7\""), "{}", stdout(&output));

    let output = command(&["run", "--drain"]);
    assert_success(&output);
    assert_eq!(server.cli(&["GET", "mine:stream_offsets:gm"]), id);

    let output = command(&["offsets", "get"]);
    assert_success(&output);
    assert_eq!(stdout(&output).trim(), id);
    assert_success(&command(&["offsets", "reset"]));
    assert_eq!(server.cli(&["EXISTS", "mine:stream_offsets:gm"]), "0");

    let output = command(&["status", "--json"]);
    assert_success(&output);
    let status: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(status["stream"], "mine:events");
    assert_eq!(status["length"], 1);

    // A flag wins over the file, and LOBBY_CONFIG names it too.
    let output = Command::new(BIN)
        .args(["status", "--json", "--stream", "other"])
        .env("LOBBY_CONFIG", path)
        .env_remove("REDIS_URL")
        .output()
        .unwrap();
    assert_success(&output);
    let status: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(status["stream"], "other");

    // An unknown key is refused by every command, as a configuration error.
    let bad = config_file(&format!("redis_url = \"{url}\"\nbatchsize = 3\n"));
    let output = Command::new(BIN)
        .args(["status", "--config", bad.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("batchsize"), "{}", stderr(&output));
}

#[test]
fn an_offset_past_the_streams_end_is_flagged_and_warned_once() {
    let server = RedisServer::start();
    let url = server.url();
    add_event(&server, "user.deleted", "u-1", "1700000000000");
    let far = "99999999999999-0";
    assert_success(&worker(&url, &["offsets", "set", "--force", far]));

    let status = status_json(&url, &[]);
    assert_eq!(status["offset_past_end"], true, "{status}");
    let output = worker(&url, &["status"]);
    assert!(
        stdout(&output).contains("offset_past_end:") && stdout(&output).contains("yes: "),
        "{}",
        stdout(&output)
    );

    // Two looks at the stream (one every 5 s), one warning; the summary,
    // every second, shows the time passing.
    let port = lifecycle_test_support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let running = Running::start(&url, &["--summary-interval", "1s", "--metrics-addr", &addr]);
    let warning = "the stored offset is past the stream's last entry";
    running.wait_for_log(warning);
    wait_for(Duration::from_secs(20), "seven summaries", || {
        running.count(" summary ") >= 7
    });
    assert_eq!(running.count(warning), 1, "{}", running.log());
    let past_end = || {
        common::get(port, "/metrics")
            .and_then(|(_, body)| common::sample(&body, "lobby_offset_past_end"))
    };
    assert_eq!(past_end(), Some(1.0));

    // Set right, the warning ends.
    assert_success(&worker(&url, &["offsets", "set", "0-0"]));
    wait_for(Duration::from_secs(15), "the end of the episode", || {
        running.count("the stored offset is within the stream again") == 1
    });
    assert_eq!(status_json(&url, &[])["offset_past_end"], false);
    assert_eq!(past_end(), Some(0.0));
}

#[test]
fn run_logs_a_summary_at_the_interval() {
    let server = RedisServer::start();
    let url = server.url();
    for user in ["u-1", "u-2", "u-3"] {
        add_event(&server, "user.deleted", user, "1700000000000");
    }
    add_event(&server, "user.renamed", "u-4", "1700000000000");
    // With /metrics the entries behind are counted, and the summary says
    // how many; without, the lag is told by time alone.
    let addr = format!("127.0.0.1:{}", lifecycle_test_support::free_port());
    let mut running = Running::start_with_env(
        &url,
        &["--summary-interval", "1s", "--metrics-addr", &addr],
        &[("LOBBY_LOG_FORMAT", "json")],
    );
    wait_for(Duration::from_secs(15), "a summary of the backlog", || {
        running.log().lines().any(|line| {
            serde_json::from_str::<Value>(line)
                .is_ok_and(|line| line["message"] == "summary" && line["handled"] == 3)
        })
    });
    let summary: Value = running
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["message"] == "summary" && line["handled"] == 3)
        .unwrap();
    assert_eq!(summary["level"], "INFO");
    for field in [
        "absorbed",
        "failures",
        "dead_lettered",
        "lag_entries",
        "per_second",
    ] {
        assert!(summary[field].is_number(), "{field}: {summary}");
    }
    assert_eq!(summary["absorbed"], 1);
    assert_eq!(summary["failures"], 0);
    // Stopped first: it holds the lease a drain would wait for.
    running.terminate();
    // 0s turns it off; more than a day is a mistake.
    let output = worker(&url, &["run", "--drain", "--summary-interval", "0s"]);
    assert_success(&output);
    assert!(
        !stderr(&output).contains(" summary "),
        "{}",
        stderr(&output)
    );
    let output = worker(&url, &["run", "--summary-interval", "25h"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

/// Runs `command` under a pseudo-terminal (util-linux `script`), returning
/// what the terminal showed.
fn on_a_terminal(url: &str, command: &str) -> String {
    on_a_terminal_with(url, command, &[])
}

/// [`on_a_terminal`] with extra environment.
fn on_a_terminal_with(url: &str, command: &str, env: &[(&str, &str)]) -> String {
    let output = Command::new("script")
        .args(["--quiet", "--return", "--command", command, "/dev/null"])
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .env("REDIS_URL", url)
        .env("LOBBY_LOG_LEVEL", "info")
        .env_remove("LOBBY_METRICS_ADDR")
        .output()
        .expect("util-linux `script` on the PATH");
    assert_success(&output);
    stdout(&output)
}

#[test]
fn a_drain_on_a_terminal_shows_progress_and_elsewhere_does_not() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = common::connect(&url);
    let mut pipe = redis::pipe();
    for n in 0..20_000u64 {
        pipe.add_command(common::deletion(
            &format!("u-{}", n % 500),
            1_700_000_000_000,
        ))
        .ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    let shown = on_a_terminal(&url, &format!("{BIN} run --drain --metrics-addr off"));
    assert!(shown.contains("entries done"), "{shown}");
    assert!(shown.contains("remaining"), "{shown}");
    assert!(shown.contains("drained"), "{shown}");
    // Not a terminal: the log alone.
    server.cli(&["DEL", OFFSET_KEY]);
    let output = worker(&url, &["run", "--drain", "--metrics-addr", "off"]);
    assert_success(&output);
    assert!(
        !stderr(&output).contains("entries done"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn completions_and_the_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_success(&output);
        let script = stdout(&output);
        for word in ["lobby-worker", "offsets", "redis-url", "dead-letter-after"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let output = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let file = config_file(&stdout(&output));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(file.path())
        .output()
        .unwrap();
    assert_success(&syntax);
    let output = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));

    let output = Command::new(BIN).arg("man").output().unwrap();
    assert_success(&output);
    let page = stdout(&output);
    assert!(
        page.starts_with(".ie") || page.starts_with(".TH"),
        "{}",
        &page[..80.min(page.len())]
    );
    for section in [
        ".TH lobby-worker 1",
        "LOBBY-WORKER RUN",
        "\\-\\-checkpoint\\-delay",
        "EXIT STATUS",
    ] {
        assert!(page.contains(section), "no {section:?} in the man page");
    }
}

#[test]
fn exit_statuses_are_documented_and_input_mistakes_exit_two() {
    let output = Command::new(BIN).arg("--help").output().unwrap();
    assert_success(&output);
    assert!(
        stdout(&output).contains("Exit status: 0 success"),
        "{}",
        stdout(&output)
    );
    let server = RedisServer::start();
    let url = server.url();
    for args in [
        &["publish", "--event-type", "user.deleted", "--user-id", " "][..],
        &[
            "publish",
            "--event-type",
            "user.deleted",
            "--user-id",
            "u",
            "--stream",
            "",
        ],
        &[
            "publish",
            "--event-type",
            "user.deleted",
            "--user-id",
            "u",
            "--key-prefix",
            "",
        ],
        &["run", "--retry-initial", "2s", "--retry-max", "1s"],
        &["run", "--label", ""],
        &["status", "--label", ""],
    ] {
        let output = worker(&url, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    // A failure while carrying the command out is 1.
    server.cli(&["SET", STREAM, "not a stream"]);
    let output = worker(&url, &["status"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
}

#[test]
fn logs_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    let server = RedisServer::start();
    let url = server.url();
    let command = format!("{BIN} run --drain --metrics-addr off");
    // The reset that ends every coloured span (the progress bar's own
    // cursor movements are not colours).
    let escape = "\u{1b}[0m";
    assert!(
        on_a_terminal(&url, &command).contains(escape),
        "no colour on a terminal"
    );
    let shown = on_a_terminal_with(&url, &command, &[("NO_COLOR", "1")]);
    assert!(shown.contains("drained"), "{shown}");
    assert!(
        !shown.contains(escape),
        "colour despite NO_COLOR: {shown:?}"
    );
    let output = worker(&url, &["run", "--drain", "--metrics-addr", "off"]);
    assert!(!stderr(&output).contains(escape), "colour into a pipe");
}
