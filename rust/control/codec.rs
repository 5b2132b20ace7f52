//! msgpack of the frames the control plane reads and writes (spec B.2): the operation frame,
//! the scalar arguments of control operations, replies and error replies. Keys are decoded by
//! [`crate::wire`]. A frame holds exactly one value, as msgspec decodes it: trailing bytes are
//! an error.

use rmp::decode::{self, NumValueReadError};
use rmp::encode;
use rmp::Marker;

/// An operation frame: a legacy integer id or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpName<'a> {
    Id(i128),
    Name(&'a str),
}

fn whole<T>(value: T, rest: &[u8]) -> Result<T, String> {
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(format!("{} trailing byte(s) after the value", rest.len()))
    }
}

fn read_int(frame: &[u8]) -> Result<Option<(i128, &[u8])>, String> {
    let mut rd = frame;
    let marker = decode::read_marker(&mut rd).map_err(|_| "empty frame".to_string())?;
    let mut cur = frame;
    let v: i128 = match marker {
        Marker::FixPos(_) | Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => {
            i128::from(decode::read_int::<u64, _>(&mut cur).map_err(num_err)?)
        }
        Marker::FixNeg(_) | Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => {
            i128::from(decode::read_int::<i64, _>(&mut cur).map_err(num_err)?)
        }
        _ => return Ok(None),
    };
    Ok(Some((v, cur)))
}

fn num_err(e: NumValueReadError) -> String {
    format!("bad integer: {e}")
}

fn read_str(frame: &[u8]) -> Result<Option<(&str, &[u8])>, String> {
    match decode::read_str_from_slice(frame) {
        Ok((s, rest)) => Ok(Some((s, rest))),
        Err(decode::DecodeStringError::TypeMismatch(_)) => Ok(None),
        Err(decode::DecodeStringError::InvalidUtf8(..)) => Err("invalid UTF-8 in a string".into()),
        Err(e) => Err(format!("bad string: {e}")),
    }
}

fn type_name(frame: &[u8]) -> &'static str {
    match frame.first().map(|&b| Marker::from_u8(b)) {
        None => "nothing",
        Some(Marker::Null) => "nil",
        Some(Marker::True | Marker::False) => "a bool",
        Some(Marker::F32 | Marker::F64) => "a float",
        Some(Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32) => "a str",
        Some(Marker::Bin8 | Marker::Bin16 | Marker::Bin32) => "bytes",
        Some(Marker::FixArray(_) | Marker::Array16 | Marker::Array32) => "an array",
        Some(Marker::FixMap(_) | Marker::Map16 | Marker::Map32) => "a map",
        Some(_) => "an integer or other value",
    }
}

/// The operation frame.
pub fn op_name(frame: &[u8]) -> Result<OpName<'_>, String> {
    if let Some((v, rest)) = read_int(frame)? {
        return whole(OpName::Id(v), rest);
    }
    if let Some((s, rest)) = read_str(frame)? {
        return whole(OpName::Name(s), rest);
    }
    Err(format!("expected an int or str, got {}", type_name(frame)))
}

pub fn arg_str(frame: &[u8]) -> Result<&str, String> {
    match read_str(frame)? {
        Some((s, rest)) => whole(s, rest),
        None => Err(format!("expected a str, got {}", type_name(frame))),
    }
}

pub fn arg_int(frame: &[u8]) -> Result<i128, String> {
    match read_int(frame)? {
        Some((v, rest)) => whole(v, rest),
        None => Err(format!("expected an int, got {}", type_name(frame))),
    }
}

pub fn arg_opt_int(frame: &[u8]) -> Result<Option<i128>, String> {
    if frame == [0xc0] {
        return Ok(None);
    }
    match read_int(frame)? {
        Some((v, rest)) => whole(Some(v), rest),
        None => Err(format!("expected an int or nil, got {}", type_name(frame))),
    }
}

pub fn arg_bool(frame: &[u8]) -> Result<bool, String> {
    match frame {
        [0xc3] => Ok(true),
        [0xc2] => Ok(false),
        _ => Err(format!("expected a bool, got {}", type_name(frame))),
    }
}

