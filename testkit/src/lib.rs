//! Test support for the orchestrator: real Redis and RabbitMQ servers, and
//! test certificates.
//!
//! Every server runs as a real child process on a free `127.0.0.1` port, with
//! its own temporary data directory, so tests never touch a system instance
//! and never collide with each other:
//!
//! * [`RedisServer`]: a `redis-server` with an fsync-always append-only file,
//!   so data acknowledged before a [`RedisServer::kill`] survives a
//!   [`RedisServer::start_again`].
//! * [`RabbitServer`]: an isolated RabbitMQ node (own node name, own AMQP,
//!   distribution and epmd ports, own Mnesia directory), so durable queues and
//!   persistent messages survive [`RabbitServer::kill`] +
//!   [`RabbitServer::start_again`].
//! * [`TestCerts`]: a CA with server and client certificates made at run
//!   time, for TLS tests; [`RedisServer::start_tls`] and
//!   [`RabbitServer::start_tls`] start servers that also listen with TLS.
//! * [`shared_redis_url`] / [`shared_amqp_url`]: one server of each kind per
//!   test process (or the ones `scripts/test.sh` started, through
//!   `ORCH_TEST_REDIS_URL` / `ORCH_TEST_AMQP_URL`), for tests that only need
//!   *a* server. Isolate such tests with [`unique_name`] (key prefixes, queue
//!   names).
//!
//! The API is synchronous; from a `#[tokio::test]` call it directly (a start
//! blocks the calling thread for a moment: well under a second for Redis,
//! ~5–10 s for RabbitMQ) or wrap it in `tokio::task::spawn_blocking`.
//!
//! Child processes die with the test process: they are started through
//! `setpriv --pdeathsig KILL` from one dedicated thread that lives as long as
//! the process, so even a test binary that panics, aborts or is killed leaves
//! no server behind. Temporary directories of servers whose test process died
//! without cleaning up are swept the next time a server starts.
//!
//! The binaries come from Debian packages (`redis-server`, `rabbitmq-server`,
//! `util-linux`); when one is missing, the panic says to run
//! `scripts/install-deps.sh`.
//!
//! ```no_run
//! use orchestrator_testkit::{RedisServer, unique_name};
//!
//! let mut redis = RedisServer::start();
//! let url = redis.url(); // redis://127.0.0.1:PORT/
//! let prefix = unique_name("jobs");
//! // ... write through `url` under `prefix`, then simulate a crash:
//! redis.kill();
//! redis.start_again(); // same port, same data
//! ```

#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// Environment variable holding the Redis URL of a server started outside
/// the test process (set by `scripts/test.sh`); used by [`shared_redis_url`].
pub const REDIS_URL_ENV: &str = "ORCH_TEST_REDIS_URL";

/// Environment variable holding the AMQP URL of a broker started outside the
/// test process (set by `scripts/test.sh`); used by [`shared_amqp_url`].
pub const AMQP_URL_ENV: &str = "ORCH_TEST_AMQP_URL";

/// Where Debian's `rabbitmq-server` package keeps the real RabbitMQ scripts
/// (the `/usr/sbin` wrappers switch to the `rabbitmq` user and its data dir).
const RABBITMQ_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";

/// How long a Redis server may take to answer `PING`.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a RabbitMQ node may take to boot (cold start is ~5–10 s on two
/// cores; several nodes booting at once on a busy CI machine take longer).
const RABBIT_START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a stopped or killed process may take to release its port.
const PORT_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Prefix of every temporary directory this crate creates.
const DIR_PREFIX: &str = "orchtest-";

// ---------------------------------------------------------------------------
// Shared servers
// ---------------------------------------------------------------------------

/// URL of a Redis server shared by all tests of this process.
///
/// Returns `$ORCH_TEST_REDIS_URL` when it is set and not empty (as it is
/// under `scripts/test.sh`); otherwise starts one [`RedisServer`] on first
/// use and returns its URL for the rest of the process. The server lives
/// until the process exits. Tests sharing it must isolate their data, e.g.
/// with a key prefix from [`unique_name`].
pub fn shared_redis_url() -> String {
    if let Some(url) = non_empty_env(REDIS_URL_ENV) {
        return url;
    }
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    SHARED.get_or_init(RedisServer::start).url()
}

