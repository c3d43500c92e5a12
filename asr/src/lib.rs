//! Speech recognition with Whisper on candle: the log-mel front end and its
//! filterbank (computed, not copied), loading published Whisper weights (`config.json`,
//! `model.safetensors`, `tokenizer.json`), importing faster-whisper
//! (CTranslate2) models into that layout, a decoder with a key/value cache,
//! greedy transcription and translation with Whisper's hallucination guards,
//! and seeded test models in the published layout for fast tests.

pub mod align;
pub mod ct2;
pub mod generate;
pub mod kernels;
pub mod marian;
pub mod mel;
pub mod net;
pub mod quantize;
pub mod slot;
pub mod wer;
pub mod whisper;

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else every core).
pub fn inference_threads() -> usize {
    candle_core::utils::get_num_threads()
}

pub use align::Word;
pub use generate::{TestModelSpec, generate_test_model};
pub use whisper::{
    Alignment, AsrError, EncoderWindow, Guards, Recognition, Request, Segment, Task, Timings,
    Transcript, Utterance, WhisperModel, Withheld,
};
