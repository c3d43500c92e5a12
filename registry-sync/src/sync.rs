//! The sync agent: runs beside a node, keeps its model directory on the
//! version its channels say.
//!
//! ```text
//! <models_dir>/versions/<version>/   verified copies (files + manifest.json)
//! <models_dir>/current  -> versions/<version>   what the node loads
//! <models_dir>/previous -> versions/<version>   kept for instant rollback
//! ```
//!
//! Every poll reads the channel pointers from the region's bucket. A node is
//! in the canary when its region is in the canary's rollout and a stable
//! hash of its id falls under the canary's percentage; otherwise it follows
//! the base channel. A new version is downloaded into a scratch directory,
//! every file's size and SHA-256 checked against the manifest, and only then
//! renamed into `versions/` and switched to by replacing the `current`
//! symlink with `rename(2)` (atomic: a reader sees the old or the new
//! version, never a mix). A corrupted or partial download is deleted and the
//! node keeps its model. If S3 is unreachable the agent keeps serving the
//! last good model, retries with backoff and reports its staleness.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use earshot_common::client::hex;
use earshot_common::manifest::{Channel, MANIFEST_FILE, Manifest, keys};
use earshot_common::retry::Backoff;
use earshot_common::topology::{Region, Topology};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::SyncMetrics;
use crate::store::Store;
use crate::{Registry, RegistryError, now_rfc3339, read_manifest};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// This node's id: stable across restarts (it decides canary membership).
    pub node: String,
    pub region: String,
    pub topology: PathBuf,
    /// The model name to follow.
    pub model: String,
    /// The base channel.
    #[serde(default = "d_channel")]
    pub channel: String,
    /// The canary channel, consulted first; `""` disables it.
    #[serde(default = "d_canary")]
    pub canary_channel: String,
    /// Holds `versions/`, `current` and `previous`.
    pub models_dir: PathBuf,
    #[serde(default = "d_poll")]
    pub poll_interval_ms: u64,
    /// Versions kept on disk (current and previous always are).
    #[serde(default = "d_retention")]
    pub retention: usize,
    /// `/metrics` and `/healthz`.
    pub http_listen: Option<SocketAddr>,
    /// How often the node's status is written even when nothing changed.
    #[serde(default = "d_heartbeat")]
    pub heartbeat_interval_ms: u64,
}

fn d_channel() -> String {
    "stable".into()
}
fn d_canary() -> String {
    "canary".into()
}
fn d_poll() -> u64 {
    5_000
}
fn d_retention() -> usize {
    3
}
fn d_heartbeat() -> u64 {
    30_000
}

