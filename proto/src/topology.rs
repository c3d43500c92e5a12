//! The topology file: jurisdictions, regions, edges, and the residency policy
//! that decides which regions may process a session.
//!
//! The file is TOML. Loading it rejects anything that could route audio
//! somewhere it must not go: unknown fields, duplicate names, references to
//! regions or jurisdictions that do not exist, and an edge whose region list
//! contains a region its (strict) jurisdiction forbids.
//!
//! ```toml
//! [[jurisdiction]]
//! name = "eu"
//! strict = true      # audio may only be processed in regions of this jurisdiction
//!
//! [[region]]
//! name = "eu-west"
//! jurisdiction = "eu"
//! quic = "127.0.0.1:7401"   # where edges dial the region's QUIC ingress
//!
//! [[edge]]
//! name = "edge-fra"
//! jurisdiction = "eu"
//! regions = ["eu-west"]     # in order of preference
//! ```

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

/// Why a topology file was rejected. Every message names the offending entry
/// and says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("topology is not valid TOML or has an unknown field: {0}")]
    Parse(String),
    #[error("topology defines no {0}: add at least one [[{0}]] table")]
    Missing(&'static str),
    #[error(
        "{kind} name {name:?} is invalid: use 1-63 lowercase letters, digits and '-', starting with a letter (names become DNS labels and Redis keys)"
    )]
    InvalidName { kind: &'static str, name: String },
    #[error("{kind} {name:?} is defined twice: names must be unique")]
    Duplicate { kind: &'static str, name: String },
    #[error(
        "{kind} {name:?} names jurisdiction {jurisdiction:?}, which no [[jurisdiction]] defines"
    )]
    UnknownJurisdiction {
        kind: &'static str,
        name: String,
        jurisdiction: String,
    },
    #[error("edge {edge:?} lists region {region:?}, which no [[region]] defines")]
    UnknownRegion { edge: String, region: String },
    #[error("edge {edge:?} lists region {region:?} twice")]
    RepeatedRegion { edge: String, region: String },
    #[error("edge {edge:?} has an empty region list: give it at least one region")]
    NoRegions { edge: String },
    #[error(
        "edge {edge:?} is in strict jurisdiction {jurisdiction:?} but lists region {region:?} of jurisdiction {region_jurisdiction:?}: audio from {jurisdiction:?} may only be processed in {jurisdiction:?} regions; remove {region:?} from the edge's regions"
    )]
    ForbiddenRegion {
        edge: String,
        jurisdiction: String,
        region: String,
        region_jurisdiction: String,
    },
    #[error("region {region:?} has an invalid quic endpoint {endpoint:?}: expected host:port")]
    InvalidEndpoint { region: String, endpoint: String },
    #[error("regions {first:?} and {second:?} share the quic endpoint {endpoint:?}")]
    SharedEndpoint {
        first: String,
        second: String,
        endpoint: String,
    },
    #[error("no edge named {0:?} in the topology")]
    UnknownEdge(String),
    #[error(
        "region {region:?} has an invalid bucket name {bucket:?}: use 3-63 lowercase letters, digits, '-' and '.'"
    )]
    InvalidBucket { region: String, bucket: String },
    #[error("regions {first:?} and {second:?} share the registry bucket {bucket:?}")]
    SharedBucket {
        first: String,
        second: String,
        bucket: String,
    },
    #[error("[registry.home] {residency:?} = {region:?}: {problem}")]
    InvalidHome {
        residency: String,
        region: String,
        problem: &'static str,
    },
    #[error("[registry.home] must name a region for \"global\" models")]
    NoGlobalHome,
    #[error(
        "edge {edge:?} has an invalid address {address:?}: expected an IP address (GeoDNS answers it)"
    )]
    InvalidAddress { edge: String, address: String },
    #[error("edges {first:?} and {second:?} share the address {address:?}")]
    SharedAddress {
        first: String,
        second: String,
        address: String,
    },
    #[error("[geodns]: {0}")]
    GeoDns(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    #[serde(default, rename = "jurisdiction")]
    jurisdictions: Vec<Jurisdiction>,
    #[serde(default, rename = "region")]
    regions: Vec<RawRegion>,
    #[serde(default, rename = "edge")]
    edges: Vec<Edge>,
    registry: Option<Registry>,
    geodns: Option<GeoDns>,
}

