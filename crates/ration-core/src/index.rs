//! `HashIndex`: a map looked up by key on the apply path, hashed rather than
//! ordered, that still behaves like a `BTreeMap` wherever order can be seen.
//!
//! A B-tree of a million budgets, or of a thousand gateways' names, costs several
//! cache misses and string compares per lookup; a hash table costs about one. The
//! ledger must stay a deterministic function of its log, so a `HashIndex` is never
//! walked in hash order: [`HashIndex::sorted`] walks it in key order, and it is
//! serialized in key order, as a map, byte for byte as the `BTreeMap` it replaces
//! (snapshots and their digests do not change). Names are hashed under a key
//! drawn once per process; it changes where entries sit, never what a lookup
//! answers, so it is not replicated state. The key is secret to the process so
//! that a client cannot work out offline which names it picks (principals, client
//! ids, template instances) collide; how well the hash resists that is not tested.
//! Ids the ledger assigns are hashed without one.

use std::borrow::Borrow;
use std::collections::hash_map::{Entry, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::marker::PhantomData;
use std::sync::OnceLock;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Hashes names (paths, principals, client ids) under the process's seed: see
/// [`NameHasher`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Seeded;

/// Two random words, drawn once per process.
static SEED: OnceLock<[u64; 2]> = OnceLock::new();

fn seed() -> [u64; 2] {
    *SEED.get_or_init(|| {
        let word = |n: u64| {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(n);
            h.finish()
        };
        // Odd, so the multiply below loses no bits.
        [word(1) | 1, word(2)]
    })
}

/// The folded 128-bit product of two words: every input bit reaches every output
/// bit's neighbourhood, the low bits (the bucket) and the high ones (the table's
/// tag byte) alike.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a).wrapping_mul(u128::from(b));
    (product as u64) ^ ((product >> 64) as u64)
}

/// A keyed multiply-and-fold hash of a name, 8 bytes per step. Names are short
/// (a path, a principal, a client id: tens of bytes), where SipHash's setup and
/// finish cost more than the bytes. The key is secret to the process (see the
/// module documentation).
#[derive(Clone, Copy, Debug)]
pub(crate) struct NameHasher {
    state: u64,
    key: u64,
}

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        fold(self.state, self.key)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.state = fold(self.state ^ u64::from_le_bytes(word), self.key);
        }
        // The length goes in with the last word, so "ab" and "ab\0" differ.
        let tail = tail_word(words.remainder()) ^ ((bytes.len() as u64) << 56);
        self.state = fold(self.state ^ tail, self.key);
    }

    fn write_u64(&mut self, n: u64) {
        self.state = fold(self.state ^ n, self.key);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// The last 0 to 7 bytes of a name as a little-endian word, zero above them:
/// what copying them into a zeroed `[u8; 8]` gives, without the copy of a length
/// known only at run time (a call to `memcpy` per name). Overlapping fixed-size
/// reads put each byte at its own place; where they overlap, they agree.
fn tail_word(rest: &[u8]) -> u64 {
    let n = rest.len();
    debug_assert!(n < 8);
    // Byte `i` of the word: shifted by 8 * i (at most 56 for a tail).
    let at = |i: usize| (i.wrapping_mul(8) & 63) as u32;
    let byte = |i: usize| rest.get(i).map_or(0, |b| u64::from(*b) << at(i));
    let word = |i: usize| {
        rest.get(i..i.wrapping_add(4))
            .and_then(|w| <[u8; 4]>::try_from(w).ok())
            .map_or(0, |w| u64::from(u32::from_le_bytes(w)) << at(i))
    };
    match n {
        0 => 0,
        1..=3 => byte(0) | byte(n / 2) | byte(n.wrapping_sub(1)),
        _ => word(0) | word(n.wrapping_sub(4)),
    }
}

impl BuildHasher for Seeded {
    type Hasher = NameHasher;

    fn build_hasher(&self) -> NameHasher {
        let [key, start] = seed();
        NameHasher { state: start, key }
    }
}

/// Hashes integer ids the ledger itself assigns (budget ids, lease ids): no
/// client picks them, so a fixed multiply-and-fold mix is enough, and it costs a
/// few cycles where SipHash costs tens.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ById;

/// The hasher of [`ById`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = fold(self.0 ^ n, 0x9e37_79b9_7f4a_7c15);
    }
}

impl BuildHasher for ById {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0x243f_6a88_85a3_08d3)
    }
}

/// See the module documentation. `S` is [`Seeded`] for names, [`ById`] for the
/// ledger's own integer ids.
#[derive(Clone)]
pub(crate) struct HashIndex<K, V, S = Seeded>(HashMap<K, V, S>);

/// A `HashIndex` keyed by an id the ledger assigns.
pub(crate) type IdIndex<K, V> = HashIndex<K, V, ById>;

impl<K, V, S: Default> Default for HashIndex<K, V, S> {
    fn default() -> Self {
        Self(HashMap::with_hasher(S::default()))
    }
}

