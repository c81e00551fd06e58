//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`):
//! the one place that converts between Envoy's protobuf messages and the agent's
//! types.

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ration_proto::v1;

use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use envoy_types::pb::envoy::r#type::v3::{RateLimitStrategy, TokenBucket};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::{
    AbandonAction, BucketAction as Action, QuotaAssignmentAction,
};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::BucketAction;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::{
    RateLimitQuotaService, RateLimitQuotaServiceServer,
};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

use crate::agent::{Agent, Decision, LimitView, Refusal};
use crate::quota::{Answer, Assignment, QuotaStream, Usage};
use crate::rules::Descriptor;

/// Longest domain, descriptor key or value accepted, in bytes.
pub const MAX_STRING_BYTES: usize = 1024;
/// Most entries in one descriptor.
pub const MAX_ENTRIES: usize = 16;

/// The agent's descriptors from Envoy's, or what is wrong with them.
pub fn descriptors(request: &RateLimitRequest) -> Result<Vec<Descriptor>, String> {
    if request.domain.len() > MAX_STRING_BYTES {
        return Err(format!("domain longer than {MAX_STRING_BYTES} bytes"));
    }
    request.descriptors.iter().enumerate().map(|(i, d)| descriptor(i, d)).collect()
}

fn descriptor(i: usize, d: &RateLimitDescriptor) -> Result<Descriptor, String> {
    if d.entries.is_empty() {
        return Err(format!("descriptor {i} has no entries"));
    }
    if d.entries.len() > MAX_ENTRIES {
        return Err(format!(
            "descriptor {i} has {} entries; at most {MAX_ENTRIES}",
            d.entries.len()
        ));
    }
    let mut entries = Vec::with_capacity(d.entries.len());
    for e in &d.entries {
        if e.key.len() > MAX_STRING_BYTES || e.value.len() > MAX_STRING_BYTES {
            return Err(format!(
                "descriptor {i}: a key or value longer than {MAX_STRING_BYTES} bytes"
            ));
        }
        entries.push((e.key.clone(), e.value.clone()));
    }
    Ok(Descriptor { entries, hits: d.hits_addend.map(|h| h.value), negative: d.is_negative_hits })
}

/// Envoy's unit for a ledger window (a lifetime limit has none).
pub fn unit(period: v1::Period) -> Unit {
    match period {
        v1::Period::Minute => Unit::Minute,
        v1::Period::Hour => Unit::Hour,
        v1::Period::Day => Unit::Day,
        v1::Period::Week => Unit::Week,
        v1::Period::Month => Unit::Month,
        v1::Period::Lifetime | v1::Period::Concurrent | v1::Period::Unspecified => Unit::Unknown,
    }
}

fn status(over: bool, limit: Option<LimitView>) -> DescriptorStatus {
    let code = if over { Code::OverLimit } else { Code::Ok };
    let Some(l) = limit else {
        return DescriptorStatus { code: code as i32, ..DescriptorStatus::default() };
    };
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: String::new(),
            requests_per_unit: clamp(l.cap),
            unit: unit(l.period) as i32,
        }),
        limit_remaining: clamp(l.remaining),
        duration_until_reset: l.reset_in.map(|d| envoy_types::pb::google::protobuf::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }),
        quota: None,
    }
}

/// Envoy's answer for a decision.
pub fn response(d: &Decision) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: if d.over { Code::OverLimit } else { Code::Ok } as i32,
        statuses: d.statuses.iter().map(|s| status(s.over, s.limit)).collect(),
        ..RateLimitResponse::default()
    }
}

/// The gRPC service.
#[derive(Clone, Debug)]
pub struct Service(pub Arc<Agent>);

impl Service {
    pub fn server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let request = request.into_inner();
        let descriptors = descriptors(&request).map_err(tonic::Status::invalid_argument)?;
        match self.0.decide(&request.domain, &descriptors, u64::from(request.hits_addend)).await {
            Ok(d) => Ok(tonic::Response::new(response(&d))),
            Err(Refusal::Invalid(why)) => Err(tonic::Status::invalid_argument(why)),
            Err(Refusal::Exhausted(why)) => Err(tonic::Status::resource_exhausted(why)),
        }
    }
}

/// How long a stopping agent waits for Envoy's last RLQS report (Envoy 1.40
/// reports every 5 s).
pub const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(6);

/// Most buckets in one usage report.
pub const MAX_BUCKETS_PER_REPORT: usize = 10_000;