/// Where the model registry lives: an S3 endpoint, and the region whose
/// bucket is the home (publication target) for each residency. A model of
/// residency `eu` is published to the `eu` home and replicated only to
/// regions of jurisdiction `eu`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// S3 endpoint URL for every bucket (e.g. the embedded server); omit
    /// to use AWS's endpoints.
    pub endpoint: Option<String>,
    /// Residency (`global` or a jurisdiction) → home region.
    pub home: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: String,
    jurisdiction: String,
    quic: String,
    tls_name: Option<String>,
    bucket: Option<String>,
}

/// A legal area whose rules decide where audio may be processed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jurisdiction {
    pub name: String,
    /// A strict jurisdiction's sessions are processed only in regions of the
    /// same jurisdiction.
    #[serde(default)]
    pub strict: bool,
}

/// A regional cluster: QUIC ingress, queue and GPU workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub jurisdiction: String,
    /// `host:port` of the region's QUIC ingress.
    pub quic: String,
    /// The DNS name the region's certificate is issued for; defaults to the
    /// region name.
    pub tls_name: String,
    /// The region's model registry bucket; defaults to
    /// `earshot-models-<name>`.
    pub bucket: String,
}

/// An edge node: where clients connect. Sessions take the edge's jurisdiction.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    pub name: String,
    pub jurisdiction: String,
    /// Regions to use, most preferred first.
    pub regions: Vec<String>,
    /// The IP address clients reach the edge at (on `[geodns] port`):
    /// what GeoDNS answers and health-checks. Required with `[geodns]`.
    pub address: Option<String>,
}

/// The GeoDNS service clients resolve to find an edge: which client
/// networks belong to which jurisdiction, and how edges are health-checked.
/// Rendered into a gdnsd configuration (and Route 53 records), so a client
/// of a jurisdiction's networks is only ever answered with that
/// jurisdiction's edges.
///
/// ```toml
/// [geodns]
/// zone = "earshot.test"
/// port = 8080            # every edge's client port on its address
/// default = "us"         # whose edges answer clients in no listed network
/// [[geodns.clients]]
/// jurisdiction = "eu"
/// nets = ["10.1.0.0/16"]
/// edges = ["edge-eu-1", "edge-eu-2"]   # optional: the failover order
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoDns {
    /// The DNS zone served, e.g. `earshot.test`.
    pub zone: String,
    /// The name clients resolve inside the zone.
    #[serde(default = "default_geodns_name")]
    pub name: String,
    /// The port every edge listens on for clients and health checks.
    pub port: u16,
    /// Seconds a resolver may cache an answer.
    #[serde(default = "default_geodns_ttl")]
    pub ttl: u32,
    /// The jurisdiction whose edges answer clients in no listed network.
    pub default: String,
    /// Where gdnsd listens (`ip:port`); `earshot up` runs it there.
    #[serde(default = "default_geodns_listen")]
    pub listen: String,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub clients: Vec<ClientNets>,
}

/// How GeoDNS health-checks each edge's `/readyz`. gdnsd's defaults (10 s
/// interval, 10 failures) take about 100 s to mark an edge down; these take
/// `interval_s × down_after` (4 s), at the cost of one flap per
/// `down_after` failed checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Seconds between checks (gdnsd's minimum is 2).
    pub interval_s: u32,
    /// Seconds a check may take (less than the interval).
    pub timeout_s: u32,
    /// Failed checks that mark an edge down.
    pub down_after: u32,
    /// Successful checks in a row that bring it back.
    pub up_after: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            interval_s: 2,
            timeout_s: 1,
            down_after: 2,
            up_after: 3,
        }
    }
}

/// Client networks of one jurisdiction, and the edges they are answered
/// with, in failover order (by default the jurisdiction's edges in
/// topology order).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientNets {
    pub jurisdiction: String,
    /// `address/prefix` networks (IPv4 or IPv6).
    pub nets: Vec<String>,
    #[serde(default)]
    pub edges: Vec<String>,
}

fn default_geodns_name() -> String {
    "listen".into()
}

fn default_geodns_ttl() -> u32 {
    5
}

fn default_geodns_listen() -> String {
    "127.0.0.1:5353".into()
}

/// A validated topology. Construct it with [`Topology::load`] or
/// [`Topology::from_toml_str`]; every reference inside it resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    jurisdictions: Vec<Jurisdiction>,
    regions: Vec<Region>,
    edges: Vec<Edge>,
    registry: Option<Registry>,
    geodns: Option<GeoDns>,
}

/// The most bytes a topology file may have (a planet's is a few KiB).
pub const MAX_TOPOLOGY_BYTES: usize = 1 << 20;