/// URL of a RabbitMQ broker shared by all tests of this process.
///
/// Returns `$ORCH_TEST_AMQP_URL` when it is set and not empty (as it is
/// under `scripts/test.sh`); otherwise starts one [`RabbitServer`] on first
/// use and returns its URL for the rest of the process. The broker lives
/// until the process exits. Tests sharing it must isolate their queues and
/// exchanges, e.g. with names from [`unique_name`].
pub fn shared_amqp_url() -> String {
    if let Some(url) = non_empty_env(AMQP_URL_ENV) {
        return url;
    }
    static SHARED: OnceLock<RabbitServer> = OnceLock::new();
    SHARED.get_or_init(RabbitServer::start).url()
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

// ---------------------------------------------------------------------------
// Names and ports
// ---------------------------------------------------------------------------

/// A fresh name `PREFIX-xxxxxxxxxx` (ten random lowercase letters and
/// digits) for per-test isolation: Redis key prefixes, queue and exchange
/// names, consumer tags. The suffix carries about 51 random bits, so two
/// calls (in one process or in concurrent ones) practically never collide.
/// An empty prefix gives just the random part.
pub fn unique_name(prefix: &str) -> String {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = random_u64();
    let suffix: String = (0..10)
        .map(|_| {
            let c = ALPHABET[(n % 36) as usize] as char;
            n /= 36;
            c
        })
        .collect();
    if prefix.is_empty() {
        suffix
    } else {
        format!("{prefix}-{suffix}")
    }
}

/// A TCP port that is currently free on the loopback interface (and on the
/// wildcard address), for a server to listen on.
///
/// Ports are drawn at random below the kernel's ephemeral range, so outgoing
/// connections cannot grab them and concurrent test processes rarely pick
/// the same one; a port is never handed out twice by one process. As with
/// any such helper, another process may still take the port before the
/// server binds it; the servers of this crate retry with a new port when
/// that happens on their first start.
pub fn free_port() -> u16 {
    static ISSUED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut issued = ISSUED.lock().unwrap_or_else(PoisonError::into_inner);

    let low: u16 = 20_000;
    let high = ephemeral_port_low().clamp(low, 32_768);
    if high - low >= 1_000 {
        for _ in 0..2_000 {
            let port = low + (random_u64() % u64::from(high - low)) as u16;
            if !issued.contains(&port) && port_is_bindable(port) {
                issued.insert(port);
                return port;
            }
        }
    }
    // Fallback: let the kernel choose (from the ephemeral range).
    for _ in 0..100 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0 to find a free port")
            .port();
        if !issued.contains(&port) && port_is_bindable(port) {
            issued.insert(port);
            return port;
        }
    }
    panic!("could not find a free TCP port on 127.0.0.1");
}

/// First port of the kernel's ephemeral (outgoing connection) range.
fn ephemeral_port_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Whether nothing listens on `port`: it can be bound on 127.0.0.1, on
/// 0.0.0.0 and (when IPv6 is available) on ::1.
fn port_is_bindable(port: u16) -> bool {
    let v4 = [Ipv4Addr::LOCALHOST, Ipv4Addr::UNSPECIFIED]
        .iter()
        .all(|ip| TcpListener::bind((*ip, port)).is_ok());
    if !v4 {
        return false;
    }
    match TcpListener::bind((Ipv6Addr::LOCALHOST, port)) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::AddrInUse,
    }
}

/// 64 random bits: std's per-process random hash keys, mixed with a counter,
/// the clock and the PID (no extra dependency needed for test names).
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

// ---------------------------------------------------------------------------
// Process plumbing
// ---------------------------------------------------------------------------

/// A unit of work for the spawner thread.
type SpawnJob = Box<dyn FnOnce() + Send + 'static>;

