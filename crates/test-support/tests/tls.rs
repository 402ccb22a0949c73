//! TLS servers with in-process generated certificates (`TlsFiles`), checked with `redis-cli --tls`
//! and `openssl verify`.
//!
//! Built only with the `tls` feature (`required-features` in Cargo.toml):
//! `cargo test -p lifecycle-test-support --features tls`.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use lifecycle_test_support::{RedisServer, RedisServerOptions, TlsFiles};

/// Starts a TLS-enabled server from `files`, optionally requiring client certificates.
fn tls_server(files: &TlsFiles, auth_clients: bool) -> RedisServer {
    RedisServer::start_with(RedisServerOptions {
        tls: Some(files.server(auth_clients)),
        ..RedisServerOptions::default()
    })
}

/// Runs `redis-cli --tls -h 127.0.0.1 -p <tls_port> <tls_args> <args>` and returns its output.
fn tls_cli(server: &RedisServer, tls_args: &[&Path], args: &[&str]) -> Output {
    let port = server.tls_port().expect("the server was started with TLS");
    Command::new("redis-cli")
        .arg("--tls")
        .args(tls_args)
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run redis-cli (is it on the PATH?)")
}

/// `--cacert <ca>` as redis-cli arguments.
fn ca_args(ca: &Path) -> [&Path; 2] {
    [Path::new("--cacert"), ca]
}

/// `--cacert <ca> --cert <client cert> --key <client key>` as redis-cli arguments.
fn client_cert_args(files: &TlsFiles) -> [&Path; 6] {
    [
        Path::new("--cacert"),
        &files.ca_cert,
        Path::new("--cert"),
        &files.client_cert,
        Path::new("--key"),
        &files.client_key,
    ]
}

/// Asserts that redis-cli succeeded and printed `PONG`.
fn assert_pong(output: &Output) {
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "PONG",
        "expected PONG, got {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Asserts that redis-cli failed without a `PONG`, and returns its stderr.
fn assert_refused(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success() && !stdout.contains("PONG"),
        "expected a failure, got {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    stderr
}

/// Runs `openssl verify -CAfile <ca> -purpose <purpose> <extra> <cert>`; `Ok` with stdout or `Err` with stderr.
fn openssl_verify(ca: &Path, purpose: &str, extra: &[&str], cert: &Path) -> Result<String, String> {
    let output = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg("-purpose")
        .arg(purpose)
        .args(extra)
        .arg(cert)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run openssl (is it on the PATH? Debian: apt-get install openssl)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{}: {stderr}{stdout}", output.status))
    }
}

#[test]
fn generated_files_are_pem_with_pkcs8_keys_in_their_own_directory() {
    let files = TlsFiles::generate();
    let certs = [
        &files.ca_cert,
        &files.server_cert,
        &files.client_cert,
        &files.other_ca_cert,
    ];
    for cert in certs {
        assert!(cert.starts_with(files.dir.path()), "{}", cert.display());
        let pem = fs::read_to_string(cert).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----"),
            "{}",
            cert.display()
        );
    }
    for key in [&files.server_key, &files.client_key] {
        assert!(key.starts_with(files.dir.path()), "{}", key.display());
        let pem = fs::read_to_string(key).unwrap();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{}",
            key.display()
        );
    }
    assert_ne!(
        fs::read(&files.ca_cert).unwrap(),
        fs::read(&files.other_ca_cert).unwrap()
    );

    let other = TlsFiles::generate();
    assert_ne!(files.dir.path(), other.dir.path());
    let dir = files.dir.path().to_path_buf();
    drop(files);
    assert!(!dir.exists(), "the directory is removed on drop");
}

