//! The regional node at its own boundary: a QUIC client with an edge's
//! certificate speaks the wire protocol to the ingress directly, so each
//! refusal can be provoked on purpose; and a worker recovers a job that a
//! crashed consumer left pending.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use earshot_cli::certs;
use earshot_common::tls::{TlsPaths, client_config};
use earshot_common::topology::Topology;
use earshot_common::wire::{self, ErrorCode, Frame, Header};
use earshot_regional::metrics::Metrics;
use earshot_regional::queue::{self, Job};
use earshot_regional::worker::{self, WorkerContext};
use futures::StreamExt;
use redis::Commands;
use sha2::{Digest, Sha256};
use support::{Cluster, EdgePlan, RegionPlan, metric, stream_len};
use tokio_util::sync::CancellationToken;

async fn cluster() -> Cluster {
    support::start(
        &[
            RegionPlan {
                name: "eu-west",
                jurisdiction: "eu",
                workers: 0,
                extra: "[limits]\nresult_timeout_ms = 1000\n",
            },
            RegionPlan {
                name: "us-east",
                jurisdiction: "us",
                workers: 0,
                extra: "",
            },
        ],
        &[
            EdgePlan {
                name: "edge-fra",
                jurisdiction: "eu",
                regions: &["eu-west"],
                extra: "",
            },
            EdgePlan {
                name: "edge-nyc",
                jurisdiction: "us",
                regions: &["us-east", "eu-west"],
                extra: "",
            },
        ],
    )
    .await
}

fn tls_for(certs_dir: &std::path::Path, edge: &str) -> TlsPaths {
    let c = certs::edge_cert(certs_dir, edge);
    TlsPaths {
        cert: c.cert,
        key: c.key,
        ca: certs::ca_path(certs_dir),
    }
}

async fn connect(
    cluster: &Cluster,
    tls: &TlsPaths,
    region: &str,
) -> Result<quinn::Connection, String> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(tls, Default::default()).unwrap());
    let addr = format!("127.0.0.1:{}", cluster.quic_ports[region])
        .parse()
        .unwrap();
    let connection = endpoint
        .connect(addr, region)
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the server checks the client certificate after the
    // client considers the handshake done; a refused certificate shows up
    // as the connection closing. A stream round trip settles it.
    Ok(connection)
}

/// Sends raw bytes on a new stream and decodes the answer.
async fn exchange(connection: &quinn::Connection, bytes: &[u8]) -> Result<Frame, String> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 21))
        .await
        .map_err(|_| "no answer within 20 s".to_string())?
        .map_err(|e| e.to_string())?;
    wire::decode(&mut BytesMut::from(&answer[..]))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("incomplete answer of {} bytes", answer.len()))
}

fn header(jurisdiction: &str, edge: &str) -> Header {
    Header {
        session: [7; 16],
        utterance: 1,
        jurisdiction: jurisdiction.into(),
        edge: edge.into(),
        language: "en".into(),
        translate: String::new(),
        timestamps: false,
        words: false,
        resume: false,
        span: None,
        sample_rate: 16_000,
    }
}

fn utterance(h: &Header, audio: &[u8]) -> BytesMut {
    let audio = Bytes::copy_from_slice(audio);
    let sha: [u8; 32] = Sha256::digest(&audio).into();
    wire::encode_utterance(h, &audio, sha).unwrap()
}

