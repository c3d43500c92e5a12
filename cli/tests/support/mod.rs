//! Test-only glue: the seeded test model, generated once per test binary,
//! and the loopback cluster started on it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use earshot_asr::{TestModelSpec, generate_test_model};
#[allow(unused_imports)]
pub use earshot_cli::cluster::{Cluster, EdgePlan, RegionPlan, http_get, metric};

/// `name` under `target/tmp`, made once by `generate` (which writes into
/// the directory it is given): written to a private directory and renamed
/// into place, so concurrent test binaries cannot see half a model.
fn generated_once(name: &str, generate: impl FnOnce(&std::path::Path)) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    if !dir.is_dir() {
        let scratch = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        generate(&scratch);
        if std::fs::rename(&scratch, &dir).is_err() {
            // Another process won the race; its copy is identical.
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    dir
}

/// The seeded Whisper test model.
pub fn test_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            generated_once("whisper-test", |dir| {
                generate_test_model(dir, &TestModelSpec::TEST).expect("generate test model")
            })
        })
        .clone()
}

/// A directory of translation pairs holding one generated Marian model,
/// `en-de` (random weights: its translations are noise).
pub fn translation_pairs() -> PathBuf {
    static PAIRS: OnceLock<PathBuf> = OnceLock::new();
    PAIRS
        .get_or_init(|| {
            generated_once("marian-pairs", |dir| {
                earshot_asr::marian::generate_test_model(&dir.join("en-de"), 0x5eed)
                    .expect("generate Marian test model")
            })
        })
        .clone()
}

pub async fn single(edge_extra: &'static str) -> Cluster {
    Cluster::single(&test_model(), edge_extra).await.unwrap()
}

pub async fn start(regions: &[RegionPlan], edges: &[EdgePlan]) -> Cluster {
    Cluster::start(&test_model(), regions, edges).await.unwrap()
}

/// Entries in `region`'s utterance stream: queued or in progress.
pub fn stream_len(cluster: &Cluster, region: &str) -> usize {
    let client = redis::Client::open(cluster.redis[region].url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::Commands::xlen(&mut conn, earshot_regional::queue::stream_key(region)).unwrap()
}

/// Waits (up to 10 s) until `region`'s workers have answered at least
/// `finals` jobs and its stream is empty, and returns its metrics then. A
/// worker publishes an answer before it stores it, acknowledges the entry
/// and counts the job, so a client can hold its final before all three.
pub async fn region_settled(cluster: &Cluster, region: &str, finals: f64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = cluster.metrics(cluster.region_http[region]).await.unwrap();
        let counted = metric(&text, "earshot_regional_jobs_total{outcome=\"final\"}");
        if counted.is_some_and(|n| n >= finals) && stream_len(cluster, region) == 0 {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{region}: {counted:?} finals counted, {} entries left after 10 s",
            stream_len(cluster, region)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
