//! The `earshot up`, `earshot down` and `earshot dns` commands, and the
//! control API through which drills break and restore parts of a running
//! planet.
//!
//! Control API (loopback only, address in `up.json`):
//! - `GET /v1/status`: `up.json`'s contents.
//! - `POST /v1/processes/<name>/kill`: `kill -9`.
//! - `POST /v1/processes/<name>/terminate`: SIGTERM and a drain.
//! - `POST /v1/processes/<name>/restart`: start it again; answers once ready.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::planet::{Planet, PlanetOptions, RunFile};
use crate::{assets, geodns};

#[derive(Debug, Clone)]
pub struct UpArgs {
    pub topology: PathBuf,
    pub run_dir: PathBuf,
    pub workers: usize,
    pub detach: bool,
    pub free_ports: bool,
}

/// `earshot up`: starts the planet, prints its table, and runs until
/// Ctrl-C or SIGTERM, then drains everything in order. With `detach`, runs
/// itself in the background and returns once the planet is up.
pub async fn up(args: &UpArgs) -> anyhow::Result<()> {
    if args.detach {
        return detach(args).await;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(earshot_common::signals::cancel_on_signal(shutdown.clone()));
    let mut topology = args.topology.clone();
    if args.free_ports {
        // A copy beside the run directory (which the planet wipes).
        let text = std::fs::read_to_string(&topology)
            .with_context(|| format!("cannot read {}", topology.display()))?;
        let copy = std::path::absolute(&args.run_dir)?.with_extension("topology.toml");
        std::fs::write(&copy, crate::planet::with_free_ports(&text)?)?;
        topology = copy;
    }
    let options = PlanetOptions {
        topology,
        run_dir: args.run_dir.clone(),
        model: assets::real_model("whisper-tiny.en")?,
        workers: args.workers,
    };
    eprintln!("starting the planet of {} …", args.topology.display());
    let planet = tokio::select! {
        p = Planet::start(&options) => p?,
        _ = shutdown.cancelled() => bail!("interrupted while starting"),
    };
    let planet = Arc::new(Mutex::new(planet));
    let (control, server) = start_control(planet.clone(), shutdown.clone()).await?;
    {
        let p = planet.lock().await;
        println!("{}", p.table());
        if let Some(g) = p.topology.geodns() {
            println!(
                "clients: ws://{}:{}/v1/listen, resolved by the GeoDNS server, e.g.\n  \
                 earshot dns 10.1.0.0/16 --run-dir {}   (an EU subnet)\n  \
                 dig +subnet=10.1.0.0/16 @{} -p {} {}",
                geodns::client_name(g),
                g.port,
                args.run_dir.display(),
                p.dns().ip(),
                p.dns().port(),
                geodns::client_name(g),
            );
        }
        println!(
            "control: http://{control}  (earshot drill; `earshot down` or Ctrl-C stops everything)"
        );
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                for (name, status) in planet.lock().await.reap() {
                    eprintln!("earshot up: {name} exited ({status}); `POST /v1/processes/{name}/restart` starts it again");
                }
            }
        }
    }
    eprintln!("draining …");
    let _ = server.await;
    let planet = Arc::try_unwrap(planet)
        .map_err(|_| anyhow::anyhow!("the control API still holds the planet"))?
        .into_inner();
    let failed = tokio::task::block_in_place(|| planet.stop());
    if failed.is_empty() {
        eprintln!("stopped");
        Ok(())
    } else {
        bail!("these did not stop cleanly: {}", failed.join(", "))
    }
}

