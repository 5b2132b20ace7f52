//! The request I/O thread (DESIGN §4): it owns the ZMQ ROUTER socket, decodes every request,
//! answers control operations itself and hands data operations to Python workers.
//!
//! ```text
//!  clients ──ROUTER──> I/O thread ──┬─ control op: ControlPlane, reply at once
//!                         ^         ├─ wait_prefetch_status: parked until ready or deadline
//!                         │         └─ data op ──> lane queue ──> Python worker (GIL released
//!                         │                                       while it waits in `next`)
//!                         └──── reply queue + wake socket <────── worker's `reply`
//! ```
//!
//! * **Lanes.** Data operations of one client identity go to one of `affinity_lanes` lanes (a
//!   hash of the identity), each served by one Python thread, so a client's transfers keep
//!   FIFO order; the few operations Python serves beside them (block allocation reports) go
//!   to a shared `normal` lane. The I/O thread never waits for Python or the GIL.
//! * **Bounds.** At most `max_pending` requests are queued, running or parked; beyond that a
//!   sheddable request is answered `overloaded` at once (never a hang).
//! * **Every request is answered**: malformed frames, unknown or refused operations, bad
//!   arguments, overload, shutdown; a request a worker drops without replying is answered
//!   `internal` when it is dropped; a wait is answered nil at its deadline.
//! * **Heartbeat.** The loop polls with at most a 100 ms timeout and ticks after every poll and
//!   every request; `io_status` reports it for /healthcheck. A panic ends the thread and is
//!   reported there.
//! * **Stop** (SIGTERM): new requests are answered `shutting_down`, queued and running ones
//!   finish and are answered, then the loop answers what still arrives for up to 2 s of
//!   quiet and closes the socket.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;

use super::codec::{self, OpName};
use super::stats::{OpTimer, OpTiming};
use super::{ControlPlane, KeyView, OpError};
use crate::clock::Clock;
use crate::wire;

/// Longest the loop waits in poll: the heartbeat's period when idle.
pub const POLL_MS: i64 = 100;
/// Longest a `wait_prefetch_status` is parked.
pub const MAX_WAIT_SECS: f64 = 5.0;
/// Messages taken from the socket before the loop sends replies again.
const RECV_BATCH: usize = 256;

/// Log levels, as Python's `logging`.
pub const DEBUG: u8 = 10;
pub const INFO: u8 = 20;
pub const WARNING: u8 = 30;
pub const ERROR: u8 = 40;
pub const CRITICAL: u8 = 50;

/// The control operations answered on the I/O thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Native {
    Noop,
    Ping,
    Lookup,
    QueryPrefetchStatus,
    WaitPrefetchStatus,
    EndSession,
    FreeLookupLocks,
    Clear,
    GetChunkSize,
    GetExperimental,
}

impl Native {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "noop" => Self::Noop,
            "ping" => Self::Ping,
            "lookup" => Self::Lookup,
            "query_prefetch_status" => Self::QueryPrefetchStatus,
            "wait_prefetch_status" => Self::WaitPrefetchStatus,
            "end_session" => Self::EndSession,
            "free_lookup_locks" => Self::FreeLookupLocks,
            "clear" => Self::Clear,
            "get_chunk_size" => Self::GetChunkSize,
            "get_experimental" => Self::GetExperimental,
            _ => return None,
        })
    }
}

/// Where a request of an operation goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Native(Native),
    /// A Python worker of the client's affinity lane (FIFO per client).
    Affinity,
    /// A Python worker of the shared normal lane.
    Normal,
    /// Known, not served here: answered `unsupported_op` with this reason.
    Refused(String),
}

/// One row of the operation table (spec B.4); built from `protocol/ops.py`.
#[derive(Debug, Clone)]
pub struct OpRow {
    pub name: String,
    pub legacy_id: Option<i64>,
    pub nargs: usize,
    pub route: Route,
    /// The payload frame of an error reply (the op's natural failure value), msgpack.
    pub fallback: Vec<u8>,
    /// Refused `overloaded` when too many requests are pending.
    pub sheddable: bool,
}

