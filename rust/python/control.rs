//! Bindings of the control plane (`crate::control`): the native request server, the state
//! its control operations share with the Python data path, and the typed values crossing the
//! boundary. Same rule as the rest of the bindings: every core call runs with the GIL
//! released, and nothing under a core lock calls Python.

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use super::{hashes_of, ChainMemo, L1Index, ManualClock};
use crate::clock::{Clock, MonotonicClock};
use crate::control::server::{self, Fault, Native, OpRow, Route, ServerConfig};
use crate::control::workers::{GroupSpec, Layout};
use crate::control::{self, data, ControlConfig, KeyView, OpError};
use crate::hash;
use crate::key::{self, ChunkHash};

fn op_err(e: OpError) -> PyErr {
    ControlError::new_err((e.code, e.message))
}

pyo3::create_exception!(
    _core,
    ControlError,
    pyo3::exceptions::PyException,
    "A control operation refused its arguments: `args` is (code, message), the code of its error reply."
);

/// A request key's fields, read from a key object (`protocol.messages.ServerKey` or
/// `IPCCacheServerKey`).
struct OwnedKey {
    model_name: String,
    world_size: i128,
    worker_id: Option<i128>,
    tokens: Vec<u32>,
    /// The ids' chunk hashes when the key was decoded with the memo (`tokens` is empty then).
    chain: Option<Arc<hash::MsgpackChain>>,
    start: i128,
    end: i128,
    request_id: String,
    cache_salt: String,
    num_kv_readers: i128,
}

impl OwnedKey {
    /// The key's fields; its ids as `chunk_size` hashes from `token_chain` when the decoder
    /// made them with this chunk size, else parsed.
    fn read(key: &Bound<'_, PyAny>, chunk_size: usize) -> PyResult<Self> {
        let py = key.py();
        let chain = key
            .getattr("token_chain")
            .ok()
            .and_then(|c| c.cast_into::<super::TokenChain>().ok())
            .filter(|c| c.get().chunk_size == chunk_size)
            .map(|c| c.get().chain.clone());
        let u32s = key.getattr("token_u32").ok().and_then(|b| b.cast_into::<PyBytes>().ok());
        let tokens = match u32s.filter(|b| !b.as_bytes().is_empty()) {
            _ if chain.is_some() => Vec::new(),
            Some(b) => {
                let raw = b.as_bytes();
                raw.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            None => {
                // A key not decoded by the server: its ids as msgpack (msgspec.Raw).
                let raw: Vec<u8> = py
                    .import("builtins")?
                    .getattr("bytes")?
                    .call1((key.getattr("token_ids")?,))?
                    .extract()?;
                py.detach(|| hash::msgpack_tokens(&raw)).map_err(|e| PyValueError::new_err(e.to_string()))?
            }
        };
        Ok(Self {
            model_name: key.getattr("model_name")?.extract()?,
            world_size: key.getattr("world_size")?.extract()?,
            worker_id: key.getattr("worker_id")?.extract()?,
            tokens,
            chain,
            start: key.getattr("start")?.extract()?,
            end: key.getattr("end")?.extract()?,
            request_id: key.getattr("request_id")?.extract()?,
            cache_salt: key.getattr("cache_salt")?.extract()?,
            num_kv_readers: key.getattr("num_kv_readers")?.extract()?,
        })
    }

    fn view<R>(&self, f: impl FnOnce(&KeyView<'_>) -> control::OpResult<R>) -> control::OpResult<R> {
        let wire = crate::wire::WireKey {
            model_name: &self.model_name,
            world_size: self.world_size,
            worker_id: self.worker_id,
            token_span: &[],
            token_ids: Vec::new(),
            chain: None,
            start: self.start,
            end: self.end,
            request_id: &self.request_id,
            cache_salt: &self.cache_salt,
            request_configs: None,
            num_kv_readers: self.num_kv_readers,
        };
        let mut v = KeyView::of(&wire)?;
        v.tokens = &self.tokens;
        v.hashed = self.chain.as_deref();
        f(&v)
    }
}

/// A lookup's L2 prefetch job, for the Python L2 tier.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct PrefetchJob(control::PrefetchJob);

#[pymethods]
impl PrefetchJob {
    #[getter]
    fn request_id(&self) -> &str {
        &self.0.request_id
    }
    #[getter]
    fn generation(&self) -> u64 {
        self.0.generation
    }
    #[getter]
    fn model_name(&self) -> &str {
        &self.0.model_name
    }
    #[getter]
    fn world_size(&self) -> u32 {
        self.0.world_size
    }
    #[getter]
    fn cache_salt(&self) -> &str {
        &self.0.cache_salt
    }
    /// The chunks L1 missed, in order (the first is chunk `hit`).
    #[getter]
    fn hashes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        hashes_of(py, &self.0.hashes)
    }
    #[getter]
    fn hit(&self) -> usize {
        self.0.hit
    }
    #[getter]
    fn readers(&self) -> u32 {
        self.0.readers
    }
    fn __repr__(&self) -> String {
        format!(
            "PrefetchJob(request_id={:?}, generation={}, hit={}, missing={})",
            self.0.request_id,
            self.0.generation,
            self.0.hit,
            self.0.hashes.len()
        )
    }
}

/// A request's session (`ControlPlane.session_view`): the chain of its last tokens and the
/// scopes (every rank and object group) of the keys it touched.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct SessionView {
    hashes: Vec<ChunkHash>,
    scopes: Vec<key::KeyScope>,
}

