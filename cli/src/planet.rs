//! `earshot up`: the whole planet of a topology on loopback, every part a
//! real OS process.
//!
//! From the topology (`topology/local.toml`): one embedded S3 server with
//! a bucket per region, and the Whisper model published, replicated and
//! promoted through it; per region a Redis (append-only), a registry sync
//! agent that fetches the promoted model, and an `earshot-regional` node
//! whose workers load what the agent activated; every edge on its own
//! loopback address; and gdnsd answering the client name by client subnet.
//!
//! Everything the planet writes lives under one run directory: `deploy/`
//! (topology, certificates, configs), `logs/<process>.log`, data, and
//! `up.json` (what runs where, for `earshot down` and `earshot drill`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use earshot_common::topology::Topology;
use serde::{Deserialize, Serialize};

use crate::deploy::{Deployment, EdgeSpec, RegionSpec};
use crate::geodns::{self, Gdnsd};
use crate::{assets, certs, cluster, processes};

/// The embedded S3 server's credentials (loopback only).
const S3_KEY: (&str, &str) = ("earshot-local", "earshot-local-secret");

/// What a process of the planet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    S3,
    Redis,
    Sync,
    Regional,
    Worker,
    Proxy,
    Edge,
    Geodns,
}

/// How a process is known to be ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `GET <path>` answers 200.
    Http { addr: SocketAddr, path: String },
    /// The port accepts TCP connections.
    Tcp { addr: SocketAddr },
    /// gdnsd answers the client name.
    Dns { addr: SocketAddr, name: String },
    /// Ready once it runs (a UDP relay has nothing to ask).
    Running,
}

/// One process of the planet: how to start it again and where it logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub name: String,
    pub role: Role,
    /// The region it belongs to (none for S3, edges and GeoDNS).
    pub region: Option<String>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub probe: Probe,
    /// The address to show in the table.
    pub listen: String,
}

/// What `up.json` records: enough for `earshot down` and drills.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunFile {
    /// The `earshot up` process (SIGTERM it to stop everything).
    pub pid: u32,
    pub topology: PathBuf,
    pub dns: SocketAddr,
    pub client_name: String,
    pub edge_port: u16,
    pub ca: PathBuf,
    /// The control API of `earshot up` (kill, terminate, restart).
    pub control: Option<SocketAddr>,
    pub processes: Vec<RunningProcess>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningProcess {
    pub name: String,
    /// What runs (to tell it from another process given the same pid).
    pub program: PathBuf,
    pub role: Role,
    pub region: Option<String>,
    pub pid: u32,
    pub listen: String,
    pub log: PathBuf,
}

