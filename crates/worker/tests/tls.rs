//! `rediss://`: every subcommand over TLS against a private redis-server
//! with generated certificates, client certificates, and the failures an
//! operator can make (an untrusted certificate, a missing client
//! certificate, certificate files with a plain URL), each ending at once with
//! one line that says what to fix.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_one_error_line, assert_success, stdout, worker, Running};
use lifecycle_test_support::{RedisServer, RedisServerOptions, TlsFiles};

const PASSWORD: &str = "tls-S3cret";

fn tls_server(files: &TlsFiles, auth_clients: bool) -> RedisServer {
    RedisServer::start_with(RedisServerOptions {
        requirepass: Some(PASSWORD.to_owned()),
        tls: Some(files.server(auth_clients)),
        ..RedisServerOptions::default()
    })
}

fn path(file: &Path) -> &str {
    file.to_str().unwrap()
}

fn with_ca<'a>(files: &'a TlsFiles, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(["--tls-ca-file", path(&files.ca_cert)]);
    all
}

/// `args` with the CA and the client certificate and key.
fn with_client_certificate<'a>(files: &'a TlsFiles, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = with_ca(files, args);
    all.extend([
        "--tls-cert-file",
        path(&files.client_cert),
        "--tls-key-file",
        path(&files.client_key),
    ]);
    all
}

fn publish(url: &str, files: &TlsFiles, user: &str) -> String {
    let published = worker(
        url,
        &with_ca(
            files,
            &["publish", "--event-type", "user.deleted", "--user-id", user],
        ),
    );
    assert_success(&published);
    stdout(&published).trim().to_owned()
}

#[test]
fn every_command_works_over_tls_with_a_password() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, false);
    let url = server.tls_url().unwrap();
    assert!(url.starts_with("rediss://"), "{url}");

    let id = publish(&url, &files, "u1");
    let drained = worker(&url, &with_ca(&files, &["run", "--drain"]));
    assert_success(&drained);
    assert!(!common::stderr(&drained).contains(PASSWORD));
    // The cascade ran over TLS too: the user's record is there.
    assert_eq!(
        server.cli(&["HGET", "lobby:user:u1:cascade", "entry_id"]),
        id
    );

    let offset = worker(&url, &with_ca(&files, &["offsets", "get"]));
    assert_success(&offset);
    assert_eq!(stdout(&offset).trim(), id);
    let status = worker(&url, &with_ca(&files, &["status", "--json"]));
    assert_success(&status);
    assert!(stdout(&status).contains(&id), "{}", stdout(&status));
    let tail = worker(&url, &with_ca(&files, &["tail", "--json"]));
    assert_success(&tail);
    assert!(
        stdout(&tail).contains("\"status\":\"ok\""),
        "{}",
        stdout(&tail)
    );
}

#[test]
fn a_running_worker_reads_live_events_over_tls_and_reconnects_after_a_restart() {
    let files = TlsFiles::generate();
    let mut server = tls_server(&files, false);
    let url = server.tls_url().unwrap();
    let offset = |server: &RedisServer| server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]);
    let running = Running::start_with_env(
        &url,
        &["--start-from", "beginning"],
        &[("LOBBY_TLS_CA_FILE", path(&files.ca_cert))],
    );
    running.wait_for_log("consumer started");

    // A blocking read over TLS wakes for a live event.
    let first = publish(&url, &files, "u1");
    common::wait_until(Duration::from_secs(15), || offset(&server) == first)
        .unwrap_or_else(|()| panic!("offset never reached {first}:\n{}", running.log()));

    // The server keeps nothing across a restart; the worker reconnects over
    // TLS and goes on after the offset it holds.
    server.restart();
    let second = publish(&url, &files, "u2");
    common::wait_until(Duration::from_secs(30), || offset(&server) == second)
        .unwrap_or_else(|()| panic!("offset never reached {second}:\n{}", running.log()));
    assert!(!running.log().contains(PASSWORD), "{}", running.log());
}

