//! The registry against a real S3 server: the embedded s3s server on a
//! loopback port, spoken to over HTTP by aws-sdk-s3, exactly as AWS would be.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use earshot_asr::{TestModelSpec, generate_test_model};
use earshot_common::manifest::{Rollout, keys};
use earshot_common::topology::Topology;
use earshot_registry::Registry;
use earshot_registry::channels::{self, ChannelError};
use earshot_registry::metrics::SyncMetrics;
use earshot_registry::publish::{self, Progress, PublishError, PublishRequest, Transfer};
use earshot_registry::replicate::{self, Outcome, Selection};
use earshot_registry::server::EmbeddedS3;
use earshot_registry::store::{Put, S3Settings};
use earshot_registry::sync::{Agent, Poll, SyncConfig, SyncError};

const KEY: &str = "earshot-test";
const ALL: Rollout = Rollout {
    percent: 100,
    regions: Vec::new(),
};
const SECRET: &str = "earshot-test-secret";

const TOPOLOGY: &str = r#"
[[jurisdiction]]
name = "eu"
strict = true

[[jurisdiction]]
name = "us"

[[region]]
name = "eu-west"
jurisdiction = "eu"
quic = "127.0.0.1:7401"

[[region]]
name = "eu-central"
jurisdiction = "eu"
quic = "127.0.0.1:7402"

[[region]]
name = "us-east"
jurisdiction = "us"
quic = "127.0.0.1:7403"

[[edge]]
name = "edge-fra"
jurisdiction = "eu"
regions = ["eu-west", "eu-central"]

[registry]
endpoint = "ENDPOINT"

[registry.home]
global = "us-east"
eu = "eu-west"
"#;

struct World {
    dir: tempfile::TempDir,
    server: EmbeddedS3,
    registry: Registry,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let server = EmbeddedS3::start(
        &dir.path().join("s3"),
        "127.0.0.1:0".parse().unwrap(),
        KEY,
        SECRET,
    )
    .await
    .unwrap();
    let text = TOPOLOGY.replace("ENDPOINT", &server.endpoint());
    std::fs::write(dir.path().join("topology.toml"), &text).unwrap();
    let topology = Arc::new(Topology::from_toml_str(&text).unwrap());
    let settings = S3Settings {
        endpoint: Some(server.endpoint()),
        region: "us-east-1".into(),
        access_key: KEY.into(),
        secret_key: SECRET.into(),
    };
    let registry = Registry::new(topology, &settings).unwrap();
    registry.ensure_buckets().await.unwrap();
    World {
        dir,
        server,
        registry,
    }
}

impl World {
    fn transfer(&self) -> Transfer {
        Transfer::new(self.dir.path().join("state"))
    }

    fn model(&self, name: &str, spec: TestModelSpec) -> PathBuf {
        let path = self.dir.path().join("src").join(name);
        generate_test_model(&path, &spec).unwrap();
        path
    }

    fn request(&self, dir: &Path, version: &str, residency: &str) -> PublishRequest {
        let mut req = PublishRequest::new(dir, "whisper", version, residency);
        req.languages = vec!["en".into()];
        req.publisher = "test".into();
        req.metrics = BTreeMap::from([("wer".into(), 0.5)]);
        req
    }

    /// Publishes versions generated from seeds, replicates them, and
    /// points `stable` at the first.
    async fn published(&self, versions: &[(&str, u64)]) {
        for (v, seed) in versions {
            let dir = self.model(v, seeded(*seed));
            publish::publish(
                &self.registry,
                &self.request(&dir, v, "global"),
                &self.transfer(),
            )
            .await
            .unwrap();
        }
        replicate::replicate(&self.registry, &Selection::default(), &self.transfer())
            .await
            .unwrap();
        channels::promote(
            &self.registry,
            "whisper",
            "stable",
            versions[0].0,
            ALL,
            "test",
        )
        .await
        .unwrap();
    }

    fn agent(&self, node: &str, region: &str) -> Agent {
        self.agent_of(node, region, "whisper")
    }

    /// A sync agent of `node` in `region` following model `model`.
    fn agent_of(&self, node: &str, region: &str, model: &str) -> Agent {
        let mut config = SyncConfig::new(
            node,
            region,
            model,
            self.dir.path().join("nodes").join(node),
        );
        config.poll_interval_ms = 100;
        Agent::new(config, &self.registry, Arc::new(SyncMetrics::new())).unwrap()
    }

