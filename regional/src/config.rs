//! `earshot-regional` configuration: one TOML file, checked before any port
//! is bound. Relative paths are resolved against the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use earshot_asr::EncoderWindow;
use earshot_common::tls::{Liveness, TlsPaths};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionalConfig {
    /// This region's name in the topology.
    pub region: String,
    /// Path of the topology file.
    pub topology: PathBuf,
    /// UDP address of the QUIC ingress. Defaults to the region's `quic`
    /// endpoint in the topology when that is an IP address.
    pub quic_listen: Option<SocketAddr>,
    /// Address of the HTTP listener for `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "default_http")]
    pub http_listen: SocketAddr,
    /// Run the QUIC ingress (the default). `false`, with `worker.count > 0`,
    /// is a worker-only process: it takes jobs from the region's stream and
    /// publishes their results, binds no QUIC port and needs no `[tls]`, so
    /// workers can be scaled, restarted or killed apart from the ingress.
    #[serde(default = "yes")]
    pub ingress: bool,
    /// The region's server certificate and the CA edges must chain to;
    /// required when the ingress runs.
    pub tls: Option<TlsPaths>,
    pub redis: RedisConfig,
    pub worker: WorkerConfig,
    #[serde(default)]
    pub limits: Limits,
    /// How soon a dead edge connection is noticed (QUIC keep-alive, idle
    /// timeout).
    #[serde(default)]
    pub quic: Liveness,
    #[serde(default)]
    pub translation: TranslationConfig,
    /// Log transcript text (never set in production).
    #[serde(default)]
    pub debug_content: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// e.g. `redis://127.0.0.1:6379/0`
    pub url: String,
    /// Entries queued or in progress in the utterance stream past which the
    /// ingress answers `busy` (the edge tries the next permitted region).
    /// Entries are deleted when answered; none is ever trimmed.
    #[serde(default = "d_queue_limit")]
    pub queue_limit: usize,
    /// How long an utterance's record and answer are kept, so a retry of
    /// it (same edge, session, utterance) is answered without transcribing
    /// again.
    #[serde(default = "d_result_ttl")]
    pub result_ttl_s: u64,
    /// Per-command timeout for the ingress's Redis calls.
    #[serde(default = "d_redis_timeout")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Whisper model directory (`config.json`, `model.safetensors`,
    /// `tokenizer.json`). Set `count = 0` to run an ingress-only node.
    pub model: PathBuf,
    /// Model id reported in finals; defaults to `name@version` from the
    /// directory's manifest.json, else the directory name.
    pub model_id: Option<String>,
    /// ASR workers in this process (each loads the model once).
    #[serde(default = "d_workers")]
    pub count: usize,
    #[serde(default)]
    pub encoder_window: EncoderWindow,
    /// Most utterances recognised together in one batch (encoded together
    /// when their windows match, decoded in lockstep). 1 turns batching off.
    /// Default: 1 on the CPU (where batching gained little and delays each
    /// job to its batch's end: docs/benchmarks.md), 8 on a GPU.
    pub max_batch: Option<usize>,
    /// After a batch's first utterance arrives, how long the worker waits
    /// for more before recognising (0: take what is queued, wait for
    /// nothing; a busy worker batches anyway).
    #[serde(default)]
    pub batch_window_ms: u64,
    /// A pending job idle this long is taken over from its (crashed)
    /// consumer with XAUTOCLAIM.
    #[serde(default = "d_claim_idle")]
    pub claim_idle_ms: u64,
    /// Deliveries after which an entry still unanswered (its worker died or
    /// the model failed on it each time) moves to the dead-letter stream,
    /// its utterance answered with an error.
    #[serde(default = "d_max_deliveries")]
    pub max_deliveries: usize,
    /// This process's workers' consumer names are `<name>-<index>`; a
    /// restarted process under the same name takes back what its workers
    /// had in hand at once. Must be unique among live processes of the
    /// region. Default: `$HOSTNAME` (a pod's name), else `regional`.
    pub name: Option<String>,
}

/// Text translation (Marian MT) for `translate=<lang>` other than English.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranslationConfig {
    /// A directory of language pairs, one subdirectory each named
    /// `<from>-<to>` (e.g. `en-de`) in the published Marian layout; all are
    /// loaded at start. Without it only Whisper's `en` is served.
    pub models: Option<PathBuf>,
}