/// A float (msgspec also takes an integer for a float).
pub fn arg_float(frame: &[u8]) -> Result<f64, String> {
    if let Some((v, rest)) = read_int(frame)? {
        return whole(v as f64, rest);
    }
    let mut cur = frame;
    match frame.first().map(|&b| Marker::from_u8(b)) {
        Some(Marker::F32) => {
            let v = decode::read_f32(&mut cur).map_err(|e| e.to_string())?;
            whole(f64::from(v), cur)
        }
        Some(Marker::F64) => {
            let v = decode::read_f64(&mut cur).map_err(|e| e.to_string())?;
            whole(v, cur)
        }
        _ => Err(format!("expected a float, got {}", type_name(frame))),
    }
}

// Writes to a Vec never fail: the `expect`s below cannot fire.

pub fn nil() -> Vec<u8> {
    vec![0xc0]
}

pub fn boolean(v: bool) -> Vec<u8> {
    vec![if v { 0xc3 } else { 0xc2 }]
}

pub fn uint(v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    encode::write_uint(&mut out, v).expect("vec write");
    out
}

pub fn opt_uint(v: Option<u64>) -> Vec<u8> {
    v.map_or_else(nil, uint)
}

pub fn string(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 5);
    encode::write_str(&mut out, s).expect("vec write");
    out
}

pub fn empty_array() -> Vec<u8> {
    vec![0x90]
}

/// The 4th frame of an error reply: `{"error": {"code", "message", "op"}}` (docs/protocol.md).
pub fn error_body(code: &str, message: &str, op: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + code.len() + op.len() + 32);
    encode::write_map_len(&mut out, 1).expect("vec write");
    encode::write_str(&mut out, "error").expect("vec write");
    encode::write_map_len(&mut out, 3).expect("vec write");
    for (k, v) in [("code", code), ("message", message), ("op", op)] {
        encode::write_str(&mut out, k).expect("vec write");
        encode::write_str(&mut out, v).expect("vec write");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_frames() {
        assert_eq!(op_name(&[0x08]), Ok(OpName::Id(8)));
        assert_eq!(op_name(&uint(300)), Ok(OpName::Id(300)));
        assert_eq!(op_name(&[0xff]), Ok(OpName::Id(-1)));
        assert_eq!(op_name(&string("lookup")), Ok(OpName::Name("lookup")));
        assert!(op_name(&[]).is_err());
        assert!(op_name(&[0xc3]).unwrap_err().contains("bool"));
        assert!(op_name(&[0x08, 0x00]).unwrap_err().contains("trailing"));
        assert!(op_name(&[0xa2, 0xff, 0xfe]).unwrap_err().contains("UTF-8"));
        assert!(op_name(&[0xa5, b'a']).is_err(), "truncated str");
    }

    #[test]
    fn scalar_args() {
        assert_eq!(arg_opt_int(&[0xc0]), Ok(None));
        assert_eq!(arg_opt_int(&[0x07]), Ok(Some(7)));
        assert_eq!(arg_bool(&[0xc3]), Ok(true));
        assert!(arg_bool(&[0x01]).is_err());
        assert_eq!(arg_float(&[0x02]), Ok(2.0));
        let mut f = Vec::new();
        encode::write_f64(&mut f, 0.5).unwrap();
        assert_eq!(arg_float(&f), Ok(0.5));
        assert_eq!(arg_str(&string("r")), Ok("r"));
        assert!(arg_int(&string("r")).is_err());
        assert_eq!(
            arg_int(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok(i128::from(u64::MAX))
        );
    }

    #[test]
    fn replies() {
        assert_eq!(opt_uint(None), vec![0xc0]);
        assert_eq!(opt_uint(Some(3)), vec![0x03]);
        assert_eq!(string("OK"), b"\xa2OK".to_vec());
        let body = error_body("bad_frame", "m", "lookup");
        assert_eq!(body[0], 0x81);
    }
}
