//! Node configuration: defaults, then a TOML file, then `RATION_*` environment
//! variables, then flags. Unknown keys in the file are refused by name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

/// Everything a node needs. `Config::default()` is a single node on 127.0.0.1:50051
/// with its data in `./ration-data`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's id in the cluster (unique, non-zero).
    pub node_id: u64,
    /// Where clients connect (and peers too, unless `peer_listen` is set). In a
    /// file, `host:port` with an IP address or a hostname (resolved when loaded).
    #[serde(deserialize_with = "de_addr")]
    pub listen: SocketAddr,
    /// The address clients should use to reach this node (and peers, unless
    /// `peer_listen` is set); defaults to `listen`.
    pub advertise: Option<String>,
    /// Where peers connect (Raft, calls forwarded to the leader, leadership
    /// transfer), apart from clients. Unset: one port serves both, which only a
    /// node without TLS may do. A member's address in the membership is its peer
    /// address. A hostname is resolved, as for `listen`.
    #[serde(deserialize_with = "de_opt_addr")]
    pub peer_listen: Option<SocketAddr>,
    /// The address peers dial for this node's peer port; defaults to `peer_listen`.
    pub peer_advertise: Option<String>,
    /// TLS on both ports and when dialling peers: `ca` signs every certificate
    /// accepted (clients and peers must present one), `cert`/`key` are this node's
    /// (a node certificate: `spiffe://<domain>/ration/node/<id>`, with the hosts
    /// it is dialled by). The files are reloaded when they change or on SIGHUP.
    /// `{node_id}` in a path is replaced by this node's id (one Secret holding
    /// every node's files serves a whole StatefulSet).
    pub tls: Option<ration_tls::TlsFiles>,
    /// A file holding the key bearer tokens are checked with (at least 32
    /// bytes; `rationctl token issue` makes tokens with the same file). A client
    /// without a certificate may then send `authorization: Bearer <token>` on the
    /// client port. Only with tls: a token must not cross the network in clear.
    pub token_key_file: Option<PathBuf>,
    /// Serve without TLS on an address other than loopback. Without TLS anyone
    /// who reaches a port can rewrite the ledger; a node refuses to start that way
    /// unless this says it is meant (a network you control end to end).
    pub insecure: bool,
    /// Serve gRPC server reflection on the client port.
    pub reflection: bool,
    /// Bootstrap admins: principals this node treats as role admin whatever roles
    /// the ledger holds (with TLS; a plaintext node checks no roles), so a new
    /// cluster can grant its first roles. Give every node the same list. Empty: only
    /// principals the ledger holds as admin.
    pub admins: Vec<String>,
    /// Where the Raft log, vote, snapshots and audit records live.
    pub data_dir: PathBuf,
    /// The initial voters, as `id=host:port`, this node included. Empty: a
    /// single-node cluster of this node. The node with the lowest id initializes.
    pub initial_cluster: Vec<String>,
    /// An existing member to join through: this node is added as a learner (and
    /// waits there, caught up, for an operator to promote it) unless `join_as` is
    /// `voter`, when it promotes itself once caught up.
    pub join: Option<String>,
    /// `learner` (the default) or `voter`: what a node started with `join` becomes.
    /// Joining as a learner keeps the number of voters the operator's choice (an
    /// even number of voters tolerates no more failures than one fewer).
    pub join_as: String,
    /// `new`: the lowest id in `initial_cluster` creates the cluster if its data
    /// directory is empty. `existing`: the cluster exists already; never create one
    /// (a member whose data was lost waits for the leader to send it everything).
    pub initial_cluster_state: String,
    /// Group commit: most commands per Raft entry.
    pub batch_max_commands: usize,
    /// Group commit: most encoded bytes per Raft entry.
    pub batch_max_bytes: usize,
    /// Group commit: how long the proposer waits to fill an entry.
    pub batch_wait_us: u64,
    /// Most commands queued or being proposed; beyond it callers get UNAVAILABLE
    /// with an "overloaded" detail (`ration_proto::rpc::is_overloaded`).
    pub proposal_queue: usize,
    /// Whether the leader sends each follower a heartbeat as soon as the committed
    /// index advances (openraft's own behaviour). Off (the default), the committed
    /// index rides on the next AppendEntries or heartbeat: with one RPC in flight
    /// per follower, that heartbeat held the next entry back a round trip
    /// (third_party/openraft/RATION-PATCH.md). File only.
    pub commit_heartbeat: bool,
    /// Most log entries proposed and not yet committed at once; while one is in
    /// flight, the next is proposed only when full (benches/README.md, "Pipelined
    /// proposals"). 0: derived from `voter_rtt_ms`
    /// ([`Config::proposals_in_flight`]).
    pub max_proposals_in_flight: usize,
    /// The leader proposes a tick this often, so expiry happens with no writes.
    pub tick_ms: u64,
    /// Most a leader's time stamps may differ from ledger time carried on by its own
    /// monotonic clock: a wrong wall clock moves ledger time by at most this much
    /// per leader term (ration_core::timebound).
    pub clock_slack_ms: u64,
    /// A leader whose wall clock is further than this from ledger time does not
    /// use it (its stamps follow its monotonic clock), and asks the
    /// voters' clocks: ledger time catches up to a time a majority of them reached,
    /// and a leader whose own clock is further than this from theirs hands
    /// leadership over (logged, and counted in `ration_clock_step_downs_total`).
    pub clock_tolerance_ms: u64,
    /// The round trip (ms) between the two most distant voters this cluster is
    /// sized for: 0 (the default) for one region. Every Raft timing below that is
    /// left at 0 is derived from it ([`Config::timing`]): a cluster whose voters
    /// are 300 ms apart sets `voter_rtt_ms = 300` and nothing else.
    pub voter_rtt_ms: u64,
    /// Leader placement: a voter with a higher priority than the leader's takes
    /// leadership once it has caught up (and again after a failover), so the leader
    /// sits where most gateways are. 0 (the default): never asks. At most
    /// [`MAX_LEADER_PRIORITY`].
    pub leader_priority: u32,
    /// The leader's heartbeat interval (ms); 0: derived from `voter_rtt_ms`.
    pub heartbeat_ms: u64,
    /// Deadline of one AppendEntries RPC (replication and heartbeats; ms); 0:
    /// derived from `voter_rtt_ms`. Upstream openraft 0.9 used the heartbeat
    /// interval, so a busy or distant follower had every RPC cancelled
    /// (third_party/openraft/RATION-PATCH.md).
    pub replication_timeout_ms: u64,
    /// How long after hearing from its leader a follower refuses to vote for
    /// another candidate, and waits beyond its election timeout before campaigning
    /// (ms); 0: derived from `voter_rtt_ms`. Upstream openraft 0.9 used
    /// `election_timeout_max_ms`, which made failover about twice as long.
    pub leader_lease_ms: u64,
    /// A follower that hears no leader for the lease plus a random time in
    /// [min, max) ms campaigns; 0: derived from `voter_rtt_ms`.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Deadline of every node-to-node RPC.
    pub rpc_timeout_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_entries: u64,
    /// Also build one once this many audit records are not sealed into segments
    /// (0: off). Under load a log entry carries thousands of commands, so an
    /// entry count alone lets the unsealed audit tail, the log and a restart's
    /// replay grow to tens of millions of records between snapshots; this bounds
    /// them by records. At least `audit_segment_min_records`. Only a node with
    /// on-disk storage seals.
    pub snapshot_after_audit_records: u64,
    /// Log entries kept after a snapshot (for lagging followers) before purging.
    pub keep_log_after_snapshot: u64,
    /// A snapshot build seals the audit records after the last sealed segment into
    /// segment files (`data_dir/audit/`) once there are at least this many; fewer
    /// ride in the snapshot. Bounds the audit records a snapshot carries.
    pub audit_segment_min_records: u64,
    /// Most records in one audit segment file.
    pub audit_segment_max_records: u64,
    /// Where segments older than `audit_archive_after_hours` of ledger time are
    /// moved (off: they stay in `data_dir/audit/`). They stay readable there.
    pub audit_archive_dir: Option<PathBuf>,
    pub audit_archive_after_hours: u64,
    /// Largest client gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Largest node-to-node message: a batch of up to `raft_max_entries_per_rpc`
    /// entries of up to about `batch_max_bytes` each must fit.
    pub peer_max_message_bytes: usize,
    /// Most log entries in one AppendEntries RPC. Each RPC must complete within the
    /// replication timeout, so keep this × the entry size sendable and appendable in
    /// that time.
    pub raft_max_entries_per_rpc: u64,
    /// Snapshot chunk size for install.
    pub snapshot_chunk_bytes: usize,
    /// `text` or `json`.
    pub log_format: String,
    /// Where the Raft log and vote live: `wal` (the default: a write-ahead log
    /// synced with fdatasync before anything is acknowledged) or `sled` (sled's
    /// flush, which a power cut can undo; only to compare the two).
    pub log_store: String,
    /// Prometheus metrics over HTTP (`GET /metrics`) on this address, or `off`.
    pub metrics_listen: String,
    /// A file holding a token `GET /metrics` must present (`Authorization: Bearer
    /// <token>`): the metrics name every tenant and its usage. The probes
    /// (`/livez`, `/readyz`) stay open. Unset: no token.
    pub metrics_token_file: Option<PathBuf>,
    /// Take `node_id` from the hostname's trailing ordinal plus one (`ration-0` is
    /// node 1): a Kubernetes StatefulSet's pods are named that way.
    pub node_id_from_hostname: bool,
    /// Where the leader POSTs alert notices (the records of `webhook_kinds`), as
    /// `http[s]://host[:port]/path`: at least once, with an `Idempotency-Key` and an
    /// HMAC-SHA256 signature (`crate::webhooks`). Give every node the same. Unset:
    /// no webhooks.
    pub webhook_url: Option<String>,
    /// A file holding the webhook signing secret (at least 16 bytes, trimmed).
    pub webhook_secret_file: Option<PathBuf>,
    /// CA certificates (PEM) an https receiver's certificate is checked against.
    /// Unset: the public web's roots (Mozilla's, built in).
    pub webhook_ca_file: Option<PathBuf>,
    /// The kinds of audit record POSTed: some of `threshold_crossed` and
    /// `run_halted` (both by default).
    pub webhook_kinds: Vec<String>,
}

