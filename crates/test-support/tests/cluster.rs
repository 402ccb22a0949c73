//! A local Redis Cluster (`RedisCluster`): routing of keys to their masters, and a failover
//! after a master is killed. Each test runs a cluster of its own, so they run in parallel.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use lifecycle_test_support::cluster::key_slot;
use lifecycle_test_support::RedisCluster;

/// How long a failover may take (node timeout 1 s; it typically takes 2-3 s).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// The process id `INFO server` reports on `port`.
fn pid_of(cluster: &RedisCluster, port: u16) -> String {
    cluster
        .cli(port, &["INFO", "server"])
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .expect("INFO server reports process_id")
        .trim()
        .to_owned()
}

#[test]
fn keys_are_routed_to_the_master_of_their_slot() {
    let started = Instant::now();
    let cluster = RedisCluster::start();
    eprintln!("cluster ready after {:?}", started.elapsed());

    let masters = cluster.masters();
    let replicas = cluster.replicas();
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    assert_eq!(replicas.len(), 3, "replicas: {replicas:?}");
    let mut all: Vec<u16> = masters.iter().chain(&replicas).copied().collect();
    all.sort_unstable();
    let mut ports = cluster.ports();
    ports.sort_unstable();
    assert_eq!(all, ports);

    let seeds: Vec<String> = cluster
        .ports()
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    assert_eq!(
        cluster.url(),
        format!("redis+cluster://{}", seeds.join(","))
    );
    assert!(cluster.seed_url().starts_with("redis://127.0.0.1:"));
    assert_eq!(cluster.ca_file(), None, "a plain cluster has no CA");
    for port in cluster.ports() {
        assert!(
            cluster.node(port).dir().join("nodes.conf").is_file(),
            "node {port} keeps nodes.conf in its own directory"
        );
    }

    // The local slot computation agrees with the server's.
    let any = cluster.ports()[0];
    for key in [
        "foo",
        "greeting",
        "user:{42}:games",
        "{}x",
        "a{b}c{d}",
        "x{y",
    ] {
        assert_eq!(
            cluster.cli(any, &["CLUSTER", "KEYSLOT", key]),
            key_slot(key).to_string(),
            "slot of {key:?}"
        );
    }

    // Through redirects, then on the master itself; anyone else redirects.
    assert_eq!(cluster.cluster_cli(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(cluster.cluster_cli(&["GET", "greeting"]), "hello");
    let owner = cluster.master_of_key("greeting");
    assert!(masters.contains(&owner));
    assert_eq!(cluster.cli(owner, &["SET", "greeting", "hi"]), "OK");
    assert_eq!(cluster.cli(owner, &["GET", "greeting"]), "hi");
    for &other in masters.iter().filter(|&&port| port != owner) {
        let answer = cluster.cli(other, &["GET", "greeting"]);
        assert_eq!(
            answer,
            format!("MOVED {} 127.0.0.1:{owner}", key_slot("greeting"))
        );
    }

    // Several commands over one connection, arguments quoted for redis-cli.
    assert_eq!(
        cluster.cli_session(
            owner,
            &[
                &["SET", "greeting", "say \"hi\"\n"],
                &["GET", "greeting"],
                &["STRLEN", "greeting"]
            ]
        ),
        "OK\nsay \"hi\"\n\n9"
    );

    // A key for each master.
    for &master in &masters {
        let key = cluster.key_for_master("spread:", master);
        assert!(key.starts_with("spread:"));
        assert_eq!(cluster.master_of_key(&key), master);
        assert_eq!(cluster.cli(master, &["SET", &key, "v"]), "OK");
    }

    // Drop kills every node.
    let pids: Vec<String> = cluster
        .ports()
        .iter()
        .map(|&port| pid_of(&cluster, port))
        .collect();
    drop(cluster);
    for pid in pids {
        assert!(!Path::new("/proc").join(&pid).exists(), "pid {pid} is gone");
    }
}

#[test]
fn a_killed_master_is_replaced_by_its_replica_with_the_replicated_data() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start();
    eprintln!("cluster ready after {:?}", started.elapsed());

    let old = cluster.master_of_key("survivor");
    // The write and its WAIT on one connection: WAIT counts acknowledgements of that
    // connection's writes only.
    assert_eq!(
        cluster.cli_session(old, &[&["SET", "survivor", "kept"], &["WAIT", "1", "1000"]]),
        "OK\n1",
        "the replica acknowledged the write"
    );

    let killed = Instant::now();
    cluster.kill(old);
    assert!(!cluster.node(old).is_running());
    let new = cluster.wait_for_failover(old, "survivor", FAILOVER_TIMEOUT);
    eprintln!("failover from {old} to {new} after {:?}", killed.elapsed());

    assert_ne!(new, old);
    assert_eq!(cluster.master_of_key("survivor"), new);
    assert_eq!(cluster.cli(new, &["GET", "survivor"]), "kept");
    assert_eq!(cluster.cluster_cli(&["GET", "survivor"]), "kept");
    assert_eq!(cluster.cli(new, &["SET", "survivor", "again"]), "OK");
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    assert!(masters.contains(&new) && !masters.contains(&old));
    assert!(cluster.seed_url() != cluster.node(old).url());

    // The old master comes back as a replica of the new one.
    let restarted = Instant::now();
    cluster.restart(old);
    eprintln!("old master rejoined after {:?}", restarted.elapsed());
    assert!(cluster.replicas().contains(&old));
    assert_eq!(cluster.master_of_key("survivor"), new);
    eprintln!("whole test took {:?}", started.elapsed());
}
