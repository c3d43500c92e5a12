//! A model directory that can change under a running node, hot-swapped.
//!
//! The configured path may be a symlink that the registry's sync agent
//! replaces atomically (`current -> versions/<v>`). Before each job the
//! holder calls [`ModelSlot::refresh`]: if the path now resolves elsewhere,
//! the new model is loaded and used from then on, with no restart; if it
//! fails to load, the old one keeps serving and the caller logs and counts
//! the failure. Regions hold their Whisper this way, edges their partials
//! model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use earshot_proto::manifest::{MANIFEST_FILE, Manifest};
use earshot_proto::receipt::hex;

use crate::{AsrError, EncoderWindow, WhisperModel};

pub struct ModelSlot {
    path: PathBuf,
    window: EncoderWindow,
    /// A configured id overrides the manifest's.
    fixed_id: Option<String>,
    source: PathBuf,
    model: Arc<WhisperModel>,
    id: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for ModelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSlot")
            .field("id", &self.id)
            .field("source", &self.source)
            .finish()
    }
}

/// The id finals report: the configured one, else `name@version` from the
/// directory's `manifest.json`, else the directory's name.
pub fn model_id(dir: &Path, fixed: Option<&str>) -> String {
    if let Some(id) = fixed {
        return id.to_owned();
    }
    if let Some(m) = std::fs::read(dir.join(MANIFEST_FILE))
        .ok()
        .and_then(|b| Manifest::from_json(&b).ok())
    {
        return m.id();
    }
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "whisper".into())
}

/// What a final's receipt names as the model's digest: SHA-256 of the
/// version's `manifest.json` (which holds every file's SHA-256, checked by
/// the sync agent on download), or, for a directory without one, of a
/// listing of its files' names and SHA-256s.
pub fn model_digest(dir: &Path) -> Result<[u8; 32], AsrError> {
    use sha2::{Digest, Sha256};
    let read_err = |path: &Path, e: std::io::Error| AsrError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let manifest = dir.join(MANIFEST_FILE);
    match std::fs::read(&manifest) {
        Ok(bytes) => return Ok(Sha256::digest(&bytes).into()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(read_err(&manifest, e)),
        Err(_) => {}
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| read_err(dir, e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut listing = Sha256::new();
    for path in files {
        let mut file = std::fs::File::open(&path).map_err(|e| read_err(&path, e))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(|e| read_err(&path, e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        listing.update(format!("{name}\0{}\n", hex(&hasher.finalize())));
    }
    Ok(listing.finalize().into())
}

fn resolve(path: &Path) -> Result<PathBuf, AsrError> {
    std::fs::canonicalize(path).map_err(|e| AsrError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl ModelSlot {
    pub fn load(
        path: &Path,
        window: EncoderWindow,
        fixed_id: Option<String>,
    ) -> Result<Self, AsrError> {
        let source = resolve(path)?;
        let model = Arc::new(WhisperModel::load(&source, window)?);
        Ok(ModelSlot {
            digest: model_digest(&source)?,
            id: model_id(&source, fixed_id.as_deref()),
            path: path.to_owned(),
            window,
            fixed_id,
            source,
            model,
        })
    }

    /// The model now loaded; a holder keeps it even after a swap.
    pub fn model(&self) -> &Arc<WhisperModel> {
        &self.model
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// See [`model_digest`].
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Loads the model `path` now resolves to, if that changed. Returns the
    /// outcome of a reload, `None` when nothing changed.
    pub fn refresh(&mut self) -> Option<Result<String, AsrError>> {
        let source = match resolve(&self.path) {
            Ok(s) if s == self.source => return None,
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        let loaded = WhisperModel::load(&source, self.window)
            .and_then(|model| Ok((model, model_digest(&source)?)));
        Some(loaded.map(|(model, digest)| {
            self.id = model_id(&source, self.fixed_id.as_deref());
            self.model = Arc::new(model);
            self.digest = digest;
            self.source = source;
            self.id.clone()
        }))
    }
}
