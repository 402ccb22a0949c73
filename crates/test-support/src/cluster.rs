//! A local Redis Cluster on loopback: three masters with one replica each, short timeouts, for
//! routing and failover tests.
//!
//! ```no_run
//! use std::time::Duration;
//! let mut cluster = lifecycle_test_support::RedisCluster::start();
//! let _client_url = cluster.url(); // redis+cluster://127.0.0.1:A,...,127.0.0.1:F
//! cluster.cluster_cli(&["SET", "k", "v"]);
//! let old = cluster.master_of_key("k");
//! cluster.kill(old);
//! let new = cluster.wait_for_failover(old, "k", Duration::from_secs(15));
//! assert_ne!(new, old);
//! ```
//!
//! Every node is a [`RedisServer`] in its own temporary directory (its `nodes.conf` is kept there,
//! so [`RedisCluster::restart`] rejoins the cluster). Each node's cluster bus listens on a port of
//! its own that the launcher finds free (`--cluster-port`, Redis 7.0+), not on the default
//! port + 10000: the launcher's ports come from the ephemeral range, where port + 10000 is often
//! above 65535 and never checked for being free.
//!
//! With the feature `tls`, `RedisCluster::start_tls` starts the same cluster speaking TLS only:
//! clients, the cluster bus and replication. Its URL is `rediss+cluster://...`, and
//! [`RedisCluster::ca_file`] names the CA certificate clients verify the nodes with; every
//! `redis-cli` the harness runs passes `--tls --cacert <ca>`.
//!
//! ```no_run
//! # #[cfg(feature = "tls")] {
//! let files = lifecycle_test_support::TlsFiles::generate();
//! let cluster = lifecycle_test_support::RedisCluster::start_tls(&files);
//! let _client_url = cluster.url(); // rediss+cluster://127.0.0.1:A,...,127.0.0.1:F
//! let _ca = cluster.ca_file().expect("a TLS cluster has a CA");
//! cluster.cluster_cli(&["SET", "k", "v"]);
//! # }
//! ```

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use lifecycle_private_redis::PrivateRedis;
use tempfile::TempDir;

use crate::{redis_cli_tls, RedisServer, RedisServerOptions, ServerTls};

/// The number of hash slots of a Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;
/// The nodes' `--cluster-node-timeout`: how long a silent node takes to be suspected down.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How many nodes the cluster has: three masters, one replica each.
const NODE_COUNT: usize = 6;
/// How long `redis-cli --cluster create` may take before it is killed.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the cluster may take to be ready (after creation or a restart).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between checks.
const POLL: Duration = Duration::from_millis(50);
/// The launcher's port flag for the cluster bus port.
const CLUSTER_PORT_FLAG: &str = "--cluster-port";
/// Where `redis-cli --cluster create` writes its output (in the first node's directory).
const CREATE_OUTPUT: &str = "cluster-create.out";
/// How many names [`RedisCluster::key_for_master`] tries.
const KEY_SEARCH_LIMIT: u32 = 1_000_000;

/// Six `redis-server` cluster nodes (three masters, three replicas) on free loopback ports;
/// every process is killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes in start order; which are masters changes with failovers.
    nodes: Vec<RedisServer>,
    /// The certificates of a TLS cluster; declared after `nodes`, so its directory is removed
    /// after the nodes are killed.
    tls: Option<ClusterTls>,
}

/// The certificates of a TLS cluster, copied into a temporary directory of its own (so the
/// cluster does not depend on the caller keeping its `TlsFiles` alive).
#[derive(Debug)]
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
struct ClusterTls {
    /// The nodes' server side: their certificate and key (`--tls-cert-file`, `--tls-key-file`) and
    /// the CA (`--tls-ca-cert-file`) that verifies peers and that clients verify the nodes with.
    server: ServerTls,
    /// The certificate a node presents when it connects to another node (cluster bus,
    /// replication: `--tls-client-cert-file`); the server certificate is for serverAuth only,
    /// and the cluster bus always verifies the connecting node's certificate.
    client_cert: PathBuf,
    /// The key of `client_cert` (`--tls-client-key-file`).
    client_key: PathBuf,
    /// The directory holding the copies, removed on drop.
    _dir: TempDir,
}

