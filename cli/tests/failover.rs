//! Nothing accepted is lost: regions and workers killed (`kill -9`),
//! regions restarted and drained (SIGTERM), Redis killed and restarted, and
//! a flood past a region's queue limit — with spoken audio streamed through a real edge,
//! real QUIC, real Redis (append-only file on) and the built
//! `earshot-regional` binary. Every utterance is counted: each must get
//! exactly one final, from a region its session's jurisdiction permits.
//!
//! The words do not matter here, only that each utterance is answered once,
//! so the regions run the seeded test model (fast on two cores). Times are
//! printed, not asserted (docs/benchmarks.md has the measured ones).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use earshot_cli::client::{self, StreamOptions, Transcript};
use earshot_cli::speech::{self, Speech};
use earshot_common::client::ServerMessage;
use support::{Cluster, EdgePlan, RegionPlan, http_get, metric, test_model};

const SENTENCES: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning at nine.",
    "Every region keeps its own queue of utterances.",
];

/// These tests kill, restart and flood whole deployments of 5-20 streaming
/// sessions: run one at a time, so two cores are not shared between two
/// of them (and the times they print mean something).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Finals as they arrive: when, which session, from which region.
type Arrivals = Arc<Mutex<Vec<(Instant, usize, String)>>>;

fn region(name: &'static str, extra: &'static str) -> RegionPlan {
    RegionPlan {
        name,
        jurisdiction: "eu",
        workers: 1,
        extra,
    }
}

fn edge(regions: &'static [&'static str]) -> EdgePlan {
    EdgePlan {
        name: "edge-fra",
        jurisdiction: "eu",
        regions,
        extra: "",
    }
}

/// `sessions` clients streaming `speech` in real time at once.
fn stream_all(
    cluster: &Cluster,
    speech: &Speech,
    sessions: usize,
    arrivals: &Arrivals,
) -> Vec<tokio::task::JoinHandle<Transcript>> {
    (0..sessions)
        .map(|session| {
            let url = cluster.listen_url("edge-fra", "");
            let pcm = speech.pcm_bytes();
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let options = StreamOptions {
                    chunk_bytes: 3_200,
                    pace: Some(Duration::from_millis(100)),
                };
                let seen = |m: &ServerMessage| {
                    if let ServerMessage::Final(f) = m {
                        arrivals
                            .lock()
                            .unwrap()
                            .push((Instant::now(), session, f.region.clone()));
                    }
                };
                tokio::time::timeout(
                    Duration::from_secs(180),
                    client::stream(&url, &pcm, options, seen),
                )
                .await
                .expect("session did not finish within 180 s")
                .unwrap()
            })
        })
        .collect()
}

/// Every session got exactly one final for each of its utterances (1, 2,
/// 3: one per spoken sentence), no error, all from `permitted` regions.
/// Returns the finals per region.
async fn every_utterance_answered_once(
    sessions: Vec<tokio::task::JoinHandle<Transcript>>,
    permitted: &[&str],
) -> BTreeMap<String, usize> {
    let mut per_region = BTreeMap::new();
    for (i, session) in sessions.into_iter().enumerate() {
        let transcript = session.await.unwrap();
        assert!(
            transcript.errors().is_empty(),
            "session {i}: {:#?}",
            transcript.errors()
        );
        let mut answered: BTreeMap<u32, usize> = BTreeMap::new();
        for f in transcript.finals() {
            *answered.entry(f.utterance).or_default() += 1;
            assert!(
                permitted.contains(&f.region.as_str()),
                "session {i}: utterance {} answered by {}, not permitted",
                f.utterance,
                f.region
            );
            *per_region.entry(f.region.clone()).or_default() += 1;
        }
        let expected: BTreeMap<u32, usize> = (1..=SENTENCES.len() as u32).map(|u| (u, 1)).collect();
        assert_eq!(answered, expected, "session {i}: utterance -> finals");
    }
    per_region
}

/// eu-west (an `earshot-regional` process) and eu-central, both permitted
/// to edge-fra's EU sessions, eu-west first.
async fn two_regions_eu_west_a_process() -> Cluster {
    Cluster::start_with_processes(
        &test_model(),
        &[region("eu-west", ""), region("eu-central", "")],
        &[edge(&["eu-west", "eu-central"])],
        &["eu-west"],
    )
    .await
    .unwrap()
}

