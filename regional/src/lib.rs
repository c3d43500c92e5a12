//! `earshot-regional`: one region's processing. It owns the QUIC ingress
//! that edges send utterances to, the Redis Streams queue between ingress
//! and workers, the Whisper ASR workers, and result fan-in (one Redis
//! subscriber per process, whatever the number of edges and clients).
//!
//! [`Regional::build`] loads and checks everything (config, topology, TLS,
//! models) before any port is bound; [`Regional::serve`] runs until the
//! shutdown token fires, then drains.

pub mod config;
pub mod ingress;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use earshot_common::supervise::Supervisor;
use earshot_common::topology::Topology;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::RegionalConfig;
use ingress::Ingress;
use metrics::Metrics;
use queue::ResultRouter;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Topology(#[from] earshot_common::topology::TopologyError),
    #[error("region {0:?} is not in the topology: add a [[region]] entry or fix `region`")]
    UnknownRegion(String),
    #[error(
        "no QUIC listen address: set quic_listen, or give region {0:?} an IP:port `quic` endpoint in the topology"
    )]
    NoListenAddress(String),
    #[error(transparent)]
    Tls(#[from] earshot_common::tls::TlsError),
    #[error("invalid redis.url: {0}")]
    Redis(String),
    #[error("cannot load the ASR model: {0}")]
    Model(#[from] earshot_asr::AsrError),
    #[error("cannot open the QUIC socket: {0}")]
    Quic(std::io::Error),
    #[error("{0}")]
    PartDied(String),
}

pub struct Regional {
    config: RegionalConfig,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    /// `None` in a worker-only process.
    server: Option<quinn::ServerConfig>,
    /// Signs a receipt for every final the ingress sends (with the key of
    /// its TLS certificate); `None` in a worker-only process.
    signer: Option<Arc<earshot_common::receipt::ReceiptSigner>>,
    client: redis::Client,
    redis: ConnectionManager,
    models: Vec<model::ModelSlot>,
    translators: Arc<model::Translators>,
    router: Arc<ResultRouter>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Regional {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regional")
            .field("region", &self.config.region)
            .finish()
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    redis: ConnectionManager,
    router: Arc<ResultRouter>,
    /// Whether this process runs the ingress (and so needs the result
    /// subscriber to be ready).
    ingress: bool,
    shutdown: CancellationToken,
}

impl Regional {
    /// Loads the topology, TLS material and one model per worker. Redis is
    /// not contacted here: a region starts (not ready) while Redis is down.
    pub fn build(config: RegionalConfig, shutdown: CancellationToken) -> Result<Self, StartError> {
        config.validate()?;
        let topology = Arc::new(Topology::load(&config.topology)?);
        if topology.region(&config.region).is_none() {
            return Err(StartError::UnknownRegion(config.region.clone()));
        }
        let (server, signer) = match (&config.tls, config.ingress) {
            (Some(tls), true) => {
                let jurisdiction = topology
                    .region(&config.region)
                    .map(|r| r.jurisdiction.clone())
                    .unwrap_or_default();
                (
                    Some(earshot_common::tls::server_config(
                        tls,
                        config.limits.max_streams_per_connection,
                        config.quic,
                    )?),
                    Some(Arc::new(earshot_common::receipt::ReceiptSigner::load(
                        tls,
                        &config.region,
                        &jurisdiction,
                    )?)),
                )
            }
            _ => (None, None),
        };
        let client = redis::Client::open(config.redis.url.as_str())
            .map_err(|e| StartError::Redis(e.to_string()))?;
        let timeout = Duration::from_millis(config.redis.timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| StartError::Redis(e.to_string()))?;
        let models = (0..config.worker.count)
            .map(|_| {
                model::ModelSlot::load(
                    &config.worker.model,
                    config.worker.encoder_window,
                    config.worker.model_id.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Only workers translate: an ingress-only node loads no pairs.
        let translators = Arc::new(match &config.translation.models {
            Some(dir) if config.worker.count > 0 => model::Translators::load(dir)?,
            _ => model::Translators::default(),
        });
        let ingress_id = uuid::Uuid::new_v4().simple().to_string();
        let metrics = Arc::new(Metrics::new());
        let router = ResultRouter::new(
            queue::results_channel(&config.region, &ingress_id),
            metrics.results_unrouted.clone(),
        );
        let jurisdictions: Vec<String> = topology
            .jurisdictions()
            .iter()
            .map(|j| j.name.clone())
            .collect();
        metrics.init_series(&jurisdictions);
        Ok(Regional {
            config,
            topology,
            metrics,
            server,
            signer,
            client,
            redis,
            models,
            translators,
            router,
            shutdown,
        })
    }

    /// The UDP address the ingress should listen on; `None` in a
    /// worker-only process (`ingress = false`).
    pub fn quic_listen(&self) -> Result<Option<std::net::SocketAddr>, StartError> {
        if self.server.is_none() {
            return Ok(None);
        }
        if let Some(addr) = self.config.quic_listen {
            return Ok(Some(addr));
        }
        self.topology
            .region(&self.config.region)
            .and_then(|r| r.quic.parse().ok())
            .map(Some)
            .ok_or_else(|| StartError::NoListenAddress(self.config.region.clone()))
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves QUIC on `quic` (the ingress; `None` in a worker-only process)
    /// and HTTP on `http` until shutdown.
    pub async fn serve(
        self,
        quic: Option<std::net::UdpSocket>,
        http: TcpListener,
    ) -> Result<(), StartError> {
        let endpoint = match (&self.server, quic) {
            (Some(server), Some(socket)) => Some(
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server.clone()),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .map_err(StartError::Quic)?,
            ),
            (Some(_), None) => {
                return Err(StartError::NoListenAddress(self.config.region.clone()));
            }
            (None, _) => None,
        };
        let region = self.config.region.clone();
        tracing::info!(
            %region,
            quic = ?endpoint.as_ref().and_then(|e| e.local_addr().ok()),
            http = ?http.local_addr().ok(),
            workers = self.models.len(),
            translation_pairs = ?self.translators.pairs(),
            "regional node listening"
        );

        // Drain order on shutdown: the ingress stops taking utterances
        // (readiness false, new streams answered `shutting_down` so edges
        // go elsewhere) and waits for those in flight to be answered —
        // workers and the result subscriber still running — then the
        // workers stop (each finishing its batch; what is left stays
        // pending for another worker), then the subscriber, then HTTP.
        let supervisor = Supervisor::new(self.shutdown.clone());
        let stop_workers = CancellationToken::new();
        let stop_subscriber = CancellationToken::new();
        let stop_http = CancellationToken::new();
        // Only an ingress waits for results; workers publish them.
        let subscriber = endpoint.is_some().then(|| {
            supervisor.spawn(
                "result-subscriber",
                self.router
                    .clone()
                    .run(self.client.clone(), stop_subscriber.clone()),
            )
        });

        let stream = queue::stream_key(&region);
        let prefix = self.config.worker.consumer_prefix();
        let mut workers = Vec::new();
        for (i, model) in self.models.into_iter().enumerate() {
            let ctx = worker::WorkerContext {
                region: region.clone(),
                stream: stream.clone(),
                consumer: format!("{prefix}-{i}"),
                topology: self.topology.clone(),
                metrics: self.metrics.clone(),
                claim_idle: Duration::from_millis(self.config.worker.claim_idle_ms),
                max_deliveries: self.config.worker.max_deliveries,
                result_ttl: Duration::from_secs(self.config.redis.result_ttl_s),
                max_batch: self.config.worker.max_batch(),
                batch_window: Duration::from_millis(self.config.worker.batch_window_ms),
                translators: self.translators.clone(),
                client: self.client.clone(),
                publisher: self.redis.clone(),
            };
            workers.push(supervisor.spawn(
                format!("worker-{i}"),
                worker::run(ctx, model, stop_workers.clone()),
            ));
        }

        let limits = &self.config.limits;
        let ingress_task = endpoint.map(|endpoint| {
            let ingress = Arc::new(Ingress {
                region: region.clone(),
                topology: self.topology.clone(),
                metrics: self.metrics.clone(),
                router: self.router.clone(),
                redis: self.redis.clone(),
                stream,
                queue_limit: self.config.redis.queue_limit,
                result_ttl: Duration::from_secs(self.config.redis.result_ttl_s),
                redis_timeout: Duration::from_millis(self.config.redis.timeout_ms),
                max_audio_bytes: self.config.max_audio_bytes(),
                result_timeout: Duration::from_millis(limits.result_timeout_ms),
                max_inflight: limits.max_inflight,
                inflight: Arc::new(Semaphore::new(limits.max_inflight)),
                signer: self.signer.clone(),
                shutdown: self.shutdown.clone(),
            });
            let drain = Duration::from_millis(limits.drain_timeout_ms);
            supervisor.spawn(
                "quic-ingress",
                ingress.serve(endpoint, limits.max_connections, drain),
            )
        });

        let state = HttpState {
            metrics: self.metrics.clone(),
            redis: self.redis.clone(),
            router: self.router.clone(),
            ingress: ingress_task.is_some(),
            shutdown: self.shutdown.clone(),
        };
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .route("/metrics", get(metrics_text))
            .with_state(state);
        let http_stop = stop_http.clone();
        let http_task = supervisor.spawn("http", async move {
            let served = axum::serve(http, app)
                .with_graceful_shutdown(async move { http_stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });

        self.shutdown.cancelled().await;
        tracing::info!(%region, "draining");
        if let Some(ingress) = ingress_task {
            let _ = ingress.await;
        }
        stop_workers.cancel();
        for w in workers {
            let _ = w.await;
        }
        stop_subscriber.cancel();
        if let Some(subscriber) = subscriber {
            let _ = subscriber.await;
        }
        stop_http.cancel();
        let _ = http_task.await;
        if let Some(why) = supervisor.failure() {
            return Err(StartError::PartDied(why));
        }
        tracing::info!(%region, "regional node stopped");
        Ok(())
    }
}

async fn ready(State(s): State<HttpState>) -> Response {
    if s.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let mut conn = s.redis.clone();
    let ping: Result<Result<String, _>, _> = tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("PING").query_async(&mut conn),
    )
    .await;
    match ping {
        Ok(Ok(_)) if !s.ingress || s.router.is_subscribed() => "ready\n".into_response(),
        Ok(Ok(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "result subscriber not connected\n",
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "redis: no reply\n").into_response(),
    }
}

async fn metrics_text(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}