/// The agent's usages from Envoy's report, or what is wrong with it. A line
/// without a bucket id, or with one too large, is skipped (and logged), not the
/// whole report: ending the stream would charge every bucket's exposure whole.
pub fn usages(report: &RateLimitQuotaUsageReports) -> Result<Vec<Usage>, String> {
    if report.domain.is_empty() || report.domain.len() > MAX_STRING_BYTES {
        return Err(format!("the domain must be 1 to {MAX_STRING_BYTES} bytes"));
    }
    if report.bucket_quota_usages.len() > MAX_BUCKETS_PER_REPORT {
        return Err(format!("more than {MAX_BUCKETS_PER_REPORT} buckets in one report"));
    }
    let mut out = Vec::with_capacity(report.bucket_quota_usages.len());
    for (i, u) in report.bucket_quota_usages.iter().enumerate() {
        let id = u.bucket_id.as_ref().map(|b| &b.bucket).filter(|b| !b.is_empty());
        let Some(id) = id else {
            tracing::warn!(line = i, "an RLQS usage line without a bucket id: skipped");
            continue;
        };
        if id.len() > MAX_ENTRIES
            || id.iter().any(|(k, v)| k.len() > MAX_STRING_BYTES || v.len() > MAX_STRING_BYTES)
        {
            tracing::warn!(line = i, "an RLQS bucket id too large: skipped");
            continue;
        }
        out.push(Usage {
            bucket: id.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            allowed: u.num_requests_allowed,
            denied: u.num_requests_denied,
        });
    }
    Ok(out)
}

fn seconds(d: std::time::Duration) -> PbDuration {
    PbDuration { seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: 0 }
}

/// Envoy's bucket action for an answer.
pub fn bucket_action(a: &Answer) -> BucketAction {
    let bucket_id =
        Some(BucketId { bucket: a.bucket.iter().map(|(k, v)| (k.clone(), v.clone())).collect() });
    let strategy = match a.assignment {
        Assignment::Abandon => {
            return BucketAction {
                bucket_id,
                bucket_action: Some(Action::AbandonAction(AbandonAction {})),
            }
        }
        Assignment::Deny => Strategy::BlanketRule(BlanketRule::DenyAll as i32),
        Assignment::Allow { per_second } => {
            let n = u32::try_from(per_second).unwrap_or(u32::MAX);
            Strategy::TokenBucket(TokenBucket {
                max_tokens: n,
                tokens_per_fill: Some(UInt32Value { value: n }),
                // Whole seconds: Envoy 1.40 reads only the seconds.
                fill_interval: Some(seconds(std::time::Duration::from_secs(1))),
            })
        }
    };
    BucketAction {
        bucket_id,
        bucket_action: Some(Action::QuotaAssignmentAction(QuotaAssignmentAction {
            assignment_time_to_live: Some(seconds(a.ttl)),
            rate_limit_strategy: Some(RateLimitStrategy { strategy: Some(strategy) }),
        })),
    }
}

/// The RLQS gRPC service: one [`QuotaStream`] per Envoy stream.
#[derive(Clone, Debug)]
pub struct Quota(pub Arc<Agent>);

impl Quota {
    pub fn server(self) -> RateLimitQuotaServiceServer<Self> {
        RateLimitQuotaServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RateLimitQuotaService for Quota {
    type StreamRateLimitQuotasStream =
        tokio_stream::wrappers::ReceiverStream<Result<RateLimitQuotaResponse, tonic::Status>>;

    async fn stream_rate_limit_quotas(
        &self,
        request: tonic::Request<tonic::Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<tonic::Response<Self::StreamRateLimitQuotasStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let agent = self.0.clone();
        let mut draining = agent.draining();
        agent.streams().fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            let mut stream = QuotaStream::new(agent.clone());
            // Once draining: the time by which Envoy's next report must come.
            let mut until: Option<tokio::time::Instant> = None;
            loop {
                let report = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            tracing::debug!("Envoy closed an RLQS stream");
                            break;
                        }
                        Err(e) => {
                            tracing::debug!("an RLQS stream ended: {e}");
                            break;
                        }
                    },
                    _ = async { drop(draining.wait_for(|d| *d).await) }, if until.is_none() => {
                        let answers = stream.drain();
                        let reply = RateLimitQuotaResponse {
                            bucket_action: answers.iter().map(bucket_action).collect(),
                        };
                        // Envoy reports every 5 s: wait for one more.
                        until = Some(tokio::time::Instant::now() + DRAIN_WAIT);
                        if !stream.exposed() || tx.send(Ok(reply)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep_until(until.unwrap_or_else(tokio::time::Instant::now)),
                        if until.is_some() => break,
                };
                let usages = match usages(&report) {
                    Ok(u) => u,
                    Err(why) => {
                        let _ = tx.send(Err(tonic::Status::invalid_argument(why))).await;
                        break;
                    }
                };
                let answers = stream.report(&report.domain, usages).await;
                let reply = RateLimitQuotaResponse {
                    bucket_action: answers.iter().map(bucket_action).collect(),
                };
                if tx.send(Ok(reply)).await.is_err() || (until.is_some() && !stream.exposed()) {
                    break;
                }
            }
            let charged = stream.close();
            tracing::debug!(charged, "an RLQS stream ended");
            if charged > 0 {
                tracing::info!(
                    charged,
                    "an RLQS stream ended; its buckets' exposure was charged whole"
                );
            }
            agent.streams().fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
