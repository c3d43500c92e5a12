//! `earshot bench overhead`: the time each utterance spends outside the
//! model, on loopback.
//!
//! A loopback cluster (real redis-server, edge and regional nodes in this
//! process) transcribes a session of spoken sentences streamed faster than
//! real time, but slowly enough that no utterance waits for the worker.
//! For each final, the edge reports `latency_ms` (its VAD cut to the final
//! arriving back) and the region `inference_ms`; their difference is the
//! pipeline's own cost: QUIC there and back with mutual TLS, the ingress's
//! checks and hash, XADD, the worker's XREADGROUP wake-up, PUBLISH and
//! fan-in. Silero's cost is measured apart: it runs on every 32 ms window
//! as audio arrives, before the cut, not after it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use earshot_edge::vad::{Silero, VadStream, WINDOW};

use crate::client::{self, StreamOptions};
use crate::cluster::Cluster;
use crate::{assets, speech};

const SENTENCES: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning at nine.",
    "Every region keeps its own queue of utterances.",
    "The weather today is bright and cold.",
    "She said the meeting would start at half past ten.",
    "Nothing that was accepted may be lost.",
    "We measured the latency of every hop.",
    "Audio from the European Union stays there.",
];

/// Percentiles of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn summarize(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            return f64::NAN;
        }
        // Nearest rank.
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    };
    Summary {
        n: v.len(),
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={:<4} median={:>9.3}  p90={:>9.3}  p99={:>9.3}  max={:>9.3}",
            self.n, self.median, self.p90, self.p99, self.max
        )
    }
}

/// Runs the benchmark and prints its report.
pub async fn overhead(model: &Path, utterances: usize, speed: f64) -> anyhow::Result<()> {
    let cluster = Cluster::single(model, "").await?;
    let sentences: Vec<&str> = (0..utterances)
        .map(|i| SENTENCES[i % SENTENCES.len()])
        .collect();
    let spoken = speech::synthesize(&sentences, 1.0, 0.5, &cluster.dir.path().join("speech"))?;
    let audio_seconds = spoken.samples.len() as f64 / 16_000.0;
    println!(
        "streaming {utterances} sentences ({audio_seconds:.0} s of audio) at {speed}x real time through edge-fra -> eu-west"
    );

    let url = cluster.listen_url("edge-fra", "?language=en");
    let options = StreamOptions {
        chunk_bytes: 3_200,
        pace: Some(Duration::from_secs_f64(0.1 / speed)),
    };
    let transcript = client::stream(&url, &spoken.pcm_bytes(), options, |_| {}).await?;
    let finals = transcript.finals();
    anyhow::ensure!(
        finals.len() == utterances && transcript.errors().is_empty(),
        "expected {utterances} finals and no errors, got {} finals and {:?}",
        finals.len(),
        transcript.errors()
    );
    let latency: Vec<f64> = finals.iter().map(|f| f.latency_ms).collect();
    let inference: Vec<f64> = finals.iter().map(|f| f.inference_ms).collect();
    let queue: Vec<f64> = finals.iter().map(|f| f.queue_ms).collect();
    let outside: Vec<f64> = finals
        .iter()
        .map(|f| f.latency_ms - f.inference_ms)
        .collect();
    cluster.stop().await?;

    // Silero on the same audio, window by window, as the edge runs it.
    let vad = Silero::load(&assets::onnxruntime_library()?, &assets::silero_model()?, 1)?;
    let samples = earshot_common::audio::s16le_to_f32(&spoken.pcm_bytes());
    let mut stream = VadStream::default();
    let mut per_window = Vec::new();
    for window in samples.chunks_exact(WINDOW) {
        let started = Instant::now();
        vad.probability(&mut stream, window).context("VAD")?;
        per_window.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let windows_per_utterance = per_window.len() as f64 / utterances as f64;
    let vad_per_utterance = per_window.iter().sum::<f64>() / 1000.0 / utterances as f64;

    println!("\nper utterance, milliseconds:");
    println!(
        "  outside the model (latency - inference)  {}",
        summarize(&outside)
    );
    println!(
        "  edge latency (VAD cut -> final at edge)  {}",
        summarize(&latency)
    );
    println!(
        "  of which queue wait in Redis             {}",
        summarize(&queue)
    );
    println!(
        "  of which model inference                 {}",
        summarize(&inference)
    );
    println!(
        "\nSilero VAD, microseconds per 32 ms window: {}",
        summarize(&per_window)
    );
    println!(
        "  = {vad_per_utterance:.2} ms of CPU per utterance ({windows_per_utterance:.0} windows of sentence and pause), spread over the audio as it arrives"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&values);
        assert_eq!(
            (s.n, s.median, s.p90, s.p99, s.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let s = summarize(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p99), (2.0, 3.0));
        assert!(summarize(&[]).median.is_nan());
    }
}
