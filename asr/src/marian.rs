//! Text translation with Marian MT (the opus-mt models) on candle, for
//! `translate=<lang>` targets other than English (Whisper translates speech
//! into English itself).
//!
//! A pair's directory holds the published Hugging Face files `config.json`
//! and `model.safetensors`, and the tokenizers as `tokenizer.json` (the
//! source side, which encodes) and `tokenizer-target.json` (the target side,
//! which decodes; where absent, `tokenizer.json` does both). opus-mt ships
//! SentencePiece files, which candle's `convert_slow_tokenizer.py` turns
//! into this format (docs/deploy.md).
//!
//! No opus-mt weights are reachable where earshot is built, so tests use
//! [`generate_test_model`]: the published tensor names and shapes, seeded
//! random values, a SentencePiece-style (unigram, metaspace) tokenizer.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::marian::{Config, MTModel};
use tokenizers::Tokenizer;

use crate::whisper::{AsrError, inference_device};

/// One language pair's model. `Sync`: each call decodes with its own copy
/// of the (shared, reference-counted) weights and its own key/value cache.
pub struct MarianModel {
    model: MTModel,
    config: Config,
    source: Tokenizer,
    target: Tokenizer,
    device: Device,
}

impl std::fmt::Debug for MarianModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarianModel")
            .field("d_model", &self.config.d_model)
            .field("vocab_size", &self.config.vocab_size)
            .finish_non_exhaustive()
    }
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, AsrError> {
    Tokenizer::from_file(path).map_err(|e| AsrError::Tokenizer {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl MarianModel {
    /// Loads a pair's directory onto [`inference_device`].
    pub fn load(dir: &Path) -> Result<Self, AsrError> {
        let config_path = dir.join("config.json");
        let config: Config = crate::whisper::read_json(&config_path)?;
        let heads_ok = crate::whisper::heads_fit(
            config.d_model,
            config.encoder_attention_heads,
            config.decoder_attention_heads,
        );
        if !heads_ok || config.max_position_embeddings < 2 || config.vocab_size == 0 {
            return Err(AsrError::Config {
                path: config_path,
                reason: "d_model must be a multiple of both head counts; vocabulary and positions must be set".into(),
            });
        }
        let source = load_tokenizer(&dir.join("tokenizer.json"))?;
        let target_path = dir.join("tokenizer-target.json");
        let target = if target_path.is_file() {
            load_tokenizer(&target_path)?
        } else {
            source.clone()
        };
        let device = inference_device();
        let (weights, vb) =
            crate::whisper::map_weights(dir, crate::whisper::inference_dtype(&device), &device)?;
        let model = MTModel::new(&config, vb).map_err(|e| AsrError::Weights {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
        Ok(MarianModel {
            model,
            config,
            source,
            target,
            device,
        })
    }

    /// Greedy translation of one text. Output is bounded: twice the
    /// source's tokens plus 16, and the model's positions.
    pub fn translate(&self, text: &str) -> Result<String, AsrError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(String::new());
        }
        let encoding = self
            .source
            .encode(text, false)
            .map_err(|e| AsrError::Decode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        ids.push(self.config.eos_token_id);
        let positions = self.config.max_position_embeddings;
        if ids.len() > positions {
            return Err(AsrError::TextTooLong {
                tokens: ids.len(),
                max: positions,
            });
        }
        let vocab = self
            .config
            .decoder_vocab_size
            .unwrap_or(self.config.vocab_size);
        // A fresh copy per call: the tensors are shared, the caches are not.
        let mut model = self.model.clone();
        model.reset_kv_cache();
        let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let encoded = model.encoder().forward(&input, 0)?;
        let max_new = (2 * ids.len() + 16).min(positions - 1);
        let mut tokens = vec![self.config.decoder_start_token_id];
        for step in 0..max_new {
            // The first step feeds the start token; then only the newest.
            let context = if step == 0 { 0 } else { tokens.len() - 1 };
            let input = Tensor::new(&tokens[context..], &self.device)?.unsqueeze(0)?;
            let logits = model.decode(&input, &encoded, context)?;
            let last = logits.dim(1)? - 1;
            let logits: Vec<f32> = logits.i((0, last))?.to_dtype(DType::F32)?.to_vec1()?;
            // The padding token is never an output (it is the decoder's
            // start symbol).
            let next = logits
                .iter()
                .take(vocab)
                .enumerate()
                .filter(|(i, _)| *i as u32 != self.config.pad_token_id)
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(self.config.eos_token_id);
            if next == self.config.eos_token_id || next == self.config.forced_eos_token_id {
                break;
            }
            tokens.push(next);
        }
        let text = self
            .target
            .decode(&tokens[1..], true)
            .map_err(|e| AsrError::Decode(e.to_string()))?;
        Ok(text.trim().to_owned())
    }
}

/// Writes a seeded Marian model (`config.json`, `tokenizer.json`,
/// `model.safetensors`) into `dir`: opus-mt's tensor names, a small shape,
/// random weights (its translations are noise).
pub fn generate_test_model(dir: &Path, seed: u64) -> Result<(), AsrError> {
    let io = |path: &Path, e: std::io::Error| AsrError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tokenizer = test_tokenizer()?;
    crate::generate::save_tokenizer(&tokenizer, &dir.join("tokenizer.json"))?;
    let vocab = tokenizer.get_vocab_size(true);
    // As opus-mt: `</s>` is 0, `<unk>` 1, `<pad>` the last id (and the
    // decoder's start).
    let pad = (vocab - 1) as u32;
    let config_json = serde_json::json!({
        "_name_or_path": "earshot/opus-mt-test",
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "activation_function": "swish",
        "d_model": 32,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 128,
        "vocab_size": vocab,
        "decoder_vocab_size": vocab,
        "decoder_start_token_id": pad,
        "pad_token_id": pad,
        "eos_token_id": 0,
        "forced_eos_token_id": 0,
        "scale_embedding": true,
        "share_encoder_decoder_embeddings": true,
        "is_encoder_decoder": true,
        "use_cache": true,
        "earshot_generated": { "seed": seed, "note": "random weights: translations are noise" },
    });
    let config_path = dir.join("config.json");
    let config: Config =
        serde_json::from_value(config_json.clone()).map_err(|e| AsrError::Config {
            path: config_path.clone(),
            reason: e.to_string(),
        })?;
    let pretty = serde_json::to_vec_pretty(&config_json).map_err(|e| AsrError::Config {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&config_path, pretty).map_err(|e| io(&config_path, e))?;
    let weights = dir.join("model.safetensors");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    MTModel::new(&config, vb)
        .and_then(|_| crate::generate::save_seeded(&varmap, &weights, seed, &|_, _| None))
        .map_err(|e| AsrError::Weights {
            path: weights.clone(),
            reason: e.to_string(),
        })
}

/// A SentencePiece-style tokenizer (unigram pieces, `▁` for spaces) over a
/// small vocabulary: every letter, digit and common punctuation mark with
/// and without the word-start mark, and a few whole words.
fn test_tokenizer() -> Result<Tokenizer, AsrError> {
    use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
    use tokenizers::models::unigram::Unigram;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let err = |e: tokenizers::Error| AsrError::Tokenizer {
        path: "<generated>".into(),
        reason: e.to_string(),
    };
    let mut pieces: Vec<(String, f64)> = vec![("</s>".into(), 0.0), ("<unk>".into(), 0.0)];
    for word in [
        "the", "a", "and", "to", "of", "in", "is", "it", "region", "speech",
    ] {
        pieces.push((format!("▁{word}"), -2.0));
    }
    pieces.push(("▁".into(), -3.0));
    let symbols = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(".,;:!?'\"-()".chars());
    for c in symbols {
        pieces.push((format!("▁{c}"), -5.0));
        pieces.push((c.to_string(), -6.0));
    }
    pieces.push(("<pad>".into(), 0.0));
    let unigram = Unigram::from(pieces, Some(1), false).map_err(err)?;
    let mut tokenizer = Tokenizer::new(unigram);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new(
        '▁',
        PrependScheme::Always,
        true,
    )));
    let specials = ["</s>", "<unk>", "<pad>"]
        .map(|t| tokenizers::AddedToken::from(t, true))
        .to_vec();
    tokenizer.add_special_tokens(specials).map_err(err)?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_loads_and_translates_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        generate_test_model(dir.path(), 7).unwrap();
        let model = MarianModel::load(dir.path()).unwrap();
        let first = model.translate("the region keeps its speech.").unwrap();
        let again = model.translate("the region keeps its speech.").unwrap();
        assert_eq!(first, again, "greedy decoding is deterministic");
        assert_eq!(model.translate("   ").unwrap(), "");
        // The same seed writes the same weights.
        let other = tempfile::tempdir().unwrap();
        generate_test_model(other.path(), 7).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("model.safetensors")).unwrap(),
            std::fs::read(other.path().join("model.safetensors")).unwrap()
        );
    }

    #[test]
    fn the_tokenizer_round_trips_text() {
        let t = test_tokenizer().unwrap();
        let text = "Every region keeps its own speech, 24 hours a day.";
        let ids = t.encode(text, false).unwrap().get_ids().to_vec();
        assert!(!ids.contains(&1), "no unknown pieces: {ids:?}");
        assert_eq!(t.decode(&ids, true).unwrap(), text);
    }

    #[test]
    fn over_long_text_and_broken_directories_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        generate_test_model(dir.path(), 7).unwrap();
        let model = MarianModel::load(dir.path()).unwrap();
        let long = "a ".repeat(400);
        assert!(matches!(
            model.translate(&long),
            Err(AsrError::TextTooLong { max: 128, .. })
        ));
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let e = MarianModel::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        assert!(matches!(
            MarianModel::load(dir.path()),
            Err(AsrError::Config { .. })
        ));
    }
}
