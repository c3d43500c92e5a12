//! Whisper on candle: load a model directory in the published layout and
//! transcribe 16 kHz mono audio with greedy decoding.
//!
//! A model directory holds `config.json`, `model.safetensors` and
//! `tokenizer.json`, exactly as published for `openai/whisper-*`; the
//! generated test models use the same layout.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::whisper::{self, Config, model::Whisper};
use tokenizers::Tokenizer;

use crate::mel;

/// Longest audio one call may transcribe: Whisper's window.
pub const MAX_SECONDS: f64 = 30.0;

#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} is not a Whisper config.json: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("cannot load tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenizer lacks the special token {0}")]
    MissingToken(&'static str),
    #[error("cannot load weights {path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("model config: {0}")]
    Shape(String),
    #[error("audio of {seconds:.1} s exceeds the {max:.0} s window")]
    TooLong { seconds: f64, max: f64 },
    #[error("inference failed: {0}")]
    Inference(#[from] candle_core::Error),
    #[error("cannot decode tokens: {0}")]
    Decode(String),
}

/// How much of Whisper's 30 s encoder window to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderWindow {
    /// Always 30 s, zero-padded, as Whisper was trained. Slowest, and the
    /// most accurate with real weights.
    #[default]
    Full,
    /// Only the frames the audio covers (the positional embedding is sliced
    /// to match). Far cheaper for short utterances.
    Fit,
}

/// The result of one transcription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    pub text: String,
    /// Generated token ids, without the prompt.
    pub tokens: Vec<u32>,
    /// The language token used (hinted or detected), e.g. `en`.
    pub language: Option<String>,
}

struct SpecialTokens {
    sot: u32,
    eot: u32,
    transcribe: u32,
    no_timestamps: u32,
    /// `(code, token id)` for each `<|xx|>` language token.
    languages: Vec<(String, u32)>,
}

/// A loaded Whisper model. Not `Sync`: decoding mutates the model's
/// attention caches, so each worker owns one.
pub struct WhisperModel {
    model: Whisper,
    tokenizer: Tokenizer,
    tokens: SpecialTokens,
    front: mel::LogMel,
    suppress: Tensor,
    /// `suppress`, and end-of-text too: Whisper never ends on the first
    /// token ("suppress blank").
    suppress_first: Tensor,
    device: Device,
    window: EncoderWindow,
    multilingual: bool,
}

