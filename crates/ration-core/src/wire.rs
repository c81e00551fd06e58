//! postcard's wire format, written by the ledger's own serde serializer: the same
//! bytes as `postcard::to_stdvec`, for the encodings and hashes apply and the
//! audit store make of every record and request (decoding stays postcard's).
//!
//! Why not postcard's own serializer: it writes an integer's varint a byte at a
//! time in a loop whose length depends on the value (a time stamp takes six
//! bytes, a count one), then copies it out of a scratch array; with the hasher
//! behind it that was a fifth of hashing an audit record. Here a varint of up to
//! 56 bits is spread into one 8-byte word and stored at once, and every write
//! goes to a buffer on the caller's stack that the sink (a hasher, a vector)
//! receives a buffer's worth at a time.
//!
//! The format, as postcard 1 defines it: unsigned integers above 8 bits as
//! varints (7 bits a byte, least significant first, the top bit set on all but
//! the last); signed ones zigzag-encoded first; `u8`/`i8` as one byte; `bool` as
//! 0 or 1; floats as their little-endian bits; strings and byte strings as a
//! varint length and the bytes; `None` 0, `Some` 1 and the value; an enum
//! variant's index as a varint before its fields; sequences and maps with their
//! length first (it must be known); structs and tuples as their fields in order.
//! Tests hold it to postcard's bytes, here and in the ledger's property test.

use std::fmt::Display;

use serde::ser::{self, Serialize};

/// Where a [`Writer`]'s bytes go, a buffer's worth at a time.
pub(crate) trait Sink {
    fn take(&mut self, bytes: &[u8]);
}

impl Sink for sha2::Sha256 {
    fn take(&mut self, bytes: &[u8]) {
        sha2::Digest::update(self, bytes);
    }
}

impl Sink for Vec<u8> {
    fn take(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The buffer's size: big enough that a typical audit record (about 200 bytes)
/// goes to the sink in one call.
pub(crate) const BUF: usize = 512;

/// The room a varint is written into at once (it uses the first 1 to 8 bytes).
const WORD: usize = 8;

/// Why a value could not be encoded: only values from outside the ledger can
/// fail (a sequence of unknown length, a `Serialize` that fails on its own).
#[derive(Debug)]
pub(crate) enum WireError {
    LengthUnknown,
    Custom(String),
}

impl Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::LengthUnknown => f.write_str("a sequence or map of unknown length"),
            WireError::Custom(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for WireError {}

impl ser::Error for WireError {
    fn custom<T: Display>(msg: T) -> Self {
        WireError::Custom(msg.to_string())
    }
}

impl From<WireError> for postcard::Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::LengthUnknown => postcard::Error::SerializeSeqLengthUnknown,
            WireError::Custom(_) => postcard::Error::SerdeSerCustom,
        }
    }
}

type Result<T = ()> = std::result::Result<T, WireError>;

/// Gathers an encoding in the caller's buffer and hands it to `sink` a buffer's
/// worth at a time. (The buffer is the caller's so that moving a writer does not
/// copy it.)
pub(crate) struct Writer<'a, S> {
    sink: S,
    buf: &'a mut [u8; BUF],
    len: usize,
}

impl<'a, S: Sink> Writer<'a, S> {
    pub(crate) fn new(sink: S, buf: &'a mut [u8; BUF]) -> Self {
        Self { sink, buf, len: 0 }
    }

