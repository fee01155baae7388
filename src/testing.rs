//! Real servers for the tests and benches: free ports and a `redis-server` owned by the caller.
//! Not part of the gateway; public only so that the unit tests, the integration tests and the
//! benches share one copy.
// A test's set-up that cannot be made fails the test, loudly.
#![allow(clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now, and that no other call in this process returns.
///
/// Not one the kernel picks (`bind` to port 0): those come from the ephemeral range, where every
/// outgoing connection of the tests (HTTP clients, Redis connections, the gateways' upstream
/// connections) also takes its source port, and one of them could take the port between this call
/// and the server's `bind`. These come from below that range (Linux's is 32768-60999), in turn
/// from a place that differs per process.
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` consecutive free ports, as [`free_port`] finds them: for a server that also listens on the
/// ports after the one it is given (the quickstart's echo upstream takes the admin port's next),
/// so that no other caller is handed those.
pub fn free_ports<const N: usize>() -> [u16; N] {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| (u64::from(std::process::id()) * 7919 % u64::from(COUNT)) as u32);
    loop {
        let n = start + TAKEN.fetch_add(N as u32, Ordering::Relaxed);
        let ports: [u16; N] = std::array::from_fn(|i| (FIRST + (n + i as u32) % COUNT) as u16);
        let consecutive = ports.windows(2).all(|w| w[1] == w[0] + 1);
        if consecutive && ports.iter().all(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return ports;
        }
    }
}

/// Waits until `child` listens on `port`, and is still running then (a process that found the
/// port taken exits, while the port answers for someone else). If it exits, the panic shows the
/// end of `log`.
pub fn wait_for_port(port: u16, what: &str, child: &mut Child, log: Option<&Path>) {
    let exited = |child: &mut Child| {
        let status = child.try_wait().ok().flatten()?;
        let text = log.and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        Some(format!("{what} exited before listening on {port}: {status}\n{tail}"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if let Some(why) = exited(child) {
                panic!("{why}");
            }
            return;
        }
        if let Some(why) = exited(child) {
            panic!("{why}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {port}");
}

/// A `redis-server` on a free port, owned by the caller: stopped when dropped. Its absence is a
/// failure, never a reason to skip.
pub struct RedisServer {
    /// The port it listens on (kept across restarts).
    pub port: u16,
    args: Vec<OsString>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` with `args` after its port and bind address.
    pub fn start<I, S>(args: I) -> RedisServer
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args = args.into_iter().map(Into::into).collect();
        let mut server = RedisServer { port: free_port(), args, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        wait_for_port(self.port, "redis-server", &mut child, None);
        let pid = child.id().to_string();
        // Kept first, so that a failed check below still stops it (on drop).
        self.child = Some(child);
        // The server on the port must be this one, not a stranger that held the port.
        let info: String = redis::cmd("INFO").arg("server").query(&mut self.client()).expect("INFO server");
        let answered = info.lines().find_map(|l| l.strip_prefix("process_id:")).map(str::trim);
        assert_eq!(answered, Some(pid.as_str()), "another redis-server answers on {}", self.port);
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A synchronous connection for inspecting the server (INFO, CONFIG).
    pub fn client(&self) -> redis::Connection {
        let connection = redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(10)))
            .expect("redis connection");
        // A listener that never answers fails the test instead of hanging it.
        connection.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        connection
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with the same arguments.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the process (`SIGSTOP`): its connections stay open and it answers nothing, as a
    /// Redis that hangs.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server run again (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
