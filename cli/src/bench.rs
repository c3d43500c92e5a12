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

    // Silero on the same audio, window by window, through the edge's VAD
    // thread (one stream: batches of one).
    let vad = Silero::load(
        &assets::onnxruntime_library()?,
        &assets::silero_model()?,
        1,
        1,
        Default::default(),
    )?;
    let samples = earshot_common::audio::s16le_to_f32(&spoken.pcm_bytes());
    let mut stream = VadStream::default();
    let mut per_window = Vec::new();
    for window in samples.chunks_exact(WINDOW) {
        let started = Instant::now();
        vad.probabilities(&mut stream, window.to_vec())
            .await
            .context("VAD")?;
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

/// `earshot bench registry`: publish and sync throughput for a large model
/// against the embedded S3 server, and the time from `promote` (and
/// `rollback`) until three regions' sync agents have switched.
pub mod registry {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use earshot_asr::{TestModelSpec, generate_test_model};
    use earshot_common::manifest::Rollout;
    use earshot_common::topology::Topology;
    use earshot_registry::metrics::SyncMetrics;
    use earshot_registry::publish::{self, PublishRequest, Transfer};
    use earshot_registry::replicate::{self, Selection};
    use earshot_registry::server::EmbeddedS3;
    use earshot_registry::store::S3Settings;
    use earshot_registry::sync::{Agent, SyncConfig};
    use earshot_registry::{Registry, channels, validate};
    use tokio_util::sync::CancellationToken;

    const REGIONS: [(&str, &str); 3] = [("eu-west", "eu"), ("eu-central", "eu"), ("us-east", "us")];

    fn mb_per_s(bytes: u64, took: Duration) -> f64 {
        bytes as f64 / 1e6 / took.as_secs_f64()
    }

    fn topology(endpoint: &str) -> String {
        let mut t = String::from(
            "[[jurisdiction]]\nname = \"eu\"\nstrict = true\n[[jurisdiction]]\nname = \"us\"\n",
        );
        for (i, (name, j)) in REGIONS.iter().enumerate() {
            t.push_str(&format!(
                "[[region]]\nname = \"{name}\"\njurisdiction = \"{j}\"\nquic = \"127.0.0.1:{}\"\n",
                7400 + i
            ));
        }
        t.push_str(&format!(
            "[registry]\nendpoint = \"{endpoint}\"\n[registry.home]\nglobal = \"us-east\"\neu = \"eu-west\"\n"
        ));
        t
    }

    fn agent(
        registry: &Registry,
        work: &Path,
        region: &str,
        poll_ms: u64,
    ) -> anyhow::Result<Agent> {
        let mut config = SyncConfig::new(
            &format!("{region}-0"),
            region,
            "whisper",
            work.join("nodes").join(region),
        );
        config.poll_interval_ms = poll_ms;
        Ok(Agent::new(config, registry, Arc::new(SyncMetrics::new()))?)
    }

    /// Waits until every agent's `current` points at `version`; returns the
    /// time each took from `since`.
    async fn until_active(
        work: &Path,
        version: &str,
        since: Instant,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut done: Vec<Option<Duration>> = vec![None; REGIONS.len()];
        let deadline = since + Duration::from_secs(120);
        while done.iter().any(Option::is_none) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "agents did not switch within 120 s"
            );
            for (i, (region, _)) in REGIONS.iter().enumerate() {
                let link = work.join("nodes").join(region).join("current");
                if done[i].is_none()
                    && std::fs::read_link(&link)
                        .ok()
                        .and_then(|t| t.file_name().map(|n| n == version))
                        == Some(true)
                {
                    done[i] = Some(since.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(done.into_iter().flatten().collect())
    }

    pub async fn run(size_mib: u64, poll_ms: u64, work: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(work)?;
        // Every run starts from empty buckets and nodes; only the generated
        // model is kept between runs.
        for stale in ["s3", "state", "nodes", "small-1", "small-2"] {
            let _ = std::fs::remove_dir_all(work.join(stale));
        }
        let s3 = EmbeddedS3::start(
            &work.join("s3"),
            "127.0.0.1:0".parse()?,
            "bench",
            "bench-secret",
        )
        .await?;
        let text = topology(&s3.endpoint());
        let settings = S3Settings {
            endpoint: Some(s3.endpoint()),
            region: "us-east-1".into(),
            access_key: "bench".into(),
            secret_key: "bench-secret".into(),
        };
        let registry = Registry::new(Arc::new(Topology::from_toml_str(&text)?), &settings)?;
        registry.ensure_buckets().await?;
        let transfer = Transfer::new(work.join("state"));

        // A Whisper-shaped model of about `size_mib`: 9 + 9 layers of width
        // 1024 is ~1 GiB of f32 weights; scale the layer count to the size.
        let layers = ((size_mib as f64 / 1024.0) * 9.0).round().max(1.0) as usize;
        let spec = TestModelSpec {
            d_model: 1024,
            heads: 16,
            encoder_layers: layers,
            decoder_layers: layers,
            bpe_vocab: 1000,
            seed: 42,
        };
        let big = work.join("big");
        if !big.join("model.safetensors").is_file() {
            println!("generating a {layers}+{layers}-layer, width-1024 Whisper model ...");
            generate_test_model(&big, &spec)?;
        }
        let files = validate::list_files(&big)?;
        let bytes: u64 = files.iter().map(|f| f.size).sum();

        // Baseline: a plain copy of the same bytes on the same disk.
        let copy = work.join("copy.safetensors");
        let _ = std::fs::remove_file(&copy);
        let started = Instant::now();
        std::fs::copy(big.join("model.safetensors"), &copy)?;
        std::fs::File::open(&copy)?.sync_all()?;
        let cp = started.elapsed();
        std::fs::remove_file(&copy)?;

        let started = Instant::now();
        validate::validate(
            &big,
            &files,
            earshot_common::manifest::Kind::Asr,
            earshot_common::manifest::Format::Safetensors,
        )?;
        let validation = started.elapsed();

        let started = Instant::now();
        let report = publish::publish(
            &registry,
            &PublishRequest::new(&big, "whisper", "big", "global"),
            &transfer,
        )
        .await?;
        let published = started.elapsed();

        let mut sync_agent = agent(&registry, work, "us-east", poll_ms)?;
        channels::promote(
            &registry,
            "whisper",
            "stable",
            "big",
            Rollout {
                percent: 100,
                regions: vec![],
            },
            "bench",
        )
        .await?;
        let started = Instant::now();
        sync_agent.poll_once().await.context("sync")?;
        let synced = started.elapsed();
        let started = Instant::now();
        replicate::replicate(
            &registry,
            &Selection {
                name: Some("whisper".into()),
                version: Some("big".into()),
                to: vec!["eu-west".into()],
            },
            &transfer,
        )
        .await?;
        let replicated = started.elapsed();

        println!(
            "\n{} ({} files, {:.0} MB)",
            report.manifest.id(),
            report.manifest.files.len(),
            bytes as f64 / 1e6
        );
        println!(
            "  plain copy (cp + fsync)      {:>7.2} s  {:>7.0} MB/s",
            cp.as_secs_f64(),
            mb_per_s(bytes, cp)
        );
        println!(
            "  publish (upload + hashes)    {:>7.2} s  {:>7.0} MB/s  ({:.2}x cp)",
            published.as_secs_f64(),
            mb_per_s(bytes, published),
            cp.as_secs_f64() / published.as_secs_f64()
        );
        println!(
            "    + validation (model load)  {:>7.2} s  (run before the upload)",
            validation.as_secs_f64()
        );
        println!(
            "  sync (download + verify)     {:>7.2} s  {:>7.0} MB/s  ({:.2}x cp)",
            synced.as_secs_f64(),
            mb_per_s(bytes, synced),
            cp.as_secs_f64() / synced.as_secs_f64()
        );
        println!(
            "  replicate to one region      {:>7.2} s  {:>7.0} MB/s",
            replicated.as_secs_f64(),
            mb_per_s(bytes, replicated)
        );
        drop(sync_agent);
        let _ = std::fs::remove_dir_all(work.join("nodes"));

        // Promote and roll back across three regions, each with its own
        // bucket and agent polling every `poll_ms`.
        for (version, seed) in [("1", 1), ("2", 2)] {
            let dir = work.join(format!("small-{version}"));
            generate_test_model(
                &dir,
                &TestModelSpec {
                    seed,
                    ..TestModelSpec::TEST
                },
            )?;
            publish::publish(
                &registry,
                &PublishRequest::new(&dir, "whisper", version, "global"),
                &transfer,
            )
            .await?;
        }
        replicate::replicate(&registry, &Selection::default(), &transfer).await?;
        let all = Rollout {
            percent: 100,
            regions: vec![],
        };
        channels::promote(&registry, "whisper", "stable", "1", all.clone(), "bench").await?;
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for (region, _) in REGIONS {
            let a = agent(&registry, work, region, poll_ms)?;
            tasks.push(tokio::spawn(a.run(stop.clone())));
        }
        until_active(work, "1", Instant::now()).await?;
        let model_mb = validate::list_files(&work.join("small-2"))?
            .iter()
            .map(|f| f.size)
            .sum::<u64>() as f64
            / 1e6;

        let mut promote_times = Vec::new();
        let mut rollback_times = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            channels::promote(&registry, "whisper", "stable", "2", all.clone(), "bench").await?;
            promote_times.push(
                until_active(work, "2", started)
                    .await?
                    .into_iter()
                    .max()
                    .unwrap_or_default(),
            );
            let started = Instant::now();
            channels::rollback(&registry, "whisper", "stable", "bench").await?;
            rollback_times.push(
                until_active(work, "1", started)
                    .await?
                    .into_iter()
                    .max()
                    .unwrap_or_default(),
            );
        }
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        let secs = |v: &[Duration]| {
            v.iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "\nthree regions, one agent each, polling every {poll_ms} ms, {model_mb:.1} MB model:"
        );
        println!(
            "  promote -> all three active (s): {}",
            secs(&promote_times)
        );
        println!(
            "  rollback -> all three active (s): {}",
            secs(&rollback_times)
        );
        s3.stop().await;
        Ok(())
    }
}
