//! Object keys (spec C.2): `(chunk_hash, model_name, kv_rank, object_group_id, cache_salt)`.
//!
//! A [`KeyScope`] is everything but the hash: the batch APIs of the index take one scope and
//! many hashes, which is how requests arrive (one model, rank, group and salt per request).

use crate::error::{CoreError, CoreResult};
use crate::hash::{to_hex, HASH_LEN};

/// Longest `cache_salt`, in characters (spec C.1).
pub const MAX_SALT_CHARS: usize = 128;
/// Longest `model_name`, in characters (ours: keeps keys and L2 file names bounded).
pub const MAX_MODEL_CHARS: usize = 1024;

/// A chunk hash of 1 to 32 bytes: blake3 and sha256 give 32, Python's builtin hash 8.
/// Fixed-size so keys are `Copy` and the index allocates nothing per key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash {
    len: u8,
    bytes: [u8; HASH_LEN],
}

impl ChunkHash {
    pub fn new(bytes: &[u8]) -> CoreResult<Self> {
        if bytes.is_empty() || bytes.len() > HASH_LEN {
            return Err(CoreError::InvalidKey(format!(
                "chunk_hash must be 1..={HASH_LEN} bytes, got {}",
                bytes.len()
            )));
        }
        let mut out = [0u8; HASH_LEN];
        out[..bytes.len()].copy_from_slice(bytes);
        Ok(Self { len: bytes.len() as u8, bytes: out })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn hex(&self) -> String {
        to_hex(self.as_bytes())
    }
}

impl From<[u8; HASH_LEN]> for ChunkHash {
    fn from(bytes: [u8; HASH_LEN]) -> Self {
        Self { len: HASH_LEN as u8, bytes }
    }
}

impl std::fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkHash({})", self.hex())
    }
}

/// Checks a `cache_salt`: at most 128 characters, none of `@ / \` or NUL.
pub fn validate_salt(salt: &str) -> CoreResult<()> {
    let chars = salt.chars().count();
    if chars > MAX_SALT_CHARS {
        return Err(CoreError::InvalidKey(format!(
            "cache_salt has {chars} characters, at most {MAX_SALT_CHARS} allowed"
        )));
    }
    if let Some(c) = salt.chars().find(|c| matches!(c, '@' | '/' | '\\' | '\0')) {
        return Err(CoreError::InvalidKey(format!(
            "cache_salt must not contain {c:?} (forbidden: '@', '/', '\\\\', NUL)"
        )));
    }
    Ok(())
}

/// Checks a `model_name`: no `@` (the key separator in L2 names) or NUL, bounded length.
pub fn validate_model(model: &str) -> CoreResult<()> {
    if model.contains('@') || model.contains('\0') {
        return Err(CoreError::InvalidKey(format!("model_name {model:?} must not contain '@' or NUL")));
    }
    let chars = model.chars().count();
    if chars > MAX_MODEL_CHARS {
        return Err(CoreError::InvalidKey(format!(
            "model_name has {chars} characters, at most {MAX_MODEL_CHARS} allowed"
        )));
    }
    Ok(())
}

/// Packs a kv_rank (spec C.2): `world << 24 | global_rank << 16 | local_world << 8 | local_rank`.
/// Every field must fit 8 bits and ranks must be below their world size.
pub fn kv_rank(world_size: u32, global_rank: u32, local_world_size: u32, local_rank: u32) -> CoreResult<u32> {
    for (field, value) in [
        ("world_size", world_size),
        ("global_rank", global_rank),
        ("local_world_size", local_world_size),
        ("local_rank", local_rank),
    ] {
        if value > 255 {
            return Err(CoreError::KvRankOverflow { field, value });
        }
    }
    if world_size == 0 || global_rank >= world_size || local_rank >= local_world_size.max(1) {
        return Err(CoreError::InvalidKey(format!(
            "kv_rank needs 0 <= rank < world size, got rank {global_rank}/{world_size}, \
             local {local_rank}/{local_world_size}"
        )));
    }
    Ok((world_size << 24) | (global_rank << 16) | (local_world_size << 8) | local_rank)
}

/// The MP server's kv_rank for worker `worker_id` of a KV world of `world_size`
/// (local world = world, local rank = worker id).
pub fn mp_kv_rank(world_size: u32, worker_id: u32) -> CoreResult<u32> {
    kv_rank(world_size, worker_id, world_size, worker_id)
}

/// Everything in an object key except the chunk hash; validated on construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyScope {
    model_name: String,
    kv_rank: u32,
    object_group: u32,
    cache_salt: String,
}

impl KeyScope {
    pub fn new(model_name: &str, kv_rank: u32, object_group: u32, cache_salt: &str) -> CoreResult<Self> {
        validate_model(model_name)?;
        validate_salt(cache_salt)?;
        Ok(Self {
            model_name: model_name.to_owned(),
            kv_rank,
            object_group,
            cache_salt: cache_salt.to_owned(),
        })
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }
    pub fn kv_rank(&self) -> u32 {
        self.kv_rank
    }
    pub fn object_group(&self) -> u32 {
        self.object_group
    }
    pub fn cache_salt(&self) -> &str {
        &self.cache_salt
    }
}

/// A full object key: one chunk of one rank of one object group, for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub chunk_hash: ChunkHash,
    pub scope: KeyScope,
}

impl ObjectKey {
    pub fn new(chunk_hash: &[u8], scope: KeyScope) -> CoreResult<Self> {
        Ok(Self { chunk_hash: ChunkHash::new(chunk_hash)?, scope })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_rank_packing() {
        assert_eq!(mp_kv_rank(2, 1).unwrap(), 33_620_481);
        assert_eq!(mp_kv_rank(2, 1).unwrap(), 0x0201_0201);
        assert_eq!(mp_kv_rank(1, 0).unwrap(), 0x0100_0100);
        assert_eq!(mp_kv_rank(255, 254).unwrap(), 0xfffe_fffe);
    }

    #[test]
    fn kv_rank_overflow_is_an_error() {
        assert_eq!(mp_kv_rank(256, 0), Err(CoreError::KvRankOverflow { field: "world_size", value: 256 }));
        assert!(matches!(kv_rank(2, 300, 2, 0), Err(CoreError::KvRankOverflow { .. })));
        assert!(mp_kv_rank(2, 2).is_err());
        assert!(mp_kv_rank(0, 0).is_err());
    }

    #[test]
    fn salt_rules() {
        assert!(validate_salt("").is_ok());
        assert!(validate_salt("tenant-a_1.x").is_ok());
        assert!(validate_salt(&"é".repeat(128)).is_ok());
        assert!(validate_salt(&"a".repeat(129)).is_err());
        for bad in ["a@b", "a/b", "a\\b", "a\0b"] {
            assert!(validate_salt(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn model_rules() {
        assert!(validate_model("meta-llama/Llama-3.1-8B").is_ok());
        assert!(validate_model("m@1").is_err());
        assert!(validate_model(&"m".repeat(1025)).is_err());
        assert!(KeyScope::new("m", 1, 0, "bad/salt").is_err());
    }

    #[test]
    fn chunk_hash_lengths() {
        assert!(ChunkHash::new(&[]).is_err());
        assert!(ChunkHash::new(&[0u8; 33]).is_err());
        let short = ChunkHash::new(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(short.as_bytes(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        // An 8-byte hash is never equal to its zero-padded 32-byte form.
        let mut padded = [0u8; 32];
        padded[..8].copy_from_slice(short.as_bytes());
        assert_ne!(short, ChunkHash::from(padded));
    }
}
