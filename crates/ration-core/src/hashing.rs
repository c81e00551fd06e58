//! The canonical (postcard) encoding of a value, and SHA-256 over it streamed
//! into the hasher without building the encoding in memory. Both write through
//! the ledger's own serializer of postcard's format ([`crate::wire`]): the same
//! bytes as postcard's own, in fewer and cheaper steps.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::wire::{Writer, BUF};

/// SHA-256 of `domain` followed by the postcard encoding of `value`.
pub(crate) fn sha256_of<T: Serialize + ?Sized>(domain: &[u8], value: &T) -> [u8; 32] {
    // The domain goes in the buffer with the encoding: the hasher copies what does
    // not fill a block into its own buffer, once per call.
    let mut buf = [0; BUF];
    let mut w = Writer::new(Sha256::new(), &mut buf);
    w.bytes(domain);
    w.value(value).expect("hashing never fails to accept bytes");
    w.finish().finalize().into()
}

/// `out` followed by the postcard encoding of `value`: the bytes
/// `postcard::to_extend` gives (see [`crate::wire`]). Fails only where postcard's
/// would: a value whose `Serialize` fails (a sequence of unknown length, say).
fn encode_into<T: Serialize + ?Sized>(value: &T, out: Vec<u8>) -> postcard::Result<Vec<u8>> {
    let mut buf = [0; BUF];
    let mut w = Writer::new(out, &mut buf);
    w.value(value)?;
    Ok(w.finish())
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