#[cfg(feature = "tls")]
impl ClusterTls {
    /// Copies the CA, the server and the client certificate and key of `files`.
    fn copy_of(files: &crate::TlsFiles) -> ClusterTls {
        let dir = tempfile::Builder::new()
            .prefix("redis-cluster-tls-")
            .tempdir()
            .expect(
                "test-support: cannot create a temporary directory for the cluster's TLS files",
            );
        let copy = |from: &Path, name: &str| -> PathBuf {
            let to = dir.path().join(name);
            std::fs::copy(from, &to).unwrap_or_else(|err| {
                panic!(
                    "test-support: cannot copy {} to {}: {err}",
                    from.display(),
                    to.display()
                )
            });
            to
        };
        let server = ServerTls {
            cert: copy(&files.server_cert, "server.crt"),
            key: copy(&files.server_key, "server.key"),
            ca_cert: copy(&files.ca_cert, "ca.crt"),
            auth_clients: false,
        };
        let client_cert = copy(&files.client_cert, "client.crt");
        let client_key = copy(&files.client_key, "client.key");
        ClusterTls {
            server,
            client_cert,
            client_key,
            _dir: dir,
        }
    }
}

/// One line of `CLUSTER NODES`: a node as some node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeEntry {
    /// Its node id.
    id: String,
    /// Its client port.
    port: u16,
    /// Its flags (`myself`, `master`, `slave`, `fail?`, `fail`, ...).
    flags: Vec<String>,
    /// The id of its master, for a replica.
    master_id: Option<String>,
    /// The slot ranges it serves, inclusive (open migrations left out).
    slots: Vec<(u16, u16)>,
}