impl SyncConfig {
    /// A config with every default, following `stable` and `canary`.
    pub fn new(node: &str, region: &str, model: &str, models_dir: PathBuf) -> Self {
        SyncConfig {
            node: node.to_owned(),
            region: region.to_owned(),
            topology: PathBuf::new(),
            model: model.to_owned(),
            channel: d_channel(),
            canary_channel: d_canary(),
            models_dir,
            poll_interval_ms: d_poll(),
            retention: d_retention(),
            http_listen: None,
            heartbeat_interval_ms: d_heartbeat(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, SyncError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SyncError::Config(format!("{}: {e}", path.display())))?;
        let mut c: SyncConfig = toml::from_str(&text)
            .map_err(|e| SyncError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.topology, &mut c.models_dir] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if c.poll_interval_ms < 100 || c.retention < 2 {
            return Err(SyncError::Config(
                "poll_interval_ms must be at least 100 and retention at least 2".into(),
            ));
        }
        Ok(c)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sync config: {0}")]
    Config(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{model} may not be held in region {region} (residency {residency}): refused")]
    Residency {
        model: String,
        region: String,
        residency: String,
    },
    #[error("{model} is not in this region's bucket yet (replication pending)")]
    NotReplicated { model: String },
    #[error("{file} of {model} failed verification: {what}; the download was discarded")]
    Verify {
        model: String,
        file: String,
        what: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::store::StoreError> for SyncError {
    fn from(e: crate::store::StoreError) -> Self {
        SyncError::Registry(e.into())
    }
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// No channel names a version for this node yet.
    NoChannel,
    Unchanged {
        version: String,
    },
    Activated {
        version: String,
        from: Option<String>,
        /// Served from `versions/` without a download (e.g. a rollback).
        cached: bool,
    },
}

/// A node's status, written to `status/nodes/<node>.json` in its region's
/// bucket for `earshot-registry status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub region: String,
    pub model: String,
    pub version: Option<String>,
    pub channel: Option<String>,
    pub activated_at: Option<String>,
    pub reported_at: String,
}

pub struct Agent {
    config: SyncConfig,
    topology: Arc<Topology>,
    region: Region,
    store: Store,
    metrics: Arc<SyncMetrics>,
    following: Option<String>,
    activated_at: Option<String>,
    last_report: Option<(Instant, NodeStatus)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.config.node)
            .finish()
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Agent {
    pub fn new(
        config: SyncConfig,
        registry: &Registry,
        metrics: Arc<SyncMetrics>,
    ) -> Result<Self, SyncError> {
        let region = registry.region(&config.region)?.clone();
        std::fs::create_dir_all(config.models_dir.join("versions"))
            .map_err(io_err(&config.models_dir))?;
        let agent = Agent {
            store: registry.store(&region),
            topology: registry.topology.clone(),
            region,
            metrics,
            following: None,
            activated_at: None,
            last_report: None,
            config,
        };
        if let Some(v) = agent.active() {
            agent.metrics.set_active(&agent.config.model, &v);
        }
        Ok(agent)
    }

    pub fn current_link(&self) -> PathBuf {
        self.config.models_dir.join("current")
    }

    /// The version `current` points at.
    pub fn active(&self) -> Option<String> {
        link_version(&self.current_link())
    }

    /// The version `previous` points at.
    pub fn previous(&self) -> Option<String> {
        link_version(&self.config.models_dir.join("previous"))
    }

    async fn channel(&self, channel: &str) -> Result<Option<Channel>, SyncError> {
        if channel.is_empty() {
            return Ok(None);
        }
        let Some((bytes, _)) = self
            .store
            .get_document(&keys::channel(&self.config.model, channel))
            .await?
        else {
            return Ok(None);
        };
        match Channel::from_json(&bytes) {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                tracing::warn!(channel, error = %e, "ignoring an invalid channel file");
                Ok(None)
            }
        }
    }

    /// The version this node should run, and the channel that says so.
    async fn desired(&self) -> Result<Option<(String, String)>, SyncError> {
        let node = &self.config.node;
        if let Some(canary) = self.channel(&self.config.canary_channel).await?
            && canary.selects(node, &self.region.name)
        {
            return Ok(Some((canary.version, canary.channel)));
        }
        Ok(self
            .channel(&self.config.channel)
            .await?
            .map(|c| (c.version, c.channel)))
    }

    /// One poll: read channels, fetch and switch if needed, report.
    pub async fn poll_once(&mut self) -> Result<Poll, SyncError> {
        let result = self.poll_inner().await;
        match &result {
            Ok(_) => self.metrics.poll_ok(),
            Err(e) => {
                self.metrics.poll_failed();
                if matches!(e, SyncError::Verify { .. }) {
                    self.metrics.activation("verify_failed");
                } else if matches!(e, SyncError::Residency { .. }) {
                    self.metrics.activation("refused");
                }
            }
        }
        result
    }

    async fn poll_inner(&mut self) -> Result<Poll, SyncError> {
        let Some((version, channel)) = self.desired().await? else {
            self.report(None).await;
            return Ok(Poll::NoChannel);
        };
        self.following = Some(channel);
        let active = self.active();
        if active.as_deref() == Some(&version) {
            self.report(Some(&version)).await;
            return Ok(Poll::Unchanged { version });
        }
        let dir = self.config.models_dir.join("versions").join(&version);
        let cached = dir.join(MANIFEST_FILE).is_file();
        if !cached {
            self.fetch(&version, &dir).await?;
        }
        self.switch(&version)?;
        self.metrics.activation("ok");
        self.metrics.set_active(&self.config.model, &version);
        self.activated_at = Some(now_rfc3339());
        tracing::info!(model = %self.config.model, %version, from = ?active, cached, "activated");
        self.cleanup();
        self.report(Some(&version)).await;
        Ok(Poll::Activated {
            version,
            from: active,
            cached,
        })
    }

    /// Downloads and verifies `version` into `dir`.
    async fn fetch(&self, version: &str, dir: &Path) -> Result<(), SyncError> {
        let model = format!("{}@{version}", self.config.model);
        let manifest = read_manifest(&self.store, &self.config.model, version)
            .await?
            .ok_or_else(|| SyncError::NotReplicated {
                model: model.clone(),
            })?;
        if !self
            .topology
            .may_hold_model(&manifest.residency, &self.region)
        {
            return Err(SyncError::Residency {
                model,
                region: self.region.name.clone(),
                residency: manifest.residency,
            });
        }
        let scratch = self.config.models_dir.join("versions").join(format!(
            ".incoming-{version}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let result = self.download_into(&manifest, &scratch).await;
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        if dir.exists() {
            // A directory without a manifest: a leftover; replace it.
            std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        }
        std::fs::rename(&scratch, dir).map_err(io_err(dir))?;
        Ok(())
    }

    async fn download_into(&self, manifest: &Manifest, scratch: &Path) -> Result<(), SyncError> {
        std::fs::create_dir_all(scratch).map_err(io_err(scratch))?;
        for file in &manifest.files {
            let dest = scratch.join(&file.path);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let key = keys::file(&manifest.name, &manifest.version, &file.path);
            let verify = |what: String| SyncError::Verify {
                model: manifest.id(),
                file: file.path.clone(),
                what,
            };
            let (size, sha) = match self.store.download(&key, &dest, file.size).await {
                Ok(done) => done,
                Err(e) if e.is_permanent() => return Err(verify(e.to_string())),
                Err(e) => return Err(e.into()),
            };
            self.metrics.downloaded(size);
            if size != file.size {
                return Err(verify(format!("{size} bytes, manifest says {}", file.size)));
            }
            if hex(&sha) != file.sha256 {
                return Err(verify(format!(
                    "sha256 {} does not match the manifest",
                    hex(&sha)
                )));
            }
        }
        let manifest_path = scratch.join(MANIFEST_FILE);
        std::fs::write(&manifest_path, manifest.to_json()).map_err(io_err(&manifest_path))?;
        // Make the files durable before the switch can point at them.
        if let Ok(d) = std::fs::File::open(scratch) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Points `current` at `version` (and `previous` at what it replaced).
    fn switch(&self, version: &str) -> Result<(), SyncError> {
        let dir = &self.config.models_dir;
        let old = self.active();
        replace_link(dir, "current", version)?;
        if let Some(old) = old.filter(|o| o != version) {
            replace_link(dir, "previous", &old)?;
        }
        Ok(())
    }

    /// Deletes old versions beyond the retention count, oldest first;
    /// never `current` or `previous`.
    fn cleanup(&self) {
        let versions = self.config.models_dir.join("versions");
        let keep: Vec<String> = [self.active(), self.previous()]
            .into_iter()
            .flatten()
            .collect();
        let Ok(entries) = std::fs::read_dir(&versions) else {
            return;
        };
        let mut dirs: Vec<(std::time::SystemTime, PathBuf, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let modified = e.metadata().ok()?.modified().ok()?;
                Some((modified, e.path(), name))
            })
            .collect();
        // Scratch directories of interrupted downloads go first.
        for (_, path, name) in &dirs {
            if name.starts_with(".incoming-") {
                let _ = std::fs::remove_dir_all(path);
            }
        }
        dirs.retain(|(_, _, name)| !name.starts_with('.'));
        dirs.sort();
        let excess = dirs.len().saturating_sub(self.config.retention);
        for (_, path, name) in dirs
            .into_iter()
            .filter(|(_, _, n)| !keep.contains(n))
            .take(excess)
        {
            tracing::info!(version = %name, "removing old version");
            let _ = std::fs::remove_dir_all(path);
        }
    }

    /// Writes this node's status when it changed or the heartbeat is due.
    async fn report(&mut self, version: Option<&str>) {
        let status = NodeStatus {
            node: self.config.node.clone(),
            region: self.region.name.clone(),
            model: self.config.model.clone(),
            version: version.map(str::to_owned),
            channel: self.following.clone(),
            activated_at: self.activated_at.clone(),
            reported_at: now_rfc3339(),
        };
        let due = match &self.last_report {
            None => true,
            Some((at, last)) => {
                at.elapsed() >= Duration::from_millis(self.config.heartbeat_interval_ms)
                    || last.version != status.version
                    || last.channel != status.channel
            }
        };
        if !due {
            return;
        }
        let body = Bytes::from(serde_json::to_vec(&status).unwrap_or_default());
        match self
            .store
            .put(&keys::node_status(&self.config.node), body)
            .await
        {
            Ok(_) => self.last_report = Some((Instant::now(), status)),
            Err(e) => tracing::warn!(error = %e, "cannot write node status"),
        }
    }

    /// Polls until `shutdown`: every `poll_interval_ms` while healthy, with
    /// jittered backoff (up to 30 s) while S3 fails.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let interval = Duration::from_millis(self.config.poll_interval_ms);
        let mut backoff = Backoff::new(interval, Duration::from_secs(30).max(interval));
        loop {
            let delay = match self.poll_once().await {
                Ok(_) => {
                    backoff.reset();
                    interval
                }
                Err(e) => {
                    tracing::warn!(error = %e, active = ?self.active(), "sync failed; keeping the current model");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }
}

/// The version a `versions/<version>` symlink points at.
fn link_version(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Atomically makes `dir/name` a symlink to `versions/<version>`.
fn replace_link(dir: &Path, name: &str, version: &str) -> Result<(), SyncError> {
    let tmp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let target = Path::new("versions").join(version);
    std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
    let link = dir.join(name);
    std::fs::rename(&tmp, &link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        SyncError::Io {
            path: link,
            source: e,
        }
    })
}

/// Serves `/metrics` and `/healthz` for an agent.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<SyncMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
