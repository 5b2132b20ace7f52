//! PyO3 bindings: `lmcache_rs._core`. Thin by rule: convert arguments, call the core with the
//! GIL released ([`Python::detach`]), convert the result. The index's lock is only ever taken
//! inside `detach`, so a thread waiting for it never holds the GIL, and nothing under the lock
//! calls Python. Every core error becomes a Python exception in [`to_py_err`], nowhere else.

use std::ptr::NonNull;
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::hash::{self, Blake3Hash, TokenId};
use crate::index::{self, Finish, Reserve};
use crate::key::{self, ChunkHash};
use crate::{clock, wire, CoreError};

mod control;

create_exception!(_core, LmcacheCoreError, PyValueError, "Base class of every lmcache-rs core error.");
create_exception!(_core, InvalidKeyError, LmcacheCoreError, "A key field breaks the key rules.");
create_exception!(_core, OutOfMemoryError, LmcacheCoreError, "L1 cannot hold the allocation.");
create_exception!(_core, InconsistentStateError, LmcacheCoreError, "A request contradicts the index state.");

/// The single mapping from core errors to Python exceptions.
fn to_py_err(err: CoreError) -> PyErr {
    let msg = err.to_string();
    match err {
        CoreError::InvalidKey(_) | CoreError::KvRankOverflow { .. } => InvalidKeyError::new_err(msg),
        CoreError::OutOfMemory { .. } => OutOfMemoryError::new_err(msg),
        CoreError::Inconsistent(_) => InconsistentStateError::new_err(msg),
        CoreError::InvalidToken { .. } | CoreError::InvalidArgument(_) => LmcacheCoreError::new_err(msg),
    }
}

/// A buffer's element slice, moved into a GIL-free closure. The `PyBuffer` that owns the export
/// outlives the closure (it is dropped after `detach` returns), so the memory stays valid;
/// callers must not mutate the token array from another thread during the call.
struct BorrowedSlice<T>(NonNull<[T]>);
// SAFETY: see the type's doc; the pointee is plain integers kept alive by the buffer export.
unsafe impl<T: Send> Send for BorrowedSlice<T> {}

/// Runs `f` on the token ids of `obj` with the GIL released: zero-copy for C-contiguous
/// integer buffers (numpy arrays, `array.array`, CPU torch tensors through `.numpy()`),
/// otherwise a one-time conversion of the sequence to `int64`.
fn with_tokens<R: Send>(py: Python<'_>, obj: &Bound<'_, PyAny>, g: &impl TokenFn<R>) -> PyResult<R> {
    let obj = if obj.hasattr("__dlpack__")? && obj.hasattr("numpy")? && !obj.hasattr("__array_interface__")? {
        // torch.Tensor: .numpy() is a zero-copy view of a CPU tensor (errors name the problem).
        obj.call_method0("numpy")?
    } else {
        obj.clone()
    };
    macro_rules! try_buffer {
        ($($t:ty),*) => {$(
            if let Ok(buf) = PyBuffer::<$t>::get(&obj) {
                if let Some(ptr) = buf.as_slice_ptr() {
                    let slice = BorrowedSlice(ptr);
                    let out = py.detach(move || {
                        let slice = slice;
                        // SAFETY: BorrowedSlice's contract; `buf` is alive until after detach.
                        g.call(unsafe { slice.0.as_ref() })
                    });
                    drop(buf);
                    return Ok(out);
                }
                let owned: Vec<$t> = buf.to_vec(py)?;
                return Ok(py.detach(|| g.call(&owned)));
            }
        )*};
    }
    try_buffer!(i64, i32, u32, u64, i16, u16, u8, i8);
    let owned: Vec<i64> = obj.extract().map_err(|_| {
        LmcacheCoreError::new_err(format!(
            "token ids must be a sequence of ints, a numpy integer array or a CPU torch tensor, got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    Ok(py.detach(|| g.call(&owned)))
}

/// A computation generic over the token dtype (closures cannot be generic).
trait TokenFn<R>: Send + Sync {
    fn call<T: TokenId>(&self, tokens: &[T]) -> R;
}

struct PrefixHashes<'a> {
    chunk_size: usize,
    start: usize,
    end: Option<usize>,
    memo: Option<&'a hash::ChainMemo>,
}

impl TokenFn<Result<Vec<Blake3Hash>, CoreError>> for PrefixHashes<'_> {
    fn call<T: TokenId>(&self, tokens: &[T]) -> Result<Vec<Blake3Hash>, CoreError> {
        match self.memo {
            Some(memo) => memo.prefix_hashes(tokens, self.chunk_size, self.start, self.end),
            None => hash::prefix_hashes(tokens, self.chunk_size, self.start, self.end),
        }
    }
}

struct ChainHashes {
    prev: Blake3Hash,
    chunk_size: usize,
}

impl TokenFn<Result<Vec<Blake3Hash>, CoreError>> for ChainHashes {
    fn call<T: TokenId>(&self, tokens: &[T]) -> Result<Vec<Blake3Hash>, CoreError> {
        hash::hash_chunks(&self.prev, tokens, self.chunk_size)
    }
}

fn hashes_to_list<'py>(py: Python<'py>, hashes: &[Blake3Hash]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, hashes.iter().map(|h| PyBytes::new(py, h)))
}