/// Spawns `program args...` through `setpriv --pdeathsig KILL`, so the
/// kernel SIGKILLs it when its parent goes away.
///
/// PDEATHSIG fires when the *thread* that forked the child exits, not the
/// process. Test threads (and tokio's blocking threads) come and go, so every
/// server is forked from one dedicated thread that only ends with the
/// process: servers live exactly as long as the test process.
fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        thread::Builder::new()
            .name("orch-testkit-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop never ends.
                for job in rx {
                    job();
                }
            })
            .expect("start the orchestrator-testkit spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let job: SpawnJob = Box::new(move || {
        let _ = reply_tx.send(cmd.spawn());
    });
    spawner
        .send(job)
        .expect("orchestrator-testkit spawner thread is gone");
    reply_rx
        .recv()
        .expect("orchestrator-testkit spawner thread did not answer")
}

/// A `Command` running `program args...` under `setpriv --pdeathsig KILL`,
/// with stdin closed and stdout/stderr appended to `output`.
fn tied_command(program: &Path, output: &Path) -> Command {
    let setpriv = require_program("setpriv", &["/usr/bin/setpriv"]);
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .unwrap_or_else(|e| panic!("open {}: {e}", output.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("dup {}: {e}", output.display()));
    let mut cmd = Command::new(setpriv);
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(program)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    cmd
}

/// Finds `name` on `PATH` or at one of `fallbacks`, or panics with the
/// install hint.
fn require_program(name: &str, fallbacks: &[&str]) -> PathBuf {
    find_program(name, fallbacks).unwrap_or_else(|| {
        panic!(
            "`{name}` not found (PATH or {fallbacks:?}): the tests need real Redis and RabbitMQ \
             binaries; run scripts/install-deps.sh"
        )
    })
}

fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    });
    on_path.or_else(|| {
        fallbacks
            .iter()
            .map(PathBuf::from)
            .find(|p| is_executable(p))
    })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `child` is still running (reaps it if it exited).
fn is_running(child: &mut Option<Child>) -> bool {
    match child {
        Some(c) => matches!(c.try_wait(), Ok(None)),
        None => false,
    }
}

