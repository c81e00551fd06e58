//! Target `proto_requests`: every protobuf request Ration receives.
//!
//! The first input byte picks the message kind (its low 7 bits, modulo
//! [`KINDS`]). With the high bit clear, the rest of the input is the message's wire
//! bytes; with it set, the rest is read as choices over a small vocabulary (valid and
//! invalid paths, units, ids, windows, amounts), the message built from them is
//! encoded, and those bytes are checked the same way: that reaches the conversions'
//! success paths far more often than raw bytes do.
//!
//! For every kind: a message that decodes re-encodes and decodes to an equal one.
//! Then what the server does with it:
//! - writes (CreateBudget, UpdateBudget, DeleteBudget, Acquire, Report, Release,
//!   Batch): the `convert` function must not panic; what it accepts must keep every
//!   field, re-encode into the log format (`Entry`, postcard) and decode to an equal
//!   entry, and apply to a small ledger with its invariants intact and replies that
//!   convert back to protobuf;
//! - reads (GetBudget, ListBudgets, GetLease, QueryAudit): the same argument checks
//!   the server makes, then the query, and its answer converted (a page of budgets is
//!   compared with a brute-force scan; an audit record converted out and back in must
//!   be equal to itself);
//! - `AuditRecord` (what clients send back to verify a chain): `audit_record_in` must
//!   be the exact inverse of `audit_record`, and a record verifies iff its hash is
//!   right;
//! - `RaftPayload`: its data decoded as each openraft request the Raft service takes;
//!   log entries in it are checked like `entry_decode` does;
//! - the cluster admin requests carry only numbers and strings the server checks
//!   inline: decoding them is the whole surface.

use std::fmt::Debug;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};
use prost::Message;
use ration_core::audit::{query, verify_chain};
use ration_core::{
    AuditKind, Batch, BudgetPath, ChainHead, Command, Entry, Op, Outcome, Reply, Request,
};
use ration_proto::{convert, v1};
use ration_store::TypeConfig;

use crate::fixture::{fixture, T0};
use crate::input::Input;

/// The message kinds, in selector order.
pub const KINDS: [&str; 19] = [
    "CreateBudgetRequest",
    "UpdateBudgetRequest",
    "DeleteBudgetRequest",
    "GetBudgetRequest",
    "ListBudgetsRequest",
    "AcquireRequest",
    "ReportRequest",
    "ReleaseRequest",
    "GetLeaseRequest",
    "QueryAuditRequest",
    "BatchRequest",
    "AddLearnerRequest",
    "ChangeMembershipRequest",
    "StatusRequest",
    "TransferLeaderRequest",
    "PauseElectionsRequest",
    "SaveSnapshotRequest",
    "RaftPayload",
    "AuditRecord",
];

/// The fuzz target.
pub fn proto_requests(data: &[u8]) {
    let mut input = Input::new(data);
    let selector = input.u8();
    let kind = usize::from(selector & 0x7f) % KINDS.len();
    if selector & 0x80 == 0 {
        check(kind, input.rest());
    } else {
        let bytes = synthesize(kind, &mut input);
        check(kind, &bytes);
    }
}

/// A target input carrying `message`'s wire bytes as kind `kind`.
pub fn raw_input(kind: usize, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len().saturating_add(1));
    out.push(u8::try_from(kind).expect("fewer than 128 kinds"));
    out.extend_from_slice(message);
    out
}

/// A target input that synthesizes a message of kind `kind` from `choices`.
pub fn synthesized_input(kind: usize, choices: &[u8]) -> Vec<u8> {
    let mut out = raw_input(kind, choices);
    out[0] |= 0x80;
    out
}

/// The wire bytes of the message of kind `kind` that `choices` synthesize.
pub fn synthesize_message(kind: usize, choices: &[u8]) -> Vec<u8> {
    synthesize(kind % KINDS.len(), &mut Input::new(choices))
}

/// Decodes `bytes` as `M`; what decodes must survive an encode/decode round trip.
fn decoded<M: Message + Default + PartialEq + Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let encoded = m.encode_to_vec();
    let again = M::decode(encoded.as_slice()).expect("a re-encoded message must decode");
    assert_eq!(again, m, "a message must survive re-encoding");
    Some(m)
}