/// Chunk hashes as a list of bytes.
fn hashes_of<'py>(py: Python<'py>, hashes: &[ChunkHash]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, hashes.iter().map(|h| PyBytes::new(py, h.as_bytes())))
}

/// blake3 of a contiguous byte buffer (bytes, memoryview, a numpy array's `.data`), computed
/// without the GIL and without copying: the integrity checksum of stored objects.
#[pyfunction]
fn checksum<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let buf = PyBuffer::<u8>::get(data)?;
    let digest = match buf.as_slice_ptr() {
        Some(ptr) => {
            let slice = BorrowedSlice(ptr);
            py.detach(move || {
                let slice = slice;
                // SAFETY: BorrowedSlice's contract; `buf` is alive until after detach.
                hash::checksum(unsafe { slice.0.as_ref() })
            })
        }
        None => {
            let owned = buf.to_vec(py)?;
            py.detach(|| hash::checksum(&owned))
        }
    };
    drop(buf);
    Ok(PyBytes::new(py, &digest))
}

/// The blake3 chain seed (spec C.1).
#[pyfunction]
fn none_hash(py: Python<'_>) -> Bound<'_, PyBytes> {
    PyBytes::new(py, &hash::none_hash())
}

/// Hashes of the complete chunks of `tokens[:end]`, chained from token 0, for chunks
/// `start // chunk_size` onwards (spec C.1); through `memo` when given (same answers).
#[pyfunction]
#[pyo3(signature = (tokens, chunk_size = 256, start = 0, end = None, memo = None))]
fn chunk_hashes<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    chunk_size: usize,
    start: usize,
    end: Option<usize>,
    memo: Option<&ChainMemo>,
) -> PyResult<Bound<'py, PyList>> {
    let job = PrefixHashes { chunk_size, start, end, memo: memo.map(|m| &*m.0) };
    let hashes = with_tokens(py, tokens, &job)?.map_err(to_py_err)?;
    hashes_to_list(py, &hashes)
}

/// Extends a chain: hashes of the complete chunks of `tokens`, starting after `prev`
/// (default: the chain seed). Used to cache a session's chain and hash only new chunks.
#[pyfunction]
#[pyo3(signature = (tokens, prev = None, chunk_size = 256))]
fn extend_chain<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    prev: Option<&[u8]>,
    chunk_size: usize,
) -> PyResult<Bound<'py, PyList>> {
    let prev: Blake3Hash = match prev {
        None => hash::none_hash(),
        Some(p) => p.try_into().map_err(|_| {
            to_py_err(CoreError::InvalidArgument(format!("prev must be 32 bytes, got {}", p.len())))
        })?,
    };
    let job = ChainHashes { prev, chunk_size };
    let hashes = with_tokens(py, tokens, &job)?.map_err(to_py_err)?;
    hashes_to_list(py, &hashes)
}

/// What `chunk_hashes_msgpack` computed: the hashes of every complete chunk and the number
/// of tokens (a trailing partial chunk has no hash).
#[pyclass(frozen, module = "lmcache_rs._core")]
struct ChunkHashes {
    hashes: Vec<Blake3Hash>,
    n_tokens: usize,
}

#[pymethods]
impl ChunkHashes {
    #[getter]
    fn hashes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        hashes_to_list(py, &self.hashes)
    }
    #[getter]
    fn n_tokens(&self) -> usize {
        self.n_tokens
    }
    fn __repr__(&self) -> String {
        format!("ChunkHashes(chunks={}, n_tokens={})", self.hashes.len(), self.n_tokens)
    }
}

/// Chunk hashes of a msgpack-encoded token array (the wire form of `token_ids`), without a
/// Python list in between.
#[pyfunction]
#[pyo3(signature = (raw, chunk_size = 256))]
fn chunk_hashes_msgpack(py: Python<'_>, raw: &[u8], chunk_size: usize) -> PyResult<ChunkHashes> {
    py.detach(|| {
        let tokens = hash::msgpack_tokens(raw)?;
        let hashes = hash::prefix_hashes(&tokens, chunk_size, 0, None)?;
        Ok(ChunkHashes { hashes, n_tokens: tokens.len() })
    })
    .map_err(to_py_err)
}