/// SIGKILLs and reaps `child`, if any.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits up to `timeout` for `child` to exit on its own, then SIGKILLs it.
fn wait_or_kill(child: &mut Option<Child>, timeout: Duration) {
    if let Some(c) = child.as_mut() {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !matches!(c.try_wait(), Ok(None)) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    kill_child(child);
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Waits until nothing accepts connections on `port` any more.
fn wait_port_closed(port: u16, what: &str) {
    let deadline = Instant::now() + PORT_CLOSE_TIMEOUT;
    while port_open(port) {
        assert!(
            Instant::now() < deadline,
            "{what}: port {port} still accepts connections {PORT_CLOSE_TIMEOUT:?} after the process ended"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a text file, or a note that it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!(
                "--- {} (last {} lines) ---\n{}\n",
                path.display(),
                all.len() - start,
                all[start..].join("\n")
            )
        }
        Err(e) => format!("--- {}: {e} ---\n", path.display()),
    }
}

/// A temporary directory `orchtest-KIND-PID-xxxxxx`; the PID lets later runs
/// remove directories of test processes that died without cleaning up.
fn make_temp_dir(kind: &str) -> TempDir {
    sweep_stale_dirs();
    tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{kind}-{}-", std::process::id()))
        .tempdir()
        .unwrap_or_else(|e| panic!("create a temporary directory for {kind}: {e}"))
}

/// Once per process, removes `orchtest-*-PID-*` directories whose process no
/// longer exists (left over by shared servers, which are never dropped, or
/// by killed test processes).
fn sweep_stale_dirs() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
                continue;
            };
            // rest = KIND-PID-RANDOM
            let mut parts = rest.splitn(3, '-');
            let (Some(kind), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            let ours = matches!(kind, "redis" | "rabbit");
            let dead = pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists();
            if ours && dead && entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A real `redis-server` for one test (or a few), on a free 127.0.0.1 port
/// with its own data directory.
///
/// It runs in the foreground (not daemonized) with `--appendonly yes
/// --appendfsync always --save ""`: every acknowledged write is on disk, so
/// it survives [`kill`](Self::kill) followed by
/// [`start_again`](Self::start_again). Dropping the value kills the server
/// and removes its directory.
pub struct RedisServer {
    port: u16,
    /// The TLS port and the certificate files, for [`RedisServer::start_tls`].
    tls: Option<(u16, [PathBuf; 3])>,
    program: PathBuf,
    child: Option<Child>,
    // Last field: dropped (directory removed) after `Drop::drop` killed the server.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If `redis-server` is missing (run `scripts/install-deps.sh`) or the
    /// server does not come up within 30 s (the panic shows its log).
    pub fn start() -> RedisServer {
        RedisServer::start_with(None)
    }

    /// Starts a server that also listens with TLS (the server certificate
    /// of `certs`, no client certificate asked for) on a second port, for
    /// [`tls_url`](Self::tls_url); the plain port stays for the readiness
    /// check and [`url`](Self::url).
    pub fn start_tls(certs: &TestCerts) -> RedisServer {
        let files = [
            certs.server_cert.clone(),
            certs.server_key.clone(),
            certs.ca_cert.clone(),
        ];
        RedisServer::start_with(Some(files))
    }

    fn start_with(tls: Option<[PathBuf; 3]>) -> RedisServer {
        let program = require_program("redis-server", &["/usr/bin/redis-server"]);
        let mut server = RedisServer {
            port: 0,
            tls: tls.map(|files| (0, files)),
            program,
            child: None,
            dir: make_temp_dir("redis"),
        };
        let mut failures = String::new();
        for attempt in 1..=3 {
            server.port = free_port();
            if let Some((port, _)) = &mut server.tls {
                *port = free_port();
            }
            match server.launch() {
                Ok(()) => return server,
                // The port may have been taken by another process: retry.
                Err(StartFailure::Exited(msg)) => {
                    failures += &format!("attempt {attempt} (port {}): {msg}\n", server.port);
                }
                Err(StartFailure::TimedOut(msg)) => {
                    failures += &format!("attempt {attempt} (port {}): {msg}\n", server.port);
                    break;
                }
            }
        }
        panic!("redis-server did not start:\n{failures}");
    }

    /// The URL clients connect with: `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port on 127.0.0.1; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS URL, `rediss://127.0.0.1:PORT/`, of a server started with
    /// [`start_tls`](Self::start_tls).
    ///
    /// # Panics
    ///
    /// If the server was started without TLS.
    pub fn tls_url(&self) -> String {
        let (port, _) = self
            .tls
            .as_ref()
            .expect("started with RedisServer::start_tls");
        format!("rediss://127.0.0.1:{port}/")
    }

    /// The server's working directory (append-only file, `redis.log`).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        is_running(&mut self.child)
    }

    /// Simulates a crash: SIGKILLs the server and waits until its port is
    /// closed. Writes acknowledged before the kill are on disk.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
        wait_port_closed(self.port, "redis-server");
    }

    /// Stops the server gracefully (`SHUTDOWN`) and waits until its port is
    /// closed; SIGKILLs it if it takes longer than 30 s.
    pub fn stop(&mut self) {
        if self.is_running() {
            // The server closes the connection instead of answering.
            let _ = redis_command(self.port, &["SHUTDOWN"]);
            wait_or_kill(&mut self.child, Duration::from_secs(30));
        }
        self.child = None;
        wait_port_closed(self.port, "redis-server");
    }

    /// Starts the server again on the same port and the same data directory
    /// (stopping it gracefully first if it is still running) and waits until
    /// it has loaded its data and answers `PING`.
    ///
    /// # Panics
    ///
    /// If the server does not come back (e.g. the port was taken meanwhile).
    pub fn start_again(&mut self) {
        if self.is_running() {
            self.stop();
        }
        if let Err(StartFailure::Exited(msg) | StartFailure::TimedOut(msg)) = self.launch() {
            panic!("redis-server did not restart on port {}:\n{msg}", self.port);
        }
    }

    fn launch(&mut self) -> Result<(), StartFailure> {
        let dir = self.dir.path().to_path_buf();
        let mut cmd = tied_command(&self.program, &dir.join("redis.out"));
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(&dir)
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .current_dir(&dir);
        if let Some((port, [cert, key, ca])) = &self.tls {
            cmd.arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]);
        }
        let child = spawn_tied_to_process(cmd)
            .map_err(|e| StartFailure::Exited(format!("cannot spawn redis-server: {e}")))?;
        self.child = Some(child);

        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if !self.is_running() {
                self.child = None;
                return Err(StartFailure::Exited(format!(
                    "redis-server exited during startup\n{}",
                    self.logs()
                )));
            }
            if let Ok(Resp::Simple(pong)) = redis_command(self.port, &["PING"])
                && pong == "PONG"
            {
                return self.check_identity();
            }
            if Instant::now() > deadline {
                kill_child(&mut self.child);
                return Err(StartFailure::TimedOut(format!(
                    "redis-server did not answer PING within {REDIS_START_TIMEOUT:?}\n{}",
                    self.logs()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes sure the server answering on our port is ours (and not another
    /// process that took the port while ours failed to bind it).
    fn check_identity(&mut self) -> Result<(), StartFailure> {
        let ours = match redis_command(self.port, &["CONFIG", "GET", "dir"]) {
            Ok(Resp::Array(Some(items))) => items.iter().any(|item| {
                matches!(item, Resp::Bulk(Some(v)) if Path::new(&*String::from_utf8_lossy(v)) == self.dir.path())
            }),
            _ => false,
        };
        if ours && self.is_running() {
            Ok(())
        } else {
            kill_child(&mut self.child);
            Err(StartFailure::Exited(format!(
                "another server answers on port {}\n{}",
                self.port,
                self.logs()
            )))
        }
    }

    fn logs(&self) -> String {
        let dir = self.dir.path();
        tail(&dir.join("redis.log"), 30) + &tail(&dir.join("redis.out"), 10)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Why a server did not start.
enum StartFailure {
    /// The process ended (e.g. its port was taken): worth retrying elsewhere.
    Exited(String),
    /// The process never became ready: retrying would only waste time.
    TimedOut(String),
}

/// A RESP reply, as far as the readiness checks and tests need one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// Sends one command to the Redis server on 127.0.0.1:`port` over raw RESP
/// and reads its reply (no Redis client library needed).
fn redis_command(port: u16, args: &[&str]) -> io::Result<Resp> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;
    read_resp(&mut io::BufReader::new(stream))
}

fn read_resp(r: &mut impl io::BufRead) -> io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad RESP line {line:?}"),
        )
    };
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    Ok(match kind {
        "+" => Resp::Simple(rest.to_owned()),
        "-" => Resp::Error(rest.to_owned()),
        ":" => Resp::Integer(rest.parse().map_err(|_| bad())?),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                Resp::Bulk(None)
            } else {
                let mut buf = vec![0; len as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(len as usize);
                Resp::Bulk(Some(buf))
            }
        }
        "*" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                Resp::Array(None)
            } else {
                let items = (0..len).map(|_| read_resp(r)).collect::<io::Result<_>>()?;
                Resp::Array(Some(items))
            }
        }
        _ => return Err(bad()),
    })
}

