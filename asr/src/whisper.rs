//! Whisper on candle: load a model directory in the published layout and
//! transcribe (or translate) 16 kHz mono audio with greedy decoding,
//! language detection, and OpenAI's hallucination guards.
//!
//! A model directory holds `config.json`, `model.safetensors` and
//! `tokenizer.json`, exactly as published for `openai/whisper-*`; the
//! generated test models use the same layout.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::whisper::{self, Config};
use candle_transformers::quantized_var_builder::VarBuilder as GgufVarBuilder;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::align::{self, Word};
use crate::mel;
use crate::net::{DecodeState, Net, Weights};

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
    #[error("text of {tokens} tokens exceeds the model's {max} positions")]
    TextTooLong { tokens: usize, max: usize },
    #[error("batch inference failed: {0}")]
    Batch(String),
}

/// How much of Whisper's 30 s encoder window to run. Written `full`, `fit`
/// or `<seconds>s` (e.g. `10s`) in configuration and on the command line.
/// The default is `10s`: on real tiny.en and base its word error rate was
/// within a point of the full window's at a third of the cost
/// (docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum EncoderWindow {
    /// Always 30 s, zero-padded, as Whisper was trained.
    Full,
    /// Only the frames the audio covers (the positional embedding is sliced
    /// to match). Far cheaper for short utterances, and far less accurate
    /// on real weights.
    Fit,
    /// The audio zero-padded to the next multiple of this many seconds
    /// (10 s: 3.2 s of speech is encoded as 10 s, 12 s as 20 s), up to 30.
    Padded(u8),
}

impl Default for EncoderWindow {
    fn default() -> Self {
        EncoderWindow::Padded(10)
    }
}

impl std::str::FromStr for EncoderWindow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(EncoderWindow::Full),
            "fit" => Ok(EncoderWindow::Fit),
            other => other
                .strip_suffix('s')
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| (1..=30).contains(n))
                .map(EncoderWindow::Padded)
                .ok_or_else(|| {
                    format!("encoder window {other:?}: use full, fit, or 1s to 30s (e.g. 10s)")
                }),
        }
    }
}

impl TryFrom<String> for EncoderWindow {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<EncoderWindow> for String {
    fn from(w: EncoderWindow) -> String {
        w.to_string()
    }
}

impl std::fmt::Display for EncoderWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncoderWindow::Full => f.write_str("full"),
            EncoderWindow::Fit => f.write_str("fit"),
            EncoderWindow::Padded(s) => write!(f, "{s}s"),
        }
    }
}

/// What Whisper is asked to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    /// Text in the language spoken.
    #[default]
    Transcribe,
    /// English text, whatever the language spoken (multilingual models).
    Translate,
}

/// Why a decode's text was withheld.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// The no-speech probability is high and the text unlikely: silence or
    /// noise, not speech.
    NoSpeech,
    /// The text compresses too well (gzip ratio above the threshold): the
    /// model is looping.
    Repetition,
    /// The tokens are too unlikely to be a transcript (a pure tone, say).
    LowConfidence,
    /// Decoding reached the ceiling on tokens per second of audio without
    /// ending: a runaway.
    TokenCeiling,
}

impl Withheld {
    pub const ALL: [Withheld; 4] = [
        Withheld::NoSpeech,
        Withheld::Repetition,
        Withheld::LowConfidence,
        Withheld::TokenCeiling,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Withheld::NoSpeech => "no_speech",
            Withheld::Repetition => "repetition",
            Withheld::LowConfidence => "low_confidence",
            Withheld::TokenCeiling => "token_ceiling",
        }
    }
}

/// Whisper's hallucination guards: OpenAI's three, and two stricter ones
/// for audio that reaches a worker without a voice detector in front (the
/// thresholds are from real tiny.en and base on silence, noise and tones,
/// measured in docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guards {
    /// Text is withheld when the no-speech probability exceeds this...
    pub no_speech: f32,
    /// ...and the average log-probability of the tokens is below this
    /// (OpenAI's rule).
    pub logprob: f32,
    /// Text is withheld whatever its log-probability when the no-speech
    /// probability exceeds this (Whisper says "you" to silence with -0.4).
    pub certain_no_speech: f32,
    /// Text whose average log-probability is below this is withheld.
    pub min_logprob: f32,
    /// Text whose gzip compression ratio exceeds this is a loop.
    pub compression_ratio: f32,
    /// Withhold a decode that reached the token ceiling without ending.
    pub token_ceiling: bool,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            no_speech: 0.6,
            logprob: -1.0,
            certain_no_speech: 0.8,
            min_logprob: -2.0,
            compression_ratio: 2.4,
            token_ceiling: true,
        }
    }
}

impl Guards {
    /// No guard at all: every decode's text goes out (for models with
    /// random weights, whose output is noise by construction).
    pub const OFF: Guards = Guards {
        no_speech: f32::INFINITY,
        logprob: f32::NEG_INFINITY,
        certain_no_speech: f32::INFINITY,
        min_logprob: f32::NEG_INFINITY,
        compression_ratio: f32::INFINITY,
        token_ceiling: false,
    };

    /// Which guard, if any, withholds a decode with these measurements.
    pub fn judge(
        &self,
        ended: bool,
        compression_ratio: f32,
        no_speech: f32,
        avg_logprob: f32,
    ) -> Option<Withheld> {
        if !ended && self.token_ceiling {
            Some(Withheld::TokenCeiling)
        } else if compression_ratio > self.compression_ratio {
            Some(Withheld::Repetition)
        } else if (no_speech > self.no_speech && avg_logprob < self.logprob)
            || no_speech > self.certain_no_speech
        {
            Some(Withheld::NoSpeech)
        } else if avg_logprob < self.min_logprob {
            Some(Withheld::LowConfidence)
        } else {
            None
        }
    }
}