impl std::fmt::Debug for WhisperModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperModel")
            .field("config", &self.model.config)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AsrError> {
    std::fs::read(path).map_err(|e| AsrError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads and checks a Whisper `config.json`.
pub fn load_config(dir: &Path) -> Result<Config, AsrError> {
    let path = dir.join("config.json");
    let config: Config = serde_json::from_slice(&read(&path)?).map_err(|e| AsrError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let heads_ok = config.encoder_attention_heads > 0
        && config.decoder_attention_heads > 0
        && config
            .d_model
            .is_multiple_of(config.encoder_attention_heads)
        && config
            .d_model
            .is_multiple_of(config.decoder_attention_heads);
    if !heads_ok || config.num_mel_bins == 0 || config.max_target_positions < 8 {
        return Err(AsrError::Config {
            path,
            reason: "d_model must be a multiple of both head counts, and mel bins and positions must be set".into(),
        });
    }
    Ok(config)
}

impl WhisperModel {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from
    /// `dir` onto the CPU.
    pub fn load(dir: &Path, window: EncoderWindow) -> Result<Self, AsrError> {
        let device = Device::Cpu;
        let config = load_config(dir)?;

        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| AsrError::Tokenizer {
            path: tokenizer_path.clone(),
            reason: e.to_string(),
        })?;
        let token = |name: &'static str| {
            tokenizer
                .token_to_id(name)
                .ok_or(AsrError::MissingToken(name))
        };
        let tokens = SpecialTokens {
            sot: token(whisper::SOT_TOKEN)?,
            eot: token(whisper::EOT_TOKEN)?,
            transcribe: token(whisper::TRANSCRIBE_TOKEN)?,
            no_timestamps: token(whisper::NO_TIMESTAMPS_TOKEN)?,
            languages: language_tokens(&tokenizer),
        };
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(AsrError::Shape(format!(
                "tokenizer has {vocab} tokens but the model only {}",
                config.vocab_size
            )));
        }
        // OpenAI's rule: English-only checkpoints have one token fewer.
        let multilingual = config.vocab_size != 51_864 && !tokens.languages.is_empty();

        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(AsrError::Read {
                path: weights,
                reason: "file not found".into(),
            });
        }
        // SAFETY: the file is memory-mapped read-only. Model directories are
        // immutable once activated (the registry writes new versions to new
        // directories), so the mapping is not modified underneath us.
        #[allow(unsafe_code)]
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], whisper::DTYPE, &device) }
                .map_err(|e| AsrError::Weights {
                    path: weights.clone(),
                    reason: e.to_string(),
                })?;
        let model = Whisper::load(&vb, config.clone()).map_err(|e| AsrError::Weights {
            path: weights.clone(),
            reason: e.to_string(),
        })?;

        let suppress = suppress_mask(&config, &tokenizer, &tokens, &[], &device)?;
        let suppress_first = suppress_mask(&config, &tokenizer, &tokens, &[tokens.eot], &device)?;
        Ok(WhisperModel {
            front: mel::LogMel::new(config.num_mel_bins),
            model,
            tokenizer,
            tokens,
            suppress,
            suppress_first,
            device,
            window,
            multilingual,
        })
    }

    pub fn config(&self) -> &Config {
        &self.model.config
    }

    /// Transcribes mono 16 kHz samples in [-1, 1]. `language` is a hint such
    /// as `en`; without one (or with one the model has no token for) a
    /// multilingual model detects the language.
    pub fn transcribe(
        &mut self,
        pcm: &[f32],
        language: Option<&str>,
    ) -> Result<Transcript, AsrError> {
        let seconds = pcm.len() as f64 / whisper::SAMPLE_RATE as f64;
        if seconds > MAX_SECONDS {
            return Err(AsrError::TooLong {
                seconds,
                max: MAX_SECONDS,
            });
        }
        let mel = self.mel(pcm)?;
        let features = self.model.encoder.forward(&mel, true)?;

        let mut prompt = vec![self.tokens.sot];
        let mut used_language = None;
        if self.multilingual {
            let hinted = language.and_then(|code| {
                self.tokens
                    .languages
                    .iter()
                    .find(|(c, _)| c == code)
                    .cloned()
            });
            let (code, id) = match hinted {
                Some(found) => found,
                None => self.detect_language(&features)?,
            };
            prompt.push(id);
            prompt.push(self.tokens.transcribe);
            used_language = Some(code);
        }
        prompt.push(self.tokens.no_timestamps);

        let generated = self.greedy(
            &features,
            &prompt,
            max_new_tokens(seconds, &self.model.config, prompt.len()),
        )?;
        let text = self
            .tokenizer
            .decode(&generated, true)
            .map_err(|e| AsrError::Decode(e.to_string()))?;
        Ok(Transcript {
            text: text.trim().to_owned(),
            tokens: generated,
            language: used_language,
        })
    }

    fn mel(&self, pcm: &[f32]) -> Result<Tensor, AsrError> {
        let n_mels = self.model.config.num_mel_bins;
        let max_frames = 2 * self.model.config.max_source_positions;
        let frames = match self.window {
            EncoderWindow::Full => max_frames,
            // Frames the audio covers, rounded up to the conv stride of 2.
            EncoderWindow::Fit => {
                let covered = pcm.len().div_ceil(mel::HOP).max(2);
                (covered + covered % 2).min(max_frames)
            }
        };
        let mel = self.front.compute(pcm, frames);
        Ok(Tensor::from_vec(mel, (1, n_mels, frames), &self.device)?)
    }

    fn detect_language(&mut self, features: &Tensor) -> Result<(String, u32), AsrError> {
        let tokens = Tensor::new(&[[self.tokens.sot]], &self.device)?;
        let ys = self.model.decoder.forward(&tokens, features, true)?;
        let logits = self
            .model
            .decoder
            .final_linear(&ys.i((..1, 0..1))?)?
            .i(0)?
            .i(0)?;
        let logits: Vec<f32> = logits.to_vec1()?;
        let best = self
            .tokens
            .languages
            .iter()
            .filter(|(_, id)| (*id as usize) < logits.len())
            .max_by(|(_, a), (_, b)| logits[*a as usize].total_cmp(&logits[*b as usize]));
        best.cloned()
            .ok_or(AsrError::MissingToken("<|en|> (any language token)"))
    }

    fn greedy(
        &mut self,
        features: &Tensor,
        prompt: &[u32],
        max_new: usize,
    ) -> Result<Vec<u32>, AsrError> {
        let mut tokens = prompt.to_vec();
        for step in 0..max_new {
            let input = Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(0)?;
            let ys = self.model.decoder.forward(&input, features, step == 0)?;
            let last = ys.dim(1)? - 1;
            let logits = self
                .model
                .decoder
                .final_linear(&ys.i((..1, last..))?)?
                .i(0)?
                .i(0)?;
            let bias = if step == 0 {
                &self.suppress_first
            } else {
                &self.suppress
            };
            let logits = logits.broadcast_add(bias)?;
            let next = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if next == self.tokens.eot {
                break;
            }
            tokens.push(next);
        }
        Ok(tokens.split_off(prompt.len()))
    }
}

