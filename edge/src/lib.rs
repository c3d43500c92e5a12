//! `earshot-edge`: where clients connect. It owns the client WebSocket and
//! HTTP front (`/v1/listen`, `/healthz`, `/readyz`, `/metrics`), Silero voice
//! activity detection with endpointing, and the QUIC uplink that sends each
//! utterance to a region its session's jurisdiction permits.
//!
//! [`Edge::build`] loads and checks everything (config, topology, TLS, the
//! VAD model) before any port is bound; [`Edge::serve`] runs on a listener
//! until the shutdown token fires, then drains sessions.

pub mod breaker;
pub mod clock;
pub mod config;
pub mod endpoint;
pub mod files;
pub mod metrics;
pub mod partials;
pub mod resample;
pub mod session;
pub mod uplink;
pub mod vad;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use earshot_common::receipt::ReceiptVerifier;
use earshot_common::supervise::Supervisor;
use earshot_common::topology::Topology;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::EdgeConfig;
use metrics::Metrics;
use uplink::Uplink;
use vad::Silero;

/// Why the edge could not start. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Topology(#[from] earshot_common::topology::TopologyError),
    #[error("edge {0:?} is not in the topology: add an [[edge]] entry or fix `name`")]
    UnknownEdge(String),
    #[error(
        "uplink.dial names region {0:?}, which is not one this edge may use: list only regions of the edge's permitted regions"
    )]
    UnknownDial(String),
    #[error(transparent)]
    Tls(#[from] earshot_common::tls::TlsError),
    #[error(transparent)]
    Vad(#[from] vad::VadError),
    #[error("partials model: {0} (fix or remove [partials] model)")]
    Partials(#[from] earshot_asr::AsrError),
    #[error("cannot open the QUIC uplink socket on {addr}: {source}")]
    Uplink {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Why a running edge stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    PartDied(String),
}

/// State shared by every session of one edge.
pub struct EdgeInner {
    pub name: String,
    pub jurisdiction: String,
    /// Regions this edge's sessions may use, in order.
    pub regions: Vec<String>,
    pub config: EdgeConfig,
    pub vad: Arc<Silero>,
    /// The small model live partials come from, if configured.
    pub partials: Option<partials::Partials>,
    pub uplink: Arc<Uplink>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Semaphore>,
    /// Checks each final's receipt (against the CA and topology) before it
    /// reaches the client.
    pub receipts: ReceiptVerifier,
    pub shutdown: CancellationToken,
    /// Sessions of this edge not yet ended (their client may be gone while
    /// their utterances finish), so that a resume here waits for them.
    pub live: session::LiveSessions,
    tracker: TaskTracker,
}

/// A ready-to-serve edge.
#[derive(Clone)]
pub struct Edge {
    inner: Arc<EdgeInner>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl Edge {
    /// Loads the topology, TLS material and VAD model named by `config`.
    /// `shutdown` stops the edge: sessions drain and close with 1001.
    pub fn build(config: EdgeConfig, shutdown: CancellationToken) -> Result<Self, StartError> {
        config.validate()?;
        let topology = Topology::load(&config.topology)?;
        let edge = topology
            .edge(&config.name)
            .ok_or_else(|| StartError::UnknownEdge(config.name.clone()))?
            .clone();
        let permitted = topology.permitted_regions(&edge.name)?;
        if let Some(name) = config
            .uplink
            .dial
            .keys()
            .find(|name| !permitted.iter().any(|r| &r.name == *name))
        {
            return Err(StartError::UnknownDial(name.clone()));
        }
        // Where each region is dialled: the topology's endpoint, or the
        // config's override (a local proxy); its certificate name stays the
        // topology's.
        let dialled: Vec<earshot_common::topology::Region> = permitted
            .iter()
            .map(|r| {
                let mut r = (*r).clone();
                if let Some(addr) = config.uplink.dial.get(&r.name) {
                    r.quic = addr.clone();
                }
                r
            })
            .collect();
        let permitted: Vec<&earshot_common::topology::Region> = dialled.iter().collect();
        let client = earshot_common::tls::client_config(&config.tls, config.quic)?;
        let receipts = ReceiptVerifier::load(&config.tls.ca, Arc::new(topology.clone()))?;
        let metrics = Arc::new(Metrics::new());
        let region_names: Vec<String> = permitted.iter().map(|r| r.name.clone()).collect();
        metrics.init_series(&region_names);
        let uplink = Uplink::new(
            config.uplink_bind,
            client,
            &permitted,
            uplink::Policy {
                connect_timeout: Duration::from_millis(config.limits.connect_timeout_ms),
                attempt_timeout: Duration::from_millis(config.limits.attempt_timeout_ms),
                retry_budget: Duration::from_millis(config.uplink.retry_budget_ms),
                breaker_failures: config.uplink.breaker_failures,
                breaker_open: Duration::from_millis(config.uplink.breaker_open_ms),
            },
            metrics.clone(),
        )
        .map_err(|source| StartError::Uplink {
            addr: config.uplink_bind,
            source,
        })?;
        let vad = Silero::load(
            &config.vad.onnxruntime,
            &config.vad.model,
            config.vad.threads,
            config.limits.max_sessions,
            metrics.vad(),
        )?;
        let partials = config
            .partials
            .as_ref()
            .map(|p| partials::Partials::start(p, metrics.clone()))
            .transpose()?;
        Ok(Edge {
            inner: Arc::new(EdgeInner {
                name: edge.name.clone(),
                jurisdiction: edge.jurisdiction.clone(),
                regions: region_names,
                sessions: Arc::new(Semaphore::new(config.limits.max_sessions)),
                receipts,
                config,
                vad: Arc::new(vad),
                partials,
                uplink: Arc::new(uplink),
                metrics,
                shutdown,
                live: session::LiveSessions::default(),
                tracker: TaskTracker::new(),
            }),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The HTTP routes, for tests that want them without a listener.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/listen", get(listen))
            .route(
                "/v1/audio/transcriptions",
                axum::routing::post(files::transcriptions),
            )
            .route(
                "/v1/audio/translations",
                axum::routing::post(files::translations),
            )
            .layer(axum::extract::DefaultBodyLimit::max(
                self.inner.config.limits.max_file_bytes + (64 << 10),
            ))
            .route("/", get(captions_page))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .route("/metrics", get(metrics_text))
            .with_state(self.inner.clone())
    }

    /// Serves until the shutdown token fires, then waits (bounded by the
    /// drain timeout) for sessions to deliver their pending finals.
    ///
    /// The HTTP server is a supervised task: if it dies, the edge's
    /// shutdown starts (readiness goes false, sessions drain) and this
    /// returns [`ServeError::PartDied`], so the process exits non-zero.
    /// Connections and sessions are tracked tasks, drained here.
    pub async fn serve(self, listener: TcpListener) -> Result<(), ServeError> {
        let inner = self.inner.clone();
        let addr = listener.local_addr().map_err(ServeError::Io)?;
        tracing::info!(%addr, edge = %inner.name, regions = ?inner.regions, "edge listening");
        let supervisor = Supervisor::new(inner.shutdown.clone());
        let router = self.router();
        let http = supervisor.spawn("http", accept_loop(listener, router, inner.clone()));
        inner.shutdown.cancelled().await;
        tracing::info!(edge = %inner.name, "draining");
        let _ = http.await;
        inner.tracker.close();
        let drain = Duration::from_millis(inner.config.limits.drain_timeout_ms + 3_000);
        if tokio::time::timeout(drain, inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions did not finish within the drain timeout");
        }
        inner.uplink.close().await;
        if let Some(why) = supervisor.failure() {
            return Err(ServeError::PartDied(why));
        }
        tracing::info!("edge stopped");
        Ok(())
    }
}

/// Accepts connections until shutdown. Each connection is HTTP/1.1 with a
/// deadline for its request head (`limits.header_timeout_ms`: a client
/// that trickles its headers is dropped) and may upgrade to a WebSocket.
/// Connections are tracked with the sessions, so the drain waits for them.
async fn accept_loop(listener: TcpListener, router: Router, edge: Arc<EdgeInner>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let header_timeout = Duration::from_millis(edge.config.limits.header_timeout_ms);
    loop {
        let (stream, peer) = tokio::select! {
            _ = edge.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or a connection reset before
                    // it was accepted: not fatal; back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let shutdown = edge.shutdown.clone();
        let span = tracing::debug_span!("connection", %peer);
        let connection = async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    // Requests in progress finish; upgraded sessions run on
                    // as their own tasks and drain themselves.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        };
        edge.tracker
            .spawn(tracing::Instrument::instrument(connection, span));
    }
}

async fn listen(
    ws: WebSocketUpgrade,
    Query(query): Query<Vec<(String, String)>>,
    State(edge): State<Arc<EdgeInner>>,
) -> Response {
    // Over the session limit (or draining) the connection is refused
    // before the upgrade: cheaper than upgrading to close it, and any
    // HTTP client understands 503 with Retry-After.
    let limits = &edge.config.limits;
    let permit = match edge.sessions.clone().try_acquire_owned() {
        Ok(p) if !edge.shutdown.is_cancelled() => p,
        refused => {
            let reason = if refused.is_ok() {
                "draining"
            } else {
                "max_sessions"
            };
            edge.metrics
                .refused
                .get_or_create(&metrics::ReasonLabel { reason })
                .inc();
            let body = earshot_common::client::ServerMessage::Error(
                earshot_common::client::ErrorMessage::new(
                    earshot_common::client::ClientErrorCode::ServerBusy,
                    format!(
                        "this edge is at its limit of {} sessions: retry after {} s",
                        limits.max_sessions, limits.retry_after_s
                    ),
                    true,
                ),
            )
            .to_json();
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [
                    (header::RETRY_AFTER, limits.retry_after_s.to_string()),
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                ],
                body,
            )
                .into_response();
        }
    };
    let limit = limits.max_frame_bytes;
    // A message over the limit is refused after its frame has been read
    // whole (up to twice the limit), so the stream stays in step and the
    // client gets a clean 1009 close; only a frame over twice the limit is
    // cut off mid-way. Buffers are sized for speech (a 100 ms chunk is
    // 3.2 KB), not the library's 128 KiB default.
    ws.max_message_size(limit)
        .max_frame_size(limit.saturating_mul(2))
        .read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(limits.write_buffer_bytes)
        .max_write_buffer_size(limits.write_buffer_bytes.saturating_mul(16).max(limit))
        .on_upgrade(move |socket| {
            let tracker = edge.tracker.clone();
            tracker.track_future(session::run(socket, query, edge, permit))
        })
}

/// The live-captions page: plain HTML and JavaScript speaking `/v1/listen`.
async fn captions_page() -> Response {
    axum::response::Html(include_str!("captions.html")).into_response()
}

async fn ready(State(edge): State<Arc<EdgeInner>>) -> Response {
    if edge.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics_text(State(edge): State<Arc<EdgeInner>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        edge.metrics.render(),
    )
        .into_response()
}
