//! `list`, `show` and `status`: what is published, where it has been copied,
//! what each channel points at, and what every node runs.

use earshot_common::manifest::{Channel, Manifest};
use serde::Serialize;

use crate::sync::NodeStatus;
use crate::{Registry, RegistryError, list_models, list_versions, read_manifest};

/// One published version and the regions holding it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionRow {
    pub model: String,
    pub version: String,
    pub tier: String,
    pub kind: String,
    pub format: String,
    pub quantization: String,
    pub residency: String,
    pub bytes: u64,
    pub created: String,
    pub home: String,
    /// Regions whose bucket holds this version (home included).
    pub regions: Vec<String>,
}

fn lower<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Every version in the home buckets (of `name`, if given).
pub async fn list(
    registry: &Registry,
    name: Option<&str>,
) -> Result<Vec<VersionRow>, RegistryError> {
    let mut rows = Vec::new();
    for home in registry.homes() {
        let store = registry.store(home);
        let names = match name {
            Some(n) => vec![n.to_owned()],
            None => list_models(&store).await?,
        };
        for model in names {
            for version in list_versions(&store, &model).await? {
                let Some(m) = read_manifest(&store, &model, &version).await? else {
                    continue;
                };
                if !registry.is_home_of(home, &m.residency) {
                    continue; // a replica; listed from its own home
                }
                let mut regions = Vec::new();
                for region in registry.topology.regions() {
                    if read_manifest(&registry.store(region), &model, &version)
                        .await
                        .ok()
                        .flatten()
                        .is_some()
                    {
                        regions.push(region.name.clone());
                    }
                }
                rows.push(row(&m, &home.name, regions));
            }
        }
    }
    rows.sort_by(|a, b| (&a.model, &a.version).cmp(&(&b.model, &b.version)));
    Ok(rows)
}

fn row(m: &Manifest, home: &str, regions: Vec<String>) -> VersionRow {
    VersionRow {
        model: m.name.clone(),
        version: m.version.clone(),
        tier: lower(&m.tier),
        kind: lower(&m.kind),
        format: lower(&m.format),
        quantization: lower(&m.quantization),
        residency: m.residency.clone(),
        bytes: m.total_size(),
        created: m.lineage.created.clone(),
        home: home.to_owned(),
        regions,
    }
}

/// What one region's bucket and nodes say.
#[derive(Debug, Clone, Serialize)]
pub struct RegionStatus {
    pub region: String,
    pub bucket: String,
    /// Set when the bucket could not be read.
    pub error: Option<String>,
    /// `name@version` present in the bucket.
    pub versions: Vec<String>,
    pub channels: Vec<Channel>,
    pub nodes: Vec<NodeStatus>,
}

/// Per region: versions present, channel pointers, node reports.
pub async fn status(registry: &Registry, name: Option<&str>) -> Vec<RegionStatus> {
    let mut out = Vec::new();
    for region in registry.topology.regions() {
        let store = registry.store(region);
        let mut s = RegionStatus {
            region: region.name.clone(),
            bucket: region.bucket.clone(),
            error: None,
            versions: Vec::new(),
            channels: Vec::new(),
            nodes: Vec::new(),
        };
        if let Err(e) = fill(&store, name, &mut s).await {
            s.error = Some(e.to_string());
        }
        out.push(s);
    }
    out
}

async fn fill(
    store: &crate::store::Store,
    name: Option<&str>,
    s: &mut RegionStatus,
) -> Result<(), RegistryError> {
    let names = match name {
        Some(n) => vec![n.to_owned()],
        None => list_models(store).await?,
    };
    for model in &names {
        for version in list_versions(store, model).await? {
            s.versions.push(format!("{model}@{version}"));
        }
        for listed in store.list(&format!("channels/{model}/")).await? {
            if let Some((bytes, _)) = store.get_document(&listed.key).await?
                && let Ok(c) = Channel::from_json(&bytes)
            {
                s.channels.push(c);
            }
        }
    }
    for listed in store.list("status/nodes/").await? {
        if let Some((bytes, _)) = store.get_document(&listed.key).await?
            && let Ok(node) = serde_json::from_slice::<NodeStatus>(&bytes)
            && name.is_none_or(|n| node.model == n)
        {
            s.nodes.push(node);
        }
    }
    Ok(())
}

/// Formats rows as an aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Bytes in a human unit.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["a", "bb"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "a    bb\nxxx  y\nz\n");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }
}
