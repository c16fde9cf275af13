//! Redis connections with one deadline per call.
//!
//! `queue.redis_timeout` bounds a whole SQL call or bridge step, however many commands and
//! replies it involves. The redis crate's sync connection applies socket timeouts to each read,
//! and after one failed reply of a pipeline it still waits for every other: a frozen Redis (one
//! that accepts connections and never answers) cost one timeout per reply. So [`Conn`] owns its
//! socket: non-blocking, and every wait is a `poll()` for what is left of the caller's deadline.
//! Signals interrupt a wait (EINTR) without failing it, unless the caller's `interrupted` check
//! says to give up (a cancelled query, a bridge asked to stop). After any I/O or protocol error
//! the connection may be mid-reply, so it is broken for good and its owner drops it.
//!
//! The redis crate still encodes commands and parses replies: `Conn` implements its
//! `ConnectionLike`, so `redis::cmd(…).query(&mut conn)` and pipelines work as usual. For
//! `rediss://`, a rustls session runs over the same non-blocking socket (`tls`), its handshake
//! under the same deadline.

use super::target::Target;
use super::tls;
use redis::{ConnectionLike, Parser, RedisResult, Value};
use rustls::ClientConnection;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A Redis connection whose every wait ends at its current deadline.
pub struct Conn {
    socket: Socket,
    parser: Parser,
    deadline: Instant,
    /// Called when a wait is interrupted by a signal: true means stop waiting.
    interrupted: fn() -> bool,
    broken: bool,
    /// A reply has been read on this connection.
    answered: bool,
    db: i64,
}

/// The non-blocking socket, and the TLS session over it for `rediss://`.
struct Socket {
    tcp: TcpStream,
    tls: Option<Box<ClientConnection>>,
}

/// Never gives up early: for callers with nothing to check.
pub fn never_interrupted() -> bool {
    false
}

impl Conn {
    /// Connects (TCP connect, TLS handshake, AUTH, SELECT) before `deadline`, which
    /// then stays the deadline of the calls that follow until [`Conn::set_deadline`] moves it.
    /// Errors are free of secrets.
    pub fn open(
        target: &Target,
        deadline: Instant,
        interrupted: fn() -> bool,
    ) -> Result<Conn, String> {
        let end = target.endpoint()?;
        let password = end.password.clone();
        let secret_free = |e: String| match &password {
            Some(p) if !p.is_empty() => target.scrub(&e).replace(p.as_str(), "***"),
            _ => target.scrub(&e),
        };
        let (host, port) = (end.host.as_str(), end.port);
        let addrs = resolve(host, port, deadline)?;
        let mut last_error = format!("no address for Redis host {host}");
        let mut stream = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last_error = timeout_message();
                break;
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = format!("connecting to Redis at {addr}: {e}"),
            }
        }
        let tcp = stream.ok_or(last_error)?;
        tcp.set_nonblocking(true)
            .and_then(|_| tcp.set_nodelay(true))
            .map_err(|e| format!("setting up the Redis socket: {e}"))?;
        let tls = match &end.tls {
            Some(verify) => Some(Box::new(tls::client(host, verify)?)),
            None => None,
        };
        let mut con = Conn {
            socket: Socket { tcp, tls },
            parser: Parser::new(),
            deadline,
            interrupted,
            broken: false,
            answered: false,
            db: end.db,
        };
        if con.socket.tls.is_some() {
            con.io().handshake().map_err(|e| {
                // A server without TLS on this port reads the ClientHello as the start of a
                // command and waits for its end.
                let hint = if e.kind() == io::ErrorKind::TimedOut {
                    "; does the server speak TLS on this port?"
                } else {
                    ""
                };
                format!("TLS handshake with Redis at {host}:{port} failed: {e}{hint}")
            })?;
        }
        if let Some(password) = &end.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &end.username {
                auth.arg(user);
            }
            auth.arg(password)
                .query::<()>(&mut con)
                .map_err(|e| secret_free(e.to_string()))?;
        }
        if end.db != 0 {
            redis::cmd("SELECT")
                .arg(end.db)
                .query::<()>(&mut con)
                .map_err(|e| secret_free(e.to_string()))?;
        }
        Ok(con)
    }

    /// The deadline of the calls from now on.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// Sends commands without reading their replies (see [`Conn::recv_response`]).
    pub fn send_packed_command(&mut self, bytes: &[u8]) -> RedisResult<()> {
        self.usable()?;
        let result = self.io().write_all(bytes);
        self.mark(result).map_err(Into::into)
    }

    /// Reads one reply. A server error is a value (`Value::ServerError`), not an `Err`.
    pub fn recv_response(&mut self) -> RedisResult<Value> {
        self.usable()?;
        let mut io = Io {
            socket: &mut self.socket,
            deadline: self.deadline,
            interrupted: self.interrupted,
        };
        match self.parser.parse_value(&mut io) {
            Ok(value) => {
                self.answered = true;
                Ok(value)
            }
            Err(e) => {
                self.broken = true;
                Err(self.first_reply_error(e))
            }
        }
    }

    /// A server that closes a plain connection before its first reply, or answers with bytes
    /// that are not Redis's protocol, most likely expects TLS: the error says so.
    fn first_reply_error(&self, e: redis::RedisError) -> redis::RedisError {
        let not_redis = matches!(e.kind(), redis::ErrorKind::Io | redis::ErrorKind::Parse);
        if self.answered || self.socket.tls.is_some() || !not_redis || e.is_timeout() {
            return e;
        }
        redis::RedisError::from((
            e.kind(),
            "no Redis reply",
            format!("{e}; if the server expects TLS, use a rediss:// URL"),
        ))
    }

    fn io(&mut self) -> Io<'_> {
        Io {
            socket: &mut self.socket,
            deadline: self.deadline,
            interrupted: self.interrupted,
        }
    }

    fn usable(&self) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the Redis connection broke earlier in this call",
            ));
        }
        Ok(())
    }

    fn mark<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if result.is_err() {
            self.broken = true;
        }
        result
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.send_packed_command(cmd)?;
        self.recv_response()
    }

    /// Reads `offset + count` replies and returns the last `count`. A server error among the
    /// first `offset` (MULTI's QUEUED replies) is the result; an I/O error ends the call at once.
    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.send_packed_command(cmd)?;
        let mut replies = Vec::with_capacity(count);
        let mut queue_error = None;
        for i in 0..offset + count {
            match self.recv_response()? {
                Value::ServerError(e) if i < offset => {
                    queue_error.get_or_insert(e);
                }
                _ if i < offset => {}
                reply => replies.push(reply),
            }
        }
        match queue_error {
            Some(e) => Err(e.into()),
            None => Ok(replies),
        }
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        !self.broken
    }
}

