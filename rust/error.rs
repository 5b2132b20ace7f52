//! The one error type of the core. The Python bindings map each variant to one exception
//! class in `python/mod.rs`; nothing else in the crate defines errors.

use thiserror::Error;

/// Every way a core call can fail. Messages are written for the operator who reads them in a
/// log line or an error reply, so they name the offending value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// A key field breaks the rules of spec C.1/C.2 (salt, model name, hash length, ...).
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A kv_rank component does not fit its 8-bit field (spec C.2; LMCache corrupts silently).
    #[error("kv_rank field {field}={value} does not fit in 8 bits (max 255)")]
    KvRankOverflow { field: &'static str, value: u32 },
    /// A token id that is not representable as an unsigned 32-bit integer.
    #[error("token id {value} at position {position} is not in 0..=4294967295")]
    InvalidToken { position: usize, value: i128 },
    /// A configuration or argument value out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The arena cannot satisfy an allocation, even after demand eviction.
    #[error("out of memory: {requested} bytes requested, {free} bytes free")]
    OutOfMemory { requested: u64, free: u64 },
    /// A free or state change that does not match what the index holds (double free, ...).
    #[error("inconsistent request: {0}")]
    Inconsistent(String),
}

pub type CoreResult<T> = Result<T, CoreError>;
