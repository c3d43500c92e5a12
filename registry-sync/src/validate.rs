//! Checks that a model directory is what its manifest will claim, before a
//! byte is uploaded: the files load as the declared kind and format.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use earshot_common::manifest::{Format, Kind, MANIFEST_FILE, is_valid_file_path};

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0} holds no model files")]
    Empty(PathBuf),
    #[error("file name {0:?} cannot be published: use plain relative names without hidden parts")]
    BadName(String),
    #[error("cannot tell the format of {0}: pass --format (safetensors, gguf or onnx)")]
    UnknownFormat(PathBuf),
    #[error("{dir} does not load as a {kind} model in {format} format: {reason}")]
    DoesNotLoad {
        dir: PathBuf,
        kind: &'static str,
        format: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// A file to publish: its path inside the version and on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    pub path: String,
    pub disk: PathBuf,
    pub size: u64,
}

/// Every regular file under `dir` except hidden ones and `manifest.json`,
/// sorted by path.
pub fn list_files(dir: &Path) -> Result<Vec<LocalFile>, ValidateError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<LocalFile>) -> Result<(), ValidateError> {
        let read = |path: &Path, e: std::io::Error| ValidateError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        for entry in std::fs::read_dir(dir).map_err(|e| read(dir, e))? {
            let entry = entry.map_err(|e| read(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let disk = entry.path();
            let meta = std::fs::metadata(&disk).map_err(|e| read(&disk, e))?;
            if meta.is_dir() {
                walk(root, &disk, out)?;
            } else if meta.is_file() {
                let rel = disk
                    .strip_prefix(root)
                    .map_err(|_| ValidateError::BadName(disk.display().to_string()))?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                if rel == MANIFEST_FILE {
                    continue;
                }
                if !is_valid_file_path(&rel) {
                    return Err(ValidateError::BadName(rel));
                }
                out.push(LocalFile {
                    path: rel,
                    disk,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if out.is_empty() {
        return Err(ValidateError::Empty(dir.to_owned()));
    }
    Ok(out)
}

/// The format a directory's files suggest.
pub fn detect_format(files: &[LocalFile]) -> Option<Format> {
    let has = |ext: &str| files.iter().any(|f| f.path.ends_with(ext));
    if has(".gguf") {
        Some(Format::Gguf)
    } else if has(".safetensors") {
        Some(Format::Safetensors)
    } else if has(".onnx") {
        Some(Format::Onnx)
    } else {
        None
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Asr => "asr",
        Kind::Mt => "mt",
        Kind::Vad => "vad",
    }
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Safetensors => "safetensors",
        Format::Gguf => "gguf",
        Format::Onnx => "onnx",
    }
}

/// Loads the model as `kind`/`format` says, with the same code the nodes
/// use where there is one. CPU-bound: call from a blocking thread.
pub fn validate(
    dir: &Path,
    files: &[LocalFile],
    kind: Kind,
    format: Format,
) -> Result<(), ValidateError> {
    let fail = |reason: String| ValidateError::DoesNotLoad {
        dir: dir.to_owned(),
        kind: kind_name(kind),
        format: format_name(format),
        reason,
    };
    match (kind, format) {
        (Kind::Asr, Format::Safetensors) => {
            earshot_asr::WhisperModel::load(dir, earshot_asr::EncoderWindow::Fit)
                .map(drop)
                .map_err(|e| fail(e.to_string()))
        }
        (Kind::Asr, Format::Gguf) => {
            earshot_asr::quantize::check_gguf_whisper(dir).map_err(|e| fail(e.to_string()))
        }
        (Kind::Mt, Format::Safetensors) => check_marian(dir).map_err(fail),
        (_, Format::Onnx) => {
            let onnx: Vec<&LocalFile> =
                files.iter().filter(|f| f.path.ends_with(".onnx")).collect();
            if onnx.is_empty() {
                return Err(fail("no .onnx file".into()));
            }
            for f in onnx {
                check_onnx(&f.disk).map_err(|r| fail(format!("{}: {r}", f.path)))?;
            }
            Ok(())
        }
        (kind, format) => Err(ValidateError::Unsupported(format!(
            "{} models in {} format are not supported yet",
            kind_name(kind),
            format_name(format)
        ))),
    }
}

/// Marian MT: `config.json` parses as candle's Marian config and the
/// weights build the model.
fn check_marian(dir: &Path) -> Result<(), String> {
    use candle_transformers::models::marian;
    let config: marian::Config = serde_json::from_slice(
        &std::fs::read(dir.join("config.json")).map_err(|e| format!("config.json: {e}"))?,
    )
    .map_err(|e| format!("config.json: {e}"))?;
    let weights = std::fs::read(dir.join("model.safetensors"))
        .map_err(|e| format!("model.safetensors: {e}"))?;
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
        .map_err(|e| e.to_string())?;
    marian::MTModel::new(&config, vb)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A structural check of an ONNX file: a protobuf `ModelProto` starts with
/// field 1 (`ir_version`, a varint). Running the graph needs ONNX Runtime,
/// which the edge loads; the registry tool does not link it.
fn check_onnx(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| e.to_string())?;
    if head[0] != 0x08 || head[1] == 0 {
        return Err("not an ONNX ModelProto (no ir_version field first)".into());
    }
    Ok(())
}
