//! Where the third-party runtime assets live: the ONNX Runtime library and
//! the Silero VAD model, both installed from their PyPI packages into the
//! project's virtualenv by `make setup` (`scripts/setup.sh`).
//!
//! `EARSHOT_ONNXRUNTIME` and `EARSHOT_SILERO_VAD` override the search.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// The virtualenv's site-packages directories under `root/.venv`.
fn site_packages(root: &Path) -> Vec<PathBuf> {
    let lib = root.join(".venv").join("lib");
    let Ok(entries) = std::fs::read_dir(&lib) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// The repository root: the nearest ancestor of the current directory (or
/// of this crate, for tests) that holds `.venv`, else `EARSHOT_ROOT`.
pub fn project_root() -> PathBuf {
    if let Ok(root) = std::env::var("EARSHOT_ROOT") {
        return PathBuf::from(root);
    }
    let starts = [
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    for start in starts.into_iter().flatten() {
        if let Some(found) = start.ancestors().find(|p| p.join(".venv").is_dir()) {
            return found.to_owned();
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

fn find(env: &str, relative: &str, pick: impl Fn(&Path) -> bool) -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var(env) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{env}={} does not exist", path.display());
    }
    let root = project_root();
    for site in site_packages(&root) {
        let dir = site.join(relative);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| pick(p))
                .collect();
            found.sort();
            if let Some(p) = found.pop() {
                return Ok(p);
            }
        }
    }
    bail!(
        "cannot find {relative} in {}/.venv: run `make setup` (or set {env})",
        root.display()
    )
}

/// A real Whisper model that `scripts/setup.sh` converted into
/// `.cache/models/<name>` (`whisper-tiny.en`, `whisper-base`), or
/// `EARSHOT_MODELS/<name>`.
pub fn real_model(name: &str) -> anyhow::Result<PathBuf> {
    let root = std::env::var("EARSHOT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| project_root().join(".cache/models"));
    let dir = root.join(name);
    let weights = ["model.safetensors", earshot_asr::quantize::GGUF_FILE];
    if !weights.iter().any(|w| dir.join(w).is_file()) {
        bail!(
            "no Whisper model at {}: run `make setup` (it downloads and converts the real weights)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The CTranslate2 (faster-whisper) directory a real model was converted
/// from, `.cache/ct2/<name>` (`tiny.en`, `base`).
pub fn ct2_model(name: &str) -> anyhow::Result<PathBuf> {
    let dir = project_root().join(".cache/ct2").join(name);
    if !dir.join("model.bin").is_file() {
        bail!(
            "no CTranslate2 model at {}: run `make setup`",
            dir.display()
        );
    }
    Ok(dir)
}

/// The project's virtualenv Python (ONNX Runtime, faster-whisper).
pub fn python() -> anyhow::Result<PathBuf> {
    let python = project_root().join(".venv/bin/python");
    if !python.is_file() {
        bail!("no {}: run `make setup`", python.display());
    }
    Ok(python)
}

/// `libonnxruntime.so.<version>` from the `onnxruntime` wheel.
pub fn onnxruntime_library() -> anyhow::Result<PathBuf> {
    find("EARSHOT_ONNXRUNTIME", "onnxruntime/capi", |p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libonnxruntime.so."))
    })
}

/// `silero_vad.onnx` from the `silero-vad` package.
pub fn silero_model() -> anyhow::Result<PathBuf> {
    find("EARSHOT_SILERO_VAD", "silero_vad/data", |p| {
        p.file_name().is_some_and(|n| n == "silero_vad.onnx")
    })
}

/// A binary of this workspace, built next to the running one (`target/<profile>/`);
/// tests find `earshot-regional` and `earshot-edge` there.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Integration tests run from target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        anyhow::bail!(
            "{} not found: build it first with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}