impl RunFile {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("up.json")
    }

    pub fn read(run_dir: &Path) -> anyhow::Result<RunFile> {
        let path = Self::path(run_dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no planet running from {} (no {}): start one with `earshot up`",
                run_dir.display(),
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct PlanetOptions {
    pub topology: PathBuf,
    /// Wiped and recreated.
    pub run_dir: PathBuf,
    /// The Whisper model directory published as `whisper@1`.
    pub model: PathBuf,
    /// ASR workers per region.
    pub workers: usize,
}

/// A running planet. Dropping it kills what is still running; call
/// [`Planet::stop`] to drain in order.
pub struct Planet {
    pub run_dir: PathBuf,
    pub topology: Arc<Topology>,
    pub topology_path: PathBuf,
    pub ca: PathBuf,
    specs: Vec<ProcessSpec>,
    children: BTreeMap<String, Child>,
    gdnsd: Option<Gdnsd>,
    control: Option<SocketAddr>,
}

/// A UDP relay on the path from an edge to a region.
struct ProxyPlan {
    name: String,
    region: String,
    listen: SocketAddr,
    to: SocketAddr,
}

/// The planet's files, written before anything starts: the topology as
/// run, certificates and every node's config.
struct Layout {
    run_dir: PathBuf,
    topology: Topology,
    s3: SocketAddr,
    deployment: Deployment,
    redis_ports: BTreeMap<String, u16>,
    proxies: Vec<ProxyPlan>,
}

impl Layout {
    fn write(options: &PlanetOptions) -> anyhow::Result<Layout> {
        let run_dir = std::path::absolute(&options.run_dir)?;
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("cannot clear {}", run_dir.display()))?;
        }
        for sub in ["deploy", "logs", "data"] {
            std::fs::create_dir_all(run_dir.join(sub))?;
        }
        let text = std::fs::read_to_string(&options.topology)
            .with_context(|| format!("cannot read {}", options.topology.display()))?;
        let topology = Topology::from_toml_str(&text)
            .with_context(|| format!("{} is not a valid topology", options.topology.display()))?;
        let geodns = geodns::settings(&topology)?.clone();
        let registry = topology.registry().context(
            "the topology has no [registry] table: `earshot up` serves the model registry from it",
        )?;
        let s3 = registry
            .endpoint
            .as_deref()
            .and_then(|e| e.strip_prefix("http://"))
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .context("[registry] endpoint must be http://<ip>:<port> on this machine (the embedded S3 server)")?;

        let mut deployment = Deployment {
            dir: run_dir.join("deploy"),
            jurisdictions: Vec::new(),
            regions: Vec::new(),
            edges: Vec::new(),
            model: options.model.clone(),
            onnxruntime: assets::onnxruntime_library()?,
            silero: assets::silero_model()?,
        };
        let mut redis_ports = BTreeMap::new();
        for r in topology.regions() {
            let quic: SocketAddr = r.quic.parse().with_context(|| {
                format!(
                    "region {}: quic {:?} must be ip:port on this machine",
                    r.name, r.quic
                )
            })?;
            let redis_port = crate::redis_server::free_port()?;
            redis_ports.insert(r.name.clone(), redis_port);
            let current = models_dir(&run_dir, &r.name).join("current");
            deployment.regions.push(RegionSpec {
                name: r.name.clone(),
                jurisdiction: r.jurisdiction.clone(),
                quic_port: quic.port(),
                http_port: crate::redis_server::free_port()?,
                redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
                // The ingress node runs no workers: they are their own
                // process (`<region>-worker`), which `worker-kill` kills.
                workers: 0,
                extra: format!("[worker]\nmodel = {current:?}\n"),
            });
        }
        // Every edge dials each of its regions through a UDP proxy of its
        // own, which the `partition` drill cuts.
        let mut proxies = Vec::new();
        for e in topology.edges() {
            let mut dial = toml::Table::new();
            for region in topology.permitted_regions(&e.name)? {
                let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
                dial.insert(region.name.clone(), listen.to_string().into());
                proxies.push(ProxyPlan {
                    name: proxy_name(&e.name, &region.name),
                    region: region.name.clone(),
                    listen,
                    to: region.quic.parse()?,
                });
            }
            let mut uplink = toml::Table::new();
            uplink.insert("dial".into(), dial.into());
            let mut extra = toml::Table::new();
            extra.insert("uplink".into(), uplink.into());
            deployment.edges.push(EdgeSpec {
                name: e.name.clone(),
                jurisdiction: e.jurisdiction.clone(),
                regions: e.regions.clone(),
                address: e.address.clone().unwrap_or_else(|| "127.0.0.1".into()),
                http_port: geodns.port,
                extra: format!("\n{extra}"),
            });
        }
        deployment.write_with_topology(&text)?;
        Ok(Layout {
            run_dir,
            topology,
            s3,
            deployment,
            redis_ports,
            proxies,
        })
    }

    fn log(&self, name: &str) -> PathBuf {
        self.run_dir.join("logs").join(format!("{name}.log"))
    }
}

/// Where region `region`'s sync agent keeps its models (`current` → the
/// active version).
fn models_dir(run_dir: &Path, region: &str) -> PathBuf {
    run_dir.join("data").join(region).join("models")
}

