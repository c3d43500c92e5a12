//! The sync agent's Prometheus metrics. Every name here is listed in
//! `docs/metrics.md`; a test checks that the two agree.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActiveLabel {
    pub model: String,
    pub version: String,
}

pub struct SyncMetrics {
    registry: Registry,
    polls: Family<OutcomeLabel, Counter>,
    activations: Family<OutcomeLabel, Counter>,
    downloaded_bytes: Counter,
    last_success: Gauge<f64, AtomicU64>,
    staleness: Gauge<f64, AtomicU64>,
    active: Family<ActiveLabel, Gauge>,
    active_label: Mutex<Option<ActiveLabel>>,
}

impl std::fmt::Debug for SyncMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncMetrics")
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl SyncMetrics {
    pub const POLL_OUTCOMES: [&'static str; 2] = ["ok", "error"];
    pub const ACTIVATION_OUTCOMES: [&'static str; 3] = ["ok", "verify_failed", "refused"];

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("earshot_registry_sync");
        let m = SyncMetrics {
            polls: Family::default(),
            activations: Family::default(),
            downloaded_bytes: Counter::default(),
            last_success: Gauge::default(),
            staleness: Gauge::default(),
            active: Family::default(),
            active_label: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "polls",
            "Polls of the region's bucket, by outcome (ok, error)",
            m.polls.clone(),
        );
        registry.register(
            "activations",
            "Version switches, by outcome (ok, verify_failed: a download did not match its manifest and was discarded, refused: residency forbids the model here)",
            m.activations.clone(),
        );
        registry.register(
            "downloaded_bytes",
            "Model bytes downloaded",
            m.downloaded_bytes.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful poll",
            m.last_success.clone(),
        );
        registry.register(
            "staleness_seconds",
            "Seconds since the last successful poll, updated at every attempt",
            m.staleness.clone(),
        );
        registry.register(
            "active_info",
            "1 for the model version the node's current directory points at",
            m.active.clone(),
        );
        for outcome in Self::POLL_OUTCOMES {
            let _ = m.polls.get_or_create(&OutcomeLabel { outcome });
        }
        for outcome in Self::ACTIVATION_OUTCOMES {
            let _ = m.activations.get_or_create(&OutcomeLabel { outcome });
        }
        SyncMetrics { registry, ..m }
    }

    pub fn poll_ok(&self) {
        self.polls
            .get_or_create(&OutcomeLabel { outcome: "ok" })
            .inc();
        let now = unix_now();
        self.last_success.set(now);
        self.staleness.set(0.0);
    }

    pub fn poll_failed(&self) {
        self.polls
            .get_or_create(&OutcomeLabel { outcome: "error" })
            .inc();
        let last = self.last_success.get();
        if last > 0.0 {
            self.staleness.set(unix_now() - last);
        }
    }

    pub fn activation(&self, outcome: &'static str) {
        self.activations
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn downloaded(&self, bytes: u64) {
        self.downloaded_bytes.inc_by(bytes);
    }

    pub fn set_active(&self, model: &str, version: &str) {
        let label = ActiveLabel {
            model: model.to_owned(),
            version: version.to_owned(),
        };
        if let Ok(mut current) = self.active_label.lock() {
            if let Some(old) = current.take() {
                self.active.remove(&old);
            }
            self.active.get_or_create(&label).set(1);
            *current = Some(label);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for SyncMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exports_exactly_what_docs_metrics_md_lists() {
        let metrics = super::SyncMetrics::new();
        metrics.set_active("whisper", "1");
        earshot_common::telemetry::check_metrics_documented(
            &metrics.render(),
            "earshot_registry_sync_",
        )
        .unwrap();
    }

    #[test]
    fn only_the_active_version_is_exported() {
        let metrics = super::SyncMetrics::new();
        metrics.set_active("whisper", "1");
        metrics.set_active("whisper", "2");
        let text = metrics.render();
        assert!(
            text.contains(r#"earshot_registry_sync_active_info{model="whisper",version="2"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"version="1""#), "{text}");
    }
}
