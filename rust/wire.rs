//! The wire form of a request key (`IPCCacheServerKey`, spec B.3), decoded in one pass.
//!
//! A key is a msgpack map keyed by field name. Its `token_ids` array is most of its bytes (a
//! 32k-token prompt is ~135 KB), and walking it is serial: decoding the key with msgspec (which
//! must skip the array to reach the fields after it) and then parsing the array again to hash
//! it walked it twice. Here the map is read once: the ids come out parsed, next to the array's
//! raw bytes (which the session compares to reuse its cached chain).
//!
//! Semantics follow the Python struct: unknown fields are skipped, `cache_salt`,
//! `request_configs` and `num_kv_readers` have defaults, every other field is required;
//! integers are any msgpack integer, strings must be UTF-8. `request_configs` is returned as
//! its raw bytes (a map, or nil) for the caller to decode.

use rmp::Marker;

use crate::error::{CoreError, CoreResult};
use crate::hash::{msgpack_tokens_prefix, ChainMemo, MsgpackChain};

/// A decoded key; strings and raw spans borrow from the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireKey<'a> {
    pub model_name: &'a str,
    pub world_size: i128,
    pub worker_id: Option<i128>,
    /// The msgpack bytes of `token_ids`, as sent.
    pub token_span: &'a [u8],
    /// The ids, parsed (empty when the key was decoded with [`decode_key_hashed`]).
    pub token_ids: Vec<u32>,
    /// The ids' chunk hashes, when decoded with [`decode_key_hashed`].
    pub chain: Option<MsgpackChain>,
    pub start: i128,
    pub end: i128,
    pub request_id: &'a str,
    pub cache_salt: &'a str,
    /// The msgpack bytes of `request_configs` when it is not nil.
    pub request_configs: Option<&'a [u8]>,
    pub num_kv_readers: i128,
}

/// Nesting allowed inside skipped values (unknown fields, request_configs).
const MAX_DEPTH: usize = 64;

fn bad(what: impl std::fmt::Display) -> CoreError {
    CoreError::InvalidArgument(format!("key: {what}"))
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> CoreResult<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| bad("truncated"))?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn uint(&mut self, n: usize) -> CoreResult<u64> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn marker(&mut self) -> CoreResult<Marker> {
        Ok(Marker::from_u8(self.take(1)?[0]))
    }

    /// An integer of any msgpack width, or None for a non-integer marker.
    fn int_of(&mut self, m: Marker) -> CoreResult<Option<i128>> {
        Ok(Some(match m {
            Marker::FixPos(v) => i128::from(v),
            Marker::FixNeg(v) => i128::from(v),
            Marker::U8 => i128::from(self.uint(1)?),
            Marker::U16 => i128::from(self.uint(2)?),
            Marker::U32 => i128::from(self.uint(4)?),
            Marker::U64 => i128::from(self.uint(8)?),
            Marker::I8 => i128::from(self.uint(1)? as u8 as i8),
            Marker::I16 => i128::from(self.uint(2)? as u16 as i16),
            Marker::I32 => i128::from(self.uint(4)? as u32 as i32),
            Marker::I64 => i128::from(self.uint(8)? as i64),
            _ => return Ok(None),
        }))
    }

    fn int(&mut self, field: &str) -> CoreResult<i128> {
        let m = self.marker()?;
        self.int_of(m)?.ok_or_else(|| bad(format!("`{field}` must be an int")))
    }

    fn opt_int(&mut self, field: &str) -> CoreResult<Option<i128>> {
        match self.marker()? {
            Marker::Null => Ok(None),
            m => Ok(Some(self.int_of(m)?.ok_or_else(|| bad(format!("`{field}` must be an int or nil")))?)),
        }
    }

    fn str_len(&mut self, m: Marker) -> CoreResult<Option<usize>> {
        Ok(Some(match m {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.uint(1)? as usize,
            Marker::Str16 => self.uint(2)? as usize,
            Marker::Str32 => self.uint(4)? as usize,
            _ => return Ok(None),
        }))
    }

    fn str(&mut self, field: &str) -> CoreResult<&'a str> {
        let m = self.marker()?;
        let n = self.str_len(m)?.ok_or_else(|| bad(format!("`{field}` must be a str")))?;
        std::str::from_utf8(self.take(n)?).map_err(|_| bad(format!("`{field}` is not valid UTF-8")))
    }

    /// Skips one value of any type.
    fn skip(&mut self, depth: usize) -> CoreResult<()> {
        if depth > MAX_DEPTH {
            return Err(bad("nested too deeply"));
        }
        let m = self.marker()?;
        if self.int_of(m)?.is_some() {
            return Ok(());
        }
        if let Some(n) = self.str_len(m)? {
            self.take(n)?;
            return Ok(());
        }
        let (items, bytes) = match m {
            Marker::Null | Marker::True | Marker::False => (0, 0),
            Marker::F32 => (0, 4),
            Marker::F64 => (0, 8),
            Marker::Bin8 => (0, self.uint(1)? as usize),
            Marker::Bin16 => (0, self.uint(2)? as usize),
            Marker::Bin32 => (0, self.uint(4)? as usize),
            Marker::FixArray(n) => (usize::from(n), 0),
            Marker::Array16 => (self.uint(2)? as usize, 0),
            Marker::Array32 => (self.uint(4)? as usize, 0),
            Marker::FixMap(n) => (2 * usize::from(n), 0),
            Marker::Map16 => (2 * self.uint(2)? as usize, 0),
            Marker::Map32 => (2 * self.uint(4)? as usize, 0),
            Marker::FixExt1 => (0, 2),
            Marker::FixExt2 => (0, 3),
            Marker::FixExt4 => (0, 5),
            Marker::FixExt8 => (0, 9),
            Marker::FixExt16 => (0, 17),
            Marker::Ext8 => (0, self.uint(1)? as usize + 1),
            Marker::Ext16 => (0, self.uint(2)? as usize + 1),
            Marker::Ext32 => (0, self.uint(4)? as usize + 1),
            _ => return Err(bad("invalid msgpack")),
        };
        self.take(bytes)?;
        if items > self.buf.len() - self.at {
            return Err(bad("truncated")); // every item takes at least a byte
        }
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Ok(())
    }
}