/// Settings of the I/O thread.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub url: String,
    pub ipv6: bool,
    pub max_message_bytes: i64,
    pub max_pending: usize,
    pub affinity_lanes: usize,
}

/// A request handed to a Python worker.
#[derive(Debug)]
pub struct Request {
    pub identity: Vec<u8>,
    pub uid: Vec<u8>,
    pub op_frame: Vec<u8>,
    pub row: usize,
    pub args: Vec<Vec<u8>>,
    received: Instant,
    taken: Mutex<Option<Instant>>,
    answered: AtomicBool,
    server: Weak<Shared>,
}

impl Drop for Request {
    fn drop(&mut self) {
        // A request nobody answered (a worker that died, a lane dropped at exit) still gets
        // its reply.
        if !self.answered.load(SeqCst) {
            if let Some(sh) = self.server.upgrade() {
                let row = &sh.ops[self.row];
                let err = OpError::new("internal", "the request was dropped without a reply");
                let frames = sh.error_frames(&self.identity, &self.uid, &self.op_frame, Some(row), &err);
                sh.finish(self.row, self.received, *self.taken.lock(), frames);
            }
        }
    }
}

/// A parked `wait_prefetch_status`.
#[derive(Debug)]
struct Waiter {
    identity: Vec<u8>,
    uid: Vec<u8>,
    op_frame: Vec<u8>,
    row: usize,
    request_id: String,
    deadline: Instant,
    received: Instant,
}

/// A test hook: makes the I/O loop stall or panic, so the health checks are tested against
/// the real loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Block in the loop until [`Server::release_fault`].
    Stall,
    /// Panic with this message.
    Panic(String),
}

/// What the I/O loop reports (observability.health.IoLoopStatus).
#[derive(Debug, Clone, PartialEq)]
pub struct IoStatus {
    pub alive: bool,
    pub stopping: bool,
    pub last_tick_ago_secs: Option<f64>,
    pub requests_received: u64,
    pub replies_sent: u64,
    pub pending_requests: usize,
    pub error: Option<String>,
}

struct Lane {
    tx: Sender<Arc<Request>>,
    rx: Receiver<Arc<Request>>,
}

struct Shared {
    cp: Arc<ControlPlane>,
    cfg: ServerConfig,
    ops: Vec<OpRow>,
    by_name: HashMap<String, usize>,
    by_id: HashMap<i128, usize>,
    timers: Vec<OpTimer>,
    /// `affinity_lanes` affinity lanes, then the normal lane.
    lanes: Vec<Lane>,
    replies_tx: Sender<Vec<Vec<u8>>>,
    replies_rx: Receiver<Vec<Vec<u8>>>,
    wake_tx: UnixDatagram,
    pending: AtomicUsize,
    accepting: AtomicBool,
    stop: AtomicBool,
    alive: AtomicBool,
    started: AtomicBool,
    clock: Arc<dyn Clock>,
    last_tick: AtomicU64,
    requests: AtomicU64,
    replies: AtomicU64,
    loop_error: Mutex<Option<String>>,
    logs_tx: Sender<(u8, String)>,
    logs_rx: Receiver<(u8, String)>,
    fault: Mutex<Option<Fault>>,
    fault_armed: AtomicBool,
    /// The loop is inside an injected stall.
    stalled: AtomicBool,
    fault_cv: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// FNV-1a of a client identity: its affinity lane.
fn lane_of(identity: &[u8], lanes: usize) -> usize {
    let h = identity
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (h % lanes as u64) as usize
}

impl Shared {
    fn log(&self, level: u8, msg: String) {
        // Bounded: a flood of error replies never grows memory; lines beyond are dropped.
        let _ = self.logs_tx.try_send((level, msg));
    }

