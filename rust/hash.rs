//! Chained chunk hashing (spec C.1).
//!
//! Only complete chunks are addressed. With `C` tokens per chunk, chunk `i` hashes to
//! `h_i = blake3(h_{i-1} || be_u32(t_{iC}) || ... || be_u32(t_{iC+C-1}))` with `h_{-1}` =
//! [`none_hash`], so a chunk's hash names its whole prefix. `none_hash` is the same function
//! applied to the integer 0 (8-byte big-endian) and the single token 0.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::Mutex;

use crate::error::{CoreError, CoreResult};

/// Bytes in a blake3 chunk hash.
pub const HASH_LEN: usize = 32;

/// One blake3 chunk hash.
pub type Blake3Hash = [u8; HASH_LEN];

/// A token id as it arrives from Python buffers (numpy / torch dtypes) or Rust callers.
/// Every id must fit an unsigned 32-bit integer; anything else is an error, never truncated.
pub trait TokenId: Copy + Send + Sync {
    /// Whether the id fits `u32`.
    fn fits(self) -> bool;
    /// The id as `u32`; only called after [`TokenId::fits`] held.
    fn as_u32(self) -> u32;
    fn widen(self) -> i128;
}

macro_rules! token_id {
    ($($t:ty),*) => {$(
        impl TokenId for $t {
            #[inline(always)]
            fn fits(self) -> bool {
                // Sign-extending to i64 then reinterpreting makes negatives huge: one compare.
                (self as i64 as u64) <= u64::from(u32::MAX)
            }
            #[inline(always)]
            fn as_u32(self) -> u32 {
                self as u32
            }
            #[inline(always)]
            fn widen(self) -> i128 {
                self as i128
            }
        }
    )*};
}
token_id!(u8, u16, u32, u64, i8, i16, i32, i64);

/// Checks every id up front (a branch-free, vectorisable pass) so the hashing loop converts
/// without checks.
fn validate<T: TokenId>(tokens: &[T]) -> CoreResult<()> {
    if tokens.iter().fold(true, |ok, t| ok & t.fits()) {
        return Ok(());
    }
    let position = tokens.iter().position(|t| !t.fits()).expect("an id does not fit");
    Err(CoreError::InvalidToken { position, value: tokens[position].widen() })
}

/// Fills `buf` with the blake3 input of one chunk: `prev || be_u32 tokens` (validated tokens).
fn chunk_input<T: TokenId>(prev: &[u8], tokens: &[T], buf: &mut Vec<u8>) {
    buf.resize(prev.len() + 4 * tokens.len(), 0);
    let (head, body) = buf.split_at_mut(prev.len());
    head.copy_from_slice(prev);
    for (out, &t) in body.chunks_exact_mut(4).zip(tokens) {
        out.copy_from_slice(&t.as_u32().to_be_bytes());
    }
}

/// `blake3(prev || be_u32 tokens)` for validated tokens. `buf` is reused between calls.
fn hash_one<T: TokenId>(prev: &[u8], tokens: &[T], buf: &mut Vec<u8>) -> Blake3Hash {
    chunk_input(prev, tokens, buf);
    *blake3::hash(buf).as_bytes()
}

/// blake3 of a byte string: the integrity checksum of a stored object (L2 headers).
pub fn checksum(bytes: &[u8]) -> Blake3Hash {
    blake3::hash(bytes).into()
}

/// The chain's seed: blake3 of the 8-byte big-endian integer 0 followed by token 0.
pub fn none_hash() -> Blake3Hash {
    hash_one(&0i64.to_be_bytes(), &[0u32], &mut Vec::with_capacity(12))
}

/// Hashes every complete chunk of `tokens`, chaining from `prev` (pass [`none_hash`] to start
/// a prompt, or a cached chain's last hash to extend it). Trailing partial tokens are ignored.
pub fn hash_chunks<T: TokenId>(
    prev: &Blake3Hash,
    tokens: &[T],
    chunk_size: usize,
) -> CoreResult<Vec<Blake3Hash>> {
    chain(prev, tokens, chunk_size, None)
}

fn chain<T: TokenId>(
    prev: &Blake3Hash,
    tokens: &[T],
    chunk_size: usize,
    memo: Option<&ChainMemo>,
) -> CoreResult<Vec<Blake3Hash>> {
    if chunk_size == 0 {
        return Err(CoreError::InvalidArgument("chunk_size must be > 0".into()));
    }
    let n = tokens.len() / chunk_size;
    validate(&tokens[..n * chunk_size])?;
    let mut out = Vec::with_capacity(n);
    let mut scratch = Vec::with_capacity(HASH_LEN + 4 * chunk_size);
    let mut last = *prev;
    let chunks = tokens.chunks_exact(chunk_size);
    if let Some(memo) = memo.filter(|m| m.half > 0) {
        // Chunks the memo holds, one short lock each; from the first miss on the chain is new
        // (every later input starts with a hash not seen before), so the rest is hashed
        // without probing and inserted under one lock.
        let mut new = MemoBatch::default();
        for chunk in chunks {
            chunk_input(&last, chunk, &mut scratch);
            let key_hash = memo.hasher.hash_one(&scratch[..]);
            let held = if new.slots.is_empty() { memo.get(key_hash, &scratch) } else { None };
            last = held.unwrap_or_else(|| {
                let h = *blake3::hash(&scratch).as_bytes();
                new.push(key_hash, &scratch, h);
                h
            });
            out.push(last);
        }
        if !new.slots.is_empty() {
            memo.insert(new);
        }
        return Ok(out);
    }
    for chunk in chunks {
        last = hash_one(&last, chunk, &mut scratch);
        out.push(last);
    }
    Ok(out)
}

/// Spec C.1 as the server applies it to a request: the chain over `tokens[..end]` from token 0,
/// returning the hashes of chunks `start / chunk_size ..` (`start` only selects what is returned).
pub fn prefix_hashes<T: TokenId>(
    tokens: &[T],
    chunk_size: usize,
    start: usize,
    end: Option<usize>,
) -> CoreResult<Vec<Blake3Hash>> {
    prefix_chain(tokens, chunk_size, start, end, None)
}

fn prefix_chain<T: TokenId>(
    tokens: &[T],
    chunk_size: usize,
    start: usize,
    end: Option<usize>,
    memo: Option<&ChainMemo>,
) -> CoreResult<Vec<Blake3Hash>> {
    let end = end.map_or(tokens.len(), |e| e.min(tokens.len()));
    let mut all = chain(&none_hash(), &tokens[..end], chunk_size, memo)?;
    let first = (start / chunk_size).min(all.len());
    all.drain(..first);
    Ok(all)
}