#[pymethods]
impl SessionView {
    /// Hashes of every complete chunk of the request's last tokens.
    #[getter]
    fn hashes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        hashes_of(py, &self.hashes)
    }
    #[getter]
    fn scopes(&self) -> Vec<super::KeyScope> {
        self.scopes.iter().cloned().map(super::KeyScope).collect()
    }
    fn __repr__(&self) -> String {
        format!("SessionView(chunks={}, scopes={})", self.hashes.len(), self.scopes.len())
    }
}

/// The state the control operations share with the Python data path: sessions, worker
/// liveness and layouts, and the one stats registry.
#[pyclass(frozen, module = "lmcache_rs._core")]
pub(super) struct ControlPlane(Arc<control::ControlPlane>);

#[pymethods]
impl ControlPlane {
    #[new]
    #[pyo3(signature = (index, memo, chunk_size, *, l2_prefetch = false, prefetch_queue = 64, clock = None))]
    fn new(
        index: &L1Index,
        memo: &ChainMemo,
        chunk_size: usize,
        l2_prefetch: bool,
        prefetch_queue: usize,
        clock: Option<&ManualClock>,
    ) -> PyResult<Self> {
        if chunk_size == 0 {
            return Err(PyValueError::new_err("chunk_size must be positive"));
        }
        let clock: Arc<dyn Clock> = match clock {
            Some(c) => c.0.clone(),
            None => Arc::new(MonotonicClock::new()),
        };
        let cfg = ControlConfig { chunk_size, l2_prefetch, prefetch_queue };
        Ok(Self(Arc::new(control::ControlPlane::new(cfg, index.0.clone(), memo.0.clone(), clock))))
    }

    // ---- sessions --------------------------------------------------------------------------

    /// Gives back one share of `rank`'s lookup leases on chunks `[c0, c1)`.
    fn release_share(&self, py: Python<'_>, request_id: &str, rank: u32, c0: usize, c1: usize) -> u64 {
        py.detach(|| self.0.release_share(request_id, rank, c0, c1))
    }

