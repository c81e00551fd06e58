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

use std::collections::{BTreeMap, BTreeSet};

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
struct ClientRequests {
    /// Request ids at or below this were evicted from the window.
    forgotten_up_to: Option<u64>,
    last_seen_ms: u64,
    results: BTreeMap<u64, Remembered>,
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
    /// The principal each client is counted against. In the snapshot's fourth
    /// section (older snapshots have none: their clients count against nobody until
    /// they are forgotten).
    #[serde(skip)]
    pub(crate) owners: HashIndex<ClientId, Principal>,
}

impl Dedup {
    pub(crate) fn check(
        &self,
        client: &ClientId,
        request_id: u64,
        fingerprint: u64,
        window: u32,
    ) -> Seen {
        let Some(c) = self.clients.get(client) else {
            return Seen::New;
        };
        // Clients number their requests upwards: an id above every remembered and
        // forgotten one is new, found at the window's end, in the nodes the last
        // insert touched.
        let above_forgotten = c.forgotten_up_to.is_none_or(|f| request_id > f);
        if above_forgotten && c.results.last_key_value().is_some_and(|(last, _)| request_id > *last)
        {
            return Seen::New;
        }
        if let Some(r) = c.results.get(&request_id) {
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

    /// The principal `client` is counted against, if the table holds it.
    pub(crate) fn owner(&self, client: &ClientId) -> Option<&Principal> {
        self.owners.get(client)
    }

    pub(crate) fn knows(&self, client: &ClientId) -> bool {
        self.clients.contains_key(client)
    }

    /// Whether remembering one more result for `client` makes the table hold more
    /// (a new client, or a window not yet full).
    pub(crate) fn grows(&self, client: &ClientId, window: u32) -> bool {
        self.clients.get(client).is_none_or(|c| c.results.len() < window as usize)
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
                self.owners.insert(client.clone(), principal.clone());
                principals.change(principal, |u| u.clients = u.clients.saturating_add(1));
                self.clients.entry(client.clone()).or_default()
            }
        };
        let before = c.results.len();
        // Re-index only when the time moved: most requests share a time stamp.
        let reindex = c.results.is_empty() || c.last_seen_ms != now_ms;
        if reindex {
            self.by_last_seen.remove(&(c.last_seen_ms, client.clone()));
            c.last_seen_ms = now_ms;
        }
        c.results.insert(request_id, Remembered { fingerprint, outcome });
        while c.results.len() > config.dedup_window as usize {
            if let Some((evicted, _)) = c.results.pop_first() {
                c.forgotten_up_to = Some(c.forgotten_up_to.map_or(evicted, |f| f.max(evicted)));
            }
        }
        let after = c.results.len();
        if reindex {
            self.by_last_seen.insert((now_ms, client.clone()));
        }
        if after != before {
            if let Some(owner) = self.owners.get(client) {
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
                let results = self.clients.remove(&client).map_or(0, |c| c.results.len() as u64);
                if let Some(owner) = self.owners.remove(&client) {
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
        for (id, owner) in self.owners.values_any_order_keyed() {
            let results = self.clients.get(id).map_or(0, |c| c.results.len() as u64);
            principals.change(owner, |u| {
                u.clients = u.clients.saturating_add(1);
                u.outcomes = u.outcomes.saturating_add(results);
            });
        }
    }

    /// Rebuilds the derived indexes, and counts each owned client's results
    /// against its owner (owners of clients no longer held are dropped).
    pub(crate) fn rebuild(&mut self, principals: &mut Principals) {
        self.by_last_seen = self
            .clients
            .values_any_order_keyed()
            .map(|(id, c)| (c.last_seen_ms, id.clone()))
            .collect();
        let clients = &self.clients;
        self.owners.retain(|id, _| clients.contains_key(id));
        self.count_owned(principals);
    }

    pub(crate) fn clients(&self) -> usize {
        self.clients.len()
    }

    pub(crate) fn remembered(&self) -> usize {
        self.clients.values_any_order().map(|c| c.results.len()).sum()
    }
}