/// The result of one decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    /// Empty when `withheld` says why.
    pub text: String,
    /// Generated token ids, without the prompt (empty when withheld).
    pub tokens: Vec<u32>,
    /// The language token used (hinted or detected), e.g. `en`.
    pub language: Option<String>,
    /// Probability of the detected language; `None` when it was given.
    pub language_probability: Option<f32>,
    /// Probability of `<|nospeech|>` at the start of the transcript.
    pub no_speech_probability: f32,
    /// Mean log-probability of the generated tokens and end-of-text.
    pub avg_logprob: f32,
    /// gzip compression ratio of the text.
    pub compression_ratio: f32,
    pub withheld: Option<Withheld>,
    /// The text split at Whisper's timestamps, when they were asked for
    /// (empty otherwise, and when withheld).
    pub segments: Vec<Segment>,
    /// Each word and when it was spoken, when asked for (empty otherwise,
    /// and when withheld).
    pub words: Vec<Word>,
}

/// A transcript and, when asked for, Whisper's English translation of the
/// same audio (encoded once, decoded twice).
#[derive(Debug, Clone, PartialEq)]
pub struct Recognition {
    pub transcript: Transcript,
    pub translation: Option<Transcript>,
}

/// One utterance of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Utterance<'a> {
    /// Mono 16 kHz samples in [-1, 1], at most [`MAX_SECONDS`].
    pub pcm: &'a [f32],
    /// A language hint such as `en`; `None` detects it.
    pub language: Option<&'a str>,
    /// Also decode Whisper's English translation.
    pub translate: bool,
    /// Decode with timestamp tokens and return the transcript's segments.
    pub timestamps: bool,
    /// Also time each word (from the alignment heads' cross-attention).
    pub words: bool,
}

/// One row of a batched decode: its language hint and audio length.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub language: Option<&'a str>,
    pub seconds: f64,
    /// Decode with timestamp tokens (Whisper's timestamp rules) and split
    /// the text into segments.
    pub timestamps: bool,
    /// Time each word of the transcript.
    pub words: bool,
}

/// A stretch of the transcript between two timestamp tokens; times are
/// seconds from the start of the audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub start: f32,
    pub end: f32,
    pub text: String,
}

/// A transcript aligned to its audio.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Alignment {
    /// `(row, position)` pairs of the dynamic time warping path: row 0
    /// predicts the first text token, the last row end-of-text; positions
    /// are 20 ms apart.
    pub path: Vec<(usize, usize)>,
    pub words: Vec<Word>,
}

/// A row's progress while a batch decodes.
struct Row {
    language: String,
    language_probability: Option<f32>,
    no_speech: f32,
    max_new: usize,
    generated: Vec<u32>,
    /// The probability of each generated token when it was chosen.
    probabilities: Vec<f32>,
    sum_logprob: f64,
    ended: bool,
    /// Ended, or reached its token ceiling.
    done: bool,
    seconds: f64,
}

/// Time spent per stage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub mel: std::time::Duration,
    pub encoder: std::time::Duration,
    pub decoder: std::time::Duration,
}

struct SpecialTokens {
    sot: u32,
    eot: u32,
    transcribe: u32,
    translate: Option<u32>,
    no_timestamps: u32,
    /// `<|0.00|>`: timestamp tokens run from here in steps of 20 ms.
    timestamp_begin: u32,
    no_speech: Option<u32>,
    /// `(code, token id)` for each `<|xx|>` language token.
    languages: Vec<(String, u32)>,
}

/// Fields of `generation_config.json` (or `config.json`) the decoder uses.
#[derive(Debug, Default, serde::Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    begin_suppress_tokens: Option<Vec<u32>>,
    #[serde(default)]
    suppress_tokens: Option<Vec<u32>>,
    /// `(decoder layer, head)` pairs whose cross-attention follows the
    /// audio, for word timestamps.
    #[serde(default)]
    alignment_heads: Option<Vec<(usize, usize)>>,
}

/// A loaded Whisper model. `Sync`: the weights are immutable and every call
/// decodes with its own state, so workers may share one.
pub struct WhisperModel {
    net: Net,
    config: Config,
    tokenizer: Tokenizer,
    tokens: SpecialTokens,
    front: mel::LogMel,
    /// Tokens never sampled: the configured suppress list, special tokens
    /// but end-of-text, timestamps.
    suppress: Vec<u32>,
    /// Also suppressed at the first step ("suppress blank"): end-of-text and
    /// the bare space.
    suppress_first: Vec<u32>,
    /// `suppress` and `suppress_first` with the timestamp tokens allowed.
    suppress_timed: [Vec<u32>; 2],
    window: EncoderWindow,
    multilingual: bool,
    guards: Guards,
    /// The cross-attention heads word timestamps read.
    alignment_heads: Vec<(usize, usize)>,
}

impl std::fmt::Debug for WhisperModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperModel")
            .field("config", &self.config)
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

/// Maps `dir/model.safetensors` for loading in `dtype` on `device`.
pub(crate) fn map_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(PathBuf, VarBuilder<'static>), AsrError> {
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
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }.map_err(
        |e| AsrError::Weights {
            path: weights.clone(),
            reason: e.to_string(),
        },
    )?;
    Ok((weights, vb))
}

/// Whether a transformer's width splits into both stacks' heads.
pub(crate) fn heads_fit(d_model: usize, encoder_heads: usize, decoder_heads: usize) -> bool {
    d_model > 0
        && encoder_heads > 0
        && decoder_heads > 0
        && d_model.is_multiple_of(encoder_heads)
        && d_model.is_multiple_of(decoder_heads)
}

