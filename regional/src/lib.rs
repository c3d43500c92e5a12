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
}

pub struct Regional {
    config: RegionalConfig,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    server: quinn::ServerConfig,
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
        let server = earshot_common::tls::server_config(
            &config.tls,
            config.limits.max_streams_per_connection,
        )?;
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
        let router = ResultRouter::new(queue::results_channel(&config.region, &ingress_id));
        let metrics = Arc::new(Metrics::new());
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
            client,
            redis,
            models,
            translators,
            router,
            shutdown,
        })
    }

    /// The UDP address the ingress should listen on.
    pub fn quic_listen(&self) -> Result<std::net::SocketAddr, StartError> {
        if let Some(addr) = self.config.quic_listen {
            return Ok(addr);
        }
        self.topology
            .region(&self.config.region)
            .and_then(|r| r.quic.parse().ok())
            .ok_or_else(|| StartError::NoListenAddress(self.config.region.clone()))
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves QUIC on `quic` and HTTP on `http` until shutdown.
    pub async fn serve(
        self,
        quic: std::net::UdpSocket,
        http: TcpListener,
    ) -> Result<(), StartError> {
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(self.server.clone()),
            quic,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(StartError::Quic)?;
        let region = self.config.region.clone();
        tracing::info!(
            %region,
            quic = ?endpoint.local_addr().ok(),
            http = ?http.local_addr().ok(),
            workers = self.models.len(),
            translation_pairs = ?self.translators.pairs(),
            "regional node listening"
        );

        let subscriber = tokio::spawn(
            self.router
                .clone()
                .run(self.client.clone(), self.shutdown.clone()),
        );

        let stream = queue::stream_key(&region);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "regional".into());
        let mut workers = Vec::new();
        for (i, model) in self.models.into_iter().enumerate() {
            let ctx = worker::WorkerContext {
                region: region.clone(),
                stream: stream.clone(),
                consumer: format!("{host}-{}-{i}", std::process::id()),
                topology: self.topology.clone(),
                metrics: self.metrics.clone(),
                claim_idle: Duration::from_millis(self.config.worker.claim_idle_ms),
                max_batch: self.config.worker.max_batch(),
                batch_window: Duration::from_millis(self.config.worker.batch_window_ms),
                translators: self.translators.clone(),
                client: self.client.clone(),
                publisher: self.redis.clone(),
            };
            workers.push(tokio::spawn(worker::run(ctx, model, self.shutdown.clone())));
        }

        let limits = &self.config.limits;
        let ingress = Arc::new(Ingress {
            region: region.clone(),
            topology: self.topology.clone(),
            metrics: self.metrics.clone(),
            router: self.router.clone(),
            redis: self.redis.clone(),
            stream,
            stream_max_len: self.config.redis.stream_max_len,
            redis_timeout: Duration::from_millis(self.config.redis.timeout_ms),
            max_audio_bytes: self.config.max_audio_bytes(),
            result_timeout: Duration::from_millis(limits.result_timeout_ms),
            max_inflight: limits.max_inflight,
            inflight: Arc::new(Semaphore::new(limits.max_inflight)),
            shutdown: self.shutdown.clone(),
        });
        let drain = Duration::from_millis(limits.drain_timeout_ms);
        let quic_task = tokio::spawn(ingress.serve(endpoint, limits.max_connections, drain));

        let state = HttpState {
            metrics: self.metrics.clone(),
            redis: self.redis.clone(),
            router: self.router.clone(),
            shutdown: self.shutdown.clone(),
        };
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .route("/metrics", get(metrics_text))
            .with_state(state);
        let shutdown = self.shutdown.clone();
        let http_task = tokio::spawn(async move {
            axum::serve(http, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
        });

        self.shutdown.cancelled().await;
        let _ = quic_task.await;
        for w in workers {
            let _ = w.await;
        }
        let _ = subscriber.await;
        let _ = http_task.await;
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
        Ok(Ok(_)) if s.router.is_subscribed() => "ready\n".into_response(),
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