/// Largest `leader_priority`.
pub const MAX_LEADER_PRIORITY: u32 = 100;

/// Largest `voter_rtt_ms` taken into account (a minute).
pub const MAX_VOTER_RTT_MS: u64 = 60_000;
/// Largest `max_proposals_in_flight`.
pub const MAX_PROPOSALS_IN_FLIGHT: usize = 64;

/// Raft's timings, as [`Config::timing`] resolves them (all in ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub replication_timeout_ms: u64,
    pub leader_lease_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Timing {
    /// The longest silence a follower sits out before it campaigns.
    pub fn follower_patience_ms(&self) -> u64 {
        self.leader_lease_ms.saturating_add(self.election_timeout_max_ms)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.heartbeat_ms == 0
            || self.election_timeout_min_ms <= self.heartbeat_ms
            || self.election_timeout_max_ms <= self.election_timeout_min_ms
        {
            return bad(format!(
                "need 0 < heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms, got {} < {} < {}",
                self.heartbeat_ms, self.election_timeout_min_ms, self.election_timeout_max_ms
            ));
        }
        // A replication stream sends one RPC at a time: a follower whose RPC timed
        // out hears the next heartbeat up to deadline + heartbeat later, which must
        // come before it campaigns (lease + the shortest election timeout).
        let quiet = self.leader_lease_ms.saturating_add(self.election_timeout_min_ms);
        if self.replication_timeout_ms < self.heartbeat_ms
            || self.replication_timeout_ms.saturating_add(self.heartbeat_ms) >= quiet
        {
            return bad(format!(
                "replication_timeout_ms {} must be at least heartbeat_ms {} and, plus heartbeat_ms, below leader_lease_ms + election_timeout_min_ms ({quiet}): a replication stream sends one RPC at a time, so a longer one would delay heartbeats past the election timeout",
                self.replication_timeout_ms, self.heartbeat_ms
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            advertise: None,
            peer_listen: None,
            peer_advertise: None,
            tls: None,
            token_key_file: None,
            insecure: false,
            reflection: true,
            admins: vec!["admin".into()],
            data_dir: PathBuf::from("ration-data"),
            initial_cluster: Vec::new(),
            join: None,
            join_as: "learner".into(),
            initial_cluster_state: "new".into(),
            log_store: "wal".into(),
            batch_max_commands: 3072,
            batch_max_bytes: 1 << 20,
            batch_wait_us: 1000,
            proposal_queue: 65_536,
            max_proposals_in_flight: 0,
            commit_heartbeat: false,
            tick_ms: 1000,
            clock_slack_ms: 1000,
            clock_tolerance_ms: 5000,
            // All derived (Config::timing); the trade-off is measured in
            // benches/README.md ("Failover").
            voter_rtt_ms: 0,
            leader_priority: 0,
            heartbeat_ms: 0,
            replication_timeout_ms: 0,
            leader_lease_ms: 0,
            election_timeout_min_ms: 0,
            election_timeout_max_ms: 0,
            rpc_timeout_ms: 2000,
            snapshot_after_entries: 20_000,
            // About 600 MB of unsealed records at 300 bytes each; at 77k records/s
            // (benches/README.md, soak) a snapshot every 27 s.
            snapshot_after_audit_records: 2_097_152,
            keep_log_after_snapshot: 5_000,
            // About 20 MB and 300 MB of records at 300 bytes each.
            audit_segment_min_records: 65_536,
            audit_segment_max_records: 1_048_576,
            audit_archive_dir: None,
            audit_archive_after_hours: 30 * 24,
            max_message_bytes: 8 << 20,
            peer_max_message_bytes: 64 << 20,
            raft_max_entries_per_rpc: 4,
            snapshot_chunk_bytes: 1 << 20,
            log_format: "text".into(),
            metrics_listen: "127.0.0.1:9464".into(),
            metrics_token_file: None,
            webhook_url: None,
            webhook_secret_file: None,
            webhook_ca_file: None,
            webhook_kinds: crate::webhooks::KINDS.iter().map(|k| k.name().to_owned()).collect(),
            node_id_from_hostname: false,
        }
    }
}

/// A peer named in `initial_cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    pub addr: String,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Where clients reach this node.
    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// Where peers reach this node: its address in the membership.
    pub fn member_addr(&self) -> String {
        match (&self.peer_advertise, self.peer_listen) {
            (Some(a), _) => a.clone(),
            (None, Some(l)) => l.to_string(),
            (None, None) => self.advertise_addr(),
        }
    }

    /// The TLS files, `{node_id}` in their paths replaced by this node's id.
    pub fn tls_files(&self) -> Option<ration_tls::TlsFiles> {
        let id = self.node_id.to_string();
        let expand = |p: &Path| PathBuf::from(p.to_string_lossy().replace("{node_id}", &id));
        self.tls.as_ref().map(|t| ration_tls::TlsFiles {
            ca: expand(&t.ca),
            cert: expand(&t.cert),
            key: expand(&t.key),
        })
    }

    /// Whether clients and peers have separate ports.
    pub fn split_ports(&self) -> bool {
        self.peer_listen.is_some()
    }

    pub fn peers(&self) -> Result<Vec<Peer>, ConfigError> {
        self.initial_cluster
            .iter()
            .map(|p| {
                let (id, addr) = p.split_once('=').ok_or_else(|| {
                    ConfigError::Invalid(format!("initial_cluster entry {p:?} is not id=host:port"))
                })?;
                let id = id.parse().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "initial_cluster entry {p:?}: {id:?} is not a node id"
                    ))
                })?;
                Ok(Peer { id, addr: addr.to_owned() })
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.node_id == 0 {
            return bad("node_id must be at least 1".into());
        }
        if self.leader_priority > MAX_LEADER_PRIORITY {
            return bad(format!(
                "leader_priority {} is above the maximum, {MAX_LEADER_PRIORITY}",
                self.leader_priority
            ));
        }
        let peers = self.peers()?;
        if !peers.is_empty() && !peers.iter().any(|p| p.id == self.node_id) {
            return bad(format!("initial_cluster does not name this node (id {})", self.node_id));
        }
        if let Some(bad) =
            self.admins.iter().find(|a| ration_core::Principal::new(a.as_str()).is_err())
        {
            return Err(ConfigError::Invalid(format!("admins: {bad:?} is not a valid principal")));
        }
        if !matches!(self.join_as.as_str(), "learner" | "voter") {
            return bad(format!("join_as {:?} is not learner or voter", self.join_as));
        }
        if !matches!(self.initial_cluster_state.as_str(), "new" | "existing") {
            return bad(format!(
                "initial_cluster_state {:?} is not new or existing",
                self.initial_cluster_state
            ));
        }
        if let Some(me) = peers.iter().find(|p| p.id == self.node_id) {
            if me.addr != self.member_addr() {
                let which = if self.split_ports() { "peer_advertise" } else { "advertise" };
                return bad(format!(
                    "initial_cluster names this node (id {}) at {} but it advertises {} to peers: set {which} to the address peers use{}",
                    self.node_id,
                    me.addr,
                    self.member_addr(),
                    if self.split_ports() { " (initial_cluster lists peer addresses)" } else { "" }
                ));
            }
        }
        if self.peer_listen == Some(self.listen) {
            return bad(format!(
                "peer_listen {} is listen too: give peers another port",
                self.listen
            ));
        }
        if self.peer_advertise.is_none()
            && self.peer_listen.is_some_and(|l| l.ip().is_unspecified())
        {
            return bad(
                "peer_listen is a wildcard address: set peer_advertise to the address peers dial"
                    .into(),
            );
        }
        if self.token_key_file.is_some() && self.tls.is_none() {
            return bad(
                "token_key_file needs tls: a bearer token must not cross the network in clear"
                    .into(),
            );
        }
        match (&self.tls, self.insecure) {
            (Some(_), true) => {
                return bad("insecure and tls are both set: choose one".into());
            }
            (Some(_), false) if self.peer_listen.is_none() => {
                return bad("with tls, peers need a port of their own: set peer_listen (and give \
                     initial_cluster the peer addresses)"
                    .into());
            }
            (None, false) => {
                let exposed = std::iter::once(self.listen)
                    .chain(self.peer_listen)
                    .find(|a| !a.ip().is_loopback());
                if let Some(at) = exposed {
                    return bad(format!(
                        "{at} is not a loopback address and no tls is configured: anyone who \
                         reaches it could rewrite the ledger. Give tls (ca, cert, key: \
                         `rationctl certs dev` makes a development set), or set insecure \
                         (--insecure) if this network is yours end to end"
                    ));
                }
            }
            _ => {}
        }
        if self.advertise.is_none() && self.listen.ip().is_unspecified() {
            return bad(format!(
                "listen {} is a wildcard address: set advertise to the address peers and clients dial",
                self.listen
            ));
        }
        if !peers.is_empty() && self.join.is_some() {
            return bad(
                "give initial_cluster (to form a cluster) or join (to join one), not both".into()
            );
        }
        if self.snapshot_after_audit_records != 0
            && self.snapshot_after_audit_records < self.audit_segment_min_records
        {
            return Err(ConfigError::Invalid(format!(
                "snapshot_after_audit_records ({}) is below audit_segment_min_records ({}): \
                 a snapshot would seal nothing; use 0 to turn it off",
                self.snapshot_after_audit_records, self.audit_segment_min_records
            )));
        }
        if self.audit_segment_min_records == 0
            || self.audit_segment_max_records < self.audit_segment_min_records
        {
            return bad(format!(
                "audit segments: need 1 <= audit_segment_min_records ({}) <= audit_segment_max_records ({})",
                self.audit_segment_min_records, self.audit_segment_max_records
            ));
        }
        // One caller's batch may ride over the limit; the entry must still fit.
        let most =
            ration_core::names::MAX_COMMANDS_PER_ENTRY - ration_proto::convert::MAX_BATCH_OPS;
        if self.batch_max_commands == 0 || self.batch_max_commands > most {
            return bad(format!("batch_max_commands must be 1..={most}"));
        }
        self.timing().check()?;
        if !matches!(self.log_store.as_str(), "wal" | "sled") {
            return bad(format!("log_store {:?} is not wal or sled", self.log_store));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(format!("log_format {:?} is not text or json", self.log_format));
        }
        // An entry holds up to batch_max_bytes of proposals plus one caller's batch
        // (at most MAX_BATCH_OPS commands of at most ~512 bytes: names are bounded);
        // a replication RPC carries raft_max_entries_per_rpc of them.
        let entry_bytes =
            self.batch_max_bytes.saturating_add(ration_proto::convert::MAX_BATCH_OPS * 512);
        let per_rpc = usize::try_from(self.raft_max_entries_per_rpc).unwrap_or(usize::MAX);
        if per_rpc == 0 || entry_bytes.saturating_mul(per_rpc) > self.peer_max_message_bytes {
            return bad(format!(
                "peer_max_message_bytes {} is too small for raft_max_entries_per_rpc {} entries of up to {} bytes",
                self.peer_max_message_bytes, self.raft_max_entries_per_rpc, entry_bytes
            ));
        }
        self.metrics_addr()?;
        if self.max_proposals_in_flight > MAX_PROPOSALS_IN_FLIGHT {
            return bad(format!(
                "max_proposals_in_flight {} must be 0 (derived) to {MAX_PROPOSALS_IN_FLIGHT}",
                self.max_proposals_in_flight
            ));
        }
        if self.proposal_queue == 0 || self.tick_ms == 0 || self.rpc_timeout_ms == 0 {
            return bad("proposal_queue, tick_ms and rpc_timeout_ms must be positive".into());
        }
        if self.proposal_queue < ration_proto::convert::MAX_BATCH_OPS {
            return bad(format!(
                "proposal_queue {} is below one full Batch ({} operations): such a Batch could never be proposed",
                self.proposal_queue,
                ration_proto::convert::MAX_BATCH_OPS
            ));
        }
        Ok(())
    }

    /// The Raft timings in force: each `*_ms` field that is not 0, else derived
    /// from `voter_rtt_ms` (R): heartbeat 100 + R/2, AppendEntries deadline
    /// 350 + 2R, leader lease 200 + 2R, election timeout [300 + 2R, 500 + 5R). The
    /// range widens with R so that two survivors rarely time out within one trip
    /// of each other (a split vote, which costs another election timeout).
    /// With R = 0 a leader's death costs a write gap of under a second here, and a
    /// follower waits 500-700 ms of silence (five heartbeats or more) before it
    /// campaigns (benches/README.md, "Failover"); at R = 300 the deadline is 950 ms.
    pub fn timing(&self) -> Timing {
        let r = self.voter_rtt_ms.min(MAX_VOTER_RTT_MS);
        let or = |set: u64, derived: u64| if set != 0 { set } else { derived };
        let heartbeat_ms = or(self.heartbeat_ms, 100 + r / 2);
        Timing {
            heartbeat_ms,
            replication_timeout_ms: or(
                self.replication_timeout_ms,
                (350 + 2 * r).max(heartbeat_ms),
            ),
            leader_lease_ms: or(self.leader_lease_ms, 200 + 2 * r),
            election_timeout_min_ms: or(self.election_timeout_min_ms, 300 + 2 * r),
            election_timeout_max_ms: or(self.election_timeout_max_ms, 500 + 5 * r),
        }
    }

    /// The longest a failover should take with these timings: a follower sits out
    /// the leader lease and its election timeout; a split vote costs another
    /// election timeout; the votes and the new leader's first commit take round
    /// trips between voters. Lease + 2 x the longest election timeout + 4 x
    /// `voter_rtt_ms`: 1.2 s in one region, 6 s for voters 300 ms apart. Served in
    /// `Status.failover_bound_ms`; the SDK holds leases that outlast it.
    pub fn failover_bound_ms(&self) -> u64 {
        let t = self.timing();
        let r = self.voter_rtt_ms.min(MAX_VOTER_RTT_MS);
        t.leader_lease_ms
            .saturating_add(t.election_timeout_max_ms.saturating_mul(2))
            .saturating_add(r.saturating_mul(4))
    }

    /// Entries the proposer may have in flight: `max_proposals_in_flight`, or when
    /// that is 0, 4 in one region plus one per 25 ms of `voter_rtt_ms`, at most 16
    /// (8 at 100 ms, 16 from 300 ms). A commit between regions takes round trips,
    /// and with four full entries in flight the cluster plateaued at 63-65k ops/s at
    /// 100 ms RTT against 112-116k on loopback; with eight, 88k (benches/README.md,
    /// "Batched throughput at 100 ms RTT against in-flight work").
    pub fn proposals_in_flight(&self) -> usize {
        if self.max_proposals_in_flight != 0 {
            return self.max_proposals_in_flight;
        }
        let r = self.voter_rtt_ms.min(MAX_VOTER_RTT_MS);
        (4 + usize::try_from(r / 25).unwrap_or(usize::MAX)).min(16)
    }

    /// Where to serve metrics: `None` when `metrics_listen` is `off`.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_listen == "off" {
            return Ok(None);
        }
        resolve("metrics_listen", &self.metrics_listen).map(Some)
    }

    /// The token `/metrics` requires, read from `metrics_token_file` (trimmed).
    pub fn metrics_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.metrics_token_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(ConfigError::Invalid(format!(
                "{}: the metrics token has {} characters; use at least 16",
                path.display(),
                token.len()
            )));
        }
        Ok(Some(token.to_owned()))
    }

    /// Where and how to deliver webhooks, with the secret read from its file.
    pub fn webhook(&self) -> Result<Option<crate::webhooks::WebhookTarget>, ConfigError> {
        let Some(url) = &self.webhook_url else {
            for (set, name) in [
                (self.webhook_secret_file.is_some(), "webhook_secret_file"),
                (self.webhook_ca_file.is_some(), "webhook_ca_file"),
            ] {
                if set {
                    return Err(ConfigError::Invalid(format!(
                        "{name} is set but webhook_url is not"
                    )));
                }
            }
            return Ok(None);
        };
        let Some(path) = &self.webhook_secret_file else {
            return Err(ConfigError::Invalid(
                "webhook_url needs webhook_secret_file (the key notices are signed with)".into(),
            ));
        };
        let text = std::fs::read(path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let secret = text.trim_ascii().to_vec();
        crate::webhooks::check_secret(&secret)
            .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        let kinds = crate::webhooks::kinds(&self.webhook_kinds).map_err(ConfigError::Invalid)?;
        let target =
            crate::webhooks::WebhookTarget::parse(url, secret, self.webhook_ca_file.as_deref())
                .map_err(ConfigError::Invalid)?;
        Ok(Some(crate::webhooks::WebhookTarget { kinds, ..target }))
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms)
    }

    /// Reads a TOML file; unknown keys are refused with their name.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
    }
}