/// A request's token ids as their chunk hashes (`decode_key` with a memo): what
/// `ControlPlane` calls take instead of parsing the ids.
#[pyclass(frozen, module = "lmcache_rs._core")]
pub(super) struct TokenChain {
    pub(super) chain: Arc<hash::MsgpackChain>,
    pub(super) chunk_size: usize,
}

#[pymethods]
impl TokenChain {
    /// Token ids in the array.
    #[getter]
    fn count(&self) -> usize {
        self.chain.count
    }
    #[getter]
    fn chunk_size(&self) -> usize {
        self.chunk_size
    }
    /// Hashes of every complete chunk.
    #[getter]
    fn hashes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        hashes_to_list(py, &self.chain.hashes)
    }
    /// How many chunks were found by their msgpack bytes (their ids not parsed).
    #[getter]
    fn reused(&self) -> usize {
        self.chain.reused
    }
    fn __repr__(&self) -> String {
        format!(
            "TokenChain(count={}, chunk_size={}, chunks={}, reused={})",
            self.chain.count,
            self.chunk_size,
            self.chain.hashes.len(),
            self.chain.reused
        )
    }
}

/// A request key's fields from its msgpack frame (`decode_key`). `token_start..token_end` is
/// where the `token_ids` array lies in the frame (not copied: ~150 KB at 32k tokens),
/// `token_ids` the ids as native-endian u32 bytes (empty when decoded with a memo: then
/// `token_chain` holds their chunk hashes instead), `request_configs` raw msgpack or None.
/// Integers are as sent (the caller validates their ranges).
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct DecodedKey {
    model_name: String,
    world_size: i128,
    worker_id: Option<i128>,
    token_start: usize,
    token_end: usize,
    token_ids: Py<PyBytes>,
    token_chain: Option<Py<TokenChain>>,
    start: i128,
    end: i128,
    request_id: String,
    cache_salt: String,
    request_configs: Option<Py<PyBytes>>,
    num_kv_readers: i128,
}

/// A request key's fields from its msgpack frame, in one pass (see `wire`). With `memo`, the
/// ids come as their chunk hashes of `chunk_size` tokens, through the memo's byte-keyed table
/// (`ChainMemo.msgpack_chain`: a prompt seen before is neither parsed nor hashed).
#[pyfunction]
#[pyo3(signature = (frame, memo = None, chunk_size = 256))]
fn decode_key(
    py: Python<'_>,
    frame: &[u8],
    memo: Option<&ChainMemo>,
    chunk_size: usize,
) -> PyResult<DecodedKey> {
    let k = py
        .detach(|| match memo {
            Some(m) => wire::decode_key_hashed(frame, &m.0, chunk_size, true),
            None => wire::decode_key(frame),
        })
        .map_err(to_py_err)?;
    let ids = PyBytes::new_with(py, 4 * k.token_ids.len(), |buf| {
        for (out, t) in buf.chunks_exact_mut(4).zip(&k.token_ids) {
            out.copy_from_slice(&t.to_ne_bytes());
        }
        Ok(())
    })?;
    let token_start = k.token_span.as_ptr() as usize - frame.as_ptr() as usize;
    let token_chain = match k.chain {
        Some(chain) => Some(Py::new(py, TokenChain { chain: Arc::new(chain), chunk_size })?),
        None => None,
    };
    Ok(DecodedKey {
        model_name: k.model_name.to_owned(),
        world_size: k.world_size,
        worker_id: k.worker_id,
        token_start,
        token_end: token_start + k.token_span.len(),
        token_ids: ids.unbind(),
        token_chain,
        start: k.start,
        end: k.end,
        request_id: k.request_id.to_owned(),
        cache_salt: k.cache_salt.to_owned(),
        request_configs: k.request_configs.map(|c| PyBytes::new(py, c).unbind()),
        num_kv_readers: k.num_kv_readers,
    })
}

/// `world << 24 | global_rank << 16 | local_world << 8 | local_rank`; every field <= 255.
#[pyfunction]
fn kv_rank(world_size: u32, global_rank: u32, local_world_size: u32, local_rank: u32) -> PyResult<u32> {
    key::kv_rank(world_size, global_rank, local_world_size, local_rank).map_err(to_py_err)
}

