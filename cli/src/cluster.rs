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
use std::process::{Child, Command, ExitStatus, Stdio};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::deploy::{Deployment, EdgeSpec, RegionSpec};
use crate::redis_server::RedisServer;
use crate::{assets, demo};

pub struct RegionPlan {
    pub name: &'static str,
    pub jurisdiction: &'static str,
    pub workers: usize,
    /// TOML merged into the region's config, table by table (e.g.
    /// `"[redis]\nqueue_limit = 2\n[worker]\nmax_batch = 4"`).
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

impl EdgePlan {
    /// An edge with no extra configuration.
    pub const fn new(
        name: &'static str,
        jurisdiction: &'static str,
        regions: &'static [&'static str],
    ) -> Self {
        EdgePlan {
            name,
            jurisdiction,
            regions,
            extra: "",
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Nodes running as their own processes (the built binaries), by name.
    processes: HashMap<String, Child>,
    pub deployment: Deployment,
    pub redis: HashMap<String, RedisServer>,
    pub edge_ports: HashMap<String, u16>,
    pub region_http: HashMap<String, u16>,
    pub quic_ports: HashMap<String, u16>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Cluster {
    /// A test that fails midway must not leave region processes behind.
    fn drop(&mut self) {
        for child in self.processes.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
        Cluster::start_with_processes(model, regions, edges, &[]).await
    }

    /// As [`Cluster::start`], with the regions and edges named in
    /// `processes` run as `earshot-regional` and `earshot-edge` processes
    /// (the built binaries, on the same config files), so a test can kill,
    /// terminate and restart them.
    pub async fn start_with_processes(
        model: &Path,
        regions: &[RegionPlan],
        edges: &[EdgePlan],
        processes: &[&str],
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
                address: "127.0.0.1".into(),
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
            region_http.insert(r.name.clone(), r.http_port);
            quic_ports.insert(r.name.clone(), r.quic_port);
            if processes.contains(&r.name.as_str()) {
                // The process binds the ports itself.
                quic_sockets.remove(&r.name);
                http_listeners.remove(&r.name);
                continue;
            }
            let config = RegionalConfig::load(&deployment.regional_config(&r.name))?;
            let regional = Regional::build(config, shutdown.clone())?;
            let quic = quic_sockets.remove(&r.name).context("quic socket")?;
            let http = http_listeners.remove(&r.name).context("http listener")?;
            tasks.push(tokio::spawn(async move {
                Ok(regional.serve(Some(quic), http).await?)
            }));
        }
        let mut edge_ports = HashMap::new();
        for e in &deployment.edges {
            edge_ports.insert(e.name.clone(), e.http_port);
            if processes.contains(&e.name.as_str()) {
                // The process binds the port itself.
                edge_listeners.remove(&e.name);
                continue;
            }
            let config = EdgeConfig::load(&deployment.edge_config(&e.name))?;
            let edge = Edge::build(config, shutdown.clone())?;
            let listener = edge_listeners.remove(&e.name).context("edge listener")?;
            tasks.push(tokio::spawn(async move { Ok(edge.serve(listener).await?) }));
        }
        let mut cluster = Cluster {
            processes: HashMap::new(),
            dir,
            deployment,
            redis,
            edge_ports,
            region_http,
            quic_ports,
            shutdown,
            tasks,
        };
        for name in processes {
            if cluster.edge_ports.contains_key(*name) {
                let config = cluster.deployment.edge_config(name);
                cluster.spawn(name, "earshot-edge", &config)?;
            } else {
                cluster.start_region(name)?;
            }
        }
        let nodes: Vec<(String, u16)> = cluster
            .region_http
            .iter()
            .chain(cluster.edge_ports.iter())
            .map(|(name, port)| (name.clone(), *port))
            .collect();
        for (name, port) in nodes {
            cluster.wait_node_ready(&name, port).await?;
        }
        Ok(cluster)
    }

    /// Starts region `name` as an `earshot-regional` process (again, after
    /// a kill or stop), logging to `<dir>/logs/<name>.log`. Does not wait
    /// for it to be ready.
    pub fn start_region(&mut self, name: &str) -> anyhow::Result<()> {
        let config = self.deployment.regional_config(name);
        self.spawn(name, "earshot-regional", &config)
    }

    /// Starts a worker-only `earshot-regional` process named `name` for
    /// `region` (the region's config with `ingress = false`, its own HTTP
    /// port, `count` workers whose consumer names start with `name`), and
    /// waits until it is ready. Returns its HTTP port.
    pub async fn start_worker(
        &mut self,
        region: &str,
        name: &str,
        count: usize,
    ) -> anyhow::Result<u16> {
        let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let spec = self
            .deployment
            .regions
            .iter()
            .find(|r| r.name == region)
            .with_context(|| format!("no region {region}"))?;
        let config = self.deployment.dir.join(format!("worker-{name}.toml"));
        std::fs::write(
            &config,
            self.deployment.worker_toml(spec, name, count, http_port),
        )?;
        self.spawn(name, "earshot-regional", &config)?;
        self.wait_node_ready(name, http_port).await?;
        Ok(http_port)
    }

    /// Waits until node `name` answers `/readyz` on `port` with 200. When
    /// `name` runs as a process, a process that exits first, or one not
    /// ready in [`READY_WITHIN`], fails with the end of its log (a port
    /// already taken, a config error) instead of a bare timeout.
    pub async fn wait_node_ready(&mut self, name: &str, port: u16) -> anyhow::Result<()> {
        let log = self.dir.path().join("logs").join(format!("{name}.log"));
        let what = format!("{name} (port {port})");
        let result = wait_ready(&what, self.processes.get_mut(name), &log, || async {
            demo::http_status(port, "/readyz").await.ok() == Some(200)
        })
        .await;
        forget_exited(&mut self.processes, name);
        result
    }

    /// Runs `binary --config <config>` as process `name`, logging to
    /// `<dir>/logs/<name>.log`.
    fn spawn(&mut self, name: &str, binary: &str, config: &Path) -> anyhow::Result<()> {
        let logs = self.dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.log")))?;
        let child = Command::new(assets::binary(binary)?)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {binary} for {name}"))?;
        self.processes.insert(name.to_owned(), child);
        Ok(())
    }

    /// `kill -9` of process `name` (a region, edge or worker).
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self
            .processes
            .remove(name)
            .with_context(|| format!("{name} is not running as a process"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM to process `name`; waits up to `within` for it to exit and
    /// returns its status.
    pub async fn terminate(&mut self, name: &str, within: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .processes
            .remove(name)
            .with_context(|| format!("{name} is not running as a process"))?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", child.id());
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                bail!("{name} did not exit within {within:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Process `name`'s resident memory now and at its peak (`VmRSS`,
    /// `VmHWM`), in KiB, from `/proc`.
    pub fn memory_kib(&self, name: &str) -> Option<(u64, u64)> {
        let pid = self.processes.get(name)?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// The log of process `name` so far (every run of it).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    pub fn listen_url(&self, edge: &str, query: &str) -> String {
        format!("ws://127.0.0.1:{}/v1/listen{query}", self.edge_ports[edge])
    }

    /// The Prometheus text of the node whose HTTP port is `port`.
    pub async fn metrics(&self, port: u16) -> anyhow::Result<String> {
        http_get(port, "/metrics").await
    }

    /// Stops every node and waits (bounded) for them to drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.processes.keys().cloned().collect();
        for name in names {
            let status = self.terminate(&name, Duration::from_secs(30)).await?;
            if !status.success() {
                bail!("{name} exited with {status} on SIGTERM");
            }
        }
        self.shutdown.cancel();
        for t in std::mem::take(&mut self.tasks) {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("a node did not stop within 30 s")???;
        }
        Ok(())
    }
}

/// How long a node may take to answer `/readyz` (for a region: subscribed
/// to Redis, its model loaded). CI once saw a region process miss a 20 s
/// limit, with no log to say why; the log's tail now comes with the error.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// The config of an edge alone, for tests and benchmarks of what it does
/// before any utterance reaches a region: `edge-fra` (EU) on 127.0.0.1 at
/// a free port, configured with `edge_extra`, its region `eu-west` in the
/// topology but not started (nothing listens on its ports). Returns the
/// config file and the scratch directory holding it.
pub fn lone_edge_config(
    edge_extra: &str,
) -> anyhow::Result<(std::path::PathBuf, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let free_port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let deployment = Deployment {
        dir: dir.path().join("deploy"),
        jurisdictions: vec![("eu".into(), true)],
        regions: vec![RegionSpec {
            name: "eu-west".into(),
            jurisdiction: "eu".into(),
            quic_port: free_port()?,
            http_port: free_port()?,
            redis_url: "redis://127.0.0.1:1".into(),
            workers: 1,
            extra: String::new(),
        }],
        edges: vec![EdgeSpec {
            name: "edge-fra".into(),
            jurisdiction: "eu".into(),
            regions: vec!["eu-west".into()],
            address: "127.0.0.1".into(),
            http_port: free_port()?,
            extra: edge_extra.into(),
        }],
        model: dir.path().join("no-model"),
        onnxruntime: assets::onnxruntime_library()?,
        silero: assets::silero_model()?,
    };
    deployment.write()?;
    Ok((deployment.edge_config("edge-fra"), dir))
}

/// [`lone_edge_config`], built in this process.
pub fn lone_edge(
    edge_extra: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<(Edge, tempfile::TempDir)> {
    let (config, dir) = lone_edge_config(edge_extra)?;
    let config = EdgeConfig::load(&config)?;
    Ok((Edge::build(config, shutdown)?, dir))
}

/// Polls `ready` until it holds, within [`READY_WITHIN`]. A `child` that
/// exits first, or a timeout, fails with the end of `log` (a port already
/// taken, a config error) instead of a bare timeout.
pub async fn wait_ready<F, Fut>(
    what: &str,
    mut child: Option<&mut Child>,
    log: &Path,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + READY_WITHIN;
    let tail = || log_tail(&std::fs::read_to_string(log).unwrap_or_default(), 20);
    loop {
        if ready().await {
            return Ok(());
        }
        if let Some(child) = child.as_deref_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{what} exited ({status}) before it was ready; {} ends:\n{}",
                log.display(),
                tail()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} not ready within {READY_WITHIN:?}; {} ends:\n{}",
                log.display(),
                tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drops `name` from `children` if it has exited (after a failed wait).
pub fn forget_exited(children: &mut HashMap<String, Child>, name: &str) {
    if let Some(child) = children.get_mut(name)
        && child.try_wait().ok().flatten().is_some()
    {
        children.remove(name);
    }
}

/// The last `lines` lines of `log` ("(empty)" when there are none).
pub fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    if all.is_empty() {
        return "(empty)".into();
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A whole HTTP/1.0 response from 127.0.0.1:`port`, headers included.
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// A whole HTTP/1.0 response from `addr`, headers included.
pub async fn http_get_at(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
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