fn check(kind: usize, bytes: &[u8]) {
    match kind {
        0 => decoded(bytes).iter().for_each(create_budget),
        1 => decoded(bytes).iter().for_each(update_budget),
        2 => decoded(bytes).iter().for_each(delete_budget),
        3 => decoded(bytes).iter().for_each(get_budget),
        4 => decoded(bytes).iter().for_each(list_budgets),
        5 => decoded(bytes).iter().for_each(acquire),
        6 => decoded(bytes).iter().for_each(report),
        7 => decoded(bytes).iter().for_each(release),
        8 => decoded(bytes).iter().for_each(get_lease),
        9 => decoded(bytes).iter().for_each(query_audit),
        10 => decoded(bytes).iter().for_each(batch),
        11 => drop(decoded::<v1::AddLearnerRequest>(bytes)),
        12 => drop(decoded::<v1::ChangeMembershipRequest>(bytes)),
        13 => drop(decoded::<v1::StatusRequest>(bytes)),
        14 => drop(decoded::<v1::TransferLeaderRequest>(bytes)),
        15 => drop(decoded::<v1::PauseElectionsRequest>(bytes)),
        16 => drop(decoded::<v1::SaveSnapshotRequest>(bytes)),
        17 => decoded(bytes).iter().for_each(raft_payload),
        _ => decoded(bytes).iter().for_each(audit_record),
    }
}

// ----- writes -----

fn check_meta(req: &Request, meta: Option<&v1::RequestMeta>) {
    let meta = meta.expect("a converted request had its meta");
    assert_eq!(req.client.as_str(), meta.client_id);
    assert_eq!(req.request_id, meta.request_id);
    assert_eq!(req.principal.as_str(), meta.principal);
}

fn amount_of(value: i64) -> u64 {
    u64::try_from(value).expect("convert accepted only non-negative amounts")
}

fn check_spec(spec: &ration_core::BudgetSpec, path: &str, limits: &[v1::Limit]) {
    assert_eq!(spec.path.as_str(), path);
    assert_eq!(spec.limits.len(), limits.len());
    for (core, wire) in spec.limits.iter().zip(limits) {
        assert_eq!(&convert::to_proto::limit(core), wire, "a limit must convert back to itself");
    }
}

/// Puts converted requests in a log entry, checks it survives its encoding, applies
/// it to a copy of the fixture and checks the ledger; returns the outcomes.
fn apply_converted(requests: Vec<Request>) -> Vec<Outcome> {
    let n = requests.len();
    let entry = Entry::V1(Batch {
        time_ms: T0.saturating_add(2_000),
        commands: requests.into_iter().map(Command::Request).collect(),
    });
    let back = Entry::decode(&entry.encode()).expect("a converted request's entry must decode");
    assert_eq!(back, entry, "a converted request must survive the log encoding");
    let f = fixture();
    let mut ledger = f.ledger.clone();
    let index = ledger.last_index().saturating_add(1);
    let applied = ledger.apply(index, &back);
    assert_eq!(applied.outcomes.len(), n, "one outcome per command");
    if let Err(e) = ledger.check_invariants() {
        panic!("invariant broken by converted requests {entry:?}: {e}");
    }
    let head = verify_chain(&applied.audit, f.ledger.chain_head()).expect("audit chain verifies");
    assert_eq!(head, ledger.chain_head());
    for outcome in &applied.outcomes {
        let _ = convert::to_proto::batch_result(outcome);
        if let Err(e) = outcome {
            let _ = convert::to_proto::status(e);
        }
    }
    applied.outcomes
}

fn create_budget(m: &v1::CreateBudgetRequest) {
    let Ok(req) = convert::to_core::create_budget(m) else { return };
    check_meta(&req, m.meta.as_ref());
    let Op::CreateBudget(spec) = &req.op else { panic!("create_budget gave {req:?}") };
    check_spec(spec, &m.path, &m.limits);
    for reply in apply_converted(vec![req]).into_iter().flatten() {
        let changed =
            convert::to_proto::budget_changed(&m.path, &reply).expect("a create reply converts");
        assert_eq!(changed.version, 1);
    }
}

fn update_budget(m: &v1::UpdateBudgetRequest) {
    let Ok(req) = convert::to_core::update_budget(m) else { return };
    check_meta(&req, m.meta.as_ref());
    let Op::UpdateBudget { spec, expected_version } = &req.op else {
        panic!("update_budget gave {req:?}")
    };
    check_spec(spec, &m.path, &m.limits);
    assert_eq!(*expected_version, m.expected_version);
    for reply in apply_converted(vec![req]).into_iter().flatten() {
        convert::to_proto::budget_changed(&m.path, &reply).expect("an update reply converts");
    }
}