/// A bounded memo of chunk hashes, keyed by the exact blake3 input (`prev || be_u32 tokens`,
/// about 1 KiB for a 256-token chunk) and compared in full, so it can never answer a wrong
/// hash; the fast hasher only picks the bucket.
///
/// Why: the chain is serial by definition, so a 32k-token prompt costs 128 blake3 calls one
/// after another (about 180 µs on the 2-core test VM), and every lookup of a prompt pays it
/// again. A KV hit means the same chunks were hashed when they were stored, so a memo that
/// still holds them turns each blake3 into one table probe and a 1 KiB compare.
///
/// Two generations approximate LRU in O(1): inserts go to `young`; when it holds half the
/// capacity it becomes `old` (the previous `old` is emptied and reused); a hit in `old`
/// moves back to `young`. Keys live in one byte arena per generation, so a rotation resets two
/// allocations, not thousands. At most `capacity` entries are held; 0 disables the memo.
#[derive(Debug)]
pub struct ChainMemo {
    half: usize,
    hasher: RandomState,
    maps: Mutex<MemoMaps>,
    /// The same hashes keyed by the chunk's msgpack bytes as a client sent them
    /// ([`ChainMemo::msgpack_chain`]); bounded like `maps`, by its own `half`.
    raw: Mutex<MemoMaps>,
}

/// One entry: its key is `bytes[at..at + len]` of its generation's arena.
#[derive(Debug, Clone, Copy)]
struct MemoSlot {
    /// The hasher's hash of the key, kept for rehashing.
    hash: u64,
    at: usize,
    len: usize,
    value: Blake3Hash,
}

#[derive(Debug, Default)]
struct Generation {
    table: HashTable<MemoSlot>,
    bytes: Vec<u8>,
}

impl Generation {
    fn find(&self, hash: u64, key: &[u8]) -> Option<&MemoSlot> {
        self.table.find(hash, |s| self.bytes[s.at..s.at + s.len] == *key)
    }
}

/// Entries hashed outside the lock, inserted together.
#[derive(Debug, Default)]
struct MemoBatch {
    slots: Vec<MemoSlot>,
    bytes: Vec<u8>,
}

impl MemoBatch {
    fn push(&mut self, hash: u64, key: &[u8], value: Blake3Hash) {
        self.slots.push(MemoSlot { hash, at: self.bytes.len(), len: key.len(), value });
        self.bytes.extend_from_slice(key);
    }
}

#[derive(Debug, Default)]
struct MemoMaps {
    young: Generation,
    old: Generation,
    hits: u64,
    misses: u64,
}

impl MemoMaps {
    /// Inserts into `young`, rotating first when it is full: `young` becomes `old`, and the
    /// previous `old` is emptied and reused as `young`. Its table and arena keep their
    /// capacity, so a busy memo neither frees nor faults in memory at each rotation (clearing
    /// resets the table's control bytes: a few KiB).
    fn push(&mut self, half: usize, hash: u64, key: &[u8], value: Blake3Hash) {
        self.push_parts(half, hash, key, &[], value);
    }

    /// [`Self::push`] of the key `head || tail`.
    fn push_parts(&mut self, half: usize, hash: u64, head: &[u8], tail: &[u8], value: Blake3Hash) {
        if self.young.table.len() >= half {
            std::mem::swap(&mut self.old, &mut self.young);
            self.young.table.clear();
            self.young.bytes.clear();
        }
        let g = &mut self.young;
        let slot = MemoSlot { hash, at: g.bytes.len(), len: head.len() + tail.len(), value };
        g.bytes.extend_from_slice(head);
        g.bytes.extend_from_slice(tail);
        g.table.insert_unique(hash, slot, |s| s.hash);
    }
}

/// What a [`ChainMemo`] holds and how often it answered (counted in chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoStats {
    pub entries: usize,
    /// Bytes of the arenas that hold the keys (the tables add about 64 bytes an entry).
    pub key_bytes: usize,
    /// Entries each of the two tables (by ids, by msgpack bytes) holds at most.
    pub capacity: usize,
    pub hits: u64,
    pub misses: u64,
}

impl ChainMemo {
    /// A memo holding at most `capacity` chunk hashes (0: disabled, every call hashes).
    pub fn new(capacity: usize) -> Self {
        Self {
            half: capacity.div_ceil(2),
            hasher: RandomState::default(),
            maps: Mutex::default(),
            raw: Mutex::default(),
        }
    }

    /// The hash of `key` if held (a hit in `old` moves it to `young`).
    fn get(&self, hash: u64, key: &[u8]) -> Option<Blake3Hash> {
        let mut m = self.maps.lock();
        if let Some(s) = m.young.find(hash, key) {
            let value = s.value;
            m.hits += 1;
            return Some(value);
        }
        let maps = &mut *m;
        let Generation { table, bytes } = &mut maps.old;
        let Ok(entry) = table.find_entry(hash, |s| bytes[s.at..s.at + s.len] == *key) else {
            maps.misses += 1;
            return None;
        };
        // Its arena bytes stay in `old` (until it is reused); the entry moves to `young`.
        let value = entry.remove().0.value;
        maps.hits += 1;
        maps.push(self.half, hash, key, value);
        drop(m);
        Some(value)
    }

    fn insert(&self, batch: MemoBatch) {
        let mut m = self.maps.lock();
        m.misses += batch.slots.len() as u64 - 1; // the first was counted by its probe
        for s in &batch.slots {
            m.push(self.half, s.hash, &batch.bytes[s.at..s.at + s.len], s.value);
        }
    }

    /// [`hash_chunks`] through the memo.
    pub fn hash_chunks<T: TokenId>(
        &self,
        prev: &Blake3Hash,
        tokens: &[T],
        chunk_size: usize,
    ) -> CoreResult<Vec<Blake3Hash>> {
        chain(prev, tokens, chunk_size, Some(self))
    }

    /// [`prefix_hashes`] through the memo.
    pub fn prefix_hashes<T: TokenId>(
        &self,
        tokens: &[T],
        chunk_size: usize,
        start: usize,
        end: Option<usize>,
    ) -> CoreResult<Vec<Blake3Hash>> {
        prefix_chain(tokens, chunk_size, start, end, Some(self))
    }

    /// Both tables together: a hit is a chunk not hashed (found by its ids or its msgpack
    /// bytes), a miss one hashed with blake3.
    pub fn stats(&self) -> MemoStats {
        let (entries, key_bytes, hits, misses) = {
            let m = self.maps.lock();
            (
                m.young.table.len() + m.old.table.len(),
                m.young.bytes.len() + m.old.bytes.len(),
                m.hits,
                m.misses,
            )
        };
        let r = self.raw.lock();
        MemoStats {
            entries: entries + r.young.table.len() + r.old.table.len(),
            key_bytes: key_bytes + r.young.bytes.len() + r.old.bytes.len(),
            capacity: 2 * self.half, // of each table
            hits: hits + r.hits,
            misses: misses + r.misses,
        }
    }

    /// Forgets every entry (the counters stay).
    pub fn clear(&self) {
        for maps in [&self.maps, &self.raw] {
            let (young, old) = {
                let mut m = maps.lock();
                (std::mem::take(&mut m.young), std::mem::take(&mut m.old))
            };
            drop((young, old));
        }
    }