/// The environment of processes that reach the embedded S3 server.
fn s3_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".to_owned(), S3_KEY.0.to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), S3_KEY.1.to_owned()),
        ("RUST_LOG".to_owned(), "info".to_owned()),
    ]
}

fn info_log() -> Vec<(String, String)> {
    vec![("RUST_LOG".into(), "info".into())]
}

impl Planet {
    /// Starts every part in dependency order and returns once each is ready.
    pub async fn start(options: &PlanetOptions) -> anyhow::Result<Planet> {
        let layout = Layout::write(options)?;
        let mut planet = Planet {
            run_dir: layout.run_dir.clone(),
            topology: Arc::new(layout.topology.clone()),
            topology_path: layout.deployment.topology_path(),
            ca: certs::ca_path(&layout.deployment.certs_dir()),
            specs: Vec::new(),
            children: BTreeMap::new(),
            gdnsd: None,
            control: None,
        };
        planet.start_registry(&layout, &options.model).await?;
        for region in &layout.deployment.regions {
            planet
                .start_region(&layout, region, options.workers)
                .await?;
        }
        planet.start_edges(&layout).await?;
        let gdnsd = Gdnsd::start(
            &layout.topology,
            &layout.run_dir.join("deploy").join("gdnsd"),
            &layout.log("gdnsd"),
        )
        .await?;
        planet.gdnsd = Some(gdnsd);
        planet.write_run_file()?;
        Ok(planet)
    }

    /// The embedded S3 server, and the model published through it.
    async fn start_registry(&mut self, layout: &Layout, model: &Path) -> anyhow::Result<()> {
        let s3 = layout.s3;
        self.launch(ProcessSpec {
            name: "s3".into(),
            role: Role::S3,
            region: None,
            program: assets::binary("earshot-registry")?,
            args: vec![
                "serve-s3".into(),
                "--root".into(),
                layout.run_dir.join("data").join("s3").into(),
                "--listen".into(),
                s3.to_string().into(),
            ],
            env: s3_env(),
            log: layout.log("s3"),
            probe: Probe::Tcp { addr: s3 },
            listen: format!("http://{s3}"),
        })
        .await?;
        publish_model(
            &layout.topology,
            model,
            &layout.run_dir.join("data").join("publish"),
        )
        .await
    }