    /// The next L2 prefetch job (None after `timeout` seconds).
    fn next_prefetch(&self, py: Python<'_>, timeout: f64) -> Option<PrefetchJob> {
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| self.0.prefetch_jobs().recv_timeout(t).ok()).map(PrefetchJob)
    }

    /// A prefetch job's end: `loaded` chunks held by `leases` (one per rank).
    fn prefetch_done(&self, py: Python<'_>, job: &PrefetchJob, loaded: usize, leases: Vec<u64>) -> bool {
        py.detach(|| self.0.prefetch_done(&job.0, loaded, &leases))
    }

    /// Closes sessions idle for more than `ttl` seconds; returns how many.
    fn expire_sessions(&self, py: Python<'_>, ttl: f64) -> usize {
        py.detach(|| self.0.expire_sessions(ttl))
    }

    #[getter]
    fn session_count(&self, py: Python<'_>) -> usize {
        py.detach(|| self.0.sessions.len())
    }

    /// A request's session (for /cache/explain), or None; not counted as a use.
    fn session_view(&self, py: Python<'_>, request_id: &str) -> Option<SessionView> {
        py.detach(|| {
            self.0.sessions.peek(request_id).map(|s| {
                let g = s.lock();
                SessionView { hashes: g.hashes.clone(), scopes: g.scopes.clone() }
            })
        })
    }

    // ---- workers ---------------------------------------------------------------------------

    fn worker_add(&self, py: Python<'_>, instance: u64) {
        py.detach(|| self.0.workers.add(instance));
    }

    fn worker_remove(&self, py: Python<'_>, instance: u64) -> bool {
        py.detach(|| self.0.workers.remove(instance))
    }

    fn worker_touch(&self, py: Python<'_>, instance: u64, pinged: bool) -> bool {
        py.detach(|| self.0.workers.touch(instance, pinged))
    }

    /// `ping`: see `control::workers::Workers::ping`.
    #[pyo3(signature = (instance))]
    fn ping(&self, py: Python<'_>, instance: Option<i128>) -> bool {
        py.detach(|| self.0.ping(instance))
    }

    /// Seconds since the worker was last heard from (None: not registered).
    fn last_seen_ago(&self, py: Python<'_>, instance: u64) -> Option<f64> {
        py.detach(|| self.0.workers.last_seen_ago(instance))
    }

    /// Registered instances silent past their budget.
    fn silent(&self, py: Python<'_>, reap_timeout: f64, grace: f64) -> Vec<u64> {
        py.detach(|| self.0.workers.silent(reap_timeout, grace))
    }

    /// A registered (model, world size)'s object groups: `(id, tail id, window span in
    /// chunks (0: full attention))` each (engine/groups.py).
    fn set_layout(
        &self,
        py: Python<'_>,
        model: &str,
        world_size: u32,
        groups: Vec<(u32, Option<u32>, usize)>,
    ) {
        let groups = groups.into_iter().map(|(id, tail_id, span)| GroupSpec { id, tail_id, span }).collect();
        py.detach(|| self.0.workers.set_layout(model, world_size, Layout { groups }));
    }

    fn drop_layout(&self, py: Python<'_>, model: &str, world_size: u32) {
        py.detach(|| self.0.workers.drop_layout(model, world_size));
    }

    // ---- stats -----------------------------------------------------------------------------

    /// Adds `n` to the counter named by `labels` (`("lookups", model, salt)`).
    #[pyo3(signature = (labels, n = 1))]
    fn count(&self, labels: &Bound<'_, PyTuple>, n: u64) -> PyResult<()> {
        let strs: Vec<Bound<'_, PyString>> =
            labels.iter().map(|l| l.cast_into::<PyString>().map_err(PyErr::from)).collect::<PyResult<_>>()?;
        let parts: Vec<&str> = strs.iter().map(|s| s.to_str()).collect::<PyResult<_>>()?;
        self.0.counters.add(&parts, n);
        Ok(())
    }

    /// Every counter: label tuple -> value.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let snap = py.detach(|| self.0.counters.snapshot());
        let out = pyo3::types::PyDict::new(py);
        for (labels, v) in snap {
            out.set_item(PyTuple::new(py, labels)?, v)?;
        }
        Ok(out)
    }

    fn reset_counters(&self, py: Python<'_>) {
        py.detach(|| self.0.counters.reset());
    }

    // ---- data operations: one call where they start, one where they end -------------------

    /// The start of `retrieve` / `prepare_retrieve` (rust/control/data.rs): liveness of
    /// `instance`, the range's hashes (ControlError `not_found` when its tokens fall short),
    /// `overloaded` refuses it then, else `retrieves_submitted` and, with `lease`, a read lease
    /// per read of the plan of `groups` (`(id, tail id, window span)` each, `set_layout`'s).
    #[pyo3(signature = (key, instance, device, groups, *, overloaded = None, lease = true))]
    #[allow(clippy::too_many_arguments)]
    fn read_start(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        instance: u64,
        device: &str,
        groups: Vec<(u32, Option<u32>, usize)>,
        overloaded: Option<String>,
        lease: bool,
    ) -> PyResult<ReadStart> {
        let k = OwnedKey::read(key, self.0.config.chunk_size)?;
        let groups = groups_of(groups);
        let refuse = self::overloaded(overloaded);
        let s = py
            .detach(|| k.view(|v| self.0.read_start(v, instance, device, &groups, refuse, lease)))
            .map_err(op_err)?;
        let reads = PyList::empty(py);
        for r in &s.reads {
            reads.append(LeasedRead {
                group: r.read.group,
                first: r.read.first,
                count: r.read.count,
                first_of_window: r.read.first_of_window,
                tail: r.tail,
                lease: r.lease,
                hit: r.hit,
                offsets: r.offsets.clone(),
                sizes: r.sizes.clone(),
            })?;
        }
        Ok(ReadStart { c0: s.c0, n: s.n, reads: reads.unbind(), inner: parking_lot::Mutex::new(s) })
    }

    /// The end of a retrieve: `"done"` (copied: leases and the lookup share given back, the
    /// read counted), `"prepared"` (prepare_retrieve: only the share; the commit ends it
    /// `"done"`), or `"failed"` (`corrupt` chunks failed verification, else `missing` were not
    /// in L1). Nothing is given back twice.
    #[pyo3(signature = (start, end, *, corrupt = 0, missing = 0))]
    fn read_finish(
        &self,
        py: Python<'_>,
        start: &ReadStart,
        end: &str,
        corrupt: usize,
        missing: usize,
    ) -> PyResult<()> {
        let end = match end {
            "done" => data::ReadEnd::Done,
            "prepared" => data::ReadEnd::Prepared,
            "failed" => data::ReadEnd::Failed { corrupt, missing },
            _ => return Err(PyValueError::new_err(format!("unknown end {end:?}"))),
        };
        let inner = &start.inner;
        py.detach(|| self.0.read_finish(&mut inner.lock(), end));
        Ok(())
    }

    /// The start of `store` (`mode="lmcache"`) / `prepare_store` (`"engine"`): liveness, the
    /// range's hashes (the request's scopes recorded), the counters of `mode`, `overloaded`
    /// refuses a non-empty range, and the chunks of `plan` (`(object group, chunks relative
    /// to the range, object bytes)` per batch, planned for the whole range) reserved for
    /// `instance`. Without `plan`, `store_reserve` reserves once the caller planned.
    #[pyo3(signature = (key, instance, device, mode, plan, *, overloaded = None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn store_start(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        instance: u64,
        device: &str,
        mode: &str,
        plan: Option<Vec<(u32, Vec<usize>, u64)>>,
        overloaded: Option<String>,
    ) -> PyResult<StoreStart> {
        let k = OwnedKey::read(key, self.0.config.chunk_size)?;
        let mode = store_mode(mode)?;
        let plan = plan.map(plan_of);
        let refuse = self::overloaded(overloaded);
        let s = py
            .detach(|| k.view(|v| self.0.store_start(v, instance, device, mode, plan.as_deref(), refuse)))
            .map_err(op_err)?;
        Ok(StoreStart::new(s))
    }

    /// Reserves the chunks of `plan` for a store started without one.
    #[allow(clippy::type_complexity)]
    fn store_reserve(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        start: &StoreStart,
        plan: Vec<(u32, Vec<usize>, u64)>,
    ) -> PyResult<()> {
        let k = OwnedKey::read(key, self.0.config.chunk_size)?;
        let plan = plan_of(plan);
        let inner = &start.inner;
        py.detach(|| k.view(|v| self.0.store_reserve(v, &mut inner.lock(), &plan))).map_err(op_err)
    }

    /// Drops a started store's reservations.
    fn store_abort(&self, py: Python<'_>, start: &StoreStart) {
        let inner = &start.inner;
        py.detach(|| self.0.store_abort(&mut inner.lock()));
    }

    /// Admits a started store's written objects and counts it.
    fn store_finish(&self, py: Python<'_>, start: &StoreStart) -> PyResult<StoreDone> {
        let inner = &start.inner;
        let done = py.detach(|| self.0.store_finish(&mut inner.lock()));
        let admitted = done
            .admitted
            .iter()
            .map(|hs| hs.iter().map(|h| PyBytes::new(py, h.as_bytes()).unbind()).collect())
            .collect();
        Ok(StoreDone {
            admitted,
            admitted_count: done.admitted_count(),
            expired: done.expired,
            dropped: done.dropped,
        })
    }
}

