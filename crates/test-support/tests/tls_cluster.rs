//! A TLS-only Redis Cluster (`RedisCluster::start_tls`): no plain-TCP client gets an answer,
//! `redis-cli --tls -c` follows redirects to the TLS ports, and replication and a failover work
//! over TLS. Each test runs a cluster of its own, so they run in parallel.
//!
//! Built only with the `tls` feature (`required-features` in Cargo.toml):
//! `cargo test -p lifecycle-test-support --features tls --test tls_cluster`.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::fs;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lifecycle_test_support::cluster::key_slot;
use lifecycle_test_support::{RedisCluster, TlsFiles};

/// How long a failover may take (node timeout 1 s; it typically takes 2-3 s).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `redis-cli <tls_args> -h 127.0.0.1 -p <port> <args>` and returns its output.
fn cli_on(port: u16, tls_args: &[&str], ca: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new("redis-cli");
    command.args(tls_args);
    if let Some(ca) = ca {
        command.arg("--cacert").arg(ca);
    }
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run redis-cli (is it on the PATH?)")
}

/// `redis-cli --tls --cacert <ca> -c` (following redirects) on `port`: its trimmed stdout, which
/// must be a success.
fn tls_cluster_cli(cluster: &RedisCluster, port: u16, args: &[&str]) -> String {
    let output = cli_on(port, &["--tls", "-c"], cluster.ca_file(), args);
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "redis-cli --tls -c {args:?} on {port} failed with {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Whether the listener on `port` is closed: connecting is refused.
fn refuses_connections(port: u16) -> bool {
    matches!(
        TcpStream::connect(("127.0.0.1", port)),
        Err(err) if err.kind() == ErrorKind::ConnectionRefused
    )
}

#[test]
fn a_tls_cluster_speaks_tls_only_and_routes_keys_to_the_tls_ports() {
    let started = Instant::now();
    let files = TlsFiles::generate();
    let ca_pem = fs::read(&files.ca_cert).unwrap();
    let cluster = RedisCluster::start_tls(&files);
    eprintln!("TLS cluster ready after {:?}", started.elapsed());
    // The cluster keeps copies of the files it needs.
    drop(files);

    let ports = cluster.ports();
    assert_eq!(ports.len(), 6);
    let seeds: Vec<String> = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    assert_eq!(
        cluster.url(),
        format!("rediss+cluster://{}", seeds.join(","))
    );
    let ca = cluster.ca_file().expect("a TLS cluster has a CA file");
    assert_eq!(fs::read(ca).unwrap(), ca_pem, "the CA of the TlsFiles");
    assert!(cluster.seed_url().starts_with("rediss://127.0.0.1:"));
    assert_eq!(cluster.masters().len(), 3);
    assert_eq!(cluster.replicas().len(), 3);

    let mut plain_ports = Vec::new();
    for &port in &ports {
        let node = cluster.node(port);
        assert_eq!(node.tls_port(), Some(port), "ports() are the TLS ports");
        assert_eq!(node.tls_url(), Some(format!("rediss://127.0.0.1:{port}/")));
        // A plain-TCP client on the node's port gets no answer...
        let plain = cli_on(port, &[], None, &["PING"]);
        assert!(
            !plain.status.success() && !String::from_utf8_lossy(&plain.stdout).contains("PONG"),
            "plain PING on TLS port {port}: {plain:?}"
        );
        // ...and the plain port the launcher used is closed.
        assert!(
            refuses_connections(node.port()),
            "plain port {} of node {port} is closed",
            node.port()
        );
        plain_ports.push(node.port());
        // The harness's own calls go over TLS.
        assert_eq!(cluster.cli(port, &["PING"]), "PONG");
        assert_eq!(node.cli(&["PING"]), "PONG");
    }

    // CLUSTER SLOTS (on a TLS connection) announces the TLS ports, never the plain ones. Slots
    // are below 16384, the launcher's ports are not, so every larger number is a port. (Redis
    // 7.0 leaves out replicas whose replication offset is still 0, as in a cluster without
    // writes, so the masters at least.)
    let slots = cluster.cli(ports[0], &["CLUSTER", "SLOTS"]);
    let mut announced: Vec<u16> = slots
        .lines()
        .filter_map(|line| line.trim().parse::<u32>().ok())
        .filter(|&number| number >= 16384)
        .filter_map(|number| u16::try_from(number).ok())
        .collect();
    announced.sort_unstable();
    announced.dedup();
    assert!(
        announced.iter().all(|port| ports.contains(port)),
        "CLUSTER SLOTS names only TLS ports {ports:?}:\n{slots}"
    );
    assert!(
        cluster
            .masters()
            .iter()
            .all(|master| announced.contains(master)),
        "CLUSTER SLOTS names every master:\n{slots}"
    );
    assert!(plain_ports.iter().all(|plain| !announced.contains(plain)));
    // CLUSTER NODES too, for all six.
    let nodes = cluster.cli(ports[0], &["CLUSTER", "NODES"]);
    for port in &ports {
        assert!(
            nodes.contains(&format!("127.0.0.1:{port}@")),
            "{port} in\n{nodes}"
        );
    }
    for plain in &plain_ports {
        assert!(
            !nodes.contains(&format!(":{plain}@")),
            "{plain} not in\n{nodes}"
        );
    }

    // redis-cli --tls -c, from a node that does not serve the key: MOVED leads to a TLS port.
    let key = "tls:greeting";
    let owner = cluster.master_of_key(key);
    assert!(cluster.masters().contains(&owner));
    let elsewhere = cluster
        .masters()
        .into_iter()
        .find(|&port| port != owner)
        .unwrap();
    assert_eq!(
        cluster.cli(elsewhere, &["GET", key]),
        format!("MOVED {} 127.0.0.1:{owner}", key_slot(key))
    );
    assert_eq!(
        tls_cluster_cli(&cluster, elsewhere, &["SET", key, "hello"]),
        "OK"
    );
    assert_eq!(tls_cluster_cli(&cluster, elsewhere, &["GET", key]), "hello");
    assert_eq!(cluster.cli(owner, &["GET", key]), "hello");
    assert_eq!(cluster.cluster_cli(&["GET", key]), "hello");

    // A key for each master, and master_of_key finds it.
    for master in cluster.masters() {
        let key = cluster.key_for_master("tls:spread:", master);
        assert_eq!(cluster.master_of_key(&key), master);
        assert_eq!(
            tls_cluster_cli(&cluster, ports[0], &["SET", &key, "v"]),
            "OK"
        );
        assert_eq!(cluster.cli(master, &["GET", &key]), "v");
    }

    // Drop removes the copied certificates after the nodes are gone.
    let ca = ca.to_path_buf();
    drop(cluster);
    assert!(!ca.exists());
    eprintln!("whole test took {:?}", started.elapsed());
}

#[test]
fn a_tls_cluster_fails_over_and_a_restarted_node_stays_tls_only() {
    let started = Instant::now();
    let files = TlsFiles::generate();
    let mut cluster = RedisCluster::start_tls(&files);
    eprintln!("TLS cluster ready after {:?}", started.elapsed());

    // `--tls-auth-clients optional`: a client certificate signed by the CA is accepted too.
    let port = cluster.ports()[0];
    let with_cert = cli_on(
        port,
        &[
            "--tls",
            "--cert",
            files.client_cert.to_str().unwrap(),
            "--key",
            files.client_key.to_str().unwrap(),
        ],
        cluster.ca_file(),
        &["PING"],
    );
    assert_eq!(
        String::from_utf8_lossy(&with_cert.stdout).trim(),
        "PONG",
        "{with_cert:?}"
    );

    // Replication runs over TLS: the replica acknowledges the write.
    let old = cluster.master_of_key("survivor");
    assert_eq!(
        cluster.cli_session(old, &[&["SET", "survivor", "kept"], &["WAIT", "1", "1000"]]),
        "OK\n1",
        "the replica acknowledged the write"
    );

    let killed = Instant::now();
    cluster.kill(old);
    let new = cluster.wait_for_failover(old, "survivor", FAILOVER_TIMEOUT);
    eprintln!("failover from {old} to {new} after {:?}", killed.elapsed());
    assert_ne!(new, old);
    assert_eq!(cluster.master_of_key("survivor"), new);
    assert_eq!(cluster.cli(new, &["GET", "survivor"]), "kept");
    assert_eq!(
        tls_cluster_cli(&cluster, old_peer(&cluster, old), &["GET", "survivor"]),
        "kept"
    );

    // The old master rejoins as a replica, on its TLS port only again.
    let restarted = Instant::now();
    cluster.restart(old);
    eprintln!("old master rejoined after {:?}", restarted.elapsed());
    assert!(cluster.replicas().contains(&old));
    let node = cluster.node(old);
    assert_eq!(node.tls_port(), Some(old));
    assert!(
        refuses_connections(node.port()),
        "the plain port is closed again"
    );
    assert_eq!(cluster.cli(old, &["ROLE"]).lines().next(), Some("slave"));
    eprintln!("whole test took {:?}", started.elapsed());
}

/// A running node other than `port`.
fn old_peer(cluster: &RedisCluster, port: u16) -> u16 {
    cluster
        .masters()
        .into_iter()
        .find(|&other| other != port)
        .unwrap()
}
