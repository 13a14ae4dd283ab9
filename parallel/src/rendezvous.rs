//! The rendezvous store of a multi-process run: world rank 0 serves a small key-value store on
//! `MASTER_ADDR:MASTER_PORT`; every rank (rank 0 included) is a client.
//!
//! What travels through it: the NCCL unique id of every tp and dp group, the start-up handshake
//! ([`Store::handshake`]: every rank checks that all run the same binary, run config and resume
//! step), barriers between ranks that have no communicator yet, and **liveness**: every client
//! keeps one *watch* connection open for its whole life. A rank whose watch connection closes
//! without a goodbye (SIGKILL, crash) or that reports a failure ([`Store::report_failure`]) is
//! announced to every other rank's watcher, which calls the `on_peer_failure` callback, so the
//! survivors stop within a second instead of waiting in a collective until its timeout. When
//! rank 0 itself dies, every watcher sees its connection close.
//!
//! Protocol: one request line, one reply line, values hex-encoded so they may hold anything.
//! `SET k hex` → `OK`; `GET k` → `VAL hex` (the server holds the reply until the key exists) or
//! `DEAD r hex-reason`; `ADD k n` → `VAL hex(total)`; on a watch connection `WATCH r` first, then
//! `BYE` or `FAIL hex-reason` from the client and `DEAD r hex-reason` / `SHUTDOWN` from the server.
//!
//! The server binds only the address it is given (loopback on one host); a port in use is an
//! error naming it and `MASTER_PORT`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Everything the store can fail with.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum StoreError {
    /// Rank 0 could not listen.
    #[error("rank 0 cannot serve the rendezvous store on {addr}: {detail}; {hint}")]
    Bind {
        /// Address asked for.
        addr: String,
        /// The OS error.
        detail: String,
        /// What to change.
        hint: String,
    },
    /// A client gave up connecting.
    #[error(
        "rank {rank} could not reach the rendezvous store of rank 0 at {addr} within {waited_s:.0} s ({detail}): is \
         rank 0 running, and does MASTER_ADDR name its host as the other nodes resolve it?"
    )]
    Connect {
        /// This rank.
        rank: usize,
        /// Store address.
        addr: String,
        /// Seconds tried.
        waited_s: f64,
        /// Last error.
        detail: String,
    },
    /// A key did not appear in time.
    #[error("rank {rank} waited {waited_s:.0} s for `{key}` in the rendezvous store: {detail}")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The key.
        key: String,
        /// Seconds waited.
        waited_s: f64,
        /// Who was missing.
        detail: String,
    },
    /// Another rank died or failed.
    #[error("rank {rank} failed: {reason}")]
    PeerFailed {
        /// The rank that failed.
        rank: usize,
        /// Why.
        reason: String,
    },
    /// The ranks disagree at the handshake.
    #[error("the ranks of this run disagree: {0}")]
    Mismatch(String),
    /// Socket or protocol trouble.
    #[error("rendezvous store ({addr}): {detail}")]
    Io {
        /// Store address.
        addr: String,
        /// What went wrong.
        detail: String,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// Called (on a watcher thread) when another rank died or failed: `(rank, reason)`.
pub type PeerFailureHook = Arc<dyn Fn(usize, &str) + Send + Sync>;

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A value for a message: at most 120 characters, newlines shown as `⏎`.
fn shorten(v: &str) -> String {
    let flat = v.replace('\n', "⏎");
    if flat.chars().count() <= 120 {
        format!("{flat:?}")
    } else {
        let head: String = flat.chars().take(117).collect();
        format!("{head:?}… ({} characters)", v.len())
    }
}

// ---- server -----------------------------------------------------------------------------------

#[derive(Default)]
struct ServerState {
    values: HashMap<String, String>,
    /// First failure: `(rank, reason)`.
    dead: Option<(usize, String)>,
    /// Ranks whose watch connection is open.
    watching: Vec<usize>,
    /// Ranks that said goodbye.
    finished: Vec<usize>,
    shutdown: bool,
}

struct Server {
    state: Mutex<ServerState>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Server {
    fn fail(&self, rank: usize, reason: &str) {
        let mut s = lock(&self.state);
        if s.dead.is_none() && !s.shutdown {
            tracing::error!(rank, reason, "rendezvous store: a rank failed; telling the others");
            s.dead = Some((rank, reason.to_string()));
        }
        self.changed.notify_all();
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        while !self.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let me = self.clone();
                    let _ = std::thread::Builder::new().name("store-conn".into()).spawn(move || me.connection(conn));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    tracing::warn!("rendezvous store: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn connection(self: Arc<Self>, conn: TcpStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_nodelay(true);
        let Ok(read_half) = conn.try_clone() else { return };
        let mut reader = BufReader::new(read_half);
        let mut writer = conn;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["WATCH", r] = words.as_slice() {
                if let Ok(rank) = r.parse() {
                    self.watch(rank, reader, writer);
                }
                return;
            }
            let reply = self.request(&words);
            if writer.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn request(&self, words: &[&str]) -> String {
        match words {
            ["SET", k, v] => {
                lock(&self.state).values.insert(k.to_string(), v.to_string());
                self.changed.notify_all();
                "OK\n".into()
            }
            ["ADD", k, n] => {
                let Ok(n) = n.parse::<i64>() else { return "ERR bad number\n".into() };
                let mut s = lock(&self.state);
                let old = s.values.get(*k).and_then(|v| unhex(v)).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                let total = (old + n).to_string();
                s.values.insert(k.to_string(), hex(&total));
                self.changed.notify_all();
                format!("VAL {}\n", hex(&total))
            }
            ["GET", k] => {
                let mut s = lock(&self.state);
                loop {
                    if let Some(v) = s.values.get(*k) {
                        return format!("VAL {v}\n");
                    }
                    if let Some((r, why)) = &s.dead {
                        return format!("DEAD {r} {}\n", hex(why));
                    }
                    if s.shutdown {
                        return "SHUTDOWN\n".into();
                    }
                    s = self
                        .changed
                        .wait_timeout(s, Duration::from_millis(200))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
            _ => "ERR unknown request\n".into(),
        }
    }

    /// A rank's liveness connection: its end without `BYE` is that rank's death.
    fn watch(self: &Arc<Self>, rank: usize, mut reader: BufReader<TcpStream>, writer: TcpStream) {
        lock(&self.state).watching.push(rank);
        self.changed.notify_all();
        // Announcer: tells this rank when another one failed, or that the store shuts down.
        let me = self.clone();
        let mut w = match writer.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let announcer = std::thread::Builder::new().name("store-announce".into()).spawn(move || {
            let mut s = lock(&me.state);
            loop {
                if let Some((r, why)) = s.dead.clone() {
                    if r != rank {
                        drop(s);
                        let _ = w.write_all(format!("DEAD {r} {}\n", hex(&why)).as_bytes());
                        return;
                    }
                }
                if s.shutdown || s.finished.contains(&rank) || !s.watching.contains(&rank) {
                    drop(s);
                    let _ = w.write_all(b"SHUTDOWN\n");
                    return;
                }
                s = me.changed.wait_timeout(s, Duration::from_millis(200)).unwrap_or_else(PoisonError::into_inner).0;
            }
        });
        let mut line = String::new();
        let outcome = loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break None,
                Ok(_) => {}
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["BYE"] => break Some(None),
                ["FAIL", why] => break Some(Some(unhex(why).unwrap_or_default())),
                _ => {}
            }
        };
        match outcome {
            Some(None) => lock(&self.state).finished.push(rank),
            Some(Some(why)) => self.fail(rank, &why),
            None => self.fail(
                rank,
                "the process died (its connection to the rendezvous store closed without a goodbye: killed, \
                 crashed or out of memory)",
            ),
        }
        lock(&self.state).watching.retain(|&r| r != rank);
        self.changed.notify_all();
        if let Ok(a) = announcer {
            let _ = a.join();
        }
    }
}

// ---- client -----------------------------------------------------------------------------------

/// One rank's handle on the run's rendezvous store (rank 0 also hosts it).
pub struct Store {
    addr: String,
    rank: usize,
    world: usize,
    timeout: Duration,
    conn: Mutex<Option<(BufReader<TcpStream>, TcpStream)>>,
    watch: Mutex<Option<TcpStream>>,
    server: Option<Arc<Server>>,
    /// Set once another rank's failure was announced.
    peer_failure: Arc<Mutex<Option<(usize, String)>>>,
    /// Set when this handle closes its own watch connection (not a death of rank 0).
    closing: Arc<AtomicBool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("addr", &self.addr).field("rank", &self.rank).field("world", &self.world).finish()
    }
}

/// Resolves `addr` (`host:port`) to the socket addresses to try.
fn resolve(addr: &str) -> std::io::Result<Vec<SocketAddr>> {
    Ok(addr.to_socket_addrs()?.collect())
}

impl Store {
    /// Rank 0 binds `addr` and serves; every rank then connects (with retries until `timeout`) and
    /// opens its watch connection. `on_peer_failure` runs on a watcher thread when another rank
    /// dies or fails.
    pub fn connect(
        addr: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
        on_peer_failure: PeerFailureHook,
    ) -> Result<Store> {
        let server = if rank == 0 { Some(Self::serve(addr)?) } else { None };
        let peer_failure: Arc<Mutex<Option<(usize, String)>>> = Arc::default();
        let closing = Arc::new(AtomicBool::new(false));
        let store = Store {
            addr: addr.to_string(),
            rank,
            world,
            timeout,
            conn: Mutex::new(None),
            watch: Mutex::new(None),
            server,
            peer_failure: peer_failure.clone(),
            closing: closing.clone(),
        };
        let deadline = Instant::now() + timeout;
        let (reader, writer) = store.open(deadline)?;
        *lock(&store.conn) = Some((reader, writer));
        let (mut wreader, mut wwriter) = store.open(deadline)?;
        wwriter.write_all(format!("WATCH {rank}\n").as_bytes()).map_err(|e| store.io(e))?;
        *lock(&store.watch) = Some(wwriter);
        let me = rank;
        std::thread::Builder::new()
            .name("store-watch".into())
            .spawn(move || {
                let mut line = String::new();
                let n = wreader.read_line(&mut line).unwrap_or(0);
                let words: Vec<&str> = line.split_whitespace().collect();
                let failure = match words.as_slice() {
                    ["SHUTDOWN"] => None,
                    ["DEAD", r, why] => r.parse().ok().map(|r| (r, unhex(why).unwrap_or_default())),
                    _ if n == 0 && me != 0 && !closing.load(Ordering::SeqCst) => Some((
                        0,
                        "rank 0 died (its rendezvous store closed the connection): it was killed, crashed or \
                         failed"
                            .to_string(),
                    )),
                    _ => None,
                };
                if let Some((r, why)) = failure {
                    *lock(&peer_failure) = Some((r, why.clone()));
                    on_peer_failure(r, &why);
                }
            })
            .map_err(|e| store.io(e))?;
        Ok(store)
    }

    fn serve(addr: &str) -> Result<Arc<Server>> {
        let bind_err =
            |detail: String, hint: &str| StoreError::Bind { addr: addr.to_string(), detail, hint: hint.to_string() };
        let addrs = resolve(addr)
            .map_err(|e| bind_err(e.to_string(), "set MASTER_ADDR to a name or address of this host (rank 0's)"))?;
        let mut last = String::new();
        for a in addrs {
            match TcpListener::bind(a) {
                Ok(listener) => {
                    listener.set_nonblocking(true).map_err(|e| bind_err(e.to_string(), ""))?;
                    let server = Arc::new(Server {
                        state: Mutex::default(),
                        changed: Condvar::new(),
                        stop: AtomicBool::new(false),
                    });
                    let s = server.clone();
                    std::thread::Builder::new()
                        .name("store-serve".into())
                        .spawn(move || s.serve(listener))
                        .map_err(|e| bind_err(e.to_string(), ""))?;
                    tracing::info!(%a, "rendezvous store listening");
                    return Ok(server);
                }
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    return Err(bind_err(
                        format!("port {} is already in use", a.port()),
                        "another job (or a leftover process) holds it, or several processes all think they are rank 0 \
                         (an sbatch script without srun): choose another port with MASTER_PORT",
                    ))
                }
                Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
                    last = format!("{a} is not an address of this host ({e})");
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        if last.is_empty() {
            last = "the address resolves to nothing".into();
        }
        Err(bind_err(last, "MASTER_ADDR must name rank 0's host (the first host of the job's node list under SLURM)"))
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { addr: self.addr.clone(), detail: e.to_string() }
    }

    fn open(&self, deadline: Instant) -> Result<(BufReader<TcpStream>, TcpStream)> {
        let started = Instant::now();
        loop {
            let attempt = || -> std::io::Result<TcpStream> {
                let mut err = std::io::Error::new(ErrorKind::NotFound, "the address resolves to nothing");
                for a in resolve(&self.addr)? {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(c) => return Ok(c),
                        Err(e) => err = e,
                    }
                }
                Err(err)
            };
            match attempt() {
                Ok(c) => {
                    let _ = c.set_nodelay(true);
                    let r = c.try_clone().map_err(|e| self.io(e))?;
                    return Ok((BufReader::new(r), c));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(StoreError::Connect {
                        rank: self.rank,
                        addr: self.addr.clone(),
                        waited_s: started.elapsed().as_secs_f64(),
                        detail: e.to_string(),
                    })
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The store's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The failure of another rank, once announced.
    pub fn peer_failure(&self) -> Option<(usize, String)> {
        lock(&self.peer_failure).clone()
    }

    fn call(&self, request: &str, waiting_for: &str, deadline: Instant) -> Result<String> {
        let mut guard = lock(&self.conn);
        let Some((reader, writer)) = guard.as_mut() else { return Err(self.io("the connection is closed")) };
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        reader.get_ref().set_read_timeout(Some(wait)).map_err(|e| self.io(e))?;
        writer.write_all(request.as_bytes()).map_err(|e| self.io(format!("rank 0 is gone? {e}")))?;
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(self.lost()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // The reply may still come: this connection is out of step now.
                *guard = None;
                return Err(StoreError::Timeout {
                    rank: self.rank,
                    key: waiting_for.to_string(),
                    waited_s: self.timeout.as_secs_f64(),
                    detail: "no rank published it (a rank is stuck or did not start); raise DALLE_MESH_COMM_TIMEOUT_S \
                             if start-up is legitimately slow"
                        .into(),
                });
            }
            Err(e) => return Err(self.io(e)),
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["OK"] => Ok(String::new()),
            ["VAL", v] => unhex(v).ok_or_else(|| self.io("malformed value")),
            ["DEAD", r, why] => Err(StoreError::PeerFailed {
                rank: r.parse().unwrap_or(usize::MAX),
                reason: unhex(why).unwrap_or_default(),
            }),
            ["SHUTDOWN"] => Err(self.io("the store is shutting down")),
            _ => Err(self.io(format!("unexpected reply {line:?}"))),
        }
    }

    fn lost(&self) -> StoreError {
        if let Some((rank, reason)) = self.peer_failure() {
            return StoreError::PeerFailed { rank, reason };
        }
        StoreError::PeerFailed { rank: 0, reason: "rank 0 died (the rendezvous store closed the connection)".into() }
    }

    fn check_key(key: &str) {
        assert!(!key.is_empty() && !key.contains(char::is_whitespace), "store keys are single words: {key:?}");
    }

    /// Publishes `value` under `key`.
    pub fn set(&self, key: &str, value: &str) -> Result<()> {
        Self::check_key(key);
        self.call(&format!("SET {key} {}\n", hex(value)), key, Instant::now() + self.timeout).map(|_| ())
    }

    /// The value under `key`, waiting (at most the store's timeout) until some rank sets it.
    pub fn get(&self, key: &str) -> Result<String> {
        Self::check_key(key);
        self.call(&format!("GET {key}\n"), key, Instant::now() + self.timeout)
    }

    /// Adds `n` to the counter `key` and returns the new total.
    pub fn add(&self, key: &str, n: i64) -> Result<i64> {
        Self::check_key(key);
        let v = self.call(&format!("ADD {key} {n}\n"), key, Instant::now() + self.timeout)?;
        v.parse().map_err(|_| self.io(format!("counter {key} holds {v:?}")))
    }

    /// Returns once every rank has called `barrier(name)` (each name once per run).
    pub fn barrier(&self, name: &str) -> Result<()> {
        let arrived = self.add(&format!("barrier/{name}/count"), 1)?;
        if arrived as usize == self.world {
            self.set(&format!("barrier/{name}/open"), "1")?;
        }
        self.get(&format!("barrier/{name}/open")).map(|_| ()).map_err(|e| match e {
            StoreError::Timeout { rank, key, waited_s, .. } => StoreError::Timeout {
                rank,
                key,
                waited_s,
                detail: format!("only some of the {} ranks reached barrier {name}", self.world),
            },
            other => other,
        })
    }

    /// Every rank publishes its `facts` (name, value) and compares them with every other rank's;
    /// a difference is a [`StoreError::Mismatch`] naming the fact and which ranks hold which value.
    pub fn handshake(&self, facts: &[(&str, String)]) -> Result<()> {
        let encoded: Vec<String> = facts.iter().map(|(k, v)| format!("{}={}", hex(k), hex(v))).collect();
        self.set(&format!("handshake/{}", self.rank), &encoded.join(","))?;
        let mut all = Vec::with_capacity(self.world);
        for r in 0..self.world {
            all.push(self.get(&format!("handshake/{r}"))?);
        }
        let decode = |s: &str| -> Vec<(String, String)> {
            s.split(',').filter_map(|kv| kv.split_once('=')).filter_map(|(k, v)| Some((unhex(k)?, unhex(v)?))).collect()
        };
        let tables: Vec<Vec<(String, String)>> = all.iter().map(|s| decode(s)).collect();
        let mut problems = Vec::new();
        for (name, _) in facts {
            let mut by_value: Vec<(String, Vec<usize>)> = Vec::new();
            for (r, t) in tables.iter().enumerate() {
                let v = t.iter().find(|(k, _)| k == name).map_or("(missing)".to_string(), |(_, v)| v.clone());
                match by_value.iter_mut().find(|(x, _)| *x == v) {
                    Some((_, ranks)) => ranks.push(r),
                    None => by_value.push((v, vec![r])),
                }
            }
            if by_value.len() > 1 {
                let parts: Vec<String> =
                    by_value.iter().map(|(v, ranks)| format!("ranks {ranks:?} have {}", shorten(v))).collect();
                problems.push(format!("{name}: {}", parts.join("; ")));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Mismatch(format!(
                "{}; start every rank with the same binary, run config and --resume",
                problems.join(" | ")
            )))
        }
    }

    /// Tells every other rank that this one failed (they stop at once instead of timing out).
    pub fn report_failure(&self, reason: &str) {
        if let Some(w) = lock(&self.watch).as_mut() {
            let _ = w.write_all(format!("FAIL {}\n", hex(reason)).as_bytes());
        }
        if let Some(s) = &self.server {
            s.fail(self.rank, reason);
        }
    }

    /// A clean end: says goodbye; rank 0 then keeps serving until every rank has said goodbye
    /// (or failed, or the timeout passed), so no rank mistakes a finished rank 0 for a dead one.
    pub fn finish(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some(w) = lock(&self.watch).as_mut() {
            let _ = w.write_all(b"BYE\n");
        }
        if let Some(server) = &self.server {
            let deadline = Instant::now() + self.timeout;
            let mut s = lock(&server.state);
            while s.finished.len() < self.world && s.dead.is_none() && Instant::now() < deadline {
                s = server
                    .changed
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            s.shutdown = true;
            server.changed.notify_all();
            drop(s);
            server.stop.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Store {
    /// Closes the watch connection (other copies of the socket live on the watcher thread): a
    /// handle dropped without [`Store::finish`] reads as this rank's death to the others.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some(w) = lock(&self.watch).take() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    type Seen = Arc<Mutex<Vec<(usize, String)>>>;

    fn hook() -> (PeerFailureHook, Seen) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        (Arc::new(move |r, why: &str| lock(&s).push((r, why.to_string()))), seen)
    }

    #[test]
    fn values_barriers_and_handshake_across_ranks() {
        let addr = free_addr();
        let t = Duration::from_secs(20);
        let a = addr.clone();
        let (h0, _) = hook();
        let s0 = Store::connect(&a, 0, 3, t, h0).unwrap();
        let others: Vec<_> = (1..3)
            .map(|r| {
                let a = addr.clone();
                std::thread::spawn(move || {
                    let (h, _) = hook();
                    let s = Store::connect(&a, r, 3, t, h).unwrap();
                    let v = s.get("nccl/tp0").unwrap();
                    s.barrier("b1").unwrap();
                    s.handshake(&[("version", "1".into()), ("config", "x y\nz".into())]).unwrap();
                    s.finish();
                    v
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        s0.set("nccl/tp0", "id with spaces\n").unwrap();
        s0.barrier("b1").unwrap();
        s0.handshake(&[("version", "1".into()), ("config", "x y\nz".into())]).unwrap();
        assert_eq!(s0.add("n", 2).unwrap(), 2);
        assert_eq!(s0.add("n", 3).unwrap(), 5);
        for o in others {
            assert_eq!(o.join().unwrap(), "id with spaces\n");
        }
        s0.finish();
    }

    #[test]
    fn handshake_names_the_ranks_that_differ() {
        let addr = free_addr();
        let t = Duration::from_secs(20);
        let results: Vec<_> = (0..3)
            .map(|r| {
                let a = addr.clone();
                std::thread::spawn(move || {
                    if r > 0 {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let (h, _) = hook();
                    let s = Store::connect(&a, r, 3, t, h).unwrap();
                    let cfg = if r == 2 { "lr 2" } else { "lr 1" };
                    let out = s.handshake(&[("version", "1".into()), ("run config", cfg.into())]);
                    s.barrier("done").unwrap();
                    s.finish();
                    out
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for r in results {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(r#"run config: ranks [0, 1] have "lr 1"; ranks [2] have "lr 2""#), "{e}");
            assert!(!e.contains("version"), "{e}");
        }
    }

    #[test]
    fn a_vanished_rank_is_announced_to_the_others() {
        let addr = free_addr();
        let t = Duration::from_secs(20);
        let (h0, seen0) = hook();
        let s0 = Store::connect(&addr, 0, 3, t, h0).unwrap();
        let (h1, seen1) = hook();
        let s1 = Store::connect(&addr, 1, 3, t, h1).unwrap();
        let (h2, _) = hook();
        let s2 = Store::connect(&addr, 2, 3, t, h2).unwrap();
        // Rank 2 disappears without a goodbye (as after SIGKILL).
        drop(s2);
        let started = Instant::now();
        while (lock(&seen0).is_empty() || lock(&seen1).is_empty()) && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for seen in [&seen0, &seen1] {
            let v = lock(seen);
            assert_eq!(v.len(), 1, "{v:?}");
            assert_eq!(v[0].0, 2);
            assert!(v[0].1.contains("died"), "{v:?}");
        }
        // A blocked get now fails naming the rank instead of waiting.
        let e = s1.get("never").unwrap_err();
        assert!(matches!(e, StoreError::PeerFailed { rank: 2, .. }), "{e}");
        s1.finish();
        s0.finish();
    }

    #[test]
    fn reported_failures_and_rank_zero_death_reach_the_others() {
        let addr = free_addr();
        let t = Duration::from_secs(20);
        let (h0, _) = hook();
        let s0 = Store::connect(&addr, 0, 2, t, h0).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let reasons: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
        let (c, rs) = (count.clone(), reasons.clone());
        let h1: PeerFailureHook = Arc::new(move |r, why: &str| {
            c.fetch_add(1, Ordering::SeqCst);
            lock(&rs).push((r, why.to_string()));
        });
        let s1 = Store::connect(&addr, 1, 2, t, h1).unwrap();
        s0.report_failure("loss became NaN");
        let started = Instant::now();
        while count.load(Ordering::SeqCst) == 0 && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lock(&reasons).as_slice(), &[(0, "loss became NaN".to_string())]);
        drop(s1);
        s0.finish();
    }

    #[test]
    fn bind_and_connect_errors_name_the_fix() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let (h, _) = hook();
        let e = Store::connect(&addr, 0, 2, Duration::from_secs(1), h.clone()).unwrap_err().to_string();
        assert!(e.contains("already in use") && e.contains("MASTER_PORT"), "{e}");
        let e = Store::connect("192.0.2.1:1", 0, 2, Duration::from_secs(1), h.clone()).unwrap_err().to_string();
        assert!(e.contains("not an address of this host") && e.contains("MASTER_ADDR"), "{e}");
        drop(held);
        let e = Store::connect(&free_addr(), 1, 2, Duration::from_millis(300), h).unwrap_err().to_string();
        assert!(e.contains("could not reach") && e.contains("MASTER_ADDR"), "{e}");
    }

    #[test]
    fn a_missing_key_times_out_naming_it() {
        let addr = free_addr();
        let (h, _) = hook();
        let s = Store::connect(&addr, 0, 1, Duration::from_millis(300), h).unwrap();
        let e = s.get("nccl/dp1").unwrap_err().to_string();
        assert!(e.contains("nccl/dp1") && e.contains("DALLE_MESH_COMM_TIMEOUT_S"), "{e}");
        s.finish();
    }
}
