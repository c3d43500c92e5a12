//! `earshot-registry import --from ctranslate2`, the binary as a user runs
//! it: a faster-whisper directory (real tiny.en, from `make setup`) is
//! converted and published to the embedded S3 server in one command, and
//! the published version is the published layout, hashed. (That a node
//! serves such a conversion is `cli/tests/pipeline.rs`'s hot-swap test.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use earshot_registry::read_manifest;
use earshot_registry::server::LocalRegistry;
use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_from_ctranslate2_publishes_the_converted_model() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ct2 = root.join(".cache/ct2/tiny.en");
    assert!(
        ct2.join("model.bin").is_file(),
        "{} is missing: run `make setup`",
        ct2.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let local = LocalRegistry::start(&dir.path().join("s3"), "us-east", "us", false)
        .await
        .unwrap();
    let topology_path = dir.path().join("topology.toml");
    std::fs::write(&topology_path, &local.topology).unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_earshot-registry"))
            .arg("--topology")
            .arg(&topology_path)
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &local.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &local.secret_key)
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "earshot-registry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["init-buckets"]);
    let ct2 = ct2.to_str().unwrap();
    cli(&[
        "import",
        "--from",
        "ctranslate2",
        ct2,
        "--name",
        "whisper",
        "--version",
        "1",
        "--tier",
        "regional",
        "--residency",
        "global",
    ]);

    let registry = local.registry().unwrap();
    let (_, store) = registry.home("global").unwrap();
    let manifest = read_manifest(&store, "whisper", "1")
        .await
        .unwrap()
        .expect("version 1 was published");
    let mut files: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    files.sort_unstable();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    let weights = manifest
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap();
    // tiny.en in float16: 37.8 M parameters, 2 bytes each, plus the header.
    assert!(
        (75_000_000..76_000_000).contains(&weights.size),
        "{}",
        weights.size
    );
    local.s3.stop().await;
}
