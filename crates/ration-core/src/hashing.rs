//! SHA-256 over the canonical (postcard) encoding of a value, streamed into the
//! hasher without building the encoding in memory.

use postcard::ser_flavors::Flavor;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Gathers the encoding in a block-sized buffer on the stack and hands the hasher
/// whole blocks: postcard writes a value field by field, a few bytes at a time, and
/// each `update` call has its own bookkeeping.
/// The buffer is the caller's: postcard takes the flavor by value and hands it
/// back, and a buffer inside it would be copied each way.
struct HashFlavor<'a> {
    hasher: Sha256,
    buf: &'a mut [u8; BUF],
    len: usize,
}

/// Big enough that a typical audit record (about 200 bytes) goes to the hasher in
/// one call.
const BUF: usize = 512;

impl HashFlavor<'_> {
    fn flush(&mut self) {
        self.hasher.update(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Flavor for HashFlavor<'_> {
    type Output = Sha256;

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
                self.buf[..data.len()].copy_from_slice(data);
                self.len = data.len();
            } else {
                self.hasher.update(data);
            }
        }
        Ok(())
    }

    fn finalize(mut self) -> postcard::Result<Sha256> {
        self.flush();
        Ok(self.hasher)
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
    let mut flavor = HashFlavor { hasher: Sha256::new(), buf: &mut buf, len: 0 };
    flavor.try_extend(domain).expect("hashing never fails to accept bytes");
    postcard::serialize_with_flavor(value, flavor)
        .expect("hashing never fails to accept bytes")
        .finalize()
        .into()
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
