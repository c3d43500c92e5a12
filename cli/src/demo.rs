//! `earshot demo`: a real deployment on loopback, as separate processes.
//!
//! Starts redis-server, one `earshot-regional` (real Whisper tiny.en
//! weights, converted by `make setup`) and one `earshot-edge` (live
//! partials from the same weights), streams a spoken test file through the
//! edge in real time, prints every message the client
//! receives and what was said beside what was heard, and stops everything
//! it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use earshot_common::client::ServerMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::deploy::{Deployment, EdgeSpec, RegionSpec};
use crate::redis_server::{RedisServer, free_port};
use crate::{assets, client, speech};

pub const SENTENCES: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog.",
    "Every region keeps its own queue of utterances.",
    "Audio from the European Union stays in the European Union.",
];

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Process {
    name: &'static str,
    child: Option<Child>,
}

impl Process {
    fn spawn(
        name: &'static str,
        program: &Path,
        config: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = Command::new(program)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}: build it with `cargo build --bins`",
                    program.display()
                )
            })?;
        Ok(Process {
            name,
            child: Some(child),
        })
    }

    /// SIGTERM, then wait for a graceful exit (bounded).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        crate::processes::terminate(&mut child, Duration::from_secs(20))
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!("{} exited early ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// GETs `path` from 127.0.0.1:`port`; returns the status code.
pub async fn http_status(port: u16, path: &str) -> anyhow::Result<u16> {
    http_status_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// GETs `path` from `addr`; returns the status code.
pub async fn http_status_at(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("malformed HTTP response")
}

async fn wait_ready(process: &mut Process, port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        process.check_alive()?;
        if let Ok(200) = http_status(port, "/readyz").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} not ready within {within:?}", process.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(workdir: &Path) -> anyhow::Result<()> {
    // Configs name files by absolute path, so they work from any directory.
    let workdir = &std::path::absolute(workdir)?;
    let onnxruntime = assets::onnxruntime_library()?;
    let silero = assets::silero_model()?;
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .context("executable has no directory")?
        .to_owned();
    let _ = std::fs::remove_dir_all(workdir.join("deploy"));
    std::fs::create_dir_all(workdir.join("logs"))?;

    let model = assets::real_model("whisper-tiny.en")?;

    let redis = RedisServer::start(&workdir.join("redis"))?;
    let deployment = Deployment {
        dir: workdir.join("deploy"),
        jurisdictions: vec![("eu".into(), true), ("us".into(), false)],
        regions: vec![RegionSpec {
            name: "eu-west".into(),
            jurisdiction: "eu".into(),
            quic_port: free_udp_port()?,
            http_port: free_port()?,
            redis_url: redis.url(),
            workers: 1,
            extra: String::new(),
        }],
        edges: vec![EdgeSpec {
            name: "edge-local".into(),
            jurisdiction: "eu".into(),
            regions: vec!["eu-west".into()],
            address: "127.0.0.1".into(),
            http_port: free_port()?,
            // Live partials from the same tiny.en, on the edge's CPU.
            extra: format!("[partials]\nmodel = {model:?}\n"),
        }],
        model,
        onnxruntime,
        silero,
    };
    deployment.write()?;
    let region = &deployment.regions[0];
    let edge = &deployment.edges[0];

    let speech = speech::synthesize(&SENTENCES, 1.5, 0.5, &workdir.join("speech"))?;
    let wav = workdir.join("speech.wav");
    speech.write_wav(&wav)?;

    println!("redis-server      127.0.0.1:{}", redis.port());
    let logs = workdir.join("logs");
    let mut regional = Process::spawn(
        "earshot-regional",
        &bin_dir.join("earshot-regional"),
        &deployment.regional_config(&region.name),
        &logs.join("regional.log"),
    )?;
    let mut edge_process = Process::spawn(
        "earshot-edge",
        &bin_dir.join("earshot-edge"),
        &deployment.edge_config(&edge.name),
        &logs.join("edge.log"),
    )?;
    wait_ready(&mut regional, region.http_port, Duration::from_secs(60)).await?;
    println!(
        "earshot-regional  {} (QUIC 127.0.0.1:{}, http 127.0.0.1:{})",
        region.name, region.quic_port, region.http_port
    );
    wait_ready(&mut edge_process, edge.http_port, Duration::from_secs(60)).await?;
    println!(
        "earshot-edge      {} (ws://127.0.0.1:{}/v1/listen)",
        edge.name, edge.http_port
    );

    let url = format!(
        "ws://127.0.0.1:{}/v1/listen?sample_rate=16000&encoding=pcm_s16le&language=en",
        edge.http_port
    );
    println!(
        "\nstreaming {} ({} sentences, 1.5 s of silence between them, {:.1} s) to the edge in real time\n(partials are the edge's own reading while a sentence is spoken; finals come from the region):\n",
        wav.display(),
        SENTENCES.len(),
        speech.samples.len() as f64 / 16_000.0
    );
    let live = client::StreamOptions {
        pace: Some(Duration::from_millis(100)),
        ..client::StreamOptions::default()
    };
    let transcript = client::stream(&url, &speech.pcm_bytes(), live, |m: &ServerMessage| {
        println!("{}", m.to_json());
    })
    .await?;
    println!(
        "\nclose: {}",
        transcript
            .close
            .as_ref()
            .map_or("none".into(), |(c, r)| format!("{c} {r}"))
    );

    edge_process.stop();
    regional.stop();
    drop(redis);
    println!(
        "stopped redis-server, earshot-regional and earshot-edge (logs in {})",
        logs.display()
    );

    let finals = transcript.finals().len();
    if finals != SENTENCES.len() {
        bail!(
            "expected {} finals (one per sentence), got {finals}; see the logs in {}",
            SENTENCES.len(),
            logs.display()
        );
    }
    let mut errors = earshot_asr::wer::WordErrors::default();
    println!();
    for (said, heard) in SENTENCES.iter().zip(transcript.finals()) {
        println!("said:  {said}\nheard: {}\n", heard.text);
        errors.add(said, &heard.text);
    }
    println!(
        "ok: {finals} finals for {} sentences, word error rate {errors}",
        SENTENCES.len()
    );
    Ok(())
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