    fn wake(&self) {
        // A full socket buffer already holds a wake-up: nothing is lost by dropping this one.
        let _ = self.wake_tx.send(&[1]);
    }

    /// An error reply goes out (built here or by a Python worker): counted by code, logged.
    fn note_error(&self, op: &str, code: &str, message: &str) {
        self.cp.counters.add(&["request_errors", code], 1);
        self.log(WARNING, format!("request {op} failed: {code}: {message}"));
    }

    fn error_frames(
        &self,
        identity: &[u8],
        uid: &[u8],
        op_frame: &[u8],
        row: Option<&OpRow>,
        err: &OpError,
    ) -> Vec<Vec<u8>> {
        let name = row.map_or("", |r| r.name.as_str());
        self.note_error(if name.is_empty() { "?" } else { name }, err.code, &err.message);
        let fallback = row.map_or_else(codec::nil, |r| r.fallback.clone());
        vec![
            identity.to_vec(),
            uid.to_vec(),
            op_frame.to_vec(),
            fallback,
            codec::error_body(err.code, &err.message, name),
        ]
    }

    /// A Python-handled request is answered: timing, the pending count, the reply queue.
    fn finish(&self, row: usize, received: Instant, taken: Option<Instant>, frames: Vec<Vec<u8>>) {
        let now = Instant::now();
        let taken = taken.unwrap_or(now);
        self.timers[row].record(nanos(now - taken), nanos(taken.saturating_duration_since(received)));
        self.pending.fetch_sub(1, SeqCst);
        let _ = self.replies_tx.send(frames);
        self.wake();
    }

