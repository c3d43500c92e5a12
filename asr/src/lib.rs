//! Speech recognition with Whisper on candle: the log-mel front end and its
//! filterbank (computed, not copied), loading published Whisper weights (`config.json`,
//! `model.safetensors`, `tokenizer.json`), greedy transcription, and seeded
//! test models in that same layout for machines without a model hub.

pub mod generate;
pub mod mel;
pub mod quantize;
pub mod whisper;

pub use generate::{TestModelSpec, generate_test_model};
pub use whisper::{AsrError, EncoderWindow, Transcript, WhisperModel};
