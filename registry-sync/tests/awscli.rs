//! A second, independent S3 client (the AWS CLI, from PyPI) reads a version
//! the registry published to the embedded server, and its files match the
//! manifest's hashes. Runs `scripts/awscli-check.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use earshot_asr::{TestModelSpec, generate_test_model};
use earshot_registry::publish::{self, PublishRequest, Transfer};
use earshot_registry::server::LocalRegistry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_cli_reads_a_published_version_and_its_hashes_match() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let aws = std::env::var("AWS_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".venv/bin/aws"));
    assert!(
        aws.is_file(),
        "{} is missing: run `make setup`",
        aws.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let local = LocalRegistry::start(&dir.path().join("s3"), "us-east", "us", false)
        .await
        .unwrap();
    let registry = local.registry().unwrap();
    let model = dir.path().join("model");
    generate_test_model(&model, &TestModelSpec::TEST).unwrap();
    let req = PublishRequest::new(model, "whisper", "1", "global");
    let report = publish::publish(&registry, &req, &Transfer::new(dir.path().join("state")))
        .await
        .unwrap();

    let endpoint = local.s3.endpoint();
    let (key, secret) = (local.access_key.clone(), local.secret_key.clone());
    let bucket = report.bucket.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(root.join("scripts/awscli-check.sh"))
            .args([&endpoint, &bucket, "whisper", "1"])
            .env("AWS_CLI", &aws)
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "awscli-check.sh failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("whisper@1: all 3 files match the manifest"),
        "{stdout}"
    );
    for f in &report.manifest.files {
        assert!(
            stdout.contains(&format!("ok       {} {} {}", f.path, f.size, f.sha256)),
            "{stdout}"
        );
    }
    local.s3.stop().await;
}
