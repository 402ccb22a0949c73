//! A TCP proxy for fault injection: put it between a client and a
//! redis-server, then cut its connections, stall them, or slow them down.
//!
//! Plain std threads: one accepting, two per connection (one per direction).
//!
//! ```no_run
//! use lifecycle_test_support::{RedisServer, TcpProxy};
//! let server = RedisServer::start();
//! let proxy = TcpProxy::start(server.port());
//! let _url = format!("redis://127.0.0.1:{}/", proxy.port());
//! proxy.cut(); // every current connection is closed; new ones are accepted
//! proxy.pause(); // bytes stop flowing (both directions, old and new connections)
//! proxy.resume();
//! proxy.swallow_replies(); // requests still reach the server, its replies are dropped
//! proxy.forward_replies();
//! ```

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long connecting to the upstream may take before the client is dropped.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes forwarded per read.
const CHUNK: usize = 64 * 1024;

/// A TCP proxy on a free `127.0.0.1` port forwarding to `127.0.0.1:<upstream>`;
/// stops listening and closes every connection when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// State shared by the handle and the proxy's threads.
#[derive(Debug, Default)]
struct Shared {
    /// Set on drop: the acceptor stops.
    closing: AtomicBool,
    /// Whether forwarding is paused; threads wait on `resumed` while it is.
    paused: Mutex<bool>,
    resumed: Condvar,
    /// Extra delay before each forwarded chunk.
    delay: Mutex<Duration>,
    /// Whether bytes from the server are read and dropped instead of
    /// forwarded: a request's effect happens, its reply is lost.
    swallowing: AtomicBool,
    /// Bytes from the server dropped so far.
    swallowed: AtomicU64,
    /// Open connections by number: the client side and the upstream side.
    connections: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    /// Connections accepted so far (including ones whose upstream failed).
    accepted: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TcpProxy {
    /// Starts a proxy on a free port forwarding to `127.0.0.1:<upstream_port>`.
    ///
    /// # Panics
    ///
    /// When no local port can be bound.
    pub fn start(upstream_port: u16) -> TcpProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("test-support: proxy cannot bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("test-support: proxy cannot read its address")
            .port();
        let shared = Arc::new(Shared::default());
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, upstream_port));
        let accepting = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name(format!("proxy-{port}-accept"))
            .spawn(move || accept_loop(&listener, upstream, &accepting))
            .expect("test-support: cannot spawn the proxy's accept thread");
        TcpProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every current connection (both sides); keeps listening.
    /// Returns how many connections were closed.
    pub fn cut(&self) -> usize {
        let connections: Vec<(TcpStream, TcpStream)> = lock(&self.shared.connections)
            .drain()
            .map(|(_, c)| c)
            .collect();
        for (client, upstream) in &connections {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
        connections.len()
    }

    /// Stops forwarding bytes in both directions, on current and new
    /// connections (new ones are still accepted): a stall. Data waits.
    pub fn pause(&self) {
        *lock(&self.shared.paused) = true;
    }

    /// Forwards again, starting with what waited.
    pub fn resume(&self) {
        *lock(&self.shared.paused) = false;
        self.shared.resumed.notify_all();
    }

    /// Delays every forwarded chunk by `delay` (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.shared.delay) = delay;
    }

    /// Reads the server's bytes and drops them, on current and new
    /// connections, while requests still go through: the server acts on a
    /// command and its reply never arrives (then [`TcpProxy::cut`] the
    /// connection for a lost reply). Bytes already forwarded are unaffected.
    pub fn swallow_replies(&self) {
        self.shared.swallowing.store(true, Ordering::SeqCst);
    }

    /// Forwards the server's bytes again (those swallowed stay lost).
    pub fn forward_replies(&self) {
        self.shared.swallowing.store(false, Ordering::SeqCst);
    }

    /// Bytes from the server swallowed so far.
    pub fn swallowed_bytes(&self) -> u64 {
        self.shared.swallowed.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.connections).len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.resume();
        // Wake the acceptor blocked in `accept`.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            Duration::from_secs(1),
        );
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.cut();
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    let mut next_id: u64 = 0;
    for client in listener.incoming() {
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(server) = TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT) else {
            // Upstream down: the client sees its connection closed.
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(client_read), Ok(server_read), Ok(client_write), Ok(server_write)) = clones else {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            continue;
        };
        next_id += 1;
        let id = next_id;
        lock(&shared.connections).insert(id, (client, server));
        for (from, to, direction) in [
            (client_read, server_write, Direction::Up),
            (server_read, client_write, Direction::Down),
        ] {
            let forwarding = Arc::clone(shared);
            let spawned = thread::Builder::new()
                .name(format!("proxy-conn-{id}-{}", direction.name()))
                .spawn(move || forward(from, to, direction, id, &forwarding));
            if spawned.is_err() {
                close(shared, id);
            }
        }
    }
}