    fn tick(&self) {
        self.last_tick.store(self.clock.now_ns(), Relaxed);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The server: its I/O thread and the queues Python workers serve.
pub struct Server {
    shared: Arc<Shared>,
    url: String,
    socket: Mutex<Option<(zmq::Socket, UnixDatagram)>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    _ctx: zmq::Context,
}

/// Errors of starting a server (bind failures, a bad table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the socket (the thread starts with [`Server::start`]).
    pub fn bind(
        cp: Arc<ControlPlane>,
        cfg: ServerConfig,
        ops: Vec<OpRow>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        let zerr = |what: &str, e: zmq::Error| StartError(format!("{what}: {e}"));
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::ROUTER).map_err(|e| zerr("socket", e))?;
        sock.set_router_mandatory(true).map_err(|e| zerr("ROUTER_MANDATORY", e))?;
        sock.set_linger(0).map_err(|e| zerr("LINGER", e))?;
        sock.set_maxmsgsize(cfg.max_message_bytes).map_err(|e| zerr("MAXMSGSIZE", e))?;
        sock.set_rcvhwm(0).map_err(|e| zerr("RCVHWM", e))?;
        sock.set_sndhwm(0).map_err(|e| zerr("SNDHWM", e))?;
        if cfg.ipv6 {
            sock.set_ipv6(true).map_err(|e| zerr("IPV6", e))?;
        }
        sock.bind(&cfg.url).map_err(|e| zerr(&format!("bind {}", cfg.url), e))?;
        let url = match sock.get_last_endpoint() {
            Ok(Ok(u)) => u,
            _ => cfg.url.clone(),
        };
        let (wake_tx, wake_rx) = UnixDatagram::pair().map_err(|e| StartError(format!("wake socket: {e}")))?;
        for s in [&wake_tx, &wake_rx] {
            s.set_nonblocking(true).map_err(|e| StartError(format!("wake socket: {e}")))?;
        }
        let mut by_name = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, r) in ops.iter().enumerate() {
            by_name.insert(r.name.clone(), i);
            if let Some(id) = r.legacy_id {
                by_id.insert(i128::from(id), i);
            }
        }
        let lanes = (0..cfg.affinity_lanes.max(1) + 1)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::unbounded();
                Lane { tx, rx }
            })
            .collect();
        let (replies_tx, replies_rx) = crossbeam_channel::unbounded();
        let (logs_tx, logs_rx) = crossbeam_channel::bounded(4096);
        let timers = ops.iter().map(|_| OpTimer::default()).collect();
        let shared = Arc::new(Shared {
            cp,
            cfg: ServerConfig { affinity_lanes: cfg.affinity_lanes.max(1), ..cfg },
            ops,
            by_name,
            by_id,
            timers,
            lanes,
            replies_tx,
            replies_rx,
            wake_tx,
            pending: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            alive: AtomicBool::new(false),
            started: AtomicBool::new(false),
            clock,
            last_tick: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            loop_error: Mutex::new(None),
            logs_tx,
            logs_rx,
            fault: Mutex::new(None),
            fault_armed: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            fault_cv: Condvar::new(),
        });
        let weak = Arc::downgrade(&shared);
        shared.cp.set_notify(Arc::new(move || {
            if let Some(sh) = weak.upgrade() {
                sh.wake();
            }
        }));
        Ok(Self {
            shared,
            url,
            socket: Mutex::new(Some((sock, wake_rx))),
            thread: Mutex::new(None),
            _ctx: ctx,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.shared.cp
    }

    pub fn ops(&self) -> &[OpRow] {
        &self.shared.ops
    }

    pub fn lanes(&self) -> usize {
        self.shared.lanes.len()
    }

    pub fn normal_lane(&self) -> usize {
        self.shared.lanes.len() - 1
    }

    /// Starts the I/O thread.
    pub fn start(&self) -> Result<(), StartError> {
        let Some((sock, wake_rx)) = self.socket.lock().take() else {
            return Err(StartError("the server was started already".into()));
        };
        let sh = self.shared.clone();
        sh.tick();
        sh.alive.store(true, SeqCst);
        sh.started.store(true, SeqCst);
        let handle = std::thread::Builder::new()
            .name("mq-server-thread".into())
            .spawn(move || {
                let run = catch_unwind(AssertUnwindSafe(|| io_loop(&sh, &sock, &wake_rx)));
                if let Err(p) = run {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    *sh.loop_error.lock() = Some(format!("panic: {msg}"));
                    sh.log(
                        CRITICAL,
                        format!("request I/O thread died ({msg}); no more requests are answered"),
                    );
                }
                sh.alive.store(false, SeqCst);
            })
            .map_err(|e| StartError(format!("spawn: {e}")))?;
        *self.thread.lock() = Some(handle);
        Ok(())
    }

    /// Stops intake (new requests are answered `shutting_down`), lets queued and running
    /// requests finish (up to `timeout`), answers them, then closes the socket.
    pub fn stop(&self, timeout: Duration) {
        let sh = &self.shared;
        sh.accepting.store(false, SeqCst);
        let deadline = Instant::now() + timeout;
        while sh.pending.load(SeqCst) > 0 && Instant::now() < deadline && sh.alive.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        sh.stop.store(true, SeqCst);
        sh.wake();
        self.release_fault();
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
        self.socket.lock().take();
    }

    /// The next request of `lane` for a Python worker; None after `timeout` or once the
    /// server stopped and the lane is empty.
    pub fn next(&self, lane: usize, timeout: Duration) -> Option<Arc<Request>> {
        let rx = &self.shared.lanes.get(lane)?.rx;
        let deadline = Instant::now() + timeout;
        loop {
            let slice =
                deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(POLL_MS as u64));
            match rx.recv_timeout(slice) {
                Ok(req) => {
                    *req.taken.lock() = Some(Instant::now());
                    return Some(req);
                }
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.stop.load(SeqCst) || Instant::now() >= deadline {
                        return None;
                    }
                }
            }
        }
    }

    /// Whether the server stopped (workers exit when their lane is empty).
    pub fn stopped(&self) -> bool {
        self.shared.stop.load(SeqCst)
    }

    /// A worker's reply: `frames` are `[uid, op, payload...]` (the identity is added);
    /// `error` the code and message when it is an error reply. False when it was answered
    /// already.
    pub fn reply(&self, req: &Request, frames: Vec<Vec<u8>>, error: Option<(&str, &str)>) -> bool {
        if req.answered.swap(true, SeqCst) {
            return false;
        }
        let sh = &self.shared;
        if let Some((code, message)) = error {
            sh.note_error(&sh.ops[req.row].name, code, message);
        }
        let mut out = Vec::with_capacity(frames.len() + 1);
        out.push(req.identity.clone());
        out.extend(frames);
        sh.finish(req.row, req.received, *req.taken.lock(), out);
        true
    }

    /// The next log line of the I/O thread (level, message), for Python's logging.
    pub fn next_log(&self, timeout: Duration) -> Option<(u8, String)> {
        self.shared.logs_rx.recv_timeout(timeout).ok()
    }

    pub fn io_status(&self) -> IoStatus {
        let sh = &self.shared;
        let started = sh.started.load(SeqCst);
        IoStatus {
            alive: sh.alive.load(SeqCst),
            stopping: sh.stop.load(SeqCst) || !sh.accepting.load(SeqCst),
            last_tick_ago_secs: started
                .then(|| sh.clock.now_ns().saturating_sub(sh.last_tick.load(Relaxed)) as f64 / 1e9),
            requests_received: sh.requests.load(Relaxed),
            replies_sent: sh.replies.load(Relaxed),
            pending_requests: sh.pending.load(SeqCst),
            error: sh.loop_error.lock().clone(),
        }
    }

    /// Per operation name, its timings.
    pub fn timings(&self) -> Vec<(String, OpTiming)> {
        let sh = &self.shared;
        sh.ops
            .iter()
            .zip(&sh.timers)
            .map(|(r, t)| (r.name.clone(), t.snapshot()))
            .filter(|(_, t)| t.count > 0)
            .collect()
    }

    /// Test hook: the loop stalls or panics at its next iteration.
    pub fn inject_fault(&self, fault: Fault) {
        *self.shared.fault.lock() = Some(fault);
        self.shared.fault_armed.store(true, SeqCst);
        self.shared.wake();
    }

    /// Whether the loop is inside an injected stall.
    pub fn stalled(&self) -> bool {
        self.shared.stalled.load(SeqCst)
    }

    /// Ends an injected stall.
    pub fn release_fault(&self) {
        let mut f = self.shared.fault.lock();
        *f = None;
        self.shared.fault_armed.store(false, SeqCst);
        self.shared.fault_cv.notify_all();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.lock().is_some() {
            self.stop(Duration::from_secs(1));
        }
    }
}