    /// Hashes of every complete chunk of a msgpack token array (`raw` starts at the array's
    /// header and may continue past it), without parsing the ids of chunks seen before.
    ///
    /// Why: parsing a 32k-token array is serial and costs more than everything else a lookup
    /// does (each element's width decides where the next starts). A prompt seen before comes
    /// back as the same bytes, so each chunk is found by its msgpack bytes: the probe for
    /// chunk `i` is the chain hash before it, the chunk size and the chunk's first bytes, and
    /// an entry matches when the array continues with exactly its bytes. That is exact: a run
    /// of bytes that encodes `C` elements decodes to those elements whatever follows it, and
    /// the chain hash before it names every earlier token. From the first chunk not held on,
    /// the ids are parsed and hashed; the new chunks are recorded by their bytes when every
    /// element had its smallest encoding (as msgspec writes), else they go through the
    /// id-keyed table (they still hash right, they are only not found by their bytes).
    ///
    /// Errors are those of [`msgpack_tokens`] on the same bytes.
    pub fn msgpack_chain(&self, raw: &[u8], chunk_size: usize) -> CoreResult<MsgpackChain> {
        let c = self.msgpack_chain_unrecorded(raw, chunk_size)?;
        self.record(raw, &c, chunk_size, c.hashes.len());
        Ok(c)
    }

    /// [`Self::msgpack_chain`] without recording the new chunks: [`Self::record`] records
    /// those the caller wants (a lookup records only the chunks it found in L1: a new prompt
    /// costs it no more than parsing and hashing, and its store records it).
    pub fn msgpack_chain_unrecorded(&self, raw: &[u8], chunk_size: usize) -> CoreResult<MsgpackChain> {
        if chunk_size == 0 {
            return Err(CoreError::InvalidArgument("chunk_size must be > 0".into()));
        }
        let parsed = || -> CoreResult<MsgpackChain> {
            let (ids, used) = msgpack_tokens_prefix(raw)?;
            let hashes = self.prefix_hashes(&ids, chunk_size, 0, None)?;
            Ok(MsgpackChain { count: ids.len(), used, hashes, reused: 0, fresh_at: 0, lens: None })
        };
        let Some((count, header)) = array_header(raw) else { return parsed() };
        let body = &raw[header..];
        let (mut hashes, at) = self.raw_walk(body, count / chunk_size, chunk_size);
        let reused = hashes.len();
        let rest = count - reused * chunk_size;
        let Some((ids, used)) = elements(&body[at..], rest) else { return parsed() };
        let prev = hashes.last().copied().unwrap_or_else(none_hash);
        let lens = chunk_lens(&ids, used, chunk_size).filter(|_| self.half > 0);
        // New chunks found later by their bytes skip the id-keyed table; others go through it
        // (which counts its own misses).
        let new = chain(&prev, &ids, chunk_size, if lens.is_some() { None } else { Some(self) })?;
        if lens.is_some() && !new.is_empty() {
            self.raw.lock().misses += new.len() as u64;
        }
        hashes.extend(new);
        Ok(MsgpackChain { count, used: header + at + used, hashes, reused, fresh_at: header + at, lens })
    }

    /// Records by their bytes the new chunks of `chain` (made from `raw`) below chunk `upto`.
    pub fn record(&self, raw: &[u8], chain: &MsgpackChain, chunk_size: usize, upto: usize) {
        let Some(lens) = &chain.lens else { return };
        let upto = upto.min(chain.hashes.len());
        if upto <= chain.reused {
            return;
        }
        let prev = chain.reused.checked_sub(1).map_or_else(none_hash, |i| chain.hashes[i]);
        let n = upto - chain.reused;
        self.raw_record(
            &prev,
            &raw[chain.fresh_at..],
            &lens[..n],
            &chain.hashes[chain.reused..upto],
            chunk_size,
        );
    }

    /// Bytes of a chunk's encoding that pick its bucket (every chunk has at least this many).
    fn probe_len(chunk_size: usize) -> usize {
        chunk_size.min(16)
    }

    /// The head of a byte-keyed entry: the chain hash before the chunk and the chunk size
    /// (the same bytes make chunks of other lengths for another size).
    fn raw_head(prev: &Blake3Hash, chunk_size: usize) -> [u8; RAW_HEAD] {
        let mut head = [0u8; RAW_HEAD];
        head[..HASH_LEN].copy_from_slice(prev);
        head[HASH_LEN..].copy_from_slice(&(chunk_size as u64).to_le_bytes());
        head
    }

    fn raw_bucket(&self, head: &[u8; RAW_HEAD], probe: &[u8]) -> u64 {
        let mut key = [0u8; RAW_HEAD + 16];
        key[..RAW_HEAD].copy_from_slice(head);
        key[RAW_HEAD..RAW_HEAD + probe.len()].copy_from_slice(probe);
        self.hasher.hash_one(&key[..RAW_HEAD + probe.len()])
    }

    /// The held chunks `body` starts with (at most `chunks`): their hashes and the bytes they
    /// take.
    fn raw_walk(&self, body: &[u8], chunks: usize, chunk_size: usize) -> (Vec<Blake3Hash>, usize) {
        let mut out = Vec::with_capacity(chunks);
        if self.half == 0 {
            return (out, 0);
        }
        let p = Self::probe_len(chunk_size);
        let mut at = 0;
        let mut prev = none_hash();
        let mut m = self.raw.lock();
        while out.len() < chunks {
            let Some(probe) = body.get(at..at + p) else { break };
            let head = Self::raw_head(&prev, chunk_size);
            let bucket = self.raw_bucket(&head, probe);
            let rest = &body[at..];
            let matches = |bytes: &[u8], s: &MemoSlot| {
                let key = &bytes[s.at..s.at + s.len];
                key[..RAW_HEAD] == head && rest.starts_with(&key[RAW_HEAD..])
            };
            let found = match m.young.table.find(bucket, |s| matches(&m.young.bytes, s)) {
                Some(s) => Some((s.value, s.len - RAW_HEAD)),
                None => {
                    let maps = &mut *m;
                    let Generation { table, bytes } = &mut maps.old;
                    match table.find_entry(bucket, |s| matches(bytes, s)) {
                        Ok(entry) => {
                            // Back into `young` (its bytes stay in `old`'s arena).
                            let (s, _) = entry.remove();
                            let key = bytes[s.at..s.at + s.len].to_vec();
                            maps.push(self.half, s.hash, &key, s.value);
                            Some((s.value, s.len - RAW_HEAD))
                        }
                        Err(_) => None,
                    }
                }
            };
            let Some((value, len)) = found else { break };
            m.hits += 1;
            out.push(value);
            prev = value;
            at += len;
        }
        (out, at)
    }