// ---- the data operations' start and end (crate::control::data) ----------------------------

fn groups_of(groups: Vec<(u32, Option<u32>, usize)>) -> Vec<GroupSpec> {
    groups.into_iter().map(|(id, tail_id, span)| GroupSpec { id, tail_id, span }).collect()
}

/// A data operation refused for load (`overloaded`) once its range is known to be non-empty.
fn overloaded(message: Option<String>) -> Option<OpError> {
    message.map(|m| OpError::new("overloaded", m))
}

fn plan_of(plan: Vec<(u32, Vec<usize>, u64)>) -> Vec<data::PlannedWrite> {
    plan.into_iter()
        .map(|(object_group, chunks, nbytes)| data::PlannedWrite { object_group, chunks, nbytes })
        .collect()
}

fn store_mode(mode: &str) -> PyResult<data::StoreMode> {
    match mode {
        "lmcache" => Ok(data::StoreMode::Lmcache),
        "engine" => Ok(data::StoreMode::Engine),
        _ => Err(PyValueError::new_err(format!("unknown store mode {mode:?}"))),
    }
}

/// One leased read of a retrieve's plan: chunks `[first, first + count)` of object group
/// `group` (its tail objects when `tail`), `hit` of them leased at `offsets`.
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct LeasedRead {
    group: u32,
    first: usize,
    count: usize,
    first_of_window: bool,
    tail: bool,
    lease: u64,
    hit: usize,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
}