// ---- the I/O thread ------------------------------------------------------------------------

fn io_loop(sh: &Arc<Shared>, sock: &zmq::Socket, wake: &UnixDatagram) {
    let mut waiters: Vec<Waiter> = Vec::new();
    loop {
        let now = Instant::now();
        let timeout = waiters
            .iter()
            .map(|w| w.deadline.saturating_duration_since(now).as_millis() as i64 + 1)
            .min()
            .unwrap_or(POLL_MS)
            .min(POLL_MS);
        let mut items =
            [sock.as_poll_item(zmq::POLLIN), zmq::PollItem::from_fd(wake.as_raw_fd(), zmq::POLLIN)];
        match zmq::poll(&mut items, timeout) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => panic!("zmq poll failed: {e}"),
        }
        let (readable, woken) = (items[0].is_readable(), items[1].is_readable());
        sh.tick();
        if sh.fault_armed.load(SeqCst) {
            run_fault(sh);
        }
        if woken {
            let mut buf = [0u8; 64];
            while wake.recv(&mut buf).is_ok() {}
        }
        send_replies(sh, sock);
        answer_waiters(sh, sock, &mut waiters, false);
        if sh.stop.load(SeqCst) {
            drain_on_stop(sh, sock, &mut waiters);
            return;
        }
        if readable {
            for _ in 0..RECV_BATCH {
                match sock.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => {
                        dispatch(sh, sock, frames, &mut waiters);
                        sh.tick();
                    }
                    Err(zmq::Error::EAGAIN) => break,
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => {
                        sh.log(ERROR, format!("receive failed: {e}"));
                        break;
                    }
                }
            }
        }
    }
}