fn code(frame: Result<Frame, String>) -> ErrorCode {
    match frame {
        Ok(Frame::Error(e)) => e.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// A worker of eu-west on the seeded test model, run in the test's process
/// (claim idle 1 s, the minimum).
struct TestWorker {
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

impl TestWorker {
    async fn start(
        cluster: &Cluster,
        client: &redis::Client,
        consumer: &str,
        max_batch: usize,
        max_deliveries: usize,
    ) -> TestWorker {
        let metrics = Arc::new(Metrics::new());
        let ctx = WorkerContext {
            region: "eu-west".into(),
            stream: queue::stream_key("eu-west"),
            consumer: consumer.into(),
            topology: Arc::new(Topology::load(&cluster.deployment.topology_path()).unwrap()),
            metrics: metrics.clone(),
            claim_idle: Duration::from_millis(1000),
            max_deliveries,
            result_ttl: Duration::from_secs(60),
            max_batch,
            batch_window: Duration::ZERO,
            translators: Default::default(),
            client: client.clone(),
            publisher: redis::aio::ConnectionManager::new(client.clone())
                .await
                .unwrap(),
        };
        let model = earshot_regional::model::ModelSlot::load(
            &support::test_model(),
            earshot_asr::EncoderWindow::Fit,
            None,
        )
        .unwrap();
        let stop = CancellationToken::new();
        let running = tokio::spawn(worker::run(ctx, model, stop.clone()));
        TestWorker {
            metrics,
            stop,
            running,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.running.await.unwrap();
    }
}

/// The next `n` results published on `pubsub`'s channel, by the first byte
/// of their request id.
async fn collect_answers(
    pubsub: &mut redis::aio::PubSub,
    n: usize,
) -> std::collections::BTreeMap<u8, Frame> {
    let mut answers = std::collections::BTreeMap::new();
    let mut messages = pubsub.on_message();
    while answers.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .unwrap_or_else(|_| panic!("{n} answers within 30 s"))
            .unwrap();
        let payload = message.get_payload_bytes().to_vec();
        let frame = wire::decode(&mut BytesMut::from(&payload[16..]))
            .unwrap()
            .unwrap();
        answers.insert(payload[0], frame);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_refuses_what_residency_forbids_and_counts_it() {
    let cluster = cluster().await;
    let certs_dir = cluster.deployment.certs_dir();
    let fra = connect(&cluster, &tls_for(&certs_dir, "edge-fra"), "us-east")
        .await
        .unwrap();
    let audio = vec![0u8; 3200];

    // An EU session at a US region, even from a genuine EU edge.
    let answer = exchange(&fra, &utterance(&header("eu", "edge-fra"), &audio)).await;
    assert_eq!(code(answer), ErrorCode::ResidencyRefused);
    // An EU edge claiming its session is American.
    let answer = exchange(&fra, &utterance(&header("us", "edge-fra"), &audio)).await;
    assert_eq!(code(answer), ErrorCode::ResidencyRefused);
    // An edge the topology does not know.
    let answer = exchange(&fra, &utterance(&header("us", "edge-mars"), &audio)).await;
    assert_eq!(code(answer), ErrorCode::ResidencyRefused);
    // A jurisdiction nobody defined: refused, and counted as `unknown` (a
    // peer cannot mint metric series).
    let answer = exchange(&fra, &utterance(&header("atlantis", "edge-fra"), &audio)).await;
    assert_eq!(code(answer), ErrorCode::ResidencyRefused);
    // Nothing was queued in the US.
    assert_eq!(stream_len(&cluster, "us-east"), 0);

    let m = cluster
        .metrics(cluster.region_http["us-east"])
        .await
        .unwrap();
    assert_eq!(
        metric(
            &m,
            r#"earshot_regional_residency_refusals_total{jurisdiction="eu",layer="ingress"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"earshot_regional_residency_refusals_total{jurisdiction="us",layer="ingress"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"earshot_regional_residency_refusals_total{jurisdiction="unknown",layer="ingress"}"#
        ),
        Some(1.0)
    );
    assert!(!m.contains("atlantis"), "{m}");
    assert_eq!(
        metric(
            &m,
            r#"earshot_regional_utterances_total{outcome="refused"}"#
        ),
        Some(4.0)
    );

    // A US session may use the EU region (the US is not strict): it is
    // queued there (and times out: that region runs no workers).
    let nyc = connect(&cluster, &tls_for(&certs_dir, "edge-nyc"), "eu-west")
        .await
        .unwrap();
    let answer = exchange(&nyc, &utterance(&header("us", "edge-nyc"), &audio)).await;
    assert_eq!(code(answer), ErrorCode::Timeout);
    assert_eq!(stream_len(&cluster, "eu-west"), 1);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_streams_get_error_frames_not_hangs() {
    let cluster = cluster().await;
    let conn = connect(
        &cluster,
        &tls_for(&cluster.deployment.certs_dir(), "edge-fra"),
        "eu-west",
    )
    .await
    .unwrap();
    let h = header("eu", "edge-fra");

    assert_eq!(
        code(exchange(&conn, b"\xff\xff\xff\xffgarbage").await),
        ErrorCode::InvalidFrame
    );
    assert_eq!(
        code(exchange(&conn, &[0, 0, 0, 1, 0x42]).await),
        ErrorCode::InvalidFrame
    );
    // Audio before the header.
    let mut bad = BytesMut::new();
    Frame::Audio(Bytes::from_static(&[0, 0]))
        .encode(&mut bad)
        .unwrap();
    assert_eq!(code(exchange(&conn, &bad).await), ErrorCode::InvalidFrame);
    // A stream that ends before its end frame.
    let mut cut = BytesMut::new();
    Frame::Header(h.clone()).encode(&mut cut).unwrap();
    assert_eq!(code(exchange(&conn, &cut).await), ErrorCode::InvalidFrame);
    // Audio that does not match its hash.
    let mut corrupt = BytesMut::new();
    let sent = wire::encode_utterance(&h, &Bytes::from_static(&[1, 2, 3, 4]), [0; 32]).unwrap();
    corrupt.extend_from_slice(&sent);
    assert_eq!(
        code(exchange(&conn, &corrupt).await),
        ErrorCode::AudioCorrupted
    );
    // More than 30 s of audio.
    let long = vec![0u8; 31 * 32_000];
    assert_eq!(
        code(exchange(&conn, &utterance(&h, &long)).await),
        ErrorCode::AudioTooLong
    );
    // A sample rate the region does not take.
    let mut h8k = h.clone();
    h8k.sample_rate = 8_000;
    assert_eq!(
        code(exchange(&conn, &utterance(&h8k, &[0; 320])).await),
        ErrorCode::Unsupported
    );
    // None of these reached the queue.
    assert_eq!(stream_len(&cluster, "eu-west"), 0);

    // The connection still works for a valid utterance.
    assert_eq!(
        code(exchange(&conn, &utterance(&h, &[0; 3200])).await),
        ErrorCode::Timeout
    );
    assert_eq!(stream_len(&cluster, "eu-west"), 1);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_answered_with_queue_unavailable() {
    let mut cluster = cluster().await;
    let conn = connect(
        &cluster,
        &tls_for(&cluster.deployment.certs_dir(), "edge-fra"),
        "eu-west",
    )
    .await
    .unwrap();
    cluster.redis.get_mut("eu-west").unwrap().stop();
    let answer = exchange(&conn, &utterance(&header("eu", "edge-fra"), &[0; 3200])).await;
    assert_eq!(code(answer), ErrorCode::QueueUnavailable);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_verify_certificates_against_the_deployment_ca() {
    let cluster = cluster().await;
    // Certificates from another CA, for the same names.
    let topology = Topology::load(&cluster.deployment.topology_path()).unwrap();
    let other = cluster.dir.path().join("other-ca");
    certs::generate(&topology, &other).unwrap();

    // An edge that trusts only the other CA refuses the region.
    let err = connect(&cluster, &tls_for(&other, "edge-fra"), "eu-west")
        .await
        .unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );

    // A client whose certificate the region's CA did not sign is refused,
    // even if it trusts the region.
    let mixed = TlsPaths {
        ca: certs::ca_path(&cluster.deployment.certs_dir()),
        ..tls_for(&other, "edge-fra")
    };
    let outcome = match connect(&cluster, &mixed, "eu-west").await {
        Err(e) => e,
        Ok(conn) => exchange(&conn, &utterance(&header("eu", "edge-fra"), &[0; 320]))
            .await
            .expect_err("a client with an unknown certificate got an answer"),
    };
    assert!(!outcome.is_empty());

    // A region name that is not on the certificate is refused too.
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(
        client_config(
            &tls_for(&cluster.deployment.certs_dir(), "edge-fra"),
            Default::default(),
        )
        .unwrap(),
    );
    let addr = format!("127.0.0.1:{}", cluster.quic_ports["eu-west"])
        .parse()
        .unwrap();
    let wrong_name = endpoint.connect(addr, "us-east").unwrap().await;
    assert!(wrong_name.is_err());
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_job_is_claimed_and_queued_jobs_are_answered_as_a_batch() {
    let cluster = cluster().await;
    let url = cluster.redis["eu-west"].url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let stream = queue::stream_key("eu-west");
    let reply = "earshot:eu-west:results:test";

    // A job is queued, and a consumer reads it and dies without acking.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    worker::ensure_group(&mut conn, &stream).await.unwrap();
    let audio = Bytes::from(vec![0u8; 16_000]);
    let job = Job {
        request: [9; 16],
        reply: reply.into(),
        header: header("eu", "edge-fra"),
        audio_sha256: Sha256::digest(&audio).into(),
        audio,
        enqueued_us: queue::unix_us(),
    };
    let mut manager = redis::aio::ConnectionManager::new(client.clone())
        .await
        .unwrap();
    queue::enqueue(&mut manager, &stream, &job).await.unwrap();
    let mut sync = client.get_connection().unwrap();
    let opts = redis::streams::StreamReadOptions::default()
        .group(queue::GROUP, "crashed")
        .count(1);
    let read: redis::streams::StreamReadReply =
        sync.xread_options(&[&stream], &[">"], &opts).unwrap();
    assert_eq!(read.keys[0].ids.len(), 1);

    // Three more arrive and wait together: one good, one whose audio no
    // longer matches its hash, one from a jurisdiction the topology does
    // not know (so no region may serve it). The worker reads them as one batch; only the good one reaches
    // the model, and each gets its own answer.
    let mut corrupted = Job {
        request: [2; 16],
        ..job.clone()
    };
    corrupted.audio_sha256[0] ^= 1;
    let batch = [
        Job {
            request: [1; 16],
            ..job.clone()
        },
        corrupted,
        Job {
            request: [3; 16],
            header: header("mars", "edge-fra"),
            ..job.clone()
        },
    ];
    for j in &batch {
        queue::enqueue(&mut manager, &stream, j).await.unwrap();
    }

    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(reply).await.unwrap();

    // A healthy worker starts; after the claim idle time it takes the job.
    let worker = TestWorker::start(&cluster, &client, "healthy", 4, 3).await;
    let answers = collect_answers(&mut pubsub, 4).await;
    let metrics = worker.metrics.clone();
    for request in [9, 1] {
        match &answers[&request] {
            Frame::Final(f) => {
                assert_eq!(f.utterance, 1);
                assert_eq!(f.region, "eu-west");
                assert_eq!(f.audio_sha256, job.audio_sha256);
            }
            other => panic!("expected a final for {request}, got {other:?}"),
        }
    }
    assert!(
        matches!(&answers[&2], Frame::Error(e) if e.code == wire::ErrorCode::AudioCorrupted),
        "{:?}",
        answers[&2]
    );
    assert!(
        matches!(&answers[&3], Frame::Error(e) if e.code == wire::ErrorCode::ResidencyRefused),
        "{:?}",
        answers[&3]
    );
    worker.stop().await;
    assert_eq!(metrics.jobs_claimed.get(), 1);
    let outcome = |outcome| {
        metrics
            .jobs
            .get_or_create(&earshot_regional::metrics::OutcomeLabel { outcome })
            .get()
    };
    assert_eq!(
        (outcome("final"), outcome("failed"), outcome("refused")),
        (2, 1, 1)
    );
    let pending: redis::streams::StreamPendingReply = sync.xpending(&stream, queue::GROUP).unwrap();
    assert_eq!(pending.count(), 0, "the claimed job was acknowledged");
    let left: usize = sync.xlen(&stream).unwrap();
    assert_eq!(left, 0, "answered entries are deleted from the stream");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_utterance_is_answered_from_its_first_attempt_not_transcribed_again() {
    let cluster = support::single("").await;
    let tls = tls_for(&cluster.deployment.certs_dir(), "edge-fra");
    let connection = connect(&cluster, &tls, "eu-west").await.unwrap();
    let bytes = utterance(&header("eu", "edge-fra"), &[0u8; 32_000]);
    // Two attempts at once (an edge that gave up on the first and retried
    // on a new stream), then a third once the answer is stored (the worker
    // publishes it first, then stores it and acknowledges the entry).
    let (first, second) =
        tokio::join!(exchange(&connection, &bytes), exchange(&connection, &bytes));
    support::region_settled(&cluster, "eu-west", 1.0).await;
    let third = exchange(&connection, &bytes).await;
    // The same final each time; only its receipt is signed anew (its time
    // and ECDSA's random nonce differ).
    let finals: Vec<_> = [first, second, third]
        .into_iter()
        .map(|f| match f {
            Ok(Frame::Final(mut f)) => {
                let receipt = f.receipt.take().expect("a final without a receipt");
                assert_eq!(receipt.claims.utterance, f.utterance);
                f
            }
            other => panic!("expected a final, got {other:?}"),
        })
        .collect();
    assert_eq!(finals[0], finals[1]);
    assert_eq!(finals[0], finals[2]);
    let metrics = cluster
        .metrics(cluster.region_http["eu-west"])
        .await
        .unwrap();
    let count = |series: &str| metric(&metrics, series).unwrap_or(0.0);
    assert_eq!(
        count("earshot_regional_jobs_total{outcome=\"final\"}"),
        1.0,
        "transcribed once"
    );
    assert_eq!(
        count("earshot_regional_deduplicated_total{state=\"queued\"}")
            + count("earshot_regional_deduplicated_total{state=\"answered\"}"),
        2.0
    );
    assert!(count("earshot_regional_deduplicated_total{state=\"answered\"}") >= 1.0);
    assert_eq!(stream_len(&cluster, "eu-west"), 0);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_model_fails_on_every_time_is_dead_lettered_and_the_session_goes_on() {
    let cluster = cluster().await;
    let client = redis::Client::open(cluster.redis["eu-west"].url()).unwrap();
    let stream = queue::stream_key("eu-west");
    let reply = "earshot:eu-west:results:poison";
    let mut manager = redis::aio::ConnectionManager::new(client.clone())
        .await
        .unwrap();
    let job = |utterance: u32, audio: Vec<u8>| {
        let audio = Bytes::from(audio);
        let mut h = header("eu", "edge-fra");
        h.utterance = utterance;
        Job {
            request: [utterance as u8; 16],
            reply: reply.into(),
            audio_sha256: Sha256::digest(&audio).into(),
            header: h,
            audio,
            enqueued_us: queue::unix_us(),
        }
    };
    // 31 s of audio: past Whisper's window, so the model refuses it each
    // time (the ingress never queues such audio; a buggy producer might).
    let poison = job(1, vec![0u8; 31 * 32_000]);
    let next = job(2, vec![0u8; 16_000]);
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    worker::ensure_group(&mut conn, &stream).await.unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(reply).await.unwrap();
    for j in [&poison, &next] {
        queue::enqueue(&mut manager, &stream, j).await.unwrap();
    }

    let worker = TestWorker::start(&cluster, &client, "w", 1, 2).await;
    let answers = collect_answers(&mut pubsub, 2).await;
    let metrics = worker.metrics.clone();
    worker.stop().await;
    assert!(
        matches!(&answers[&2], Frame::Final(f) if f.utterance == 2),
        "the session's next utterance is answered: {:?}",
        answers[&2]
    );
    match &answers[&1] {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::InferenceFailed);
            assert!(e.message.contains("dead-letter"), "{}", e.message);
        }
        other => panic!("expected an error for the poison job, got {other:?}"),
    }
    let mut sync = client.get_connection().unwrap();
    let dead: Vec<redis::streams::StreamId> = sync
        .xrange_all::<_, redis::streams::StreamRangeReply>(queue::dead_letter_key("eu-west"))
        .unwrap()
        .ids;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].get::<String>("utterance").as_deref(),
        Some("1"),
        "the dead letter keeps the job"
    );
    assert!(dead[0].get::<String>("dead_reason").is_some());
    assert_eq!(stream_len(&cluster, "eu-west"), 0);
    assert_eq!(metrics.dead_letters.get(), 1);
    let outcome = |outcome| {
        metrics
            .jobs
            .get_or_create(&earshot_regional::metrics::OutcomeLabel { outcome })
            .get()
    };
    assert_eq!(
        (outcome("failed"), outcome("dead_letter"), outcome("final")),
        (2, 1, 1),
        "two failed deliveries, then the dead letter"
    );
    cluster.stop().await.unwrap();
}