/// The addresses of `host`. A host name is resolved on a helper thread, so that a DNS server
/// that never answers cannot hold the call past its deadline (the system resolver has no timeout
/// of its own; the thread ends when the resolver gives up). IP addresses need no lookup. The
/// thread blocks every signal, so Postgres's handlers keep running on the backend's own thread.
fn resolve(host: &str, port: u16, deadline: Instant) -> Result<Vec<SocketAddr>, String> {
    resolve_with(host, port, deadline, system_lookup)
}

fn system_lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(|addrs| addrs.collect())
}

fn resolve_with(
    host: &str,
    port: u16,
    deadline: Instant,
    lookup: fn(&str, u16) -> io::Result<Vec<SocketAddr>>,
) -> Result<Vec<SocketAddr>, String> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = mpsc::channel();
    let name = host.to_owned();
    let spawned = with_all_signals_blocked(|| {
        std::thread::Builder::new()
            .name("queue_pg dns".into())
            .spawn(move || {
                // The caller may have stopped waiting: then nobody reads this.
                let _ = tx.send(lookup(&name, port));
            })
    });
    spawned.map_err(|e| format!("resolving Redis host {host}: {e}"))?;
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Ok(addrs)) => Ok(addrs),
        Ok(Err(e)) => Err(format!("cannot resolve Redis host {host}: {e}")),
        Err(_) => Err(timeout_message()),
    }
}

/// Runs `f` (which starts a thread: it inherits the mask) with every signal blocked on this
/// thread, then restores the mask.
fn with_all_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

fn timeout_message() -> String {
    "Redis did not answer within queue.redis_timeout (the limit for the whole call)".into()
}

/// The socket seen through the caller's deadline.
struct Io<'a> {
    socket: &'a mut Socket,
    deadline: Instant,
    interrupted: fn() -> bool,
}