    /// A region's Redis, sync agent (waiting until it activated the model),
    /// ingress node and worker process.
    async fn start_region(
        &mut self,
        layout: &Layout,
        r: &RegionSpec,
        workers: usize,
    ) -> anyhow::Result<()> {
        let run_dir = &layout.run_dir;
        let redis_port = layout.redis_ports[&r.name];
        let redis_dir = run_dir.join("data").join(&r.name).join("redis");
        std::fs::create_dir_all(&redis_dir)?;
        let redis_addr = SocketAddr::from(([127, 0, 0, 1], redis_port));
        let redis = format!("redis-{}", r.name);
        self.launch(ProcessSpec {
            log: layout.log(&redis),
            name: redis,
            role: Role::Redis,
            region: Some(r.name.clone()),
            program: "redis-server".into(),
            args: crate::redis_server::args(redis_port, &redis_dir),
            env: Vec::new(),
            probe: Probe::Tcp { addr: redis_addr },
            listen: redis_addr.to_string(),
        })
        .await?;

        let sync = format!("sync-{}", r.name);
        let sync_port = crate::redis_server::free_port()?;
        let sync_config = layout.deployment.dir.join(format!("{sync}.toml"));
        let models = models_dir(run_dir, &r.name);
        std::fs::write(
            &sync_config,
            format!(
                "node = \"{name}-0\"\nregion = \"{name}\"\ntopology = {topology:?}\nmodel = \"whisper\"\n\
                 models_dir = {models:?}\npoll_interval_ms = 1000\nhttp_listen = \"127.0.0.1:{sync_port}\"\n",
                name = r.name,
                topology = layout.deployment.topology_path(),
            ),
        )?;
        self.launch(ProcessSpec {
            log: layout.log(&sync),
            name: sync.clone(),
            role: Role::Sync,
            region: Some(r.name.clone()),
            program: assets::binary("earshot-registry")?,
            args: vec!["sync".into(), "--config".into(), sync_config.into()],
            env: s3_env(),
            probe: Probe::Http {
                addr: SocketAddr::from(([127, 0, 0, 1], sync_port)),
                path: "/healthz".into(),
            },
            listen: format!("127.0.0.1:{sync_port}"),
        })
        .await?;
        wait_for_model(&models, &layout.log(&sync)).await?;

        let http = SocketAddr::from(([127, 0, 0, 1], r.http_port));
        self.launch(ProcessSpec {
            name: r.name.clone(),
            role: Role::Regional,
            region: Some(r.name.clone()),
            program: assets::binary("earshot-regional")?,
            args: vec![
                "--config".into(),
                layout.deployment.regional_config(&r.name).into(),
            ],
            env: info_log(),
            log: layout.log(&r.name),
            probe: Probe::Http {
                addr: http,
                path: "/readyz".into(),
            },
            listen: format!("quic 127.0.0.1:{} http {http}", r.quic_port),
        })
        .await?;

        let worker = format!("{}-worker", r.name);
        let worker_http = crate::redis_server::free_port()?;
        let worker_config = layout.deployment.dir.join(format!("{worker}.toml"));
        std::fs::write(
            &worker_config,
            layout
                .deployment
                .worker_toml(r, &worker, workers, worker_http),
        )?;
        self.launch(ProcessSpec {
            log: layout.log(&worker),
            name: worker,
            role: Role::Worker,
            region: Some(r.name.clone()),
            program: assets::binary("earshot-regional")?,
            args: vec!["--config".into(), worker_config.into()],
            env: info_log(),
            probe: Probe::Http {
                addr: SocketAddr::from(([127, 0, 0, 1], worker_http)),
                path: "/readyz".into(),
            },
            listen: format!("http 127.0.0.1:{worker_http}"),
        })
        .await
    }

    /// The UDP proxies on the edges' paths to their regions, then the edges.
    async fn start_edges(&mut self, layout: &Layout) -> anyhow::Result<()> {
        for p in &layout.proxies {
            self.launch(ProcessSpec {
                name: p.name.clone(),
                role: Role::Proxy,
                region: Some(p.region.clone()),
                program: assets::binary("earshot")?,
                args: vec![
                    "udp-proxy".into(),
                    "--listen".into(),
                    p.listen.to_string().into(),
                    "--to".into(),
                    p.to.to_string().into(),
                ],
                env: info_log(),
                log: layout.log(&p.name),
                probe: Probe::Running,
                listen: format!("udp {} -> {}", p.listen, p.to),
            })
            .await?;
        }
        for e in &layout.deployment.edges {
            let addr = SocketAddr::new(e.address.parse()?, e.http_port);
            self.launch(ProcessSpec {
                name: e.name.clone(),
                role: Role::Edge,
                region: None,
                program: assets::binary("earshot-edge")?,
                args: vec![
                    "--config".into(),
                    layout.deployment.edge_config(&e.name).into(),
                ],
                env: info_log(),
                log: layout.log(&e.name),
                probe: Probe::Http {
                    addr,
                    path: "/readyz".into(),
                },
                listen: format!("ws://{addr}/v1/listen"),
            })
            .await?;
        }
        Ok(())
    }

    /// Starts `spec` and waits until it is ready.
    async fn launch(&mut self, spec: ProcessSpec) -> anyhow::Result<()> {
        let child = spawn(&spec)?;
        self.children.insert(spec.name.clone(), child);
        self.specs.push(spec.clone());
        self.wait_ready(&spec.name).await
    }

    /// Waits until process `name` passes its probe; one that exits first
    /// fails with the end of its log.
    pub async fn wait_ready(&mut self, name: &str) -> anyhow::Result<()> {
        let spec = self.spec(name)?.clone();
        let result = cluster::wait_ready(name, self.children.get_mut(name), &spec.log, || {
            probe(&spec.probe)
        })
        .await;
        if let Some(child) = self.children.get_mut(name)
            && child.try_wait().ok().flatten().is_some()
        {
            self.children.remove(name);
        }
        result
    }

