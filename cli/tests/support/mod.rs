//! Test-only glue: the seeded test model, generated once per test binary,
//! and the loopback cluster started on it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use earshot_asr::{TestModelSpec, generate_test_model};
#[allow(unused_imports)]
pub use earshot_cli::cluster::{Cluster, EdgePlan, RegionPlan, http_get, metric};

/// The test model under `target/tmp`, written to a private directory and
/// renamed into place so concurrent test binaries cannot see half a model.
pub fn test_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("whisper-test");
            if !dir.join("model.safetensors").is_file() {
                let scratch = dir.with_extension(format!("tmp{}", std::process::id()));
                generate_test_model(&scratch, &TestModelSpec::TEST).expect("generate test model");
                if std::fs::rename(&scratch, &dir).is_err() {
                    // Another process won the race; its copy is identical.
                    let _ = std::fs::remove_dir_all(&scratch);
                }
            }
            dir
        })
        .clone()
}

pub async fn single(edge_extra: &'static str) -> Cluster {
    Cluster::single(&test_model(), edge_extra).await.unwrap()
}

pub async fn start(regions: &[RegionPlan], edges: &[EdgePlan]) -> Cluster {
    Cluster::start(&test_model(), regions, edges).await.unwrap()
}