/// Bounds decoding: the decoder's context, and a generous speech rate (real
/// speech stays well under 10 tokens a second), which stops a model that
/// never emits end-of-text from running away.
fn max_new_tokens(seconds: f64, config: &Config, prompt: usize) -> usize {
    let by_context = (config.max_target_positions / 2).saturating_sub(prompt);
    let by_rate = 8 + (seconds * 10.0).ceil() as usize;
    by_context.min(by_rate)
}

fn language_tokens(tokenizer: &Tokenizer) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter_map(|(id, t)| {
            let code = t.content.strip_prefix("<|")?.strip_suffix("|>")?;
            let is_lang =
                (2..=3).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_lowercase());
            is_lang.then(|| (code.to_owned(), id))
        })
        .collect();
    out.sort_by_key(|(_, id)| *id);
    out
}

/// Logit bias: -inf for tokens Whisper never samples while transcribing
/// without timestamps: the config's `suppress_tokens`, every special token
/// except end-of-text, and every timestamp token.
fn suppress_mask(
    config: &Config,
    tokenizer: &Tokenizer,
    tokens: &SpecialTokens,
    also: &[u32],
    device: &Device,
) -> Result<Tensor, AsrError> {
    let mut mask = vec![0f32; config.vocab_size];
    let mut ban = |id: u32| {
        if let Some(m) = mask.get_mut(id as usize) {
            *m = f32::NEG_INFINITY;
        }
    };
    config.suppress_tokens.iter().copied().for_each(&mut ban);
    also.iter().copied().for_each(&mut ban);
    for (id, token) in tokenizer.get_added_tokens_decoder() {
        if token.special && id != tokens.eot {
            ban(id);
        }
    }
    // Timestamp tokens follow <|notimestamps|> in every Whisper vocabulary,
    // as do unused padding ids up to vocab_size.
    (tokens.no_timestamps..config.vocab_size as u32).for_each(&mut ban);
    Ok(Tensor::from_vec(mask, config.vocab_size, device)?.to_dtype(DType::F32)?)
}
