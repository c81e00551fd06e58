//! `Holders`: how many live leases each principal holds on one counter, for the
//! fair share.
//!
//! Most counters have one holder (a leaf budget, one gateway). A hashed table per
//! counter put that one holder behind a heap pointer of its own: a cache miss on
//! every acquire and release at a million budgets, on top of the budget's. One
//! holder sits in the counter itself; a second one moves all of them into a
//! table, which stays until the counter has no holder again (no allocation churn
//! on a counter going between one holder and two). Two `Holders` are equal when
//! they count the same leases for the same principals, however they are stored.

use super::Principal;
use crate::index::HashIndex;

#[derive(Clone, Debug, Default)]
pub(super) enum Holders {
    #[default]
    None,
    One(Principal, u32),
    Many(HashIndex<Principal, u32>),
}

impl Holders {
    pub(super) fn len(&self) -> usize {
        match self {
            Holders::None => 0,
            Holders::One(..) => 1,
            Holders::Many(m) => m.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live leases `principal` holds (0 for none).
    pub(super) fn count(&self, principal: &Principal) -> u32 {
        match self {
            Holders::None => 0,
            Holders::One(p, n) => {
                if p == principal {
                    *n
                } else {
                    0
                }
            }
            Holders::Many(m) => m.get(principal).copied().unwrap_or(0),
        }
    }

    pub(super) fn contains(&self, principal: &Principal) -> bool {
        self.count(principal) > 0
    }

    /// One more live lease held by `principal`.
    pub(super) fn add(&mut self, principal: &Principal) {
        match self {
            Holders::None => *self = Holders::One(principal.clone(), 1),
            Holders::One(p, n) if p == principal => *n = n.saturating_add(1),
            Holders::One(p, n) => {
                let mut m = HashIndex::new();
                m.insert(p.clone(), *n);
                m.insert(principal.clone(), 1);
                *self = Holders::Many(m);
            }
            Holders::Many(m) => {
                let n = m.entry(principal.clone()).or_insert(0);
                *n = n.saturating_add(1);
            }
        }
    }

    /// One live lease of `principal`'s fewer; false if it held none.
    #[must_use]
    pub(super) fn remove_one(&mut self, principal: &Principal) -> bool {
        match self {
            Holders::None => false,
            Holders::One(p, n) if p == principal => {
                if *n > 1 {
                    *n = n.saturating_sub(1);
                } else {
                    *self = Holders::None;
                }
                true
            }
            Holders::One(..) => false,
            Holders::Many(m) => {
                match m.get_mut(principal) {
                    Some(n) if *n > 1 => *n = n.saturating_sub(1),
                    Some(_) => {
                        m.remove(principal);
                    }
                    None => return false,
                }
                if m.is_empty() {
                    *self = Holders::None;
                }
                true
            }
        }
    }

    /// Every holder with its count, in no particular order.
    fn entries(&self) -> Box<dyn Iterator<Item = (&Principal, u32)> + '_> {
        match self {
            Holders::None => Box::new(std::iter::empty()),
            Holders::One(p, n) => Box::new(std::iter::once((p, *n))),
            Holders::Many(m) => Box::new(m.values_any_order_keyed().map(|(p, n)| (p, *n))),
        }
    }
}

impl PartialEq for Holders {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.entries().all(|(p, n)| other.count(p) == n)
    }
}

impl Eq for Holders {}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> Principal {
        Principal::new(name).unwrap()
    }

    #[test]
    fn counts_like_a_map_however_it_is_stored() {
        let (a, b, c) = (p("a"), p("b"), p("c"));
        let mut h = Holders::default();
        // Against a plain map, step by step, through one holder, several, and none.
        let mut model: std::collections::BTreeMap<Principal, u32> = Default::default();
        let steps: [(&Principal, bool); 12] = [
            (&a, true),
            (&a, true),
            (&b, true),
            (&a, false),
            (&c, false), // c holds nothing: refused
            (&a, false),
            (&b, false),
            (&b, false), // none left
            (&c, true),
            (&a, true),
            (&c, false),
            (&a, false),
        ];
        for (who, add) in steps {
            if add {
                h.add(who);
                *model.entry(who.clone()).or_insert(0) += 1;
            } else {
                let held = model.get(who).copied().unwrap_or(0);
                assert_eq!(h.remove_one(who), held > 0);
                match held {
                    0 => {}
                    1 => {
                        model.remove(who);
                    }
                    _ => *model.get_mut(who).unwrap() -= 1,
                }
            }
            assert_eq!(h.len(), model.len());
            for x in [&a, &b, &c] {
                assert_eq!(h.count(x), model.get(x).copied().unwrap_or(0));
                assert_eq!(h.contains(x), model.contains_key(x));
            }
        }
        assert!(h.is_empty() && matches!(h, Holders::None), "empty frees its table");
    }

    #[test]
    fn equal_by_what_they_count() {
        let (a, b) = (p("a"), p("b"));
        // One holder kept in a table (after a second came and went) equals one
        // held inline.
        let mut table = Holders::default();
        table.add(&a);
        table.add(&b);
        assert!(table.remove_one(&b));
        assert!(matches!(table, Holders::Many(_)));
        let mut inline = Holders::default();
        inline.add(&a);
        assert!(matches!(inline, Holders::One(..)));
        assert_eq!(table, inline);
        assert_eq!(inline, table);
        inline.add(&a);
        assert_ne!(table, inline, "same holder, different count");
        let mut other = Holders::default();
        other.add(&b);
        assert_ne!(table, other, "different holder");
        assert_ne!(Holders::default(), other);
    }
}