impl Topology {
    /// Reads and validates a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        use std::io::Read;
        let read_err = |reason: String| TopologyError::Read {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_TOPOLOGY_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(|e| read_err(e.to_string()))?;
        if text.len() > MAX_TOPOLOGY_BYTES {
            return Err(read_err(format!(
                "larger than the {MAX_TOPOLOGY_BYTES}-byte limit for a topology file"
            )));
        }
        Self::from_toml_str(&text)
    }

    /// Parses and validates topology TOML.
    pub fn from_toml_str(text: &str) -> Result<Self, TopologyError> {
        let raw: RawTopology =
            toml::from_str(text).map_err(|e| TopologyError::Parse(e.to_string()))?;
        let regions = raw
            .regions
            .into_iter()
            .map(|r| Region {
                tls_name: r.tls_name.unwrap_or_else(|| r.name.clone()),
                bucket: r
                    .bucket
                    .unwrap_or_else(|| format!("earshot-models-{}", r.name)),
                name: r.name,
                jurisdiction: r.jurisdiction,
                quic: r.quic,
            })
            .collect();
        let topology = Topology {
            jurisdictions: raw.jurisdictions,
            regions,
            edges: raw.edges,
            registry: raw.registry,
            geodns: raw.geodns,
        };
        topology.validate()?;
        Ok(topology)
    }