/// The MP server's kv_rank of worker `worker_id` in a KV world of `world_size`.
#[pyfunction]
fn mp_kv_rank(world_size: u32, worker_id: u32) -> PyResult<u32> {
    key::mp_kv_rank(world_size, worker_id).map_err(to_py_err)
}

#[pyfunction]
fn validate_salt(cache_salt: &str) -> PyResult<()> {
    key::validate_salt(cache_salt).map_err(to_py_err)
}

#[pyfunction]
fn validate_model(model_name: &str) -> PyResult<()> {
    key::validate_model(model_name).map_err(to_py_err)
}

/// Model, kv_rank, object group and cache_salt: an object key without its chunk hash.
#[pyclass(frozen, eq, hash, module = "lmcache_rs._core")]
#[derive(Clone, PartialEq, Eq, Hash)]
struct KeyScope(key::KeyScope);

#[pymethods]
impl KeyScope {
    #[new]
    #[pyo3(signature = (model_name, kv_rank, object_group = 0, cache_salt = ""))]
    fn new(model_name: &str, kv_rank: u32, object_group: u32, cache_salt: &str) -> PyResult<Self> {
        key::KeyScope::new(model_name, kv_rank, object_group, cache_salt).map(Self).map_err(to_py_err)
    }
    #[getter]
    fn model_name(&self) -> &str {
        self.0.model_name()
    }
    #[getter]
    fn kv_rank(&self) -> u32 {
        self.0.kv_rank()
    }
    #[getter]
    fn object_group(&self) -> u32 {
        self.0.object_group()
    }
    #[getter]
    fn cache_salt(&self) -> &str {
        self.0.cache_salt()
    }
    fn __repr__(&self) -> String {
        format!(
            "KeyScope(model_name={:?}, kv_rank={:#010x}, object_group={}, cache_salt={:?})",
            self.0.model_name(),
            self.0.kv_rank(),
            self.0.object_group(),
            self.0.cache_salt()
        )
    }
}

/// A full object key (spec C.2).
#[pyclass(frozen, eq, hash, module = "lmcache_rs._core")]
#[derive(Clone, PartialEq, Eq, Hash)]
struct ObjectKey(key::ObjectKey);

#[pymethods]
impl ObjectKey {
    #[new]
    #[pyo3(signature = (chunk_hash, model_name, kv_rank, object_group = 0, cache_salt = ""))]
    fn new(
        chunk_hash: &[u8],
        model_name: &str,
        kv_rank: u32,
        object_group: u32,
        cache_salt: &str,
    ) -> PyResult<Self> {
        let scope = key::KeyScope::new(model_name, kv_rank, object_group, cache_salt).map_err(to_py_err)?;
        key::ObjectKey::new(chunk_hash, scope).map(Self).map_err(to_py_err)
    }
    #[getter]
    fn chunk_hash<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.0.chunk_hash.as_bytes())
    }
    #[getter]
    fn scope(&self) -> KeyScope {
        KeyScope(self.0.scope.clone())
    }
    fn __repr__(&self) -> String {
        format!(
            "ObjectKey(chunk_hash={}, scope={})",
            self.0.chunk_hash.hex(),
            KeyScope(self.0.scope.clone()).__repr__()
        )
    }
}

/// A bounded memo of chunk hashes shared by every request of a server (see the core's
/// `ChainMemo`); pass it to `chunk_hashes`, whose answers it never changes.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct ChainMemo(Arc<hash::ChainMemo>);

#[pymethods]
impl ChainMemo {
    #[new]
    fn new(capacity: usize) -> Self {
        Self(Arc::new(hash::ChainMemo::new(capacity)))
    }

    fn stats(&self, py: Python<'_>) -> MemoStats {
        let s = py.detach(|| self.0.stats());
        MemoStats {
            entries: s.entries,
            key_bytes: s.key_bytes,
            capacity: s.capacity,
            hits: s.hits,
            misses: s.misses,
        }
    }

    fn clear(&self, py: Python<'_>) {
        py.detach(|| self.0.clear());
    }
}

/// `ChainMemo.stats()`: entries held, bytes of their keys, capacity; hits and misses count chunks.
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct MemoStats {
    entries: usize,
    key_bytes: usize,
    capacity: usize,
    hits: u64,
    misses: u64,
}

#[pymethods]
impl MemoStats {
    fn __repr__(&self) -> String {
        format!(
            "MemoStats(entries={}, key_bytes={}, capacity={}, hits={}, misses={})",
            self.entries, self.key_bytes, self.capacity, self.hits, self.misses
        )
    }
}