impl WorkerConfig {
    /// The prefix of this process's consumer names.
    pub fn consumer_prefix(&self) -> String {
        self.name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "regional".into())
    }

    /// `max_batch`, or its default for where inference runs.
    pub fn max_batch(&self) -> usize {
        self.max_batch.unwrap_or_else(|| {
            if earshot_asr::whisper::inference_device().is_cpu() {
                1
            } else {
                8
            }
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent QUIC connections (edges).
    pub max_connections: usize,
    /// Concurrent utterance streams per connection.
    pub max_streams_per_connection: u32,
    /// Utterances in flight in this ingress; more are answered `overloaded`.
    pub max_inflight: usize,
    /// Longest utterance accepted, in seconds of 16 kHz audio.
    pub max_audio_seconds: u32,
    /// Time an accepted utterance may wait for its result.
    pub result_timeout_ms: u64,
    /// On shutdown, time in-flight utterances get to finish.
    pub drain_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_streams_per_connection: 1024,
            max_inflight: 4096,
            max_audio_seconds: 30,
            result_timeout_ms: 60_000,
            drain_timeout_ms: 15_000,
        }
    }
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn d_queue_limit() -> usize {
    10_000
}
fn d_result_ttl() -> u64 {
    600
}
fn d_max_deliveries() -> usize {
    3
}
fn d_redis_timeout() -> u64 {
    2_000
}
fn d_workers() -> usize {
    1
}
fn yes() -> bool {
    true
}

fn d_claim_idle() -> u64 {
    30_000
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config {path} is invalid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl RegionalConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut config: RegionalConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate()?;
        Ok(config)
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        let mut paths = vec![&mut self.topology, &mut self.worker.model];
        if let Some(tls) = &mut self.tls {
            paths.extend([&mut tls.cert, &mut tls.key, &mut tls.ca]);
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = &mut self.translation.models
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            return bad("redis.url must start with redis:// or rediss://");
        }
        if self.ingress && self.tls.is_none() {
            return bad("[tls] is required when the ingress runs (ingress = true, the default)");
        }
        if !self.ingress && self.worker.count == 0 {
            return bad(
                "ingress = false and worker.count = 0 leave this node nothing to do: run the ingress, workers or both",
            );
        }
        let l = &self.limits;
        if l.max_audio_seconds == 0 || l.max_audio_seconds > 30 {
            return bad("limits.max_audio_seconds must be between 1 and 30 (Whisper's window)");
        }
        if l.max_connections == 0 || l.max_inflight == 0 || l.max_streams_per_connection == 0 {
            return bad(
                "limits.max_connections, max_inflight and max_streams_per_connection must be positive",
            );
        }
        if !(1..=64).contains(&self.worker.max_batch()) {
            return bad("worker.max_batch must be between 1 and 64");
        }
        if self.worker.batch_window_ms > 1_000 {
            return bad("worker.batch_window_ms must be at most 1000 (it delays every batch)");
        }
        if self.worker.claim_idle_ms < 1_000 {
            return bad("worker.claim_idle_ms must be at least 1000");
        }
        if !(1..=100).contains(&self.worker.max_deliveries) {
            return bad("worker.max_deliveries must be between 1 and 100");
        }
        if self.redis.queue_limit == 0 || self.redis.result_ttl_s == 0 {
            return bad("redis.queue_limit and redis.result_ttl_s must be positive");
        }
        if let Some(name) = &self.worker.name
            && (name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        {
            return bad("worker.name must be 1-64 characters of letters, digits, '-', '_' or '.'");
        }
        self.quic.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    pub fn max_audio_bytes(&self) -> usize {
        self.limits.max_audio_seconds as usize * earshot_common::wire::SAMPLE_RATE as usize * 2
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<RegionalConfig, ConfigError> {
        let config: RegionalConfig = toml::from_str(text).unwrap();
        config.validate().map(|()| config)
    }

    const BASE: &str = r#"
region = "eu-west"
topology = "topology.toml"
[redis]
url = "redis://127.0.0.1:6379"
"#;

    #[test]
    fn a_worker_only_node_needs_no_tls_but_an_ingress_does() {
        let worker_only = parse(&format!(
            "ingress = false\n{BASE}[worker]\nmodel = \"m\"\ncount = 2\n"
        ))
        .unwrap();
        assert!(!worker_only.ingress && worker_only.tls.is_none());
        let err = parse(&format!("{BASE}[worker]\nmodel = \"m\"\n")).unwrap_err();
        assert!(err.to_string().contains("[tls] is required"), "{err}");
    }

    #[test]
    fn a_node_with_neither_ingress_nor_workers_is_refused() {
        let err = parse(&format!(
            "ingress = false\n{BASE}[worker]\nmodel = \"m\"\ncount = 0\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("nothing to do"), "{err}");
    }
}