// ---------------------------------------------------------------------------
// RabbitMQ
// ---------------------------------------------------------------------------

/// A real, isolated RabbitMQ node for one test (or a few).
///
/// The node has a unique name (`orchtest-xxxxxxxxxx@localhost`), a free AMQP
/// port on 127.0.0.1, its own Erlang distribution port, its own `epmd` on a
/// private loopback port, and its own `HOME` (Erlang cookie), Mnesia, log
/// and configuration files in a temporary directory; no system-wide
/// RabbitMQ configuration (`/etc/rabbitmq`) is read and no plugin is
/// enabled. The default `guest`/`guest` user works over 127.0.0.1.
///
/// Durable queues and persistent messages survive [`kill`](Self::kill)
/// followed by [`start_again`](Self::start_again) (same ports, same Mnesia
/// directory). Dropping the value kills the node and its `epmd` and removes
/// the directory.
pub struct RabbitServer {
    node: String,
    amqp_port: u16,
    /// The AMQPS port and the certificate files, for
    /// [`RabbitServer::start_tls`].
    tls: Option<(u16, [PathBuf; 3])>,
    dist_port: u16,
    epmd_port: u16,
    server_bin: PathBuf,
    ctl_bin: PathBuf,
    epmd_bin: PathBuf,
    beam: Option<Child>,
    epmd: Option<Child>,
    // Last field: dropped (directory removed) after `Drop::drop` killed the node.
    dir: TempDir,
}