/// A clock that moves only when told to, for deterministic TTL tests.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct ManualClock(Arc<clock::ManualClock>);

#[pymethods]
impl ManualClock {
    #[new]
    fn new() -> Self {
        Self(clock::ManualClock::new())
    }
    fn advance(&self, seconds: f64) {
        self.0.advance_secs(seconds);
    }
}

/// An iterable of chunk hashes (bytes) as passed to the index methods.
type Hashes<'a> = &'a Bound<'a, PyAny>;

/// Chunk hashes from an iterable of bytes, read in place (no intermediate `Vec<u8>` per hash:
/// a 32k-token lookup passes 128 of them several times). Other byte sequences are converted.
fn to_hashes(hashes: Hashes<'_>) -> PyResult<Vec<ChunkHash>> {
    let mut out = Vec::with_capacity(hashes.len().unwrap_or(0));
    for item in hashes.try_iter()? {
        let item = item?;
        let h = match item.cast::<PyBytes>() {
            Ok(b) => ChunkHash::new(b.as_bytes()),
            Err(_) => ChunkHash::new(&item.extract::<Vec<u8>>()?),
        };
        out.push(h.map_err(to_py_err)?);
    }
    Ok(out)
}

/// What `L1Index.reserve_write` did for one key: `status` is `reserved` (then `offset` and
/// `size` are the staged range), `resident`, `in_flight` or `oom` (offset and size 0).
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct Reservation {
    status: &'static str,
    offset: u64,
    size: u64,
}

#[pymethods]
impl Reservation {
    fn __repr__(&self) -> String {
        format!("Reservation(status={:?}, offset={}, size={})", self.status, self.offset, self.size)
    }
}

/// A resident object's range, live read locks and temporary flag (`L1Index.resolve`).
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct Slot {
    offset: u64,
    size: u64,
    read_locks: u32,
    temporary: bool,
}

#[pymethods]
impl Slot {
    fn __repr__(&self) -> String {
        format!(
            "Slot(offset={}, size={}, read_locks={}, temporary={})",
            self.offset,
            self.size,
            self.read_locks,
            if self.temporary { "True" } else { "False" }
        )
    }
}

/// One resident object of `L1Index.list_objects`: its key, size and whether leases hold it.
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct ListedObject {
    chunk_hash: Py<PyBytes>,
    model_name: String,
    kv_rank: u32,
    object_group: u32,
    cache_salt: String,
    size: u64,
    locked: bool,
}

/// What `L1Index.lease_read` took: the lease (0: nothing) and the `hit` objects' ranges.
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct ReadGrant {
    lease: u64,
    hit: usize,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
}

#[pymethods]
impl ReadGrant {
    fn __repr__(&self) -> String {
        format!("ReadGrant(lease={}, hit={})", self.lease, self.hit)
    }
}

/// What `L1Index.finish_write` did: a status per key, and the read lease (0: none).
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct WriteDone {
    statuses: Vec<&'static str>,
    lease: u64,
}

#[pymethods]
impl WriteDone {
    fn __repr__(&self) -> String {
        format!("WriteDone(statuses={:?}, lease={})", self.statuses, self.lease)
    }
}

/// Where one chunk is (`L1Index.explain`): `state` is `resident`, `locked`, `dropped` (with
/// `reason` and `ago_seconds`) or `unknown` (never stored here, or forgotten).
#[pyclass(frozen, get_all, module = "lmcache_rs._core")]
struct Whereabouts {
    state: &'static str,
    reason: Option<&'static str>,
    ago_seconds: Option<f64>,
}

#[pymethods]
impl Whereabouts {
    fn __repr__(&self) -> String {
        format!(
            "Whereabouts(state={:?}, reason={:?}, ago_seconds={:?})",
            self.state, self.reason, self.ago_seconds
        )
    }
}

/// A registered quota (`L1Index.list_quotas`): its limit and the bytes the salt holds in L1
/// (staging included, as `salt_usage`), read in one snapshot.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct Quota(index::QuotaInfo);

#[pymethods]
impl Quota {
    #[getter]
    fn cache_salt(&self) -> &str {
        &self.0.cache_salt
    }
    #[getter]
    fn limit_bytes(&self) -> u64 {
        self.0.limit_bytes
    }
    #[getter]
    fn usage_bytes(&self) -> u64 {
        self.0.usage_bytes
    }
    fn __repr__(&self) -> String {
        format!(
            "Quota(cache_salt={:?}, limit_bytes={}, usage_bytes={})",
            self.0.cache_salt, self.0.limit_bytes, self.0.usage_bytes
        )
    }
}

