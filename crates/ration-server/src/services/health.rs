//! grpc.health.v1: readiness follows leadership.

use openraft::{BasicNode, ServerState};

/// Keeps the health status of "" and Ledger in step with whether a leader is known.
pub(super) async fn track_readiness(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, BasicNode>>,
    health: tonic_health::server::HealthReporter,
) {
    let mut ready = None;
    loop {
        let now = {
            let m = metrics.borrow_and_update();
            m.current_leader.is_some() && m.state != ServerState::Shutdown
        };
        if ready != Some(now) {
            ready = Some(now);
            let status = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health.set_service_status("ration.v1.Ledger", status).await;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
