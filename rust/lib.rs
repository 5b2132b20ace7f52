//! lmcache-rs core: the metadata half of the KV-cache server. Rust owns keys, hashing, the L1
//! address space, object states, locks, recency, quotas and stats; torch (in Python) owns the
//! bytes. Usable and benchmarkable without Python; the bindings live behind the `python`
//! feature in [`python`].
//!
//! | module | what |
//! |---|---|
//! | [`hash`] | chained blake3 chunk hashes (spec C.1) |
//! | [`key`] | object keys, scopes, kv_rank packing, validation (spec C.2) |
//! | [`arena`] | best-fit, coalescing offset allocator for the one L1 buffer (spec E.1) |
//! | [`list`] | intrusive O(1) lists over a slab (LRU, lock and staging queues) |
//! | [`index`] | the L1 index: states, TTLs, LRU/IsolatedLRU, quotas, demand eviction, stats |
//! | [`clock`] | monotonic and manual time sources for TTLs |
//! | [`droplog`] | a bounded record of why chunks left L1 (`explain`) |
//! | [`wire`] | request keys decoded from their msgpack wire form in one pass |
//! | [`control`] | the control plane: ZMQ I/O thread, sessions, control ops, stats registry |
//! | [`error`] | the one error enum |

pub mod arena;
pub mod clock;
pub mod control;
pub mod droplog;
pub mod error;
pub mod hash;
pub mod index;
pub mod key;
pub mod list;
pub mod wire;

#[cfg(feature = "python")]
pub mod python;

pub use arena::{Allocation, Arena, ArenaStats};
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use droplog::DropReason;
pub use error::{CoreError, CoreResult};
pub use hash::{
    checksum, hash_chunks, msgpack_tokens, msgpack_tokens_prefix, msgpack_tokens_prefix_serial, none_hash,
    prefix_hashes, Blake3Hash, ChainMemo, MemoStats, MsgpackChain, TokenId, HASH_LEN,
};
pub use index::{
    AdoptItem, Adopted, ClearReport, Counters, CycleReport, EvictionPolicy, Finish, L1Config, L1Index,
    L1Stats, LeaseId, ListCursor, Listed, ReadGrant, Reserve, SaltStats, Slot, Whereabouts, WriteDone,
};
pub use key::{kv_rank, mp_kv_rank, validate_model, validate_salt, ChunkHash, KeyScope, ObjectKey};
pub use wire::{decode_key, decode_key_hashed, WireKey};