/// A retrieve between `ControlPlane.read_start` and `read_finish`: the range's first chunk
/// `c0`, its `n` chunks and the plan's leased reads (only the last may be short).
#[pyclass(frozen, module = "lmcache_rs._core")]
struct ReadStart {
    inner: parking_lot::Mutex<data::ReadStart>,
    #[pyo3(get)]
    c0: usize,
    #[pyo3(get)]
    n: usize,
    #[pyo3(get)]
    reads: Py<PyList>,
}

#[pymethods]
impl ReadStart {
    /// The lease of the first read (engine-driven reads have one).
    #[getter]
    fn lease(&self) -> u64 {
        self.inner.lock().reads.first().map_or(0, |r| r.lease)
    }
    fn __repr__(&self) -> String {
        format!("ReadStart(c0={}, n={}, reads={})", self.c0, self.n, self.inner.lock().reads.len())
    }
}

/// One batch of a started store: the chunks (relative to the range's first) reserved as
/// objects of `nbytes` of `object_group`, at `offsets`.
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct StagedBatch {
    scope: Py<super::KeyScope>,
    object_group: u32,
    nbytes: u64,
    chunks: Vec<usize>,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
}

/// A store between `ControlPlane.store_start` and `store_finish` / `store_abort`.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct StoreStart {
    inner: parking_lot::Mutex<data::StoreStart>,
}

impl StoreStart {
    fn new(s: data::StoreStart) -> Self {
        Self { inner: parking_lot::Mutex::new(s) }
    }
}

#[pymethods]
impl StoreStart {
    /// Complete chunks of the range.
    #[getter]
    fn n(&self) -> usize {
        self.inner.lock().n()
    }
    /// Chunk objects the plan asked for within the range.
    #[getter]
    fn want(&self) -> usize {
        self.inner.lock().want
    }
    /// Chunk objects that found L1 full of locked objects.
    #[getter]
    fn oom(&self) -> usize {
        self.inner.lock().oom
    }
    #[getter]
    fn reserved(&self) -> usize {
        self.inner.lock().reserved()
    }
    /// One per batch of the plan, in plan order (a new list each read: read it once).
    #[getter]
    fn batches<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let staged = self.inner.lock().batches.clone();
        let list = PyList::empty(py);
        for b in staged {
            list.append(StagedBatch {
                scope: Py::new(py, super::KeyScope(b.scope))?,
                object_group: b.object_group,
                nbytes: b.nbytes,
                chunks: b.chunks,
                offsets: b.offsets,
                sizes: b.sizes,
            })?;
        }
        Ok(list)
    }
    /// The reserved hashes of batch `i`.
    fn hashes<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyList>> {
        let hs = self.inner.lock().batches.get(i).map(|b| b.hashes.clone()).unwrap_or_default();
        hashes_of(py, &hs)
    }
    fn __repr__(&self) -> String {
        let s = self.inner.lock();
        format!("StoreStart(n={}, want={}, reserved={}, oom={})", s.n(), s.want, s.reserved(), s.oom)
    }
}