fn run_fault(sh: &Shared) {
    let mut f = sh.fault.lock();
    match f.clone() {
        Some(Fault::Panic(msg)) => {
            *f = None;
            sh.fault_armed.store(false, SeqCst);
            drop(f);
            panic!("{msg}");
        }
        Some(Fault::Stall) => {
            sh.stalled.store(true, SeqCst);
            while f.is_some() {
                sh.fault_cv.wait(&mut f);
            }
            sh.stalled.store(false, SeqCst);
        }
        None => {}
    }
}

fn send(sh: &Shared, sock: &zmq::Socket, frames: Vec<Vec<u8>>) {
    match sock.send_multipart(frames, zmq::DONTWAIT) {
        Ok(()) => {
            sh.replies.fetch_add(1, Relaxed);
        }
        // The peer disconnected (EHOSTUNREACH) or is not reading: the reply is dropped.
        Err(e) => sh.log(DEBUG, format!("reply to a gone or stalled client dropped: {e}")),
    }
}

fn send_replies(sh: &Shared, sock: &zmq::Socket) {
    while let Ok(frames) = sh.replies_rx.try_recv() {
        send(sh, sock, frames);
    }
}

fn answer_waiters(sh: &Shared, sock: &zmq::Socket, waiters: &mut Vec<Waiter>, all: bool) {
    if waiters.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut i = 0;
    while i < waiters.len() {
        let w = &waiters[i];
        let answer = match sh.cp.take_if_ready(&w.request_id) {
            Some(result) => Some(result),
            None if all || now >= w.deadline => Some(None),
            None => None,
        };
        if let Some(result) = answer {
            let w = waiters.swap_remove(i);
            sh.timers[w.row].record(nanos(now - w.received), 0);
            sh.pending.fetch_sub(1, SeqCst);
            send(sh, sock, vec![w.identity, w.uid, w.op_frame, codec::opt_uint(result)]);
        } else {
            i += 1;
        }
    }
}

/// Answers what still arrives (`shutting_down`) until the socket has been quiet for 100 ms,
/// at most 2 s, so no request sent before the stop goes unanswered.
fn drain_on_stop(sh: &Arc<Shared>, sock: &zmq::Socket, waiters: &mut Vec<Waiter>) {
    answer_waiters(sh, sock, waiters, true);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match sock.poll(zmq::POLLIN, 100) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
        while let Ok(frames) = sock.recv_multipart(zmq::DONTWAIT) {
            dispatch(sh, sock, frames, waiters);
        }
        send_replies(sh, sock);
    }
    send_replies(sh, sock);
}

/// What a native operation did.
enum Outcome {
    /// Reply with this payload frame (None: the two-frame reply of an op without payload).
    Reply(Option<Vec<u8>>),
    /// Park until ready or the deadline.
    Wait { request_id: String, timeout: f64 },
}