impl<K: Hash + Eq + Ord, V, S: BuildHasher + Default> HashIndex<K, V, S> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(key)
    }

    /// The key held equal to `key`, with its value.
    pub(crate) fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get_key_value(key)
    }

    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get_mut(key)
    }

    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.contains_key(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.0.insert(key, value)
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.remove(key)
    }

    pub(crate) fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        self.0.entry(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    /// The entries in key order.
    pub(crate) fn sorted(&self) -> Vec<(&K, &V)> {
        let mut entries: Vec<(&K, &V)> = self.0.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        entries
    }

    /// The keys in order.
    pub(crate) fn sorted_keys(&self) -> Vec<K>
    where
        K: Clone,
    {
        let mut keys: Vec<K> = self.0.keys().cloned().collect();
        keys.sort_unstable();
        keys
    }

    /// The values in no particular order: only for what does not depend on order
    /// (sums, counts, checks that stop at nothing, changes to each value alone).
    pub(crate) fn values_any_order(&self) -> impl Iterator<Item = &V> {
        self.0.values()
    }

    /// The entries in no particular order (see [`Self::values_any_order`]).
    pub(crate) fn values_any_order_keyed(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter()
    }

    /// The values to change one by one, in no particular order: only for changes
    /// that depend on nothing but the value itself.
    pub(crate) fn values_any_order_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.values_mut()
    }
}

impl<K: Hash + Eq, V, S: BuildHasher + Default> FromIterator<(K, V)> for HashIndex<K, V, S> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = HashMap::with_hasher(S::default());
        map.extend(iter);
        Self(map)
    }
}

impl<K: Hash + Eq + Ord, V, S: BuildHasher> std::ops::Index<&K> for HashIndex<K, V, S> {
    type Output = V;

    fn index(&self, key: &K) -> &V {
        self.0.get(key).expect("invariant: the key is in the index")
    }
}

impl<K: Hash + Eq, V: PartialEq, S: BuildHasher> PartialEq for HashIndex<K, V, S> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<K: Hash + Eq, V: Eq, S: BuildHasher> Eq for HashIndex<K, V, S> {}

impl<K, V, S> fmt::Debug for HashIndex<K, V, S>
where
    K: Hash + Eq + Ord + fmt::Debug,
    V: fmt::Debug,
    S: BuildHasher + Default,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.sorted()).finish()
    }
}

impl<K, V, S> Serialize for HashIndex<K, V, S>
where
    K: Hash + Eq + Ord + Serialize,
    V: Serialize,
    S: BuildHasher + Default,
{
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        serializer.collect_map(self.sorted())
    }
}

impl<'de, K, V, S> Deserialize<'de> for HashIndex<K, V, S>
where
    K: Hash + Eq + Ord + Deserialize<'de>,
    V: Deserialize<'de>,
    S: BuildHasher + Default,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V, S>(PhantomData<(K, V, S)>);

        impl<'de, K, V, S> Visitor<'de> for MapVisitor<K, V, S>
        where
            K: Hash + Eq + Ord + Deserialize<'de>,
            V: Deserialize<'de>,
            S: BuildHasher + Default,
        {
            type Value = HashIndex<K, V, S>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // The length is the sender's word: reserve at most what a small
                // snapshot could hold, and grow past it as entries really arrive.
                let mut index = HashIndex::new();
                index.0.reserve(map.size_hint().unwrap_or(0).min(1 << 16));
                while let Some((k, v)) = map.next_entry()? {
                    index.0.insert(k, v);
                }
                Ok(index)
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_names_tail_word_is_its_bytes_zero_padded() {
        let bytes: Vec<u8> = (1..=7u8).map(|b| b.wrapping_mul(37) | 0x80).collect();
        for n in 0..8 {
            for start in 0..(bytes.len() - n + 1) {
                let rest = &bytes[start..start + n];
                let mut padded = [0u8; 8];
                padded[..n].copy_from_slice(rest);
                assert_eq!(tail_word(rest), u64::from_le_bytes(padded), "{rest:?}");
            }
        }
    }

    #[test]
    fn names_hash_by_content_and_length() {
        let hash = |s: &str| Seeded.hash_one(s);
        assert_eq!(hash("gw-1"), hash(&String::from("gw-1")));
        let names = ["", "a", "ab", "ab\0", "gw-1", "gw-2", "gw-10", "org-1/key-2", "org-1/key-20"];
        let hashes: std::collections::BTreeSet<u64> = names.iter().map(|n| hash(n)).collect();
        assert_eq!(hashes.len(), names.len());
        // Sequential names spread over the low bits (the buckets).
        let buckets: std::collections::BTreeSet<u64> =
            (0..1024).map(|i| hash(&format!("gw-{i}")) & 1023).collect();
        assert!(buckets.len() > 550, "{} of 1024 buckets used", buckets.len());
    }

    #[test]
    fn encodes_byte_for_byte_as_the_btreemap_it_replaces() {
        let mut ordered = BTreeMap::new();
        let mut hashed: HashIndex<u64, String> = HashIndex::new();
        let mut by_id: IdIndex<u64, String> = IdIndex::new();
        for i in 0..1000u64 {
            let key = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
            ordered.insert(key, format!("v{i}"));
            hashed.insert(key, format!("v{i}"));
            by_id.insert(key, format!("v{i}"));
        }
        let a = postcard::to_stdvec(&ordered).unwrap();
        let b = postcard::to_stdvec(&hashed).unwrap();
        assert_eq!(a, b);
        assert_eq!(postcard::to_stdvec(&by_id).unwrap(), a);
        let back: HashIndex<u64, String> = postcard::from_bytes(&a).unwrap();
        assert_eq!(back, hashed);
        let keys: Vec<u64> = ordered.keys().copied().collect();
        assert_eq!(hashed.sorted_keys(), keys);
        assert_eq!(format!("{hashed:?}"), format!("{ordered:?}"));
    }
}