    /// Records chunks by their bytes: chunk `i` is the next `lens[i]` bytes of `bytes` and
    /// hashes to `hashes[i]` (chained from `prev`).
    fn raw_record(
        &self,
        prev: &Blake3Hash,
        bytes: &[u8],
        lens: &[usize],
        hashes: &[Blake3Hash],
        chunk_size: usize,
    ) {
        if hashes.is_empty() {
            return;
        }
        let p = Self::probe_len(chunk_size);
        let (mut at, mut last) = (0, *prev);
        let mut m = self.raw.lock();
        for (&len, &h) in lens.iter().zip(hashes) {
            let head = Self::raw_head(&last, chunk_size);
            let bucket = self.raw_bucket(&head, &bytes[at..at + p]);
            m.push_parts(self.half, bucket, &head, &bytes[at..at + len], h);
            at += len;
            last = h;
        }
    }
}

/// Bytes before a byte-keyed entry's chunk bytes ([`ChainMemo::raw_head`]).
const RAW_HEAD: usize = HASH_LEN + 8;

/// A token array's chunk hashes ([`ChainMemo::msgpack_chain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgpackChain {
    /// Elements of the array.
    pub count: usize,
    /// Bytes the array takes, header included.
    pub used: usize,
    /// Hashes of every complete chunk.
    pub hashes: Vec<Blake3Hash>,
    /// How many of them were found by their bytes (their ids not parsed).
    pub reused: usize,
    /// Where the first chunk not found starts in the array's bytes.
    pub fresh_at: usize,
    /// Byte lengths of the complete chunks from `reused` on, when they can be recorded by
    /// their bytes ([`ChainMemo::record`]): smallest encodings, memo on.
    pub lens: Option<Vec<usize>>,
}

/// Bytes of the smallest msgpack encoding of `v` (fixint 1, uint8 2, uint16 3, uint32 5),
/// without branches: ids of a prompt have every width in random order, and a branch per id
/// mispredicted about half the time (the sum over a 32k prompt took ~80 µs; now it
/// vectorises).
#[inline(always)]
fn width(v: u32) -> usize {
    1 + usize::from(v > 0x7f) + usize::from(v > 0xff) + 2 * usize::from(v > 0xffff)
}

/// The byte length of each complete chunk of `ids`, if `used` bytes encoded them with every
/// element in its smallest encoding (as msgspec writes): each element takes at least that, so
/// equal totals mean each has it, and the lengths follow from the ids. None otherwise.
fn chunk_lens(ids: &[u32], used: usize, chunk_size: usize) -> Option<Vec<usize>> {
    let mut lens = Vec::with_capacity(ids.len() / chunk_size);
    let mut total = 0;
    for chunk in ids.chunks(chunk_size) {
        let len = chunk.iter().map(|&v| width(v)).sum::<usize>();
        if chunk.len() == chunk_size {
            lens.push(len);
        }
        total += len;
    }
    (total == used).then_some(lens)
}

/// `n` elements at the start of `body` (which may continue): the ids and the bytes they take.
/// None for anything the fast parsers do not read (wider or signed encodings, errors).
fn elements(body: &[u8], n: usize) -> Option<(Vec<u32>, usize)> {
    if n >= FAST_MIN_TOKENS {
        return fast_tokens(body, n);
    }
    let mut ids = Vec::with_capacity(n);
    let mut p = 0;
    for _ in 0..n {
        let (w, v) = checked_step(body, p)?;
        ids.push(v);
        p += w;
    }
    Some((ids, p))
}

/// Token ids from a msgpack array of non-negative integers, as LMCache clients send
/// `token_ids` (the server decodes them here, without building a Python list).
pub fn msgpack_tokens(raw: &[u8]) -> CoreResult<Vec<u32>> {
    let (tokens, used) = msgpack_tokens_prefix(raw)?;
    if used != raw.len() {
        return Err(CoreError::InvalidArgument("token_ids: trailing bytes".into()));
    }
    Ok(tokens)
}

/// Like [`msgpack_tokens`] for an array at the start of `raw` (more may follow): the ids and
/// the bytes the array took. Large arrays go through [`fast_tokens`] (several interleaved
/// parses); anything it does not handle, including every error, is parsed serially here, so
/// results and errors are exactly the serial parser's.
pub fn msgpack_tokens_prefix(raw: &[u8]) -> CoreResult<(Vec<u32>, usize)> {
    if let Some((len, header)) = array_header(raw) {
        if len >= FAST_MIN_TOKENS {
            if let Some((ids, used)) = fast_tokens(&raw[header..], len) {
                return Ok((ids, header + used));
            }
        }
    }
    msgpack_tokens_prefix_serial(raw)
}

/// `(element count, header bytes)` of a msgpack array header at the start of `raw`.
fn array_header(raw: &[u8]) -> Option<(usize, usize)> {
    match *raw.first()? {
        tag @ 0x90..=0x9f => Some((usize::from(tag & 0x0f), 1)),
        0xdc => Some((usize::from(u16::from_be_bytes(raw.get(1..3)?.try_into().ok()?)), 3)),
        0xdd => Some((u32::from_be_bytes(raw.get(1..5)?.try_into().ok()?) as usize, 5)),
        _ => None,
    }
}

/// Below this many ids the serial parser is as fast (the interleaved one has set-up work).
const FAST_MIN_TOKENS: usize = 1024;
/// Parses interleaved by [`fast_tokens`].
const STREAMS: usize = 4;
/// How far into its part a guessed parse may restart after an element it cannot read.
const WARMUP_BYTES: usize = 64;

/// How [`fast_tokens`] reads the element a tag starts: `width | shift << 8 | bits << 16`,
/// where the value is `(the 8 bytes from the tag, big-endian) >> shift`, masked to `bits`.
/// Positive fixint, uint8, uint16 and uint32 (what encoders emit for ids below 2^32); 0 (width
/// 0) for every other tag.
static ELEMENT: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 0x80 {
        t[i] = 1 | (56 << 8) | (7 << 16);
        i += 1;
    }
    t[0xcc] = 2 | (48 << 8) | (8 << 16);
    t[0xcd] = 3 | (40 << 8) | (16 << 16);
    t[0xce] = 5 | (24 << 8) | (32 << 16);
    t
};

/// The element at `p` from the 8 bytes there: `(width, value)`, width 0 if unsupported.
#[inline(always)]
fn decode_word(word: u64) -> (usize, u32) {
    let e = ELEMENT[(word >> 56) as usize];
    let mask = (1u64 << (e >> 16)) - 1;
    ((e & 0xff) as usize, ((word >> ((e >> 8) & 0xff)) & mask) as u32)
}

/// One element at `p`, near the end of the buffer too: `None` where it is unsupported or cut.
#[inline]
fn checked_step(b: &[u8], p: usize) -> Option<(usize, u32)> {
    let mut word = [0u8; 8];
    let have = b.len().checked_sub(p)?.min(8);
    word[..have].copy_from_slice(&b[p..p + have]);
    let (w, v) = decode_word(u64::from_be_bytes(word));
    (w != 0 && w <= have).then_some((w, v))
}