#[test]
fn a_client_certificate_is_presented_when_the_server_asks_for_one() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, true);
    let url = server.tls_url().unwrap();

    let refused = worker(&url, &with_ca(&files, &["status"]));
    let line = assert_one_error_line(&refused);
    assert!(line.contains("TLS handshake"), "{line}");
    assert!(line.contains("--tls-cert-file"), "{line}");

    let args = with_client_certificate(&files, &["run", "--drain"]);
    let drained = worker(&url, &args);
    assert_success(&drained);
    assert!(common::stderr(&drained).contains("drained"));
}

#[test]
fn an_untrusted_server_certificate_ends_run_at_once_with_advice() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, false);
    let url = server.tls_url().unwrap();
    for ca in [Some(path(&files.other_ca_cert)), None] {
        let mut args = vec!["run"];
        if let Some(ca) = ca {
            args.extend(["--tls-ca-file", ca]);
        }
        let started = Instant::now();
        let output = worker(&url, &args);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}: retried instead of failing",
            started.elapsed()
        );
        assert_eq!(output.status.code(), Some(1), "{}", common::stderr(&output));
        let err = common::stderr(&output);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{err}");
        assert!(last.contains("TLS handshake"), "{last}");
        assert!(last.contains("--tls-ca-file"), "{last}");
        assert!(!err.contains(PASSWORD), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_certificate_for_another_host_is_refused() {
    let files = TlsFiles::generate();
    let server = RedisServer::start_with(RedisServerOptions {
        tls: Some(files.misnamed_server()),
        ..RedisServerOptions::default()
    });
    let url = server.tls_url().unwrap();
    // Signed by the trusted CA, but for elsewhere.invalid, not 127.0.0.1.
    let line = assert_one_error_line(&worker(&url, &with_ca(&files, &["status"])));
    assert!(line.contains("TLS handshake"), "{line}");
    assert!(line.contains("not valid for name"), "{line}");
}

#[test]
fn certificate_settings_that_cannot_work_are_refused_naming_them() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, false);
    let tls_url = server.tls_url().unwrap();
    let plain_url = server.url();

    // Certificate files with a plain URL.
    let line = assert_one_error_line(&worker(&plain_url, &with_ca(&files, &["status"])));
    assert!(line.contains("rediss://"), "{line}");
    assert!(!line.contains(PASSWORD), "{line}");

    // A certificate without its key.
    let line = assert_one_error_line(&worker(
        &tls_url,
        &["status", "--tls-cert-file", path(&files.client_cert)],
    ));
    assert!(line.contains("give both files or neither"), "{line}");

    // A CA file that is missing, and one that is no certificate.
    let missing = files.dir.path().join("missing.pem");
    let line = assert_one_error_line(&worker(
        &tls_url,
        &["status", "--tls-ca-file", path(&missing)],
    ));
    assert!(line.contains("missing.pem"), "{line}");
    let line = assert_one_error_line(&worker(
        &tls_url,
        &["status", "--tls-ca-file", path(&files.server_key)],
    ));
    assert!(line.contains("no PEM certificate"), "{line}");

    // Certificate checks cannot be turned off.
    let insecure = format!("{tls_url}#insecure");
    let line = assert_one_error_line(&worker(&insecure, &["status"]));
    assert!(line.contains("turns certificate checks off"), "{line}");
    assert!(!line.contains(PASSWORD), "{line}");
}

#[test]
fn print_config_shows_the_certificate_files() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, false);
    let url = server.tls_url().unwrap();
    let args = with_client_certificate(&files, &["run", "--print-config"]);
    let printed = worker(&url, &args);
    assert_success(&printed);
    let text = stdout(&printed);
    for (setting, file) in [
        ("tls_ca_file", &files.ca_cert),
        ("tls_cert_file", &files.client_cert),
        ("tls_key_file", &files.client_key),
    ] {
        let line = text
            .lines()
            .find(|line| line.trim_start().starts_with(setting))
            .unwrap_or_else(|| panic!("no {setting} in:\n{text}"));
        assert!(line.contains(path(file)), "{line}");
    }
    assert!(!text.contains(PASSWORD), "{text}");
}