/// Which way a forwarding thread copies bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Client to server: requests.
    Up,
    /// Server to client: replies.
    Down,
}

impl Direction {
    /// The thread name's suffix.
    fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// Closes connection `id` (both sides), if still open.
fn close(shared: &Shared, id: u64) {
    if let Some((client, server)) = lock(&shared.connections).remove(&id) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }
}

/// Copies `from` to `to` until either side closes or fails, honouring pause,
/// delay and (replies only) swallowing; then closes the whole connection.
fn forward(mut from: TcpStream, mut to: TcpStream, direction: Direction, id: u64, shared: &Shared) {
    let mut buf = vec![0_u8; CHUNK];
    loop {
        let read = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        {
            let mut paused = lock(&shared.paused);
            while *paused {
                paused = shared
                    .resumed
                    .wait(paused)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        let delay = *lock(&shared.delay);
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        let Some(chunk) = buf.get(..read) else {
            break;
        };
        if direction == Direction::Down && shared.swallowing.load(Ordering::SeqCst) {
            shared.swallowed.fetch_add(read as u64, Ordering::SeqCst);
            continue;
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    close(shared, id);
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::time::Instant;

    use super::*;
    use crate::RedisServer;

    /// A connection through the proxy that sends `PING` and reads one line.
    struct Client {
        writer: TcpStream,
        reader: BufReader<TcpStream>,
    }

    impl Client {
        fn connect(proxy: &TcpProxy) -> Client {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            Client {
                writer: stream.try_clone().unwrap(),
                reader: BufReader::new(stream),
            }
        }

        fn send_ping(&mut self) {
            self.writer.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        }

        fn line(&mut self) -> std::io::Result<String> {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            Ok(line.trim_end().to_owned())
        }

        fn ping(&mut self) -> std::io::Result<String> {
            self.send_ping();
            self.line()
        }
    }

    #[test]
    fn forwards_both_ways() {
        let server = RedisServer::start();
        let proxy = TcpProxy::start(server.port());
        let mut client = Client::connect(&proxy);
        assert_eq!(client.ping().unwrap(), "+PONG");
        assert_eq!(proxy.accepted(), 1);
        assert_eq!(proxy.open_connections(), 1);
    }

    #[test]
    fn cut_closes_current_connections_and_keeps_listening() {
        let server = RedisServer::start();
        let proxy = TcpProxy::start(server.port());
        let mut client = Client::connect(&proxy);
        assert_eq!(client.ping().unwrap(), "+PONG");
        assert_eq!(proxy.cut(), 1);
        assert!(client.ping().is_err(), "the cut connection still answers");
        let mut again = Client::connect(&proxy);
        assert_eq!(again.ping().unwrap(), "+PONG");
        assert_eq!(proxy.accepted(), 2);
    }

    #[test]
    fn pause_holds_bytes_until_resume() {
        let server = RedisServer::start();
        let proxy = TcpProxy::start(server.port());
        let mut client = Client::connect(&proxy);
        assert_eq!(client.ping().unwrap(), "+PONG");
        proxy.pause();
        client
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        client.send_ping();
        let err = client.line().unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        proxy.resume();
        client
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(client.line().unwrap(), "+PONG");
    }

    #[test]
    fn swallowed_replies_are_lost_while_requests_take_effect() {
        let server = RedisServer::start();
        let proxy = TcpProxy::start(server.port());
        let mut client = Client::connect(&proxy);
        assert_eq!(client.ping().unwrap(), "+PONG");
        proxy.swallow_replies();
        client
            .writer
            .write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
            .unwrap();
        // The server acted on it, and its reply (`+OK\r\n`) was dropped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.swallowed_bytes() < 5 {
            assert!(Instant::now() < deadline, "no reply swallowed");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(server.cli(&["GET", "k"]), "v");
        assert_eq!(proxy.swallowed_bytes(), 5);
        proxy.forward_replies();
        assert_eq!(
            client.ping().unwrap(),
            "+PONG",
            "a swallowed reply was delivered"
        );
    }

    #[test]
    fn delay_slows_every_chunk() {
        let server = RedisServer::start();
        let proxy = TcpProxy::start(server.port());
        let mut client = Client::connect(&proxy);
        proxy.set_delay(Duration::from_millis(100));
        let began = Instant::now();
        assert_eq!(client.ping().unwrap(), "+PONG");
        // One chunk each way.
        assert!(began.elapsed() >= Duration::from_millis(200));
        proxy.set_delay(Duration::ZERO);
        assert_eq!(client.ping().unwrap(), "+PONG");
    }

    #[test]
    fn drop_closes_everything() {
        let server = RedisServer::start();
        let proxy = TcpProxy::start(server.port());
        let port = proxy.port();
        let mut client = Client::connect(&proxy);
        assert_eq!(client.ping().unwrap(), "+PONG");
        drop(proxy);
        assert!(client.ping().is_err());
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    }
}
