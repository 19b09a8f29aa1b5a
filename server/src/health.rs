//! `grpc.health.v1` status: SERVING while the ledger answers, NOT_SERVING when it does not
//! and from the start of a shutdown, for the whole server ("") and each service by name.

use std::time::Duration;

use guardian_proto::v1::fleet_server::FleetServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::Ledger;

/// How often the ledger is pinged for the health status.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The services whose status is reported, besides the whole server ("").
const SERVICES: [&str; 3] = [
    "",
    <FleetServer<crate::api::FleetApi> as NamedService>::NAME,
    "guardian.v1.Uplink",
];

/// Keeps the health status in step with the ledger until `shutdown`.
pub(crate) fn watch_ledger(
    health: HealthReporter,
    ledger: Ledger,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) {
    tasks.spawn(async move {
        let mut last = None;
        loop {
            let ping = tokio::select! {
                () = shutdown.cancelled() => break,
                ping = tokio::time::timeout(CHECK_EVERY, ledger.ping()) => ping,
            };
            let status = match ping {
                Ok(Ok(())) => ServingStatus::Serving,
                Ok(Err(error)) => {
                    if last != Some(ServingStatus::NotServing) {
                        tracing::warn!(%error, "HealthNotServing: the ledger does not answer");
                    }
                    ServingStatus::NotServing
                }
                Err(_) => {
                    if last != Some(ServingStatus::NotServing) {
                        tracing::warn!(
                            "HealthNotServing: the ledger did not answer within {CHECK_EVERY:?}"
                        );
                    }
                    ServingStatus::NotServing
                }
            };
            if last != Some(status) {
                set_all(&health, status).await;
                last = Some(status);
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
        set_all(&health, ServingStatus::NotServing).await;
    });
}

async fn set_all(health: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        health.set_service_status(service, status).await;
    }
}
