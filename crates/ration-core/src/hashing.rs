//! SHA-256 over the canonical (postcard) encoding of a value, streamed into the
//! hasher without building the encoding in memory.

use postcard::ser_flavors::Flavor;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Gathers the encoding in a block-sized buffer on the stack and hands the hasher
/// whole blocks: postcard writes a value field by field, a few bytes at a time, and
/// each `update` call has its own bookkeeping.
struct HashFlavor {
    hasher: Sha256,
    buf: [u8; BUF],
    len: usize,
}

const BUF: usize = 256;

impl HashFlavor {
    fn flush(&mut self) {
        self.hasher.update(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Flavor for HashFlavor {
    type Output = Sha256;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.len == BUF {
            self.flush();
        }
        self.buf[self.len] = data;
        self.len = self.len.saturating_add(1);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let end = self.len.saturating_add(data.len());
        if end <= BUF {
            self.buf[self.len..end].copy_from_slice(data);
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

/// SHA-256 of `domain` followed by the postcard encoding of `value`.
pub(crate) fn sha256_of<T: Serialize + ?Sized>(domain: &[u8], value: &T) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(domain);
    let flavor = HashFlavor { hasher, buf: [0; BUF], len: 0 };
    postcard::serialize_with_flavor(value, flavor)
        .expect("hashing never fails to accept bytes")
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

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