impl Io<'_> {
    /// Waits until the socket is ready for `events`, or fails at the deadline.
    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, timeout_message()));
            }
            let mut fd = libc::pollfd {
                fd: self.socket.tcp.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = poll_ms(left);
            match unsafe { libc::poll(&mut fd, 1, ms) } {
                // Ready, hung up or failed: the next read or write says which.
                n if n > 0 => return Ok(()),
                0 => continue, // the loop checks the deadline
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                    if (self.interrupted)() {
                        return Err(io::Error::new(
                            io::ErrorKind::Interrupted,
                            "waiting for Redis was interrupted",
                        ));
                    }
                }
            }
        }
    }

    /// Writes to the socket itself (TLS records, or plain bytes).
    fn write_raw(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match (&self.socket.tcp).write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads from the socket itself, waiting for data until the deadline.
    fn read_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.socket.tcp).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.socket.tls.is_none() {
            return self.write_raw(bytes);
        }
        // rustls buffers a bounded amount of plaintext: hand it over in pieces, sending the
        // records each piece makes.
        while !bytes.is_empty() {
            let tls = self.socket.tls.as_mut().expect("a TLS session");
            let n = tls.writer().write(bytes)?;
            bytes = &bytes[n..];
            self.send_tls()?;
        }
        Ok(())
    }

    /// Sends every TLS record rustls has ready.
    fn send_tls(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        let tls = self.socket.tls.as_mut().expect("a TLS session");
        while tls.wants_write() {
            tls.write_tls(&mut out)?;
        }
        self.write_raw(&out)
    }

    /// Reads TLS records until rustls has processed at least one more (or the peer closed).
    fn receive_tls(&mut self) -> io::Result<usize> {
        let mut buf = [0u8; 16 * 1024];
        let n = self.read_raw(&mut buf)?;
        let tls = self.socket.tls.as_mut().expect("a TLS session");
        if n == 0 {
            // The peer closed: rustls decides whether that was clean (close_notify).
            let mut nothing: &[u8] = &[];
            tls.read_tls(&mut nothing)?;
        } else {
            let mut got = &buf[..n];
            while !got.is_empty() {
                tls.read_tls(&mut got)?;
                tls.process_new_packets().map_err(tls_error)?;
            }
        }
        tls.process_new_packets().map_err(tls_error)?;
        Ok(n)
    }

    /// The TLS handshake, within the deadline. A refused certificate is its error.
    fn handshake(&mut self) -> io::Result<()> {
        loop {
            let tls = self.socket.tls.as_ref().expect("a TLS session");
            let (handshaking, wants_read) = (tls.is_handshaking(), tls.wants_read());
            // Send what the handshake has ready (ClientHello, Finished, an alert).
            self.send_tls()?;
            if !handshaking {
                return Ok(());
            }
            if wants_read && self.receive_tls()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake (does it speak TLS on this port?)",
                ));
            }
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.socket.tls.is_none() {
            return self.read_raw(buf);
        }
        loop {
            let tls = self.socket.tls.as_mut().expect("a TLS session");
            match tls.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return result, // data, a clean close (0), or the peer vanished
            }
            self.receive_tls()?;
        }
    }
}

/// poll()'s timeout for `left`: whole milliseconds, rounded up so a wait never ends early.
fn poll_ms(left: Duration) -> libc::c_int {
    left.as_micros()
        .div_ceil(1000)
        .min(libc::c_int::MAX as u128) as libc::c_int
}

/// The URL as it may be shown: `redis://user:***@host:port/db`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Removes the URL's password from `message`, wherever it appears.
pub fn scrub(message: &str, url: &str) -> String {
    let mut out = message.replace(url, &redact(url));
    if let Some(password) = password_of(url) {
        if !password.is_empty() {
            out = out.replace(password, "***");
        }
    }
    out
}

