//! Validated names: budget paths, units, client ids, principals and lease ids.
//!
//! Every name is checked when it is built (and when it is decoded, through
//! `serde(try_from)`), so the rest of the ledger never sees a malformed one.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;

/// Longest budget path, in bytes.
pub const MAX_PATH_BYTES: usize = 256;
/// Deepest budget tree: `a/b/c/d/e/f/g/h`.
pub const MAX_PATH_DEPTH: usize = 8;
/// Longest path segment, in bytes.
pub const MAX_SEGMENT_BYTES: usize = 64;
/// Longest unit name, in bytes.
pub const MAX_UNIT_BYTES: usize = 32;
/// Longest client id or principal, in bytes.
pub const MAX_ID_BYTES: usize = 128;

// Names are shared (`Arc<str>`): leases, counters and audit records hold many copies,
// and cloning one must not allocate.

/// A budget's place in the tree: `acme`, `acme/search`, `acme/search/key-7`.
///
/// Segments are 1 to 64 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`, joined by `/`;
/// at most 8 segments and 256 bytes in all.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BudgetPath(Arc<str>);

impl BudgetPath {
    /// Checks `path` and builds it.
    pub fn new(path: impl AsRef<str>) -> Result<Self, LedgerError> {
        let path = path.as_ref();
        match check_path(path) {
            Ok(()) => Ok(Self(path.into())),
            Err(reason) => Err(LedgerError::InvalidPath { path: truncate(path), reason }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments, root first.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Number of segments (a root has depth 1).
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// The parent path, or `None` for a root.
    pub fn parent(&self) -> Option<BudgetPath> {
        self.0.rfind('/').map(|at| Self(self.0[..at].into()))
    }

    /// The root segment: the shard key of the budget tree.
    pub fn root(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// True if `self` is `ancestor` or lies below it.
    /// The bounds, in path order, of this budget's strict descendants: `[p/, p0)`
    /// (`0` follows `/`). Not valid paths themselves; only for ranges.
    pub(crate) fn descendant_bounds(&self) -> (BudgetPath, BudgetPath) {
        (Self(format!("{}/", self.0).into()), Self(format!("{}0", self.0).into()))
    }

    pub fn is_within(&self, ancestor: &BudgetPath) -> bool {
        match self.0.strip_prefix(ancestor.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("a budget path must not be empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("longer than {MAX_PATH_BYTES} bytes"));
    }
    let mut depth = 0usize;
    for segment in path.split('/') {
        depth = depth.saturating_add(1);
        if segment.is_empty() {
            return Err("empty segment (leading, trailing or doubled '/')".into());
        }
        if segment == "." || segment == ".." {
            return Err(format!("segment '{segment}' is not allowed"));
        }
        if segment.len() > MAX_SEGMENT_BYTES {
            return Err(format!("segment longer than {MAX_SEGMENT_BYTES} bytes"));
        }
        if let Some(bad) =
            segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(format!("character {bad:?} is not allowed; use [A-Za-z0-9_.-] and '/'"));
        }
    }
    if depth > MAX_PATH_DEPTH {
        return Err(format!("deeper than {MAX_PATH_DEPTH} segments"));
    }
    Ok(())
}

/// A unit: a named integer quantity such as `tokens`, `usd_micros` or `requests`.
///
/// 1 to 32 bytes of `[a-z0-9_]`, starting with a letter.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unit(Arc<str>);

impl Unit {
    pub fn new(unit: impl AsRef<str>) -> Result<Self, LedgerError> {
        let unit = unit.as_ref();
        let reason = if unit.is_empty() {
            Some("a unit name must not be empty".to_owned())
        } else if unit.len() > MAX_UNIT_BYTES {
            Some(format!("longer than {MAX_UNIT_BYTES} bytes"))
        } else if !unit.starts_with(|c: char| c.is_ascii_lowercase()) {
            Some("must start with a lowercase letter".to_owned())
        } else if unit.chars().any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        {
            Some("use only [a-z0-9_]".to_owned())
        } else {
            None
        };
        match reason {
            None => Ok(Self(unit.into())),
            Some(reason) => Err(LedgerError::InvalidUnit { unit: truncate(unit), reason }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_id(id: &str) -> Option<String> {
    if id.is_empty() {
        Some("must not be empty".to_owned())
    } else if id.len() > MAX_ID_BYTES {
        Some(format!("longer than {MAX_ID_BYTES} bytes"))
    } else if id
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '/')))
    {
        Some("use only [A-Za-z0-9_.:@/-]".to_owned())
    } else {
        None
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Eq, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        /// Equal names are equal strings; two copies of one name (the ledger
        /// hands out its own copy of a principal it holds, see
        /// `Principals::canonical`) compare without reading the text.
        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
            }
        }

        /// As the text's hash (what the derived one was), so equal names hash alike.
        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state)
            }
        }

        impl $name {
            pub fn new(id: impl AsRef<str>) -> Result<Self, LedgerError> {
                let id = id.as_ref();
                match check_id(id) {
                    None => Ok(Self(id.into())),
                    Some(reason) => Err(LedgerError::InvalidArgument {
                        field: $what.into(),
                        reason: format!("{:?} {reason}", truncate(id)),
                    }),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether both are the same copy of the name (not only equal).
            #[cfg(test)]
            #[allow(dead_code)] // for principals only
            pub(crate) fn same_copy(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0)
            }
        }
    };
}

id_type!(
    /// Who sent a request, for exactly-once: one client incarnation (a gateway
    /// process, an SDK instance, an admin tool run). Request ids increase within it.
    ClientId,
    "client_id"
);
id_type!(
    /// The authenticated identity a request acts as: a gateway id for leases, an
    /// operator for budget changes. Leases belong to the principal that acquired them.
    Principal,
    "principal"
);

macro_rules! string_impls {
    ($($name:ident),*) => {$(
        impl TryFrom<String> for $name {
            type Error = LedgerError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }
        impl TryFrom<&str> for $name {
            type Error = LedgerError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }
        // Read from a string, checked as `new` checks it: borrowed where the format
        // lends it (postcard from a buffer), so the name costs one allocation, not
        // a `String` and then the shared copy.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::new(v).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Text)
            }
        }
        // Serialized as a plain string, without the clone serde's `into` would make.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0.as_ref().to_owned()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    )*};
}

string_impls!(BudgetPath, Unit, ClientId, Principal);

/// Keeps error messages bounded when a caller sends a huge bad name.
fn truncate(s: &str) -> String {
    const SHOWN: usize = 80;
    if s.len() <= SHOWN {
        return s.to_owned();
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// Most commands one log entry may carry; lease ids have 16 bits for the slot.
pub const MAX_COMMANDS_PER_ENTRY: usize = 4096;
/// Highest log index a lease id can encode (48 bits).
pub const MAX_LEASE_INDEX: u64 = (1 << 48) - 1;

/// A lease id, derived from the log position of the command that granted it:
/// `index << 16 | slot`. No randomness, and equal on every replica.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(u64);

impl LeaseId {
    /// The id of the lease granted by command `slot` of log entry `index`.
    ///
    /// # Panics
    /// If `index` or `slot` do not fit; the ledger checks both before calling.
    pub fn from_position(index: u64, slot: usize) -> Self {
        assert!(index <= MAX_LEASE_INDEX, "log index {index} too large for a lease id");
        assert!(slot < MAX_COMMANDS_PER_ENTRY, "slot {slot} too large for a lease id");
        Self(index << 16 | slot as u64)
    }

    /// Rebuilds an id a client sent back.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The log index of the entry that granted this lease.
    pub const fn index(self) -> u64 {
        self.0 >> 16
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({}.{})", self.0 >> 16, self.0 & 0xffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for good in ["acme", "acme/search/key-7", "a.b_c-D9", &"x/".repeat(7).to_owned()[..13]] {
            assert!(BudgetPath::new(good).is_ok(), "{good}");
        }
        for bad in ["", "/acme", "acme/", "a//b", "a/../b", "a b", "é", "a/b/c/d/e/f/g/h/i"] {
            let err = BudgetPath::new(bad).unwrap_err();
            assert!(matches!(err, LedgerError::InvalidPath { .. }), "{bad}: {err}");
        }
        assert!(BudgetPath::new("a".repeat(65)).is_err());
        assert!(BudgetPath::new(["abcdefgh"; 8].join("/")).is_ok());
    }

    #[test]
    fn path_relations() {
        let p = BudgetPath::new("acme/search/key-7").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "acme/search");
        assert_eq!(p.root(), "acme");
        assert_eq!(p.depth(), 3);
        assert!(p.is_within(&BudgetPath::new("acme").unwrap()));
        assert!(p.is_within(&p));
        assert!(!p.is_within(&BudgetPath::new("acme/sea").unwrap()));
        assert!(BudgetPath::new("acme").unwrap().parent().is_none());
    }

    #[test]
    fn units_and_ids_are_checked() {
        assert!(Unit::new("usd_micros").is_ok());
        assert!(Unit::new("Tokens").is_err());
        assert!(Unit::new("9x").is_err());
        assert!(Unit::new("").is_err());
        assert!(ClientId::new("gw-eu-1:incarnation-7").is_ok());
        assert!(ClientId::new("has space").is_err());
        assert!(Principal::new("x".repeat(129)).is_err());
    }

    #[test]
    fn bad_names_are_refused_when_decoded() {
        let bytes = postcard::to_stdvec(&"a//b".to_owned()).unwrap();
        let err = postcard::from_bytes::<BudgetPath>(&bytes).unwrap_err();
        assert!(matches!(err, postcard::Error::SerdeDeCustom), "{err:?}");
        let bytes = postcard::to_stdvec(&"Tokens".to_owned()).unwrap();
        assert!(postcard::from_bytes::<Unit>(&bytes).is_err(), "a unit is lower case");
        for bad in ["", "x y"] {
            let bytes = postcard::to_stdvec(&bad.to_owned()).unwrap();
            assert!(postcard::from_bytes::<Unit>(&bytes).is_err(), "unit {bad:?}");
            assert!(postcard::from_bytes::<Principal>(&bytes).is_err(), "principal {bad:?}");
            assert!(postcard::from_bytes::<ClientId>(&bytes).is_err(), "client {bad:?}");
        }
    }

    #[test]
    fn names_decode_from_borrowed_and_owned_text_alike() {
        // postcard lends the text from its buffer; a reader-driven format hands
        // over a transient one. Both give the name the text spells, checked.
        let bytes = postcard::to_stdvec(&("acme/search", "tokens", "gw-1", "c-1")).unwrap();
        let decoded: (BudgetPath, Unit, Principal, ClientId) =
            postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded.0, BudgetPath::new("acme/search").unwrap());
        assert_eq!(decoded.1, Unit::new("tokens").unwrap());
        assert_eq!(decoded.2, Principal::new("gw-1").unwrap());
        assert_eq!(decoded.3, ClientId::new("c-1").unwrap());
        let again = postcard::to_stdvec(&decoded).unwrap();
        assert_eq!(again, bytes, "encoded as the plain strings they came from");
        let owned: (BudgetPath, Unit) =
            postcard::from_io((&b"\x0bacme/search\x06tokens"[..], &mut [0u8; 64][..])).unwrap().0;
        assert_eq!(owned.0.as_str(), "acme/search");
        assert_eq!(owned.1.as_str(), "tokens");
    }

    #[test]
    fn lease_ids_come_from_log_positions() {
        let id = LeaseId::from_position(42, 3);
        assert_eq!(id.index(), 42);
        assert_eq!(LeaseId::from_raw(id.raw()), id);
        assert!(LeaseId::from_position(43, 0) > id);
    }
}
