//! grpc.health.v1, the same verdicts as `/livez` and `/readyz`: the service
//! `ration.v1.Liveness` serves while the Raft core runs ([`Node::liveness`]); the
//! overall status ("") and `ration.v1.Ledger` serve while the node is ready
//! ([`Node::readiness`]: a leader known, its log applied).

use std::sync::Weak;

use crate::Node;

/// Keeps the health statuses in step with the node: re-checked on every change of
/// openraft's metrics (which carry the leader, the log and the applied index).
pub(super) async fn track_readiness(
    node: Weak<Node>,
    health: tonic_health::server::HealthReporter,
) {
    let Some(mut metrics) = node.upgrade().map(|n| n.raft.metrics()) else { return };
    let mut last = None;
    loop {
        let Some(n) = node.upgrade() else { return };
        let now = (n.liveness().is_ok(), n.readiness().is_ok());
        drop(n);
        if last != Some(now) {
            last = Some(now);
            let status = |ok: bool| {
                if ok {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                }
            };
            health.set_service_status("ration.v1.Liveness", status(now.0)).await;
            health.set_service_status("", status(now.1)).await;
            health.set_service_status("ration.v1.Ledger", status(now.1)).await;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
