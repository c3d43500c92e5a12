//! Seeded test models in Whisper's published layout.
//!
//! No model hub is reachable from where earshot is built and tested, so the
//! real loading and inference code runs on models generated here:
//! `config.json` with the fields Hugging Face's `openai/whisper-*` configs
//! carry, a byte-level BPE `tokenizer.json` (trained on a small built-in
//! English text) with Whisper's special tokens, and `model.safetensors` with
//! every tensor named as in the published checkpoints, filled with seeded
//! random values. The same seed gives byte-identical files. The text such a
//! model produces is noise; its structure (tensor names, shapes, tokenizer
//! format) is the real one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use candle_transformers::models::whisper::{Config, model::Whisper};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::whisper::AsrError;

/// Whisper's language codes, in the order of their tokens.
pub const LANGUAGES: [&str; 99] = [
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it",
    "id", "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur",
    "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn",
    "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si",
    "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo",
    "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln",
    "ha", "ba", "jw", "su",
];

/// Shape and seed of a generated model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestModelSpec {
    pub d_model: usize,
    pub heads: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    /// BPE vocabulary size before special tokens.
    pub bpe_vocab: usize,
    pub seed: u64,
}

impl TestModelSpec {
    /// Small enough that a test transcribes an utterance in milliseconds.
    pub const TEST: TestModelSpec = TestModelSpec {
        d_model: 128,
        heads: 2,
        encoder_layers: 2,
        decoder_layers: 2,
        bpe_vocab: 1000,
        seed: 0x5eed,
    };
    /// whisper-tiny's shape (39 M parameters with its real vocabulary), for
    /// benchmarks that should cost what the real model costs.
    pub const TINY: TestModelSpec = TestModelSpec {
        d_model: 384,
        heads: 6,
        encoder_layers: 4,
        decoder_layers: 4,
        bpe_vocab: 50_000,
        seed: 0x5eed,
    };
}