/// Reads and parses a JSON file, naming it in any error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, AsrError> {
    serde_json::from_slice(&read(path)?).map_err(|e| AsrError::Config {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads and checks a Whisper `config.json`.
pub fn load_config(dir: &Path) -> Result<Config, AsrError> {
    Ok(read_config(dir)?.1)
}

/// `config.json` as its raw JSON (for the fields earshot adds) and as the
/// checked [`Config`]; the file is read once.
fn read_config(dir: &Path) -> Result<(serde_json::Value, Config), AsrError> {
    let path = dir.join("config.json");
    let raw: serde_json::Value = read_json(&path)?;
    let invalid = |reason: String| AsrError::Config {
        path: path.clone(),
        reason,
    };
    let config = Config::deserialize(&raw).map_err(|e| invalid(e.to_string()))?;
    let heads_ok = heads_fit(
        config.d_model,
        config.encoder_attention_heads,
        config.decoder_attention_heads,
    );
    if !heads_ok || config.num_mel_bins == 0 || config.max_target_positions < 8 {
        return Err(invalid(
            "d_model must be a multiple of both head counts, and mel bins and positions must be set".into(),
        ));
    }
    Ok((raw, config))
}

/// `generation_config.json` where the directory has one with the decoder's
/// fields (as published), else the same fields from `config.json` (`raw`).
fn load_generation(dir: &Path, raw: &serde_json::Value) -> Result<GenerationConfig, AsrError> {
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let g: GenerationConfig = read_json(&path)?;
        if g.begin_suppress_tokens.is_some() || g.suppress_tokens.is_some() {
            return Ok(g);
        }
    }
    GenerationConfig::deserialize(raw).map_err(|e| AsrError::Config {
        path: dir.join("config.json"),
        reason: e.to_string(),
    })
}

impl WhisperModel {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from
    /// `dir` onto [`inference_device`] (the CPU unless built with `cuda`
    /// and a GPU is present). A directory with `model.gguf` instead (the
    /// edge tier, [`crate::quantize`]) loads its quantized weights on the
    /// CPU.
    pub fn load(dir: &Path, window: EncoderWindow) -> Result<Self, AsrError> {
        let gguf = dir.join(crate::quantize::GGUF_FILE);
        let quantized = gguf.is_file() && !dir.join("model.safetensors").is_file();
        let device = if quantized {
            Device::Cpu
        } else {
            inference_device()
        };
        let dtype = inference_dtype(&device);
        let (raw, config) = read_config(dir)?;
        let generation = load_generation(dir, &raw)?;
        // A generated model (its config.json says so) speaks noise by
        // construction: the guards would withhold all of it, and the tests
        // that use one check plumbing, not words.
        let generated = raw.get("earshot_generated").is_some();

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
            translate: tokenizer.token_to_id(whisper::TRANSLATE_TOKEN),
            no_timestamps: token(whisper::NO_TIMESTAMPS_TOKEN)?,
            timestamp_begin: token(whisper::NO_TIMESTAMPS_TOKEN)? + 1,
            no_speech: whisper::NO_SPEECH_TOKENS
                .iter()
                .find_map(|t| tokenizer.token_to_id(t)),
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

        let (weights, vb) = if quantized {
            let vb = GgufVarBuilder::from_gguf(&gguf, &device).map_err(|e| AsrError::Weights {
                path: gguf.clone(),
                reason: e.to_string(),
            })?;
            (gguf, Weights::Gguf(vb))
        } else {
            let (path, vb) = map_weights(dir, dtype, &device)?;
            (path, Weights::Float(vb))
        };
        let net = Net::load(&vb, &config).map_err(|e| AsrError::Weights {
            path: weights.clone(),
            reason: e.to_string(),
        })?;

        let mut suppress: Vec<u32> = generation
            .suppress_tokens
            .clone()
            .unwrap_or_else(|| config.suppress_tokens.clone());
        for (id, token) in tokenizer.get_added_tokens_decoder() {
            if token.special && id != tokens.eot {
                suppress.push(id);
            }
        }
        // Timestamp tokens follow <|notimestamps|> in every Whisper
        // vocabulary, as do unused padding ids up to vocab_size.
        suppress.extend(tokens.no_timestamps..config.vocab_size as u32);
        suppress.retain(|&id| (id as usize) < config.vocab_size);
        suppress.sort_unstable();
        suppress.dedup();
        let mut suppress_first = suppress.clone();
        match &generation.begin_suppress_tokens {
            Some(ids) => suppress_first.extend(ids),
            None => {
                suppress_first.push(tokens.eot);
                if let Some(space) = tokenizer.token_to_id("Ġ") {
                    suppress_first.push(space);
                }
            }
        }
        suppress_first.retain(|&id| (id as usize) < config.vocab_size);
        // With timestamps the same, but the timestamp tokens allowed.
        let last_timestamp = tokens.timestamp_begin + TIMESTAMPS;
        let allow_timestamps = |ids: &[u32]| -> Vec<u32> {
            ids.iter()
                .copied()
                .filter(|id| !(tokens.timestamp_begin..=last_timestamp).contains(id))
                .collect()
        };
        let suppress_timed = [
            allow_timestamps(&suppress),
            allow_timestamps(&suppress_first),
        ];
        let alignment_heads =
            alignment_heads(generation.alignment_heads, &config).map_err(|reason| {
                AsrError::Config {
                    path: dir.join("generation_config.json"),
                    reason,
                }
            })?;
        Ok(WhisperModel {
            alignment_heads,
            front: mel::LogMel::new(config.num_mel_bins),
            net,
            config,
            tokenizer,
            tokens,
            suppress,
            suppress_first,
            suppress_timed,
            window,
            multilingual,
            guards: if generated {
                Guards::OFF
            } else {
                Guards::default()
            },
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn is_multilingual(&self) -> bool {
        self.multilingual
    }

    /// Tokens suppressed at every step (the first step also suppresses
    /// end-of-text and the bare space); with timestamps, all but those.
    pub fn suppressed_tokens(&self, timestamps: bool) -> &[u32] {
        if timestamps {
            &self.suppress_timed[0]
        } else {
            &self.suppress
        }
    }

    /// The decoder prompt after `<|startoftranscript|>` for a language
    /// token (multilingual models) and task, ending in `<|notimestamps|>`
    /// unless timestamps are wanted.
    pub fn prompt_after_sot(
        &self,
        language: Option<u32>,
        task: Task,
        timestamps: bool,
    ) -> Vec<u32> {
        let mut prompt = Vec::with_capacity(3);
        if let Some(id) = language.filter(|_| self.multilingual) {
            prompt.push(id);
            prompt.push(match task {
                Task::Transcribe => self.tokens.transcribe,
                Task::Translate => self.tokens.translate.unwrap_or(self.tokens.transcribe),
            });
        }
        if !timestamps {
            prompt.push(self.tokens.no_timestamps);
        }
        prompt
    }

    /// The token id of `<|startoftranscript|>`.
    pub fn sot_token(&self) -> u32 {
        self.tokens.sot
    }

    /// The token id of `<|endoftext|>`; text tokens are below it.
    pub fn eot_token(&self) -> u32 {
        self.tokens.eot
    }

    /// The token id of a language code's `<|xx|>`.
    pub fn language_token(&self, code: &str) -> Option<u32> {
        self.tokens
            .languages
            .iter()
            .find(|(c, _)| c == code)
            .map(|(_, id)| *id)
    }

    /// Replaces the hallucination guards' thresholds.
    pub fn set_guards(&mut self, guards: Guards) {
        self.guards = guards;
    }

    /// Transcribes mono 16 kHz samples in [-1, 1]. `language` is a hint such
    /// as `en`; without one (or with one the model has no token for) a
    /// multilingual model detects the language.
    pub fn transcribe(&self, pcm: &[f32], language: Option<&str>) -> Result<Transcript, AsrError> {
        Ok(self.recognize(pcm, language, false)?.0.transcript)
    }

    /// Transcribes `pcm` and, with `translate`, also decodes Whisper's
    /// English translation of it (multilingual models only; the audio is
    /// encoded once).
    pub fn recognize(
        &self,
        pcm: &[f32],
        language: Option<&str>,
        translate: bool,
    ) -> Result<(Recognition, Timings), AsrError> {
        let (mut results, timings) = self.recognize_batch(&[Utterance {
            pcm,
            language,
            translate,
            timestamps: false,
            words: false,
        }]);
        let result = results
            .pop()
            .ok_or_else(|| AsrError::Batch("no result".into()))?;
        Ok((result?, timings))
    }

    /// Recognises several utterances together: those whose log-mels have
    /// the same length are encoded as one batch and decoded in lockstep
    /// (each decoding step reads the weights once for the whole batch). The
    /// results are in the order of `items`; one utterance's bad input fails
    /// only that utterance.
    pub fn recognize_batch(
        &self,
        items: &[Utterance<'_>],
    ) -> (Vec<Result<Recognition, AsrError>>, Timings) {
        let mut timings = Timings::default();
        let mut results: Vec<Option<Result<Recognition, AsrError>>> =
            items.iter().map(|_| None).collect();
        // Log-mels, grouped by frame count.
        let t0 = std::time::Instant::now();
        let mut groups: Vec<(usize, Vec<(usize, Tensor)>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match self.mel(item.pcm) {
                Ok(mel) => {
                    let frames = mel.dim(2).unwrap_or(0);
                    match groups.iter_mut().find(|(f, _)| *f == frames) {
                        Some((_, g)) => g.push((i, mel)),
                        None => groups.push((frames, vec![(i, mel)])),
                    }
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        timings.mel = t0.elapsed();
        for (_, group) in groups {
            let (indices, mels): (Vec<usize>, Vec<Tensor>) = group.into_iter().unzip();
            let members: Vec<&Utterance<'_>> = indices.iter().map(|&i| &items[i]).collect();
            match self.recognize_group(&mels, &members, &mut timings) {
                Ok(recognitions) => {
                    for (i, r) in indices.into_iter().zip(recognitions) {
                        results[i] = Some(Ok(r));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for i in indices {
                        results[i] = Some(Err(AsrError::Batch(message.clone())));
                    }
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(AsrError::Batch("not recognised".into()))))
            .collect();
        (results, timings)
    }

    /// Encodes log-mels of one length together and decodes their
    /// transcripts (and translations, for those that ask) in lockstep.
    fn recognize_group(
        &self,
        mels: &[Tensor],
        items: &[&Utterance<'_>],
        timings: &mut Timings,
    ) -> Result<Vec<Recognition>, AsrError> {
        let t1 = std::time::Instant::now();
        // On a GPU the batch is one product. On the CPU one utterance's
        // window already fills the matrix kernels, and a batch's attention
        // scores (rows x heads x positions^2) fall out of the cache: row by
        // row measured faster (docs/benchmarks.md).
        let features = if self.net.device().is_cpu() {
            let rows = mels
                .iter()
                .map(|m| self.net.encode(m))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            self.net.encode(&Tensor::cat(mels, 0)?)?
        };
        timings.encoder += t1.elapsed();
        let t2 = std::time::Instant::now();
        let requests: Vec<Request<'_>> = items
            .iter()
            .map(|u| Request {
                language: u.language,
                seconds: u.pcm.len() as f64 / whisper::SAMPLE_RATE as f64,
                timestamps: u.timestamps,
                words: u.words,
            })
            .collect();
        let mut transcripts = self.decode_batch(&features, &requests, Task::Transcribe)?;
        for (t, item) in transcripts.iter_mut().zip(items) {
            align::snap_to_voice(&mut t.words, item.pcm, whisper::SAMPLE_RATE as u32);
        }
        // Speech asked to be translated (by a model that can): decoded
        // again with the translate task, in the language just found.
        let can_translate = self.multilingual && self.tokens.translate.is_some();
        let wanted: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].translate && can_translate && transcripts[i].withheld.is_none())
            .collect();
        let mut translations: Vec<Option<Transcript>> = vec![None; items.len()];
        if !wanted.is_empty() {
            let subset = select_rows(&features, &wanted)?;
            let requests: Vec<Request<'_>> = wanted
                .iter()
                .map(|&i| Request {
                    language: transcripts[i].language.as_deref(),
                    seconds: requests[i].seconds,
                    timestamps: false,
                    words: false,
                })
                .collect();
            let decoded = self.decode_batch(&subset, &requests, Task::Translate)?;
            for (&i, mut t) in wanted.iter().zip(decoded) {
                t.language_probability = transcripts[i].language_probability;
                translations[i] = Some(t);
            }
        }
        timings.decoder += t2.elapsed();
        Ok(transcripts
            .into_iter()
            .zip(translations)
            .zip(items)
            .map(|((transcript, translation), item)| {
                // Not speech: nothing to translate either.
                let translation = match translation {
                    Some(t) => Some(t),
                    None if item.translate && transcript.withheld.is_some() => {
                        Some(transcript.clone())
                    }
                    None => None,
                };
                Recognition {
                    transcript,
                    translation,
                }
            })
            .collect())
    }

    /// The log-mel of `pcm` as the encoder's input `(1, n_mels, frames)`.
    pub fn mel(&self, pcm: &[f32]) -> Result<Tensor, AsrError> {
        let seconds = pcm.len() as f64 / whisper::SAMPLE_RATE as f64;
        if seconds > MAX_SECONDS {
            return Err(AsrError::TooLong {
                seconds,
                max: MAX_SECONDS,
            });
        }
        let n_mels = self.config.num_mel_bins;
        let max_frames = 2 * self.config.max_source_positions;
        // Frames the audio covers, rounded up to the conv stride of 2.
        let covered = pcm.len().div_ceil(mel::HOP).max(2);
        let covered = covered + covered % 2;
        let frames = match self.window {
            EncoderWindow::Full => max_frames,
            EncoderWindow::Fit => covered.min(max_frames),
            EncoderWindow::Padded(s) => {
                let step = usize::from(s.max(1)) * 100;
                covered
                    .div_ceil(step)
                    .max(1)
                    .saturating_mul(step)
                    .min(max_frames)
            }
        };
        let mel = self.front.compute(pcm, frames);
        Ok(
            Tensor::from_vec(mel, (1, n_mels, frames), self.net.device())?
                .to_dtype(self.net.dtype())?,
        )
    }

    /// Runs the encoder on a log-mel `(B, n_mels, frames)`.
    pub fn encode(&self, mel: &Tensor) -> Result<Tensor, AsrError> {
        Ok(self.net.encode(mel)?)
    }

    /// Greedy decoding of one task from encoded audio `(1, S, D)`, with the
    /// guards.
    pub fn decode(
        &self,
        features: &Tensor,
        language: Option<&str>,
        task: Task,
        seconds: f64,
    ) -> Result<Transcript, AsrError> {
        let request = Request {
            language,
            seconds,
            timestamps: false,
            words: false,
        };
        self.decode_batch(features, &[request], task)?
            .pop()
            .ok_or_else(|| AsrError::Batch("no transcript".into()))
    }

    /// Greedy decoding of one task for each row of encoded audio
    /// `(B, S, D)`. Rows with and without timestamps (whose prompts differ
    /// in length) decode as two lockstep batches.
    pub fn decode_batch(
        &self,
        features: &Tensor,
        requests: &[Request<'_>],
        task: Task,
    ) -> Result<Vec<Transcript>, AsrError> {
        let timed: Vec<usize> = (0..requests.len())
            .filter(|&i| requests[i].timestamps)
            .collect();
        if timed.is_empty() || timed.len() == requests.len() {
            return self.decode_lockstep(features, requests, task);
        }
        let mut out: Vec<Option<Transcript>> = vec![None; requests.len()];
        let untimed: Vec<usize> = (0..requests.len())
            .filter(|&i| !requests[i].timestamps)
            .collect();
        for rows in [untimed, timed] {
            let subset: Vec<Request<'_>> = rows.iter().map(|&i| requests[i]).collect();
            let decoded = self.decode_lockstep(&select_rows(features, &rows)?, &subset, task)?;
            for (&i, t) in rows.iter().zip(decoded) {
                out[i] = Some(t);
            }
        }
        out.into_iter()
            .map(|t| t.ok_or_else(|| AsrError::Batch("row not decoded".into())))
            .collect()
    }

    /// Greedy decoding in lockstep: every row's prompt has the same length,
    /// a row that has ended is fed end-of-text until the last one ends, and
    /// each row keeps its own token ceiling, timestamp rules and guards.
    fn decode_lockstep(
        &self,
        features: &Tensor,
        requests: &[Request<'_>],
        task: Task,
    ) -> Result<Vec<Transcript>, AsrError> {
        let batch = requests.len();
        let timestamps = requests.first().is_some_and(|r| r.timestamps);
        if features.dim(0)? != batch {
            return Err(AsrError::Batch(format!(
                "{} rows of audio for {batch} requests",
                features.dim(0)?
            )));
        }
        let device = self.net.device();
        let mut state = self.net.start(features)?;
        // Logits at <|startoftranscript|>: the no-speech probability, and
        // the language when it is detected.
        let sot = Tensor::new(vec![self.tokens.sot; batch], device)?.unsqueeze(1)?;
        let hidden = self.net.step(&mut state, &sot)?;
        let sot_logits: Vec<Vec<f32>> = self.net.logits_at(&hidden, 0)?.to_vec2()?;
        let mut rows = Vec::with_capacity(batch);
        let mut prompts = Vec::with_capacity(batch);
        for (request, logits) in requests.iter().zip(&sot_logits) {
            let (language, language_id, language_probability) = if self.multilingual {
                let hinted = request
                    .language
                    .and_then(|code| Some((code.to_owned(), self.language_token(code)?)));
                match hinted {
                    Some((code, id)) => (code, Some(id), None),
                    None => {
                        let (code, id, p) = self.detect_language(logits)?;
                        (code, Some(id), Some(p))
                    }
                }
            } else {
                ("en".to_owned(), None, None)
            };
            let prompt = self.prompt_after_sot(language_id, task, timestamps);
            rows.push(Row {
                language,
                language_probability,
                no_speech: self
                    .tokens
                    .no_speech
                    .and_then(|id| softmax_at(logits, id as usize))
                    .unwrap_or(0.0),
                max_new: max_new_tokens(
                    request.seconds,
                    &self.config,
                    prompt.len() + 1,
                    timestamps,
                ),
                generated: Vec::new(),
                probabilities: Vec::new(),
                sum_logprob: 0.0,
                ended: false,
                done: false,
                seconds: request.seconds,
            });
            prompts.push(prompt);
        }
        let width = prompts.first().map_or(0, Vec::len);
        if prompts.iter().any(|p| p.len() != width) {
            return Err(AsrError::Batch("prompts of different lengths".into()));
        }
        // An English-only model asked for timestamps has no prompt after
        // <|startoftranscript|>: its logits there predict the first token.
        let mut first = (width == 0).then_some(hidden);
        let mut input = Tensor::new(prompts.concat(), device)?.reshape((batch, width))?;
        let mut step = 0;
        while rows.iter().any(|r| !r.done) {
            let hidden = match first.take() {
                Some(hidden) => hidden,
                None => self.net.step(&mut state, &input)?,
            };
            let last = hidden.dim(1)? - 1;
            let logits: Vec<Vec<f32>> = self.net.logits_at(&hidden, last)?.to_vec2()?;
            let banned = match (timestamps, step == 0) {
                (false, true) => &self.suppress_first,
                (false, false) => &self.suppress,
                (true, true) => &self.suppress_timed[1],
                (true, false) => &self.suppress_timed[0],
            };
            let mut next_tokens = Vec::with_capacity(batch);
            for (row, mut logits) in rows.iter_mut().zip(logits) {
                if row.done {
                    next_tokens.push(self.tokens.eot);
                    continue;
                }
                for &id in banned {
                    logits[id as usize] = f32::NEG_INFINITY;
                }
                if timestamps {
                    self.timestamp_rules(&mut logits, &row.generated);
                }
                let (next, logprob) = argmax_logprob(&logits);
                row.sum_logprob += f64::from(logprob);
                if next == self.tokens.eot {
                    row.ended = true;
                    row.done = true;
                } else {
                    row.generated.push(next);
                    row.probabilities.push(logprob.exp());
                    row.done = row.generated.len() >= row.max_new;
                }
                next_tokens.push(next);
            }
            input = Tensor::new(next_tokens, device)?.unsqueeze(1)?;
            step += 1;
        }
        rows.into_iter()
            .zip(requests)
            .enumerate()
            .map(|(i, (row, request))| {
                let words = request.words.then_some((&state, i, task));
                self.finish(row, timestamps, words)
            })
            .collect()
    }

    /// A row's text, measured and judged by the guards; `words` (the
    /// batch's decoding state, the row's index in it and the task) times
    /// its words.
    fn finish(
        &self,
        row: Row,
        timestamps: bool,
        words: Option<(&DecodeState, usize, Task)>,
    ) -> Result<Transcript, AsrError> {
        let text_tokens: Vec<u32> = row
            .generated
            .iter()
            .copied()
            .filter(|&t| t < self.tokens.eot)
            .collect();
        let text = self.detokenize(&text_tokens)?;
        let avg_logprob = (row.sum_logprob / (row.generated.len() + 1) as f64) as f32;
        let compression_ratio = compression_ratio(&text);
        let withheld = self.guards.judge(
            row.ended || row.generated.is_empty(),
            compression_ratio,
            row.no_speech,
            avg_logprob,
        );
        let (text, segments, words, tokens) = if withheld.is_some() {
            (String::new(), Vec::new(), Vec::new(), Vec::new())
        } else {
            let segments = if timestamps {
                self.segments(&row.generated, row.seconds)?
            } else {
                Vec::new()
            };
            let words = match words {
                Some((state, index, task)) => self.align_words(state, index, task, &row)?,
                None => Vec::new(),
            };
            (text, segments, words, row.generated)
        };
        Ok(Transcript {
            text,
            tokens,
            segments,
            words,
            language: Some(row.language),
            language_probability: row.language_probability,
            no_speech_probability: row.no_speech,
            avg_logprob,
            compression_ratio,
            withheld,
        })
    }

    /// Word timestamps for one decoded row: [`WhisperModel::align_row`],
    /// then OpenAI's clean-up (over-long words at sentence ends clipped,
    /// punctuation merged into its neighbours).
    fn align_words(
        &self,
        state: &DecodeState,
        index: usize,
        task: Task,
        row: &Row,
    ) -> Result<Vec<Word>, AsrError> {
        let (text, probabilities): (Vec<u32>, Vec<f32>) = row
            .generated
            .iter()
            .zip(&row.probabilities)
            .filter(|(t, _)| **t < self.tokens.eot)
            .map(|(t, p)| (*t, *p))
            .unzip();
        let alignment = self.align_row(
            state,
            index,
            &row.language,
            task,
            &text,
            &probabilities,
            row.seconds,
        )?;
        Ok(align::tidy(alignment.words))
    }

    /// Aligns a known transcript to encoded audio `(1, S, D)` (CTranslate2's
    /// `align`, faster-whisper's `find_alignment`): `text` is the text
    /// tokens (no prompt, no timestamps), `seconds` how much of the window
    /// holds audio. The words are as the path puts them, before any
    /// clean-up.
    pub fn align(
        &self,
        features: &Tensor,
        language: &str,
        task: Task,
        text: &[u32],
        seconds: f64,
    ) -> Result<Alignment, AsrError> {
        let state = self.net.start(features)?;
        self.align_row(&state, 0, language, task, text, &[], seconds)
    }

    /// OpenAI's `find_alignment` for one row of a batch: the decoder is fed
    /// the prompt (without timestamps), the text tokens and end-of-text
    /// once more, and the alignment heads' cross-attention over the
    /// positions that hold audio is aligned to the tokens by dynamic time
    /// warping ([`align`]).
    #[allow(clippy::too_many_arguments)]
    fn align_row(
        &self,
        state: &DecodeState,
        index: usize,
        language: &str,
        task: Task,
        text: &[u32],
        probabilities: &[f32],
        seconds: f64,
    ) -> Result<Alignment, AsrError> {
        let mut tokens = vec![self.tokens.sot];
        tokens.extend(self.prompt_after_sot(self.language_token(language), task, false));
        // Rows from <|notimestamps|>: each predicts the next text token,
        // the last one end-of-text.
        let first = tokens.len() - 1;
        tokens.extend(text);
        tokens.push(self.tokens.eot);
        if text.is_empty()
            || self.alignment_heads.is_empty()
            || tokens.len() > self.config.max_target_positions
        {
            return Ok(Alignment::default());
        }
        let input = Tensor::new(tokens.as_slice(), self.net.device())?.unsqueeze(0)?;
        let scores = self
            .net
            .cross_attention(state, index, &input, &self.alignment_heads)?;
        let rows = text.len() + 1;
        let columns = scores.first().map_or(Ok(0), |t| t.dim(1))?;
        let heads = scores
            .iter()
            .map(|t| t.narrow(0, first, rows)?.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Positions that hold audio, not padding (two mel frames each).
        let content = ((seconds * 100.0).round() as usize / 2).clamp(1, columns.max(1));
        let matrix = align::attention_matrix(&heads, rows, columns, content);
        let path = align::dtw(&matrix, rows, content);
        let spoken: Vec<u32> = text.iter().copied().chain([self.tokens.eot]).collect();
        let words = align::split_words(
            &spoken,
            language,
            |t| t >= self.tokens.eot,
            |ids| self.tokenizer.decode(ids, false).unwrap_or_default(),
        );
        let words = align::word_times(&path, &words, probabilities);
        Ok(Alignment { path, words })
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, AsrError> {
        Ok(self
            .tokenizer
            .decode(tokens, true)
            .map_err(|e| AsrError::Decode(e.to_string()))?
            .trim()
            .to_owned())
    }

    fn timestamp_seconds(&self, token: u32) -> Option<f32> {
        let index = token.checked_sub(self.tokens.timestamp_begin)?;
        (index <= TIMESTAMPS).then_some(index as f32 * TIMESTAMP_SECONDS)
    }

    /// The generated tokens split into segments at their timestamps.
    fn segments(&self, generated: &[u32], seconds: f64) -> Result<Vec<Segment>, AsrError> {
        split_segments(
            generated,
            |t| self.timestamp_seconds(t),
            |t| t < self.tokens.eot,
            seconds as f32,
            |text| self.detokenize(text),
        )
    }

    /// Whisper's timestamp rules (`ApplyTimestampRules` in OpenAI's
    /// decoding.py), on one row's logits given the tokens it generated so
    /// far: timestamps come in pairs and never go back, the first token is a
    /// timestamp within the first second, and a timestamp is forced when
    /// timestamps together are more likely than any text token.
    fn timestamp_rules(&self, logits: &mut [f32], generated: &[u32]) {
        let begin = self.tokens.timestamp_begin as usize;
        let eot = self.tokens.eot as usize;
        if begin >= logits.len() {
            return;
        }
        let is_timestamp = |t: &u32| *t as usize >= begin;
        let last = generated.last().is_some_and(is_timestamp);
        let penultimate = generated.len() < 2 || is_timestamp(&generated[generated.len() - 2]);
        if last {
            if penultimate {
                logits[begin..].fill(f32::NEG_INFINITY);
            } else {
                logits[..eot].fill(f32::NEG_INFINITY);
            }
        }
        if let Some(&previous) = generated.iter().rev().find(|t| is_timestamp(t)) {
            // Never backwards, and a segment is never empty.
            let upto = if last && !penultimate {
                previous as usize
            } else {
                previous as usize + 1
            };
            let n = logits.len();
            logits[begin..upto.min(n)].fill(f32::NEG_INFINITY);
        }
        if generated.is_empty() {
            logits[..begin].fill(f32::NEG_INFINITY);
            let last_allowed = begin + MAX_INITIAL_TIMESTAMP;
            if last_allowed + 1 < logits.len() {
                logits[last_allowed + 1..].fill(f32::NEG_INFINITY);
            }
        }
        let timestamp_mass = log_sum_exp(&logits[begin..]);
        let best_text = logits[..begin]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        if timestamp_mass > best_text {
            logits[..begin].fill(f32::NEG_INFINITY);
        }
    }

    /// The most likely language token and its probability among languages.
    fn detect_language(&self, sot_logits: &[f32]) -> Result<(String, u32, f32), AsrError> {
        let langs: Vec<(&String, u32, f32)> = self
            .tokens
            .languages
            .iter()
            .filter_map(|(c, id)| sot_logits.get(*id as usize).map(|l| (c, *id, *l)))
            .collect();
        let max = langs.iter().map(|l| l.2).fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = langs.iter().map(|l| (l.2 - max).exp()).sum();
        let best = langs
            .iter()
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .ok_or(AsrError::MissingToken("<|en|> (any language token)"))?;
        Ok((best.0.clone(), best.1, (best.2 - max).exp() / total))
    }
}

/// Where inference runs: the first CUDA GPU when built with the `cuda`
/// feature and one is present, else the CPU.
pub fn inference_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(gpu) = Device::new_cuda(0) {
        return gpu;
    }
    Device::Cpu
}

/// f16 on a GPU (its tensor cores); f32 on the CPU, whose kernels have no
/// fast f16 path.
pub fn inference_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// Timestamp tokens after `<|0.00|>`: 30 s in steps of 20 ms.
/// The alignment heads a model names, checked against its decoder; a model
/// that names none uses every head of its decoder's second half (OpenAI's
/// default).
fn alignment_heads(
    named: Option<Vec<(usize, usize)>>,
    config: &Config,
) -> Result<Vec<(usize, usize)>, String> {
    let (layers, heads) = (config.decoder_layers, config.decoder_attention_heads);
    match named {
        Some(named) if !named.is_empty() => {
            if let Some((l, h)) = named.iter().find(|(l, h)| *l >= layers || *h >= heads) {
                return Err(format!(
                    "alignment head ({l}, {h}) is outside the decoder's {layers} layers of {heads} heads"
                ));
            }
            Ok(named)
        }
        _ => Ok((layers / 2..layers)
            .flat_map(|l| (0..heads).map(move |h| (l, h)))
            .collect()),
    }
}

const TIMESTAMPS: u32 = 1500;
const TIMESTAMP_SECONDS: f32 = 0.02;
/// The first timestamp is at most 1 s in (OpenAI's `max_initial_timestamp`).
const MAX_INITIAL_TIMESTAMP: usize = 50;

/// `log(sum(exp(x)))`, stable; negative infinity for an empty or all
/// negative-infinity slice.
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let total: f64 = x.iter().map(|v| f64::from(v - max).exp()).sum();
    max + total.ln() as f32
}

/// Splits generated tokens at their timestamps: text between two
/// timestamps is a segment from the first to the second (a segment may also
/// start where the previous one ended, when one timestamp separates them);
/// text after the last timestamp runs to `end_of_audio`. Times are clamped
/// to the audio; segments without words are dropped.
fn split_segments(
    generated: &[u32],
    timestamp: impl Fn(u32) -> Option<f32>,
    is_text: impl Fn(u32) -> bool,
    end_of_audio: f32,
    detokenize: impl Fn(&[u32]) -> Result<String, AsrError>,
) -> Result<Vec<Segment>, AsrError> {
    let mut segments = Vec::new();
    let mut close = |from: f32, to: f32, text: &mut Vec<u32>| -> Result<(), AsrError> {
        let words = detokenize(text)?;
        text.clear();
        if !words.is_empty() {
            let from = from.min(end_of_audio);
            segments.push(Segment {
                start: from,
                end: to.min(end_of_audio).max(from),
                text: words,
            });
        }
        Ok(())
    };
    let mut open: Option<f32> = None;
    let mut last = 0f32;
    let mut text: Vec<u32> = Vec::new();
    for &token in generated {
        if let Some(time) = timestamp(token) {
            if text.is_empty() {
                open = Some(time);
            } else {
                close(open.unwrap_or(last), time, &mut text)?;
                open = None;
            }
            last = time;
        } else if is_text(token) {
            text.push(token);
        }
    }
    if !text.is_empty() {
        close(open.unwrap_or(last), end_of_audio, &mut text)?;
    }
    Ok(segments)
}

/// Rows `rows` of a batch `(B, ...)`.
fn select_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor, AsrError> {
    let ids = Tensor::new(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        t.device(),
    )?;
    Ok(t.index_select(&ids, 0)?)
}

/// `softmax(logits)[at]`.
fn softmax_at(logits: &[f32], at: usize) -> Option<f32> {
    let x = *logits.get(at)?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|l| f64::from(l - max).exp()).sum();
    Some((f64::from(x - max).exp() / total) as f32)
}

/// The best token and its log-probability under `log_softmax(logits)`.
fn argmax_logprob(logits: &[f32]) -> (u32, f32) {
    let (best, max) =
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |acc, (i, &l)| {
                if l > acc.1 { (i, l) } else { acc }
            });
    let total: f64 = logits.iter().map(|l| f64::from(l - max).exp()).sum();
    (best as u32, -(total.ln() as f32))
}

/// zlib's compression ratio of the text's bytes, as Whisper's guard uses it.
pub fn compression_ratio(text: &str) -> f32 {
    use std::io::Write;
    if text.is_empty() {
        return 0.0;
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let compressed = z
        .write_all(text.as_bytes())
        .and_then(|()| z.finish())
        .map(|v| v.len())
        .unwrap_or(text.len());
    text.len() as f32 / compressed.max(1) as f32
}

/// Bounds decoding: the decoder's context, and a generous speech rate (real
/// speech stays well under 10 tokens a second), which stops a model that
/// never emits end-of-text from running away.
fn max_new_tokens(seconds: f64, config: &Config, prompt: usize, timestamps: bool) -> usize {
    let by_context = (config.max_target_positions / 2).saturating_sub(prompt);
    // Timestamps add two tokens per segment; segments are rarely shorter
    // than a second.
    let rate = if timestamps { 12.0 } else { 10.0 };
    let by_rate = 8 + (seconds * rate).ceil() as usize;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens 100 and up are timestamps (`100 + n` is `n` x 20 ms); below
    /// 50 are words, printed as their numbers; 50 is end-of-text.
    fn split(tokens: &[u32], end: f32) -> Vec<(f32, f32, String)> {
        split_segments(
            tokens,
            |t| t.checked_sub(100).map(|n| n as f32 * 0.02),
            |t| t < 50,
            end,
            |text| {
                Ok(text
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" "))
            },
        )
        .unwrap()
        .into_iter()
        .map(|s| (s.start, s.end, s.text))
        .collect()
    }

    #[test]
    fn segments_follow_the_timestamp_tokens() {
        // Pairs: <|0.00|> 1 2 <|1.00|><|1.00|> 3 <|2.00|>, then end-of-text.
        assert_eq!(
            split(&[100, 1, 2, 150, 150, 3, 200, 50], 5.0),
            [(0.0, 1.0, "1 2".into()), (1.0, 2.0, "3".into())]
        );
        // One timestamp between two texts ends one and starts the next; an
        // unterminated last segment runs from the last timestamp to the end
        // of the audio.
        assert_eq!(
            split(&[100, 1, 150, 2, 175, 3], 4.0),
            [
                (0.0, 1.0, "1".into()),
                (1.0, 1.5, "2".into()),
                (1.5, 4.0, "3".into())
            ]
        );
        // Times past the audio are clamped; empty segments dropped; text
        // with no timestamp at all is one segment over the whole audio.
        assert_eq!(split(&[100, 150, 1, 900], 2.0), [(1.0, 2.0, "1".into())]);
        assert_eq!(split(&[1, 2], 3.0), [(0.0, 3.0, "1 2".into())]);
        assert!(split(&[100, 150, 50], 3.0).is_empty());
    }
}