fn delete_budget(m: &v1::DeleteBudgetRequest) {
    let Ok(req) = convert::to_core::delete_budget(m) else { return };
    check_meta(&req, m.meta.as_ref());
    let Op::DeleteBudget { path, expected_version } = &req.op else {
        panic!("delete_budget gave {req:?}")
    };
    assert_eq!(path.as_str(), m.path);
    assert_eq!(*expected_version, m.expected_version);
    for reply in apply_converted(vec![req]).into_iter().flatten() {
        let changed =
            convert::to_proto::budget_changed(&m.path, &reply).expect("a delete reply converts");
        assert_eq!(changed.version, 0);
    }
}

fn check_acquire(req: &Request, m: &v1::AcquireRequest) {
    check_meta(req, m.meta.as_ref());
    let a = match &req.op {
        Op::Acquire(a) if m.starts_at_ms == 0 => a,
        Op::AcquireNext(n) if m.starts_at_ms == n.starts_at_ms && m.starts_at_ms > 0 => &n.acquire,
        _ => panic!("acquire gave {req:?}"),
    };
    assert_eq!(a.budget.as_str(), m.budget);
    assert_eq!(a.unit.as_str(), m.unit);
    assert_eq!(a.wanted, amount_of(m.wanted));
    assert_eq!(a.min, amount_of(m.min));
    assert_eq!(a.ttl_ms, amount_of(m.ttl_ms));
}

fn check_report(req: &Request, m: &v1::ReportRequest) {
    check_meta(req, m.meta.as_ref());
    let Op::Report(r) = &req.op else { panic!("report gave {req:?}") };
    assert_eq!(r.lease.raw(), m.lease_id);
    assert_eq!(r.consumed_delta, amount_of(m.consumed_delta));
    assert_eq!(r.renew_ttl_ms, m.renew_ttl_ms.map(amount_of));
}

fn check_release(req: &Request, m: &v1::ReleaseRequest) {
    check_meta(req, m.meta.as_ref());
    let Op::Release(r) = &req.op else { panic!("release gave {req:?}") };
    assert_eq!(r.lease.raw(), m.lease_id);
    assert_eq!(r.consumed_total, amount_of(m.consumed_total));
}

fn check_overrun(req: &Request, m: &v1::OverrunRequest) {
    check_meta(req, m.meta.as_ref());
    let Op::Overrun(o) = &req.op else { panic!("overrun gave {req:?}") };
    assert_eq!(o.budget.as_str(), m.budget);
    assert_eq!(o.unit.as_str(), m.unit);
    assert_eq!(o.amount, amount_of(m.amount));
}

fn check_reply(outcome: &Outcome) {
    let Ok(reply) = outcome else { return };
    match reply {
        Reply::Granted(_) => {
            let lease = convert::to_proto::lease(reply).expect("a grant converts");
            assert!(lease.granted >= 0 && lease.ttl_ms >= 0, "{lease:?}");
        }
        Reply::Reported { .. } => {
            let r = convert::to_proto::report_reply(reply).expect("a report reply converts");
            assert!(r.unreported >= 0, "{r:?}");
        }
        Reply::Released { .. } => {
            let r = convert::to_proto::release_reply(reply).expect("a release reply converts");
            assert!(r.returned >= 0 && r.refunded >= 0, "{r:?}");
        }
        Reply::OverrunRecorded { .. } => {
            let r = convert::to_proto::overrun_reply(reply).expect("an overrun reply converts");
            assert!(r.recorded > 0, "{r:?}");
        }
        other => panic!("a lease operation answered {other:?}"),
    }
}

fn acquire(m: &v1::AcquireRequest) {
    let Ok(req) = convert::to_core::acquire(m) else { return };
    check_acquire(&req, m);
    apply_converted(vec![req]).iter().for_each(check_reply);
}

fn report(m: &v1::ReportRequest) {
    let Ok(req) = convert::to_core::report(m) else { return };
    check_report(&req, m);
    apply_converted(vec![req]).iter().for_each(check_reply);
}