/// The L1 index. Every method takes the index lock with the GIL released.
#[pyclass(frozen, module = "lmcache_rs._core")]
struct L1Index(Arc<index::L1Index>);

#[pymethods]
impl L1Index {
    #[new]
    #[pyo3(signature = (
        capacity_bytes, *, align_bytes = 4096, policy = "LRU", trigger_watermark = 0.8,
        eviction_ratio = 0.2, write_ttl_secs = 600.0, read_ttl_secs = 300.0,
        demand_eviction = true, drop_log_entries = 65536, clock = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        capacity_bytes: u64,
        align_bytes: u64,
        policy: &str,
        trigger_watermark: f64,
        eviction_ratio: f64,
        write_ttl_secs: f64,
        read_ttl_secs: f64,
        demand_eviction: bool,
        drop_log_entries: usize,
        clock: Option<&ManualClock>,
    ) -> PyResult<Self> {
        let config = index::L1Config {
            capacity_bytes,
            align_bytes,
            policy: policy.parse().map_err(to_py_err)?,
            trigger_watermark,
            eviction_ratio,
            write_ttl_secs,
            read_ttl_secs,
            demand_eviction,
            drop_log_entries,
        };
        let idx = match clock {
            Some(c) => index::L1Index::with_clock(config, c.0.clone()),
            None => index::L1Index::new(config),
        };
        idx.map(|i| Self(Arc::new(i))).map_err(to_py_err)
    }

    #[getter]
    fn capacity_bytes(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.0.capacity())
    }
    #[getter]
    fn policy(&self) -> &'static str {
        self.0.config().policy.as_str()
    }
    fn object_footprint(&self, py: Python<'_>, size: u64) -> PyResult<u64> {
        py.detach(|| self.0.object_footprint(size)).map_err(to_py_err)
    }

    /// One `Reservation` per hash.
    #[pyo3(signature = (scope, hashes, size, writer, all_or_nothing = false))]
    fn reserve_write(
        &self,
        py: Python<'_>,
        scope: &KeyScope,
        hashes: Hashes<'_>,
        size: u64,
        writer: u64,
        all_or_nothing: bool,
    ) -> PyResult<Vec<Reservation>> {
        let hashes = to_hashes(hashes)?;
        let out = py
            .detach(|| self.0.reserve_write(&scope.0, &hashes, size, writer, all_or_nothing))
            .map_err(to_py_err)?;
        Ok(out
            .into_iter()
            .map(|r| match r {
                Reserve::Reserved(a) => Reservation { status: "reserved", offset: a.offset, size: a.size },
                Reserve::AlreadyResident => Reservation { status: "resident", offset: 0, size: 0 },
                Reserve::InFlight => Reservation { status: "in_flight", offset: 0, size: 0 },
                Reserve::OutOfMemory => Reservation { status: "oom", offset: 0, size: 0 },
            })
            .collect())
    }

    /// One status per hash: `admitted`, `resident` (another writer won; success),
    /// `not_staged` or `dropped` (a clear dropped it while it was written); with
    /// `lock_readers > 0`, the read lease holding the admitted and resident keys (`lease` to
    /// extend one).
    #[pyo3(signature = (scope, hashes, writer, lock_readers = 0, temporary = false, lease = 0))]
    #[allow(clippy::too_many_arguments)]
    fn finish_write(
        &self,
        py: Python<'_>,
        scope: &KeyScope,
        hashes: Hashes<'_>,
        writer: u64,
        lock_readers: u32,
        temporary: bool,
        lease: u64,
    ) -> PyResult<WriteDone> {
        let hashes = to_hashes(hashes)?;
        let out = py
            .detach(|| self.0.finish_write(&scope.0, &hashes, writer, lock_readers, temporary, lease))
            .map_err(to_py_err)?;
        let statuses = out
            .finished
            .into_iter()
            .map(|f| match f {
                Finish::Admitted => "admitted",
                Finish::AlreadyResident => "resident",
                Finish::NotStaged => "not_staged",
                Finish::Dropped => "dropped",
            })
            .collect();
        Ok(WriteDone { statuses, lease: out.lease })
    }

    fn abort_write(
        &self,
        py: Python<'_>,
        scope: &KeyScope,
        hashes: Hashes<'_>,
        writer: u64,
    ) -> PyResult<usize> {
        let hashes = to_hashes(hashes)?;
        Ok(py.detach(|| self.0.abort_write(&scope.0, &hashes, writer)))
    }

    /// Drops every staged copy of `writer` (a dead or unregistered worker).
    fn abort_writer(&self, py: Python<'_>, writer: u64) -> usize {
        py.detach(|| self.0.abort_writer(writer))
    }

    /// A read lease with `shares` shares on each key of the longest resident prefix
    /// (`lease` to extend one).
    #[pyo3(signature = (scope, hashes, shares = 1, lease = 0))]
    fn lease_read(
        &self,
        py: Python<'_>,
        scope: &KeyScope,
        hashes: Hashes<'_>,
        shares: u32,
        lease: u64,
    ) -> PyResult<ReadGrant> {
        let hashes = to_hashes(hashes)?;
        let g = py.detach(|| self.0.lease_read(&scope.0, &hashes, shares, lease)).map_err(to_py_err)?;
        Ok(ReadGrant {
            lease: g.lease,
            hit: g.hit,
            offsets: g.slots.iter().map(|a| a.offset).collect(),
            sizes: g.slots.iter().map(|a| a.size).collect(),
        })
    }

    /// Makes objects that survived a restart resident at their old ranges (`storage/warm.py`),
    /// least recently used first: one `(scope, hash, offset, size)` per object, one outcome per
    /// object: `adopted`, `duplicate`, `overlap` or `invalid`.
    fn adopt(
        &self,
        py: Python<'_>,
        items: Vec<(PyRef<'_, KeyScope>, Vec<u8>, u64, u64)>,
    ) -> PyResult<Vec<&'static str>> {
        let items = items
            .into_iter()
            .map(|(scope, hash, offset, size)| {
                let hash = ChunkHash::new(&hash).map_err(to_py_err)?;
                Ok(index::AdoptItem { scope: scope.0.clone(), hash, offset, size })
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok(py.detach(|| self.0.adopt(&items)).iter().map(index::Adopted::as_str).collect())
    }

    /// Gives back up to `n` shares (None: all) of the lease's items `[start, end)`.
    #[pyo3(signature = (lease, start = 0, end = None, n = None))]
    fn release(&self, py: Python<'_>, lease: u64, start: usize, end: Option<usize>, n: Option<u32>) -> u64 {
        py.detach(|| self.0.release(lease, start, end.unwrap_or(usize::MAX), n))
    }

    fn peek(&self, py: Python<'_>, scope: &KeyScope, hashes: Hashes<'_>) -> PyResult<usize> {
        let hashes = to_hashes(hashes)?;
        Ok(py.detach(|| self.0.peek(&scope.0, &hashes)))
    }

    /// One `Slot` per hash, or None when not resident.
    fn resolve(&self, py: Python<'_>, scope: &KeyScope, hashes: Hashes<'_>) -> PyResult<Vec<Option<Slot>>> {
        let hashes = to_hashes(hashes)?;
        let out = py.detach(|| self.0.resolve(&scope.0, &hashes));
        Ok(out
            .into_iter()
            .map(|s| {
                s.map(|s| Slot {
                    offset: s.alloc.offset,
                    size: s.alloc.size,
                    read_locks: s.read_locks,
                    temporary: s.temporary,
                })
            })
            .collect())
    }

    /// Where each chunk is in this scope and, for one that left, why and how long ago.
    fn explain(&self, py: Python<'_>, scope: &KeyScope, hashes: Hashes<'_>) -> PyResult<Vec<Whereabouts>> {
        let hashes = to_hashes(hashes)?;
        let out = py.detach(|| self.0.explain(&scope.0, &hashes));
        Ok(out
            .into_iter()
            .map(|w| match w {
                index::Whereabouts::Resident { locked } => Whereabouts {
                    state: if locked { "locked" } else { "resident" },
                    reason: None,
                    ago_seconds: None,
                },
                index::Whereabouts::Dropped { reason, ago_secs } => Whereabouts {
                    state: "dropped",
                    reason: Some(reason.as_str()),
                    ago_seconds: Some(ago_secs),
                },
                index::Whereabouts::Unknown => {
                    Whereabouts { state: "unknown", reason: None, ago_seconds: None }
                }
            })
            .collect())
    }

    /// Up to `limit` resident objects whose key sorts after `after` (the previous page's last
    /// `(hash, model, kv_rank, object_group, salt)`), in key order, as
    /// `ListedObject`s; only `model_name`'s if given.
    #[pyo3(signature = (after = None, limit = 500, model_name = None))]
    fn list_objects(
        &self,
        py: Python<'_>,
        after: Option<(Vec<u8>, String, u32, u32, String)>,
        limit: usize,
        model_name: Option<String>,
    ) -> Vec<ListedObject> {
        let rows = py.detach(|| self.0.list(after.as_ref(), limit, model_name.as_deref()));
        rows.into_iter()
            .map(|l| ListedObject {
                chunk_hash: PyBytes::new(py, l.hash.as_bytes()).unbind(),
                model_name: l.model_name,
                kv_rank: l.kv_rank,
                object_group: l.object_group,
                cache_salt: l.cache_salt,
                size: l.size,
                locked: l.locked,
            })
            .collect()
    }

    fn touch(&self, py: Python<'_>, scope: &KeyScope, hashes: Hashes<'_>) -> PyResult<usize> {
        let hashes = to_hashes(hashes)?;
        Ok(py.detach(|| self.0.touch(&scope.0, &hashes)))
    }

    #[pyo3(signature = (scope, hashes, force = false))]
    fn delete(&self, py: Python<'_>, scope: &KeyScope, hashes: Hashes<'_>, force: bool) -> PyResult<usize> {
        let hashes = to_hashes(hashes)?;
        Ok(py.detach(|| self.0.delete(&scope.0, &hashes, force)))
    }

    #[pyo3(signature = (force = false))]
    fn clear(&self, py: Python<'_>, force: bool) -> index::ClearReport {
        py.detach(|| self.0.clear(force))
    }

    fn evict_cycle(&self, py: Python<'_>) -> index::CycleReport {
        py.detach(|| self.0.evict_cycle())
    }

    fn set_quota(&self, py: Python<'_>, cache_salt: &str, limit_bytes: u64) -> PyResult<()> {
        py.detach(|| self.0.set_quota(cache_salt, limit_bytes)).map_err(to_py_err)
    }
    fn remove_quota(&self, py: Python<'_>, cache_salt: &str) -> bool {
        py.detach(|| self.0.remove_quota(cache_salt))
    }
    fn get_quota(&self, py: Python<'_>, cache_salt: &str) -> Option<u64> {
        py.detach(|| self.0.get_quota(cache_salt))
    }
    /// Every registered quota, sorted by salt.
    fn list_quotas(&self, py: Python<'_>) -> Vec<Quota> {
        py.detach(|| self.0.list_quotas()).into_iter().map(Quota).collect()
    }
    fn salt_usage(&self, py: Python<'_>, cache_salt: &str) -> u64 {
        py.detach(|| self.0.salt_usage(cache_salt))
    }

    /// One consistent snapshot (a dict) for metrics and /status.
    fn stats(&self, py: Python<'_>) -> index::L1Stats {
        py.detach(|| self.0.stats())
    }

    /// Verifies the index's invariants (tests); raises on violation.
    fn check_invariants(&self, py: Python<'_>) {
        py.detach(|| self.0.check_invariants());
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HASH_LEN", hash::HASH_LEN)?;
    m.add("MAX_READERS", index::MAX_READERS)?;
    m.add("LmcacheCoreError", py.get_type::<LmcacheCoreError>())?;
    m.add("InvalidKeyError", py.get_type::<InvalidKeyError>())?;
    m.add("OutOfMemoryError", py.get_type::<OutOfMemoryError>())?;
    m.add("InconsistentStateError", py.get_type::<InconsistentStateError>())?;
    m.add_function(wrap_pyfunction!(none_hash, m)?)?;
    m.add_function(wrap_pyfunction!(checksum, m)?)?;
    m.add_function(wrap_pyfunction!(chunk_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(extend_chain, m)?)?;
    m.add_function(wrap_pyfunction!(chunk_hashes_msgpack, m)?)?;
    m.add_function(wrap_pyfunction!(decode_key, m)?)?;
    m.add_class::<TokenChain>()?;
    m.add_function(wrap_pyfunction!(kv_rank, m)?)?;
    m.add_function(wrap_pyfunction!(mp_kv_rank, m)?)?;
    m.add_function(wrap_pyfunction!(validate_salt, m)?)?;
    m.add_function(wrap_pyfunction!(validate_model, m)?)?;
    m.add_class::<KeyScope>()?;
    m.add_class::<ObjectKey>()?;
    m.add_class::<ManualClock>()?;
    m.add_class::<ChainMemo>()?;
    m.add_class::<L1Index>()?;
    m.add_class::<Quota>()?;
    m.add_class::<ReadGrant>()?;
    m.add_class::<WriteDone>()?;
    m.add_class::<Whereabouts>()?;
    m.add_class::<DecodedKey>()?;
    m.add_class::<ChunkHashes>()?;
    m.add_class::<MemoStats>()?;
    m.add_class::<Reservation>()?;
    m.add_class::<Slot>()?;
    m.add_class::<ListedObject>()?;
    control::register(m)?;
    Ok(())
}