/// Writes `config.json`, `tokenizer.json` and `model.safetensors` for
/// `spec` into `dir` (created if missing).
pub fn generate_test_model(dir: &Path, spec: &TestModelSpec) -> Result<(), AsrError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e: std::io::Error| AsrError::Read {
            path: path.clone(),
            reason: e.to_string(),
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    let tokenizer = build_tokenizer(spec.bpe_vocab)?;
    save_tokenizer(&tokenizer, &dir.join("tokenizer.json"))?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);

    let config_json = serde_json::json!({
        "_name_or_path": "earshot/whisper-test",
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": spec.d_model,
        "encoder_attention_heads": spec.heads,
        "decoder_attention_heads": spec.heads,
        "encoder_layers": spec.encoder_layers,
        "decoder_layers": spec.decoder_layers,
        "encoder_ffn_dim": 4 * spec.d_model,
        "decoder_ffn_dim": 4 * spec.d_model,
        "num_hidden_layers": spec.encoder_layers,
        "num_mel_bins": 80,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "vocab_size": vocab_size,
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|endoftext|>"),
        "pad_token_id": id("<|endoftext|>"),
        "decoder_start_token_id": id("<|startoftranscript|>"),
        "begin_suppress_tokens": [id("<|endoftext|>")],
        "suppress_tokens": [],
        "scale_embedding": false,
        "torch_dtype": "float32",
        "use_cache": true,
        "earshot_generated": { "seed": spec.seed, "note": "random weights: output text is noise" },
    });
    let config_path = dir.join("config.json");
    let pretty = serde_json::to_vec_pretty(&config_json).map_err(|e| AsrError::Config {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&config_path, pretty).map_err(io(&config_path))?;
    let config: Config = serde_json::from_value(config_json).map_err(|e| AsrError::Config {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;

    let weights = dir.join("model.safetensors");
    write_weights(&weights, &config, spec.seed).map_err(|e| AsrError::Weights {
        path: weights.clone(),
        reason: e.to_string(),
    })
}

fn write_weights(path: &Path, config: &Config, seed: u64) -> candle_core::Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    // Creating the model registers every tensor it reads, with its name and
    // shape, in the var map.
    Whisper::load(&vb, config.clone())?;
    // Published checkpoints also carry the encoder's (sinusoidal) positional
    // embedding; candle recomputes it, other loaders read it.
    varmap.get(
        (config.max_source_positions, config.d_model),
        "model.encoder.embed_positions.weight",
        Init::Const(0.),
        DType::F32,
        &device,
    )?;

    save_seeded(&varmap, path, seed, &|name, dims| {
        name.ends_with("encoder.embed_positions.weight")
            .then(|| sinusoids(dims[0], dims[1]))
    })
}

/// Writes a tokenizer as `tokenizer.json` is published (not pretty).
pub(crate) fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<(), AsrError> {
    tokenizer
        .save(path, false)
        .map_err(|e| AsrError::Tokenizer {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Values for a tensor by name and shape, or `None` for the default fill.
pub(crate) type FixedValues<'a> = dyn Fn(&str, &[usize]) -> Option<Vec<f32>> + 'a;

/// Fills every tensor `varmap` registered with seeded values, as trained
/// models look: layer-norm weights 1, biases 0, the rest small normal
/// values, and whatever `fixed` returns for a name and shape; then writes
/// it as safetensors. Names are visited in order, so a seed always gives the
/// same file.
pub(crate) fn save_seeded(
    varmap: &VarMap,
    path: &Path,
    seed: u64,
    fixed: &FixedValues<'_>,
) -> candle_core::Result<()> {
    let device = Device::Cpu;
    let mut rng = SplitMix64(seed);
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?
        .clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let values: Vec<f32> = if let Some(v) = fixed(name, shape.dims()) {
            v
        } else if name.contains("layer_norm") && name.ends_with(".weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") || name.ends_with("_bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| 0.05 * rng.normal()).collect()
        };
        var.set(&Tensor::from_vec(values, shape, &device)?)?;
    }
    varmap.save(path)
}

/// Whisper's sinusoidal positional embedding (`sinusoids` in model.py).
fn sinusoids(length: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let increment = (10_000f64).ln() / (half.saturating_sub(1).max(1)) as f64;
    let mut out = Vec::with_capacity(length * channels);
    for t in 0..length {
        let row: Vec<f64> = (0..half)
            .map(|i| t as f64 * (-increment * i as f64).exp())
            .collect();
        out.extend(row.iter().map(|x| x.sin() as f32));
        out.extend(row.iter().map(|x| x.cos() as f32));
    }
    out
}

/// Whisper's special tokens, in the published order.
fn special_tokens() -> Vec<String> {
    let mut tokens = vec![
        "<|endoftext|>".to_owned(),
        "<|startoftranscript|>".to_owned(),
    ];
    tokens.extend(LANGUAGES.iter().map(|l| format!("<|{l}|>")));
    tokens.extend(
        [
            "<|translate|>",
            "<|transcribe|>",
            "<|startoflm|>",
            "<|startofprev|>",
            "<|nospeech|>",
            "<|notimestamps|>",
        ]
        .map(String::from),
    );
    tokens
}

fn build_tokenizer(bpe_vocab: usize) -> Result<Tokenizer, AsrError> {
    let err = |e: tokenizers::Error| AsrError::Tokenizer {
        path: "<generated>".into(),
        reason: e.to_string(),
    };
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(bpe_vocab)
        .min_frequency(1)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(
            &mut trainer,
            CORPUS.lines().filter(|l| !l.trim().is_empty()),
        )
        .map_err(err)?;
    let specials: Vec<AddedToken> = special_tokens()
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect();
    tokenizer.add_special_tokens(specials).map_err(err)?;
    Ok(tokenizer)
}

/// SplitMix64: a tiny, well-mixed seeded generator; enough for test weights
/// and stable across platforms and crate versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// Sizes of the tensors in a model directory's safetensors file, by name;
/// used by tests and by `earshot models inspect`.
pub fn tensor_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>, AsrError> {
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| AsrError::Weights {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(tensors
        .into_iter()
        .map(|(name, t)| (name, t.dims().to_vec()))
        .collect())
}

/// Training text for the test tokenizer: plain English about the project, so
/// the BPE merges look like an English vocabulary's.
const CORPUS: &str = "
The quick brown fox jumps over the lazy dog while the speech platform listens.
Clients stream audio to the nearest edge node, which detects speech and sends each utterance to a region.
Every region keeps a queue of utterances and a pool of workers that transcribe them with a model.
When a region fails, the edge tries the next region that the session's jurisdiction allows.
Audio from the European Union is processed only in regions inside the European Union.
Engineers publish new model versions, promote them to a canary, watch the error rate, and roll back in seconds.
The weather today is bright and cold, with a light wind from the north and clear skies in the evening.
Please call me back tomorrow morning at nine, and bring the documents we talked about on Monday.
She said that the meeting would start at half past ten and end before lunch.
Numbers like one, two, three, four, five, six, seven, eight, nine and ten appear in many sentences.
We measured the latency of every hop: the voice detector, the network, the queue and the model.
Nothing that was accepted may be lost, and every failure must say what went wrong and what to do next.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_are_whisper_s_ninety_nine() {
        assert_eq!(LANGUAGES.len(), 99);
        let unique: std::collections::HashSet<_> = LANGUAGES.iter().collect();
        assert_eq!(unique.len(), 99);
    }

    #[test]
    fn sinusoids_match_whisper_formula() {
        let s = sinusoids(3, 4);
        // t = 0: sin(0) = 0, cos(0) = 1.
        assert_eq!(&s[0..4], &[0.0, 0.0, 1.0, 1.0]);
        // t = 2, channel 1: increment = ln(10000) / 1, so 2 * exp(-ln 10000).
        let x = 2.0f64 * (-(10_000f64).ln()).exp();
        assert!((f64::from(s[8 + 1]) - x.sin()).abs() < 1e-7);
    }

    #[test]
    fn normal_samples_have_unit_variance() {
        let mut rng = SplitMix64(1);
        let xs: Vec<f64> = (0..100_000).map(|_| f64::from(rng.normal())).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
