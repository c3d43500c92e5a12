//! The worker's model, hot-swapped when its directory changes (a
//! [`ModelSlot`]: `worker.model` may be the sync agent's `current` link),
//! and the region's Marian translation pairs.

use std::collections::BTreeMap;
use std::path::Path;

use earshot_asr::marian::MarianModel;
use earshot_asr::{AsrError, Recognition, Transcript, Utterance};
use earshot_common::client::is_language_code;
use earshot_common::wire::{Translated, Translation};

pub use earshot_asr::slot::{ModelSlot, model_digest, model_id};

/// Recognises a batch of jobs together on `slot`'s model (see
/// [`earshot_asr::WhisperModel::recognize_batch`]); results in the order given. A job's
/// `translate_to` is served by Whisper's translate task for `en` (an
/// English-only model's transcript is already English) and by
/// `translators` for any other target.
pub fn recognize_batch(
    slot: &ModelSlot,
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
    let (results, _) = slot.model().recognize_batch(&items);
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