fn release(m: &v1::ReleaseRequest) {
    let Ok(req) = convert::to_core::release(m) else { return };
    check_release(&req, m);
    apply_converted(vec![req]).iter().for_each(check_reply);
}

fn batch(m: &v1::BatchRequest) {
    let Ok(converted) = convert::to_core::batch(m) else { return };
    assert_eq!(converted.len(), m.ops.len());
    let mut requests = Vec::new();
    for (req, op) in converted.into_iter().zip(&m.ops) {
        // A refused operation is refused alone, naming its position.
        let Ok(req) = req else { continue };
        requests.push(req);
        let req = requests.last().expect("just pushed");
        match op.op.as_ref() {
            Some(v1::batch_op::Op::Acquire(a)) => check_acquire(req, a),
            Some(v1::batch_op::Op::Report(r)) => check_report(req, r),
            Some(v1::batch_op::Op::Release(r)) => check_release(req, r),
            Some(v1::batch_op::Op::Overrun(o)) => check_overrun(req, o),
            Some(v1::batch_op::Op::RecordCall(c)) => {
                let ration_core::Op::RecordCall(call) = req.op.inner() else {
                    panic!("a record_call converted to {:?}", req.op)
                };
                assert_eq!(
                    (call.budget.as_str(), call.trace.as_str()),
                    (c.budget.as_str(), c.trace.as_str())
                );
            }
            None => panic!("batch accepted an empty op"),
        }
    }
    if !requests.is_empty() {
        apply_converted(requests).iter().for_each(check_reply);
    }
}

// ----- reads: converted by the server's own converters -----

fn get_budget(m: &v1::GetBudgetRequest) {
    let Ok(path) = convert::to_core::get_budget(m) else { return };
    if let Some(view) = fixture().ledger.budget(&path) {
        assert_eq!(view.path, path);
        let out = convert::to_proto::budget(&view);
        assert_eq!(out.path, m.path);
    }
}

fn list_budgets(m: &v1::ListBudgetsRequest) {
    let Ok(page) = convert::to_core::list_budgets(m) else { return };
    assert!(page.limit >= 1 && page.limit <= convert::MAX_PAGE, "a page is never empty or huge");
    let ledger = &fixture().ledger;
    let (subtree, after) = (page.subtree.as_ref(), page.start_after.as_ref());
    let got: Vec<BudgetPath> = ledger
        .budgets(subtree, after, page.limit)
        .iter()
        .map(|v| {
            let _ = convert::to_proto::budget(v);
            v.path.clone()
        })
        .collect();
    // The same page by brute force: every budget, in path order, filtered.
    let expected: Vec<BudgetPath> = ledger
        .budgets(None, None, usize::MAX)
        .into_iter()
        .map(|v| v.path)
        .filter(|p| subtree.is_none_or(|s| p.is_within(s)))
        .filter(|p| after.is_none_or(|a| p > a))
        .take(page.limit)
        .collect();
    assert_eq!(got, expected, "ListBudgets({page:?}) pages wrongly");
}

fn get_lease(m: &v1::GetLeaseRequest) {
    let id = convert::to_core::get_lease(m);
    if let Some(view) = fixture().ledger.lease(id) {
        assert_eq!(view.lease, id);
        assert_eq!(convert::to_proto::lease_info(&view).lease_id, m.lease_id);
    }
}

fn query_audit(m: &v1::QueryAuditRequest) {
    let Ok(page) = convert::to_core::query_audit(m) else { return };
    assert!(page.limit >= 1 && page.limit <= convert::MAX_PAGE, "a page is never empty or huge");
    let records = &fixture().audit;
    let from = usize::try_from(page.from_seq).unwrap_or(usize::MAX);
    for record in query(records.iter().skip(from), &page.filter).take(page.limit) {
        assert!(page.filter.matches(record));
        let wire = convert::to_proto::audit_record(record);
        let back =
            convert::to_core::audit_record(&wire).expect("a ledger audit record converts back");
        assert_eq!(&back, record, "audit records must convert out and back exactly");
    }
}

// ----- what clients and peers send that is not a ledger request -----