/// One of the interleaved parses: element values and start offsets from `p` on. Its buffers
/// are reused between calls (only `..count` is meaningful) and only grow.
#[derive(Debug, Default)]
struct Stream {
    p: usize,
    end: usize,
    count: usize,
    vals: Vec<u32>,
    /// Offsets fit u32: [`fast_tokens`] refuses larger bodies.
    pos: Vec<u32>,
    /// Elements before this index came from an abandoned guess (see [`fast_tokens`]).
    restart: usize,
    dead: bool,
}

impl Stream {
    #[inline]
    fn put(&mut self, w: usize, v: u32) {
        if self.count < self.vals.len() {
            self.vals[self.count] = v;
            self.pos[self.count] = self.p as u32;
        } else {
            self.vals.push(v);
            self.pos.push(self.p as u32);
        }
        self.count += 1;
        self.p += w;
    }

    /// An unreadable element at `p`: a guessed start (part `k > 0`, still in its first
    /// [`WARMUP_BYTES`]) moves one byte on, anything else ends the parse.
    fn stuck(&mut self, k: usize, part: usize) {
        if k > 0 && self.p < k * part + WARMUP_BYTES {
            self.p += 1;
            self.restart = self.count;
        } else {
            self.dead = true;
        }
    }
}

/// Parses the `n` ids of an array body (`body` may continue past the array) as [`STREAMS`]
/// independent parses, one per part of the bytes, interleaved in one loop so their serial
/// dependency chains (tag -> width -> next tag) overlap in the CPU instead of running back to
/// back.
///
/// Only the first part starts on a known element. The others start on a guess (the first
/// byte of their part), restart one byte further on an unreadable element during their
/// first [`WARMUP_BYTES`], and so fall onto the true element boundaries within a few
/// elements. The merge makes it exact: a part's elements are taken only from the element
/// where the (true) parse before it lands on one of the part's own element offsets, since
/// from a common offset both parses are the same; elsewhere the true parse continues one
/// element at a time. `None` (the caller parses serially) for anything else: unsupported
/// element types, malformed or short arrays.
fn fast_tokens(body: &[u8], n: usize) -> Option<(Vec<u32>, usize)> {
    // The array's elements start within its first 5n bytes (5: the widest element read here).
    let span = body.len().min(n.checked_mul(5)?);
    let part = span / STREAMS;
    if part < 2 * WARMUP_BYTES || body.len() > u32::MAX as usize {
        return None;
    }
    SCRATCH.with_borrow_mut(|streams| {
        let out = parse_parts(streams, body, n, span, part);
        for s in streams.iter_mut() {
            if s.vals.len() > SCRATCH_MAX_TOKENS {
                *s = Stream::default(); // a huge prompt: do not keep its buffers
            }
        }
        out
    })
}

/// Most ids a part's buffers keep between calls (1 MiB of ids and offsets).
const SCRATCH_MAX_TOKENS: usize = 1 << 17;

thread_local! {
    /// The parts' buffers, reused: fresh ones cost page faults that took longer than the
    /// parse itself on the test VM.
    static SCRATCH: std::cell::RefCell<[Stream; STREAMS]> = Default::default();
}

fn parse_parts(
    streams: &mut [Stream; STREAMS],
    body: &[u8],
    n: usize,
    span: usize,
    part: usize,
) -> Option<(Vec<u32>, usize)> {
    // Parts hold about n / STREAMS elements when widths are even; they grow if not.
    let want = n / STREAMS + n / 32 + 64;
    for (k, s) in streams.iter_mut().enumerate() {
        s.p = k * part;
        s.end = if k + 1 == STREAMS { span } else { (k + 1) * part };
        s.count = 0;
        s.restart = 0;
        s.dead = false;
        if s.vals.len() < want {
            s.vals.resize(want, 0);
            s.pos.resize(want, 0);
        }
    }
    interleave(streams, body, part);
    // Each parse finishes its part alone.
    for (k, s) in streams.iter_mut().enumerate() {
        while !s.dead && s.p < s.end {
            match checked_step(body, s.p) {
                Some((w, v)) => s.put(w, v),
                None => s.stuck(k, part),
            }
        }
    }
    // Merge: `vals` and `p` are the true parse so far.
    let [first, rest @ ..] = streams;
    if first.dead && first.count < n {
        return None;
    }
    let mut vals = Vec::with_capacity(n + 16);
    vals.extend_from_slice(&first.vals[..first.count]);
    let mut p = first.p;
    // Where element `n` starts, once the parse has gone that far (the array's end).
    let mut end_at = (first.count > n).then(|| first.pos[n] as usize);
    for s in rest.iter_mut() {
        // `p` only grows, so one cursor over the part's sorted offsets finds every match: the
        // merge stays linear even for input on which no part ever resynchronises.
        let mut j = s.restart;
        while vals.len() < n {
            while j < s.count && (s.pos[j] as usize) < p {
                j += 1;
            }
            if j < s.count && s.pos[j] as usize == p {
                if vals.len() + (s.count - j) > n {
                    end_at = Some(s.pos[j + n - vals.len()] as usize);
                }
                vals.extend_from_slice(&s.vals[j..s.count]);
                p = s.p;
                break;
            }
            if p >= s.p {
                break; // past everything this part parsed: go on into the next one
            }
            let (w, v) = checked_step(body, p)?;
            vals.push(v);
            p += w;
        }
    }
    while vals.len() < n {
        let (w, v) = checked_step(body, p)?;
        vals.push(v);
        p += w;
    }
    let used = end_at.unwrap_or(p);
    vals.truncate(n);
    Some((vals, used))
}

/// The hot loop: one element of every part per round, positions kept in registers, while
/// every part is inside its bytes, 8 bytes from the buffer's end and inside its buffers.
fn interleave(streams: &mut [Stream; STREAMS], body: &[u8], part: usize) {
    let safe = body.len().saturating_sub(8);
    loop {
        let [s0, s1, s2, s3] = &mut *streams;
        let (mut p0, mut p1, mut p2, mut p3) = (s0.p, s1.p, s2.p, s3.p);
        let (mut i0, mut i1, mut i2, mut i3) = (s0.count, s1.count, s2.count, s3.count);
        let lim = |s: &Stream| s.end.min(safe);
        let (l0, l1, l2, l3) = (lim(s0), lim(s1), lim(s2), lim(s3));
        let room = s0.vals.len().min(s1.vals.len()).min(s2.vals.len()).min(s3.vals.len());
        macro_rules! step {
            ($s:ident, $p:ident, $i:ident) => {{
                let word = u64::from_be_bytes(body[$p..$p + 8].try_into().expect("8 bytes"));
                let (w, v) = decode_word(word);
                if w == 0 {
                    false
                } else {
                    $s.vals[$i] = v;
                    $s.pos[$i] = $p as u32;
                    $i += 1;
                    $p += w;
                    true
                }
            }};
        }
        while p0 < l0 && p1 < l1 && p2 < l2 && p3 < l3 && i0.max(i1).max(i2).max(i3) < room {
            let ok = step!(s0, p0, i0) & step!(s1, p1, i1) & step!(s2, p2, i2) & step!(s3, p3, i3);
            if !ok {
                break;
            }
        }
        (s0.p, s1.p, s2.p, s3.p) = (p0, p1, p2, p3);
        (s0.count, s1.count, s2.count, s3.count) = (i0, i1, i2, i3);
        // A part that stopped on an element it cannot read restarts or ends; any other stop
        // (a part's end, the buffer's end, full buffers) ends the interleaved phase.
        let mut again = false;
        for (k, s) in streams.iter_mut().enumerate() {
            if s.p < s.end.min(safe)
                && decode_word(u64::from_be_bytes(body[s.p..s.p + 8].try_into().expect("8 bytes"))).0 == 0
            {
                s.stuck(k, part);
                again = true;
            }
        }
        if !again || streams.iter().any(|s| s.dead) {
            return;
        }
    }
}

