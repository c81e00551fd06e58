//! The counters a lease drew on: the limit for its unit on its budget and on each
//! ancestor that has one, in chain order.
//!
//! Up to [`INLINE`] are kept in the lease itself. A report or a release reads them
//! right after the lease, and a vector of their own was one more cache miss each
//! at a million budgets (benches/README.md). Deeper chains spill into a vector.
//! Encoded as a sequence, as a `Vec` is, so snapshots do not change.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::CounterRef;

/// Counters kept inline: a budget, its parent and its root.
const INLINE: usize = 3;

const NONE: CounterRef = CounterRef { budget: 0, counter: 0 };

#[derive(Clone)]
pub(super) enum Counters {
    /// The first `len` of `refs`.
    Inline {
        len: u8,
        refs: [CounterRef; INLINE],
    },
    Spilled(Vec<CounterRef>),
}

impl Default for Counters {
    fn default() -> Self {
        Self::Inline { len: 0, refs: [NONE; INLINE] }
    }
}

impl Counters {
    pub(super) fn push(&mut self, c: CounterRef) {
        match self {
            Self::Inline { len, refs } => match refs.get_mut(usize::from(*len)) {
                Some(slot) => {
                    *slot = c;
                    *len = len.saturating_add(1);
                }
                None => {
                    let mut spilled = Vec::with_capacity(INLINE.saturating_mul(2));
                    spilled.extend_from_slice(refs);
                    spilled.push(c);
                    *self = Self::Spilled(spilled);
                }
            },
            Self::Spilled(v) => v.push(c),
        }
    }
}

impl Deref for Counters {
    type Target = [CounterRef];

    fn deref(&self) -> &[CounterRef] {
        match self {
            Self::Inline { len, refs } => &refs[..usize::from(*len)],
            Self::Spilled(v) => v,
        }
    }
}

impl<'a> IntoIterator for &'a Counters {
    type Item = &'a CounterRef;
    type IntoIter = std::slice::Iter<'a, CounterRef>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<CounterRef>> for Counters {
    fn from(v: Vec<CounterRef>) -> Self {
        if v.len() > INLINE {
            return Self::Spilled(v);
        }
        let mut out = Self::default();
        for c in v {
            out.push(c);
        }
        out
    }
}

/// Equal by what they hold, however stored.
impl PartialEq for Counters {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Counters {}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Counters {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Counters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<CounterRef>::deserialize(d).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_encodes_and_compares_like_a_vec_however_it_is_stored() {
        for n in 0..=INLINE + 3 {
            let v: Vec<CounterRef> =
                (0..n as u64).map(|i| CounterRef { budget: 7 + i, counter: 100 + i }).collect();
            let mut pushed = Counters::default();
            for c in &v {
                pushed.push(*c);
            }
            assert_eq!(&*pushed, &v[..], "{n} pushed");
            assert_eq!(matches!(pushed, Counters::Spilled(_)), n > INLINE, "{n}");
            let from = Counters::from(v.clone());
            assert_eq!(from, pushed);
            // The same bytes as the vector it replaced, both ways.
            let bytes = postcard::to_stdvec(&pushed).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&v).unwrap(), "{n}");
            let back: Counters = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, pushed);
            assert_eq!(format!("{back:?}"), format!("{v:?}"));
        }
        // Equal across representations: a spilled vector that holds few.
        let few = vec![CounterRef { budget: 1, counter: 2 }];
        assert_eq!(Counters::Spilled(few.clone()), Counters::from(few));
        assert_ne!(Counters::default(), Counters::from(vec![NONE]));
    }
}