#[test]
fn server_certificate_has_the_loopback_sans_and_server_usage() {
    let files = TlsFiles::generate();
    let ca = &files.ca_cert;
    let server = &files.server_cert;
    openssl_verify(ca, "sslserver", &["-verify_ip", "127.0.0.1"], server).unwrap();
    openssl_verify(ca, "sslserver", &["-verify_hostname", "localhost"], server).unwrap();
    // The check is real: another name does not match, and another CA does not verify.
    let mismatch = openssl_verify(
        ca,
        "sslserver",
        &["-verify_hostname", "example.com"],
        server,
    )
    .unwrap_err();
    assert!(mismatch.contains("hostname mismatch"), "{mismatch}");
    let wrong_ca = openssl_verify(&files.other_ca_cert, "sslserver", &[], server).unwrap_err();
    assert!(wrong_ca.contains("verification failed"), "{wrong_ca}");
}

#[test]
fn client_certificate_is_for_client_auth_only() {
    let files = TlsFiles::generate();
    openssl_verify(&files.ca_cert, "sslclient", &[], &files.client_cert).unwrap();
    let err = openssl_verify(&files.ca_cert, "sslserver", &[], &files.client_cert).unwrap_err();
    assert!(err.contains("unsuitable certificate purpose"), "{err}");
}

#[test]
fn tls_server_answers_ping_over_tls_and_keeps_its_plain_port() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, false);
    let tls_port = server.tls_port().expect("TLS is enabled");
    assert_ne!(tls_port, server.port());
    assert_eq!(
        server.tls_url(),
        Some(format!("rediss://127.0.0.1:{tls_port}/"))
    );
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );

    assert_pong(&tls_cli(&server, &ca_args(&files.ca_cert), &["PING"]));
    // Without `auth_clients`, a client certificate is optional but still accepted.
    assert_pong(&tls_cli(&server, &client_cert_args(&files), &["PING"]));
    // Plain port and TLS port serve the same data.
    assert_eq!(server.cli(&["SET", "k", "plain"]), "OK");
    let get = tls_cli(&server, &ca_args(&files.ca_cert), &["GET", "k"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "plain");
}

#[test]
fn auth_clients_refuses_a_client_without_a_certificate() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, true);
    assert_refused(&tls_cli(&server, &ca_args(&files.ca_cert), &["PING"]));
    let log = fs::read_to_string(server.dir().join("redis.log")).unwrap();
    assert!(log.contains("peer did not return a certificate"), "{log}");

    assert_pong(&tls_cli(&server, &client_cert_args(&files), &["PING"]));
    // The plain port is not affected by `auth_clients`.
    assert_eq!(server.cli(&["PING"]), "PONG");
}

#[test]
fn a_client_trusting_another_ca_fails_verification() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, false);
    let stderr = assert_refused(&tls_cli(&server, &ca_args(&files.other_ca_cert), &["PING"]));
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
}

#[test]
fn plain_client_on_the_tls_port_is_refused() {
    let files = TlsFiles::generate();
    let server = tls_server(&files, false);
    let port = server.tls_port().unwrap().to_string();
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port, "PING"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_refused(&output);
}

#[test]
fn restart_keeps_the_tls_port_and_the_password_is_in_the_tls_url() {
    let files = TlsFiles::generate();
    let mut server = RedisServer::start_with(RedisServerOptions {
        requirepass: Some("s3cret/pw".to_owned()),
        append_only: true,
        tls: Some(files.server(true)),
        ..RedisServerOptions::default()
    });
    let port = server.port();
    let tls_port = server.tls_port().unwrap();
    assert_eq!(
        server.tls_url(),
        Some(format!("rediss://:s3cret%2Fpw@127.0.0.1:{tls_port}/"))
    );
    let auth = ["-a", "s3cret/pw", "--no-auth-warning"];
    let set = tls_cli(
        &server,
        &client_cert_args(&files),
        &[auth.as_slice(), &["SET", "k", "v"]].concat(),
    );
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "OK");

    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.tls_port(), Some(tls_port));
    let get = tls_cli(
        &server,
        &client_cert_args(&files),
        &[auth.as_slice(), &["GET", "k"]].concat(),
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v");
    // Without the password the TLS connection works but the command is refused.
    let noauth = tls_cli(&server, &client_cert_args(&files), &["GET", "k"]);
    assert!(
        String::from_utf8_lossy(&noauth.stdout).contains("NOAUTH"),
        "{noauth:?}"
    );
}
