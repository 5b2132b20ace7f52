//! Chained chunk hashing (spec C.1).
//!
//! Only complete chunks are addressed. With `C` tokens per chunk, chunk `i` hashes to
//! `h_i = blake3(h_{i-1} || be_u32(t_{iC}) || ... || be_u32(t_{iC+C-1}))` with `h_{-1}` =
//! [`none_hash`], so a chunk's hash names its whole prefix. `none_hash` is the same function
//! applied to the integer 0 (8-byte big-endian) and the single token 0.

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

/// `blake3(prev || be_u32 tokens)` for validated tokens. `buf` is reused between calls.
fn hash_one<T: TokenId>(prev: &[u8], tokens: &[T], buf: &mut Vec<u8>) -> Blake3Hash {
    buf.resize(prev.len() + 4 * tokens.len(), 0);
    let (head, body) = buf.split_at_mut(prev.len());
    head.copy_from_slice(prev);
    for (out, &t) in body.chunks_exact_mut(4).zip(tokens) {
        out.copy_from_slice(&t.as_u32().to_be_bytes());
    }
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
    if chunk_size == 0 {
        return Err(CoreError::InvalidArgument("chunk_size must be > 0".into()));
    }
    let n = tokens.len() / chunk_size;
    validate(&tokens[..n * chunk_size])?;
    let mut out = Vec::with_capacity(n);
    let mut scratch = Vec::with_capacity(HASH_LEN + 4 * chunk_size);
    let mut last = *prev;
    for chunk in tokens.chunks_exact(chunk_size) {
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
    let end = end.map_or(tokens.len(), |e| e.min(tokens.len()));
    let mut all = hash_chunks(&none_hash(), &tokens[..end], chunk_size)?;
    let first = (start / chunk_size).min(all.len());
    all.drain(..first);
    Ok(all)
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
/// the bytes the array took. Parsing is serial (each element's width decides where the next
/// starts): about 7 ns an id on the 2-core test VM, as much as hashing them.
pub fn msgpack_tokens_prefix(raw: &[u8]) -> CoreResult<(Vec<u32>, usize)> {
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
