//! Model manifests and channel pointers: the registry's two document types.
//!
//! `models/<name>/<version>/manifest.json` describes one immutable model
//! version and is written last, so a version without one does not exist.
//! `channels/<name>/<channel>.json` points a channel (`stable`, `canary`) at a
//! version, with its rollout. Both are JSON; unknown fields are rejected so a
//! typo cannot silently drop a residency or rollout setting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Current manifest schema.
pub const MANIFEST_SCHEMA: u32 = 1;
/// File name of a version's manifest, in the registry and in a model
/// directory on a node.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Small models the edge runs (partials, VAD).
    Edge,
    /// Full models the regional GPU workers run.
    Regional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Asr,
    Mt,
    Vad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Safetensors,
    Gguf,
    Onnx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    None,
    F16,
    Q8_0,
    Q4_0,
}

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the version directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The version this one was derived from (fine-tuned, quantized), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Jurisdiction of the training data (`eu`, `us`, `global`…).
    pub training_data_jurisdiction: String,
    pub publisher: String,
    /// RFC 3339 UTC time of publication.
    pub created: String,
}

/// `models/<name>/<version>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    pub name: String,
    pub version: String,
    pub tier: Tier,
    pub kind: Kind,
    pub format: Format,
    pub quantization: Quantization,
    /// ISO 639-1 codes the model serves; empty means "any".
    #[serde(default)]
    pub languages: Vec<String>,
    pub files: Vec<FileEntry>,
    /// `global`, or the jurisdiction the model must stay in (e.g. `eu`).
    pub residency: String,
    pub lineage: Lineage,
    /// Evaluation results, e.g. `{"wer": 0.121}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// The most bytes a manifest or channel file may have; larger ones are
/// refused before they are parsed (and by the registry before they are
/// downloaded).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Residency value meaning "may be stored and run anywhere".
pub const GLOBAL: &str = "global";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON or has an unknown field: {0}")]
    Parse(String),
    #[error("manifest schema {0} is not supported (this build reads {MANIFEST_SCHEMA})")]
    Schema(u32),
    #[error("invalid {what} {value:?}: {rule}")]
    Invalid {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("manifest lists {0:?} twice")]
    DuplicateFile(String),
    #[error("manifest lists no files")]
    NoFiles,
    #[error(
        "{0} bytes is larger than the {MAX_DOCUMENT_BYTES}-byte limit for a manifest or channel file"
    )]
    TooLarge(usize),
}

const NAME_RULE: &str = "use 1-63 lowercase letters, digits and '-', starting with a letter";
const VERSION_RULE: &str = "use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit";

/// A field that failed its rule; the value is cut to 80 characters, so a
/// hostile file cannot make its error message large.
fn invalid(what: &'static str, value: &str, rule: &'static str) -> ManifestError {
    ManifestError::Invalid {
        what,
        value: value.chars().take(80).collect(),
        rule,
    }
}

/// Model names: DNS-label-like, as they become key and path parts.
pub fn is_valid_model_name(name: &str) -> bool {
    crate::topology::is_valid_name(name)
}

/// Versions: 1-64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn is_valid_version(version: &str) -> bool {
    let b = version.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b".-_".contains(c))
}

/// A file path inside a version: relative, `/`-separated, no `..`, no
/// empty or hidden components.
pub fn is_valid_file_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 512
        && path.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
        })
}

fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Checks names, paths, hashes and residency syntax.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema != MANIFEST_SCHEMA {
            return Err(ManifestError::Schema(self.schema));
        }
        if !is_valid_model_name(&self.name) {
            return Err(invalid("name", &self.name, NAME_RULE));
        }
        if !is_valid_version(&self.version) {
            return Err(invalid("version", &self.version, VERSION_RULE));
        }
        if self.residency != GLOBAL && !crate::topology::is_valid_name(&self.residency) {
            return Err(invalid(
                "residency",
                &self.residency,
                "use \"global\" or a jurisdiction name",
            ));
        }
        if self.files.is_empty() {
            return Err(ManifestError::NoFiles);
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            if !is_valid_file_path(&f.path) || f.path == MANIFEST_FILE {
                return Err(invalid(
                    "file path",
                    &f.path,
                    "relative, no '..' or hidden parts, not manifest.json",
                ));
            }
            if !is_hex_sha256(&f.sha256) {
                return Err(invalid("sha256", &f.sha256, "64 lowercase hex digits"));
            }
            if !seen.insert(&f.path) {
                return Err(ManifestError::DuplicateFile(f.path.clone()));
            }
        }
        for l in &self.languages {
            if !crate::client::is_language_code(l) {
                return Err(invalid("language", l, "an ISO 639-1 code such as \"en\""));
            }
        }
        Ok(())
    }

    /// `name@version`, as finals and status tables show it.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Which nodes a channel's version goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Share of nodes (0-100), chosen by a stable hash of the node id.
    pub percent: u8,
    /// Regions it applies in; empty means every region.
    #[serde(default)]
    pub regions: Vec<String>,
}

/// `channels/<name>/<channel>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub schema: u32,
    pub name: String,
    pub channel: String,
    pub version: String,
    /// What `rollback` returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub rollout: Rollout,
    pub updated_by: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
    /// Incremented by every update; shows lost updates in audits.
    pub generation: u64,
}

