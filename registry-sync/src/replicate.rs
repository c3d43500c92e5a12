//! `replicate`: copy versions from their home bucket to every region bucket
//! their residency allows (what S3 cross-region replication does in AWS).
//!
//! Each file is downloaded to a scratch directory while its SHA-256 is
//! checked against the manifest, then uploaded to the target; the manifest is
//! written last, so a half-copied version stays invisible. Versions the
//! target already holds are skipped. A model of residency `eu` is never
//! copied to a bucket of a non-EU region: skipped when replicating
//! everything, refused (and reported as an error) when asked for by name.

use bytes::Bytes;
use earshot_common::client::hex;
use earshot_common::manifest::{Manifest, keys};
use earshot_common::topology::Region;

use crate::publish::{FileState, PublishError, Transfer, upload_file};
use crate::store::Store;
use crate::validate::LocalFile;
use crate::{Registry, RegistryError, list_models, list_versions, read_manifest};

/// What to replicate.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub name: Option<String>,
    pub version: Option<String>,
    /// Target regions; empty means every region.
    pub to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Copied {
        bytes: u64,
    },
    Present,
    /// Residency forbids the target; `requested` when the target was named.
    Refused {
        requested: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub model: String,
    pub region: String,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("s3://{bucket}/{key} does not match its manifest ({what}); not copied")]
    Corrupt {
        bucket: String,
        key: String,
        what: String,
    },
}

impl From<crate::store::StoreError> for ReplicateError {
    fn from(e: crate::store::StoreError) -> Self {
        ReplicateError::Registry(e.into())
    }
}

/// Replicates the selected versions; returns what happened to each
/// (version, region) pair.
pub async fn replicate(
    registry: &Registry,
    selection: &Selection,
    transfer: &Transfer,
) -> Result<Vec<Item>, ReplicateError> {
    let targets: Vec<&Region> = if selection.to.is_empty() {
        registry.topology.regions().iter().collect()
    } else {
        selection
            .to
            .iter()
            .map(|n| registry.region(n))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut items = Vec::new();
    for home in registry.homes() {
        let home_store = registry.store(home);
        let names = match &selection.name {
            Some(n) => vec![n.clone()],
            None => list_models(&home_store).await?,
        };
        for name in names {
            let versions = match &selection.version {
                Some(v) => vec![v.clone()],
                None => list_versions(&home_store, &name).await?,
            };
            for version in versions {
                let Some(manifest) = read_manifest(&home_store, &name, &version).await? else {
                    continue;
                };
                if !registry.is_home_of(home, &manifest.residency) {
                    continue; // a replica; copied from its own home
                }
                for target in &targets {
                    if target.bucket == home.bucket {
                        continue;
                    }
                    let outcome = copy_version(
                        registry,
                        &home_store,
                        &manifest,
                        target,
                        !selection.to.is_empty(),
                        transfer,
                    )
                    .await?;
                    items.push(Item {
                        model: manifest.id(),
                        region: target.name.clone(),
                        outcome,
                    });
                }
            }
            copy_channels(registry, &home_store, &name, &targets).await?;
        }
    }
    Ok(items)
}

async fn copy_version(
    registry: &Registry,
    home: &Store,
    manifest: &Manifest,
    target: &Region,
    requested: bool,
    transfer: &Transfer,
) -> Result<Outcome, ReplicateError> {
    if !registry
        .topology
        .may_hold_model(&manifest.residency, target)
    {
        if requested {
            tracing::warn!(model = %manifest.id(), region = %target.name, residency = %manifest.residency, "refused to replicate outside the model's residency");
        }
        return Ok(Outcome::Refused { requested });
    }
    let dest = registry.store(target);
    dest.ensure_bucket().await?;
    if let Some(existing) = read_manifest(&dest, &manifest.name, &manifest.version).await?
        && existing.files == manifest.files
    {
        return Ok(Outcome::Present);
    }
    let scratch = tempfile::tempdir_in(&transfer.state_dir)
        .or_else(|_| tempfile::tempdir())
        .map_err(|source| PublishError::Io {
            path: transfer.state_dir.clone(),
            source,
        })?;
    let mut bytes = 0;
    for file in &manifest.files {
        let key = keys::file(&manifest.name, &manifest.version, &file.path);
        let local = scratch.path().join(hex(file.path.as_bytes()));
        let (size, sha) = home.download(&key, &local, file.size).await?;
        if size != file.size || hex(&sha) != file.sha256 {
            return Err(ReplicateError::Corrupt {
                bucket: home.bucket().to_owned(),
                key,
                what: format!("{size} bytes with sha256 {}", hex(&sha)),
            });
        }
        let local_file = LocalFile {
            path: file.path.clone(),
            disk: local.clone(),
            size,
        };
        let mut state = FileState::new(size, 0, transfer.part_size);
        let up = upload_file(&dest, &key, &local_file, &mut state, transfer, |_| Ok(())).await?;
        if hex(&up.sha256) != file.sha256 {
            return Err(ReplicateError::Corrupt {
                bucket: home.bucket().to_owned(),
                key,
                what: "changed on local disk during the copy".into(),
            });
        }
        bytes += size;
        let _ = std::fs::remove_file(&local);
    }
    dest.put(
        &keys::manifest(&manifest.name, &manifest.version),
        Bytes::from(manifest.to_json()),
    )
    .await?;
    tracing::info!(model = %manifest.id(), region = %target.name, bytes, "replicated");
    Ok(Outcome::Copied { bytes })
}

/// Copies channel pointers of `name` to the permitted targets whose copy
/// differs.
async fn copy_channels(
    registry: &Registry,
    home: &Store,
    name: &str,
    targets: &[&Region],
) -> Result<(), ReplicateError> {
    for listed in home.list(&format!("channels/{name}/")).await? {
        let Some((bytes, _)) = home.get_document(&listed.key).await? else {
            continue;
        };
        let Ok(channel) = earshot_common::manifest::Channel::from_json(&bytes) else {
            continue;
        };
        let Some((_, manifest)) = registry.find_version(name, &channel.version).await? else {
            continue;
        };
        for target in targets {
            if target.bucket == home.bucket()
                || !registry
                    .topology
                    .may_hold_model(&manifest.residency, target)
            {
                continue;
            }
            let dest = registry.store(target);
            let same = dest
                .get_document(&listed.key)
                .await?
                .is_some_and(|(b, _)| b == bytes);
            if !same {
                dest.put(&listed.key, bytes.clone()).await?;
            }
        }
    }
    Ok(())
}