/// Decodes one key frame (exactly one msgpack map, nothing after it).
pub fn decode_key(frame: &[u8]) -> CoreResult<WireKey<'_>> {
    decode(frame, None)
}

/// Like [`decode_key`], but `token_ids` comes out as its chunk hashes
/// ([`ChainMemo::msgpack_chain`]): the ids of chunks the memo holds are not parsed. With
/// `record` false the new chunks are not recorded ([`ChainMemo::record`] is the caller's).
pub fn decode_key_hashed<'a>(
    frame: &'a [u8],
    memo: &ChainMemo,
    chunk_size: usize,
    record: bool,
) -> CoreResult<WireKey<'a>> {
    decode(frame, Some((memo, chunk_size, record)))
}

fn decode<'a>(frame: &'a [u8], hashed: Option<(&ChainMemo, usize, bool)>) -> CoreResult<WireKey<'a>> {
    let mut r = Reader { buf: frame, at: 0 };
    let fields = match r.marker()? {
        Marker::FixMap(n) => usize::from(n),
        Marker::Map16 => r.uint(2)? as usize,
        Marker::Map32 => r.uint(4)? as usize,
        _ => return Err(bad("expected a map (IPCCacheServerKey)")),
    };
    let mut model_name = None;
    let mut world_size = None;
    let mut worker_id = None;
    let mut tokens = None;
    let mut start = None;
    let mut end = None;
    let mut request_id = None;
    let mut cache_salt = "";
    let mut request_configs = None;
    let mut num_kv_readers = 0;
    for _ in 0..fields {
        let name = r.str("field name")?;
        match name {
            "model_name" => model_name = Some(r.str(name)?),
            "world_size" => world_size = Some(r.int(name)?),
            "worker_id" => worker_id = Some(r.opt_int(name)?),
            "token_ids" => {
                tokens = Some(match hashed {
                    None => {
                        let (ids, used) = msgpack_tokens_prefix(&frame[r.at..])?;
                        (r.take(used)?, ids, None)
                    }
                    Some((memo, chunk, record)) => {
                        let c = if record {
                            memo.msgpack_chain(&frame[r.at..], chunk)?
                        } else {
                            memo.msgpack_chain_unrecorded(&frame[r.at..], chunk)?
                        };
                        (r.take(c.used)?, Vec::new(), Some(c))
                    }
                });
            }
            "start" => start = Some(r.int(name)?),
            "end" => end = Some(r.int(name)?),
            "request_id" => request_id = Some(r.str(name)?),
            "cache_salt" => cache_salt = r.str(name)?,
            "request_configs" => {
                let at = r.at;
                request_configs = match r.marker()? {
                    Marker::Null => None,
                    Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                        r.at = at;
                        r.skip(0)?;
                        Some(&frame[at..r.at])
                    }
                    _ => return Err(bad("`request_configs` must be a map or nil")),
                };
            }
            "num_kv_readers" => num_kv_readers = r.int(name)?,
            _ => r.skip(0)?,
        }
    }
    if r.at != frame.len() {
        return Err(bad("trailing bytes after the map"));
    }
    let missing = |f: &str| bad(format!("missing required field `{f}`"));
    let (token_span, token_ids, chain) = tokens.ok_or_else(|| missing("token_ids"))?;
    Ok(WireKey {
        model_name: model_name.ok_or_else(|| missing("model_name"))?,
        world_size: world_size.ok_or_else(|| missing("world_size"))?,
        worker_id: worker_id.ok_or_else(|| missing("worker_id"))?,
        token_span,
        token_ids,
        chain,
        start: start.ok_or_else(|| missing("start"))?,
        end: end.ok_or_else(|| missing("end"))?,
        request_id: request_id.ok_or_else(|| missing("request_id"))?,
        cache_salt,
        request_configs,
        num_kv_readers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_(out: &mut Vec<u8>, s: &str) {
        rmp::encode::write_str(out, s).unwrap();
    }

    type Field<'a> = (&'a str, &'a dyn Fn(&mut Vec<u8>));

    fn key(fields: &[Field<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_map_len(&mut out, fields.len() as u32).unwrap();
        for (name, value) in fields {
            str_(&mut out, name);
            value(&mut out);
        }
        out
    }

    fn int(v: i64) -> impl Fn(&mut Vec<u8>) {
        move |o| {
            rmp::encode::write_sint(o, v).unwrap();
        }
    }

    fn text(v: &'static str) -> impl Fn(&mut Vec<u8>) {
        move |o| str_(o, v)
    }

    fn tokens(n: u32) -> impl Fn(&mut Vec<u8>) {
        move |o| {
            rmp::encode::write_array_len(o, n).unwrap();
            for i in 0..n {
                rmp::encode::write_uint(o, u64::from(i * 1000)).unwrap();
            }
        }
    }

    #[test]
    fn decodes_every_field_and_defaults() {
        let nil = |o: &mut Vec<u8>| rmp::encode::write_nil(o).unwrap();
        let cfg = |o: &mut Vec<u8>| {
            rmp::encode::write_map_len(o, 1).unwrap();
            str_(o, "x");
            rmp::encode::write_array_len(o, 2).unwrap();
            rmp::encode::write_f64(o, 1.5).unwrap();
            rmp::encode::write_bin(o, b"ab").unwrap();
        };
        let (m, ws, tk, s, e, rid) = (text("m"), int(2), tokens(300), int(0), int(512), text("r"));
        let (wid, salt, readers, extra) = (int(1), text("salt"), int(3), int(-7));
        let raw = key(&[
            ("model_name", &m),
            ("world_size", &ws),
            ("worker_id", &wid),
            ("token_ids", &tk),
            ("start", &s),
            ("end", &e),
            ("request_id", &rid),
            ("cache_salt", &salt),
            ("request_configs", &cfg),
            ("num_kv_readers", &readers),
            ("future_field", &extra),
        ]);
        let k = decode_key(&raw).unwrap();
        assert_eq!((k.model_name, k.world_size, k.worker_id), ("m", 2, Some(1)));
        assert_eq!((k.start, k.end, k.request_id, k.cache_salt), (0, 512, "r", "salt"));
        assert_eq!(k.num_kv_readers, 3);
        assert_eq!(k.token_ids.len(), 300);
        assert_eq!(k.token_ids[299], 299_000);
        assert_eq!(crate::hash::msgpack_tokens(k.token_span).unwrap(), k.token_ids);
        assert_eq!(k.request_configs.unwrap()[0], 0x81);

        let raw = key(&[
            ("token_ids", &tk),
            ("worker_id", &nil),
            ("model_name", &m),
            ("world_size", &ws),
            ("start", &s),
            ("end", &e),
            ("request_id", &rid),
            ("request_configs", &nil),
        ]);
        let k = decode_key(&raw).unwrap();
        assert_eq!((k.worker_id, k.cache_salt, k.num_kv_readers, k.request_configs), (None, "", 0, None));
    }

    #[test]
    fn refuses_what_the_struct_refuses() {
        let (m, ws, tk, s, e, rid) = (text("m"), int(2), tokens(3), int(0), int(512), text("r"));
        let wid = int(0);
        let full = [
            ("model_name", &m as &dyn Fn(&mut Vec<u8>)) as Field<'_>,
            ("world_size", &ws),
            ("worker_id", &wid),
            ("token_ids", &tk),
            ("start", &s),
            ("end", &e),
            ("request_id", &rid),
        ];
        assert!(decode_key(&key(&full)).is_ok());
        for skip in 0..full.len() {
            let fields: Vec<_> =
                full.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, f)| *f).collect();
            let err = decode_key(&key(&fields)).unwrap_err().to_string();
            assert!(err.contains("missing required field"), "{err}");
        }
        let mut wrong = full;
        wrong[1] = ("world_size", &m);
        assert!(decode_key(&key(&wrong)).unwrap_err().to_string().contains("`world_size` must be an int"));
        let raw = key(&full);
        assert!(decode_key(&raw[..raw.len() - 1]).is_err());
        let mut trailing = raw.clone();
        trailing.push(0xc0);
        assert!(decode_key(&trailing).is_err());
        assert!(decode_key(&[0x90]).is_err());
        assert!(decode_key(&[]).is_err());
        let neg = |o: &mut Vec<u8>| {
            rmp::encode::write_array_len(o, 1).unwrap();
            rmp::encode::write_sint(o, -1).unwrap();
        };
        let mut bad_tokens = full;
        bad_tokens[3] = ("token_ids", &neg);
        assert!(matches!(decode_key(&key(&bad_tokens)), Err(CoreError::InvalidToken { .. })));
        let deep = |o: &mut Vec<u8>| {
            for _ in 0..100 {
                rmp::encode::write_array_len(o, 1).unwrap();
            }
            rmp::encode::write_nil(o).unwrap();
        };
        let mut nested = full.to_vec();
        nested.push(("unknown", &deep));
        assert!(decode_key(&key(&nested)).unwrap_err().to_string().contains("nested too deeply"));
    }
}