fn dispatch(sh: &Arc<Shared>, sock: &zmq::Socket, mut frames: Vec<Vec<u8>>, waiters: &mut Vec<Waiter>) {
    sh.requests.fetch_add(1, Relaxed);
    let received = Instant::now();
    if frames.len() < 3 || frames[2].is_empty() {
        let what = if frames.len() < 3 {
            "missing operation frame"
        } else {
            "control messages (streams) are not supported"
        };
        let uid = frames.get(1).cloned().unwrap_or_else(codec::nil);
        let op = frames.get(2).cloned().unwrap_or_default();
        let err = OpError::new("bad_frame", what);
        let out = sh.error_frames(&frames[0], &uid, &op, None, &err);
        return send(sh, sock, out);
    }
    let args = frames.split_off(3);
    let op_frame = frames.pop().expect("3 frames");
    let uid = frames.pop().expect("3 frames");
    let identity = frames.pop().expect("3 frames");
    let fail = |row: Option<&OpRow>, err: OpError| {
        let out = sh.error_frames(&identity, &uid, &op_frame, row, &err);
        send(sh, sock, out);
    };
    let row_i = match codec::op_name(&op_frame) {
        Err(e) => {
            return fail(
                None,
                OpError::new("bad_frame", format!("operation frame is not a msgpack int or str: {e}")),
            )
        }
        Ok(OpName::Id(id)) => sh.by_id.get(&id).copied().ok_or_else(|| format!("{id}")),
        Ok(OpName::Name(n)) => sh.by_name.get(n).copied().ok_or_else(|| format!("'{n}'")),
    };
    let row_i = match row_i {
        Ok(i) => i,
        Err(shown) => return fail(None, OpError::new("unknown_op", format!("unknown operation {shown}"))),
    };
    let row = &sh.ops[row_i];
    if let Route::Refused(why) = &row.route {
        return fail(Some(row), OpError::new("unsupported_op", why.clone()));
    }
    if !sh.accepting.load(SeqCst) {
        return fail(Some(row), OpError::new("shutting_down", "server is stopping"));
    }
    if args.len() != row.nargs {
        let msg = format!("{} takes {} argument frame(s), got {}", row.name, row.nargs, args.len());
        return fail(Some(row), OpError::new("bad_request", msg));
    }
    let lane = match &row.route {
        Route::Native(op) => {
            let outcome = catch_unwind(AssertUnwindSafe(|| native(sh, *op, &row.name, &args)));
            let outcome = match outcome {
                Ok(o) => o,
                Err(_) => Err(OpError::new("internal", format!("{} panicked; see the server log", row.name))),
            };
            match outcome {
                Ok(Outcome::Reply(payload)) => {
                    sh.timers[row_i].record(nanos(received.elapsed()), 0);
                    let mut out = vec![identity, uid, op_frame];
                    out.extend(payload);
                    return send(sh, sock, out);
                }
                Err(err) => {
                    sh.timers[row_i].record(nanos(received.elapsed()), 0);
                    return fail(Some(row), err);
                }
                Ok(Outcome::Wait { request_id, timeout }) => {
                    if !admit(sh, row) {
                        return fail(Some(row), overloaded(sh));
                    }
                    let secs = if timeout.is_finite() { timeout.clamp(0.0, MAX_WAIT_SECS) } else { 0.0 };
                    waiters.push(Waiter {
                        identity,
                        uid,
                        op_frame,
                        row: row_i,
                        request_id,
                        deadline: received + Duration::from_secs_f64(secs),
                        received,
                    });
                    return;
                }
            }
        }
        Route::Affinity => lane_of(&identity, sh.cfg.affinity_lanes),
        Route::Normal => sh.lanes.len() - 1,
        Route::Refused(_) => unreachable!("answered above"),
    };
    if !admit(sh, row) {
        return fail(Some(row), overloaded(sh));
    }
    let req = Arc::new(Request {
        identity,
        uid,
        op_frame,
        row: row_i,
        args,
        received,
        taken: Mutex::new(None),
        answered: AtomicBool::new(false),
        server: Arc::downgrade(sh),
    });
    // The lane's receiver lives as long as `sh`: the send cannot fail.
    let _ = sh.lanes[lane].tx.send(req);
}

fn overloaded(sh: &Shared) -> OpError {
    OpError::new("overloaded", format!("{} requests pending; try again", sh.pending.load(SeqCst)))
}

/// Counts a request as pending unless the limit is reached and it is sheddable.
fn admit(sh: &Shared, row: &OpRow) -> bool {
    let n = sh.pending.fetch_add(1, SeqCst);
    if n >= sh.cfg.max_pending && row.sheddable {
        sh.pending.fetch_sub(1, SeqCst);
        return false;
    }
    true
}