impl Channel {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let c: Channel =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if c.schema != MANIFEST_SCHEMA {
            return Err(ManifestError::Schema(c.schema));
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks every field that becomes a path or a key (model name,
    /// channel, versions, regions) by the same rules as the topology's
    /// names, so a crafted channel file cannot point outside the registry
    /// or the models directory.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !is_valid_model_name(&self.name) {
            return Err(invalid("model name", &self.name, NAME_RULE));
        }
        if !crate::topology::is_valid_name(&self.channel) {
            return Err(invalid("channel", &self.channel, NAME_RULE));
        }
        for version in std::iter::once(&self.version).chain(&self.previous) {
            if !is_valid_version(version) {
                return Err(invalid("version", version, VERSION_RULE));
            }
        }
        if let Some(region) = self
            .rollout
            .regions
            .iter()
            .find(|r| !crate::topology::is_valid_name(r))
        {
            return Err(invalid("rollout region", region, NAME_RULE));
        }
        if self.rollout.percent > 100 {
            return Err(invalid(
                "rollout percent",
                &self.rollout.percent.to_string(),
                "0 to 100",
            ));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Whether `node` in `region` is in this channel's rollout.
    pub fn selects(&self, node: &str, region: &str) -> bool {
        let in_region =
            self.rollout.regions.is_empty() || self.rollout.regions.iter().any(|r| r == region);
        in_region && rollout_bucket(node) < u32::from(self.rollout.percent)
    }
}

/// A node's stable position in [0, 100): FNV-1a of its id. The same node
/// always lands in the same place, so raising a canary's percentage only
/// adds nodes, and nodes do not flap between versions.
pub fn rollout_bucket(node: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % 100) as u32
}

/// Registry keys.
pub mod keys {
    pub fn version_prefix(name: &str, version: &str) -> String {
        format!("models/{name}/{version}/")
    }
    pub fn manifest(name: &str, version: &str) -> String {
        format!("models/{name}/{version}/{}", super::MANIFEST_FILE)
    }
    pub fn file(name: &str, version: &str, path: &str) -> String {
        format!("models/{name}/{version}/{path}")
    }
    pub fn channel(name: &str, channel: &str) -> String {
        format!("channels/{name}/{channel}.json")
    }
    pub fn node_status(node: &str) -> String {
        format!("status/nodes/{node}.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            schema: 1,
            name: "whisper-small".into(),
            version: "2026.11.1".into(),
            tier: Tier::Regional,
            kind: Kind::Asr,
            format: Format::Safetensors,
            quantization: Quantization::None,
            languages: vec!["en".into(), "de".into()],
            files: vec![FileEntry {
                path: "model.safetensors".into(),
                size: 3,
                sha256: "a".repeat(64),
            }],
            residency: "eu".into(),
            lineage: Lineage {
                parent: Some("2026.10.0".into()),
                training_data_jurisdiction: "eu".into(),
                publisher: "ml@example".into(),
                created: "2026-11-20T10:00:00Z".into(),
            },
            metrics: BTreeMap::from([("wer".into(), 0.121)]),
        }
    }

    #[test]
    fn manifests_round_trip_and_reject_unknown_fields() {
        let m = manifest();
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        let mut v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        v["residencey"] = "global".into();
        let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("residencey"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        let check = |f: &dyn Fn(&mut Manifest)| {
            let mut m = manifest();
            f(&mut m);
            m.validate().unwrap_err()
        };
        check(&|m| m.version = "../x".into());
        check(&|m| m.name = "Whisper".into());
        check(&|m| m.files[0].path = "../etc/passwd".into());
        check(&|m| m.files[0].path = "a//b".into());
        check(&|m| m.files[0].path = MANIFEST_FILE.into());
        check(&|m| m.files[0].sha256 = "xyz".into());
        check(&|m| m.files.push(m.files[0].clone()));
        check(&|m| m.files.clear());
        check(&|m| m.residency = "EU".into());
        check(&|m| m.schema = 2);
        check(&|m| m.languages.push("eng1".into()));
    }

    #[test]
    fn canary_selection_is_stable_and_monotonic() {
        let channel = |percent| Channel {
            schema: 1,
            name: "m".into(),
            channel: "canary".into(),
            version: "2".into(),
            previous: None,
            rollout: Rollout {
                percent,
                regions: vec![],
            },
            updated_by: "x".into(),
            updated_at: "t".into(),
            generation: 1,
        };
        let nodes: Vec<String> = (0..1000).map(|i| format!("regional-{i}")).collect();
        let picked = |p| -> Vec<&String> {
            nodes
                .iter()
                .filter(|n| channel(p).selects(n, "eu-west"))
                .collect()
        };
        assert!(picked(0).is_empty());
        assert_eq!(picked(100).len(), 1000);
        let ten = picked(10);
        assert!((60..=140).contains(&ten.len()), "{}", ten.len());
        // Raising the percentage only adds nodes.
        let thirty = picked(30);
        assert!(ten.iter().all(|n| thirty.contains(n)));
        // Same answer every time.
        assert_eq!(picked(10), ten);
        // Region filter.
        let mut c = channel(100);
        c.rollout.regions = vec!["eu-west".into()];
        assert!(c.selects("n", "eu-west") && !c.selects("n", "us-east"));
    }

    #[test]
    fn rollout_bucket_has_fixed_values() {
        // Pinned (computed independently with a Python FNV-1a): changing the
        // hash would reshuffle every fleet's canary membership, so that must
        // be a visible, deliberate change.
        assert_eq!(rollout_bucket(""), 37);
        assert_eq!(rollout_bucket("regional-0"), 1);
        assert_eq!(rollout_bucket("regional-1"), 90);
        assert_eq!(rollout_bucket("eu-west-gpu-7"), 94);
    }
}