/// [`msgpack_tokens_prefix`] with one serial parse: the reference the fast path falls back
/// to (and is tested and benchmarked against).
pub fn msgpack_tokens_prefix_serial(raw: &[u8]) -> CoreResult<(Vec<u32>, usize)> {
    let bad = |what: &str| CoreError::InvalidArgument(format!("token_ids: {what}"));
    let (&tag, mut rest) = raw.split_first().ok_or_else(|| bad("empty"))?;
    let take = |rest: &mut &[u8], n: usize| -> CoreResult<u64> {
        if rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    };
    let len = match tag {
        0x90..=0x9f => usize::from(tag & 0x0f),
        0xdc => take(&mut rest, 2)? as usize,
        0xdd => take(&mut rest, 4)? as usize,
        _ => return Err(bad("not a msgpack array")),
    };
    if len > rest.len() {
        return Err(bad("truncated"));
    }
    let mut out = Vec::with_capacity(len);
    for position in 0..len {
        let (&t, tail) = rest.split_first().ok_or_else(|| bad("truncated"))?;
        rest = tail;
        let value: i128 = match t {
            0x00..=0x7f => i128::from(t),
            0xcc => i128::from(take(&mut rest, 1)?),
            0xcd => i128::from(take(&mut rest, 2)?),
            0xce => i128::from(take(&mut rest, 4)?),
            0xcf => i128::from(take(&mut rest, 8)?),
            0xd0 => i128::from(take(&mut rest, 1)? as u8 as i8),
            0xd1 => i128::from(take(&mut rest, 2)? as u16 as i16),
            0xd2 => i128::from(take(&mut rest, 4)? as u32 as i32),
            0xd3 => i128::from(take(&mut rest, 8)? as i64),
            0xe0..=0xff => i128::from(t as i8),
            _ => return Err(bad(&format!("element {position} is not an integer"))),
        };
        let v = u32::try_from(value).map_err(|_| CoreError::InvalidToken { position, value })?;
        out.push(v);
    }
    Ok((out, raw.len() - rest.len()))
}