    fn spec(&self, name: &str) -> anyhow::Result<&ProcessSpec> {
        self.specs
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("the planet has no process named {name:?}"))
    }

    /// The names of the processes, in start order.
    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    /// The processes of `region` (Redis, sync agent, regional node and
    /// workers; not the proxies in front of it), in start order.
    pub fn region_processes(&self, region: &str) -> Vec<String> {
        self.specs
            .iter()
            .filter(|s| s.region.as_deref() == Some(region) && s.role != Role::Proxy)
            .map(|s| s.name.clone())
            .collect()
    }

    /// `kill -9` of process `name`.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self
            .children
            .remove(name)
            .with_context(|| format!("{name} is not running"))?;
        child.kill()?;
        child.wait()?;
        self.write_run_file()
    }

    /// SIGTERM to process `name`, waiting up to `within` for it to drain.
    pub fn terminate(&mut self, name: &str, within: Duration) -> anyhow::Result<()> {
        let mut child = self
            .children
            .remove(name)
            .with_context(|| format!("{name} is not running"))?;
        processes::terminate(&mut child, within);
        self.write_run_file()
    }

    /// Starts process `name` again, the same way, and waits until it is ready.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(child) = self.children.get_mut(name) {
            // One that exited and was not reaped yet may be started again.
            if child.try_wait()?.is_none() {
                bail!("{name} is already running");
            }
            self.children.remove(name);
        }
        let spec = self.spec(name)?.clone();
        let child = spawn(&spec)?;
        self.children.insert(name.to_owned(), child);
        let ready = self.wait_ready(name).await;
        // up.json names it either way: running, or (not ready) for `down`.
        self.write_run_file()?;
        ready
    }

    /// The processes that exited by themselves (not through
    /// [`Planet::kill`] or [`Planet::terminate`]) since the last call, with
    /// their status; [`Planet::restart`] starts them again.
    pub fn reap(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        let exited: Vec<(String, std::process::ExitStatus)> = self
            .children
            .iter_mut()
            .filter_map(|(name, child)| Some((name.clone(), child.try_wait().ok()??)))
            .collect();
        for (name, _) in &exited {
            self.children.remove(name);
        }
        if !exited.is_empty() {
            let _ = self.write_run_file();
        }
        exited
    }

    /// Is process `name` running (started, not killed or exited)?
    pub fn is_running(&self, name: &str) -> bool {
        self.children.contains_key(name)
    }

    /// Records the control API's address in `up.json`.
    pub fn set_control(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        self.control = Some(addr);
        self.write_run_file()
    }

    /// The Prometheus text of process `name` (a regional node, edge or
    /// sync agent: whatever serves HTTP).
    pub async fn metrics(&self, name: &str) -> anyhow::Result<String> {
        let Probe::Http { addr, .. } = &self.spec(name)?.probe else {
            bail!("{name} serves no metrics");
        };
        crate::cluster::http_get_at(*addr, "/metrics").await
    }

    /// Where process `name` logs.
    pub fn log_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.spec(name)?.log.clone())
    }

    pub fn dns(&self) -> SocketAddr {
        self.gdnsd
            .as_ref()
            .map_or(SocketAddr::from(([127, 0, 0, 1], 0)), |g| g.listen)
    }

    /// The table `earshot up` prints: every process, its role and address.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{:<26} {:<9} {:<10} {:<7} ADDRESS",
            "PROCESS", "ROLE", "REGION", "PID"
        );
        for s in &self.specs {
            let pid = self
                .children
                .get(&s.name)
                .map_or("-".into(), |c| c.id().to_string());
            let _ = writeln!(
                t,
                "{:<26} {:<9} {:<10} {:<7} {}",
                s.name,
                format!("{:?}", s.role).to_lowercase(),
                s.region.as_deref().unwrap_or("-"),
                pid,
                s.listen
            );
        }
        if let Some(g) = &self.gdnsd {
            let name = self
                .topology
                .geodns()
                .map(geodns::client_name)
                .unwrap_or_default();
            let _ = writeln!(
                t,
                "{:<26} {:<9} {:<10} {:<7} dns {} ({name})",
                "gdnsd",
                "geodns",
                "-",
                g.pid(),
                g.listen
            );
        }
        let _ = writeln!(t, "logs: {}", self.run_dir.join("logs").display());
        t
    }

    fn write_run_file(&self) -> anyhow::Result<()> {
        let g = self.topology.geodns();
        let mut processes: Vec<RunningProcess> = self
            .specs
            .iter()
            .filter_map(|s| {
                let child = self.children.get(&s.name)?;
                Some(RunningProcess {
                    name: s.name.clone(),
                    program: s.program.clone(),
                    role: s.role,
                    region: s.region.clone(),
                    pid: child.id(),
                    listen: s.listen.clone(),
                    log: s.log.clone(),
                })
            })
            .collect();
        if let Some(gd) = &self.gdnsd {
            processes.push(RunningProcess {
                name: "gdnsd".into(),
                program: geodns::gdnsd_binary().unwrap_or_default(),
                role: Role::Geodns,
                region: None,
                pid: gd.pid(),
                listen: gd.listen.to_string(),
                log: gd.log.clone(),
            });
        }
        let run = RunFile {
            pid: std::process::id(),
            topology: self.topology_path.clone(),
            dns: self.dns(),
            client_name: g.map(geodns::client_name).unwrap_or_default(),
            edge_port: g.map_or(0, |g| g.port),
            ca: self.ca.clone(),
            control: self.control,
            processes,
        };
        let path = RunFile::path(&self.run_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&run)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Drains in order: GeoDNS stops answering, edges drain (clients told
    /// to go elsewhere), regional nodes finish what they accepted, then
    /// sync agents, Redis and S3. Returns the processes that did not exit
    /// cleanly.
    pub fn stop(mut self) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some(mut g) = self.gdnsd.take() {
            g.stop();
        }
        let order = [
            Role::Edge,
            Role::Proxy,
            Role::Regional,
            Role::Worker,
            Role::Sync,
            Role::Redis,
            Role::S3,
        ];
        for role in order {
            // All of a role at once (edges drain together, so one's clients
            // are not sent to the next to drain), then wait for them.
            let mut stopping: Vec<(String, Child)> = self
                .specs
                .iter()
                .filter(|s| s.role == role)
                .filter_map(|s| Some((s.name.clone(), self.children.remove(&s.name)?)))
                .collect();
            for (_, child) in &stopping {
                processes::sigterm(child.id());
            }
            for (name, child) in &mut stopping {
                let status = processes::terminate(child, Duration::from_secs(30));
                if !status.is_some_and(|s| s.success()) {
                    failed.push(format!("{name} ({status:?})"));
                }
            }
        }
        let _ = std::fs::remove_file(RunFile::path(&self.run_dir));
        failed
    }
}

