//! The real loading and inference path, on a generated model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use earshot_asr::{AsrError, EncoderWindow, TestModelSpec, WhisperModel, generate_test_model};

fn sha256_of_dir(dir: &Path) -> Vec<(String, usize, u64)> {
    // A cheap content fingerprint without extra dependencies: length and
    // FNV-1a of every file.
    let mut out = Vec::new();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let mut h = 0xcbf2_9ce4_8422_2325_u64;
        for b in &bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        out.push((name.to_owned(), bytes.len(), h));
    }
    out
}

/// A 1.5 s chirp with some noise: deterministic "speech-like" input.
fn chirp(seconds: f32) -> Vec<f32> {
    let n = (seconds * 16_000.0) as usize;
    (0..n)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            0.3 * (2.0 * std::f32::consts::PI * (200.0 + 400.0 * t) * t).sin()
        })
        .collect()
}

#[test]
fn generation_is_reproducible_and_uses_published_tensor_names() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    generate_test_model(a.path(), &TestModelSpec::TEST).unwrap();
    generate_test_model(b.path(), &TestModelSpec::TEST).unwrap();
    assert_eq!(sha256_of_dir(a.path()), sha256_of_dir(b.path()));

    let shapes = earshot_asr::generate::tensor_shapes(&a.path().join("model.safetensors")).unwrap();
    let d = TestModelSpec::TEST.d_model;
    assert_eq!(shapes["model.encoder.conv1.weight"], [d, 80, 3]);
    assert_eq!(shapes["model.encoder.conv2.weight"], [d, d, 3]);
    assert_eq!(shapes["model.encoder.embed_positions.weight"], [1500, d]);
    assert_eq!(shapes["model.decoder.embed_positions.weight"], [448, d]);
    assert_eq!(shapes["model.encoder.layers.1.fc1.weight"], [4 * d, d]);
    assert_eq!(
        shapes["model.decoder.layers.0.encoder_attn.k_proj.weight"],
        [d, d]
    );
    assert!(shapes.contains_key("model.decoder.layer_norm.bias"));

    // A different seed gives different weights.
    let c = tempfile::tempdir().unwrap();
    let spec = TestModelSpec {
        seed: 7,
        ..TestModelSpec::TEST
    };
    generate_test_model(c.path(), &spec).unwrap();
    assert_ne!(sha256_of_dir(a.path())[2], sha256_of_dir(c.path())[2]);
    assert_eq!(sha256_of_dir(a.path())[1], sha256_of_dir(c.path())[1]);
}

#[test]
fn a_generated_model_loads_and_transcribes_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    generate_test_model(dir.path(), &TestModelSpec::TEST).unwrap();
    let mut model = WhisperModel::load(dir.path(), EncoderWindow::Full).unwrap();
    let audio = chirp(1.5);
    let first = model.transcribe(&audio, Some("en")).unwrap();
    let second = model.transcribe(&audio, Some("en")).unwrap();
    assert_eq!(first, second);
    assert!(!first.tokens.is_empty());
    assert_eq!(first.language.as_deref(), Some("en"));
    // Decoding stops at the length bound for 1.5 s: 8 + 15 tokens.
    assert!(first.tokens.len() <= 23, "{}", first.tokens.len());

    // A fresh load gives the same answer: nothing leaks between calls.
    let mut again = WhisperModel::load(dir.path(), EncoderWindow::Full).unwrap();
    assert_eq!(again.transcribe(&audio, Some("en")).unwrap(), first);

    // Different audio gives different tokens (the model does look at it).
    let other = model
        .transcribe(
            &chirp(1.0)[..8000]
                .iter()
                .map(|x| -x * 2.0)
                .collect::<Vec<_>>(),
            Some("en"),
        )
        .unwrap();
    assert_ne!(other.tokens, first.tokens);

    // Without a hint (or with one the vocabulary lacks), the language is
    // detected from the audio.
    let detected = model.transcribe(&audio, None).unwrap();
    assert!(detected.language.is_some());
    assert_eq!(
        model.transcribe(&audio, Some("xx")).unwrap().language,
        detected.language
    );
}

#[test]
fn the_fit_window_runs_only_the_frames_the_audio_covers() {
    let dir = tempfile::tempdir().unwrap();
    generate_test_model(dir.path(), &TestModelSpec::TEST).unwrap();
    let mut model = WhisperModel::load(dir.path(), EncoderWindow::Fit).unwrap();
    let t = model.transcribe(&chirp(0.7), Some("en")).unwrap();
    assert!(!t.tokens.is_empty());
}

#[test]
fn overlong_audio_and_broken_directories_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    generate_test_model(dir.path(), &TestModelSpec::TEST).unwrap();
    let mut model = WhisperModel::load(dir.path(), EncoderWindow::Fit).unwrap();
    assert!(matches!(
        model.transcribe(&vec![0.0; 16_000 * 31], None),
        Err(AsrError::TooLong { .. })
    ));

    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    let err = WhisperModel::load(dir.path(), EncoderWindow::Full).unwrap_err();
    assert!(matches!(err, AsrError::Weights { .. }), "{err}");

    std::fs::write(dir.path().join("config.json"), b"{\"d_model\": 3}").unwrap();
    let err = WhisperModel::load(dir.path(), EncoderWindow::Full).unwrap_err();
    assert!(matches!(err, AsrError::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"));

    let empty = tempfile::tempdir().unwrap();
    let err = WhisperModel::load(empty.path(), EncoderWindow::Full).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}