fn password_of(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")?;
    let at = url.rfind('@')?;
    if at <= scheme_end {
        return None;
    }
    url[scheme_end + 3..at].split_once(':').map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn redact_hides_the_password_and_keeps_the_user() {
        assert_eq!(
            redact("redis://:pw@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("redis://alice:p:w@host:1"),
            "redis://alice:***@host:1"
        );
        assert_eq!(redact("redis://host:1"), "redis://host:1");
    }

    #[test]
    fn scrub_removes_the_password_wherever_it_appears() {
        let url = "redis://bob:hunter2@h:1";
        let said = scrub(&format!("failed at {url}: auth hunter2 wrong"), url);
        assert!(!said.contains("hunter2"), "{said}");
        assert!(said.contains("redis://bob:***@h:1"), "{said}");
        assert_eq!(scrub("no secret here", "redis://h:1"), "no secret here");
    }

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(Duration::from_millis(5)), 5);
        assert_eq!(poll_ms(Duration::from_micros(5001)), 6);
    }

    /// A server that accepts connections and never answers: a pipeline of many commands still
    /// fails once, at the one deadline, not once per reply.
    #[test]
    fn a_frozen_server_costs_one_deadline_for_a_whole_pipeline() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", server.local_addr().unwrap());
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let mut con = Conn::open(&Target::url(&url), started + timeout, never_interrupted).unwrap();
        let mut pipe = redis::pipe();
        for i in 0..2000 {
            pipe.cmd("LLEN").arg(format!("list{i}"));
        }
        let result: RedisResult<Vec<i64>> = pipe.query(&mut con);
        let took = started.elapsed();
        assert!(result.is_err());
        assert!(took >= timeout, "gave up early: {took:?}");
        assert!(took < timeout + Duration::from_millis(200), "took {took:?}");
        assert!(!con.is_open(), "a timed-out connection must not be reused");
        let again: RedisResult<i64> = redis::cmd("LLEN").arg("x").query(&mut con);
        assert!(again.is_err());
        drop(server);
    }

    /// A password that the frozen server never acknowledges: AUTH is bounded by the same deadline.
    #[test]
    fn auth_against_a_frozen_server_is_bounded_and_secret_free() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://:sekrit-pw@{}", server.local_addr().unwrap());
        let started = Instant::now();
        let err = Conn::open(
            &Target::url(&url),
            started + Duration::from_millis(200),
            never_interrupted,
        )
        .err()
        .expect("AUTH cannot succeed");
        assert!(started.elapsed() < Duration::from_millis(400));
        assert!(!err.contains("sekrit-pw"), "{err}");
    }

    /// A TLS handshake with a server that never answers (no TLS on that port) is bounded by the
    /// same deadline, and says what may be wrong.
    #[test]
    fn a_tls_handshake_with_a_silent_server_ends_at_the_deadline() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut target = Target::url(&format!("rediss://{}", server.local_addr().unwrap()));
        target.tls_insecure_skip_verify = true;
        let started = Instant::now();
        let err = Conn::open(
            &target,
            started + Duration::from_millis(200),
            never_interrupted,
        )
        .err()
        .expect("no handshake without a server");
        assert!(started.elapsed() < Duration::from_millis(400));
        assert!(err.contains("does the server speak TLS"), "{err}");
    }

    /// Replies that arrive are parsed, pipelined, with server errors as values.
    #[test]
    fn talks_resp_with_a_scripted_server() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", server.local_addr().unwrap());
        let peer = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            // Two pipelined commands; answer once both arrived.
            while seen.windows(4).filter(|w| w == b"LLEN").count() < 2 {
                let n = s.read(&mut buf).unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b":3\r\n-WRONGTYPE nope\r\n").unwrap();
        });
        let mut con = Conn::open(
            &Target::url(&url),
            Instant::now() + Duration::from_secs(5),
            never_interrupted,
        )
        .unwrap();
        let packed = redis::pipe()
            .cmd("LLEN")
            .arg("a")
            .cmd("LLEN")
            .arg("b")
            .get_packed_pipeline();
        let replies = con
            .req_packed_commands(&packed, 0, 2)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replies[0], Value::Int(3));
        assert!(matches!(replies[1], Value::ServerError(_)));
        assert!(con.is_open());
        peer.join().unwrap();
    }

    #[test]
    fn ip_addresses_need_no_lookup() {
        let never = |_: &str, _: u16| -> io::Result<Vec<SocketAddr>> { panic!("looked up") };
        let soon = Instant::now() + Duration::from_secs(1);
        let v4 = resolve_with("127.0.0.1", 6379, soon, never).unwrap();
        assert_eq!(v4, vec!["127.0.0.1:6379".parse().unwrap()]);
        let v6 = resolve_with("[::1]", 6379, soon, never).unwrap();
        assert_eq!(v6, vec!["[::1]:6379".parse().unwrap()]);
    }

    #[test]
    fn a_lookup_that_hangs_ends_at_the_deadline() {
        let hangs = |_: &str, _: u16| -> io::Result<Vec<SocketAddr>> {
            std::thread::sleep(Duration::from_secs(5));
            Ok(Vec::new())
        };
        let start = Instant::now();
        let err = resolve_with(
            "redis.example",
            6379,
            start + Duration::from_millis(100),
            hangs,
        )
        .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(err, timeout_message());
    }

    #[test]
    fn host_names_resolve_through_the_system() {
        let addrs = resolve("localhost", 6379, Instant::now() + Duration::from_secs(5)).unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 6379),
            "{addrs:?}"
        );
    }
}
