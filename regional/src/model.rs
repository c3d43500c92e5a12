//! The worker's model, hot-swapped when its directory changes.
//!
//! `worker.model` may be a symlink that the registry's sync agent replaces
//! atomically (`current -> versions/<v>`). Before each job the slot resolves
//! the path; if it now points elsewhere, the new model is loaded and used
//! from that job on, with no restart. If the new one fails to load, the old
//! one keeps serving and the failure is logged and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use earshot_asr::marian::MarianModel;
use earshot_asr::{AsrError, EncoderWindow, Recognition, Transcript, Utterance, WhisperModel};
use earshot_common::client::is_language_code;
use earshot_common::manifest::{MANIFEST_FILE, Manifest};
use earshot_common::wire::{Translated, Translation};

pub struct ModelSlot {
    path: PathBuf,
    window: EncoderWindow,
    /// A configured id overrides the manifest's.
    fixed_id: Option<String>,
    source: PathBuf,
    model: WhisperModel,
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
        listing.update(format!(
            "{name}\0{}\n",
            earshot_common::receipt::hex(&hasher.finalize())
        ));
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
        let model = WhisperModel::load(&source, window)?;
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
            self.model = model;
            self.digest = digest;
            self.source = source;
            self.id.clone()
        }))
    }

    /// Recognises a batch of jobs together (see
    /// [`WhisperModel::recognize_batch`]); results in the order given. A
    /// job's `translate_to` is served by Whisper's translate task for `en`
    /// (an English-only model's transcript is already English) and by
    /// `translators` for any other target.
    pub fn recognize_batch(
        &self,
        jobs: &[JobAudio<'_>],
        translators: &Translators,
    ) -> Vec<Result<Recognized, AsrError>> {
        let items: Vec<Utterance<'_>> = jobs
            .iter()
            .map(|j| Utterance {
                pcm: j.pcm,
                language: j.language,
                translate: j.translate_to == Some("en"),
                timestamps: j.timestamps,
                words: j.words,
            })
            .collect();
        let (results, _) = self.model.recognize_batch(&items);
        results
            .into_iter()
            .zip(jobs)
            .map(|(r, job)| {
                let Recognition {
                    transcript,
                    translation,
                } = r?;
                let translation = job.translate_to.map(|to| {
                    let text = if to == "en" {
                        translation.map_or_else(|| transcript.text.clone(), |t| t.text)
                    } else if transcript.withheld.is_some() {
                        // Not speech: nothing to translate.
                        String::new()
                    } else {
                        let from = transcript.language.as_deref().unwrap_or("");
                        return translators.translate(from, to, &transcript.text);
                    };
                    Translated::Text(Translation {
                        language: to.to_owned(),
                        text,
                    })
                });
                Ok(Recognized {
                    transcript,
                    translation,
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
    /// Return the transcript's segments with timestamps.
    pub timestamps: bool,
    /// Return each word with its times.
    pub words: bool,
}

/// A job's transcript and, when it asked for one, its translation.
#[derive(Debug, Clone)]
pub struct Recognized {
    pub transcript: Transcript,
    pub translation: Option<Translated>,
}

/// The region's text translation models (Marian), by language pair, loaded
/// once at start from `[translation] models` and shared by every worker.
#[derive(Debug, Default)]
pub struct Translators {
    pairs: BTreeMap<(String, String), MarianModel>,
}

impl Translators {
    /// Loads every `<from>-<to>` subdirectory of `dir`. A directory that is
    /// not a pair's name, or a pair that does not load, stops the start:
    /// a region should not come up half-configured.
    pub fn load(dir: &Path) -> Result<Self, AsrError> {
        let read_err = |e: std::io::Error| AsrError::Read {
            path: dir.to_owned(),
            reason: e.to_string(),
        };
        let mut pairs = BTreeMap::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let pair = name
                .split_once('-')
                .filter(|(f, t)| is_language_code(f) && is_language_code(t) && f != t);
            let Some((from, to)) = pair else {
                return Err(AsrError::Config {
                    path,
                    reason: "translation model directories are named <from>-<to>, e.g. en-de"
                        .into(),
                });
            };
            let model = MarianModel::load(&path)?;
            pairs.insert((from.to_owned(), to.to_owned()), model);
        }
        Ok(Translators { pairs })
    }

    /// The pairs served, as `from-to`.
    pub fn pairs(&self) -> Vec<String> {
        self.pairs.keys().map(|(f, t)| format!("{f}-{t}")).collect()
    }

    /// `text` (in `from`) in `to`, or why it cannot be.
    pub fn translate(&self, from: &str, to: &str, text: &str) -> Translated {
        if from == to {
            return Translated::Text(Translation {
                language: to.to_owned(),
                text: text.to_owned(),
            });
        }
        let unavailable = |reason: String| Translated::Unavailable {
            language: to.to_owned(),
            reason,
        };
        match self.pairs.get(&(from.to_owned(), to.to_owned())) {
            Some(model) => match model.translate(text) {
                Ok(text) => Translated::Text(Translation {
                    language: to.to_owned(),
                    text,
                }),
                Err(e) => unavailable(format!("translating {from} into {to} failed: {e}")),
            },
            None => {
                let served = self.pairs();
                unavailable(format!(
                    "this region has no model translating {from:?} into {to:?} (pairs: {})",
                    if served.is_empty() {
                        "none".to_owned()
                    } else {
                        served.join(", ")
                    }
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translators_load_pairs_by_directory_name_and_explain_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        earshot_asr::marian::generate_test_model(&dir.path().join("en-de"), 3).unwrap();
        std::fs::write(dir.path().join("README"), "not a pair").unwrap();
        let t = Translators::load(dir.path()).unwrap();
        assert_eq!(t.pairs(), ["en-de"]);
        assert!(matches!(
            t.translate("en", "de", "the region"),
            Translated::Text(Translation { ref language, .. }) if language == "de"
        ));
        // The same language needs no model.
        assert_eq!(
            t.translate("de", "de", "Guten Tag"),
            Translated::Text(Translation {
                language: "de".into(),
                text: "Guten Tag".into()
            })
        );
        match t.translate("fr", "de", "bonjour") {
            Translated::Unavailable { language, reason } => {
                assert_eq!(language, "de");
                assert!(
                    reason.contains("\"fr\" into \"de\" (pairs: en-de)"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }

        std::fs::create_dir(dir.path().join("english-german")).unwrap();
        let e = Translators::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("<from>-<to>"), "{e}");
        assert!(Translators::load(&dir.path().join("missing")).is_err());
    }
}