/// eu-west alone serving edge-fra; a process if `processes` names it.
async fn eu_west_alone(processes: &[&str]) -> Cluster {
    Cluster::start_with_processes(
        &test_model(),
        &[region("eu-west", "")],
        &[edge(&["eu-west"])],
        processes,
    )
    .await
    .unwrap()
}

fn speak(cluster: &Cluster) -> Speech {
    speech::synthesize(&SENTENCES, 1.5, 0.5, cluster.dir.path()).unwrap()
}

/// Waits until the first final from `region` arrives: the moment the
/// other sessions' utterances are in flight there (the sessions speak in
/// step).
async fn first_final_arrives(arrivals: &Arrivals, region: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !arrivals.lock().unwrap().iter().any(|(_, _, r)| r == region) {
        assert!(Instant::now() < deadline, "no final from {region} in 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The first final from `region` at or after `since`.
fn first_final_from(arrivals: &Arrivals, region: &str, since: Instant) -> Option<Duration> {
    arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _, r)| r == region && *at >= since)
        .map(|(at, _, _)| *at - since)
        .min()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_region_fails_over_and_every_utterance_gets_exactly_one_final() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = two_regions_eu_west_a_process().await;
    let speech = speak(&cluster);
    let arrivals = Arrivals::default();
    let sessions = stream_all(&cluster, &speech, 20, &arrivals);
    first_final_arrives(&arrivals, "eu-west").await;
    cluster.kill("eu-west").unwrap();
    let killed = Instant::now();
    // Failure detection: how soon the edge's breaker for eu-west opens
    // (the edge noticed the region is gone and stops sending there).
    let edge_http = cluster.edge_ports["edge-fra"];
    let detected = {
        tokio::spawn(async move {
            let series = "earshot_edge_breaker_opened_total{region=\"eu-west\"}";
            while killed.elapsed() < Duration::from_secs(30) {
                let text = http_get(edge_http, "/metrics").await.unwrap_or_default();
                if metric(&text, series).is_some_and(|n| n >= 1.0) {
                    return Some(killed.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        })
    };
    let per_region = every_utterance_answered_once(sessions, &["eu-west", "eu-central"]).await;
    let to_first = first_final_from(&arrivals, "eu-central", killed);
    println!(
        "kill -9 of eu-west: breaker open {:?} and first final from eu-central {:?} after the kill; finals per region {per_region:?}",
        detected.await.unwrap(),
        to_first
    );
    assert!(
        per_region.get("eu-central").is_some_and(|n| *n > 0),
        "{per_region:?}"
    );
    let edge_metrics = cluster
        .metrics(cluster.edge_ports["edge-fra"])
        .await
        .unwrap();
    assert!(
        metric(
            &edge_metrics,
            "earshot_edge_breaker_opened_total{region=\"eu-west\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "the dead region's breaker opened"
    );
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_restarted_after_3_s_answers_every_utterance_with_no_error() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = eu_west_alone(&["eu-west"]).await;
    let speech = speak(&cluster);
    let arrivals = Arrivals::default();
    let sessions = stream_all(&cluster, &speech, 5, &arrivals);
    first_final_arrives(&arrivals, "eu-west").await;
    cluster.kill("eu-west").unwrap();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_region("eu-west").unwrap();
    let per_region = every_utterance_answered_once(sessions, &["eu-west"]).await;
    println!(
        "eu-west killed and restarted 3 s later: first final {:?} after the kill; {per_region:?}",
        first_final_from(&arrivals, "eu-west", killed)
    );
    let edge_metrics = cluster
        .metrics(cluster.edge_ports["edge-fra"])
        .await
        .unwrap();
    assert!(
        metric(&edge_metrics, "earshot_edge_retry_rounds_total").is_some_and(|n| n >= 1.0),
        "utterances waited for the region to come back"
    );
    cluster.stop().await.unwrap();
}

/// Entries of the region's stream that `consumer` has read and not yet
/// acknowledged: the jobs it has in hand.
fn pending_for(cluster: &Cluster, region: &str, consumer: &str) -> usize {
    let client = redis::Client::open(cluster.redis[region].url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(earshot_regional::queue::stream_key(region))
        .arg(earshot_regional::queue::GROUP)
        .arg("-")
        .arg("+")
        .arg(100)
        .arg(consumer)
        .query(&mut conn)
        .unwrap_or_default();
    reply.ids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_has_its_job_taken_over_and_answered_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // eu-west's ingress in-process with no workers of its own; its workers
    // are separate `earshot-regional` processes (`ingress = false`).
    let mut cluster = Cluster::start(
        &test_model(),
        &[RegionPlan {
            workers: 0,
            ..region("eu-west", "[worker]\nclaim_idle_ms = 1000\n")
        }],
        &[edge(&["eu-west"])],
    )
    .await
    .unwrap();
    cluster
        .start_worker("eu-west", "worker-a", 1)
        .await
        .unwrap();
    let speech = speak(&cluster);
    let arrivals = Arrivals::default();
    let sessions = stream_all(&cluster, &speech, 5, &arrivals);
    // Wait until worker-a has a job in hand (read, not acknowledged), then
    // kill it: that job is mid-recognition.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pending_for(&cluster, "eu-west", "worker-a-0") == 0 {
        assert!(Instant::now() < deadline, "worker-a took no job in 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.kill("worker-a").unwrap();
    let in_hand = pending_for(&cluster, "eu-west", "worker-a-0");
    assert!(in_hand > 0, "worker-a died with no job in hand");
    let b_http = cluster
        .start_worker("eu-west", "worker-b", 1)
        .await
        .unwrap();
    let per_region = every_utterance_answered_once(sessions, &["eu-west"]).await;
    let worker_b = cluster.metrics(b_http).await.unwrap();
    let claimed = metric(&worker_b, "earshot_regional_jobs_claimed_total").unwrap_or(0.0);
    println!(
        "worker-a killed with {in_hand} job(s) in hand; worker-b claimed {claimed}; {per_region:?}"
    );
    assert!(
        claimed >= in_hand as f64,
        "worker-b took over {claimed} jobs, worker-a had {in_hand} in hand"
    );
    assert_eq!(pending_for(&cluster, "eu-west", "worker-a-0"), 0);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_stream_loses_no_utterance() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = eu_west_alone(&[]).await;
    let speech = speak(&cluster);
    let arrivals = Arrivals::default();
    let sessions = stream_all(&cluster, &speech, 5, &arrivals);
    first_final_arrives(&arrivals, "eu-west").await;
    let redis = cluster.redis.get_mut("eu-west").unwrap();
    redis.stop(); // SIGKILL
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart().unwrap();
    let per_region = every_utterance_answered_once(sessions, &["eu-west"]).await;
    println!("Redis killed and restarted: {per_region:?}");
    cluster.stop().await.unwrap();
}

/// SIGTERM to process `name`: it drains, logs `stopped` and exits 0
/// within 30 s; prints how long it took.
async fn terminated_cleanly(cluster: &mut Cluster, name: &str, stopped: &str) {
    let began = Instant::now();
    let status = cluster
        .terminate(name, Duration::from_secs(30))
        .await
        .unwrap();
    println!("{name} drained and exited in {:?}", began.elapsed());
    assert!(status.success(), "{name}: exit status {status}");
    let log = cluster.log(name);
    assert!(log.contains(stopped), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_region_under_load_and_it_exits_0() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = two_regions_eu_west_a_process().await;
    let speech = speak(&cluster);
    let arrivals = Arrivals::default();
    let sessions = stream_all(&cluster, &speech, 10, &arrivals);
    first_final_arrives(&arrivals, "eu-west").await;
    terminated_cleanly(&mut cluster, "eu-west", "regional node stopped").await;
    every_utterance_answered_once(sessions, &["eu-west", "eu-central"]).await;
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_edge_under_load_delivering_every_accepted_utterance() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start_with_processes(
        &test_model(),
        &[region("eu-west", ""), region("eu-central", "")],
        &[edge(&["eu-west", "eu-central"])],
        &["edge-fra"],
    )
    .await
    .unwrap();
    let speech = speak(&cluster);
    let arrivals = Arrivals::default();
    let started = tokio::time::Instant::now();
    let sessions = stream_all(&cluster, &speech, 10, &arrivals);
    first_final_arrives(&arrivals, "eu-west").await;
    // Midway through the second sentence (the sessions stream in real
    // time): the drain must cut each session's utterance in progress and
    // see it answered.
    let (from, to) = speech.spans[1];
    tokio::time::sleep_until(started + Duration::from_secs_f64((from + to) / 2.0)).await;
    terminated_cleanly(&mut cluster, "edge-fra", "edge stopped").await;
    // Each session was closed as going away, after a final for every
    // utterance the edge had cut (numbered 1..=k, each once) and no error.
    let mut delivered = 0;
    for (i, session) in sessions.into_iter().enumerate() {
        let transcript = session.await.unwrap();
        assert!(
            transcript.errors().is_empty(),
            "session {i}: {:#?}",
            transcript.errors()
        );
        assert_eq!(
            transcript.close.as_ref().map(|(code, _)| *code),
            Some(1001),
            "session {i}"
        );
        let numbers: Vec<u32> = transcript.finals().iter().map(|f| f.utterance).collect();
        let expected: Vec<u32> = (1..=numbers.len() as u32).collect();
        assert_eq!(numbers, expected, "session {i}: finals by utterance");
        delivered += numbers.len();
        // The edge said how much audio it read: midway through the second
        // sentence, where the last final (the cut utterance) ends.
        let accepted = transcript
            .messages
            .iter()
            .find_map(|m| match m {
                earshot_common::client::ServerMessage::Closing(c) => Some(c.audio_accepted),
                _ => None,
            })
            .unwrap_or_else(|| panic!("session {i}: no closing message"));
        assert!(
            accepted > from && accepted < to + 1.0,
            "session {i}: read {accepted} s"
        );
        let last = transcript.finals().last().map_or(0.0, |f| f.end);
        assert!(
            last <= accepted + 0.05,
            "session {i}: final ends at {last}, read {accepted}"
        );
    }
    // ...and every final a region produced reached its client: none was
    // answered and then dropped by the draining edge.
    let mut answered = 0.0;
    for region in ["eu-west", "eu-central"] {
        let text = cluster.metrics(cluster.region_http[region]).await.unwrap();
        answered += metric(
            &text,
            "earshot_regional_utterances_total{outcome=\"final\"}",
        )
        .unwrap_or(0.0);
    }
    println!("{delivered} finals delivered, {answered} answered by the regions");
    assert!(delivered > 10, "the drain cut and delivered no utterance");
    assert_eq!(delivered as f64, answered);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_queue_limit_is_refused_busy_and_fails_over() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // The edge and the flooded region are processes, so their memory can
    // be read.
    let cluster = Cluster::start_with_processes(
        &test_model(),
        &[
            region("eu-west", "[redis]\nqueue_limit = 1\n"),
            region("eu-central", ""),
        ],
        &[edge(&["eu-west", "eu-central"])],
        &["edge-fra", "eu-west"],
    )
    .await
    .unwrap();
    let idle = ["edge-fra", "eu-west"].map(|p| cluster.memory_kib(p).unwrap().0);
    let speech = speak(&cluster);
    // Twelve sessions at once, as fast as the edge reads: a burst of
    // utterances far past eu-west's limit of one queued.
    let sessions: Vec<_> = (0..12)
        .map(|_| {
            let url = cluster.listen_url("edge-fra", "");
            let pcm = speech.pcm_bytes();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(180),
                    client::stream(&url, &pcm, StreamOptions::default(), |_| {}),
                )
                .await
                .expect("session did not finish within 180 s")
                .unwrap()
            })
        })
        .collect();
    let per_region = every_utterance_answered_once(sessions, &["eu-west", "eu-central"]).await;
    let region_metrics = cluster
        .metrics(cluster.region_http["eu-west"])
        .await
        .unwrap();
    let busy = metric(
        &region_metrics,
        "earshot_regional_utterances_total{outcome=\"busy\"}",
    )
    .unwrap_or(0.0);
    let peak = ["edge-fra", "eu-west"].map(|p| cluster.memory_kib(p).unwrap().1);
    println!(
        "flood: {busy} busy refusals at eu-west; finals per region {per_region:?}; \
         resident memory idle -> peak: edge-fra {} -> {} MiB, eu-west {} -> {} MiB",
        idle[0] / 1024,
        peak[0] / 1024,
        idle[1] / 1024,
        peak[1] / 1024
    );
    assert!(busy >= 1.0, "eu-west refused none of the burst");
    assert!(per_region.get("eu-central").is_some_and(|n| *n > 0));
    cluster.stop().await.unwrap();
}
