//! The canonical (postcard) encoding of a value, and SHA-256 over it streamed
//! into the hasher without building the encoding in memory. Both write through
//! one buffered postcard flavor: the same bytes as postcard's own, in fewer and
//! cheaper calls.

use postcard::ser_flavors::Flavor;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Where a [`Buffered`] flavor's bytes go, a buffer's worth at a time.
trait Sink {
    fn take(&mut self, bytes: &[u8]);
}

impl Sink for Sha256 {
    fn take(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn take(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Gathers the encoding in a buffer on the stack and hands it to the sink
/// (a hasher, a vector) a buffer's worth at a time: postcard writes a value field
/// by field, a few bytes at a time, and each call to the sink has its own
/// bookkeeping (the hasher's buffering; the vector's capacity check and a call to
/// `memcpy` of a length known only at run time).
/// The buffer is the caller's: postcard takes the flavor by value and hands it
/// back, and a buffer inside it would be copied each way.
struct Buffered<'a, S> {
    sink: S,
    buf: &'a mut [u8; BUF],
    len: usize,
}

/// Big enough that a typical audit record (about 200 bytes) goes to the sink in
/// one call.
const BUF: usize = 512;

impl<S: Sink> Buffered<'_, S> {
    fn flush(&mut self) {
        self.sink.take(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl<S: Sink> Flavor for Buffered<'_, S> {
    type Output = S;

    #[inline(always)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.len == BUF {
            self.flush();
        }
        self.buf[self.len] = data;
        self.len = self.len.saturating_add(1);
        Ok(())
    }

    #[inline(always)]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let end = self.len.saturating_add(data.len());
        if end <= BUF {
            copy_small(&mut self.buf[self.len..end], data);
            self.len = end;
        } else {
            self.flush();
            if data.len() < BUF {
                copy_small(&mut self.buf[..data.len()], data);
                self.len = data.len();
            } else {
                self.sink.take(data);
            }
        }
        Ok(())
    }

    fn finalize(mut self) -> postcard::Result<S> {
        self.flush();
        Ok(self.sink)
    }
}

/// `dst.copy_from_slice(src)`. Most of what postcard writes is a few bytes at a
/// time (a varint, a short name), where `copy_from_slice` of a length known only
/// at run time is a call to `memcpy` each: up to 16 bytes are copied with
/// fixed-size moves instead, two overlapping ones that agree where they overlap.
fn copy_small(dst: &mut [u8], src: &[u8]) {
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

/// SHA-256 of `domain` followed by the postcard encoding of `value`.
pub(crate) fn sha256_of<T: Serialize + ?Sized>(domain: &[u8], value: &T) -> [u8; 32] {
    // The domain goes in the buffer with the encoding: the hasher copies what does
    // not fill a block into its own buffer, once per call.
    let mut buf = [0; BUF];
    let mut flavor = Buffered { sink: Sha256::new(), buf: &mut buf, len: 0 };
    flavor.try_extend(domain).expect("hashing never fails to accept bytes");
    postcard::serialize_with_flavor(value, flavor)
        .expect("hashing never fails to accept bytes")
        .finalize()
        .into()
}

/// `out` followed by the postcard encoding of `value`: the bytes
/// `postcard::to_extend` gives, in fewer calls (see [`Buffered`]). Fails only
/// where postcard's would: a value whose `Serialize` fails (a sequence of unknown
/// length, say).
fn encode_into<T: Serialize + ?Sized>(value: &T, out: Vec<u8>) -> postcard::Result<Vec<u8>> {
    let mut buf = [0; BUF];
    let flavor = Buffered { sink: out, buf: &mut buf, len: 0 };
    postcard::serialize_with_flavor(value, flavor)
}

/// The postcard encoding of `value` (the bytes `postcard::to_stdvec` gives), or
/// why its `Serialize` failed: for values from outside the ledger (openraft's
/// messages).
pub fn try_encode<T: Serialize + ?Sized>(value: &T) -> postcard::Result<Vec<u8>> {
    encode_into(value, Vec::new())
}

/// `out` followed by the postcard encoding of `value`, for values whose encoding
/// cannot fail (the ledger's own types: every length is known).
pub fn encode_onto<T: Serialize + ?Sized>(value: &T, out: Vec<u8>) -> Vec<u8> {
    encode_into(value, out).expect("encoding into a Vec cannot fail")
}

/// The postcard encoding of `value`: the bytes `postcard::to_stdvec` gives.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    encode_onto(value, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn encodes_the_bytes_postcard_does() {
        let long = "x".repeat(300);
        for value in [
            ("acme/search".to_owned(), 42u64, vec![1u8, 2, 3]),
            (String::new(), 1, vec![7u8; BUF - 2]),
            ("y".repeat(200), u64::MAX, long.clone().into_bytes()),
            (long, 0, vec![9u8; 3 * BUF + 5]),
        ] {
            let expected = postcard::to_stdvec(&value).unwrap();
            assert_eq!(encode(&value), expected);
            assert_eq!(try_encode(&value).unwrap(), expected);
            let onto = encode_onto(&value, b"head".to_vec());
            assert_eq!(&onto[..4], b"head");
            assert_eq!(&onto[4..], &expected[..]);
        }
    }

    #[test]
    fn streams_the_same_bytes_as_the_encoding() {
        // Short, one buffer's worth exactly, a long field across the buffer's end,
        // and one field longer than the buffer.
        let long = "x".repeat(300);
        let exact = vec![7u8; BUF - 2];
        for value in [
            ("acme/search".to_owned(), 42u64, vec![1u8, 2, 3]),
            (String::new(), 1, exact),
            ("y".repeat(200), u64::MAX, long.clone().into_bytes()),
            (long, 0, vec![9u8; 1000]),
        ] {
            let mut h = Sha256::new();
            h.update(b"d");
            h.update(postcard::to_stdvec(&value).unwrap());
            let expected: [u8; 32] = h.finalize().into();
            assert_eq!(sha256_of(b"d", &value), expected);
        }
    }
}