impl Drop for Planet {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The proxy between `edge` and `region`.
pub fn proxy_name(edge: &str, region: &str) -> String {
    format!("proxy-{edge}-{region}")
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(spec: &ProcessSpec) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    Command::new(&spec.program)
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {} ({})", spec.name, spec.program.display()))
}

async fn probe(p: &Probe) -> bool {
    match p {
        Probe::Http { addr, path } => {
            crate::demo::http_status_at(*addr, path).await.ok() == Some(200)
        }
        Probe::Tcp { addr } => tokio::net::TcpStream::connect(addr).await.is_ok(),
        Probe::Dns { addr, name } => geodns::query(*addr, name, None).await.is_ok(),
        Probe::Running => true,
    }
}

/// Publishes `model` as `whisper@1` (global) to the home bucket, replicates
/// it to every region's bucket and promotes it to `stable` everywhere.
async fn publish_model(topology: &Topology, model: &Path, state: &Path) -> anyhow::Result<()> {
    use earshot_common::manifest::Rollout;
    use earshot_registry::publish::{self, PublishRequest, Transfer};
    use earshot_registry::replicate::{self, Selection};
    use earshot_registry::store::S3Settings;

    let settings = S3Settings {
        endpoint: topology.registry().and_then(|r| r.endpoint.clone()),
        region: "us-east-1".into(),
        access_key: S3_KEY.0.into(),
        secret_key: S3_KEY.1.into(),
    };
    let registry = earshot_registry::Registry::new(Arc::new(topology.clone()), &settings)?;
    registry.ensure_buckets().await?;
    let transfer = Transfer::new(state.to_owned());
    let request = PublishRequest::new(model.to_owned(), "whisper", "1", "global");
    publish::publish(&registry, &request, &transfer)
        .await
        .context("publishing the model to the embedded registry")?;
    replicate::replicate(&registry, &Selection::default(), &transfer).await?;
    let all = Rollout {
        percent: 100,
        regions: vec![],
    };
    earshot_registry::channels::promote(&registry, "whisper", "stable", "1", all, "earshot up")
        .await?;
    Ok(())
}

/// Waits until the sync agent has activated a model (`current` exists).
async fn wait_for_model(models: &Path, log: &Path) -> anyhow::Result<()> {
    let current = models.join("current");
    let what = format!("the sync agent's model in {}", models.display());
    cluster::wait_ready(&what, None, log, || async { current.exists() }).await
}

/// `earshot down`: SIGTERM to the `earshot up` of `run_dir`, which drains
/// and stops everything; waits up to `within` for it to exit.
pub async fn down(run_dir: &Path, within: Duration) -> anyhow::Result<()> {
    let run = RunFile::read(run_dir)?;
    // A pid of a dead `earshot up` may have been reused: signal only the
    // process that is still that `earshot up`.
    let still_up = processes::alive(run.pid)
        && processes::command_line(run.pid).is_some_and(|c| c.iter().any(|a| a == "up"));
    if !still_up || !processes::sigterm(run.pid) {
        // Not running any more: stop what it left behind, if still its.
        for p in &run.processes {
            if processes::alive(p.pid) && processes::command_line(p.pid).is_some() {
                processes::sigterm(p.pid);
            }
        }
        let _ = std::fs::remove_file(RunFile::path(run_dir));
        return Ok(());
    }
    let deadline = Instant::now() + within;
    while processes::alive(run.pid) {
        if Instant::now() > deadline {
            bail!(
                "earshot up (pid {}) did not stop within {within:?}",
                run.pid
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `text` (a topology) with every loopback port replaced by a free one:
/// regions' QUIC, the edges' port, GeoDNS's listener and the registry's
/// endpoint. For tests and `earshot up --free-ports`, beside another
/// planet or a taken 8080/5353.
pub fn with_free_ports(text: &str) -> anyhow::Result<String> {
    use crate::redis_server::free_port;
    let free_udp = || -> anyhow::Result<u16> {
        Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let mut t: toml::Table = text.parse().context("the topology is not valid TOML")?;
    if let Some(regions) = t.get_mut("region").and_then(|r| r.as_array_mut()) {
        for r in regions {
            if let Some(table) = r.as_table_mut() {
                table.insert("quic".into(), format!("127.0.0.1:{}", free_udp()?).into());
            }
        }
    }
    if let Some(g) = t.get_mut("geodns").and_then(|g| g.as_table_mut()) {
        g.insert("port".into(), i64::from(free_port()?).into());
        g.insert("listen".into(), format!("127.0.0.1:{}", free_udp()?).into());
    }
    if let Some(r) = t.get_mut("registry").and_then(|r| r.as_table_mut()) {
        r.insert(
            "endpoint".into(),
            format!("http://127.0.0.1:{}", free_port()?).into(),
        );
    }
    Ok(t.to_string())
}
