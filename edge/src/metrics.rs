//! The edge's Prometheus metrics. Every name here is listed in
//! `docs/metrics.md`; a test checks that the two agree.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionOutcome {
    pub region: String,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiptLabel {
    pub region: String,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabel {
    pub region: String,
}

fn latency_histogram() -> Histogram {
    // 5 ms .. ~42 s
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions: Counter,
    pub client_errors: Family<CodeLabel, Counter>,
    pub audio_received_seconds: Counter<f64, AtomicU64>,
    pub utterances: Family<RegionOutcome, Counter>,
    pub utterances_abandoned: Counter,
    pub uplink_attempts: Family<RegionOutcome, Counter>,
    pub utterance_latency: Family<RegionLabel, Histogram, fn() -> Histogram>,
    pub region_breaker: Family<RegionLabel, Gauge>,
    pub breaker_opened: Family<RegionLabel, Counter>,
    pub failovers: Family<RegionLabel, Counter>,
    pub retry_rounds: Counter,
    pub receipts: Family<ReceiptLabel, Counter>,
    pub refused: Family<ReasonLabel, Counter>,
    pub vad_batch_size: Histogram,
    pub vad_compute_seconds: Counter<f64, AtomicU64>,
    pub vad_windows: Counter,
    pub frame_seconds: Histogram,
    pub files: Family<ReasonLabel, Counter>,
    pub resumes: Counter,
    pub resumed_finals: Counter,
    pub partials: Counter,
    pub partials_skipped: Family<ReasonLabel, Counter>,
    pub partial_compute_seconds: Histogram,
    pub partial_model_loads: Family<ReasonLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("earshot_edge");
        let m = Metrics {
            sessions_active: Gauge::default(),
            sessions: Counter::default(),
            client_errors: Family::default(),
            audio_received_seconds: Counter::default(),
            utterances: Family::default(),
            utterances_abandoned: Counter::default(),
            uplink_attempts: Family::default(),
            utterance_latency: Family::new_with_constructor(latency_histogram),
            region_breaker: Family::default(),
            breaker_opened: Family::default(),
            failovers: Family::default(),
            retry_rounds: Counter::default(),
            receipts: Family::default(),
            refused: Family::default(),
            // 1, 2, 4 .. 256 streams per call
            vad_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            vad_compute_seconds: Counter::default(),
            vad_windows: Counter::default(),
            // 0.5 ms .. ~1.3 s in steps of 25%
            frame_seconds: Histogram::new(exponential_buckets(0.0005, 1.25, 36)),
            files: Family::default(),
            resumes: Counter::default(),
            resumed_finals: Counter::default(),
            partials: Counter::default(),
            partials_skipped: Family::default(),
            // 10 ms .. ~10 s
            partial_compute_seconds: Histogram::new(exponential_buckets(0.01, 1.6, 16)),
            partial_model_loads: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions_active",
            "Client sessions open now",
            m.sessions_active.clone(),
        );
        registry.register("sessions", "Client sessions accepted", m.sessions.clone());
        registry.register(
            "client_errors",
            "Error messages sent to clients, by code",
            m.client_errors.clone(),
        );
        registry.register(
            "audio_received_seconds",
            "Seconds of client audio received",
            m.audio_received_seconds.clone(),
        );
        registry.register(
            "utterances",
            "Utterances cut by the VAD, by serving region and outcome (final, error)",
            m.utterances.clone(),
        );
        registry.register(
            "utterances_abandoned",
            "Utterances whose client left before their final was delivered",
            m.utterances_abandoned.clone(),
        );
        registry.register(
            "uplink_attempts",
            "Attempts to have a region transcribe an utterance (or return a resumed session's), by region and outcome (ok, not_found, refused, busy, retryable, transport, timeout, corrupted, skipped: breaker open)",
            m.uplink_attempts.clone(),
        );
        registry.register(
            "utterance_latency_seconds",
            "Time from the end of an utterance (VAD cut) to its final arriving at the edge",
            m.utterance_latency.clone(),
        );
        registry.register(
            "region_breaker",
            "Circuit breaker state per region: 0 closed, 1 half-open, 2 open",
            m.region_breaker.clone(),
        );
        registry.register(
            "breaker_opened",
            "Times a region's circuit breaker opened",
            m.breaker_opened.clone(),
        );
        registry.register(
            "failovers",
            "Utterances answered by a region other than the first permitted one, by the region that answered",
            m.failovers.clone(),
        );
        registry.register(
            "retry_rounds",
            "Times an utterance found no permitted region able to take it and waited to try them again",
            m.retry_rounds.clone(),
        );
        registry.register(
            "receipts",
            "Finals' receipts checked before delivery, by region and outcome (verified, or the failure code: the final is withheld)",
            m.receipts.clone(),
        );
        registry.register(
            "refused",
            "Connections refused before the WebSocket upgrade with 503 and Retry-After, by reason (max_sessions, draining)",
            m.refused.clone(),
        );
        registry.register(
            "vad_batch_size",
            "Streams evaluated together in one Silero call",
            m.vad_batch_size.clone(),
        );
        registry.register(
            "vad_compute_seconds",
            "Seconds spent in Silero inference (all VAD threads)",
            m.vad_compute_seconds.clone(),
        );
        registry.register(
            "vad_windows",
            "32 ms stream windows evaluated by Silero",
            m.vad_windows.clone(),
        );
        registry.register(
            "frame_seconds",
            "Time from an audio frame's arrival to its last VAD window evaluated (waiting for a VAD thread included)",
            m.frame_seconds.clone(),
        );
        registry.register(
            "files",
            "Files sent to /v1/audio/transcriptions or /translations, by outcome (ok, bad_file: refused as not readable audio, error: no region could answer or the edge failed)",
            m.files.clone(),
        );
        registry.register(
            "resumes",
            "Sessions resumed (session= and last= on the upgrade)",
            m.resumes.clone(),
        );
        registry.register(
            "resumed_finals",
            "Finals a resumed session was sent from what the regions held",
            m.resumed_finals.clone(),
        );
        registry.register(
            "partials",
            "Partial transcripts sent to clients",
            m.partials.clone(),
        );
        registry.register(
            "partials_skipped",
            "Partials not sent, by reason (busy: every partials thread was busy; stale: the utterance's final went first; failed: the model failed on the audio)",
            m.partials_skipped.clone(),
        );
        registry.register(
            "partial_compute_seconds",
            "Time one partial took on a partials thread",
            m.partial_compute_seconds.clone(),
        );
        registry.register(
            "partial_model_loads",
            "Partials model versions swapped in after the sync agent moved the channel, by outcome (loaded, failed: the old one kept serving)",
            m.partial_model_loads.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Outcomes of `uplink_attempts`.
    pub const ATTEMPT_OUTCOMES: [&'static str; 9] = [
        "ok",
        "not_found",
        "refused",
        "busy",
        "retryable",
        "transport",
        "timeout",
        "corrupted",
        "skipped",
    ];

    /// Creates every series with a known label set at zero, so dashboards
    /// and alerts see them before the first event.
    pub fn init_series(&self, regions: &[String]) {
        for code in earshot_common::client::ClientErrorCode::ALL {
            let _ = self.client_errors.get_or_create(&CodeLabel {
                code: code.as_str(),
            });
        }
        for reason in ["max_sessions", "draining"] {
            let _ = self.refused.get_or_create(&ReasonLabel { reason });
        }
        for reason in ["ok", "bad_file", "error"] {
            let _ = self.files.get_or_create(&ReasonLabel { reason });
        }
        for reason in ["busy", "stale", "failed"] {
            let _ = self.partials_skipped.get_or_create(&ReasonLabel { reason });
        }
        for reason in ["loaded", "failed"] {
            let _ = self
                .partial_model_loads
                .get_or_create(&ReasonLabel { reason });
        }
        let none = ["none".to_owned()];
        for region in regions.iter().chain(&none) {
            for outcome in ["final", "error"] {
                let _ = self.utterances.get_or_create(&RegionOutcome {
                    region: region.clone(),
                    outcome,
                });
            }
        }
        for region in regions {
            for outcome in Self::ATTEMPT_OUTCOMES {
                let _ = self.uplink_attempts.get_or_create(&RegionOutcome {
                    region: region.clone(),
                    outcome,
                });
            }
            let label = RegionLabel {
                region: region.clone(),
            };
            let _ = self.utterance_latency.get_or_create(&label);
            let _ = self.region_breaker.get_or_create(&label);
            let _ = self.breaker_opened.get_or_create(&label);
            let _ = self.failovers.get_or_create(&label);
            for outcome in ["verified", "missing", "residency_violation"] {
                let _ = self.receipts.get_or_create(&ReceiptLabel {
                    region: region.clone(),
                    outcome,
                });
            }
        }
    }

    /// Where the VAD threads report (clones of these metrics).
    pub fn vad(&self) -> crate::vad::VadMetrics {
        crate::vad::VadMetrics {
            batch_size: Some(self.vad_batch_size.clone()),
            compute_seconds: self.vad_compute_seconds.clone(),
            windows: self.vad_windows.clone(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exports_exactly_what_docs_metrics_md_lists() {
        let metrics = super::Metrics::new();
        metrics.init_series(&["eu-west".to_owned()]);
        earshot_common::telemetry::check_metrics_documented(&metrics.render(), "earshot_edge_")
            .unwrap();
    }
}