    fn validate(&self) -> Result<(), TopologyError> {
        if self.jurisdictions.is_empty() {
            return Err(TopologyError::Missing("jurisdiction"));
        }
        if self.regions.is_empty() {
            return Err(TopologyError::Missing("region"));
        }
        unique_valid_names("jurisdiction", self.jurisdictions.iter().map(|j| &j.name))?;
        unique_valid_names("region", self.regions.iter().map(|r| &r.name))?;
        unique_valid_names("edge", self.edges.iter().map(|e| &e.name))?;

        let mut endpoints: Vec<(&str, &str)> = Vec::new();
        for region in &self.regions {
            self.require_jurisdiction("region", &region.name, &region.jurisdiction)?;
            if !is_host_port(&region.quic) {
                return Err(TopologyError::InvalidEndpoint {
                    region: region.name.clone(),
                    endpoint: region.quic.clone(),
                });
            }
            if let Some((first, _)) = endpoints.iter().find(|(_, e)| *e == region.quic) {
                return Err(TopologyError::SharedEndpoint {
                    first: (*first).to_owned(),
                    second: region.name.clone(),
                    endpoint: region.quic.clone(),
                });
            }
            endpoints.push((&region.name, &region.quic));
            if !is_valid_bucket(&region.bucket) {
                return Err(TopologyError::InvalidBucket {
                    region: region.name.clone(),
                    bucket: region.bucket.clone(),
                });
            }
            if let Some(first) = self
                .regions
                .iter()
                .find(|r| r.bucket == region.bucket && r.name != region.name)
            {
                return Err(TopologyError::SharedBucket {
                    first: first.name.clone(),
                    second: region.name.clone(),
                    bucket: region.bucket.clone(),
                });
            }
        }
        if let Some(registry) = &self.registry {
            self.validate_registry(registry)?;
        }
        self.validate_addresses()?;
        if let Some(geodns) = &self.geodns {
            self.validate_geodns(geodns)?;
        }

        for edge in &self.edges {
            self.require_jurisdiction("edge", &edge.name, &edge.jurisdiction)?;
            if edge.regions.is_empty() {
                return Err(TopologyError::NoRegions {
                    edge: edge.name.clone(),
                });
            }
            let mut seen = HashSet::new();
            for name in &edge.regions {
                if !seen.insert(name) {
                    return Err(TopologyError::RepeatedRegion {
                        edge: edge.name.clone(),
                        region: name.clone(),
                    });
                }
                let region = self
                    .region(name)
                    .ok_or_else(|| TopologyError::UnknownRegion {
                        edge: edge.name.clone(),
                        region: name.clone(),
                    })?;
                if !self.may_process(&edge.jurisdiction, region) {
                    return Err(TopologyError::ForbiddenRegion {
                        edge: edge.name.clone(),
                        jurisdiction: edge.jurisdiction.clone(),
                        region: region.name.clone(),
                        region_jurisdiction: region.jurisdiction.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn validate_addresses(&self) -> Result<(), TopologyError> {
        let mut seen: Vec<(&str, std::net::IpAddr)> = Vec::new();
        for edge in &self.edges {
            let Some(address) = &edge.address else {
                continue;
            };
            let ip: std::net::IpAddr =
                address.parse().map_err(|_| TopologyError::InvalidAddress {
                    edge: edge.name.clone(),
                    address: address.clone(),
                })?;
            if let Some((first, _)) = seen.iter().find(|(_, a)| *a == ip) {
                return Err(TopologyError::SharedAddress {
                    first: (*first).to_owned(),
                    second: edge.name.clone(),
                    address: address.clone(),
                });
            }
            seen.push((&edge.name, ip));
        }
        Ok(())
    }

    fn validate_geodns(&self, g: &GeoDns) -> Result<(), TopologyError> {
        let fail = |m: String| Err(TopologyError::GeoDns(m));
        if !is_dns_name(&g.zone) {
            return fail(format!("zone {:?} is not a DNS name", g.zone));
        }
        if !is_valid_name(&g.name) {
            return fail(format!("name {:?} is not a DNS label", g.name));
        }
        if g.port == 0 {
            return fail("port must be the edges' client port, not 0".into());
        }
        if !is_host_port(&g.listen) || g.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(format!("listen {:?} is not ip:port", g.listen));
        }
        if !(1..=3600).contains(&g.ttl) {
            return fail(format!("ttl {} is outside 1-3600 s", g.ttl));
        }
        let h = &g.health;
        if h.interval_s < 2 || h.interval_s > 3600 {
            return fail(format!(
                "health.interval_s {} is outside 2-3600 (gdnsd's range)",
                h.interval_s
            ));
        }
        if h.timeout_s == 0 || h.timeout_s >= h.interval_s {
            return fail("health.timeout_s must be at least 1 and less than interval_s".into());
        }
        if !(1..=65535).contains(&h.down_after) || !(1..=65535).contains(&h.up_after) {
            return fail("health.down_after and health.up_after must be 1-65535".into());
        }
        if let Some(e) = self.edges.iter().find(|e| e.address.is_none()) {
            return fail(format!(
                "edge {:?} has no address: GeoDNS needs one for every edge",
                e.name
            ));
        }
        if self.edges_for(&g.default).is_empty() {
            return fail(format!(
                "default {:?} must be a jurisdiction with at least one edge",
                g.default
            ));
        }
        let mut nets = HashSet::new();
        for c in &g.clients {
            if self.jurisdiction(&c.jurisdiction).is_none() {
                return fail(format!(
                    "clients of jurisdiction {:?}: no [[jurisdiction]] defines it",
                    c.jurisdiction
                ));
            }
            if c.nets.is_empty() {
                return fail(format!("clients of {:?} list no nets", c.jurisdiction));
            }
            for net in &c.nets {
                if !is_network(net) {
                    return fail(format!("{net:?} is not an address/prefix network"));
                }
                if !nets.insert(net) {
                    return fail(format!("network {net:?} is listed twice"));
                }
            }
            for name in &c.edges {
                match self.edge(name) {
                    None => {
                        return fail(format!(
                            "clients of {:?} list unknown edge {name:?}",
                            c.jurisdiction
                        ));
                    }
                    Some(e) if e.jurisdiction != c.jurisdiction => {
                        return fail(format!(
                            "clients of {:?} list edge {name:?} of jurisdiction {:?}: clients are answered only with edges of their own jurisdiction",
                            c.jurisdiction, e.jurisdiction
                        ));
                    }
                    Some(_) => {}
                }
            }
            if self.geodns_edges(c).is_empty() {
                return fail(format!(
                    "jurisdiction {:?} has no edges to answer its clients with",
                    c.jurisdiction
                ));
            }
        }
        Ok(())
    }

    fn validate_registry(&self, registry: &Registry) -> Result<(), TopologyError> {
        if !registry.home.contains_key(crate::manifest::GLOBAL) {
            return Err(TopologyError::NoGlobalHome);
        }
        for (residency, region) in &registry.home {
            let invalid = |problem| TopologyError::InvalidHome {
                residency: residency.clone(),
                region: region.clone(),
                problem,
            };
            let Some(r) = self.region(region) else {
                return Err(invalid("no such region"));
            };
            if residency != crate::manifest::GLOBAL {
                if self.jurisdiction(residency).is_none() {
                    return Err(invalid("the key must be \"global\" or a jurisdiction"));
                }
                if r.jurisdiction != *residency {
                    return Err(invalid(
                        "the home of a residency must be a region of that jurisdiction",
                    ));
                }
            }
        }
        Ok(())
    }

    fn require_jurisdiction(
        &self,
        kind: &'static str,
        name: &str,
        jurisdiction: &str,
    ) -> Result<(), TopologyError> {
        match self.jurisdiction(jurisdiction) {
            Some(_) => Ok(()),
            None => Err(TopologyError::UnknownJurisdiction {
                kind,
                name: name.to_owned(),
                jurisdiction: jurisdiction.to_owned(),
            }),
        }
    }

    pub fn jurisdictions(&self) -> &[Jurisdiction] {
        &self.jurisdictions
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    pub fn edges(&self) -> &[Edge] {
        &self.edges
    }

    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    pub fn geodns(&self) -> Option<&GeoDns> {
        self.geodns.as_ref()
    }

    /// The edges of `jurisdiction`, in topology order.
    pub fn edges_for(&self, jurisdiction: &str) -> Vec<&Edge> {
        self.edges
            .iter()
            .filter(|e| e.jurisdiction == jurisdiction)
            .collect()
    }

    /// The edges GeoDNS answers `clients` with, in failover order: the
    /// listed ones, else every edge of their jurisdiction. Only ever edges
    /// of the clients' own jurisdiction.
    pub fn geodns_edges(&self, clients: &ClientNets) -> Vec<&Edge> {
        let mut edges: Vec<&Edge> = if clients.edges.is_empty() {
            self.edges_for(&clients.jurisdiction)
        } else {
            clients.edges.iter().filter_map(|n| self.edge(n)).collect()
        };
        edges.retain(|e| e.jurisdiction == clients.jurisdiction);
        edges
    }

    /// May a model of `residency` (`global` or a jurisdiction) be stored
    /// and run in `region`? Fails closed for unknown residencies.
    pub fn may_hold_model(&self, residency: &str, region: &Region) -> bool {
        residency == crate::manifest::GLOBAL
            || (self.jurisdiction(residency).is_some() && region.jurisdiction == residency)
    }

    /// The home region of models of `residency`: its own entry in
    /// `[registry.home]`, else the global home when that is allowed to hold
    /// them. `None` when there is no registry or no permitted home.
    pub fn registry_home(&self, residency: &str) -> Option<&Region> {
        let home = &self.registry.as_ref()?.home;
        let name = home
            .get(residency)
            .or_else(|| home.get(crate::manifest::GLOBAL))?;
        self.region(name)
            .filter(|r| self.may_hold_model(residency, r))
    }

    pub fn jurisdiction(&self, name: &str) -> Option<&Jurisdiction> {
        self.jurisdictions.iter().find(|j| j.name == name)
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    pub fn edge(&self, name: &str) -> Option<&Edge> {
        self.edges.iter().find(|e| e.name == name)
    }

    /// The residency rule: may a session of `session_jurisdiction` be
    /// processed in `region`? Fails closed: an unknown jurisdiction may be
    /// processed nowhere.
    pub fn may_process(&self, session_jurisdiction: &str, region: &Region) -> bool {
        match self.jurisdiction(session_jurisdiction) {
            None => false,
            Some(j) if j.strict => region.jurisdiction == j.name,
            Some(_) => true,
        }
    }

    /// The regions that may process a session entering at `edge`, in the
    /// edge's order of preference. Loading already rejects forbidden entries;
    /// the filter here is a second, independent check.
    pub fn permitted_regions(&self, edge: &str) -> Result<Vec<&Region>, TopologyError> {
        let edge = self
            .edge(edge)
            .ok_or_else(|| TopologyError::UnknownEdge(edge.to_owned()))?;
        Ok(edge
            .regions
            .iter()
            .filter_map(|name| self.region(name))
            .filter(|region| self.may_process(&edge.jurisdiction, region))
            .collect())
    }
}

fn unique_valid_names<'a>(
    kind: &'static str,
    names: impl Iterator<Item = &'a String>,
) -> Result<(), TopologyError> {
    let mut seen = HashSet::new();
    for name in names {
        if !is_valid_name(name) {
            return Err(TopologyError::InvalidName {
                kind,
                name: name.clone(),
            });
        }
        if !seen.insert(name) {
            return Err(TopologyError::Duplicate {
                kind,
                name: name.clone(),
            });
        }
    }
    Ok(())
}

/// Names become DNS labels, Redis key parts and metric label values.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && !name.ends_with('-')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A DNS name of valid labels (`earshot.test`), at most 253 bytes.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_valid_name)
}

/// `address/prefix`, the prefix within the address family's width.
fn is_network(net: &str) -> bool {
    let Some((address, prefix)) = net.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

/// S3 bucket naming rules (the portable subset).
fn is_valid_bucket(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && !name.contains("..")
}

fn is_host_port(endpoint: &str) -> bool {
    if endpoint.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match endpoint.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(['[', ']', ' ', '/'])
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[jurisdiction]]
        name = "eu"
        strict = true

        [[jurisdiction]]
        name = "us"

        [[region]]
        name = "eu-west"
        jurisdiction = "eu"
        quic = "127.0.0.1:7401"

        [[region]]
        name = "eu-central"
        jurisdiction = "eu"
        quic = "eu-central.example.net:443"
        tls_name = "ingress.eu-central.example.net"

        [[region]]
        name = "us-east"
        jurisdiction = "us"
        quic = "127.0.0.1:7403"

        [[edge]]
        name = "edge-fra"
        jurisdiction = "eu"
        regions = ["eu-central", "eu-west"]

        [[edge]]
        name = "edge-nyc"
        jurisdiction = "us"
        regions = ["us-east", "eu-west"]
    "#;

    fn with(extra: &str) -> Result<Topology, TopologyError> {
        Topology::from_toml_str(&format!("{GOOD}\n{extra}"))
    }

    fn names(regions: Vec<&Region>) -> Vec<&str> {
        regions.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn a_good_topology_loads_and_keeps_edge_order() {
        let t = Topology::from_toml_str(GOOD).unwrap();
        assert_eq!(
            names(t.permitted_regions("edge-fra").unwrap()),
            ["eu-central", "eu-west"]
        );
        // A non-strict jurisdiction may use any region it lists.
        assert_eq!(
            names(t.permitted_regions("edge-nyc").unwrap()),
            ["us-east", "eu-west"]
        );
        assert_eq!(
            t.region("eu-central").unwrap().tls_name,
            "ingress.eu-central.example.net"
        );
        assert_eq!(t.region("eu-west").unwrap().tls_name, "eu-west");
    }

    #[test]
    fn residency_rule_is_strict_for_strict_jurisdictions_and_fails_closed() {
        let t = Topology::from_toml_str(GOOD).unwrap();
        let eu = t.region("eu-west").unwrap();
        let us = t.region("us-east").unwrap();
        assert!(t.may_process("eu", eu));
        assert!(!t.may_process("eu", us));
        assert!(t.may_process("us", eu));
        assert!(t.may_process("us", us));
        assert!(
            !t.may_process("mars", us),
            "unknown jurisdiction fails closed"
        );
    }

    #[test]
    fn unknown_edge_is_an_error() {
        let t = Topology::from_toml_str(GOOD).unwrap();
        assert_eq!(
            t.permitted_regions("edge-x"),
            Err(TopologyError::UnknownEdge("edge-x".into()))
        );
    }

    #[test]
    fn an_eu_edge_listing_a_us_region_is_rejected_with_a_fix() {
        let err = with(
            r#"
            [[edge]]
            name = "edge-par"
            jurisdiction = "eu"
            regions = ["eu-west", "us-east"]
        "#,
        )
        .unwrap_err();
        assert_eq!(
            err,
            TopologyError::ForbiddenRegion {
                edge: "edge-par".into(),
                jurisdiction: "eu".into(),
                region: "us-east".into(),
                region_jurisdiction: "us".into(),
            }
        );
        assert!(err.to_string().contains("remove \"us-east\""), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err =
            with("[[region]]\nname = \"x\"\njurisdiction = \"eu\"\nquic = \"a:1\"\ngpu = 4\n")
                .unwrap_err();
        assert!(
            matches!(&err, TopologyError::Parse(m) if m.contains("gpu")),
            "{err}"
        );
        let err = Topology::from_toml_str("regionz = []").unwrap_err();
        assert!(
            matches!(&err, TopologyError::Parse(m) if m.contains("regionz")),
            "{err}"
        );
    }

    #[test]
    fn duplicates_are_rejected() {
        assert_eq!(
            with("[[region]]\nname = \"eu-west\"\njurisdiction = \"eu\"\nquic = \"127.0.0.1:9\"\n"),
            Err(TopologyError::Duplicate {
                kind: "region",
                name: "eu-west".into()
            })
        );
        assert_eq!(
            with("[[edge]]\nname = \"edge-fra\"\njurisdiction = \"eu\"\nregions = [\"eu-west\"]\n"),
            Err(TopologyError::Duplicate {
                kind: "edge",
                name: "edge-fra".into()
            })
        );
        assert_eq!(
            with("[[jurisdiction]]\nname = \"eu\"\n"),
            Err(TopologyError::Duplicate {
                kind: "jurisdiction",
                name: "eu".into()
            })
        );
        assert_eq!(
            with(
                "[[edge]]\nname = \"e2\"\njurisdiction = \"us\"\nregions = [\"us-east\", \"us-east\"]\n"
            ),
            Err(TopologyError::RepeatedRegion {
                edge: "e2".into(),
                region: "us-east".into()
            })
        );
    }

    #[test]
    fn dangling_references_are_rejected() {
        assert_eq!(
            with("[[edge]]\nname = \"e2\"\njurisdiction = \"us\"\nregions = [\"ap-south\"]\n"),
            Err(TopologyError::UnknownRegion {
                edge: "e2".into(),
                region: "ap-south".into()
            })
        );
        assert_eq!(
            with("[[region]]\nname = \"r2\"\njurisdiction = \"uk\"\nquic = \"127.0.0.1:9\"\n"),
            Err(TopologyError::UnknownJurisdiction {
                kind: "region",
                name: "r2".into(),
                jurisdiction: "uk".into()
            })
        );
        assert_eq!(
            with("[[edge]]\nname = \"e2\"\njurisdiction = \"us\"\nregions = []\n"),
            Err(TopologyError::NoRegions { edge: "e2".into() })
        );
    }

    #[test]
    fn names_and_endpoints_are_checked() {
        for bad in ["EU", "", "-x", "x-", "a_b", "a.b", &"x".repeat(64)] {
            let text = format!("[[jurisdiction]]\nname = {bad:?}\n");
            assert!(
                matches!(
                    with(&text),
                    Err(TopologyError::InvalidName {
                        kind: "jurisdiction",
                        ..
                    })
                ),
                "{bad:?} accepted"
            );
        }
        for bad in [
            "localhost",
            "127.0.0.1",
            "host:0",
            "host:99999",
            ":80",
            "a b:1",
        ] {
            let text =
                format!("[[region]]\nname = \"r2\"\njurisdiction = \"us\"\nquic = {bad:?}\n");
            assert!(
                matches!(with(&text), Err(TopologyError::InvalidEndpoint { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            with("[[region]]\nname = \"r2\"\njurisdiction = \"us\"\nquic = \"127.0.0.1:7401\"\n"),
            Err(TopologyError::SharedEndpoint { .. })
        ));
        assert!(
            with("[[region]]\nname = \"r2\"\njurisdiction = \"us\"\nquic = \"[::1]:7409\"\n")
                .is_ok()
        );
    }

    const REGISTRY: &str = r#"
        [registry]
        endpoint = "http://127.0.0.1:9000"
        [registry.home]
        global = "us-east"
        eu = "eu-west"
    "#;

    #[test]
    fn registry_homes_follow_residency() {
        let t = with(REGISTRY).unwrap();
        assert_eq!(t.registry_home("global").unwrap().name, "us-east");
        assert_eq!(t.registry_home("eu").unwrap().name, "eu-west");
        // A residency without its own home falls back to the global home
        // only where that may hold it: `us` models may live in us-east...
        assert_eq!(t.registry_home("us").unwrap().name, "us-east");
        // ...but an unknown residency has no home at all.
        assert!(t.registry_home("mars").is_none());
        let eu_west = t.region("eu-west").unwrap();
        let us_east = t.region("us-east").unwrap();
        assert!(t.may_hold_model("eu", eu_west) && !t.may_hold_model("eu", us_east));
        assert!(t.may_hold_model("global", us_east));
        assert_eq!(eu_west.bucket, "earshot-models-eu-west");
    }

    #[test]
    fn registry_homes_are_validated() {
        let bad = REGISTRY.replace("eu = \"eu-west\"", "eu = \"us-east\"");
        assert!(matches!(with(&bad), Err(TopologyError::InvalidHome { .. })));
        let bad = REGISTRY.replace("global = \"us-east\"", "");
        assert_eq!(with(&bad), Err(TopologyError::NoGlobalHome));
        let bad = REGISTRY.replace("eu = \"eu-west\"", "eu = \"nowhere\"");
        assert!(matches!(with(&bad), Err(TopologyError::InvalidHome { .. })));
        let shared = "[[region]]\nname = \"r2\"\njurisdiction = \"us\"\nquic = \"127.0.0.1:9\"\nbucket = \"earshot-models-us-east\"\n";
        assert!(matches!(
            with(shared),
            Err(TopologyError::SharedBucket { .. })
        ));
        let badname = "[[region]]\nname = \"r2\"\njurisdiction = \"us\"\nquic = \"127.0.0.1:9\"\nbucket = \"Models_R2\"\n";
        assert!(matches!(
            with(badname),
            Err(TopologyError::InvalidBucket { .. })
        ));
    }

    #[test]
    fn empty_topologies_are_rejected() {
        assert_eq!(
            Topology::from_toml_str(""),
            Err(TopologyError::Missing("jurisdiction"))
        );
        assert_eq!(
            Topology::from_toml_str("[[jurisdiction]]\nname = \"eu\"\n"),
            Err(TopologyError::Missing("region"))
        );
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = Topology::load(Path::new("/nonexistent/topology.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/topology.toml"));
    }
}

#[cfg(test)]
mod shipped_files {
    use super::*;

    /// Every topology file in `topology/` loads, and no EU edge can reach a
    /// non-EU region.
    #[test]
    fn the_repository_s_topologies_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let t = Topology::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                for edge in t.edges() {
                    for region in t.permitted_regions(&edge.name).unwrap() {
                        let strict = t.jurisdiction(&edge.jurisdiction).unwrap().strict;
                        assert!(!strict || region.jurisdiction == edge.jurisdiction);
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 0);
    }

    fn local() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology/local.toml");
        std::fs::read_to_string(path).unwrap()
    }

    fn geodns_error(text: &str) -> String {
        match Topology::from_toml_str(text) {
            Err(TopologyError::GeoDns(m)) => m,
            other => panic!("expected a [geodns] error, got {other:?}"),
        }
    }

    #[test]
    fn geodns_answers_clients_only_with_edges_of_their_jurisdiction() {
        let t = Topology::from_toml_str(&local()).unwrap();
        let g = t.geodns().unwrap();
        let eu = g.clients.iter().find(|c| c.jurisdiction == "eu").unwrap();
        let names: Vec<&str> = t.geodns_edges(eu).iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["edge-eu-1", "edge-eu-2"]);

        // Listing a US edge for EU clients is refused, naming the fix.
        let bad = local().replace(
            "edges = [\"edge-eu-1\", \"edge-eu-2\"]",
            "edges = [\"edge-eu-1\", \"edge-us\"]",
        );
        let m = geodns_error(&bad);
        assert!(m.contains("\"edge-us\" of jurisdiction \"us\""), "{m}");

        // Without a list, the jurisdiction's own edges in topology order.
        let t = Topology::from_toml_str(
            &local().replace("edges = [\"edge-eu-1\", \"edge-eu-2\"]\n", ""),
        )
        .unwrap();
        let eu = &t.geodns().unwrap().clients[0];
        assert_eq!(t.geodns_edges(eu).len(), 2);
    }

    #[test]
    fn geodns_input_is_checked() {
        let cases = [
            (
                "\"10.1.0.0/16\"",
                "\"10.1.0.0/33\"",
                "not an address/prefix",
            ),
            ("\"10.1.0.0/16\"", "\"10.1.0.0\"", "not an address/prefix"),
            ("\"10.1.0.0/16\"", "\"198.51.100.0/24\"", "listed twice"),
            ("interval_s = 2", "interval_s = 1", "gdnsd's range"),
            ("timeout_s = 1", "timeout_s = 2", "less than interval_s"),
            (
                "zone = \"earshot.test\"",
                "zone = \"Earshot..test\"",
                "not a DNS name",
            ),
            (
                "default = \"us\"",
                "default = \"mars\"",
                "at least one edge",
            ),
            ("port = 8080", "port = 0", "not 0"),
            (
                "listen = \"127.0.0.1:5353\"",
                "listen = \"localhost\"",
                "ip:port",
            ),
        ];
        for (from, to, expect) in cases {
            let text = local().replacen(from, to, 1);
            assert_ne!(text, local(), "{from} not in local.toml");
            let m = geodns_error(&text);
            assert!(m.contains(expect), "{to}: {m}");
        }
        let m = geodns_error(&local().replacen("address = \"127.0.2.1\"\n", "", 1));
        assert!(m.contains("\"edge-us\" has no address"), "{m}");
        let e = Topology::from_toml_str(&local().replacen("127.0.2.1", "127.0.1.1", 1));
        assert!(
            matches!(e, Err(TopologyError::SharedAddress { .. })),
            "{e:?}"
        );
        let e = Topology::from_toml_str(&local().replacen("127.0.2.1", "edge.example", 1));
        assert!(
            matches!(e, Err(TopologyError::InvalidAddress { .. })),
            "{e:?}"
        );
    }
}