impl RabbitServer {
    /// Starts a node and waits until its AMQP port accepts connections and
    /// `rabbitmqctl await_startup` succeeds (~5–10 s).
    ///
    /// # Panics
    ///
    /// If RabbitMQ is not installed (run `scripts/install-deps.sh`) or the
    /// node is not up within 120 s (the panic shows the tail of its log).
    pub fn start() -> RabbitServer {
        RabbitServer::start_with(None)
    }

    /// Starts a node that also has a TLS listener (the server certificate of
    /// `certs`, no client certificate asked for) on a second port, for
    /// [`tls_url`](Self::tls_url).
    pub fn start_tls(certs: &TestCerts) -> RabbitServer {
        let files = [
            certs.server_cert.clone(),
            certs.server_key.clone(),
            certs.ca_cert.clone(),
        ];
        RabbitServer::start_with(Some(files))
    }

    fn start_with(tls: Option<[PathBuf; 3]>) -> RabbitServer {
        let bin = Path::new(RABBITMQ_BIN_DIR);
        let server_bin = bin.join("rabbitmq-server");
        let ctl_bin = bin.join("rabbitmqctl");
        for p in [&server_bin, &ctl_bin] {
            assert!(
                is_executable(p),
                "{} not found: the tests need a real RabbitMQ (Debian package rabbitmq-server); \
                 run scripts/install-deps.sh",
                p.display()
            );
        }
        let epmd_bin = require_program("epmd", &["/usr/bin/epmd", "/usr/lib/erlang/bin/epmd"]);
        let mut server = RabbitServer {
            node: format!("{}@localhost", unique_name("orchtest")),
            amqp_port: 0,
            tls: tls.map(|files| (0, files)),
            dist_port: 0,
            epmd_port: 0,
            server_bin,
            ctl_bin,
            epmd_bin,
            beam: None,
            epmd: None,
            dir: make_temp_dir("rabbit"),
        };
        let mut failures = String::new();
        for attempt in 1..=3 {
            server.amqp_port = free_port();
            if let Some((port, _)) = &mut server.tls {
                *port = free_port();
            }
            server.dist_port = free_port();
            server.epmd_port = free_port();
            server.prepare_dir();
            match server.launch() {
                Ok(()) => return server,
                // A port may have been taken by another process: retry.
                Err(StartFailure::Exited(msg)) => {
                    failures += &format!("attempt {attempt}: {msg}\n");
                    server.kill_processes();
                }
                Err(StartFailure::TimedOut(msg)) => {
                    failures += &format!("attempt {attempt}: {msg}\n");
                    break;
                }
            }
        }
        panic!("RabbitMQ node {} did not start:\n{failures}", server.node);
    }