fn audit_record(m: &v1::AuditRecord) {
    let Ok(record) = convert::to_core::audit_record(m) else { return };
    assert_eq!(
        &convert::to_proto::audit_record(&record),
        m,
        "audit_record_in must invert audit_record"
    );
    let bytes = postcard::to_stdvec(&record).expect("a record encodes");
    let back: ration_core::AuditRecord = postcard::from_bytes(&bytes).expect("a record decodes");
    assert_eq!(back, record);
    let e = &record.entry;
    let start = ChainHead { next_seq: e.seq, last_hash: e.prev_hash };
    let verified = verify_chain(std::iter::once(&record), start);
    assert_eq!(
        verified.is_ok(),
        e.compute_hash() == record.hash,
        "a single record verifies iff its hash is right: {verified:?}"
    );
}

fn reencodes_identically<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) {
    let bytes = postcard::to_stdvec(value).expect("a decoded value encodes");
    let again: T = postcard::from_bytes(&bytes).expect("a re-encoded value decodes");
    assert_eq!(postcard::to_stdvec(&again).expect("encodes"), bytes, "encoding is not stable");
}

fn raft_payload(m: &v1::RaftPayload) {
    if let Ok(req) = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(&m.data) {
        reencodes_identically(&req);
        for entry in &req.entries {
            if let EntryPayload::Normal(e) = &entry.payload {
                let back = Entry::decode(&e.encode()).expect("a log entry re-encodes");
                assert_eq!(&back, &**e);
            }
        }
    }
    if let Ok(req) = postcard::from_bytes::<VoteRequest<u64>>(&m.data) {
        let bytes = postcard::to_stdvec(&req).expect("encodes");
        assert_eq!(postcard::from_bytes::<VoteRequest<u64>>(&bytes).ok(), Some(req));
    }
    if let Ok(req) = postcard::from_bytes::<InstallSnapshotRequest<TypeConfig>>(&m.data) {
        reencodes_identically(&req);
    }
}

// ----- synthesized messages -----

const PATHS: [&str; 10] = ["a", "a/b", "a/c", "a/b/d", "x", "Z", "a-b", "", "a//b", "a/"];
const UNITS: [&str; 5] = ["t", "u", "v", "", "T"];
const CLIENTS: [&str; 4] = ["c0", "c1", "", "bad id"];
const PRINCIPALS: [&str; 5] = ["p0", "p1", "admin", "", "x y"];
const OFFSETS: [i32; 8] = [0, 330, -90, 840, 841, -841, 1 << 20, i32::MIN];

fn string(input: &mut Input<'_>, vocab: &[&str]) -> String {
    if input.u8() % 16 == 15 {
        String::from_utf8_lossy(input.take(40)).into_owned()
    } else {
        (*input.pick(vocab)).to_owned()
    }
}

fn meta(input: &mut Input<'_>) -> Option<v1::RequestMeta> {
    if input.u8() % 16 == 15 {
        return None;
    }
    Some(v1::RequestMeta {
        client_id: string(input, &CLIENTS),
        request_id: u64::from(input.u8()),
        principal: string(input, &PRINCIPALS),
        ..Default::default()
    })
}

fn amount(input: &mut Input<'_>) -> i64 {
    match input.u8() % 8 {
        0..=3 => i64::from(input.u8() % 60),
        4 => 1000,
        5 => *input.pick(&[-1, i64::MIN]),
        6 => *input.pick(&[1_000_000_000_000_000_000, 1_000_000_000_000_000_001, i64::MAX]),
        _ => input.i64(),
    }
}

fn window(input: &mut Input<'_>) -> Option<v1::Window> {
    if input.u8() % 16 == 15 {
        return None;
    }
    // 1..=6 are the periods (a zero byte reads as minute), 7 is unknown, 0 unspecified.
    let period = i32::from((input.u8() % 8 + 1) % 8);
    Some(v1::Window { period, offset_minutes: *input.pick(&OFFSETS) })
}

fn limit(input: &mut Input<'_>) -> v1::Limit {
    v1::Limit {
        unit: string(input, &UNITS),
        cap: amount(input),
        window: window(input),
        static_allowance: input.bool().then(|| amount(input)),
    }
}

fn limits(input: &mut Input<'_>) -> Vec<v1::Limit> {
    let n = if input.u8() % 16 == 15 { 17 } else { input.below(4) };
    (0..n).map(|_| limit(input)).collect()
}

fn lease_id(input: &mut Input<'_>) -> u64 {
    let leases = &fixture().leases;
    match input.u8() % 4 {
        0..=1 if !leases.is_empty() => input.pick(leases).raw(),
        2 => 0,
        _ => input.u64(),
    }
}