fn arg_err(name: &str, i: usize) -> impl Fn(String) -> OpError + '_ {
    move |e| OpError::new("bad_request", format!("{name} argument {i}: {e}"))
}

/// Decodes a key and runs `f` on it; `hashed`: the ids come as their chunk hashes, through the
/// memo (a lookup), else parsed.
fn with_key<T>(
    cp: &ControlPlane,
    hashed: bool,
    name: &str,
    frame: &[u8],
    f: impl FnOnce(&KeyView<'_>) -> Result<T, OpError>,
) -> Result<T, OpError> {
    let key = if hashed {
        // The lookup records what it finds in L1 (`ControlPlane::lookup`).
        wire::decode_key_hashed(frame, &cp.memo, cp.config.chunk_size, false)
    } else {
        wire::decode_key(frame)
    }
    .map_err(|e| arg_err(name, 0)(e.to_string()))?;
    let view = KeyView::of(&key)?;
    f(&view)
}

fn native(sh: &Shared, op: Native, name: &str, args: &[Vec<u8>]) -> Result<Outcome, OpError> {
    let cp = &sh.cp;
    Ok(match op {
        Native::Noop => Outcome::Reply(Some(codec::string("OK"))),
        Native::GetChunkSize => Outcome::Reply(Some(codec::uint(cp.config.chunk_size as u64))),
        Native::GetExperimental => Outcome::Reply(Some(codec::empty_array())),
        Native::Ping => {
            let instance = codec::arg_opt_int(&args[0]).map_err(arg_err(name, 0))?;
            let known = cp.ping(instance);
            if !known {
                if let Some(i) = instance {
                    sh.log(
                        INFO,
                        format!("ping from unknown instance {i}: answered false so that it registers again"),
                    );
                }
            }
            Outcome::Reply(Some(codec::boolean(known)))
        }
        Native::Lookup => {
            codec::arg_int(&args[1]).map_err(arg_err(name, 1))?;
            with_key(cp, true, name, &args[0], |k| cp.lookup(k))?;
            Outcome::Reply(None)
        }
        Native::QueryPrefetchStatus => {
            let rid = codec::arg_str(&args[0]).map_err(arg_err(name, 0))?;
            Outcome::Reply(Some(codec::opt_uint(cp.query(rid))))
        }
        Native::WaitPrefetchStatus => {
            let rid = codec::arg_str(&args[0]).map_err(arg_err(name, 0))?;
            let timeout = codec::arg_float(&args[1]).map_err(arg_err(name, 1))?;
            match cp.take_if_ready(rid) {
                Some(result) => Outcome::Reply(Some(codec::opt_uint(result))),
                None => Outcome::Wait { request_id: rid.to_owned(), timeout },
            }
        }
        Native::EndSession => {
            let rid = codec::arg_str(&args[0]).map_err(arg_err(name, 0))?;
            cp.end_session(rid);
            Outcome::Reply(None)
        }
        Native::FreeLookupLocks => {
            codec::arg_int(&args[1]).map_err(arg_err(name, 1))?;
            with_key(cp, false, name, &args[0], |k| cp.free_lookup_locks(k))?;
            Outcome::Reply(None)
        }
        Native::Clear => {
            let force = codec::arg_bool(&args[0]).map_err(arg_err(name, 0))?;
            let r = cp.index.clear(force);
            cp.counters.add(&["l1_clears", if force { "forced" } else { "normal" }], 1);
            sh.log(
                INFO,
                format!(
                    "clear(force={force}): {} objects ({} bytes) dropped, {} of them ({} bytes) pending the end of transfers in flight",
                    r.objects, r.bytes, r.pending_objects, r.pending_bytes
                ),
            );
            // No payload: LMCache's client reads any non-nil reply to clear as undecodable.
            Outcome::Reply(None)
        }
    })
}

#[cfg(test)]
mod tests;
