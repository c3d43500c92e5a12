//! `promote` and `rollback`: move a channel to a version.
//!
//! The authoritative copy of `channels/<name>/<channel>.json` lives in the
//! home bucket of the model's residency and changes only by compare-and-swap
//! (`If-Match` on the ETag read, `If-None-Match: *` for a new channel), so
//! two engineers promoting at once cannot overwrite each other: one wins,
//! the other gets [`ChannelError::Conflict`] and sees what won. The winner
//! then copies the pointer to every region bucket that may hold the model,
//! where the sync agents read it.

use bytes::Bytes;
use earshot_common::manifest::{Channel, MANIFEST_SCHEMA, Manifest, Rollout, keys};

use crate::store::Put;
use crate::{Registry, RegistryError, now_rfc3339, read_manifest};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{name}@{version} is not published")]
    NoSuchVersion { name: String, version: String },
    #[error("channel {name}/{channel} does not exist yet: promote a version to it first")]
    NoSuchChannel { name: String, channel: String },
    #[error("channel {name}/{channel} has no previous version to roll back to")]
    NoPrevious { name: String, channel: String },
    #[error(
        "channel {name}/{channel} changed while this update was prepared (now {version}, generation {generation}, by {by} at {at}): re-run if that is still what you want"
    )]
    Conflict {
        name: String,
        channel: String,
        version: String,
        generation: u64,
        by: String,
        at: String,
    },
    #[error(
        "region {region:?} may not hold {model} (residency {residency}): the rollout cannot name it"
    )]
    RegionForbidden {
        region: String,
        model: String,
        residency: String,
    },
    #[error("percent {0} is not between 0 and 100")]
    Percent(u8),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("channel file is invalid: {0}")]
    Invalid(String),
}

impl From<crate::store::StoreError> for ChannelError {
    fn from(e: crate::store::StoreError) -> Self {
        ChannelError::Registry(e.into())
    }
}

/// The result of a channel update.
#[derive(Debug, Clone)]
pub struct Updated {
    pub channel: Channel,
    /// Region buckets that received the pointer.
    pub propagated: Vec<String>,
    /// Permitted regions whose bucket does not hold the version yet: their
    /// nodes keep their current model until `replicate` copies it.
    pub lagging: Vec<String>,
}

/// Reads a channel from the model's home bucket, with its ETag.
pub async fn read_channel(
    registry: &Registry,
    residency: &str,
    name: &str,
    channel: &str,
) -> Result<Option<(Channel, String)>, ChannelError> {
    let (_, store) = registry.home(residency)?;
    match store.get_document(&keys::channel(name, channel)).await? {
        Some((bytes, etag)) => Ok(Some((
            Channel::from_json(&bytes).map_err(|e| ChannelError::Invalid(e.to_string()))?,
            etag,
        ))),
        None => Ok(None),
    }
}

/// Points `channel` at `version` with `rollout`.
pub async fn promote(
    registry: &Registry,
    name: &str,
    channel: &str,
    version: &str,
    rollout: Rollout,
    by: &str,
) -> Result<Updated, ChannelError> {
    if rollout.percent > 100 {
        return Err(ChannelError::Percent(rollout.percent));
    }
    let (_, manifest) =
        registry
            .find_version(name, version)
            .await?
            .ok_or_else(|| ChannelError::NoSuchVersion {
                name: name.to_owned(),
                version: version.to_owned(),
            })?;
    for region in &rollout.regions {
        let r = registry.region(region)?;
        if !registry.topology.may_hold_model(&manifest.residency, r) {
            return Err(ChannelError::RegionForbidden {
                region: region.clone(),
                model: manifest.id(),
                residency: manifest.residency.clone(),
            });
        }
    }
    let current = read_channel(registry, &manifest.residency, name, channel).await?;
    let (previous, generation, etag) = match &current {
        Some((c, etag)) if c.version == version => {
            (c.previous.clone(), c.generation + 1, Some(etag.clone()))
        }
        Some((c, etag)) => (
            Some(c.version.clone()),
            c.generation + 1,
            Some(etag.clone()),
        ),
        None => (None, 1, None),
    };
    let next = Channel {
        schema: MANIFEST_SCHEMA,
        name: name.to_owned(),
        channel: channel.to_owned(),
        version: version.to_owned(),
        previous,
        rollout,
        updated_by: by.to_owned(),
        updated_at: now_rfc3339(),
        generation,
    };
    swap(registry, &manifest, next, etag).await
}