/// `rationd` flags; each also reads a `RATION_*` environment variable.
#[derive(Debug, Parser)]
#[command(name = "rationd", version, about = "Ration node: a Raft-replicated quota ledger")]
pub struct Args {
    /// TOML configuration file (see deploy/ration.example.toml); unset: defaults, environment and flags only.
    #[arg(long, env = "RATION_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id, unique in its cluster, at least 1 [default: 1].
    #[arg(long, env = "RATION_NODE_ID")]
    pub node_id: Option<u64>,
    /// Where gRPC is served (clients, operators and peers): host:port, a hostname
    /// resolved at start [default: 127.0.0.1:50051].
    #[arg(long, env = "RATION_LISTEN")]
    pub listen: Option<String>,
    /// The address peers and clients dial (host:port) [default: the listen address;
    /// on a wildcard listen address, this machine's hostname and the listen port].
    #[arg(long, env = "RATION_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where peers connect, apart from clients (required with TLS); unset: the client port serves peers too.
    #[arg(long, env = "RATION_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// The address peers dial for the peer port (default: --peer-listen).
    #[arg(long, env = "RATION_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// The CA certificate (PEM) that signs every client and peer certificate; unset: no TLS.
    #[arg(long, env = "RATION_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM; a node certificate); unset: no TLS.
    #[arg(long, env = "RATION_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM); unset: no TLS.
    #[arg(long, env = "RATION_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The key bearer tokens are checked with (a file; needs TLS); unset: no tokens accepted.
    #[arg(long, env = "RATION_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// Serve without TLS on a non-loopback address (a network you control).
    #[arg(long, env = "RATION_INSECURE")]
    pub insecure: bool,
    /// Do not serve gRPC server reflection.
    #[arg(long, env = "RATION_NO_REFLECTION")]
    pub no_reflection: bool,
    /// Bootstrap admins, comma-separated: principals treated as role admin whatever
    /// the ledger holds (TLS only) [default: admin].
    #[arg(long, env = "RATION_ADMINS", value_delimiter = ',')]
    pub admins: Option<Vec<String>>,
    /// Where the Raft log, snapshots and node id are kept [default: ration-data].
    #[arg(long, env = "RATION_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Initial voters, comma separated: 1=127.0.0.1:50051,2=127.0.0.1:50052,...;
    /// unset: this node alone (unless --join)
    #[arg(long, env = "RATION_INITIAL_CLUSTER", value_delimiter = ',')]
    pub initial_cluster: Option<Vec<String>>,
    /// Join an existing cluster through this member (host:port), as a learner
    /// unless --join-as voter; unset: start with --initial-cluster.
    #[arg(long, env = "RATION_JOIN")]
    pub join: Option<String>,
    /// With --join: `learner` (default; an operator promotes it) or `voter` (it
    /// promotes itself once caught up).
    #[arg(long, env = "RATION_JOIN_AS")]
    pub join_as: Option<String>,
    /// `new` (the default) or `existing`: never create a cluster.
    #[arg(long, env = "RATION_INITIAL_CLUSTER_STATE")]
    pub initial_cluster_state: Option<String>,
    /// `text` (the default) or `json`, on stderr; the filter is RATION_LOG.
    #[arg(long, env = "RATION_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// `wal` (the default; durable against power loss) or `sled` (for comparison).
    #[arg(long, env = "RATION_LOG_STORE")]
    pub log_store: Option<String>,
    /// The leader proposes a tick this often (ms), so leases expire and windows roll
    /// over with no writes [default: 1000].
    #[arg(long, env = "RATION_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Most a leader's wall clock may move ledger time beyond what its monotonic
    /// clock measured, per leader term (ms) [default: 1000].
    #[arg(long, env = "RATION_CLOCK_SLACK_MS")]
    pub clock_slack_ms: Option<u64>,
    /// A leader whose wall clock is further than this from ledger time and from the
    /// voters' clocks hands leadership over (ms) [default: 5000].
    #[arg(long, env = "RATION_CLOCK_TOLERANCE_MS")]
    pub clock_tolerance_ms: Option<u64>,
    /// Round trip (ms) between the two most distant voters; every Raft timing left
    /// at 0 is derived from it (0: one region) [default: 0].
    #[arg(long, env = "RATION_VOTER_RTT_MS")]
    pub voter_rtt_ms: Option<u64>,
    /// Leader placement: a voter with a higher priority than the leader's takes
    /// leadership once caught up (0: never asks; at most 100) [default: 0].
    #[arg(long, env = "RATION_LEADER_PRIORITY")]
    pub leader_priority: Option<u32>,
    /// The leader's heartbeat interval (ms); 0: 100 + voter_rtt_ms/2 [default: 0].
    #[arg(long, env = "RATION_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// A follower that hears no leader for the lease plus a random time in
    /// [min, max) ms campaigns; 0: 300 + 2 x voter_rtt_ms [default: 0].
    #[arg(long, env = "RATION_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// See --election-timeout-min-ms; 0: 500 + 5 x voter_rtt_ms [default: 0].
    #[arg(long, env = "RATION_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// How long after hearing from its leader a follower refuses other candidates
    /// (ms); 0: 200 + 2 x voter_rtt_ms [default: 0].
    #[arg(long, env = "RATION_LEADER_LEASE_MS")]
    pub leader_lease_ms: Option<u64>,
    /// Deadline of one AppendEntries RPC (ms); 0: 350 + 2 x voter_rtt_ms
    /// [default: 0].
    #[arg(long, env = "RATION_REPLICATION_TIMEOUT_MS")]
    pub replication_timeout_ms: Option<u64>,
    /// Build a snapshot (and purge the log before it) after this many entries
    /// [default: 20000].
    #[arg(long, env = "RATION_SNAPSHOT_AFTER_ENTRIES")]
    pub snapshot_after_entries: Option<u64>,
    /// Also build a snapshot once this many audit records are not sealed into
    /// segments; 0: off [default: 2097152].
    #[arg(long, env = "RATION_SNAPSHOT_AFTER_AUDIT_RECORDS")]
    pub snapshot_after_audit_records: Option<u64>,
    /// Seal the audit records into a segment file once this many are not sealed
    /// (fewer ride in the snapshot) [default: 65536].
    #[arg(long, env = "RATION_AUDIT_SEGMENT_MIN_RECORDS")]
    pub audit_segment_min_records: Option<u64>,
    /// Most audit records in one segment file [default: 1048576].
    #[arg(long, env = "RATION_AUDIT_SEGMENT_MAX_RECORDS")]
    pub audit_segment_max_records: Option<u64>,
    /// Move audit segments older than --audit-archive-after-hours here; they stay
    /// readable [default: off].
    #[arg(long, env = "RATION_AUDIT_ARCHIVE_DIR")]
    pub audit_archive_dir: Option<PathBuf>,
    /// Age (hours of ledger time) after which a segment is archived [default: 720].
    #[arg(long, env = "RATION_AUDIT_ARCHIVE_AFTER_HOURS")]
    pub audit_archive_after_hours: Option<u64>,
    /// Most log entries proposed and not yet committed at once; after the first,
    /// only full entries are proposed [default: 0, derived from voter_rtt_ms: 4 in
    /// one region, one more per 25 ms, at most 16].
    #[arg(long, env = "RATION_MAX_PROPOSALS_IN_FLIGHT")]
    pub max_proposals_in_flight: Option<usize>,
    /// Most commands the leader groups into one log entry [default: 3072].
    #[arg(long, env = "RATION_BATCH_MAX_COMMANDS")]
    pub batch_max_commands: Option<usize>,
    /// How long the leader waits for more commands before proposing a partial
    /// entry (microseconds) [default: 1000].
    #[arg(long, env = "RATION_BATCH_WAIT_US")]
    pub batch_wait_us: Option<u64>,
    /// Prometheus metrics, /livez and /readyz address (host:port), or `off`
    /// [default: 127.0.0.1:9464].
    #[arg(long, env = "RATION_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// A file with the bearer token `GET /metrics` requires; unset: no token.
    #[arg(long, env = "RATION_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// POST alert notices (thresholds crossed, runs halted) here: http[s]://host[:port]/path
    /// [default: off].
    #[arg(long, env = "RATION_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// A file with the secret webhook bodies are signed with (HMAC-SHA256), at
    /// least 16 bytes [default: none; needed with --webhook-url].
    #[arg(long, env = "RATION_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// CA certificates (PEM) an https webhook receiver must have its certificate
    /// from [default: the public web's roots, built in].
    #[arg(long, env = "RATION_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<PathBuf>,
    /// The kinds of audit record POSTed, comma-separated: threshold_crossed,
    /// run_halted [default: both].
    #[arg(long, env = "RATION_WEBHOOK_KINDS", value_delimiter = ',')]
    pub webhook_kinds: Option<Vec<String>>,
    /// Node id = the hostname's trailing ordinal + 1 (StatefulSet pod `ration-2` is 3).
    #[arg(long, env = "RATION_NODE_ID_FROM_HOSTNAME")]
    pub node_id_from_hostname: bool,
}

