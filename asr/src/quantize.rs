//! GGUF quantization of Whisper weights, for the edge tier: the published
//! `model.safetensors` becomes `model.gguf` with its matrices in q8_0 or
//! q4_0 (blocks of 32), which [`crate::WhisperModel::load`] runs on the CPU.

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device};

use crate::whisper::{AsrError, load_config};

/// File name of the quantized weights.
pub const GGUF_FILE: &str = "model.gguf";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Q8_0,
    Q4_0,
}

impl Scheme {
    fn dtype(self) -> GgmlDType {
        match self {
            Scheme::Q8_0 => GgmlDType::Q8_0,
            Scheme::Q4_0 => GgmlDType::Q4_0,
        }
    }
}

fn weights_err(path: &Path) -> impl Fn(candle_core::Error) -> AsrError + '_ {
    move |e| AsrError::Weights {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Writes `out/model.gguf` quantized from `src/model.safetensors`, and copies
/// `config.json` and `tokenizer.json`. Matrices whose rows are a whole number
/// of 32-value blocks are quantized (the positional embeddings excepted);
/// everything else stays f32.
pub fn quantize_whisper(src: &Path, out: &Path, scheme: Scheme) -> Result<(), AsrError> {
    let io = |path: PathBuf| {
        move |e: std::io::Error| AsrError::Read {
            path: path.clone(),
            reason: e.to_string(),
        }
    };
    std::fs::create_dir_all(out).map_err(io(out.to_owned()))?;
    load_config(src)?;
    let weights = src.join("model.safetensors");
    let tensors =
        candle_core::safetensors::load(&weights, &Device::Cpu).map_err(weights_err(&weights))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut quantized = Vec::with_capacity(names.len());
    for name in names {
        let t = tensors[name]
            .to_dtype(DType::F32)
            .map_err(weights_err(&weights))?;
        // Positional embeddings stay f32: they are small, added to every
        // activation, and quantizing them cost words on real weights.
        let block_ok = t.rank() == 2 && t.dims()[1] % 32 == 0 && !name.contains("embed_positions");
        let dtype = if block_ok {
            scheme.dtype()
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, dtype).map_err(weights_err(&weights))?;
        quantized.push((name.as_str(), q));
    }
    let target = out.join(GGUF_FILE);
    let mut file = std::fs::File::create(&target).map_err(io(target.clone()))?;
    let refs: Vec<(&str, &QTensor)> = quantized.iter().map(|(n, q)| (*n, q)).collect();
    gguf_file::write(&mut file, &[], &refs).map_err(weights_err(&target))?;
    for name in ["config.json", "tokenizer.json", "generation_config.json"] {
        let from = src.join(name);
        // generation_config.json is optional (config.json can carry its
        // fields); the other two are checked above and by the copy.
        if name == "generation_config.json" && !from.is_file() {
            continue;
        }
        std::fs::copy(&from, out.join(name)).map_err(io(from.clone()))?;
    }
    Ok(())
}

/// Loads `dir/model.gguf` as the edge tier does (earshot's network over
/// the quantized matrices, the tokenizer and the configs).
pub fn check_gguf_whisper(dir: &Path) -> Result<(), AsrError> {
    crate::WhisperModel::load(dir, crate::EncoderWindow::default()).map(drop)
}