    /// The URL clients connect with:
    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (default vhost).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The AMQP port on 127.0.0.1; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.amqp_port
    }

    /// The TLS URL, `amqps://guest:guest@127.0.0.1:PORT/%2f`, of a node
    /// started with [`start_tls`](Self::start_tls).
    ///
    /// # Panics
    ///
    /// If the node was started without TLS.
    pub fn tls_url(&self) -> String {
        let (port, _) = self
            .tls
            .as_ref()
            .expect("started with RabbitServer::start_tls");
        format!("amqps://guest:guest@127.0.0.1:{port}/%2f")
    }

    /// The Erlang node name, `orchtest-xxxxxxxxxx@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The node's directory (`home/`, `mnesia/`, `log/`, configuration).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the node's Erlang VM is running.
    pub fn is_running(&mut self) -> bool {
        is_running(&mut self.beam)
    }

    /// Runs `rabbitmqctl -n NODE ARGS...` against this node (with the node's
    /// cookie and epmd) and returns its output, e.g.
    /// `server.rabbitmqctl(&["list_queues", "name", "messages"])`.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.ctl_bin);
        cmd.arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null());
        self.apply_env(&mut cmd);
        cmd.output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.ctl_bin.display()))
    }

    /// Simulates a crash: SIGKILLs the node's Erlang VM and waits until its
    /// AMQP port is closed. Its `epmd` keeps running.
    pub fn kill(&mut self) {
        self.kill_beam();
        wait_port_closed(self.amqp_port, "RabbitMQ");
        wait_port_closed(self.dist_port, "RabbitMQ distribution");
    }

    /// Stops the node gracefully (`rabbitmqctl stop`) and waits until its
    /// AMQP port is closed; SIGKILLs it if it takes longer than 60 s.
    pub fn stop(&mut self) {
        if self.is_running() {
            let out = self.rabbitmqctl(&["stop"]);
            if !out.status.success() {
                eprintln!(
                    "orchestrator-testkit: `rabbitmqctl stop` failed for {}: {}",
                    self.node,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            wait_or_kill(&mut self.beam, Duration::from_secs(60));
        }
        self.kill_beam();
        wait_port_closed(self.amqp_port, "RabbitMQ");
    }

    /// Starts the node again with the same name, ports and Mnesia directory
    /// (stopping it gracefully first if it is still running), so durable
    /// queues and persistent messages are back, and waits until it is ready.
    ///
    /// # Panics
    ///
    /// If the node does not come back within 120 s.
    pub fn start_again(&mut self) {
        if self.is_running() {
            self.stop();
        }
        if let Err(StartFailure::Exited(msg) | StartFailure::TimedOut(msg)) = self.launch() {
            panic!("RabbitMQ node {} did not restart:\n{msg}", self.node);
        }
    }

    /// (Re)creates the node's files for the current ports.
    fn prepare_dir(&self) {
        let dir = self.dir.path();
        for sub in ["mnesia", "log"] {
            let _ = fs::remove_dir_all(dir.join(sub));
        }
        for sub in ["home", "mnesia", "log", "conf.d"] {
            fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.join(sub).display()));
        }
        let write = |name: &str, contents: &str| {
            let path = dir.join(name);
            fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        };
        // Our own cookie, written before the node and the CLI race to create it.
        let cookie = dir.join("home/.erlang.cookie");
        if !cookie.exists() {
            let value = format!("{:016x}{:016x}", random_u64(), random_u64());
            let path = write("home/.erlang.cookie", &value);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o400))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        }
        write("rabbitmq-env.conf", "");
        write(
            "inetrc",
            "{host, {127,0,0,1}, [\"localhost\"]}.\n{lookup, [file, native]}.\n",
        );
        write("enabled_plugins", "[].\n");
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{}\n\
             disk_free_limit.absolute = 50MB\n\
             loopback_users.guest = true\n",
            self.amqp_port
        );
        if let Some((port, [cert, key, ca])) = &self.tls {
            conf += &format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                cert.display(),
                key.display(),
                ca.display()
            );
        }
        write("rabbitmq.conf", &conf);
    }

    /// The environment shared by `rabbitmq-server` and `rabbitmqctl`: same
    /// cookie (`HOME`), same private epmd, and nothing from `/etc/rabbitmq`.
    fn apply_env(&self, cmd: &mut Command) {
        for (key, _) in std::env::vars_os() {
            let inherited = key.to_str().is_some_and(|k| {
                k.starts_with("RABBITMQ_") || k.starts_with("ERL_") || k == "NOTIFY_SOCKET"
            });
            if inherited {
                cmd.env_remove(key);
            }
        }
        let dir = self.dir.path();
        cmd.env("HOME", dir.join("home"))
            .env("LC_ALL", "C.UTF-8")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_CRASH_DUMP", dir.join("log/erl_crash.dump"))
            // Resolve "localhost" inside Erlang, even where /etc/hosts lacks it.
            .env("ERL_INETRC", dir.join("inetrc"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            // Erlang distribution on loopback only (all interfaces otherwise).
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONFIG_FILES", dir.join("conf.d/*.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .current_dir(dir);
    }

    /// Starts epmd (if needed) and the node, and waits until it is ready.
    fn launch(&mut self) -> Result<(), StartFailure> {
        self.ensure_epmd()?;
        let log = self.dir.path().join("log/startup.out");
        let mut cmd = tied_command(&self.server_bin, &log);
        self.apply_env(&mut cmd);
        // Makes the rabbitmq-server script `exec` the Erlang VM instead of
        // running it as a child of a signal-forwarding shell: the VM is then
        // our direct child and inherits the pdeathsig set by setpriv.
        cmd.env("detached", "true");
        let beam = spawn_tied_to_process(cmd)
            .map_err(|e| StartFailure::Exited(format!("cannot spawn rabbitmq-server: {e}")))?;
        self.beam = Some(beam);

        let deadline = Instant::now() + RABBIT_START_TIMEOUT;
        loop {
            if !self.is_running() {
                self.beam = None;
                return Err(StartFailure::Exited(format!(
                    "the node exited during startup\n{}",
                    self.logs()
                )));
            }
            // The AMQP listeners open last; then confirm with the CLI.
            let tls_open = self.tls.as_ref().is_none_or(|(port, _)| port_open(*port));
            if port_open(self.amqp_port) && tls_open {
                let out = self.rabbitmqctl(&["-q", "--timeout", "60", "await_startup"]);
                if out.status.success() && self.is_running() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let logs = self.logs();
                self.kill_beam();
                return Err(StartFailure::TimedOut(format!(
                    "the node was not ready within {RABBIT_START_TIMEOUT:?}\n{logs}"
                )));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts the node's private epmd unless it is running.
    fn ensure_epmd(&mut self) -> Result<(), StartFailure> {
        if is_running(&mut self.epmd) {
            return Ok(());
        }
        let mut cmd = tied_command(&self.epmd_bin, &self.dir.path().join("log/epmd.out"));
        cmd.arg("-port")
            .arg(self.epmd_port.to_string())
            .args(["-address", "127.0.0.1"])
            .current_dir(self.dir.path());
        let child = spawn_tied_to_process(cmd)
            .map_err(|e| StartFailure::Exited(format!("cannot spawn epmd: {e}")))?;
        self.epmd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !port_open(self.epmd_port) {
            if !is_running(&mut self.epmd) || Instant::now() > deadline {
                kill_child(&mut self.epmd);
                return Err(StartFailure::Exited(format!(
                    "epmd did not listen on port {}\n{}",
                    self.epmd_port,
                    tail(&self.dir.path().join("log/epmd.out"), 10)
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILLs every Erlang VM of this node: our child, plus any VM whose
    /// command line carries this node's `HOME` (none, unless a future
    /// RabbitMQ script forks the VM instead of exec'ing it).
    fn kill_beam(&mut self) {
        let strays = self.beam_pids();
        let own = self.beam.as_ref().map(Child::id);
        kill_child(&mut self.beam);
        let strays: Vec<String> = strays
            .into_iter()
            .filter(|pid| Some(*pid) != own)
            .map(|pid| pid.to_string())
            .collect();
        if !strays.is_empty() {
            let _ = Command::new("sh")
                .args(["-c", "kill -KILL \"$@\" 2>/dev/null", "sh"])
                .args(&strays)
                .status();
        }
    }

    /// PIDs of Erlang VMs started with this node's `-home` directory.
    fn beam_pids(&self) -> Vec<u32> {
        let home = self.dir.path().join("home");
        let home = home.as_os_str().as_encoded_bytes();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmdline = fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                let is_beam = args
                    .first()
                    .and_then(|a| a.rsplit(|b| *b == b'/').next())
                    .is_some_and(|name| name.starts_with(b"beam"));
                let ours = args.windows(2).any(|w| w[0] == b"-home" && w[1] == home);
                (is_beam && ours).then_some(pid)
            })
            .collect()
    }

    /// Kills the node and its epmd (used on drop and between start attempts).
    fn kill_processes(&mut self) {
        self.kill_beam();
        kill_child(&mut self.epmd);
    }

    fn logs(&self) -> String {
        let log = self.dir.path().join("log");
        tail(&log.join(format!("{}.log", self.node)), 40)
            + &tail(&log.join("startup.out"), 20)
            + &tail(&log.join("epmd.out"), 5)
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        // The directory is deleted next, so there is nothing to shut down
        // gracefully: SIGKILL is faster and cannot hang.
        self.kill_processes();
    }
}

mod tls;

pub use tls::TestCerts;

#[cfg(test)]
mod tests;
