//! The regional node's Prometheus metrics. Every name here is listed in
//! `docs/metrics.md`; a test checks that the two agree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JurisdictionLabel {
    pub jurisdiction: String,
    pub layer: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionJurisdictionLabel {
    pub jurisdiction: String,
}

/// A jurisdiction as a label value: one the topology knows, else
/// `unknown`, so a peer cannot create series at will.
pub fn jurisdiction_label(
    topology: &earshot_common::topology::Topology,
    jurisdiction: &str,
) -> String {
    match topology.jurisdiction(jurisdiction) {
        Some(j) => j.name.clone(),
        None => "unknown".to_owned(),
    }
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub connections_active: Gauge,
    pub inflight: Gauge,
    pub utterances: Family<OutcomeLabel, Counter>,
    pub residency_refusals: Family<JurisdictionLabel, Counter>,
    /// Utterance streams received, by the session's jurisdiction.
    pub received: Family<SessionJurisdictionLabel, Counter>,
    pub jobs: Family<OutcomeLabel, Counter>,
    pub jobs_claimed: Counter,
    pub queue_wait: Histogram,
    pub inference: Histogram,
    pub batch_size: Histogram,
    pub result_wait: Histogram,
    pub model_reloads: Family<OutcomeLabel, Counter>,
    pub text_withheld: Family<ReasonLabel, Counter>,
    pub deduplicated: Family<StateLabel, Counter>,
    pub resumes: Family<OutcomeLabel, Counter>,
    pub results_polled: Counter,
    pub dead_letters: Counter,
    pub results_unrouted: Counter,
    /// Utterances handed back to the edge because the result channel was
    /// lost while they waited.
    pub handed_back: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("earshot_regional");
        let m = Metrics {
            connections_active: Gauge::default(),
            inflight: Gauge::default(),
            utterances: Family::default(),
            residency_refusals: Family::default(),
            received: Family::default(),
            jobs: Family::default(),
            jobs_claimed: Counter::default(),
            queue_wait: seconds_histogram(),
            inference: seconds_histogram(),
            // 1, 2, 4, ... 64 utterances
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            result_wait: seconds_histogram(),
            model_reloads: Family::default(),
            text_withheld: Family::default(),
            deduplicated: Family::default(),
            resumes: Family::default(),
            results_polled: Counter::default(),
            dead_letters: Counter::default(),
            results_unrouted: Counter::default(),
            handed_back: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections_active",
            "QUIC connections from edges open now",
            m.connections_active.clone(),
        );
        registry.register(
            "inflight",
            "Utterances accepted by this ingress and not yet answered",
            m.inflight.clone(),
        );
        registry.register(
            "utterances",
            "Utterance streams handled by the ingress, by outcome (final, refused, invalid, queue_unavailable, timeout, overloaded, busy, shutting_down, error)",
            m.utterances.clone(),
        );
        registry.register(
            "received",
            "Utterance streams received from edges, by the session's jurisdiction (counted before any check)",
            m.received.clone(),
        );
        registry.register(
            "residency_refusals",
            "Utterances refused because their jurisdiction may not be processed in this region, by jurisdiction and layer (ingress, worker)",
            m.residency_refusals.clone(),
        );
        registry.register(
            "jobs",
            "Queue entries processed by workers, by outcome (final, refused, failed, malformed, dead_letter)",
            m.jobs.clone(),
        );
        registry.register(
            "jobs_claimed",
            "Queue entries taken over from idle consumers with XAUTOCLAIM",
            m.jobs_claimed.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from XADD to a worker reading the entry",
            m.queue_wait.clone(),
        );
        registry.register(
            "inference_seconds",
            "Time the ASR model took per utterance (the whole batch's time for each utterance in it)",
            m.inference.clone(),
        );
        registry.register(
            "batch_size",
            "Utterances recognised together in one batch",
            m.batch_size.clone(),
        );
        registry.register(
            "result_wait_seconds",
            "Time from XADD to the result reaching the ingress",
            m.result_wait.clone(),
        );
        registry.register(
            "model_reloads",
            "Switches to a new model version found at worker.model, by outcome (ok, failed: the old model keeps serving)",
            m.model_reloads.clone(),
        );
        registry.register(
            "text_withheld",
            "Finals sent with empty text because a hallucination guard fired, by reason",
            m.text_withheld.clone(),
        );
        registry.register(
            "deduplicated",
            "Retried utterances answered from their first attempt instead of transcribed again, by the state the first attempt was in (queued, answered)",
            m.deduplicated.clone(),
        );
        registry.register(
            "resumes",
            "Utterances a resumed session asked for, by outcome (answered: from the stored final; queued: waited for its job; not_found; other_jurisdiction: refused as not found)",
            m.resumes.clone(),
        );
        registry.register(
            "results_polled",
            "Results the ingress found in the utterance record rather than on its channel (published while it was not subscribed)",
            m.results_polled.clone(),
        );
        registry.register(
            "dead_letters",
            "Queue entries moved to the dead-letter stream after too many deliveries; each utterance answered with an error",
            m.dead_letters.clone(),
        );
        registry.register(
            "results_unrouted",
            "Results that reached this ingress for no waiting stream (the edge went away or retried elsewhere); dropped",
            m.results_unrouted.clone(),
        );
        registry.register(
            "handed_back",
            "Utterances handed back to the edge (queue_unavailable) because the result channel (Redis) was lost while they waited",
            m.handed_back.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Outcomes of the ingress's `utterances`.
    pub const UTTERANCE_OUTCOMES: [&'static str; 10] = [
        "final",
        "refused",
        "invalid",
        "queue_unavailable",
        "timeout",
        "overloaded",
        "busy",
        "shutting_down",
        "error",
        "not_found",
    ];
    /// Outcomes of the workers' `jobs`.
    pub const JOB_OUTCOMES: [&'static str; 5] =
        ["final", "refused", "failed", "malformed", "dead_letter"];

    /// Creates every series with a known label set at zero, so dashboards
    /// and alerts see them before the first event.
    pub fn init_series(&self, jurisdictions: &[String]) {
        for outcome in Self::UTTERANCE_OUTCOMES {
            let _ = self.utterances.get_or_create(&OutcomeLabel { outcome });
        }
        for outcome in ["answered", "queued", "not_found", "other_jurisdiction"] {
            let _ = self.resumes.get_or_create(&OutcomeLabel { outcome });
        }
        for outcome in Self::JOB_OUTCOMES {
            let _ = self.jobs.get_or_create(&OutcomeLabel { outcome });
        }
        for state in ["queued", "answered"] {
            let _ = self.deduplicated.get_or_create(&StateLabel { state });
        }
        for outcome in ["ok", "failed"] {
            let _ = self.model_reloads.get_or_create(&OutcomeLabel { outcome });
        }
        for w in earshot_asr::Withheld::ALL {
            let _ = self
                .text_withheld
                .get_or_create(&ReasonLabel { reason: w.as_str() });
        }
        for jurisdiction in jurisdictions {
            let _ = self.received.get_or_create(&SessionJurisdictionLabel {
                jurisdiction: jurisdiction.clone(),
            });
            for layer in ["ingress", "worker"] {
                let _ = self.residency_refusals.get_or_create(&JurisdictionLabel {
                    jurisdiction: jurisdiction.clone(),
                    layer,
                });
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
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
        metrics.init_series(&["eu".to_owned()]);
        earshot_common::telemetry::check_metrics_documented(&metrics.render(), "earshot_regional_")
            .unwrap();
    }
}
