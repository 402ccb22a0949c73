//! A Sentinel-managed group on loopback: a master, a replica and three
//! sentinels with short timeouts, for failover tests.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use lifecycle_private_redis::{Options, PrivateRedis};

use crate::{redis_cli, RedisServer, RedisServerOptions};

/// How long a sentinel waits before it calls a silent master down.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);
/// The sentinels' failover timeout.
const FAILOVER_TIMEOUT: Duration = Duration::from_millis(4000);
/// How long the group may take to be ready (replica in sync, sentinels
/// aware of each other and of the replica).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between checks.
const POLL: Duration = Duration::from_millis(50);

/// A master, one replica and three sentinels (quorum 2) on free loopback
/// ports; every process is killed on drop.
#[derive(Debug)]
pub struct SentinelGroup {
    name: String,
    /// The sentinels' password, for asking them.
    sentinel_password: Option<String>,
    /// The two data servers; which is the master changes with failovers.
    servers: Vec<RedisServer>,
    sentinels: Vec<PrivateRedis>,
    /// Holds the sentinels' configuration files (they rewrite them).
    _configs: tempfile::TempDir,
}

impl SentinelGroup {
    /// Starts the group monitoring a master named `name`, and waits until a
    /// failover could happen: the replica in sync, each sentinel knowing the
    /// replica and the two other sentinels.
    pub fn start(name: &str) -> SentinelGroup {
        Self::start_with_passwords(name, None, None)
    }

    /// [`SentinelGroup::start`] with `data_password` required by the master
    /// and the replica, and `sentinel_password` by the sentinels.
    pub fn start_with_passwords(
        name: &str,
        data_password: Option<&str>,
        sentinel_password: Option<&str>,
    ) -> SentinelGroup {
        let data_options = |extra_args: Vec<String>| RedisServerOptions {
            requirepass: data_password.map(str::to_owned),
            extra_args,
            ..RedisServerOptions::default()
        };
        // A replica that becomes master again after a failover needs the
        // password to follow the new one.
        let auth = data_password
            .map(|password| vec!["--masterauth".to_owned(), password.to_owned()])
            .unwrap_or_default();
        let master = RedisServer::start_with(data_options(auth.clone()));
        let mut replica_args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port().to_string(),
        ];
        replica_args.extend(auth);
        let replica = RedisServer::start_with(data_options(replica_args));
        let configs =
            tempfile::tempdir().expect("test-support: cannot create a temporary directory");
        let mut sentinels = Vec::new();
        for index in 0..3 {
            let path = configs.path().join(format!("sentinel-{index}.conf"));
            let mut config = format!(
                "sentinel monitor {name} 127.0.0.1 {port} 2\n\
                 sentinel down-after-milliseconds {name} {down}\n\
                 sentinel failover-timeout {name} {failover}\n\
                 sentinel parallel-syncs {name} 1\n",
                port = master.port(),
                down = DOWN_AFTER.as_millis(),
                failover = FAILOVER_TIMEOUT.as_millis(),
            );
            if let Some(password) = data_password {
                config.push_str(&format!("sentinel auth-pass {name} {password}\n"));
            }
            if let Some(password) = sentinel_password {
                // The sentinels' own password, which they also use with
                // each other.
                config.push_str(&format!("sentinel sentinel-pass {password}\n"));
            }
            fs::write(&path, config)
                .expect("test-support: cannot write a sentinel's configuration");
            let sentinel = PrivateRedis::start_with(Options {
                config_file: Some(path),
                args: vec!["--sentinel".into()],
                password: sentinel_password.map(str::to_owned),
                ..Options::default()
            })
            .unwrap_or_else(|err| panic!("test-support: a sentinel did not start: {err}"));
            sentinels.push(sentinel);
        }
        let group = SentinelGroup {
            name: name.to_owned(),
            sentinel_password: sentinel_password.map(str::to_owned),
            servers: vec![master, replica],
            sentinels,
            _configs: configs,
        };
        group.wait_ready();
        group
    }

    /// `redis+sentinel://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C/NAME`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|sentinel| format!("127.0.0.1:{}", sentinel.port()))
            .collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.name)
    }

    /// The port of the master the first sentinel that answers names.
    pub fn master_port(&self) -> u16 {
        for sentinel in &self.sentinels {
            if !sentinel.is_running() {
                continue;
            }
            let answer = self.sentinel_cli(
                sentinel.port(),
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name],
            );
            if let Some(port) = answer
                .lines()
                .nth(1)
                .and_then(|port| port.trim().parse().ok())
            {
                return port;
            }
        }
        panic!("test-support: no sentinel names the master {}", self.name)
    }

    /// The data server on `port`.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers
            .iter()
            .find(|server| server.port() == port)
            .unwrap_or_else(|| panic!("test-support: no server of the group on port {port}"))
    }

    /// The server the sentinels name master now.
    pub fn master(&self) -> &RedisServer {
        self.server(self.master_port())
    }

    /// SIGKILLs the master; returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        let server = self
            .servers
            .iter_mut()
            .find(|server| server.port() == port)
            .unwrap_or_else(|| panic!("test-support: no server of the group on port {port}"));
        server.kill();
        port
    }

    /// Waits until the sentinels name a master other than the one on
    /// `old_port` and it answers as a master; returns its port.
    pub fn wait_for_failover(&self, old_port: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            let port = self.master_port();
            if port != old_port && self.server(port).cli(&["ROLE"]).starts_with("master") {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "test-support: no failover from port {old_port} within {timeout:?}"
            );
            thread::sleep(POLL);
        }
    }

    /// Asks the sentinels for a failover now (`SENTINEL FAILOVER`): the
    /// master is demoted to a replica, not stopped. Returns the new
    /// master's port once it answers as one.
    pub fn failover(&self, timeout: Duration) -> u16 {
        let old = self.master_port();
        let sentinel = self.sentinels.first().expect("a sentinel");
        let answer = self.sentinel_cli(sentinel.port(), &["SENTINEL", "FAILOVER", &self.name]);
        assert_eq!(
            answer, "OK",
            "test-support: SENTINEL FAILOVER answered {answer}"
        );
        self.wait_for_failover(old, timeout)
    }

    /// `redis-cli` against the sentinel on `port`, with their password: its
    /// trimmed output (empty when it cannot connect).
    fn sentinel_cli(&self, port: u16, args: &[&str]) -> String {
        let output = redis_cli(port, self.sentinel_password.as_deref(), args);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let master = self.servers.first().expect("the master");
        let replica = self.servers.get(1).expect("the replica");
        loop {
            let synced = replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up");
            let sentinels_ready = self.sentinels.iter().all(|sentinel| {
                let replicas =
                    self.sentinel_cli(sentinel.port(), &["SENTINEL", "REPLICAS", &self.name]);
                let others =
                    self.sentinel_cli(sentinel.port(), &["SENTINEL", "SENTINELS", &self.name]);
                replicas.contains(&replica.port().to_string())
                    && others.matches("127.0.0.1").count() >= 2
            });
            if synced && sentinels_ready {
                assert_eq!(self.master_port(), master.port());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "test-support: the sentinel group was not ready within {READY_TIMEOUT:?} (replica synced: {synced})"
            );
            thread::sleep(POLL);
        }
    }
}
