//! `earshot-registry`: the model registry. ML engineers publish, promote and
//! roll back model versions; `replicate` copies them to every region's
//! bucket the model's residency allows; the sync agent beside each node pulls,
//! verifies and atomically switches the node's `current` model directory.
//!
//! Storage is S3 through aws-sdk-s3 ([`store`]); one machine runs an embedded
//! S3 server ([`server`]) and uses the same code path. The layout and every
//! command are described in `docs/registry.md`.

pub mod channels;
pub mod metrics;
pub mod publish;
pub mod replicate;
pub mod server;
pub mod status;
pub mod store;
pub mod sync;
pub mod validate;

use std::sync::Arc;

use earshot_common::manifest::{MANIFEST_FILE, Manifest, keys};
use earshot_common::topology::{Region, Topology};

use store::{S3Settings, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "the topology has no [registry] section: add one with the S3 endpoint and [registry.home]"
    )]
    NoRegistry,
    #[error(
        "no region may hold models of residency {0:?}: add it to [registry.home] in the topology"
    )]
    NoHome(String),
    #[error("no region named {0:?} in the topology")]
    UnknownRegion(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key} in bucket {bucket} is not a valid manifest: {reason}")]
    BadManifest {
        bucket: String,
        key: String,
        reason: String,
    },
}

/// The topology's view of the registry: one bucket per region, homes per
/// residency, one S3 client.
#[derive(Debug, Clone)]
pub struct Registry {
    pub topology: Arc<Topology>,
    client: aws_sdk_s3::Client,
}

impl Registry {
    pub fn new(topology: Arc<Topology>, settings: &S3Settings) -> Result<Self, RegistryError> {
        if topology.registry().is_none() {
            return Err(RegistryError::NoRegistry);
        }
        Ok(Registry {
            client: settings.client(),
            topology,
        })
    }

    /// Connection settings from the topology's endpoint and the
    /// environment's credentials.
    pub fn from_env(topology: Arc<Topology>) -> Result<Self, RegistryError> {
        let endpoint = topology
            .registry()
            .ok_or(RegistryError::NoRegistry)?
            .endpoint
            .clone();
        let settings = S3Settings::from_env(endpoint)?;
        Registry::new(topology, &settings)
    }

    pub fn region(&self, name: &str) -> Result<&Region, RegistryError> {
        self.topology
            .region(name)
            .ok_or_else(|| RegistryError::UnknownRegion(name.to_owned()))
    }

    pub fn store(&self, region: &Region) -> Store {
        Store::new(self.client.clone(), region.bucket.clone())
    }

    /// The home region and bucket for models of `residency`.
    pub fn home(&self, residency: &str) -> Result<(&Region, Store), RegistryError> {
        let region = self
            .topology
            .registry_home(residency)
            .ok_or_else(|| RegistryError::NoHome(residency.to_owned()))?;
        Ok((region, self.store(region)))
    }

    /// Every distinct home region, global home first.
    pub fn homes(&self) -> Vec<&Region> {
        let mut out: Vec<&Region> = Vec::new();
        if let Some(registry) = self.topology.registry() {
            let global = registry.home.get(earshot_common::manifest::GLOBAL);
            for name in global.into_iter().chain(registry.home.values()) {
                if let Some(r) = self.topology.region(name)
                    && !out.iter().any(|o| o.name == r.name)
                {
                    out.push(r);
                }
            }
        }
        out
    }

    /// Creates every region's bucket if missing.
    pub async fn ensure_buckets(&self) -> Result<(), RegistryError> {
        for region in self.topology.regions() {
            self.store(region).ensure_bucket().await?;
        }
        Ok(())
    }

    /// Whether `home` is where versions of `residency` are published (a
    /// home bucket also holds replicas of other homes' versions).
    pub fn is_home_of(&self, home: &Region, residency: &str) -> bool {
        self.topology
            .registry_home(residency)
            .is_some_and(|h| h.name == home.name)
    }

    /// Finds a published version in the home buckets.
    pub async fn find_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<(&Region, Manifest)>, RegistryError> {
        for home in self.homes() {
            if let Some(m) = read_manifest(&self.store(home), name, version).await? {
                return Ok(Some((home, m)));
            }
        }
        Ok(None)
    }
}

/// Reads and validates `models/<name>/<version>/manifest.json`; `None` when
/// the version does not exist there.
pub async fn read_manifest(
    store: &Store,
    name: &str,
    version: &str,
) -> Result<Option<Manifest>, RegistryError> {
    let key = keys::manifest(name, version);
    let Some((bytes, _)) = store.get_document(&key).await? else {
        return Ok(None);
    };
    let manifest = Manifest::from_json(&bytes).map_err(|e| RegistryError::BadManifest {
        bucket: store.bucket().to_owned(),
        key: key.clone(),
        reason: e.to_string(),
    })?;
    if manifest.name != name || manifest.version != version {
        return Err(RegistryError::BadManifest {
            bucket: store.bucket().to_owned(),
            key,
            reason: format!("it describes {} instead", manifest.id()),
        });
    }
    Ok(Some(manifest))
}

/// Versions of `name` with a manifest in `store`, sorted.
pub async fn list_versions(store: &Store, name: &str) -> Result<Vec<String>, RegistryError> {
    let mut out = Vec::new();
    for dir in store.list_dirs(&format!("models/{name}/")).await? {
        let version = dir
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        if store
            .head(&format!("{dir}{MANIFEST_FILE}"))
            .await?
            .is_some()
        {
            out.push(version);
        }
    }
    out.sort();
    Ok(out)
}

/// Model names with at least one object in `store`.
pub async fn list_models(store: &Store) -> Result<Vec<String>, RegistryError> {
    Ok(store
        .list_dirs("models/")
        .await?
        .into_iter()
        .filter_map(|d| {
            d.trim_end_matches('/')
                .rsplit('/')
                .next()
                .map(str::to_owned)
        })
        .collect())
}

/// RFC 3339 UTC "now", second precision.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}