fn acquire_request(input: &mut Input<'_>) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: meta(input),
        budget: string(input, &PATHS),
        unit: string(input, &UNITS),
        wanted: amount(input),
        min: amount(input),
        ttl_ms: *input.pick(&[0, 1_000, 600_000, 3_600_001, -5, i64::MAX]),
        starts_at_ms: *input.pick(&[0, 0, 0, 1, 1_764_340_260_000, u64::MAX]),
    }
}

fn report_request(input: &mut Input<'_>) -> v1::ReportRequest {
    v1::ReportRequest {
        meta: meta(input),
        lease_id: lease_id(input),
        consumed_delta: amount(input),
        renew_ttl_ms: input.bool().then(|| amount(input)),
    }
}

fn release_request(input: &mut Input<'_>) -> v1::ReleaseRequest {
    v1::ReleaseRequest {
        meta: meta(input),
        lease_id: lease_id(input),
        consumed_total: amount(input),
    }
}

fn overrun_request(input: &mut Input<'_>) -> v1::OverrunRequest {
    v1::OverrunRequest {
        meta: meta(input),
        budget: string(input, &PATHS),
        unit: string(input, &UNITS),
        amount: amount(input),
    }
}

fn kind_name(input: &mut Input<'_>) -> String {
    match input.u8() % 8 {
        7 => string(input, &["nope", "", "LeaseGranted"]),
        _ => input.pick(&AuditKind::ALL).name().to_owned(),
    }
}

fn mutated_record(input: &mut Input<'_>) -> v1::AuditRecord {
    let records = &fixture().audit;
    let mut r = convert::to_proto::audit_record(input.pick(records));
    for _ in 0..input.below(4) {
        match input.u8() % 12 {
            0 => r.seq = u64::from(input.u8()),
            1 => r.kind = kind_name(input),
            2 => r.budget = string(input, &PATHS),
            3 => r.unit = string(input, &UNITS),
            4 => r.principal = string(input, &PRINCIPALS),
            5 => r.lease_id = lease_id(input),
            6 => {
                if let Some(flow) = r.flow.as_mut() {
                    flow.granted = amount(input);
                }
            }
            7 => r.flow = None,
            8 => {
                let at = input.below(32);
                if let Some(b) = r.hash.get_mut(at) {
                    *b ^= 1;
                }
            }
            9 => r.prev_hash.truncate(input.below(33)),
            10 => r.limits.push(limit(input)),
            _ => {
                if let Some(b) = r.balances.first_mut() {
                    b.window = window(input);
                    b.cap = amount(input);
                }
            }
        }
    }
    r
}

fn raft_data(input: &mut Input<'_>) -> Vec<u8> {
    let vote = Vote::new(u64::from(input.u8()), u64::from(input.u8()));
    let log_id = |input: &mut Input<'_>| {
        input.bool().then(|| {
            LogId::new(
                CommittedLeaderId::new(u64::from(input.u8()), u64::from(input.u8())),
                u64::from(input.u8()),
            )
        })
    };
    let encoded = match input.u8() % 3 {
        0 => {
            let entries = (0..input.below(3))
                .map(|i| {
                    let payload = match input.u8() % 3 {
                        0 => EntryPayload::Blank,
                        _ => {
                            let m = acquire_request(input);
                            let commands = convert::to_core::acquire(&m)
                                .map(|r| vec![Command::Request(r), Command::Tick])
                                .unwrap_or_default();
                            EntryPayload::Normal(Entry::V1(Batch { time_ms: T0, commands }).into())
                        }
                    };
                    openraft::Entry::<TypeConfig> {
                        log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64),
                        payload,
                    }
                })
                .collect();
            let req = AppendEntriesRequest::<TypeConfig> {
                vote,
                prev_log_id: log_id(input),
                entries,
                leader_commit: log_id(input),
            };
            postcard::to_stdvec(&req)
        }
        1 => postcard::to_stdvec(&VoteRequest { vote, last_log_id: log_id(input) }),
        _ => {
            let req = InstallSnapshotRequest::<TypeConfig> {
                vote,
                meta: openraft::SnapshotMeta {
                    last_log_id: log_id(input),
                    last_membership: openraft::StoredMembership::default(),
                    snapshot_id: "1-1-2".to_owned(),
                },
                offset: u64::from(input.u8()),
                data: fixture().ledger.snapshot(),
                done: input.bool(),
            };
            postcard::to_stdvec(&req)
        }
    };
    encoded.expect("encoding into a Vec cannot fail")
}

