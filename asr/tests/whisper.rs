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
    let model = WhisperModel::load(dir.path(), EncoderWindow::Full).unwrap();
    let audio = chirp(1.5);
    let first = model.transcribe(&audio, Some("en")).unwrap();
    let second = model.transcribe(&audio, Some("en")).unwrap();
    assert_eq!(first, second);
    assert!(!first.tokens.is_empty());
    assert_eq!(first.language.as_deref(), Some("en"));
    // Decoding stops at the length bound for 1.5 s: 8 + 15 tokens.
    assert!(first.tokens.len() <= 23, "{}", first.tokens.len());

    // A fresh load gives the same answer: nothing leaks between calls.
    let again = WhisperModel::load(dir.path(), EncoderWindow::Full).unwrap();
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
    let model = WhisperModel::load(dir.path(), EncoderWindow::Fit).unwrap();
    let t = model.transcribe(&chirp(0.7), Some("en")).unwrap();
    assert!(!t.tokens.is_empty());
}

#[test]
fn overlong_audio_and_broken_directories_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    generate_test_model(dir.path(), &TestModelSpec::TEST).unwrap();
    let model = WhisperModel::load(dir.path(), EncoderWindow::Fit).unwrap();
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

/// The key/value cache is only a cache: feeding a prompt token by token
/// gives the hidden states that feeding it at once gives.
#[test]
fn the_decoder_cache_gives_what_a_full_recompute_gives() {
    use candle_core::{IndexOp, Tensor};
    use candle_nn::VarBuilder;
    let dir = tempfile::tempdir().unwrap();
    generate_test_model(dir.path(), &TestModelSpec::TEST).unwrap();
    let config = earshot_asr::whisper::load_config(dir.path()).unwrap();
    let weights = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, candle_core::DType::F32, &candle_core::Device::Cpu);
    let net = earshot_asr::net::Net::load(&earshot_asr::net::Weights::Float(vb), &config).unwrap();
    let mel = Tensor::randn(0f32, 1.0, (1, 80, 200), &candle_core::Device::Cpu).unwrap();
    let features = net.encode(&mel).unwrap();
    let tokens: [u32; 5] = [7, 42, 3, 99, 15];

    let mut all = net.start(&features).unwrap();
    let at_once = net
        .step(&mut all, &Tensor::new(&[tokens], net.device()).unwrap())
        .unwrap();
    let mut one = net.start(&features).unwrap();
    for (i, t) in tokens.iter().enumerate() {
        let h = net
            .step(&mut one, &Tensor::new(&[[*t]], net.device()).unwrap())
            .unwrap();
        let expected = at_once.i((.., i..i + 1, ..)).unwrap();
        let diff = earshot_asr::kernels::max_abs_diff(&h, &expected).unwrap();
        assert!(diff < 1e-4, "position {i}: {diff}");
    }
    assert_eq!(one.position(), 5);

    // As the decoder runs it: one token, then several at once after it
    // (the causal mask with an offset).
    let mut split = net.start(&features).unwrap();
    net.step(
        &mut split,
        &Tensor::new(&[[tokens[0]]], net.device()).unwrap(),
    )
    .unwrap();
    let rest = net
        .step(
            &mut split,
            &Tensor::new(&tokens[1..], net.device())
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let expected = at_once.i((.., 1.., ..)).unwrap();
    let diff = earshot_asr::kernels::max_abs_diff(&rest, &expected).unwrap();
    assert!(diff < 1e-4, "after an offset: {diff}");
}

#[test]
fn encoder_windows_parse_and_print() {
    for (text, window) in [
        ("full", EncoderWindow::Full),
        ("fit", EncoderWindow::Fit),
        ("10s", EncoderWindow::Padded(10)),
    ] {
        assert_eq!(text.parse::<EncoderWindow>(), Ok(window));
        assert_eq!(window.to_string(), text);
    }
    for bad in ["", "0s", "31s", "ten", "10"] {
        assert!(bad.parse::<EncoderWindow>().is_err(), "{bad}");
    }
}

#[test]
fn guards_name_the_reason_text_is_withheld() {
    use earshot_asr::{Guards, Withheld};
    let g = Guards::default();
    // Speech: low no-speech probability, likely tokens.
    assert_eq!(g.judge(true, 1.0, 0.02, -0.3), None);
    assert_eq!(
        g.judge(false, 1.0, 0.02, -0.3),
        Some(Withheld::TokenCeiling)
    );
    assert_eq!(g.judge(true, 3.0, 0.02, -0.3), Some(Withheld::Repetition));
    // OpenAI's rule needs both; the stricter one fires on no-speech alone.
    assert_eq!(g.judge(true, 1.0, 0.7, -1.5), Some(Withheld::NoSpeech));
    assert_eq!(g.judge(true, 1.0, 0.7, -0.5), None);
    assert_eq!(g.judge(true, 1.0, 0.94, -0.4), Some(Withheld::NoSpeech));
    assert_eq!(g.judge(true, 1.0, 0.3, -3.1), Some(Withheld::LowConfidence));
    assert_eq!(Guards::OFF.judge(false, 9.0, 1.0, -9.0), None);
}

#[test]
fn compression_ratio_flags_loops() {
    use earshot_asr::whisper::compression_ratio;
    assert!(compression_ratio("The quick brown fox jumps over the lazy dog.") < 1.5);
    assert!(compression_ratio(&"thank you ".repeat(30)) > 2.4);
    assert_eq!(compression_ratio(""), 0.0);
}

/// The edge tier's GGUF: q8_0 and q4_0 weights run through earshot's own
/// network (quantized matrix products, the fused projections quantized
/// again) and stay close to the f32 model they came from; a truncated
/// file is an error that names it.
#[test]
fn quantized_weights_encode_like_the_float_model() {
    use earshot_asr::quantize::{Scheme, quantize_whisper};
    let dir = tempfile::tempdir().unwrap();
    let float = dir.path().join("f32");
    generate_test_model(&float, &TestModelSpec::TEST).unwrap();
    let pcm = chirp(2.0);
    let reference = WhisperModel::load(&float, EncoderWindow::Fit).unwrap();
    let mel = reference.mel(&pcm).unwrap();
    let expected: Vec<f32> = reference
        .encode(&mel)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    for (scheme, bound) in [(Scheme::Q8_0, 0.02), (Scheme::Q4_0, 0.2)] {
        let out = dir.path().join(format!("{scheme:?}"));
        quantize_whisper(&float, &out, scheme).unwrap();
        assert!(!out.join("model.safetensors").exists());
        let model = WhisperModel::load(&out, EncoderWindow::Fit).unwrap();
        let got: Vec<f32> = model
            .encode(&model.mel(&pcm).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), expected.len());
        let diff: Vec<f32> = got.iter().zip(&expected).map(|(a, b)| a - b).collect();
        let relative = norm(&diff) / norm(&expected);
        assert!(relative < bound, "{scheme:?}: relative error {relative}");
        assert!(relative > 0.0, "{scheme:?}: nothing was quantized");
        // Decoding runs end to end on the quantized weights.
        model.transcribe(&pcm, Some("en")).unwrap();
    }
    // A truncated GGUF names the file.
    let broken = dir.path().join("Q8_0");
    let gguf = broken.join("model.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() / 2]).unwrap();
    let err = WhisperModel::load(&broken, EncoderWindow::Fit).unwrap_err();
    assert!(err.to_string().contains("model.gguf"), "{err}");
}
