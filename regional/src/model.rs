//! The worker's model, hot-swapped when its directory changes.
//!
//! `worker.model` may be a symlink that the registry's sync agent replaces
//! atomically (`current -> versions/<v>`). Before each job the slot resolves
//! the path; if it now points elsewhere, the new model is loaded and used
//! from that job on, with no restart. If the new one fails to load, the old
//! one keeps serving and the failure is logged and counted.

use std::path::{Path, PathBuf};

use earshot_asr::{AsrError, EncoderWindow, Recognition, Utterance, WhisperModel};
use earshot_common::manifest::{MANIFEST_FILE, Manifest};

pub struct ModelSlot {
    path: PathBuf,
    window: EncoderWindow,
    /// A configured id overrides the manifest's.
    fixed_id: Option<String>,
    source: PathBuf,
    model: WhisperModel,
    id: String,
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
        let model = WhisperModel::load(&source, window)?;
        Ok(ModelSlot {
            id: model_id(&source, fixed_id.as_deref()),
            path: path.to_owned(),
            window,
            fixed_id,
            source,
            model,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Loads the model `path` now resolves to, if that changed. Returns the
    /// outcome of a reload, `None` when nothing changed.
    pub fn refresh(&mut self) -> Option<Result<String, AsrError>> {
        let source = match resolve(&self.path) {
            Ok(s) if s == self.source => return None,
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        Some(WhisperModel::load(&source, self.window).map(|model| {
            self.id = model_id(&source, self.fixed_id.as_deref());
            self.model = model;
            self.source = source;
            self.id.clone()
        }))
    }

    /// Recognises a batch of jobs together (see
    /// [`WhisperModel::recognize_batch`]); results in the order given. A job
    /// with `translate_to = Some("en")` is also translated (Whisper's
    /// translate task; an English-only model's transcript is already
    /// English). Other targets are not served here: the edge refuses them
    /// per session.
    pub fn recognize_batch(&self, jobs: &[JobAudio<'_>]) -> Vec<Result<Recognition, AsrError>> {
        let items: Vec<Utterance<'_>> = jobs
            .iter()
            .map(|j| Utterance {
                pcm: j.pcm,
                language: j.language,
                translate: j.translate_to == Some("en"),
            })
            .collect();
        let (results, _) = self.model.recognize_batch(&items);
        results
            .into_iter()
            .zip(&items)
            .map(|(r, item)| {
                r.map(|mut r| {
                    if item.translate && r.translation.is_none() {
                        r.translation = Some(r.transcript.clone());
                    }
                    r
                })
            })
            .collect()
    }
}

/// One job's audio and what it asks for.
#[derive(Debug, Clone, Copy)]
pub struct JobAudio<'a> {
    pub pcm: &'a [f32],
    pub language: Option<&'a str>,
    pub translate_to: Option<&'a str>,
}