    fn store(&self, region: &str) -> earshot_registry::store::Store {
        self.registry.store(self.registry.region(region).unwrap())
    }
}

fn seeded(seed: u64) -> TestModelSpec {
    TestModelSpec {
        seed,
        ..TestModelSpec::TEST
    }
}

async fn objects_under(store: &earshot_registry::store::Store, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_replicate_sync_switches_current_atomically_and_rolls_back() {
    let w = world().await;
    let v1 = w.model("v1", seeded(1));
    let v2 = w.model("v2", seeded(2));
    let report = publish::publish(&w.registry, &w.request(&v1, "1", "global"), &w.transfer())
        .await
        .unwrap();
    assert_eq!(report.bucket, "earshot-models-us-east");
    assert_eq!(report.manifest.files.len(), 3);
    publish::publish(&w.registry, &w.request(&v2, "2", "global"), &w.transfer())
        .await
        .unwrap();

    // Publishing the same version again fails, whatever the content.
    let again = publish::publish(&w.registry, &w.request(&v2, "1", "global"), &w.transfer()).await;
    assert!(
        matches!(again, Err(PublishError::VersionExists { .. })),
        "{again:?}"
    );

    let items = replicate::replicate(&w.registry, &Selection::default(), &w.transfer())
        .await
        .unwrap();
    let copied = items
        .iter()
        .filter(|i| matches!(i.outcome, Outcome::Copied { .. }))
        .count();
    assert_eq!(copied, 4, "two versions to two regions: {items:?}");
    // Replicating again copies nothing.
    let items = replicate::replicate(&w.registry, &Selection::default(), &w.transfer())
        .await
        .unwrap();
    assert!(
        items.iter().all(|i| i.outcome == Outcome::Present),
        "{items:?}"
    );

    let all = Rollout {
        percent: 100,
        regions: vec![],
    };
    channels::promote(&w.registry, "whisper", "stable", "1", all.clone(), "test")
        .await
        .unwrap();
    let mut agent = w.agent("regional-eu-west-0", "eu-west");
    assert_eq!(
        agent.poll_once().await.unwrap(),
        Poll::Activated {
            version: "1".into(),
            from: None,
            cached: false
        }
    );
    let current = agent.current_link();
    assert_eq!(
        std::fs::read_link(&current).unwrap(),
        Path::new("versions/1")
    );
    // The node's directory loads as the model, manifest included.
    earshot_asr::WhisperModel::load(&current, earshot_asr::EncoderWindow::Fit).unwrap();
    assert!(current.join("manifest.json").is_file());
    assert_eq!(
        agent.poll_once().await.unwrap(),
        Poll::Unchanged {
            version: "1".into()
        }
    );

    let updated = channels::promote(&w.registry, "whisper", "stable", "2", all.clone(), "test")
        .await
        .unwrap();
    assert_eq!(updated.channel.previous.as_deref(), Some("1"));
    assert_eq!(updated.channel.generation, 2);
    assert!(updated.lagging.is_empty());
    assert_eq!(
        agent.poll_once().await.unwrap(),
        Poll::Activated {
            version: "2".into(),
            from: Some("1".into()),
            cached: false
        }
    );
    assert_eq!(agent.previous().as_deref(), Some("1"));

    // Rollback is a pointer flip in S3 and a symlink flip on the node: the
    // previous version is still on disk.
    channels::rollback(&w.registry, "whisper", "stable", "test")
        .await
        .unwrap();
    assert_eq!(
        agent.poll_once().await.unwrap(),
        Poll::Activated {
            version: "1".into(),
            from: Some("2".into()),
            cached: true
        }
    );

    // The node reported what it runs.
    let status = earshot_registry::status::status(&w.registry, Some("whisper")).await;
    let eu_west = status.iter().find(|s| s.region == "eu-west").unwrap();
    assert_eq!(eu_west.nodes.len(), 1);
    assert_eq!(eu_west.nodes[0].version.as_deref(), Some("1"));
    assert_eq!(eu_west.versions, ["whisper@1", "whisper@2"]);
    let listed = earshot_registry::status::list(&w.registry, None)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].regions, ["eu-west", "eu-central", "us-east"]);
    w.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_object_is_refused_and_the_node_keeps_its_model() {
    let w = world().await;
    w.published(&[("1", 1), ("2", 2)]).await;
    let mut agent = w.agent("n1", "eu-west");
    agent.poll_once().await.unwrap();

    // Someone overwrites version 2's weights in eu-west's bucket.
    let key = keys::file("whisper", "2", "model.safetensors");
    let store = w.store("eu-west");
    let (mut bytes, _) = store.get(&key).await.unwrap().unwrap().clone();
    let mut tampered = bytes.to_vec();
    tampered[1000] ^= 0xff;
    bytes = Bytes::from(tampered);
    store.put(&key, bytes).await.unwrap();

    channels::promote(&w.registry, "whisper", "stable", "2", ALL, "test")
        .await
        .unwrap();
    let err = agent.poll_once().await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Verify { file, .. } if file == "model.safetensors"),
        "{err}"
    );
    assert_eq!(
        agent.active().as_deref(),
        Some("1"),
        "the node keeps its model"
    );
    // Nothing of the bad download is left behind.
    let versions: Vec<String> = std::fs::read_dir(w.dir.path().join("nodes/n1/versions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(versions, ["1"]);
    w.server.stop().await;
}

/// Cancels the transfer once `after` parts have been acknowledged.
struct CancelAfter {
    parts: AtomicUsize,
    after: usize,
    part: u64,
    cancel: tokio_util::sync::CancellationToken,
}

impl Progress for CancelAfter {
    fn file_started(&self, _: &str, _: u64) {}
    fn bytes(&self, n: u64) {
        if n == self.part && self.parts.fetch_add(1, Ordering::SeqCst) + 1 >= self.after {
            self.cancel.cancel();
        }
    }
    fn file_done(&self, _: &str) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_killed_halfway_resumes_without_resending_finished_parts() {
    let w = world().await;
    // About 26 MiB of weights: six parts of 5 MiB.
    let spec = TestModelSpec {
        d_model: 256,
        heads: 4,
        encoder_layers: 4,
        decoder_layers: 4,
        ..seeded(3)
    };
    let dir = w.model("big", spec);
    let size = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    let part = 5u64 << 20;
    let total_parts = size.div_ceil(part) as usize;
    assert!(total_parts >= 5, "{size}");

    let mut first = w.transfer();
    first.part_size = part as usize;
    first.parallelism = 1;
    first.progress = Arc::new(CancelAfter {
        parts: AtomicUsize::new(0),
        after: 3,
        part,
        cancel: first.cancel.clone(),
    });
    let req = w.request(&dir, "7", "global");
    let err = publish::publish(&w.registry, &req, &first)
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Cancelled), "{err}");
    // Interrupted: no manifest, so the version does not exist.
    assert!(
        w.registry
            .find_version("whisper", "7")
            .await
            .unwrap()
            .is_none()
    );

    let mut second = w.transfer();
    second.part_size = part as usize;
    let report = publish::publish(&w.registry, &req, &second).await.unwrap();
    assert!(report.parts_reused >= 3, "{report:?}");
    // Every part of the big file was sent once across both runs; of the two
    // small files (one PUT each), those the first run finished are skipped.
    assert_eq!(
        report.parts_reused + report.parts_sent - (2 - report.files_reused),
        total_parts,
        "{report:?}"
    );
    assert!(
        report.files_reused >= 1,
        "config.json sorts first and was done: {report:?}"
    );
    // The object assembled from both runs is the file.
    let entry = report
        .manifest
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap();
    let local = earshot_common::client::hex(&sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        std::fs::read(dir.join("model.safetensors")).unwrap(),
    )));
    assert_eq!(entry.sha256, local);
    let out = w.dir.path().join("downloaded");
    let (n, sha) = w
        .store("us-east")
        .download(&keys::file("whisper", "7", "model.safetensors"), &out, size)
        .await
        .unwrap();
    assert_eq!((n, earshot_common::client::hex(&sha)), (size, local));
    w.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_promotes_never_lose_an_update() {
    let w = world().await;
    for (v, seed) in [("1", 1), ("2", 2)] {
        let dir = w.model(v, seeded(seed));
        publish::publish(&w.registry, &w.request(&dir, v, "global"), &w.transfer())
            .await
            .unwrap();
    }
    let all = Rollout {
        percent: 100,
        regions: vec![],
    };
    channels::promote(&w.registry, "whisper", "stable", "1", all.clone(), "setup")
        .await
        .unwrap();

    // The compare-and-swap itself: two writers holding the same ETag, one
    // wins.
    let store = w.store("us-east");
    let key = keys::channel("whisper", "stable");
    let (bytes, etag) = store.get(&key).await.unwrap().unwrap();
    // Different bodies (trailing whitespace keeps them valid JSON): an
    // identical body would leave the ETag unchanged and legitimately match.
    let with = |pad: &str| Bytes::from([bytes.as_ref(), pad.as_bytes()].concat());
    let (a, b) = tokio::join!(
        store.put_if_match(&key, with("\n"), &etag),
        store.put_if_match(&key, with("\n\n"), &etag)
    );
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes.iter().filter(|o| **o == Put::Conflict).count(),
        1,
        "{outcomes:?}"
    );

    // Promotes racing each other: every success advances the generation by
    // exactly one, so none overwrote another; losers get a clear conflict.
    let start = channels::read_channel(&w.registry, "global", "whisper", "stable")
        .await
        .unwrap()
        .unwrap()
        .0
        .generation;
    let mut successes = 0;
    let mut conflicts = 0;
    for round in 0..10 {
        let (x, y) = tokio::join!(
            channels::promote(&w.registry, "whisper", "stable", "1", all.clone(), "alice"),
            channels::promote(&w.registry, "whisper", "stable", "2", all.clone(), "bob")
        );
        for r in [x, y] {
            match r {
                Ok(_) => successes += 1,
                Err(ChannelError::Conflict { by, .. }) => {
                    conflicts += 1;
                    assert!(by == "alice" || by == "bob", "round {round}: {by}");
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
    }
    let end = channels::read_channel(&w.registry, "global", "whisper", "stable")
        .await
        .unwrap()
        .unwrap()
        .0
        .generation;
    eprintln!("concurrent promotes: {successes} successes, {conflicts} conflicts");
    assert_eq!(
        end - start,
        successes,
        "{successes} successes, {conflicts} conflicts"
    );
    assert!(successes >= 10);
    w.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eu_model_never_reaches_a_us_bucket_even_when_asked() {
    let w = world().await;
    let dir = w.model("eu", seeded(5));
    let report = publish::publish(&w.registry, &w.request(&dir, "eu-1", "eu"), &w.transfer())
        .await
        .unwrap();
    // Published to the EU home only.
    assert_eq!(report.bucket, "earshot-models-eu-west");
    assert!(
        objects_under(&w.store("us-east"), "models/")
            .await
            .is_empty()
    );

    // Replicating everything skips the US...
    let items = replicate::replicate(&w.registry, &Selection::default(), &w.transfer())
        .await
        .unwrap();
    assert!(items.contains(&replicate::Item {
        model: "whisper@eu-1".into(),
        region: "us-east".into(),
        outcome: Outcome::Refused { requested: false },
    }));
    assert!(
        items
            .iter()
            .any(|i| i.region == "eu-central" && matches!(i.outcome, Outcome::Copied { .. }))
    );
    // ...and asking for it explicitly is refused.
    let items = replicate::replicate(
        &w.registry,
        &Selection {
            name: Some("whisper".into()),
            version: Some("eu-1".into()),
            to: vec!["us-east".into()],
        },
        &w.transfer(),
    )
    .await
    .unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].outcome, Outcome::Refused { requested: true });
    assert!(
        objects_under(&w.store("us-east"), "").await.is_empty(),
        "nothing of it in the US bucket"
    );

    // A rollout naming a US region is refused; a plain promote reaches only
    // EU buckets.
    let err = channels::promote(
        &w.registry,
        "whisper",
        "canary",
        "eu-1",
        Rollout {
            percent: 10,
            regions: vec!["us-east".into()],
        },
        "test",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ChannelError::RegionForbidden { .. }), "{err}");
    let updated = channels::promote(
        &w.registry,
        "whisper",
        "stable",
        "eu-1",
        Rollout {
            percent: 100,
            regions: vec![],
        },
        "test",
    )
    .await
    .unwrap();
    assert_eq!(updated.propagated, ["eu-west", "eu-central"]);
    assert!(objects_under(&w.store("us-east"), "").await.is_empty());

    // The name keeps its residency: it cannot come back as a global model.
    let dir2 = w.model("eu2", seeded(6));
    let err = publish::publish(
        &w.registry,
        &w.request(&dir2, "eu-2", "global"),
        &w.transfer(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, PublishError::ResidencyMismatch { .. }),
        "{err}"
    );

    // A US node following the model finds nothing to run.
    let mut us = w.agent("us-node", "us-east");
    assert_eq!(us.poll_once().await.unwrap(), Poll::NoChannel);

    // Even if someone copies the channel and the files into the US bucket
    // by hand, the US node refuses the model.
    let eu = w.store("eu-west");
    for listed in eu.list("").await.unwrap() {
        let (b, _) = eu.get(&listed.key).await.unwrap().unwrap();
        w.store("us-east").put(&listed.key, b).await.unwrap();
    }
    let err = us.poll_once().await.unwrap_err();
    assert!(matches!(err, SyncError::Residency { .. }), "{err}");
    assert!(us.active().is_none());
    w.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_takes_a_stable_subset_of_nodes() {
    let w = world().await;
    w.published(&[("1", 1), ("2", 2)]).await;
    channels::promote(
        &w.registry,
        "whisper",
        "canary",
        "2",
        Rollout {
            percent: 30,
            regions: vec!["eu-west".into()],
        },
        "t",
    )
    .await
    .unwrap();
    let canary = channels::read_channel(&w.registry, "global", "whisper", "canary")
        .await
        .unwrap()
        .unwrap()
        .0;

    let mut on_canary = Vec::new();
    for i in 0..12 {
        for region in ["eu-west", "us-east"] {
            let node = format!("{region}-node-{i}");
            let mut agent = w.agent(&node, region);
            agent.poll_once().await.unwrap();
            let version = agent.active().unwrap();
            // Exactly the nodes the rollout's hash selects, in its region.
            assert_eq!(version == "2", canary.selects(&node, region), "{node}");
            assert_eq!(
                version == "2",
                region == "eu-west" && earshot_common::manifest::rollout_bucket(&node) < 30
            );
            // And they stay there.
            assert!(matches!(
                agent.poll_once().await.unwrap(),
                Poll::Unchanged { .. }
            ));
            if version == "2" {
                on_canary.push(node);
            }
        }
    }
    assert!(
        !on_canary.is_empty() && on_canary.len() < 12,
        "{on_canary:?}"
    );
    w.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_keeps_the_model_and_reports_staleness() {
    let w = world().await;
    w.published(&[("1", 1)]).await;
    let metrics = Arc::new(SyncMetrics::new());
    let config = SyncConfig::new("n", "eu-west", "whisper", w.dir.path().join("nodes/n"));
    let mut agent = Agent::new(config, &w.registry, metrics.clone()).unwrap();
    agent.poll_once().await.unwrap();
    w.server.stop().await;
    let err = agent.poll_once().await.unwrap_err();
    assert!(matches!(err, SyncError::Registry(_)), "{err}");
    assert_eq!(agent.active().as_deref(), Some("1"));
    let text = metrics.render();
    assert!(
        text.contains(r#"earshot_registry_sync_polls_total{outcome="error"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"earshot_registry_sync_active_info{model="whisper",version="1"} 1"#),
        "{text}"
    );
}

/// The edge tier: a GGUF q8_0 Whisper published with tier `edge`, replicated,
/// promoted and synced by an edge node's agent like the regional model, and
/// the node's `current` loads as the partials model does (earshot's network
/// over the quantized weights).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_tier_gguf_model_syncs_to_an_edge_and_loads() {
    use earshot_common::manifest::{Format, Quantization, Tier};
    let w = world().await;
    let float = w.model("edge-src", seeded(7));
    let gguf = w.dir.path().join("src").join("edge-q8_0");
    earshot_asr::quantize::quantize_whisper(&float, &gguf, earshot_asr::quantize::Scheme::Q8_0)
        .unwrap();
    let mut request = PublishRequest::new(&gguf, "whisper-edge", "1", "global");
    request.tier = Tier::Edge;
    request.quantization = Quantization::Q8_0;
    request.publisher = "test".into();
    let report = publish::publish(&w.registry, &request, &w.transfer())
        .await
        .unwrap();
    assert_eq!(report.manifest.tier, Tier::Edge);
    assert_eq!(report.manifest.format, Format::Gguf);
    replicate::replicate(&w.registry, &Selection::default(), &w.transfer())
        .await
        .unwrap();
    channels::promote(&w.registry, "whisper-edge", "stable", "1", ALL, "test")
        .await
        .unwrap();
    let mut agent = w.agent_of("edge-fra-0", "eu-west", "whisper-edge");
    assert!(matches!(
        agent.poll_once().await.unwrap(),
        Poll::Activated { .. }
    ));
    let current = agent.current_link();
    assert!(current.join("model.gguf").is_file());
    let model = earshot_asr::WhisperModel::load(&current, earshot_asr::EncoderWindow::Fit).unwrap();
    model.transcribe(&vec![0.0; 16_000], Some("en")).unwrap();
    w.server.stop().await;
}
