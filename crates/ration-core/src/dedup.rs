//! Exactly-once: the replicated table of remembered results.
//!
//! Per client it keeps the results of its most recent requests (a sliding window of
//! request ids, like an anti-replay window). A request id already in the window gets
//! its first result back; one below the window was forgotten and is refused rather
//! than executed twice. A client idle for longer than the configured time is
//! forgotten entirely, and so is the least recently seen one when the table is full.
//!
//! Each client is counted against the principal of its first request (its owner):
//! its clients and remembered results count towards that principal's limits
//! (`ledger::principals`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::Outcome;
use crate::error::LedgerError;
use crate::index::HashIndex;
use crate::ledger::{LedgerConfig, Principals};
use crate::names::{ClientId, Principal};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    /// Hash of the principal and operation, so a reused id with other content is caught.
    fingerprint: u64,
    outcome: Outcome,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClientRequests {
    /// Request ids at or below this were evicted from the window.
    forgotten_up_to: Option<u64>,
    last_seen_ms: u64,
    results: Recent,
    /// The principal this client is counted against (its owner), kept beside its
    /// results so one lookup finds both. Written to the snapshot's fourth section,
    /// not with the results (older snapshots have none: their clients count
    /// against nobody until they are forgotten).
    #[serde(skip)]
    owner: Option<Principal>,
}

/// A client's remembered results in request id order. Clients number their
/// requests upwards, so the window moves up: new ids go on the back and the
/// oldest come off the front, each touching one end of a contiguous buffer
/// (a B-tree of results this size touched a node chain at both ends and shifted
/// a leaf's values on every eviction). Serialized as the map it replaced, byte for
/// byte.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Recent(VecDeque<(u64, Remembered)>);

impl Recent {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn first_id(&self) -> Option<u64> {
        self.0.front().map(|e| e.0)
    }

    fn last_id(&self) -> Option<u64> {
        self.0.back().map(|e| e.0)
    }

    fn get(&self, id: u64) -> Option<&Remembered> {
        let i = self.0.binary_search_by_key(&id, |e| e.0).ok()?;
        self.0.get(i).map(|e| &e.1)
    }

    /// Inserts in order (on the back, unless the id arrived late); an id already
    /// held has its result replaced.
    fn insert(&mut self, id: u64, remembered: Remembered) {
        if self.last_id().is_none_or(|last| id > last) {
            self.0.push_back((id, remembered));
            return;
        }
        match self.0.binary_search_by_key(&id, |e| e.0) {
            Ok(i) => {
                if let Some(e) = self.0.get_mut(i) {
                    e.1 = remembered;
                }
            }
            Err(i) => self.0.insert(i, (id, remembered)),
        }
    }

    /// Removes the lowest id, and returns it.
    fn pop_first(&mut self) -> Option<u64> {
        self.0.pop_front().map(|e| e.0)
    }
}

impl Serialize for Recent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(id, r)| (id, r)))
    }
}

impl<'de> Deserialize<'de> for Recent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // As the map did: any order in, sorted out, the last of a repeated id kept.
        let map = BTreeMap::<u64, Remembered>::deserialize(deserializer)?;
        Ok(Self(map.into_iter().collect()))
    }
}

/// What the table says about a request.
#[derive(Debug)]
pub(crate) enum Seen {
    New,
    Replay(Outcome),
    Refused(LedgerError),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Dedup {
    clients: HashIndex<ClientId, ClientRequests>,
    /// Derived: clients by the ledger time they were last seen.
    #[serde(skip)]
    by_last_seen: BTreeSet<(u64, ClientId)>,
}

impl ClientRequests {
    /// The principal this client is counted against, if recorded.
    pub(crate) fn owner(&self) -> Option<&Principal> {
        self.owner.as_ref()
    }

    /// Whether remembering one more result makes its window hold more.
    pub(crate) fn grows(&self, window: u32) -> bool {
        self.results.len() < window as usize
    }
}

impl Dedup {
    /// What the table holds for `client`: one lookup serves a request's owner
    /// check, its replay check and its admission.
    pub(crate) fn client(&self, client: &ClientId) -> Option<&ClientRequests> {
        self.clients.get(client)
    }

    #[cfg(test)]
    pub(crate) fn check(
        &self,
        client: &ClientId,
        request_id: u64,
        fingerprint: u64,
        window: u32,
    ) -> Seen {
        Self::check_in(self.clients.get(client), client, request_id, fingerprint, window)
    }