/// Runs `earshot up` (without `--detach`) in its own process group, logging
/// to `<run>/up.log`, and waits until its `up.json` appears.
async fn detach(args: &UpArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let run_dir = std::path::absolute(&args.run_dir)?;
    if let Ok(run) = RunFile::read(&run_dir)
        && crate::processes::alive(run.pid)
    {
        bail!(
            "a planet is already running from {} (pid {}): stop it with `earshot down --run-dir {}`",
            run_dir.display(),
            run.pid,
            run_dir.display()
        );
    }
    let _ = std::fs::remove_file(RunFile::path(&run_dir));
    std::fs::create_dir_all(run_dir.parent().unwrap_or(Path::new(".")))?;
    let log_path = run_dir.with_extension("log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("up")
        .arg("--topology")
        .arg(&args.topology)
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--workers")
        .arg(args.workers.to_string())
        .args(args.free_ports.then_some("--free-ports"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "earshot up exited ({status}) before the planet was up; {} ends:\n{}",
                log_path.display(),
                crate::cluster::log_tail(
                    &std::fs::read_to_string(&log_path).unwrap_or_default(),
                    20
                )
            );
        }
        if let Ok(run) = RunFile::read(&run_dir)
            && run.control.is_some()
        {
            print!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
            println!(
                "running in the background (pid {}); its log: {}",
                run.pid,
                log_path.display()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `earshot down`: stops the planet of `run_dir` (drained, in order).
pub async fn down(run_dir: &Path) -> anyhow::Result<()> {
    crate::planet::down(run_dir, Duration::from_secs(120)).await?;
    println!("stopped the planet of {}", run_dir.display());
    Ok(())
}

/// `earshot dns <subnet>`: what the planet's GeoDNS answers a client in
/// `subnet`, by edge name.
pub async fn dns(run_dir: &Path, subnet: &str, server: Option<SocketAddr>) -> anyhow::Result<()> {
    let run = RunFile::read(run_dir)?;
    let topology = earshot_common::topology::Topology::load(&run.topology)?;
    let server = server.unwrap_or(run.dns);
    let answer = geodns::query(server, &run.client_name, Some(subnet)).await?;
    let edges = geodns::answered_edges(&topology, &answer);
    println!(
        "{} for {subnet}: {} (ttl {}s, scope /{})",
        run.client_name,
        if edges.is_empty() {
            "no answer".into()
        } else {
            edges.join(", ")
        },
        answer.ttl.map_or("-".into(), |t| t.to_string()),
        answer.scope.map_or("-".into(), |s| s.to_string()),
    );
    Ok(())
}

/// A planet shared between its owner and the control API.
pub type Shared = Arc<Mutex<Planet>>;

/// Serves the control API for `planet` on a free loopback port (recorded
/// in its `up.json`) until `shutdown`.
pub async fn start_control(
    planet: Shared,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    planet.lock().await.set_control(addr)?;
    let span = tracing::info_span!("control_api", %addr);
    let task = tokio::spawn(tracing::Instrument::instrument(
        serve_control(listener, planet, shutdown),
        span,
    ));
    Ok((addr, task))
}

async fn serve_control(
    listener: tokio::net::TcpListener,
    planet: Shared,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/v1/status", get(status))
        .route("/v1/processes/{name}/{action}", post(act))
        .with_state(planet);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn status(State(planet): State<Shared>) -> (StatusCode, String) {
    let dir = planet.lock().await.run_dir.clone();
    match std::fs::read_to_string(RunFile::path(&dir)) {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn act(
    State(planet): State<Shared>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> (StatusCode, String) {
    let mut p = planet.lock().await;
    // Killing and draining wait on the process (up to 30 s for a drain):
    // tell the runtime, so this worker thread's other tasks move elsewhere.
    let result = match action.as_str() {
        "kill" => tokio::task::block_in_place(|| p.kill(&name)),
        "terminate" => tokio::task::block_in_place(|| p.terminate(&name, Duration::from_secs(30))),
        "restart" => p.restart(&name).await,
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!("unknown action {other:?}: use kill, terminate or restart\n"),
            );
        }
    };
    match result {
        Ok(()) => (StatusCode::OK, format!("{action} {name}: done\n")),
        Err(e) => (StatusCode::CONFLICT, format!("{action} {name}: {e:#}\n")),
    }
}

/// Sends a control request (`POST /v1/processes/<name>/<action>`) to a
/// running `earshot up`; fails with its answer when it is not 200.
pub async fn control(addr: SocketAddr, name: &str, action: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("earshot up's control API at {addr} does not answer"))?;
    s.write_all(
        format!("POST /v1/processes/{name}/{action} HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        let body = out.split("\r\n\r\n").nth(1).unwrap_or(&out);
        bail!("{action} {name}: {}", body.trim());
    }
    Ok(())
}