impl NodeEntry {
    /// Whether it carries the flag `flag`.
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|own| own == flag)
    }

    /// Whether it serves `slot`.
    fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| (first..=last).contains(&slot))
    }
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create ... --cluster-replicas 1`,
    /// and waits until the cluster is ready ([`RedisCluster::wait_ready`]).
    pub fn start() -> RedisCluster {
        Self::start_nodes(None)
    }

    /// [`RedisCluster::start`], speaking TLS only, with the certificates of `tls` (copied: `tls`
    /// may be dropped afterwards).
    ///
    /// Every node listens for clients on its TLS port only (its plain port, which the launcher
    /// needs to see it answer `PING`, is closed with `CONFIG SET port 0` as soon as it does, and
    /// again after [`RedisCluster::restart`]), and runs the cluster bus and replication over TLS
    /// (`--tls-cluster yes --tls-replication yes`), so `CLUSTER SLOTS`, `CLUSTER NODES` and
    /// `MOVED` name the TLS ports, which [`RedisCluster::ports`] returns. The nodes present the
    /// server certificate (valid for `127.0.0.1` and `localhost`) to clients and the client
    /// certificate to each other. Clients need no certificate of their own
    /// (`--tls-auth-clients optional`: one that is presented must be signed by the CA); they
    /// verify the nodes with [`RedisCluster::ca_file`].
    #[cfg(feature = "tls")]
    pub fn start_tls(tls: &crate::TlsFiles) -> RedisCluster {
        Self::start_nodes(Some(ClusterTls::copy_of(tls)))
    }

    /// Starts six nodes (TLS-only ones with `tls`), creates the cluster and waits until it is ready.
    fn start_nodes(tls: Option<ClusterTls>) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..NODE_COUNT).map(|_| start_node(tls.as_ref())).collect();
        let cluster = RedisCluster { nodes, tls };
        cluster.create();
        cluster.wait_ready();
        cluster
    }

    /// `redis+cluster://127.0.0.1:A,...,127.0.0.1:F` (`rediss+cluster://...` for a TLS cluster):
    /// all six nodes (killed ones too) as seeds.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let scheme = if self.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", hosts.join(","))
    }

    /// The URL of the first running node, a single seed: `redis://127.0.0.1:<port>/`, or
    /// `rediss://127.0.0.1:<tls port>/` for a TLS cluster.
    pub fn seed_url(&self) -> String {
        self.nodes
            .iter()
            .find(|node| node.is_running())
            .map(|node| {
                if self.tls.is_some() {
                    node.tls_url()
                        .unwrap_or_else(|| panic!("test-support: a TLS node has a TLS URL"))
                } else {
                    node.url()
                }
            })
            .unwrap_or_else(|| panic!("test-support: no node of the cluster is running"))
    }

    /// The CA certificate (PEM) that verifies the nodes of a TLS cluster (their certificate is
    /// valid for `127.0.0.1` and `localhost`); `None` for a plain cluster. Removed on drop.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.server.ca_cert.as_path())
    }

    /// The client ports of all six nodes, in start order (killed ones too); the TLS ports
    /// ([`RedisServer::tls_port`]) for a TLS cluster.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::client_port).collect()
    }

    /// The node on client port `port` (one of [`RedisCluster::ports`]); panics if the cluster has
    /// none there. For a TLS cluster, its [`RedisServer::port`] and [`RedisServer::url`] name the
    /// closed plain port: use [`RedisServer::tls_port`] and [`RedisServer::tls_url`].
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|node| node.client_port() == port)
            .unwrap_or_else(|| panic!("test-support: no node of the cluster on port {port}"))
    }

    /// [`RedisServer::cli`] on the node on `port` (no redirects followed: a `MOVED` reply is returned as text).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        self.node(port).cli(args)
    }

    /// Runs `commands` one after another over a single connection to the node on `port` (so a
    /// `WAIT` counts acknowledgements of the writes before it); trimmed stdout, one reply a line.
    ///
    /// `WAIT` on a connection of its own, as in `cli(port, &["WAIT", "1", "1000"])`, returns at
    /// once, counting every connected replica: it waits only for that connection's own writes.
    pub fn cli_session(&self, port: u16, commands: &[&[&str]]) -> String {
        self.node(port);
        let script: String = commands
            .iter()
            .map(|command| {
                let words: Vec<String> = command.iter().map(|arg| quote(arg)).collect();
                words.join(" ") + "\n"
            })
            .collect();
        let mut child = Command::new("redis-cli")
            .args(self.tls_args())
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("test-support: cannot run redis-cli (is it on the PATH?): {err}")
            });
        if let Some(mut stdin) = child.stdin.take() {
            // Small enough for the pipe's buffer; closing stdin ends the session.
            stdin
                .write_all(script.as_bytes())
                .expect("test-support: cannot write commands to redis-cli");
        }
        let output = child
            .wait_with_output()
            .expect("test-support: cannot read the output of redis-cli");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Reading commands from stdin, redis-cli exits with 0 even when it cannot connect.
        if !output.status.success() || !stderr.trim().is_empty() {
            panic!(
                "test-support: a redis-cli session on port {port} failed with {}\nstderr: {}\nstdout: {}\ncommands:\n{script}",
                output.status,
                stderr.trim(),
                stdout.trim()
            );
        }
        stdout.trim().to_owned()
    }

    /// `redis-cli -c` (following `MOVED`/`ASK`) through the first running node; trimmed stdout, panics on failure.
    pub fn cluster_cli(&self, args: &[&str]) -> String {
        let port = self.running_ports().first().copied().unwrap_or_else(|| {
            panic!("test-support: no node of the cluster is running");
        });
        let mut cluster_args = vec!["-c"];
        cluster_args.extend_from_slice(args);
        let output = self.redis_cli(port, &cluster_args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            panic!(
                "test-support: `redis-cli -c {}` via port {port} failed with {}\nstderr: {}\nstdout: {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                stdout.trim()
            );
        }
        stdout.trim().to_owned()
    }

    /// The running nodes that are masters serving slots, by their own account; sorted.
    pub fn masters(&self) -> Vec<u16> {
        self.running_ports()
            .into_iter()
            .filter(|&port| {
                self.own_entry(port)
                    .is_some_and(|me| me.has_flag("master") && !me.slots.is_empty())
            })
            .collect()
    }

    /// The running nodes that are replicas, by their own account; sorted.
    pub fn replicas(&self) -> Vec<u16> {
        self.running_ports()
            .into_iter()
            .filter(|&port| self.own_entry(port).is_some_and(|me| me.has_flag("slave")))
            .collect()
    }

    /// The port of the master serving `key`'s slot: one that is running and says so itself, else
    /// the one the first answering node names (a killed master, until a failover replaces it).
    pub fn master_of_key(&self, key: &str) -> u16 {
        let slot = key_slot(key);
        if let Some(port) = self.confirmed_owner(slot) {
            return port;
        }
        self.running_ports()
            .into_iter()
            .filter_map(|port| self.view(port))
            .find_map(|view| owner(&view, slot).map(|entry| entry.port))
            .unwrap_or_else(|| {
                panic!(
                    "test-support: no running node names a master of slot {slot} (key {key:?})\n{}",
                    self.state_report()
                )
            })
    }

    /// A key `<prefix><n>` (the smallest such `n`) whose slot the master on `master_port` serves now.
    pub fn key_for_master(&self, prefix: &str, master_port: u16) -> String {
        let me = self
            .own_entry(master_port)
            .filter(|me| me.has_flag("master") && !me.slots.is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "test-support: the node on port {master_port} is not a running master serving slots\n{}",
                    self.state_report()
                )
            });
        (0..KEY_SEARCH_LIMIT)
            .map(|n| format!("{prefix}{n}"))
            .find(|key| me.serves(key_slot(key)))
            .unwrap_or_else(|| {
                panic!(
                    "test-support: no key {prefix:?} + a number up to {KEY_SEARCH_LIMIT} falls on the \
                     master on port {master_port} (does the prefix hold a hash tag `{{...}}`?)"
                )
            })
    }

    /// SIGKILLs the node on `port` and waits for it to exit; idempotent.
    pub fn kill(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// Starts the node on `port` again (same ports, directory and `nodes.conf`, no data) and waits
    /// until the cluster is ready: a master whose slots moved meanwhile rejoins as a replica.
    pub fn restart(&mut self, port: u16) {
        self.node_mut(port).restart();
        self.wait_ready();
    }

    /// Waits until a master other than `old_master_port` serves `key`'s slot: running, answering
    /// `ROLE` as master with `cluster_state:ok`, and named owner by every running node; returns its port.
    pub fn wait_for_failover(&self, old_master_port: u16, key: &str, timeout: Duration) -> u16 {
        let slot = key_slot(key);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(port) = self.confirmed_owner(slot) {
                let agreed = self.running_ports().into_iter().all(|other| {
                    self.view(other)
                        .is_some_and(|view| owner(&view, slot).is_some_and(|o| o.port == port))
                });
                let role = self.ask(port, &["ROLE"]).unwrap_or_default();
                let info = self.ask(port, &["CLUSTER", "INFO"]).unwrap_or_default();
                if port != old_master_port
                    && agreed
                    && role.starts_with("master")
                    && field(&info, "cluster_state") == Some("ok")
                {
                    return port;
                }
            }
            assert!(
                Instant::now() < deadline,
                "test-support: no failover of slot {slot} (key {key:?}) from port {old_master_port} \
                 within {timeout:?}\n{}",
                self.state_report()
            );
            thread::sleep(POLL);
        }
    }

    /// Waits until every running node reports `cluster_state:ok`, all slots assigned and six known
    /// nodes, all running nodes agree on which running master serves which slots, and every
    /// running replica's link to its (running) master is up; panics with the log tails otherwise.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let problem = self.not_ready_because();
            let Some(problem) = problem else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "test-support: the cluster was not ready within {READY_TIMEOUT:?}: {problem}\n{}\n{}",
                self.state_report(),
                self.log_tails()
            );
            thread::sleep(POLL);
        }
    }

    /// Why the cluster is not ready yet, or `None` when it is.
    fn not_ready_because(&self) -> Option<String> {
        let running = self.running_ports();
        if running.is_empty() {
            return Some("no node is running".to_owned());
        }
        let mut slot_map: Option<Vec<(u16, u16, u16)>> = None;
        for &port in &running {
            let Some(info) = self.ask(port, &["CLUSTER", "INFO"]) else {
                return Some(format!("node {port} does not answer CLUSTER INFO"));
            };
            let expected = [
                ("cluster_state", "ok".to_owned()),
                ("cluster_slots_assigned", SLOT_COUNT.to_string()),
                ("cluster_slots_ok", SLOT_COUNT.to_string()),
                ("cluster_known_nodes", NODE_COUNT.to_string()),
            ];
            for (name, value) in expected {
                if field(&info, name) != Some(value.as_str()) {
                    return Some(format!(
                        "node {port} reports {name}:{}",
                        field(&info, name).unwrap_or("?")
                    ));
                }
            }
            let Some(view) = self.view(port) else {
                return Some(format!("node {port} does not answer CLUSTER NODES"));
            };
            let map = slot_map_of(&view);
            if let Some(&(_, _, owner)) = map.iter().find(|(_, _, owner)| !running.contains(owner))
            {
                return Some(format!(
                    "node {port} names node {owner}, which is not running, a master"
                ));
            }
            match &slot_map {
                None => slot_map = Some(map),
                Some(first) if *first != map => {
                    return Some(format!(
                        "node {port} sees other slot owners than the others"
                    ))
                }
                Some(_) => {}
            }
            let Some(me) = view.iter().find(|entry| entry.has_flag("myself")) else {
                return Some(format!("node {port} does not list itself"));
            };
            if me.has_flag("slave") {
                let master = me
                    .master_id
                    .as_ref()
                    .and_then(|id| view.iter().find(|entry| &entry.id == id));
                match master {
                    Some(master) if running.contains(&master.port) => {}
                    _ => return Some(format!("replica {port} follows no running master")),
                }
                let replication = self.ask(port, &["INFO", "replication"]).unwrap_or_default();
                if field(&replication, "master_link_status") != Some("up") {
                    return Some(format!("replica {port}'s link to its master is not up"));
                }
            }
        }
        None
    }

    /// Runs `redis-cli --cluster create` over all nodes (killed after [`CREATE_TIMEOUT`]).
    fn create(&self) {
        let first = self
            .nodes
            .first()
            .unwrap_or_else(|| panic!("test-support: the cluster has no nodes"));
        let output_path = first.dir().join(CREATE_OUTPUT);
        let output = File::create(&output_path)
            .expect("test-support: cannot create the output file of redis-cli --cluster create");
        let errors = output
            .try_clone()
            .expect("test-support: cannot duplicate a file handle");
        let mut command = Command::new("redis-cli");
        command.args(self.tls_args()).arg("--cluster").arg("create");
        for port in self.ports() {
            command.arg(format!("127.0.0.1:{port}"));
        }
        command
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(errors));
        let mut child = command.spawn().unwrap_or_else(|err| {
            panic!("test-support: cannot run redis-cli (is it on the PATH?): {err}")
        });
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        if status.is_some_and(|status| status.success()) {
            return;
        }
        let said = std::fs::read_to_string(&output_path).unwrap_or_default();
        let ended = status.map_or_else(
            || format!("did not finish within {CREATE_TIMEOUT:?} (killed)"),
            |status| format!("failed with {status}"),
        );
        panic!(
            "test-support: `redis-cli --cluster create` {ended}\n--- its output ---\n{said}\n{}",
            self.log_tails()
        );
    }

    /// The running owner of `slot` that says so itself (`myself,master` serving it), if any.
    fn confirmed_owner(&self, slot: u16) -> Option<u16> {
        let running = self.running_ports();
        running
            .iter()
            .filter_map(|&port| self.view(port))
            .filter_map(|view| owner(&view, slot).map(|entry| entry.port))
            .filter(|port| running.contains(port))
            .find(|&port| {
                self.own_entry(port)
                    .is_some_and(|me| me.has_flag("master") && me.serves(slot))
            })
    }

    /// The ports of the running nodes, sorted.
    fn running_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(RedisServer::client_port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// `CLUSTER NODES` of the node on `port`, parsed; `None` if it does not answer.
    fn view(&self, port: u16) -> Option<Vec<NodeEntry>> {
        if !self.node(port).is_running() {
            return None;
        }
        let text = self.ask(port, &["CLUSTER", "NODES"])?;
        let view: Vec<NodeEntry> = text.lines().filter_map(parse_node_line).collect();
        (!view.is_empty()).then_some(view)
    }

    /// The node on `port` as it sees itself (its `myself` line), if it is running and answers.
    fn own_entry(&self, port: u16) -> Option<NodeEntry> {
        self.view(port)?
            .into_iter()
            .find(|entry| entry.has_flag("myself"))
    }

    /// The node on `port`, mutable; panics if the cluster has none there.
    fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|node| node.client_port() == port)
            .unwrap_or_else(|| panic!("test-support: no node of the cluster on port {port}"))
    }

    /// `--tls --cacert <ca>` for a TLS cluster, nothing for a plain one: redis-cli's TLS arguments.
    fn tls_args(&self) -> Vec<&std::ffi::OsStr> {
        match self.ca_file() {
            Some(ca) => vec!["--tls".as_ref(), "--cacert".as_ref(), ca.as_os_str()],
            None => Vec::new(),
        }
    }

    /// `redis-cli` against the node on `port` (over TLS for a TLS cluster); panics only when it cannot run.
    fn redis_cli(&self, port: u16, args: &[&str]) -> Output {
        redis_cli_tls(port, None, self.ca_file(), args)
    }

    /// `redis-cli` against the node on `port`: its trimmed output, `None` when it fails or says nothing.
    fn ask(&self, port: u16, args: &[&str]) -> Option<String> {
        let output = self.redis_cli(port, args);
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !stdout.is_empty()).then_some(stdout)
    }

    /// Each node's port, whether it runs, and its `CLUSTER NODES`, for panic messages.
    fn state_report(&self) -> String {
        let mut report = String::from("--- the nodes' views (CLUSTER NODES) ---");
        for node in &self.nodes {
            let port = node.client_port();
            let _ = write!(report, "\nnode {port}: ");
            if node.is_running() {
                let nodes = self
                    .ask(port, &["CLUSTER", "NODES"])
                    .unwrap_or_else(|| "(no answer)".into());
                let _ = write!(report, "running\n{nodes}");
            } else {
                report.push_str("not running");
            }
        }
        report
    }

    /// The log tails of all nodes, for panic messages.
    fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "=== node {} ===\n{}",
                    node.client_port(),
                    node.server.log_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The hash slot of `key` (CRC16/XMODEM of the key, or of its non-empty `{hash tag}`, mod 16384),
