//! `publish`: upload a model directory as a new, immutable version.
//!
//! 1. The directory is checked: every file is nameable, and the model loads
//!    as its declared kind and format.
//! 2. Files go to `models/<name>/<version>/` in the home bucket of the
//!    model's residency: small ones in one PUT, large ones in multipart
//!    uploads with a bounded number of parts in flight. Each file's SHA-256
//!    is computed from the same bytes as they are read for upload.
//! 3. An interrupted upload resumes: the upload ids are kept in a state file,
//!    and the parts the server already holds (ListParts) are not sent again.
//! 4. `manifest.json` is written last, with `If-None-Match: *`: the version
//!    appears atomically, and only once.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use earshot_common::client::hex;
use earshot_common::manifest::{
    FileEntry, Format, Kind, Lineage, MANIFEST_SCHEMA, Manifest, ManifestError, Quantization, Tier,
    keys,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::{Put, Store, StoreError};
use crate::validate::{self, LocalFile, ValidateError};
use crate::{Registry, RegistryError, now_rfc3339};

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub dir: PathBuf,
    pub name: String,
    pub version: String,
    pub tier: Tier,
    pub kind: Kind,
    /// Detected from the files when `None`.
    pub format: Option<Format>,
    pub quantization: Quantization,
    pub languages: Vec<String>,
    pub residency: String,
    pub parent: Option<String>,
    pub training_data_jurisdiction: String,
    pub publisher: String,
    pub metrics: BTreeMap<String, f64>,
}

impl PublishRequest {
    /// A regional Whisper (ASR) model with no lineage beyond its residency;
    /// set the other fields as needed.
    pub fn new(dir: impl Into<PathBuf>, name: &str, version: &str, residency: &str) -> Self {
        PublishRequest {
            dir: dir.into(),
            name: name.to_owned(),
            version: version.to_owned(),
            tier: Tier::Regional,
            kind: Kind::Asr,
            format: None,
            quantization: Quantization::None,
            languages: Vec::new(),
            residency: residency.to_owned(),
            parent: None,
            training_data_jurisdiction: residency.to_owned(),
            publisher: "unknown".to_owned(),
            metrics: BTreeMap::new(),
        }
    }
}

/// Reports transfer progress; the CLI draws a bar or prints lines.
pub trait Progress: Send + Sync {
    fn file_started(&self, path: &str, size: u64);
    fn bytes(&self, n: u64);
    fn file_done(&self, path: &str);
}

/// Progress that goes nowhere.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn file_started(&self, _: &str, _: u64) {}
    fn bytes(&self, _: u64) {}
    fn file_done(&self, _: &str) {}
}

/// How to move bytes.
#[derive(Clone)]
pub struct Transfer {
    /// Multipart part size; files up to this size go in one PUT.
    pub part_size: usize,
    /// Parts in flight at once (memory: `part_size × parallelism`).
    pub parallelism: usize,
    /// Where resume state is kept.
    pub state_dir: PathBuf,
    pub cancel: CancellationToken,
    pub progress: Arc<dyn Progress>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("part_size", &self.part_size)
            .field("parallelism", &self.parallelism)
            .finish()
    }
}

impl Transfer {
    pub fn new(state_dir: PathBuf) -> Self {
        Transfer {
            part_size: 16 << 20,
            parallelism: 4,
            state_dir,
            cancel: CancellationToken::new(),
            progress: Arc::new(Quiet),
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone)]
pub struct PublishReport {
    pub manifest: Manifest,
    pub bucket: String,
    pub parts_sent: usize,
    /// Parts an earlier, interrupted run had already uploaded.
    pub parts_reused: usize,
    /// Whole files an earlier run had already uploaded.
    pub files_reused: usize,
    pub bytes_sent: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "{name}@{version} already exists in bucket {bucket}: versions are immutable, publish a new version"
    )]
    VersionExists {
        name: String,
        version: String,
        bucket: String,
    },
    #[error(transparent)]
    Validate(#[from] ValidateError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} changed while it was being uploaded: publish again")]
    Changed { path: String },
    #[error(
        "model {name} is already published with residency {existing}: a name keeps one residency (its channels live in that residency's home); publish under another name"
    )]
    ResidencyMismatch { name: String, existing: String },
    #[error("interrupted; run the same command again to resume")]
    Cancelled,
    #[error("{0}")]
    Other(String),
}