/// Points `channel` back at its previous version (same rollout).
pub async fn rollback(
    registry: &Registry,
    name: &str,
    channel: &str,
    by: &str,
) -> Result<Updated, ChannelError> {
    // The channel lives in the home of the model's residency; find it.
    let mut found = None;
    for home in registry.homes() {
        if let Some((bytes, etag)) = registry
            .store(home)
            .get_document(&keys::channel(name, channel))
            .await?
        {
            found = Some((
                Channel::from_json(&bytes).map_err(|e| ChannelError::Invalid(e.to_string()))?,
                etag,
            ));
            break;
        }
    }
    let (current, etag) = found.ok_or_else(|| ChannelError::NoSuchChannel {
        name: name.to_owned(),
        channel: channel.to_owned(),
    })?;
    let previous = current
        .previous
        .clone()
        .ok_or_else(|| ChannelError::NoPrevious {
            name: name.to_owned(),
            channel: channel.to_owned(),
        })?;
    let (_, manifest) = registry
        .find_version(name, &previous)
        .await?
        .ok_or_else(|| ChannelError::NoSuchVersion {
            name: name.to_owned(),
            version: previous.clone(),
        })?;
    let next = Channel {
        version: previous,
        previous: Some(current.version.clone()),
        updated_by: by.to_owned(),
        updated_at: now_rfc3339(),
        generation: current.generation + 1,
        ..current
    };
    swap(registry, &manifest, next, Some(etag)).await
}

async fn swap(
    registry: &Registry,
    manifest: &Manifest,
    next: Channel,
    etag: Option<String>,
) -> Result<Updated, ChannelError> {
    // What every reader will check: never write a file they refuse.
    next.validate()
        .map_err(|e| ChannelError::Invalid(e.to_string()))?;
    let (_, home) = registry.home(&manifest.residency)?;
    let key = keys::channel(&next.name, &next.channel);
    let body = Bytes::from(next.to_json());
    let written = match &etag {
        Some(etag) => home.put_if_match(&key, body.clone(), etag).await?,
        None => home.put_new(&key, body.clone()).await?,
    };
    if written == Put::Conflict {
        let now = read_channel(registry, &manifest.residency, &next.name, &next.channel).await?;
        let (version, generation, by, at) = now
            .map(|(c, _)| (c.version, c.generation, c.updated_by, c.updated_at))
            .unwrap_or_default();
        return Err(ChannelError::Conflict {
            name: next.name.clone(),
            channel: next.channel.clone(),
            version,
            generation,
            by,
            at,
        });
    }
    let mut propagated = Vec::new();
    let mut lagging = Vec::new();
    for region in registry.topology.regions() {
        if !registry
            .topology
            .may_hold_model(&manifest.residency, region)
        {
            continue;
        }
        let store = registry.store(region);
        if store.bucket() != home.bucket() {
            store.put(&key, body.clone()).await?;
        }
        propagated.push(region.name.clone());
        if read_manifest(&store, &manifest.name, &next.version)
            .await?
            .is_none()
        {
            lagging.push(region.name.clone());
        }
    }
    tracing::info!(
        channel = %format!("{}/{}", next.name, next.channel),
        version = %next.version,
        generation = next.generation,
        ?lagging,
        "channel updated"
    );
    Ok(Updated {
        channel: next,
        propagated,
        lagging,
    })
}