impl Args {
    /// Defaults, then the file, then environment and flags.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field { c.$field = v; }
            )*};
        }
        if let Some(listen) = &self.listen {
            c.listen = resolve("listen", listen)?;
        }
        if let Some(listen) = &self.peer_listen {
            c.peer_listen = Some(resolve("peer_listen", listen)?);
        }
        if self.peer_advertise.is_some() {
            c.peer_advertise = self.peer_advertise.clone();
        }
        match (self.tls_ca.clone(), self.tls_cert.clone(), self.tls_key.clone()) {
            (Some(ca), Some(cert), Some(key)) => {
                c.tls = Some(ration_tls::TlsFiles { ca, cert, key })
            }
            (None, None, None) => {}
            _ => {
                return Err(ConfigError::Invalid(
                    "give --tls-ca, --tls-cert and --tls-key together".into(),
                ))
            }
        }
        if self.insecure {
            c.insecure = true;
        }
        if self.token_key_file.is_some() {
            c.token_key_file = self.token_key_file.clone();
        }
        if self.no_reflection {
            c.reflection = false;
        }
        if self.metrics_token_file.is_some() {
            c.metrics_token_file = self.metrics_token_file.clone();
        }
        if self.webhook_url.is_some() {
            c.webhook_url = self.webhook_url.clone();
        }
        if self.webhook_secret_file.is_some() {
            c.webhook_secret_file = self.webhook_secret_file.clone();
        }
        if self.webhook_ca_file.is_some() {
            c.webhook_ca_file = self.webhook_ca_file.clone();
        }
        if let Some(kinds) = &self.webhook_kinds {
            c.webhook_kinds = kinds.clone();
        }
        set!(
            admins,
            node_id,
            data_dir,
            initial_cluster,
            log_format,
            log_store,
            tick_ms,
            clock_slack_ms,
            clock_tolerance_ms,
            voter_rtt_ms,
            leader_priority,
            heartbeat_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            leader_lease_ms,
            replication_timeout_ms,
            snapshot_after_entries,
            snapshot_after_audit_records,
            audit_segment_min_records,
            audit_segment_max_records,
            audit_archive_after_hours,
            batch_max_commands,
            max_proposals_in_flight,
            batch_wait_us,
            metrics_listen,
            initial_cluster_state
        );
        if self.node_id_from_hostname {
            c.node_id_from_hostname = true;
        }
        if self.audit_archive_dir.is_some() {
            c.audit_archive_dir = self.audit_archive_dir;
        }
        if self.advertise.is_some() {
            c.advertise = self.advertise;
        }
        if self.join.is_some() {
            c.join = self.join;
        }
        if let Some(j) = self.join_as {
            c.join_as = j;
        }
        if c.node_id_from_hostname {
            c.node_id = node_id_from_hostname(&hostname()?)?;
        }
        // A wildcard listen address (a container) is dialled by this machine's name.
        if c.advertise.is_none() && c.listen.ip().is_unspecified() {
            c.advertise = Some(format!("{}:{}", hostname()?, c.listen.port()));
        }
        if let Some(peer) =
            c.peer_listen.filter(|l| c.peer_advertise.is_none() && l.ip().is_unspecified())
        {
            c.peer_advertise = Some(format!("{}:{}", hostname()?, peer.port()));
        }
        c.validate()?;
        Ok(c)
    }
}