/// What a store's end did: per batch the hashes admitted, and the reservations that expired
/// before it or were dropped by a clear while written.
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct StoreDone {
    admitted: Vec<Vec<Py<PyBytes>>>,
    admitted_count: usize,
    expired: usize,
    dropped: usize,
}

/// A data request handed to a Python worker.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct Request {
    inner: Arc<server::Request>,
    #[pyo3(get)]
    op: String,
}

#[pymethods]
impl Request {
    #[getter]
    fn uid<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.uid)
    }
    #[getter]
    fn op_frame<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.op_frame)
    }
    #[getter]
    fn identity<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.identity)
    }
    /// The argument frames.
    #[getter]
    fn args<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.inner.args.iter().map(|a| PyBytes::new(py, a)))
    }
    fn __repr__(&self) -> String {
        format!("Request(op={:?}, args={})", self.op, self.inner.args.len())
    }
}

/// The request I/O loop's heartbeat (observability.health.IoLoopStatus).
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct IoStatus {
    alive: bool,
    stopping: bool,
    last_tick_ago: Option<f64>,
    requests_received: u64,
    replies_sent: u64,
    pending_requests: usize,
    error: Option<String>,
}

/// One operation's request timings since the start.
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct RequestTiming {
    op: String,
    count: u64,
    handler_seconds: f64,
    queue_seconds: f64,
    /// Requests per latency bucket (the bounds of observability/timing.py, then +Inf).
    buckets: Vec<u64>,
}

/// One log line of the I/O thread (`NativeServer.next_log`). `level` is a `logging` level
/// number: 10 DEBUG, 20 INFO, 30 WARNING, 40 ERROR, 50 CRITICAL (`crate::control::server`).
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct LogLine {
    level: u8,
    message: String,
}

#[pymethods]
impl LogLine {
    fn __repr__(&self) -> String {
        format!("LogLine(level={}, message={:?})", self.level, self.message)
    }
}

/// The native request server: the ZMQ ROUTER socket and its I/O thread (crate::control::server).
#[pyclass(frozen, module = "lmcache_rs._core")]
struct NativeServer {
    srv: Arc<server::Server>,
}