/// Resume state of one version's upload.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    files: HashMap<String, FileState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileState {
    size: u64,
    mtime_ns: u128,
    part_size: usize,
    upload_id: Option<String>,
    /// Set once the object is complete.
    sha256: Option<String>,
}

impl FileState {
    /// A file not uploaded yet.
    pub fn new(size: u64, mtime_ns: u128, part_size: usize) -> Self {
        FileState {
            size,
            mtime_ns,
            part_size,
            upload_id: None,
            sha256: None,
        }
    }
}

fn state_path(dir: &Path, bucket: &str, name: &str, version: &str) -> PathBuf {
    dir.join(bucket).join(name).join(format!("{version}.json"))
}

fn load_state(path: &Path) -> State {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_state(path: &Path, state: &State) -> Result<(), PublishError> {
    let io = |source| PublishError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(state).unwrap_or_default()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn mtime_ns(path: &Path) -> u128 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// Validates and uploads `req.dir` as `req.name@req.version`.
pub async fn publish(
    registry: &Registry,
    req: &PublishRequest,
    transfer: &Transfer,
) -> Result<PublishReport, PublishError> {
    let (_, store) = registry.home(&req.residency)?;
    store.ensure_bucket().await?;

    let files = validate::list_files(&req.dir)?;
    let format = match req.format {
        Some(f) => f,
        None => validate::detect_format(&files)
            .ok_or_else(|| ValidateError::UnknownFormat(req.dir.clone()))?,
    };
    // Check the manifest's own fields before the slow part.
    let mut manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        name: req.name.clone(),
        version: req.version.clone(),
        tier: req.tier,
        kind: req.kind,
        format,
        quantization: req.quantization,
        languages: req.languages.clone(),
        files: files
            .iter()
            .map(|f| FileEntry {
                path: f.path.clone(),
                size: f.size,
                sha256: "0".repeat(64),
            })
            .collect(),
        residency: req.residency.clone(),
        lineage: Lineage {
            parent: req.parent.clone(),
            training_data_jurisdiction: req.training_data_jurisdiction.clone(),
            publisher: req.publisher.clone(),
            created: now_rfc3339(),
        },
        metrics: req.metrics.clone(),
    };
    manifest.validate()?;
    let manifest_key = keys::manifest(&req.name, &req.version);
    let exists = || PublishError::VersionExists {
        name: req.name.clone(),
        version: req.version.clone(),
        bucket: store.bucket().to_owned(),
    };
    if store.head(&manifest_key).await?.is_some() {
        return Err(exists());
    }
    for home in registry.homes() {
        let other = registry.store(home);
        if let Some(version) = crate::list_versions(&other, &req.name).await?.first()
            && let Some(m) = crate::read_manifest(&other, &req.name, version).await?
            && m.residency != req.residency
        {
            return Err(PublishError::ResidencyMismatch {
                name: req.name.clone(),
                existing: m.residency,
            });
        }
    }
    {
        let (dir, files, kind) = (req.dir.clone(), files.clone(), req.kind);
        tokio::task::spawn_blocking(move || validate::validate(&dir, &files, kind, format))
            .await
            .map_err(|e| PublishError::Other(format!("validation task failed: {e}")))??;
    }

    let state_file = state_path(&transfer.state_dir, store.bucket(), &req.name, &req.version);
    let mut state = load_state(&state_file);
    let mut report = PublishReport {
        manifest: manifest.clone(),
        bucket: store.bucket().to_owned(),
        parts_sent: 0,
        parts_reused: 0,
        files_reused: 0,
        bytes_sent: 0,
    };
    for (entry, local) in manifest.files.iter_mut().zip(&files) {
        let key = keys::file(&req.name, &req.version, &local.path);
        let fresh = FileState::new(local.size, mtime_ns(&local.disk), transfer.part_size);
        let mut fs = match state.files.get(&local.path) {
            Some(s) if s.size == fresh.size && s.mtime_ns == fresh.mtime_ns => s.clone(),
            _ => fresh,
        };
        if let Some(sha) = &fs.sha256
            && store
                .head(&key)
                .await?
                .is_some_and(|(size, _)| size == local.size)
        {
            transfer.progress.file_started(&local.path, local.size);
            transfer.progress.bytes(local.size);
            transfer.progress.file_done(&local.path);
            entry.sha256 = sha.clone();
            report.files_reused += 1;
            continue;
        }
        fs.sha256 = None;
        let outcome = upload_file(&store, &key, local, &mut fs, transfer, |fs| {
            state.files.insert(local.path.clone(), fs.clone());
            save_state(&state_file, &state)
        })
        .await?;
        if mtime_ns(&local.disk) != fs.mtime_ns {
            return Err(PublishError::Changed {
                path: local.path.clone(),
            });
        }
        report.parts_sent += outcome.parts_sent;
        report.parts_reused += outcome.parts_reused;
        report.bytes_sent += outcome.bytes_sent;
        entry.sha256 = hex(&outcome.sha256);
        fs.sha256 = Some(entry.sha256.clone());
        fs.upload_id = None;
        state.files.insert(local.path.clone(), fs);
        save_state(&state_file, &state)?;
    }

    manifest.validate()?;
    match store
        .put_new(&manifest_key, Bytes::from(manifest.to_json()))
        .await?
    {
        Put::Written(_) => {}
        Put::Conflict => return Err(exists()),
    }
    let _ = std::fs::remove_file(&state_file);
    tracing::info!(model = %manifest.id(), bucket = %store.bucket(), bytes = manifest.total_size(), "published");
    report.manifest = manifest;
    Ok(report)
}

/// What uploading one file did.
#[derive(Debug, Clone, Copy)]
pub struct Uploaded {
    pub sha256: [u8; 32],
    pub parts_sent: usize,
    pub parts_reused: usize,
    pub bytes_sent: u64,
}

/// Uploads one file to `key`, hashing the bytes as they are read. Files
/// larger than the part size go multipart; `persist` is called whenever
/// `fs` gains resume information (a new upload id).
pub async fn upload_file(
    store: &Store,
    key: &str,
    local: &LocalFile,
    fs: &mut FileState,
    transfer: &Transfer,
    mut persist: impl FnMut(&FileState) -> Result<(), PublishError>,
) -> Result<Uploaded, PublishError> {
    let io = |source| PublishError::Io {
        path: local.disk.clone(),
        source,
    };
    transfer.progress.file_started(&local.path, local.size);
    let mut file = tokio::fs::File::open(&local.disk).await.map_err(io)?;
    let mut hasher = Sha256::new();

    if local.size <= transfer.part_size as u64 {
        let mut buf = Vec::with_capacity(local.size as usize);
        file.read_to_end(&mut buf).await.map_err(io)?;
        if buf.len() as u64 != local.size {
            return Err(PublishError::Changed {
                path: local.path.clone(),
            });
        }
        hasher.update(&buf);
        if transfer.cancel.is_cancelled() {
            return Err(PublishError::Cancelled);
        }
        store.put(key, Bytes::from(buf)).await?;
        transfer.progress.bytes(local.size);
        transfer.progress.file_done(&local.path);
        return Ok(Uploaded {
            sha256: hasher.finalize().into(),
            parts_sent: 1,
            parts_reused: 0,
            bytes_sent: local.size,
        });
    }

    let part_size = fs
        .part_size
        .max(5 << 20)
        .min(transfer.part_size.max(5 << 20));
    fs.part_size = part_size;
    // Parts the server already holds for our upload, if it still exists.
    let mut held: HashMap<i32, (Option<String>, u64)> = HashMap::new();
    if let Some(id) = fs.upload_id.clone() {
        match store.list_parts(key, &id).await? {
            Some(parts) => held = parts.into_iter().map(|(n, e, s)| (n, (e, s))).collect(),
            None => fs.upload_id = None,
        }
    }
    let upload_id = match fs.upload_id.clone() {
        Some(id) => id,
        None => {
            let id = store.create_multipart(key).await?;
            fs.upload_id = Some(id.clone());
            persist(fs)?;
            id
        }
    };

    let parts = local.size.div_ceil(part_size as u64) as i32;
    let mut etags: Vec<Option<String>> = vec![None; parts as usize];
    let mut in_flight: JoinSet<Result<(i32, String, u64), StoreError>> = JoinSet::new();
    let mut out = Uploaded {
        sha256: [0; 32],
        parts_sent: 0,
        parts_reused: 0,
        bytes_sent: 0,
    };
    let finish = |done: Result<Result<(i32, String, u64), StoreError>, tokio::task::JoinError>,
                  etags: &mut Vec<Option<String>>|
     -> Result<(), PublishError> {
        let (n, etag, len) =
            done.map_err(|e| PublishError::Other(format!("upload task failed: {e}")))??;
        etags[(n - 1) as usize] = Some(etag);
        transfer.progress.bytes(len);
        Ok(())
    };
    for number in 1..=parts {
        let len =
            (local.size - (number as u64 - 1) * part_size as u64).min(part_size as u64) as usize;
        let mut chunk = vec![0u8; len];
        file.read_exact(&mut chunk).await.map_err(io)?;
        hasher.update(&chunk);
        if let Some((etag, size)) = held.get(&number)
            && *size == len as u64
        {
            // A part's ETag is the MD5 of its bytes: reuse a held part only
            // if it is this chunk (servers that omit the ETag are trusted on
            // size, for a file whose size and mtime are unchanged).
            let md5 = hex(&<md5::Md5 as md5::Digest>::digest(&chunk));
            if etag.as_deref().is_none_or(|e| e.trim_matches('"') == md5) {
                etags[(number - 1) as usize] =
                    Some(etag.clone().unwrap_or_else(|| format!("\"{md5}\"")));
                out.parts_reused += 1;
                transfer.progress.bytes(len as u64);
                continue;
            }
        }
        while in_flight.len() >= transfer.parallelism.max(1) {
            tokio::select! {
                Some(done) = in_flight.join_next() => finish(done, &mut etags)?,
                _ = transfer.cancel.cancelled() => return Err(PublishError::Cancelled),
            }
        }
        if transfer.cancel.is_cancelled() {
            return Err(PublishError::Cancelled);
        }
        let (store, key, id) = (store.clone(), key.to_owned(), upload_id.clone());
        let body = Bytes::from(chunk);
        in_flight.spawn(async move {
            let etag = store.upload_part(&key, &id, number, body).await?;
            Ok((number, etag, len as u64))
        });
        out.parts_sent += 1;
        out.bytes_sent += len as u64;
    }
    loop {
        tokio::select! {
            done = in_flight.join_next() => match done {
                Some(done) => finish(done, &mut etags)?,
                None => break,
            },
            _ = transfer.cancel.cancelled() => return Err(PublishError::Cancelled),
        }
    }
    let completed: Vec<(i32, String)> = etags
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.map(|e| (i as i32 + 1, e)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| PublishError::Other("a part has no ETag".into()))?;
    store
        .complete_multipart(key, &upload_id, &completed)
        .await?;
    transfer.progress.file_done(&local.path);
    out.sha256 = hasher.finalize().into();
    Ok(out)
}