    /// Writes `value`, as postcard would.
    pub(crate) fn value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        value.serialize(self)
    }

    /// The sink, with every byte written handed to it.
    pub(crate) fn finish(mut self) -> S {
        self.flush();
        self.sink
    }

    // Out of line: the writes that call it stay small enough to inline.
    #[cold]
    #[inline(never)]
    fn flush(&mut self) {
        self.sink.take(&self.buf[..self.len]);
        self.len = 0;
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
        if self.len >= BUF {
            self.flush();
        }
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len = self.len.wrapping_add(1);
        }
    }

    #[inline(always)]
    pub(crate) fn bytes(&mut self, data: &[u8]) {
        let end = self.len.saturating_add(data.len());
        if end <= BUF {
            copy_small(&mut self.buf[self.len..end], data);
            self.len = end;
            return;
        }
        self.flush();
        if data.len() < BUF {
            copy_small(&mut self.buf[..data.len()], data);
            self.len = data.len();
        } else {
            self.sink.take(data);
        }
    }

    /// `v` as a varint. Up to 56 bits (eight bytes of varint), each 7-bit group
    /// moves to its own byte in one word, the continuation bits are set on all
    /// but the last used byte, and the word is stored whole; only the used bytes
    /// count as written.
    #[inline(always)]
    fn varint(&mut self, v: u64) {
        if v < 0x80 {
            return self.byte(v as u8);
        }
        if v >= 1 << 56 {
            return self.varint_long(u128::from(v));
        }
        if self.len > BUF - WORD {
            self.flush();
        }
        let spread = (v & 0x7f)
            | ((v << 1) & 0x7f00)
            | ((v << 2) & 0x7f_0000)
            | ((v << 3) & 0x7f00_0000)
            | ((v << 4) & 0x7f_0000_0000)
            | ((v << 5) & 0x7f00_0000_0000)
            | ((v << 6) & 0x7f_0000_0000_0000)
            | ((v << 7) & 0x7f00_0000_0000_0000);
        // 2 to 8 bytes: the highest set bit's group is the last byte.
        // (v is at least 0x80 and below 2^56: `used` is 2 to 8, the shift 8 to 56.)
        let used = 64u32.wrapping_sub(v.leading_zeros()).div_ceil(7);
        let below_last = 1u64.wrapping_shl(used.wrapping_sub(1).wrapping_mul(8)).wrapping_sub(1);
        let continuation = 0x8080_8080_8080_8080u64 & below_last;
        if let Some(word) = self.buf.get_mut(self.len..self.len.wrapping_add(WORD)) {
            word.copy_from_slice(&(spread | continuation).to_le_bytes());
            self.len = self.len.wrapping_add(used as usize);
        }
    }

    /// A varint of any width, a byte at a time (values of 57 bits and more).
    fn varint_long(&mut self, mut v: u128) {
        while v >= 0x80 {
            self.byte((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    fn length(&mut self, len: Option<usize>) -> Result {
        self.varint(len.ok_or(WireError::LengthUnknown)? as u64);
        Ok(())
    }
}

/// `dst.copy_from_slice(src)`. Most of what is written is a few bytes at a time
/// (a short name), where `copy_from_slice` of a length known only at run time is a
/// call to `memcpy` each: up to 16 bytes are copied with fixed-size moves
/// instead, two overlapping ones that agree where they overlap.
pub(crate) fn copy_small(dst: &mut [u8], src: &[u8]) {
    fn two<const N: usize>(dst: &mut [u8], src: &[u8]) {
        let n = src.len();
        let (head, tail) = (n.min(N), n.saturating_sub(N));
        if let (Some(d), Some(s)) = (dst.get_mut(..head), src.get(..head)) {
            if let (Ok(d), Ok(s)) = (<&mut [u8; N]>::try_from(d), <&[u8; N]>::try_from(s)) {
                *d = *s;
            }
        }
        if let (Some(d), Some(s)) = (dst.get_mut(tail..), src.get(tail..)) {
            if let (Ok(d), Ok(s)) = (<&mut [u8; N]>::try_from(d), <&[u8; N]>::try_from(s)) {
                *d = *s;
            }
        }
    }
    debug_assert_eq!(dst.len(), src.len());
    match src.len() {
        0 => {}
        // A loop here would be turned back into a call to `memcpy`.
        n @ 1..=3 => {
            for i in [0, n / 2, n.wrapping_sub(1)] {
                if let (Some(d), Some(s)) = (dst.get_mut(i), src.get(i)) {
                    *d = *s;
                }
            }
        }
        4..=7 => two::<4>(dst, src),
        8..=16 => two::<8>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

impl<S: Sink> ser::Serializer for &mut Writer<'_, S> {
    type Ok = ();
    type Error = WireError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }
    fn serialize_bool(self, v: bool) -> Result {
        self.byte(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result {
        self.byte(v.to_le_bytes()[0]);
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Result {
        self.varint(zigzag(i64::from(v)));
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Result {
        self.varint(zigzag(i64::from(v)));
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Result {
        self.varint(zigzag(v));
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result {
        self.varint_long(((v << 1) ^ (v >> 127)) as u128);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result {
        self.byte(v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Result {
        self.varint(u64::from(v));
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Result {
        self.varint(u64::from(v));
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Result {
        self.varint(v);
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result {
        self.varint_long(v);
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result {
        self.bytes(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result {
        self.bytes(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result {
        self.serialize_bytes(v.as_bytes())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result {
        self.varint(v.len() as u64);
        self.bytes(v);
        Ok(())
    }
    fn serialize_none(self) -> Result {
        self.byte(0);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result {
        self.byte(1);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        Ok(())
    }
    fn serialize_unit_variant(self, _name: &'static str, index: u32, _v: &'static str) -> Result {
        self.varint(u64::from(index));
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result {
        self.varint(u64::from(index));
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self> {
        self.length(len)?;
        Ok(self)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self> {
        self.varint(u64::from(index));
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self> {
        self.length(len)?;
        Ok(self)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self> {
        self.varint(u64::from(index));
        Ok(self)
    }
    fn collect_str<T: Display + ?Sized>(self, value: &T) -> Result {
        self.serialize_str(&value.to_string())
    }
}

/// The compound forms: each element or field in order, nothing around them.
macro_rules! compound {
    ($trait:ident, $method:ident $(, $key:ident)?) => {
        impl<S: Sink> ser::$trait for &mut Writer<'_, S> {
            type Ok = ();
            type Error = WireError;
            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $($key: &'static str,)?
                value: &T,
            ) -> Result {
                $(let _ = $key;)?
                value.serialize(&mut **self)
            }
            fn end(self) -> Result {
                Ok(())
            }
        }
    };
}

compound!(SerializeSeq, serialize_element);
compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);
compound!(SerializeStruct, serialize_field, key);
compound!(SerializeStructVariant, serialize_field, key);

impl<S: Sink> ser::SerializeMap for &mut Writer<'_, S> {
    type Ok = ();
    type Error = WireError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;

    use super::*;

    fn ours<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
        let mut buf = [0; BUF];
        let mut w = Writer::new(Vec::new(), &mut buf);
        w.value(value).unwrap();
        w.finish()
    }

    fn same<T: Serialize + ?Sized + std::fmt::Debug>(value: &T) {
        assert_eq!(ours(value), postcard::to_stdvec(value).unwrap(), "{value:?}");
    }

    #[test]
    fn copies_small_slices_exactly() {
        let src: Vec<u8> = (1..=40).collect();
        for n in 0..=40 {
            let mut dst = vec![0u8; n];
            copy_small(&mut dst, &src[..n]);
            assert_eq!(dst, &src[..n], "{n} bytes");
        }
    }

    #[test]
    fn integers_at_every_varint_length_as_postcard_writes_them() {
        // Each power of two, one below and one above, in every width and sign.
        let mut u = vec![0u64, u64::MAX, u64::MAX - 1];
        for bit in 0..64 {
            let p = 1u64 << bit;
            u.extend([p - 1, p, p + 1]);
        }
        for &v in &u {
            same(&v);
            same(&(v as u32));
            same(&(v as u16));
            same(&(v as u8));
            same(&(v as usize));
            same(&(v as i64));
            same(&(v as i32));
            same(&(v as i16));
            same(&(v as i8));
            same(&(v as i64).wrapping_neg());
            same(&(u128::from(v) << 64 | u128::from(v)));
            same(&(u128::from(v) as i128));
            same(&(u128::from(v) as i128).wrapping_neg());
        }
        for v in [i64::MIN, i64::MAX, i64::MIN + 1] {
            same(&v);
        }
        same(&u128::MAX);
        same(&i128::MIN);
        same(&i128::MAX);
        same(&(1.5f32, -0.0f64, f64::NAN.to_bits(), true, false, 'x', 'é', '🦀'));
    }

    #[derive(Serialize, Debug)]
    enum Shape {
        Unit,
        New(u64),
        Tuple(i32, String),
        Named { a: Option<u16>, b: Vec<u8> },
    }

    #[derive(Serialize, Debug)]
    struct Record {
        id: u64,
        name: String,
        shapes: Vec<Shape>,
        map: BTreeMap<String, i64>,
        unit: (),
        pair: (u8, Option<String>),
        #[serde(with = "serde_bytes_like")]
        raw: Vec<u8>,
    }

    /// Bytes serialized as a byte string, not a sequence.
    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(
            v: &[u8],
            s: S,
        ) -> std::result::Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
    }

    #[test]
    fn structures_as_postcard_writes_them_across_the_buffers_end() {
        // Sizes that put fields on, just before and across the buffer's end, and
        // fields longer than the buffer.
        for n in [0, 1, 100, BUF - 20, BUF - 9, BUF - 1, BUF, BUF + 1, 3 * BUF + 5] {
            let r = Record {
                id: 1 << 50,
                name: "n".repeat(n),
                shapes: vec![
                    Shape::Unit,
                    Shape::New(300),
                    Shape::Tuple(-5, "t".repeat(n / 2)),
                    Shape::Named { a: Some(40_000), b: vec![7; n] },
                    Shape::Named { a: None, b: vec![] },
                ],
                map: (0..(n as i64 % 40)).map(|i| (format!("k{i}"), i * 1_000_003)).collect(),
                unit: (),
                pair: (9, Some("p".repeat(n % 30))),
                raw: vec![3; n],
            };
            same(&r);
            // Varints on every offset near the buffer's end.
            let ints: Vec<u64> =
                (0..(BUF as u64 + 40)).map(|i| (i * 0x0123_4567_89ab) >> (i % 64)).collect();
            same(&(("x".repeat(n % 13)), &ints));
        }
    }

    #[test]
    fn a_sequence_of_unknown_length_is_refused_as_postcard_refuses_it() {
        struct Unknown;
        impl Serialize for Unknown {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let seq = s.serialize_seq(None)?;
                seq.end()
            }
        }
        let mut buf = [0; BUF];
        let mut w = Writer::new(Vec::new(), &mut buf);
        assert!(matches!(w.value(&Unknown), Err(WireError::LengthUnknown)));
        assert!(postcard::to_stdvec(&Unknown).is_err());
    }
}