fn synthesize(kind: usize, input: &mut Input<'_>) -> Vec<u8> {
    match kind {
        0 => v1::CreateBudgetRequest {
            meta: meta(input),
            path: string(input, &PATHS),
            limits: limits(input),
        }
        .encode_to_vec(),
        1 => v1::UpdateBudgetRequest {
            meta: meta(input),
            path: string(input, &PATHS),
            limits: limits(input),
            expected_version: u64::from(input.u8() % 4),
        }
        .encode_to_vec(),
        2 => v1::DeleteBudgetRequest {
            meta: meta(input),
            path: string(input, &PATHS),
            expected_version: input.bool().then(|| u64::from(input.u8() % 4)),
        }
        .encode_to_vec(),
        3 => v1::GetBudgetRequest { path: string(input, &PATHS), linearizable: input.bool() }
            .encode_to_vec(),
        4 => v1::ListBudgetsRequest {
            subtree: if input.bool() { String::new() } else { string(input, &PATHS) },
            start_after: if input.bool() { String::new() } else { string(input, &PATHS) },
            limit: *input.pick(&[0, 1, 2, 3, 1001, u32::MAX]),
            linearizable: input.bool(),
        }
        .encode_to_vec(),
        5 => acquire_request(input).encode_to_vec(),
        6 => report_request(input).encode_to_vec(),
        7 => release_request(input).encode_to_vec(),
        8 => v1::GetLeaseRequest { lease_id: lease_id(input), linearizable: input.bool() }
            .encode_to_vec(),
        9 => v1::QueryAuditRequest {
            subtree: if input.bool() { String::new() } else { string(input, &PATHS) },
            principal: if input.bool() { String::new() } else { string(input, &PRINCIPALS) },
            kinds: (0..input.below(3)).map(|_| kind_name(input)).collect(),
            from_ms: input.bool().then(|| T0.saturating_add(u64::from(input.u16()))),
            to_ms: input.bool().then(|| T0.saturating_add(u64::from(input.u16()))),
            from_seq: u64::from(input.u8() % 16),
            limit: *input.pick(&[0, 1, 3, 5000]),
            linearizable: input.bool(),
            trace: if input.bool() { String::new() } else { string(input, &PRINCIPALS) },
            client_id: if input.bool() { String::new() } else { string(input, &PRINCIPALS) },
        }
        .encode_to_vec(),
        10 => {
            let n = if input.u8() % 32 == 31 { 1025 } else { input.below(5) };
            let ops = (0..n)
                .map(|_| v1::BatchOp {
                    op: match input.u8() % 8 {
                        0..=2 => Some(v1::batch_op::Op::Acquire(acquire_request(input))),
                        3..=4 => Some(v1::batch_op::Op::Report(report_request(input))),
                        5 => Some(v1::batch_op::Op::Release(release_request(input))),
                        6 => Some(v1::batch_op::Op::Overrun(overrun_request(input))),
                        _ => None,
                    },
                })
                .collect();
            v1::BatchRequest { ops }.encode_to_vec()
        }
        11 => v1::AddLearnerRequest {
            id: u64::from(input.u8()),
            addr: string(input, &["127.0.0.1:7001", ""]),
        }
        .encode_to_vec(),
        12 => v1::ChangeMembershipRequest {
            voters: (0..input.below(4)).map(|_| u64::from(input.u8())).collect(),
            retain: input.bool(),
            remove: (0..input.below(3)).map(|_| u64::from(input.u8())).collect(),
        }
        .encode_to_vec(),
        13 => v1::StatusRequest { digest: input.bool() }.encode_to_vec(),
        14 => v1::TransferLeaderRequest { to: input.u64() }.encode_to_vec(),
        15 => v1::PauseElectionsRequest { ms: input.u64() }.encode_to_vec(),
        16 => v1::SaveSnapshotRequest {}.encode_to_vec(),
        17 => v1::RaftPayload { data: raft_data(input), cluster_id: input.u64() }.encode_to_vec(),
        _ => mutated_record(input).encode_to_vec(),
    }
}
