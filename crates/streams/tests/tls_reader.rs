//! The stream reader's own socket over TLS, against a private redis-server
//! with generated certificates: it reads with the CA it is given, checks the
//! server's name, and its handshake failures are classified as TLS faults
//! (ended, not retried).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use lifecycle_domain::EntryId;
use lifecycle_streams::internals::{classify_read, ReadConnection};
use lifecycle_streams::{FaultClass, TlsFiles as ClientFiles, TlsSettings};
use lifecycle_test_support::{RedisServer, RedisServerOptions, ServerTls, TlsFiles};

const TIMEOUT: Duration = Duration::from_secs(5);

fn server(tls: ServerTls) -> RedisServer {
    RedisServer::start_with(RedisServerOptions {
        requirepass: Some("pw".to_owned()),
        tls: Some(tls),
        ..RedisServerOptions::default()
    })
}

fn trusting(ca: &std::path::Path) -> TlsSettings {
    TlsSettings::load(&ClientFiles {
        ca_file: Some(ca.to_owned()),
        ..ClientFiles::default()
    })
    .unwrap()
}

async fn connect(url: &str, tls: &TlsSettings) -> Result<ReadConnection, FaultClass> {
    let client = redis::Client::open(url).unwrap();
    ReadConnection::connect(client.get_connection_info(), Some(tls), TIMEOUT)
        .await
        .map_err(|err| classify_read(&err))
}

#[tokio::test]
async fn reads_a_stream_over_tls_after_authenticating() {
    let files = TlsFiles::generate();
    let server = server(files.server(false));
    for user in ["a", "b", "c"] {
        server.cli(&["XADD", "s", "*", "user_id", user]);
    }
    let mut reader = connect(&server.tls_url().unwrap(), &trusting(&files.ca_cert))
        .await
        .unwrap();
    reader
        .send_xread("s", EntryId::ZERO, 10, None, true)
        .await
        .unwrap();
    let received = reader.receive_batch(1 << 20).await.unwrap();
    assert_eq!(received.batch.len(), 3);
    assert!(received.probe.is_some(), "the probe's reply came back too");
}

#[tokio::test]
async fn an_untrusted_or_misnamed_certificate_is_a_tls_fault() {
    let files = TlsFiles::generate();
    let right = server(files.server(false));
    let misnamed = server(files.misnamed_server());
    let untrusted = connect(&right.tls_url().unwrap(), &trusting(&files.other_ca_cert)).await;
    assert_eq!(untrusted.err(), Some(FaultClass::Tls));
    let wrong_name = connect(&misnamed.tls_url().unwrap(), &trusting(&files.ca_cert)).await;
    assert_eq!(wrong_name.err(), Some(FaultClass::Tls));
}

#[tokio::test]
async fn a_missing_client_certificate_is_a_tls_fault_and_a_given_one_works() {
    let files = TlsFiles::generate();
    let server = server(files.server(true));
    let url = server.tls_url().unwrap();
    let without = connect(&url, &trusting(&files.ca_cert)).await;
    assert_eq!(without.err(), Some(FaultClass::Tls));
    let with = TlsSettings::load(&ClientFiles {
        ca_file: Some(files.ca_cert.clone()),
        cert_file: Some(files.client_cert.clone()),
        key_file: Some(files.client_key.clone()),
    })
    .unwrap();
    assert!(connect(&url, &with).await.is_ok());
}