#[pymethods]
impl NativeServer {
    /// `ops`: the operation table, rows `(name, legacy_id, nargs, lane, fallback, sheddable,
    /// refusal)` with lane "affinity" or "normal" (the control operations this server
    /// answers natively are recognized by name), and `refusal` the reason a known operation
    /// is not served (None: served).
    #[new]
    #[pyo3(signature = (control, url, *, ops, ipv6 = false, max_message_bytes = -1, max_pending = 4096, affinity_lanes = 1, clock = None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn new(
        py: Python<'_>,
        control: &ControlPlane,
        url: &str,
        ops: Vec<(String, Option<i64>, usize, String, Vec<u8>, bool, Option<String>)>,
        ipv6: bool,
        max_message_bytes: i64,
        max_pending: usize,
        affinity_lanes: usize,
        clock: Option<&ManualClock>,
    ) -> PyResult<Self> {
        let rows = ops
            .into_iter()
            .map(|(name, legacy_id, nargs, lane, fallback, sheddable, refusal)| {
                let route = match (refusal, Native::from_name(&name), lane.as_str()) {
                    (Some(why), _, _) => Route::Refused(why),
                    (None, Some(op), _) => Route::Native(op),
                    (None, None, "affinity") => Route::Affinity,
                    (None, None, "normal") => Route::Normal,
                    (None, None, other) => {
                        return Err(PyValueError::new_err(format!("{name}: unknown lane {other:?}")))
                    }
                };
                Ok(OpRow { name, legacy_id, nargs, route, fallback, sheddable })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let cfg = ServerConfig { url: url.to_owned(), ipv6, max_message_bytes, max_pending, affinity_lanes };
        let clock: Arc<dyn Clock> = match clock {
            Some(c) => c.0.clone(),
            None => Arc::new(MonotonicClock::new()),
        };
        let cp = control.0.clone();
        let srv = py
            .detach(|| server::Server::bind(cp, cfg, rows, clock))
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the request server: {e}")))?;
        Ok(Self { srv: Arc::new(srv) })
    }

    /// The bound endpoint (`tcp://host:port`).
    #[getter]
    fn url(&self) -> &str {
        self.srv.url()
    }

    /// Lanes: `lanes - 1` affinity lanes (one Python worker each), then the normal lane.
    #[getter]
    fn lanes(&self) -> usize {
        self.srv.lanes()
    }

    #[getter]
    fn normal_lane(&self) -> usize {
        self.srv.normal_lane()
    }

    fn start(&self) -> PyResult<()> {
        self.srv.start().map_err(|e| PyRuntimeError::new_err(e.0))
    }

    /// Stops intake, waits up to `timeout` seconds for pending requests, closes the socket.
    fn stop(&self, py: Python<'_>, timeout: f64) {
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| self.srv.stop(t));
    }

    #[getter]
    fn stopped(&self) -> bool {
        self.srv.stopped()
    }

    /// The next request of `lane`, waiting up to `timeout` seconds with the GIL released;
    /// None on timeout or once the server stopped and the lane is empty.
    fn next(&self, py: Python<'_>, lane: usize, timeout: f64) -> Option<Request> {
        let t = Duration::from_secs_f64(timeout.max(0.0));
        let req = py.detach(|| self.srv.next(lane, t))?;
        let op = self.srv.ops()[req.row].name.clone();
        Some(Request { inner: req, op })
    }

    /// Answers `req` with `frames` (`[uid, op, payload...]`); `error`: (code, message) of an
    /// error reply. False when it was answered already.
    #[pyo3(signature = (req, frames, error = None))]
    fn reply(
        &self,
        py: Python<'_>,
        req: &Request,
        frames: Vec<Vec<u8>>,
        error: Option<(String, String)>,
    ) -> bool {
        py.detach(|| {
            self.srv.reply(&req.inner, frames, error.as_ref().map(|(c, m)| (c.as_str(), m.as_str())))
        })
    }

    /// The I/O thread's next log line (None after `timeout` seconds).
    fn next_log(&self, py: Python<'_>, timeout: f64) -> Option<LogLine> {
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| self.srv.next_log(t)).map(|(level, message)| LogLine { level, message })
    }

    fn io_status(&self) -> IoStatus {
        let s = self.srv.io_status();
        IoStatus {
            alive: s.alive,
            stopping: s.stopping,
            last_tick_ago: s.last_tick_ago_secs,
            requests_received: s.requests_received,
            replies_sent: s.replies_sent,
            pending_requests: s.pending_requests,
            error: s.error,
        }
    }

    fn timings(&self, py: Python<'_>) -> Vec<RequestTiming> {
        py.detach(|| self.srv.timings())
            .into_iter()
            .map(|(op, t)| RequestTiming {
                op,
                count: t.count,
                handler_seconds: t.handler_ns as f64 / 1e9,
                queue_seconds: t.queue_ns as f64 / 1e9,
                buckets: t.buckets,
            })
            .collect()
    }

    /// Test hook: `"stall"` blocks the I/O loop until `release_fault`; `"panic"` ends it with
    /// `message`. For tests of the health checks against the real loop.
    #[pyo3(signature = (kind, message = String::new()))]
    fn inject_fault(&self, kind: &str, message: String) -> PyResult<()> {
        let f = match kind {
            "stall" => Fault::Stall,
            "panic" => Fault::Panic(message),
            _ => return Err(PyValueError::new_err(format!("unknown fault {kind:?}"))),
        };
        self.srv.inject_fault(f);
        Ok(())
    }

    /// Whether the I/O loop is inside an injected stall.
    #[getter]
    fn stalled(&self) -> bool {
        self.srv.stalled()
    }

    fn release_fault(&self) {
        self.srv.release_fault();
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ControlError", py.get_type::<ControlError>())?;
    m.add("POLL_MS", server::POLL_MS)?;
    m.add("PING_RETELL_SECONDS", control::workers::RETELL_SECS)?;
    m.add_class::<ControlPlane>()?;
    m.add_class::<SessionView>()?;
    m.add_class::<NativeServer>()?;
    m.add_class::<Request>()?;
    m.add_class::<PrefetchJob>()?;
    m.add_class::<IoStatus>()?;
    m.add_class::<RequestTiming>()?;
    m.add_class::<LogLine>()?;
    m.add_class::<LeasedRead>()?;
    m.add_class::<ReadStart>()?;
    m.add_class::<StagedBatch>()?;
    m.add_class::<StoreStart>()?;
    m.add_class::<StoreDone>()?;
    Ok(())
}