/// Lower-case hex of a hash (for logs, file names and test vectors).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    // Spec Appendix 1.
    const NONE: &str = "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b";
    const C0: &str = "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4";
    const C1: &str = "e5ffee45c2b9db326814c9692dc594369887ba3b0df5761817820b60f864c8e0";
    const C16: &str = "32748aa00c5090e4f0e1f149078a07381f4f618d898c1cbac17e36521c3de48f";

    #[test]
    fn none_hash_vector() {
        assert_eq!(to_hex(&none_hash()), NONE);
    }

    #[test]
    fn chunk_256_vectors() {
        let tokens: Vec<u32> = (0..600).collect();
        let h = prefix_hashes(&tokens, 256, 0, None).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(to_hex(&h[0]), C0);
        assert_eq!(to_hex(&h[1]), C1);
        let tail = prefix_hashes(&tokens, 256, 256, None).unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(to_hex(&tail[0]), C1);
    }

    #[test]
    fn chunk_16_vector() {
        let tokens: Vec<i64> = (0..16).collect();
        let h = prefix_hashes(&tokens, 16, 0, None).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(to_hex(&h[0]), C16);
    }

    #[test]
    fn dtype_does_not_change_hash() {
        let a: Vec<u32> = (0..512).collect();
        let b: Vec<i64> = (0..512).collect();
        let c: Vec<i32> = (0..512).collect();
        let ha = prefix_hashes(&a, 256, 0, None).unwrap();
        assert_eq!(ha, prefix_hashes(&b, 256, 0, None).unwrap());
        assert_eq!(ha, prefix_hashes(&c, 256, 0, None).unwrap());
    }

    #[test]
    fn end_truncates_and_partial_chunks_are_ignored() {
        let tokens: Vec<u32> = (0..600).collect();
        assert_eq!(prefix_hashes(&tokens, 256, 0, Some(511)).unwrap().len(), 1);
        assert_eq!(prefix_hashes(&tokens, 256, 0, Some(10_000)).unwrap().len(), 2);
        assert!(prefix_hashes(&tokens[..255], 256, 0, None).unwrap().is_empty());
    }

    #[test]
    fn chain_extends_incrementally() {
        let tokens: Vec<u32> = (0..1024).map(|i| i * 7).collect();
        let full = prefix_hashes(&tokens, 256, 0, None).unwrap();
        let head = hash_chunks(&none_hash(), &tokens[..512], 256).unwrap();
        let tail = hash_chunks(head.last().unwrap(), &tokens[512..], 256).unwrap();
        assert_eq!([head, tail].concat(), full);
    }

    #[test]
    fn msgpack_token_arrays() {
        // [0, 127, 128, 65535, 65536, 4294967295] with the smallest encodings, plus int8 1.
        let raw = [
            0x97, 0x00, 0x7f, 0xcc, 0x80, 0xcd, 0xff, 0xff, 0xce, 0x00, 0x01, 0x00, 0x00, 0xce, 0xff, 0xff,
            0xff, 0xff, 0xd0, 0x01,
        ];
        assert_eq!(msgpack_tokens(&raw).unwrap(), [0, 127, 128, 65535, 65536, u32::MAX, 1]);
        let mut big = vec![0xdc, 0x01, 0x00];
        big.extend((0..256).map(|i| (i % 128) as u8));
        assert_eq!(msgpack_tokens(&big).unwrap().len(), 256);
        assert_eq!(msgpack_tokens(&[0x90]).unwrap(), Vec::<u32>::new());
        assert!(matches!(msgpack_tokens(&[0x91, 0xff]), Err(CoreError::InvalidToken { value: -1, .. })));
        assert!(msgpack_tokens(&[0x91, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
        assert!(msgpack_tokens(&[0x92, 0x01]).is_err());
        assert!(msgpack_tokens(&[0x91, 0xa1, 0x61]).is_err());
        assert!(msgpack_tokens(&[0x91, 0x01, 0x02]).is_err());
        assert!(msgpack_tokens(&[0x01]).is_err());
        assert!(msgpack_tokens(&[]).is_err());
    }

    #[test]
    fn memo_answers_exactly_what_blake3_does() {
        let memo = ChainMemo::new(64);
        let a: Vec<u32> = (0..4096).map(|i| i * 31 % 1000).collect();
        let mut b = a.clone();
        b[300] += 1; // chunk 1 differs: chunks 1.. of b have other hashes
        for _ in 0..3 {
            assert_eq!(
                memo.prefix_hashes(&a, 256, 0, None).unwrap(),
                prefix_hashes(&a, 256, 0, None).unwrap()
            );
            assert_eq!(
                memo.prefix_hashes(&b, 256, 0, None).unwrap(),
                prefix_hashes(&b, 256, 0, None).unwrap()
            );
        }
        let s = memo.stats();
        assert_eq!(s.misses, 16 + 15, "b shares only its first chunk with a");
        assert_eq!(s.hits, 2 * (16 + 16) + 1);
        assert_eq!(s.entries, 31);
        assert_eq!(s.key_bytes, 31 * (32 + 1024));
        let tail =
            memo.hash_chunks(&prefix_hashes(&a, 256, 0, Some(512)).unwrap()[1], &a[512..], 256).unwrap();
        assert_eq!(tail, prefix_hashes(&a, 256, 512, None).unwrap());
    }

    #[test]
    fn memo_shared_by_threads_answers_exactly() {
        // Four threads hash overlapping prompts through one small memo (generations rotate all
        // the time): every answer equals plain hashing and the bound holds.
        let memo = ChainMemo::new(16);
        let prompts: Vec<Vec<u32>> =
            (0..8u32).map(|p| (0..1024).map(|i| if i < 512 { i } else { i * (p + 1) }).collect()).collect();
        let want: Vec<_> = prompts.iter().map(|p| prefix_hashes(p, 64, 0, None).unwrap()).collect();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (memo, prompts, want) = (&memo, &prompts, &want);
                s.spawn(move || {
                    for round in 0..200 {
                        let i = (round * 7 + t * 3) % prompts.len();
                        assert_eq!(memo.prefix_hashes(&prompts[i], 64, 0, None).unwrap(), want[i]);
                        assert!(memo.stats().entries <= 16);
                    }
                });
            }
        });
        let s = memo.stats();
        assert_eq!(s.hits + s.misses, 4 * 200 * 16);
    }

    #[test]
    fn memo_is_bounded_and_keeps_what_is_used() {
        let memo = ChainMemo::new(8);
        let hot: Vec<u32> = (0..512).collect(); // 2 chunks, looked up between every insert
        for round in 0..50u32 {
            let cold: Vec<u32> = (0..256).map(|i| i + 1_000 * (round + 1)).collect();
            memo.prefix_hashes(&cold, 256, 0, None).unwrap();
            assert_eq!(
                memo.prefix_hashes(&hot, 256, 0, None).unwrap(),
                prefix_hashes(&hot, 256, 0, None).unwrap()
            );
            assert!(memo.stats().entries <= 8);
        }
        let s = memo.stats();
        assert_eq!(s.misses, 50 + 2, "the hot chunks were hashed once");
        memo.clear();
        assert_eq!((memo.stats().entries, memo.stats().key_bytes), (0, 0));
        let off = ChainMemo::new(0);
        assert_eq!(
            off.prefix_hashes(&hot, 256, 0, None).unwrap(),
            prefix_hashes(&hot, 256, 0, None).unwrap()
        );
        assert_eq!(off.stats().entries, 0);
    }

    /// msgpack for `tokens`, each with the smallest encoding (as msgspec writes) unless `wide`
    /// picks other valid or invalid forms for some (uint64, int32, negative, a string).
    fn encode(tokens: &[u32], wide: &[u8]) -> Vec<u8> {
        let mut raw = vec![0xdd];
        raw.extend_from_slice(&(tokens.len() as u32).to_be_bytes());
        for (i, &t) in tokens.iter().enumerate() {
            match wide.get(i).copied().unwrap_or(0) {
                1 => {
                    raw.push(0xcf);
                    raw.extend_from_slice(&u64::from(t).to_be_bytes());
                }
                2 => {
                    raw.push(0xd2);
                    raw.extend_from_slice(&(t as i32).to_be_bytes());
                }
                3 => raw.push(0xff),
                4 => raw.extend_from_slice(&[0xa1, b'x']),
                _ if t < 0x80 => raw.push(t as u8),
                _ if t <= 0xff => raw.extend_from_slice(&[0xcc, t as u8]),
                _ if t <= 0xffff => {
                    raw.push(0xcd);
                    raw.extend_from_slice(&(t as u16).to_be_bytes());
                }
                _ => {
                    raw.push(0xce);
                    raw.extend_from_slice(&t.to_be_bytes());
                }
            }
        }
        raw
    }

    #[test]
    fn fast_parse_matches_serial_on_large_arrays() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let n = 1024 + (next() % 6000) as usize;
            let max = [0x80u64, 0x100, 0x1_0000, 128_000, 1 << 32][round % 5];
            let tokens: Vec<u32> = (0..n).map(|_| (next() % max) as u32).collect();
            let mut wide = vec![0u8; n];
            if round % 7 == 3 {
                wide[(next() % n as u64) as usize] = 1 + (next() % 4) as u8;
            }
            let mut raw = encode(&tokens, &wide);
            let array_len = raw.len();
            raw.extend((0..next() % 40).map(|_| next() as u8)); // what follows the array
            if round % 11 == 5 {
                let at = (next() % raw.len() as u64) as usize;
                raw[at] = next() as u8;
            }
            let fast = msgpack_tokens_prefix(&raw);
            assert_eq!(fast, msgpack_tokens_prefix_serial(&raw), "round {round}");
            if round % 7 != 3 && round % 11 != 5 {
                assert_eq!(fast_tokens(&raw[5..], n), Some((tokens.clone(), array_len - 5)), "round {round}");
                assert_eq!(fast.unwrap(), (tokens, array_len));
            }
        }
    }

    /// `msgpack_chain` against the reference (parse everything, hash everything) on `raw`.
    fn check_chain(memo: &ChainMemo, raw: &[u8], chunk: usize) -> Option<MsgpackChain> {
        let want = msgpack_tokens_prefix_serial(raw)
            .and_then(|(ids, used)| Ok((ids.len(), used, prefix_hashes(&ids, chunk, 0, None)?)));
        let got = memo.msgpack_chain(raw, chunk);
        match (&want, &got) {
            (Ok((count, used, hashes)), Ok(c)) => {
                assert_eq!((c.count, c.used, &c.hashes), (*count, *used, hashes));
                got.ok()
            }
            (Err(w), Err(g)) => {
                assert_eq!(w, g);
                None
            }
            _ => panic!("reference {want:?}, memo {got:?}"),
        }
    }

    #[test]
    fn msgpack_chain_reuses_chunks_by_their_bytes() {
        let memo = ChainMemo::new(1024);
        let a: Vec<u32> = (0..4096u32).map(|i| i.wrapping_mul(2_654_435_761) % 128_000).collect();
        let raw = encode(&a, &[]);
        assert_eq!(check_chain(&memo, &raw, 256).unwrap().reused, 0);
        let misses = memo.stats().misses;
        let again = check_chain(&memo, &raw, 256).unwrap();
        assert_eq!(again.reused, 16, "every chunk found by its bytes");
        assert_eq!(memo.stats().misses, misses, "nothing hashed again");
        // Followed by other bytes (the key's next fields): `used` stops at the array's end.
        let mut more = raw.clone();
        more.extend_from_slice(&[0xa3, b'e', b'n', b'd', 0x05]);
        assert_eq!(check_chain(&memo, &more, 256).unwrap().reused, 16);
        // A longer prompt with the same start: the old chunks by bytes, the new ones parsed.
        let mut b = a.clone();
        b.extend((0..1000u32).map(|i| i * 7));
        let cb = check_chain(&memo, &encode(&b, &[]), 256).unwrap();
        assert_eq!(cb.reused, 16);
        // One id changed in chunk 5 (same width, and another width): chunks 0..5 reused.
        for v in [a[5 * 256 + 9] ^ 1, 70_000, 3] {
            let mut c = a.clone();
            c[5 * 256 + 9] = v;
            assert_eq!(check_chain(&memo, &encode(&c, &[]), 256).unwrap().reused, 5);
        }
        // The same ids in wider encodings: the same hashes, never a false byte match.
        let mut wide = vec![0u8; a.len()];
        wide[2 * 256] = 1;
        let cw = check_chain(&memo, &encode(&a, &wide), 256).unwrap();
        assert_eq!(cw.reused, 0, "a non-canonical array is parsed whole");
        // Fewer elements than a chunk, an empty array, a shorter prompt.
        check_chain(&memo, &encode(&a[..100], &[]), 256);
        check_chain(&memo, &encode(&[], &[]), 256);
        assert_eq!(check_chain(&memo, &encode(&a[..3 * 256 + 5], &[]), 256).unwrap().reused, 3);
        // Bad arrays: the parser's errors, also after a reused prefix.
        for w in [2u8, 3, 4] {
            let mut bad = vec![0u8; a.len()];
            bad[3000] = w;
            check_chain(&memo, &encode(&a, &bad), 256);
        }
        let mut cut = raw.clone();
        cut.truncate(raw.len() - 3);
        assert!(check_chain(&memo, &cut, 256).is_none());
        assert!(check_chain(&memo, &[0xc0], 256).is_none());
        assert!(memo.msgpack_chain(&raw, 0).is_err());
    }

    #[test]
    fn unrecorded_chains_record_what_the_caller_asks() {
        let memo = ChainMemo::new(1024);
        let a: Vec<u32> = (0..10 * 64).map(|i| i * 13 % 90_000).collect();
        let raw = encode(&a, &[]);
        let c = memo.msgpack_chain_unrecorded(&raw, 64).unwrap();
        assert_eq!(c.hashes, prefix_hashes(&a, 64, 0, None).unwrap());
        assert_eq!(memo.msgpack_chain_unrecorded(&raw, 64).unwrap().reused, 0, "nothing recorded");
        memo.record(&raw, &c, 64, 3);
        let c = memo.msgpack_chain_unrecorded(&raw, 64).unwrap();
        assert_eq!((c.reused, c.fresh_at), (3, 5 + a[..192].iter().map(|&v| width(v)).sum::<usize>()));
        assert_eq!(c.hashes, prefix_hashes(&a, 64, 0, None).unwrap());
        memo.record(&raw, &c, 64, 2); // below what is held: nothing
        memo.record(&raw, &c, 64, 99);
        assert_eq!(check_chain(&memo, &raw, 64).unwrap().reused, 10);
        // Non-canonical arrays are never recorded.
        let mut wide = vec![0u8; a.len()];
        wide[600] = 1;
        let w = encode(&a, &wide);
        let c = memo.msgpack_chain_unrecorded(&w, 64).unwrap();
        assert!(c.lens.is_none());
        memo.record(&w, &c, 64, 10);
        assert_eq!(c.hashes, prefix_hashes(&a, 64, 0, None).unwrap());
    }

    #[test]
    fn msgpack_chain_small_chunks_and_off() {
        // Chunks shorter than the probe, and a disabled memo.
        for cap in [0, 8, 4096] {
            let memo = ChainMemo::new(cap);
            for round in 0..3u32 {
                let ids: Vec<u32> = (0..301u32).map(|i| (i * (round + 1)) % 300).collect();
                for chunk in [1, 3, 16, 17, 256] {
                    check_chain(&memo, &encode(&ids, &[]), chunk);
                    check_chain(&memo, &encode(&ids, &[]), chunk);
                }
            }
            assert!(memo.stats().entries <= 2 * cap.div_ceil(2) * 2);
        }
    }

    #[test]
    fn msgpack_chain_shared_by_threads_answers_exactly() {
        // A small memo (generations rotate all the time), prompts sharing prefixes.
        let memo = ChainMemo::new(16);
        let prompts: Vec<Vec<u8>> = (0..8u32)
            .map(|p| {
                encode(
                    &(0..1500u32).map(|i| if i < 700 { i * 3 } else { i * (p + 1) }).collect::<Vec<_>>(),
                    &[],
                )
            })
            .collect();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (memo, prompts) = (&memo, &prompts);
                s.spawn(move || {
                    for round in 0..100 {
                        check_chain(memo, &prompts[(round * 5 + t * 3) % prompts.len()], 64);
                        assert!(memo.stats().entries <= 32);
                    }
                });
            }
        });
    }

    proptest::proptest! {
        #[test]
        fn msgpack_chain_matches_parsing(
            base in proptest::collection::vec(0u32..200_000, 0..700),
            edits in proptest::collection::vec((0usize..700, 0u32..200_000), 0..4),
            cut in 0usize..700,
            chunk in 1usize..80,
        ) {
            let memo = ChainMemo::new(64);
            check_chain(&memo, &encode(&base, &[]), chunk);
            let mut other = base.clone();
            for (at, v) in edits {
                if at < other.len() {
                    other[at] = v;
                }
            }
            other.truncate(cut.max(other.len() / 2));
            other.extend(base.iter().take(50));
            check_chain(&memo, &encode(&other, &[]), chunk);
            check_chain(&memo, &encode(&base, &[]), chunk);
        }
    }

    #[test]
    fn widths_are_the_smallest_encodings() {
        for v in [0u32, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, u32::MAX] {
            let mut out = Vec::new();
            rmp::encode::write_uint(&mut out, u64::from(v)).unwrap();
            assert_eq!(width(v), out.len(), "{v}");
        }
    }

    #[test]
    fn out_of_range_tokens_are_errors() {
        let bad: Vec<i64> = vec![1, -1, 3, 4];
        assert_eq!(
            hash_chunks(&none_hash(), &bad, 2),
            Err(CoreError::InvalidToken { position: 1, value: -1 })
        );
        let big: Vec<u64> = vec![1 << 32, 0];
        assert!(hash_chunks(&none_hash(), &big, 2).is_err());
        assert!(hash_chunks(&none_hash(), &[1u32], 0).is_err());
    }
}
