//! SHA-256 over the canonical (postcard) encoding of a value, streamed into the
//! hasher without building the encoding in memory.

use postcard::ser_flavors::Flavor;
use serde::Serialize;
use sha2::{Digest, Sha256};

struct HashFlavor(Sha256);

impl Flavor for HashFlavor {
    type Output = Sha256;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.update([data]);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.update(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Sha256> {
        Ok(self.0)
    }
}

/// SHA-256 of `domain` followed by the postcard encoding of `value`.
pub(crate) fn sha256_of<T: Serialize + ?Sized>(domain: &[u8], value: &T) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(domain);
    postcard::serialize_with_flavor(value, HashFlavor(hasher))
        .expect("hashing never fails to accept bytes")
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_the_same_bytes_as_the_encoding() {
        let value = ("acme/search", 42u64, vec![1u8, 2, 3]);
        let mut h = Sha256::new();
        h.update(b"d");
        h.update(postcard::to_stdvec(&value).unwrap());
        let expected: [u8; 32] = h.finalize().into();
        assert_eq!(sha256_of(b"d", &value), expected);
    }
}