/// as `CLUSTER KEYSLOT` computes it.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&byte| byte == b'{')
        .and_then(|open| {
            let rest = bytes.get(open + 1..)?;
            let close = rest.iter().position(|&byte| byte == b'}')?;
            rest.get(..close).filter(|tag| !tag.is_empty())
        })
        .unwrap_or(bytes);
    crc16(hashed) % SLOT_COUNT
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum of Redis Cluster's key slots.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0_u16, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            }
        })
    })
}

/// Starts one cluster node: a [`RedisServer`] whose cluster bus gets a free port of its own;
/// with `tls`, TLS-only (clients, cluster bus, replication).
fn start_node(tls: Option<&ClusterTls>) -> RedisServer {
    let mut extra_args = [
        "--cluster-enabled",
        "yes",
        // Relative to `--dir`, which the launcher passes first: the node's own directory.
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        &NODE_TIMEOUT.as_millis().to_string(),
        // A replica may fail over however long its link has been down.
        "--cluster-replica-validity-factor",
        "0",
        "--cluster-allow-reads-when-down",
        "no",
        // Redis 7.0 waits 5 s for more replicas before a diskless full sync: no need here.
        "--repl-diskless-sync-delay",
        "0",
        "--appendonly",
        "no",
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(tls) = tls {
        extra_args.extend(
            [
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
                // After `ServerTls`'s `--tls-auth-clients no`: a client may present no certificate,
                // and a replica presents its client certificate, which is verified.
                "--tls-auth-clients",
                "optional",
            ]
            .map(str::to_owned),
        );
        extra_args.extend([
            "--tls-client-cert-file".to_owned(),
            tls.client_cert.to_string_lossy().into_owned(),
            "--tls-client-key-file".to_owned(),
            tls.client_key.to_string_lossy().into_owned(),
        ]);
    }
    let options = RedisServerOptions {
        extra_args,
        tls: tls.map(|tls| tls.server.clone()),
        ..RedisServerOptions::default()
    };
    // The launcher gives each port flag a free port of its own (fresh ones on every retry), so
    // the bus port is as free as the client port, which port + 10000 need not be. With TLS, the
    // TLS port is the first of them (`RedisServer::tls_port`), the bus port the second.
    let mut launcher = options.launcher_options();
    launcher.port_flags.push(CLUSTER_PORT_FLAG.to_owned());
    let mut node = match PrivateRedis::start_with(launcher) {
        Ok(server) => RedisServer {
            server,
            options,
            tls_only: false,
        },
        Err(err) => panic!("test-support: a cluster node did not start: {err}"),
    };
    if tls.is_some() {
        node.close_plain_port();
    }
    node
}

/// `arg` double-quoted for a command line redis-cli reads from stdin.
fn quote(arg: &str) -> String {
    let mut quoted = String::with_capacity(arg.len() + 2);
    quoted.push('"');
    for character in arg.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}

/// The value of `name:` in `INFO`-style text.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Parses a `CLUSTER NODES` line: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
/// <pong-recv> <config-epoch> <link-state> <slot>...`.
fn parse_node_line(line: &str) -> Option<NodeEntry> {
    let mut fields = line.split_whitespace();
    let id = fields.next()?.to_owned();
    let address = fields.next()?;
    let host_port = address.split(['@', ',']).next()?;
    let port = host_port.rsplit(':').next()?.parse().ok()?;
    let flags = fields.next()?.split(',').map(str::to_owned).collect();
    let master_id = Some(fields.next()?)
        .filter(|master| *master != "-")
        .map(str::to_owned);
    // ping-sent, pong-recv, config-epoch, link-state.
    let slots = fields
        .skip(4)
        .filter(|slot| !slot.starts_with('['))
        .filter_map(|slot| match slot.split_once('-') {
            Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
            None => {
                let single = slot.parse().ok()?;
                Some((single, single))
            }
        })
        .collect();
    Some(NodeEntry {
        id,
        port,
        flags,
        master_id,
        slots,
    })
}

/// The master serving `slot` in `view`, if any.
fn owner(view: &[NodeEntry], slot: u16) -> Option<&NodeEntry> {
    view.iter()
        .find(|entry| entry.has_flag("master") && entry.serves(slot))
}

/// The slot ranges of `view` with the port serving each, sorted.
fn slot_map_of(view: &[NodeEntry]) -> Vec<(u16, u16, u16)> {
    let mut map: Vec<(u16, u16, u16)> = view
        .iter()
        .filter(|entry| entry.has_flag("master"))
        .flat_map(|entry| {
            entry
                .slots
                .iter()
                .map(move |&(first, last)| (first, last, entry.port))
        })
        .collect();
    map.sort_unstable();
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_reference_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn key_slots_follow_hash_tags() {
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("a{b}c{d}"), key_slot("b"));
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(key_slot("{}x"), crc16(b"{}x") % SLOT_COUNT);
        assert_eq!(key_slot("x{y"), crc16(b"x{y") % SLOT_COUNT);
    }

    #[test]
    fn cluster_nodes_lines_are_parsed() {
        let line =
            "c9676 127.0.0.1:21003@23003,host master,fail - 1 2 3 disconnected 0-5 7 [8->-abc]";
        let entry = parse_node_line(line).expect("a valid line");
        assert_eq!(entry.id, "c9676");
        assert_eq!(entry.port, 21003);
        assert!(entry.has_flag("master") && entry.has_flag("fail"));
        assert_eq!(entry.master_id, None);
        assert_eq!(entry.slots, vec![(0, 5), (7, 7)]);
        assert!(entry.serves(5) && entry.serves(7) && !entry.serves(6) && !entry.serves(8));

        let replica = "6c07 127.0.0.1:21004@23004 myself,slave c9676 0 1 1 connected";
        let entry = parse_node_line(replica).expect("a valid line");
        assert_eq!(entry.master_id.as_deref(), Some("c9676"));
        assert!(entry.slots.is_empty());
        assert_eq!(parse_node_line(""), None);
    }

    #[test]
    fn arguments_are_quoted_for_stdin() {
        assert_eq!(quote("plain"), r#""plain""#);
        assert_eq!(quote("a b"), r#""a b""#);
        assert_eq!(quote("q\"b\\n\n"), r#""q\"b\\n\n""#);
    }
}
