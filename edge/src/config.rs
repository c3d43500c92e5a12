//! `earshot-edge` configuration: one TOML file, checked before any port is
//! bound. Relative paths are resolved against the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use earshot_common::tls::{Liveness, TlsPaths};
use serde::Deserialize;

use crate::endpoint::EndpointConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This edge's name in the topology.
    pub name: String,
    /// Path of the topology file.
    pub topology: PathBuf,
    /// Address of the client-facing HTTP/WebSocket listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Local address of the QUIC uplink socket.
    #[serde(default = "default_uplink_bind")]
    pub uplink_bind: SocketAddr,
    /// The edge's client certificate and the CA regions must chain to.
    pub tls: TlsPaths,
    pub vad: VadConfig,
    #[serde(default)]
    pub limits: Limits,
    /// How soon a dead region is noticed (QUIC keep-alive, idle timeout).
    #[serde(default)]
    pub quic: Liveness,
    /// How utterances are retried across the permitted regions.
    #[serde(default)]
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub translation: TranslationConfig,
    /// Live partial transcripts from a small model on this edge; absent:
    /// sessions get no `partial` messages.
    #[serde(default)]
    pub partials: Option<crate::partials::PartialsConfig>,
    /// Log transcript text (never set in production).
    #[serde(default)]
    pub debug_content: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VadConfig {
    /// `silero_vad.onnx` (from the `silero-vad` package).
    pub model: PathBuf,
    /// `libonnxruntime.so.*` (from the `onnxruntime` package).
    pub onnxruntime: PathBuf,
    /// Probability at or above which a window is speech.
    #[serde(default = "d_threshold")]
    pub threshold: f32,
    /// Probability below which a window is silence (default: threshold - 0.15).
    pub neg_threshold: Option<f32>,
    #[serde(default = "d_min_speech")]
    pub min_speech_ms: u32,
    #[serde(default = "d_min_silence")]
    pub min_silence_ms: u32,
    #[serde(default = "d_pre_roll")]
    pub pre_roll_ms: u32,
    #[serde(default = "d_post_roll")]
    pub post_roll_ms: u32,
    #[serde(default = "d_max_utterance")]
    pub max_utterance_ms: u32,
    /// Silero inference threads shared by all client sessions (one ONNX
    /// Runtime session each); each call evaluates the windows of every
    /// stream waiting at that moment as one batch.
    #[serde(default = "d_pool")]
    pub threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TranslationConfig {
    /// Languages sessions may ask finals to be translated into (`translate=`).
    /// `en` is Whisper's own translate task; any other needs the regions'
    /// Marian pairs (`[translation] models` in their config). A session
    /// asking for a target not listed gets one `translation_unavailable`
    /// error at its start.
    pub targets: Vec<String>,
}

impl Default for TranslationConfig {
    fn default() -> Self {
        TranslationConfig {
            targets: vec!["en".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent client sessions; more are refused before the WebSocket
    /// upgrade with HTTP 503 and `Retry-After`.
    pub max_sessions: usize,
    /// The `Retry-After` of that refusal, in seconds.
    pub retry_after_s: u32,
    /// Largest WebSocket message (audio or text) a client may send.
    pub max_frame_bytes: usize,
    /// Largest file `/v1/audio/transcriptions` and `/translations` take
    /// (OpenAI's limit is 25 MB).
    pub max_file_bytes: usize,
    /// A session that sends neither audio nor a `keepalive` message for
    /// this long, while no final is owed to it, is closed (`idle_timeout`).
    /// WebSocket pings do not count.
    pub idle_timeout_ms: u64,
    /// A session open this long is closed (`session_too_long`) after its
    /// pending finals: reconnect to go on.
    pub max_session_ms: u64,
    /// Time a connection has to send its HTTP request head (the upgrade);
    /// a slower one is dropped.
    pub header_timeout_ms: u64,
    /// The WebSocket read buffer of each connection (it grows, up to
    /// `max_frame_bytes`, only for a larger message).
    pub read_buffer_bytes: usize,
    /// Bytes of outgoing messages buffered per connection before a write
    /// waits for the socket.
    pub write_buffer_bytes: usize,
    /// Utterances of one session awaiting their final; reading from the
    /// client pauses while this many are pending (backpressure).
    pub max_pending_utterances: usize,
    /// Time to establish a QUIC connection to a region.
    pub connect_timeout_ms: u64,
    /// Time one region has to answer one utterance before the next
    /// permitted region is tried.
    pub attempt_timeout_ms: u64,
    /// When a session closes (the client's `close`, or the edge's
    /// shutdown), time its pending utterances get to end in a final or
    /// their own error. Longer than `uplink.retry_budget_ms`, so an
    /// utterance that runs out of regions ends in `unavailable`, not in the
    /// drain's `shutting_down`.
    pub drain_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 2048,
            retry_after_s: 2,
            max_frame_bytes: 1 << 20,
            max_file_bytes: 25 << 20,
            idle_timeout_ms: 10_000,
            max_session_ms: 4 * 3600 * 1000,
            header_timeout_ms: 5_000,
            read_buffer_bytes: 4096,
            write_buffer_bytes: 4096,
            max_pending_utterances: 8,
            connect_timeout_ms: 3_000,
            attempt_timeout_ms: 90_000,
            drain_timeout_ms: 25_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// How long an utterance keeps trying while no permitted region can
    /// take it (all unreachable, busy or draining) before the client gets
    /// `unavailable`. Covers a region's restart.
    pub retry_budget_ms: u64,
    /// Consecutive failures (transport, timeout, retryable answer) that
    /// open a region's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker skips its region before one probe.
    pub breaker_open_ms: u64,
    /// `host:port` to dial instead of a region's topology endpoint (a
    /// local proxy or sidecar), by region name; the region's certificate
    /// name still comes from the topology. `earshot up` dials through
    /// proxies a drill can cut (`partition`).
    pub dial: std::collections::BTreeMap<String, String>,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            retry_budget_ms: 20_000,
            breaker_failures: 2,
            breaker_open_ms: 500,
            dial: Default::default(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_uplink_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn d_threshold() -> f32 {
    0.5
}
fn d_min_speech() -> u32 {
    250
}
fn d_min_silence() -> u32 {
    500
}
fn d_pre_roll() -> u32 {
    200
}
fn d_post_roll() -> u32 {
    100
}
fn d_max_utterance() -> u32 {
    15_000
}
fn d_pool() -> usize {
    2
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

impl EdgeConfig {
    /// Reads, resolves and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut config: EdgeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.topology,
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.tls.ca,
            &mut self.vad.model,
            &mut self.vad.onnxruntime,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(partials) = &mut self.partials
            && partials.model.is_relative()
        {
            partials.model = base.join(&partials.model);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let v = &self.vad;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(v.threshold > 0.0 && v.threshold < 1.0) {
            return bad(format!("vad.threshold {} must be in (0, 1)", v.threshold));
        }
        let neg = self.neg_threshold();
        if !(0.0..=v.threshold).contains(&neg) {
            return bad(format!(
                "vad.neg_threshold {neg} must be in [0, threshold {}]",
                v.threshold
            ));
        }
        if v.min_silence_ms < 32 || v.min_speech_ms < 32 {
            return bad(
                "vad.min_silence_ms and vad.min_speech_ms must be at least one 32 ms window".into(),
            );
        }
        if v.post_roll_ms > v.min_silence_ms {
            return bad("vad.post_roll_ms must not exceed vad.min_silence_ms".into());
        }
        if v.max_utterance_ms > 30_000 || v.max_utterance_ms <= v.min_speech_ms + v.pre_roll_ms {
            return bad(format!(
                "vad.max_utterance_ms {} must be at most 30000 (Whisper's window) and longer than min_speech_ms + pre_roll_ms",
                v.max_utterance_ms
            ));
        }
        self.quic.validate().map_err(ConfigError::Invalid)?;
        let u = &self.uplink;
        if u.breaker_failures == 0 || u.breaker_open_ms == 0 || u.breaker_open_ms > 60_000 {
            return bad(
                "uplink.breaker_failures must be positive and uplink.breaker_open_ms in 1..=60000"
                    .into(),
            );
        }
        if u.retry_budget_ms > 600_000 {
            return bad("uplink.retry_budget_ms must be at most 600000".into());
        }
        if self.limits.drain_timeout_ms <= u.retry_budget_ms {
            return bad(format!(
                "limits.drain_timeout_ms ({}) must be longer than uplink.retry_budget_ms ({}): a closing session waits for its utterances, and one that runs out of regions must end in `unavailable`, not be cut by the drain",
                self.limits.drain_timeout_ms, u.retry_budget_ms
            ));
        }
        for target in &self.translation.targets {
            if !earshot_common::client::is_language_code(target) {
                return bad(format!(
                    "translation.targets: {target:?} is not a language code (two or three lowercase letters, e.g. \"de\")"
                ));
            }
        }
        if let Some(partials) = &self.partials {
            partials.validate().map_err(ConfigError::Invalid)?;
        }
        let l = &self.limits;
        if l.max_file_bytes < 1024 || l.max_file_bytes > 1 << 30 {
            return bad("limits.max_file_bytes must be in 1024..=1073741824".into());
        }
        if l.max_sessions == 0 || l.max_pending_utterances == 0 || l.max_frame_bytes < 1024 {
            return bad("limits.max_sessions and limits.max_pending_utterances must be positive, limits.max_frame_bytes at least 1024".into());
        }
        if l.idle_timeout_ms == 0 || l.max_session_ms == 0 || l.header_timeout_ms == 0 {
            return bad(
                "limits.idle_timeout_ms, limits.max_session_ms and limits.header_timeout_ms must be positive"
                    .into(),
            );
        }
        if !(256..=1 << 20).contains(&l.read_buffer_bytes)
            || !(256..=1 << 20).contains(&l.write_buffer_bytes)
        {
            return bad(
                "limits.read_buffer_bytes and limits.write_buffer_bytes must be in 256..=1048576"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn neg_threshold(&self) -> f32 {
        self.vad
            .neg_threshold
            .unwrap_or((self.vad.threshold - 0.15).max(0.01))
    }

    /// Endpointing parameters in samples at 16 kHz.
    pub fn endpoint(&self) -> EndpointConfig {
        let ms = |v: u32| u64::from(v) * 16;
        EndpointConfig {
            threshold: self.vad.threshold,
            neg_threshold: self.neg_threshold(),
            min_speech: ms(self.vad.min_speech_ms),
            min_silence: ms(self.vad.min_silence_ms),
            pre_roll: ms(self.vad.pre_roll_ms),
            post_roll: ms(self.vad.post_roll_ms),
            max_utterance: ms(self.vad.max_utterance_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "edge-local"
        topology = "topology.toml"
        [tls]
        cert = "certs/edge-local.pem"
        key = "certs/edge-local.key"
        ca = "/etc/earshot/ca.pem"
        [vad]
        model = "silero_vad.onnx"
        onnxruntime = "libonnxruntime.so"
    "#;

    fn parse(text: &str) -> Result<EdgeConfig, ConfigError> {
        let dir = tempfile_dir();
        let path = dir.join("edge.toml");
        std::fs::write(&path, text).unwrap();
        EdgeConfig::load(&path)
    }

    fn tempfile_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("earshot-edge-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.topology.is_absolute() && c.topology.ends_with("topology.toml"));
        assert_eq!(c.tls.ca, PathBuf::from("/etc/earshot/ca.pem"));
        let e = c.endpoint();
        assert_eq!(e.min_silence, 8000);
        assert!((e.neg_threshold - 0.35).abs() < 1e-6);
        assert_eq!(c.limits.max_sessions, 2048);
        assert_eq!(c.limits.idle_timeout_ms, 10_000);
        assert_eq!(c.translation.targets, ["en"]);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        let err = parse(&format!("{MINIMAL}\nlisten_port = 3")).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = parse(&MINIMAL.replace("[vad]", "[vad]\nthreshold = 1.5")).unwrap_err();
        assert!(err.to_string().contains("vad.threshold"), "{err}");
        let err = parse(&MINIMAL.replace("[vad]", "[vad]\nmax_utterance_ms = 60000")).unwrap_err();
        assert!(err.to_string().contains("max_utterance_ms"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}\n[translation]\ntargets = [\"en\", \"German\"]"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("\"German\" is not a language code"),
            "{err}"
        );
        // A drain shorter than the retry budget would cut an utterance
        // that is still looking for a region with `shutting_down`.
        let err = parse(&format!("{MINIMAL}\n[uplink]\nretry_budget_ms = 30000")).unwrap_err();
        assert!(
            err.to_string()
                .contains("must be longer than uplink.retry_budget_ms"),
            "{err}"
        );
        let err = EdgeConfig::load(Path::new("/nonexistent/edge.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/edge.toml"));
    }
}
