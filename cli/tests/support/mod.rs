//! A deployment on loopback for integration tests: real redis-server
//! processes, and the real edge and regional nodes running in-process on
//! sockets bound to port 0, from the same config files the binaries read.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use earshot_asr::{TestModelSpec, generate_test_model};
use earshot_cli::deploy::{Deployment, EdgeSpec, RegionSpec};
use earshot_cli::redis_server::RedisServer;
use earshot_cli::{assets, demo};
use earshot_edge::{Edge, EdgeConfig};
use earshot_regional::{Regional, RegionalConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The seeded test model, generated once per test binary under
/// `target/tmp` (written to a private directory, then renamed into place).
pub fn test_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("whisper-test");
            if !dir.join("model.safetensors").is_file() {
                let scratch = dir.with_extension(format!("tmp{}", std::process::id()));
                generate_test_model(&scratch, &TestModelSpec::TEST).expect("generate test model");
                if std::fs::rename(&scratch, &dir).is_err() {
                    // Another process won the race; its copy is identical.
                    let _ = std::fs::remove_dir_all(&scratch);
                }
            }
            dir
        })
        .clone()
}

pub struct RegionPlan {
    pub name: &'static str,
    pub jurisdiction: &'static str,
    pub workers: usize,
    pub extra: &'static str,
}

pub struct EdgePlan {
    pub name: &'static str,
    pub jurisdiction: &'static str,
    pub regions: &'static [&'static str],
    pub extra: &'static str,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub deployment: Deployment,
    pub redis: HashMap<String, RedisServer>,
    pub edge_ports: HashMap<String, u16>,
    pub region_http: HashMap<String, u16>,
    pub quic_ports: HashMap<String, u16>,
    pub edges: HashMap<String, Edge>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// One EU region with one worker, and one EU edge using it.
    pub async fn single(edge_extra: &'static str) -> Cluster {
        Cluster::start(
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

    pub async fn start(regions: &[RegionPlan], edges: &[EdgePlan]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut redis = HashMap::new();
        let mut quic_sockets = HashMap::new();
        let mut http_listeners = HashMap::new();
        let mut region_specs = Vec::new();
        for r in regions {
            let server = RedisServer::start(&dir.path().join(format!("redis-{}", r.name))).unwrap();
            let quic = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            region_specs.push(RegionSpec {
                name: r.name.into(),
                jurisdiction: r.jurisdiction.into(),
                quic_port: quic.local_addr().unwrap().port(),
                http_port: http.local_addr().unwrap().port(),
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
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            edge_specs.push(EdgeSpec {
                name: e.name.into(),
                jurisdiction: e.jurisdiction.into(),
                regions: e.regions.iter().map(|s| s.to_string()).collect(),
                http_port: listener.local_addr().unwrap().port(),
                extra: e.extra.into(),
            });
            edge_listeners.insert(e.name.to_owned(), listener);
        }
        let deployment = Deployment {
            dir: dir.path().join("deploy"),
            jurisdictions: vec![("eu".into(), true), ("us".into(), false)],
            regions: region_specs,
            edges: edge_specs,
            model: test_model(),
            onnxruntime: assets::onnxruntime_library().unwrap(),
            silero: assets::silero_model().unwrap(),
        };
        deployment.write().unwrap();

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut region_http = HashMap::new();
        let mut quic_ports = HashMap::new();
        for r in &deployment.regions {
            let config = RegionalConfig::load(&deployment.regional_config(&r.name)).unwrap();
            let regional = Regional::build(config, shutdown.clone()).unwrap();
            let quic = quic_sockets.remove(&r.name).unwrap();
            let http = http_listeners.remove(&r.name).unwrap();
            tasks.push(tokio::spawn(async move {
                regional.serve(quic, http).await.unwrap();
            }));
            region_http.insert(r.name.clone(), r.http_port);
            quic_ports.insert(r.name.clone(), r.quic_port);
        }
        let mut edge_ports = HashMap::new();
        let mut built = HashMap::new();
        for e in &deployment.edges {
            let config = EdgeConfig::load(&deployment.edge_config(&e.name)).unwrap();
            let edge = Edge::build(config, shutdown.clone()).unwrap();
            let listener = edge_listeners.remove(&e.name).unwrap();
            built.insert(e.name.clone(), edge.clone());
            tasks.push(tokio::spawn(async move {
                edge.serve(listener).await.unwrap();
            }));
            edge_ports.insert(e.name.clone(), e.http_port);
        }
        let cluster = Cluster {
            dir,
            deployment,
            redis,
            edge_ports,
            region_http,
            quic_ports,
            edges: built,
            shutdown,
            tasks,
        };
        for port in cluster.region_http.values() {
            wait_ready(*port).await;
        }
        cluster
    }

    pub fn listen_url(&self, edge: &str, query: &str) -> String {
        format!("ws://127.0.0.1:{}/v1/listen{query}", self.edge_ports[edge])
    }

    pub async fn metrics(&self, port: u16) -> String {
        http_get(port, "/metrics").await
    }

    /// Stops every node and waits for them to drain.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("node did not stop within 30 s")
                .unwrap();
        }
    }
}

/// Polls `/readyz` until it answers 200 (bounded): the node is subscribed
/// to Redis and can take utterances.
pub async fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while demo::http_status(port, "/readyz").await.ok() != Some(200) {
        assert!(Instant::now() < deadline, "node on port {port} not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of one sample line of Prometheus text, e.g.
/// `earshot_edge_utterances_total{region="eu-west",outcome="final"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
