//! Exactly-once: the replicated table of remembered results.
//!
//! Per client it keeps the results of its most recent requests (a sliding window of
//! request ids, like an anti-replay window). A request id already in the window gets
//! its first result back; one below the window was forgotten and is refused rather
//! than executed twice. A client idle for longer than the configured time is
//! forgotten entirely, and so is the least recently seen one when the table is full.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::Outcome;
use crate::error::LedgerError;
use crate::ledger::LedgerConfig;
use crate::names::ClientId;

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
    clients: BTreeMap<ClientId, ClientRequests>,
    /// Derived: clients by the ledger time they were last seen.
    #[serde(skip)]
    by_last_seen: BTreeSet<(u64, ClientId)>,
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

    pub(crate) fn remember(
        &mut self,
        client: &ClientId,
        request_id: u64,
        fingerprint: u64,
        outcome: Outcome,
        now_ms: u64,
        config: &LedgerConfig,
    ) {
        let c = match self.clients.get_mut(client) {
            Some(c) => c,
            None => self.clients.entry(client.clone()).or_default(),
        };
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
        if reindex {
            self.by_last_seen.insert((now_ms, client.clone()));
        }
        while self.clients.len() as u64 > config.max_dedup_clients {
            if !self.forget_oldest() {
                break;
            }
        }
    }

    /// Forgets clients not seen since `now_ms - idle_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64, idle_ms: u64) {
        let cutoff = now_ms.saturating_sub(idle_ms);
        while self.by_last_seen.first().is_some_and(|(t, _)| *t < cutoff) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) -> bool {
        match self.by_last_seen.pop_first() {
            Some((_, client)) => {
                self.clients.remove(&client);
                true
            }
            None => false,
        }
    }

    pub(crate) fn rebuild(&mut self) {
        self.by_last_seen =
            self.clients.iter().map(|(id, c)| (c.last_seen_ms, id.clone())).collect();
    }

    pub(crate) fn clients(&self) -> usize {
        self.clients.len()
    }

    pub(crate) fn remembered(&self) -> usize {
        self.clients.values().map(|c| c.results.len()).sum()
    }
}
