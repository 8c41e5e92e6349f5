//! The admin listener: `/metrics`, `/healthz` (the process is up),
//! `/readyz` (every pool has a replica to send to, and the proxy is not
//! shutting down) and `/admin/state` (a read-only JSON view of pools and
//! endpoints). Nothing here changes state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde::Serialize;

use crate::arms::Arms;
use crate::config::describe_routing;
use crate::endpoint::EndpointSnapshot;
use crate::state::{ReloadStatus, Shared};

/// The admin listener's app.
pub struct Admin {
    shared: Arc<Shared>,
    /// Set on SIGTERM: `/readyz` answers 503 from then on, while the admin
    /// listener keeps serving probes and metrics through the drain.
    draining: Arc<AtomicBool>,
}

impl Admin {
    /// An admin app over `shared`; `/readyz` fails once `draining` is set.
    pub fn new(shared: Arc<Shared>, draining: Arc<AtomicBool>) -> Self {
        Self { shared, draining }
    }
}

#[derive(Serialize)]
struct StateView {
    generation: u64,
    config_path: Option<String>,
    /// The latest reload attempt (signal or file change); absent before the first.
    last_reload: Option<ReloadStatus>,
    pools: Vec<PoolView>,
}

#[derive(Serialize)]
struct PoolView {
    name: String,
    model: String,
    routing: String,
    router_state_entries: usize,
    routable_endpoints: usize,
    endpoints: Vec<EndpointSnapshot>,
    /// The live split between arms; absent when the pool runs no experiment.
    #[serde(skip_serializing_if = "Option::is_none")]
    experiment: Option<ExperimentView>,
}

#[derive(Serialize)]
struct ExperimentView {
    split_by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    arms: Vec<ArmView>,
}

#[derive(Serialize)]
struct ArmView {
    name: String,
    /// Share of the pool's requests, 0..=1.
    share: f64,
    routing: String,
    router_state_entries: usize,
}

fn experiment_view(arms: &Arms) -> Option<ExperimentView> {
    Some(ExperimentView {
        split_by: arms.split_by()?.as_str(),
        header: arms.header().map(str::to_string),
        arms: arms
            .iter()
            .map(|a| ArmView {
                name: a.name.clone().unwrap_or_default(),
                share: a.share,
                routing: describe_routing(&a.routing),
                router_state_entries: a.state_size(),
            })
            .collect(),
    })
}

impl Admin {
    fn state(&self) -> StateView {
        let g = self.shared.current();
        let now = Instant::now();
        StateView {
            generation: g.id,
            config_path: self
                .shared
                .config_path
                .as_ref()
                .map(|p| p.display().to_string()),
            last_reload: self.shared.last_reload(),
            pools: g
                .pools
                .iter()
                .map(|p| {
                    let eps = p.endpoints();
                    PoolView {
                        name: p.name().to_string(),
                        model: p.cfg.model.clone(),
                        routing: describe_routing(&p.cfg.routing),
                        router_state_entries: p.router_state_size(),
                        routable_endpoints: eps.iter().filter(|e| e.is_routable(now)).count(),
                        endpoints: eps
                            .iter()
                            .map(|e| e.snapshot(now, p.stale_after()))
                            .collect(),
                        experiment: experiment_view(p.arms()),
                    }
                })
                .collect(),
        }
    }

    /// Refreshes gauges that are cheaper to compute at scrape time than to keep current.
    fn refresh_gauges(&self) {
        let g = self.shared.current();
        let now = Instant::now();
        let m = &self.shared.metrics;
        for p in &g.pools {
            m.prefix_index_entries
                .with_label_values(&[p.name()])
                .set(i64::try_from(p.router_state_size()).unwrap_or(i64::MAX));
            let eps = p.endpoints();
            let routable = eps.iter().filter(|e| e.is_routable(now)).count();
            m.pool_routable
                .with_label_values(&[p.name()])
                .set(i64::try_from(routable).unwrap_or(i64::MAX));
            for e in eps.iter() {
                let labels = [p.name(), e.key.as_str()];
                m.upstream_healthy
                    .with_label_values(&labels)
                    .set(i64::from(e.is_healthy()));
                m.upstream_ejected
                    .with_label_values(&labels)
                    .set(i64::from(e.is_ejected(now)));
                m.upstream_in_flight
                    .with_label_values(&labels)
                    .set(i64::from(e.in_flight()));
                m.scrape_age
                    .with_label_values(&labels)
                    .set(e.scrape_age(now).map_or(-1.0, |d| d.as_secs_f64()));
            }
        }
    }

    fn ready(&self) -> (bool, String) {
        if self.draining.load(Ordering::Relaxed) {
            return (false, "draining: shutting down\n".into());
        }
        let g = self.shared.current();
        let now = Instant::now();
        let missing: Vec<&str> = g
            .pools
            .iter()
            .filter(|p| !p.has_routable(now))
            .map(|p| p.name())
            .collect();
        if missing.is_empty() {
            (true, "ready\n".into())
        } else {
            (
                false,
                format!("no routable endpoint in pool(s): {}\n", missing.join(", ")),
            )
        }
    }
}

#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        let path = session.req_header().uri.path().to_string();
        let get = session.req_header().method == "GET";
        let (status, ctype, body): (u16, &str, Vec<u8>) = match (get, path.as_str()) {
            (true, "/metrics") => {
                self.refresh_gauges();
                (
                    200,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.render(),
                )
            }
            (true, "/healthz") => (200, "text/plain", b"ok\n".to_vec()),
            (true, "/readyz") => {
                let (ok, msg) = self.ready();
                (if ok { 200 } else { 503 }, "text/plain", msg.into_bytes())
            }
            (true, "/admin/state") => (
                200,
                "application/json",
                serde_json::to_vec_pretty(&self.state()).unwrap_or_default(),
            ),
            (false, _) => (405, "text/plain", b"method not allowed\n".to_vec()),
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        let mut h = ResponseHeader::build(status, Some(2)).ok()?;
        h.insert_header("content-type", ctype).ok()?;
        h.insert_header("content-length", body.len().to_string())
            .ok()?;
        session.write_response_header(Box::new(h)).await.ok()?;
        session
            .write_response_body(Bytes::from(body), true)
            .await
            .ok()?;
        let persistent = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(s)) => Some(ReusedHttpStream::from_reusable_stream(s, persistent)),
            _ => None,
        }
    }
}