/// `listen` in a file: `host:port`, a hostname resolved.
fn de_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    resolve("listen", &text).map_err(serde::de::Error::custom)
}

/// `peer_listen` in a file: `host:port`, a hostname resolved.
fn de_opt_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    resolve("peer_listen", &text).map(Some).map_err(serde::de::Error::custom)
}

/// `host:port` as a socket address: an IP address as is, a hostname resolved (its
/// first address).
fn resolve(what: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs as _;
    addr.to_socket_addrs()
        .map_err(|e| ConfigError::Invalid(format!("{what} {addr:?} is not host:port: {e}")))?
        .next()
        .ok_or_else(|| ConfigError::Invalid(format!("{what} {addr:?} resolves to no address")))
}

/// This machine's hostname: `$HOSTNAME`, else the kernel's.
fn hostname() -> Result<String, ConfigError> {
    if let Ok(h) = std::env::var("HOSTNAME") {
        if !h.is_empty() {
            return Ok(h);
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .map_err(|e| ConfigError::Invalid(format!("node_id_from_hostname: no hostname: {e}")))
}

/// `ration-2` (or `ration-2.ration-peers...`) is node 3.
pub fn node_id_from_hostname(hostname: &str) -> Result<u64, ConfigError> {
    let short = hostname.split('.').next().unwrap_or(hostname);
    short
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| {
            ConfigError::Invalid(format!(
                "node_id_from_hostname: hostname {hostname:?} does not end in -<ordinal>"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_keys_are_refused() {
        Config::default().validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "node_id = 2\nlisten = \"127.0.0.1:6000\"\n").unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!((c.node_id, c.listen.port()), (2, 6000));
        std::fs::write(&path, "node_id = 2\nlisten_addr = \"x\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn raft_timings_derive_from_the_voter_round_trip_unless_set() {
        let t = Config::default().timing();
        assert_eq!(
            t,
            Timing {
                heartbeat_ms: 100,
                replication_timeout_ms: 350,
                leader_lease_ms: 200,
                election_timeout_min_ms: 300,
                election_timeout_max_ms: 500,
            }
        );
        assert_eq!(t.follower_patience_ms(), 700);
        assert_eq!(Config::default().failover_bound_ms(), 1_200);
        assert_eq!(Config { voter_rtt_ms: 300, ..Config::default() }.failover_bound_ms(), 6_000);
        let in_flight = |voter_rtt_ms, set| {
            Config { voter_rtt_ms, max_proposals_in_flight: set, ..Config::default() }
                .proposals_in_flight()
        };
        assert_eq!((in_flight(0, 0), in_flight(50, 0), in_flight(100, 0)), (4, 6, 8));
        assert_eq!((in_flight(300, 0), in_flight(60_000, 0), in_flight(300, 2)), (16, 16, 2));
        let too_many = Config { max_proposals_in_flight: 65, ..Config::default() };
        assert!(too_many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_proposals_in_flight 65"));
        let wan = Config { voter_rtt_ms: 300, ..Config::default() };
        let t = wan.timing();
        assert_eq!((t.heartbeat_ms, t.replication_timeout_ms, t.leader_lease_ms), (250, 950, 800));
        assert_eq!((t.election_timeout_min_ms, t.election_timeout_max_ms), (900, 2000));
        assert!(wan.validate().is_ok());
        // Derived timings are valid at any round trip.
        for r in [1, 50, 100, 260, 1000, 10_000] {
            let c = Config { voter_rtt_ms: r, ..Config::default() };
            assert!(c.validate().is_ok(), "voter_rtt_ms {r}");
        }
        // An explicit value wins; the others stay derived.
        let c = Config { replication_timeout_ms: 400, ..Config::default() };
        assert_eq!(c.timing().replication_timeout_ms, 400);
        assert_eq!(c.timing().heartbeat_ms, 100);
        // The deadline plus a heartbeat must end before a follower campaigns
        // (lease 200 + election 300 = 500 by default).
        for (ms, ok) in [(100, true), (399, true), (400, false), (99, false)] {
            let c = Config { replication_timeout_ms: ms, ..Config::default() };
            let err = c.validate().err().map(|e| e.to_string()).unwrap_or_default();
            assert_eq!(err.is_empty(), ok, "replication_timeout_ms {ms}: {err}");
            if !ok {
                assert!(err.contains("replication_timeout_ms"), "{err}");
            }
        }
        let c = Config { election_timeout_min_ms: 600, ..Config::default() };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("600 < 500"), "{err}");
    }

    /// Every flag says what it is and, unless it is a switch or has no default
    /// (unset means off), its default: `rationd --help` is the reference.
    #[test]
    fn every_flag_has_help_and_says_its_default() {
        use clap::CommandFactory;
        let cmd = Args::command();
        let mut missing = Vec::new();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let help = arg.get_long_help().or(arg.get_help()).map(ToString::to_string);
            let Some(help) = help.filter(|h| !h.trim().is_empty()) else {
                missing.push(format!("--{id}: no description"));
                continue;
            };
            let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            let said = help.contains("default") || help.contains("Unset") || help.contains("unset");
            if !switch && !said && arg.get_default_values().is_empty() {
                missing.push(format!("--{id}: no default said ({help:?})"));
            }
        }
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "node_id = 2\n").unwrap();
        let args =
            Args::try_parse_from(["rationd", "--config", path.to_str().unwrap(), "--node-id", "3"])
                .unwrap();
        assert_eq!(args.into_config().unwrap().node_id, 3);
    }

    #[test]
    fn webhook_flags_name_the_url_ca_and_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef\n").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ration_tls::dev::Ca::new("hooks").unwrap().cert_pem()).unwrap();
        let (secret, ca) = (secret.to_str().unwrap(), ca.to_str().unwrap());
        let webhook = |a: &[&str]| {
            Args::try_parse_from(["rationd"].iter().chain(a)).unwrap().into_config()?.webhook()
        };
        let url = "https://hooks.example.com/r";
        let t = webhook(&["--webhook-url", url, "--webhook-secret-file", secret]).unwrap().unwrap();
        assert_eq!((t.tls.is_some(), t.kinds.as_slice()), (true, &crate::webhooks::KINDS[..]));
        let t = webhook(&[
            "--webhook-url",
            url,
            "--webhook-secret-file",
            secret,
            "--webhook-ca-file",
            ca,
            "--webhook-kinds",
            "run_halted",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(t.kinds, [ration_core::audit::AuditKind::RunHalted]);
        let err = |a: &[&str]| webhook(a).unwrap_err().to_string();
        let e =
            err(&["--webhook-url", url, "--webhook-secret-file", secret, "--webhook-kinds", "x"]);
        assert!(e.contains("webhook_kinds") && e.contains("\"x\""), "{e}");
        let e = err(&["--webhook-ca-file", ca]);
        assert!(e.contains("webhook_ca_file is set but webhook_url is not"), "{e}");
        let e = err(&[
            "--webhook-url",
            "https://h/",
            "--webhook-secret-file",
            secret,
            "--webhook-ca-file",
            "/none",
        ]);
        assert!(e.contains("webhook_ca_file") && e.contains("/none"), "{e}");
        std::fs::write(dir.path().join("short"), "0123\n").unwrap();
        let short = dir.path().join("short");
        let e = err(&["--webhook-url", url, "--webhook-secret-file", short.to_str().unwrap()]);
        assert!(e.contains("short: the webhook secret is 4 bytes"), "{e}");
        assert!(webhook(&[]).unwrap().is_none());
    }

    #[test]
    fn hostnames_are_addresses_and_a_wildcard_listen_advertises_the_hostname() {
        let parse =
            |a: &[&str]| Args::try_parse_from(["rationd"].iter().chain(a)).unwrap().into_config();
        let c = parse(&["--listen", "localhost:50061"]).unwrap();
        assert!(c.listen.ip().is_loopback() && c.listen.port() == 50061, "{}", c.listen);
        let err = parse(&["--listen", "no-such-host.invalid:1"]).unwrap_err().to_string();
        assert!(err.contains("listen") && err.contains("no-such-host.invalid"), "{err}");
        // What `docker run --insecure` gets: the image listens on 0.0.0.0.
        let c = parse(&["--listen", "0.0.0.0:50051", "--insecure"]).unwrap();
        assert_eq!(c.advertise_addr(), format!("{}:50051", hostname().unwrap()));
        // Hostnames in the metrics address, and in a file's listen and peer_listen.
        let c = parse(&["--metrics-listen", "localhost:9465"]).unwrap();
        let m = c.metrics_addr().unwrap().unwrap();
        assert!(m.ip().is_loopback() && m.port() == 9465, "{m}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"localhost:50071\"\npeer_listen = \"localhost:50072\"\n")
            .unwrap();
        let c = Config::from_file(&path).unwrap();
        assert!(c.listen.ip().is_loopback() && c.listen.port() == 50071, "{}", c.listen);
        assert_eq!(c.peer_listen.map(|p| p.port()), Some(50072));
        std::fs::write(&path, "listen = \"no-such-host.invalid:1\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("no-such-host.invalid"), "{err}");
    }

    #[test]
    fn a_node_reachable_from_elsewhere_needs_tls_or_says_it_is_insecure() {
        let parse =
            |a: &[&str]| Args::try_parse_from(["rationd"].iter().chain(a)).unwrap().into_config();
        let err = parse(&["--listen", "0.0.0.0:50051"]).unwrap_err().to_string();
        assert!(err.contains("no tls") && err.contains("--insecure"), "{err}");
        let err = parse(&["--peer-listen", "0.0.0.0:50052"]).unwrap_err().to_string();
        assert!(err.contains("no tls"), "{err}");
        // Loopback stays as easy as ever.
        parse(&[]).unwrap();
        parse(&["--peer-listen", "127.0.0.1:50052"]).unwrap();
        let tls = ["--tls-ca", "ca.pem", "--tls-cert", "n.pem", "--tls-key", "n-key.pem"];
        let err = parse(&tls).unwrap_err().to_string();
        assert!(err.contains("peer_listen"), "{err}");
        let err = parse(&tls[..4]).unwrap_err().to_string();
        assert!(err.contains("together"), "{err}");
        let with_peer: Vec<&str> = tls
            .iter()
            .copied()
            .chain(["--peer-listen", "0.0.0.0:50052", "--listen", "0.0.0.0:50051"])
            .collect();
        let c = parse(&with_peer).unwrap();
        assert_eq!(c.member_addr(), format!("{}:50052", hostname().unwrap()));
        let mut insecure = with_peer.clone();
        insecure.push("--insecure");
        assert!(parse(&insecure).unwrap_err().to_string().contains("both"));
        // Bearer tokens only over TLS.
        let err = parse(&["--token-key-file", "k"]).unwrap_err().to_string();
        assert!(err.contains("token_key_file needs tls"), "{err}");
        let mut tokens = with_peer.clone();
        tokens.extend(["--token-key-file", "k"]);
        parse(&tokens).unwrap();
    }

    #[test]
    fn with_a_peer_port_the_membership_lists_peer_addresses() {
        let c = Config {
            peer_listen: Some("127.0.0.1:50052".parse().unwrap()),
            initial_cluster: vec!["1=127.0.0.1:50051".into()],
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("peer_advertise") && err.contains("peer addresses"), "{err}");
        let c = Config { initial_cluster: vec!["1=127.0.0.1:50052".into()], ..c };
        c.validate().unwrap();
        assert_eq!(
            (c.advertise_addr().as_str(), c.member_addr().as_str()),
            ("127.0.0.1:50051", "127.0.0.1:50052")
        );
        let c = Config { peer_listen: Some(c.listen), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("another port"));
    }

    #[test]
    fn node_ids_come_from_statefulset_hostnames() {
        assert_eq!(node_id_from_hostname("ration-0").unwrap(), 1);
        assert_eq!(node_id_from_hostname("my-ration-12.ration-peers.ns.svc").unwrap(), 13);
        assert!(node_id_from_hostname("ration").is_err());
        let c = Config { metrics_listen: "nowhere".into(), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("metrics_listen"));
        let c = Config { metrics_listen: "off".into(), ..Config::default() };
        assert_eq!(c.metrics_addr().unwrap(), None);
    }

    #[test]
    fn advertised_addresses_must_be_dialable_and_consistent() {
        let c = Config {
            listen: "0.0.0.0:50051".parse().unwrap(),
            insecure: true,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("wildcard"));
        let c = Config { advertise: Some("db-1:50051".into()), ..c };
        c.validate().unwrap();
        let c = Config { initial_cluster: vec!["1=db-2:50051".into()], ..c };
        assert!(c.validate().unwrap_err().to_string().contains("advertises db-1:50051"));
        let c = Config { initial_cluster_state: "old".into(), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("new or existing"));
    }

    #[test]
    fn bad_clusters_are_explained() {
        let c = Config { initial_cluster: vec!["2=x:1".into()], ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("does not name this node"));
        let c = Config { initial_cluster: vec!["x".into()], ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("id=host:port"));
    }
}

/// Checks a member address as peers will dial it (kept beside the membership it
/// guards, in `ration-store`, so offline tools check it too).
pub use ration_store::check_peer_addr;

#[cfg(test)]
mod peer_addr_tests {
    use super::check_peer_addr;

    #[test]
    fn member_addresses_are_host_and_port() {
        for good in ["127.0.0.1:50051", "[::1]:50051", "ration-2.ration:50051", "localhost:1"] {
            assert!(check_peer_addr(good).is_ok(), "{good}");
        }
        for bad in
            ["not-an-address", "host:", ":50051", "host:0", "host:70000", "a..b:1", "-a:1", "a b:1"]
        {
            let e = check_peer_addr(bad).unwrap_err();
            assert!(e.contains("is not host:port"), "{bad}: {e}");
        }
    }
}
