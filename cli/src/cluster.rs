//! A deployment on loopback in one process, for integration tests and
//! benchmarks: real redis-server processes (one per region), and the real
//! edge and regional nodes on sockets bound to port 0, started from the same
//! config files the binaries read.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use earshot_edge::{Edge, EdgeConfig};
use earshot_regional::{Regional, RegionalConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::deploy::{Deployment, EdgeSpec, RegionSpec};
use crate::redis_server::RedisServer;
use crate::{assets, demo};

pub struct RegionPlan {
    pub name: &'static str,
    pub jurisdiction: &'static str,
    pub workers: usize,
    /// TOML appended to the region's config; it lands in the `[worker]`
    /// table unless it opens another table.
    pub extra: &'static str,
}

pub struct EdgePlan {
    pub name: &'static str,
    pub jurisdiction: &'static str,
    pub regions: &'static [&'static str],
    /// TOML appended to the edge's config; it lands in the `[vad]` table
    /// unless it opens another table.
    pub extra: &'static str,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub deployment: Deployment,
    pub redis: HashMap<String, RedisServer>,
    pub edge_ports: HashMap<String, u16>,
    pub region_http: HashMap<String, u16>,
    pub quic_ports: HashMap<String, u16>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Cluster {
    /// One EU region with one worker, and one EU edge (`edge-fra`) using it.
    pub async fn single(model: &Path, edge_extra: &'static str) -> anyhow::Result<Cluster> {
        Cluster::start(
            model,
            &[RegionPlan {
                name: "eu-west",
                jurisdiction: "eu",
                workers: 1,
                extra: "",
            }],
            &[EdgePlan {
                name: "edge-fra",
                jurisdiction: "eu",
                regions: &["eu-west"],
                extra: edge_extra,
            }],
        )
        .await
    }

    /// Starts every region (each with its own redis-server) and edge, and
    /// waits until the regions are ready.
    pub async fn start(
        model: &Path,
        regions: &[RegionPlan],
        edges: &[EdgePlan],
    ) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let mut redis = HashMap::new();
        let mut quic_sockets = HashMap::new();
        let mut http_listeners = HashMap::new();
        let mut region_specs = Vec::new();
        for r in regions {
            let server = RedisServer::start(&dir.path().join(format!("redis-{}", r.name)))?;
            let quic = std::net::UdpSocket::bind("127.0.0.1:0")?;
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            region_specs.push(RegionSpec {
                name: r.name.into(),
                jurisdiction: r.jurisdiction.into(),
                quic_port: quic.local_addr()?.port(),
                http_port: http.local_addr()?.port(),
                redis_url: server.url(),
                workers: r.workers,
                extra: r.extra.into(),
            });
            redis.insert(r.name.to_owned(), server);
            quic_sockets.insert(r.name.to_owned(), quic);
            http_listeners.insert(r.name.to_owned(), http);
        }
        let mut edge_listeners = HashMap::new();
        let mut edge_specs = Vec::new();
        for e in edges {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            edge_specs.push(EdgeSpec {
                name: e.name.into(),
                jurisdiction: e.jurisdiction.into(),
                regions: e.regions.iter().map(|s| s.to_string()).collect(),
                http_port: listener.local_addr()?.port(),
                extra: e.extra.into(),
            });
            edge_listeners.insert(e.name.to_owned(), listener);
        }
        let deployment = Deployment {
            dir: dir.path().join("deploy"),
            jurisdictions: vec![("eu".into(), true), ("us".into(), false)],
            regions: region_specs,
            edges: edge_specs,
            model: model.to_owned(),
            onnxruntime: assets::onnxruntime_library()?,
            silero: assets::silero_model()?,
        };
        deployment.write()?;

        let shutdown = CancellationToken::new();
        let mut tasks: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
        let mut region_http = HashMap::new();
        let mut quic_ports = HashMap::new();
        for r in &deployment.regions {
            let config = RegionalConfig::load(&deployment.regional_config(&r.name))?;
            let regional = Regional::build(config, shutdown.clone())?;
            let quic = quic_sockets.remove(&r.name).context("quic socket")?;
            let http = http_listeners.remove(&r.name).context("http listener")?;
            tasks.push(tokio::spawn(async move {
                Ok(regional.serve(quic, http).await?)
            }));
            region_http.insert(r.name.clone(), r.http_port);
            quic_ports.insert(r.name.clone(), r.quic_port);
        }
        let mut edge_ports = HashMap::new();
        for e in &deployment.edges {
            let config = EdgeConfig::load(&deployment.edge_config(&e.name))?;
            let edge = Edge::build(config, shutdown.clone())?;
            let listener = edge_listeners.remove(&e.name).context("edge listener")?;
            tasks.push(tokio::spawn(async move { Ok(edge.serve(listener).await?) }));
            edge_ports.insert(e.name.clone(), e.http_port);
        }
        let cluster = Cluster {
            dir,
            deployment,
            redis,
            edge_ports,
            region_http,
            quic_ports,
            shutdown,
            tasks,
        };
        for port in cluster.region_http.values() {
            wait_ready(*port, Duration::from_secs(20)).await?;
        }
        Ok(cluster)
    }

    pub fn listen_url(&self, edge: &str, query: &str) -> String {
        format!("ws://127.0.0.1:{}/v1/listen{query}", self.edge_ports[edge])
    }

    /// The Prometheus text of the node whose HTTP port is `port`.
    pub async fn metrics(&self, port: u16) -> anyhow::Result<String> {
        http_get(port, "/metrics").await
    }

    /// Stops every node and waits (bounded) for them to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("a node did not stop within 30 s")???;
        }
        Ok(())
    }
}

/// Polls `/readyz` until it answers 200: for a region, subscribed to Redis
/// and able to take utterances.
pub async fn wait_ready(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while demo::http_status(port, "/readyz").await.ok() != Some(200) {
        if Instant::now() > deadline {
            bail!("node on port {port} not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A whole HTTP/1.0 response, headers included.
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The value of one sample line of Prometheus text, e.g.
/// `earshot_edge_utterances_total{region="eu-west",outcome="final"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