    /// Whether `request_id` of `client` (held as `held`) is new, a replay, or refused.
    pub(crate) fn check_in(
        held: Option<&ClientRequests>,
        client: &ClientId,
        request_id: u64,
        fingerprint: u64,
        window: u32,
    ) -> Seen {
        let Some(c) = held else {
            return Seen::New;
        };
        // Clients number their requests upwards: an id above every remembered and
        // forgotten one is new, found at the window's end, in the nodes the last
        // insert touched.
        let above_forgotten = c.forgotten_up_to.is_none_or(|f| request_id > f);
        if above_forgotten && c.results.last_id().is_some_and(|last| request_id > last) {
            return Seen::New;
        }
        if let Some(r) = c.results.get(request_id) {
            return if r.fingerprint == fingerprint {
                Seen::Replay(r.outcome.clone())
            } else {
                Seen::Refused(LedgerError::RequestIdReused {
                    client: client.to_string(),
                    request: request_id,
                })
            };
        }
        if c.forgotten_up_to.is_some_and(|f| request_id <= f) {
            return Seen::Refused(LedgerError::RequestTooOld {
                client: client.to_string(),
                request: request_id,
                window,
            });
        }
        Seen::New
    }

    /// Each owned client's owner, in client order (the snapshot's form).
    pub(crate) fn owners(&self) -> Vec<(ClientId, Principal)> {
        self.clients
            .sorted()
            .into_iter()
            .filter_map(|(id, c)| Some((id.clone(), c.owner.clone()?)))
            .collect()
    }

    /// Gives the clients held their owners from a snapshot (owners of clients not
    /// held are dropped).
    pub(crate) fn set_owners(&mut self, owners: Vec<(ClientId, Principal)>) {
        for (id, owner) in owners {
            if let Some(c) = self.clients.get_mut(&id) {
                c.owner = Some(owner);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn remember(
        &mut self,
        client: &ClientId,
        principal: &Principal,
        request_id: u64,
        fingerprint: u64,
        outcome: Outcome,
        now_ms: u64,
        config: &LedgerConfig,
        principals: &mut Principals,
    ) {
        let c = match self.clients.get_mut(client) {
            Some(c) => c,
            None => {
                principals.change(principal, |u| u.clients = u.clients.saturating_add(1));
                let new = ClientRequests { owner: Some(principal.clone()), ..Default::default() };
                self.clients.entry(client.clone()).or_insert(new)
            }
        };
        let before = c.results.len();
        // Re-index only when the time moved: most requests share a time stamp.
        let reindex = c.results.is_empty() || c.last_seen_ms != now_ms;
        if reindex {
            self.by_last_seen.remove(&(c.last_seen_ms, client.clone()));
            c.last_seen_ms = now_ms;
        }
        // The window keeps the `dedup_window` highest ids of those held and this
        // one; the rest are forgotten. Room is made before the insert, so the
        // window's storage never grows past its size.
        let window = config.dedup_window as usize;
        let mut new = Some((request_id, Remembered { fingerprint, outcome }));
        while c.results.len().saturating_add(usize::from(new.is_some())) > window {
            let evicted = match (c.results.first_id(), &new) {
                (Some(first), Some((id, _))) if *id < first => new.take().map(|n| n.0),
                (Some(_), _) => c.results.pop_first(),
                (None, Some(_)) => new.take().map(|n| n.0),
                (None, None) => None,
            };
            let Some(evicted) = evicted else { break };
            c.forgotten_up_to = Some(c.forgotten_up_to.map_or(evicted, |f| f.max(evicted)));
        }
        if let Some((id, remembered)) = new {
            c.results.insert(id, remembered);
        }
        let after = c.results.len();
        if reindex {
            self.by_last_seen.insert((now_ms, client.clone()));
        }
        if after != before {
            if let Some(owner) = &c.owner {
                principals.change(owner, |u| {
                    u.outcomes =
                        u.outcomes.saturating_add(after as u64).saturating_sub(before as u64)
                });
            }
        }
        while self.clients.len() as u64 > config.max_dedup_clients {
            if !self.forget_oldest(principals) {
                break;
            }
        }
    }

    /// Forgets clients not seen since `now_ms - idle_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64, idle_ms: u64, principals: &mut Principals) {
        let cutoff = now_ms.saturating_sub(idle_ms);
        while self.by_last_seen.first().is_some_and(|(t, _)| *t < cutoff) {
            self.forget_oldest(principals);
        }
    }

    fn forget_oldest(&mut self, principals: &mut Principals) -> bool {
        match self.by_last_seen.pop_first() {
            Some((_, client)) => {
                let removed = self.clients.remove(&client);
                let results = removed.as_ref().map_or(0, |c| c.results.len() as u64);
                if let Some(owner) = removed.and_then(|c| c.owner) {
                    principals.change(&owner, |u| {
                        u.clients = u.clients.saturating_sub(1);
                        u.outcomes = u.outcomes.saturating_sub(results);
                    });
                }
                true
            }
            None => false,
        }
    }

    /// Adds each owned client and its results to its owner's usage.
    pub(crate) fn count_owned(&self, principals: &mut Principals) {
        for c in self.clients.values_any_order() {
            let Some(owner) = &c.owner else { continue };
            let results = c.results.len() as u64;
            principals.change(owner, |u| {
                u.clients = u.clients.saturating_add(1);
                u.outcomes = u.outcomes.saturating_add(results);
            });
        }
    }

    /// Rebuilds the derived indexes, and counts each owned client's results
    /// against its owner.
    pub(crate) fn rebuild(&mut self, principals: &mut Principals) {
        self.by_last_seen = self
            .clients
            .values_any_order_keyed()
            .map(|(id, c)| (c.last_seen_ms, id.clone()))
            .collect();
        self.count_owned(principals);
    }

    pub(crate) fn clients(&self) -> usize {
        self.clients.len()
    }

    pub(crate) fn remembered(&self) -> usize {
        self.clients.values_any_order().map(|c| c.results.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Reply;

    fn remembered(id: u64) -> Remembered {
        Remembered { fingerprint: id.wrapping_mul(31), outcome: Ok(Reply::Ticked { now_ms: id }) }
    }

    /// The table as it was kept before `Recent`: a map, the lowest ids evicted
    /// after each insert.
    #[derive(Default)]
    struct Model {
        results: BTreeMap<u64, Remembered>,
        forgotten_up_to: Option<u64>,
    }

    #[test]
    fn the_window_keeps_and_forgets_what_the_map_did_and_encodes_as_it() {
        let config = LedgerConfig { dedup_window: 8, ..LedgerConfig::default() };
        let client = ClientId::new("c").unwrap();
        let principal = Principal::new("p").unwrap();
        let mut principals = Principals::default();
        let mut dedup = Dedup::default();
        let mut model = Model::default();
        // Mostly rising ids, some late, some far below the window.
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = 100u64;
        for step in 0..5_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let id = match rng % 10 {
                0..=5 => {
                    next += 1 + rng % 3;
                    next
                }
                6..=8 => next.saturating_sub(rng % 12),
                _ => next.saturating_sub(rng % 40),
            };
            let seen = dedup.check(&client, id, id.wrapping_mul(31), 8);
            let model_seen = match model.results.get(&id) {
                Some(_) => "replay",
                None if model.forgotten_up_to.is_some_and(|f| id <= f) => "too old",
                None => "new",
            };
            let got = match seen {
                Seen::Replay(_) => "replay",
                Seen::Refused(LedgerError::RequestTooOld { .. }) => "too old",
                Seen::Refused(e) => panic!("step {step}: {e}"),
                Seen::New => "new",
            };
            assert_eq!(got, model_seen, "step {step}, id {id}");
            if got != "new" {
                continue;
            }
            let outcome = remembered(id).outcome;
            dedup.remember(
                &client,
                &principal,
                id,
                id.wrapping_mul(31),
                outcome,
                step,
                &config,
                &mut principals,
            );
            model.results.insert(id, remembered(id));
            while model.results.len() > 8 {
                let (evicted, _) = model.results.pop_first().unwrap();
                model.forgotten_up_to =
                    Some(model.forgotten_up_to.map_or(evicted, |f| f.max(evicted)));
            }
            let c = &dedup.clients[&client];
            assert_eq!(c.forgotten_up_to, model.forgotten_up_to, "step {step}");
            let held: Vec<u64> = c.results.0.iter().map(|e| e.0).collect();
            let expected: Vec<u64> = model.results.keys().copied().collect();
            assert_eq!(held, expected, "step {step}");
            assert!(c.results.0.capacity() <= 8, "the window's storage stays its size");
            // Byte for byte the map's encoding, and back.
            let bytes = postcard::to_stdvec(&c.results).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&model.results).unwrap());
            let back: Recent = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, c.results);
        }
        assert!(model.forgotten_up_to.is_some(), "the run evicted");
    }
}
