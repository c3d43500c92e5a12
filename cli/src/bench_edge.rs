//! `earshot bench edge`: what one edge costs per stream and per idle
//! connection.
//!
//! The edge runs as its own `earshot-edge` process (built next to this
//! binary, or `EARSHOT_EDGE_BINARY`: measure a release build), alone (no region: the audio is quiet
//! noise, so the VAD works on every window and no utterance is cut). This
//! process plays the clients on the same machine, which they share with the
//! edge, so the numbers are conservative.
//!
//! - `--streams N`: N clients send 100 ms frames in real time. Measured over
//!   the steady part: the edge's CPU per stream-second, how much of the
//!   offered audio it took in, and how long frames waited (its
//!   `earshot_edge_frame_seconds`: arrival to last window evaluated).
//!   Then, in this process, Silero alone with the edge's thread count, fed
//!   as fast as it goes: the compute bound the edge is compared with.
//! - `--idle N`: N connections that send nothing; the edge's resident
//!   memory before and after, and its CPU while they idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use earshot_edge::vad::{Silero, VadStream, WINDOW};
use futures::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{http_get, lone_edge_config, metric};
use crate::{assets, processes};

/// A running `earshot-edge` process and where it listens.
struct EdgeProcess {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl EdgeProcess {
    async fn start(extra: &str) -> anyhow::Result<Self> {
        // EARSHOT_EDGE_EXTRA: more of the edge's TOML (e.g. a `[partials]`
        // table, to measure the edge with its partials model loaded).
        let more = std::env::var("EARSHOT_EDGE_EXTRA").unwrap_or_default();
        let (config, dir) = lone_edge_config(&format!("{extra}\n{more}\n"))?;
        // The edge to measure: EARSHOT_EDGE_BINARY (e.g. a release build
        // while this runs from a debug one), else the one next to this.
        let binary = match std::env::var_os("EARSHOT_EDGE_BINARY") {
            Some(path) => path.into(),
            None => assets::binary("earshot-edge")?,
        };
        // The port from the file itself, so that an older edge's config
        // (another schema) can be measured too.
        let text: toml::Table = std::fs::read_to_string(&config)?.parse()?;
        let port = text
            .get("listen")
            .and_then(|l| l.as_str())
            .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
            .context("the edge config has no listen address")?
            .port();
        let log = std::fs::File::create(dir.path().join("edge.log"))?;
        let mut child = std::process::Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .env("EARSHOT_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start earshot-edge")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(port, "/readyz").await.is_err() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "earshot-edge exited with {status}: {}",
                    std::fs::read_to_string(dir.path().join("edge.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("earshot-edge was not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(EdgeProcess {
            child,
            port,
            _dir: dir,
        })
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which may hold spaces) start at ")".
        let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or_default();
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        // utime and stime are fields 14 and 15 of the whole line: 11 and
        // 12 after the state field.
        match (ticks(11), ticks(12)) {
            (Some(u), Some(s)) => Ok((u + s) / 100.0),
            _ => bail!("cannot read the edge's CPU time"),
        }
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.port, "/metrics").await
    }

    fn stop(mut self) {
        processes::terminate(&mut self.child, Duration::from_secs(10));
    }
}

/// `(le, cumulative count)` of a histogram's buckets.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` of what was observed
/// between two snapshots.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = delta.last().map_or(0.0, |d| d.1);
    delta
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::NAN, |(le, _)| *le)
}

/// Quiet noise, 100 ms of 16 kHz s16le, different per client.
fn noise_frame(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..1600)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (((x >> 40) as i16) >> 6).to_le_bytes()
        })
        .collect()
}

/// Runs `--streams`: quiet noise (the VAD evaluates every window and cuts
/// nothing), or with `speech` the spoken sentences of [`speech::ENGLISH`],
/// looped, each stream from its own place in them (utterances are cut and
/// partials asked; with no region behind the edge their finals fail, which
/// costs the edge nothing while it is measured).
pub async fn streams(
    streams: usize,
    seconds: f64,
    threads: usize,
    speech: bool,
) -> anyhow::Result<()> {
    let spoken: Arc<Vec<Vec<u8>>> = Arc::new(if speech {
        let dir = tempfile::tempdir()?;
        crate::speech::synthesize(&crate::speech::ENGLISH, 1.0, 0.5, dir.path())?
            .pcm_bytes()
            .chunks(3200)
            .filter(|c| c.len() == 3200)
            .map(<[u8]>::to_vec)
            .collect()
    } else {
        Vec::new()
    });
    // EARSHOT_EDGE_VAD_THREADS_KEY: what the measured edge's config calls
    // the VAD thread count (`sessions` before the VAD was batched).
    let key = std::env::var("EARSHOT_EDGE_VAD_THREADS_KEY").unwrap_or_else(|_| "threads".into());
    let extra = format!(
        "{key} = {threads}\n[limits]\nmax_sessions = {}\nidle_timeout_ms = 600000\n",
        streams + 16
    );
    let edge = EdgeProcess::start(&extra).await?;
    let url = format!("ws://127.0.0.1:{}/v1/listen", edge.port);
    let run_for = Duration::from_secs_f64(seconds);
    let ramp = Duration::from_secs(2);
    let began = Instant::now();
    let stop_at = began + ramp + run_for + Duration::from_secs(1);
    // Per client: the worst lateness of a send against its schedule, µs.
    let worst_late = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(streams);
    for i in 0..streams {
        let url = url.clone();
        let worst_late = worst_late.clone();
        let failures = failures.clone();
        let spoken = spoken.clone();
        let start = began + ramp.mul_f64(i as f64 / streams as f64);
        clients.push(tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await else {
                failures.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let (mut sink, mut source) = ws.split();
            let noise = noise_frame(i as u64 + 1);
            let mut at = i * 7;
            let mut next = Instant::now();
            let reader = tokio::spawn(async move { while source.next().await.is_some() {} });
            while next < stop_at {
                tokio::time::sleep_until(next).await;
                let late = next.elapsed().as_micros() as u64;
                worst_late.fetch_max(late, Ordering::Relaxed);
                let frame = if spoken.is_empty() {
                    &noise
                } else {
                    at += 1;
                    &spoken[at % spoken.len()]
                };
                if sink
                    .send(Message::Binary(frame.clone().into()))
                    .await
                    .is_err()
                {
                    failures.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                next += Duration::from_millis(100);
            }
            let _ = sink.close().await;
            reader.abort();
        }));
    }
    // Steady state: every client connected and sending.
    tokio::time::sleep_until(began + ramp + Duration::from_millis(500)).await;
    let m0 = edge.metrics().await?;
    let cpu0 = edge.cpu_seconds()?;
    let t0 = Instant::now();
    worst_late.store(0, Ordering::Relaxed);
    tokio::time::sleep(run_for.saturating_sub(Duration::from_millis(500))).await;
    let m1 = edge.metrics().await?;
    let cpu1 = edge.cpu_seconds()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let late_ms = worst_late.load(Ordering::Relaxed) as f64 / 1000.0;
    let rss = edge.rss_kib()?;
    for c in clients {
        let _ = c.await;
    }
    edge.stop();

    let active = metric(&m1, "earshot_edge_sessions_active").unwrap_or(0.0);
    let audio = |m: &str| metric(m, "earshot_edge_audio_received_seconds_total").unwrap_or(0.0);
    let offered = streams as f64 * elapsed;
    let taken = audio(&m1) - audio(&m0);
    let cpu = cpu1 - cpu0;
    let frames = "earshot_edge_frame_seconds";
    let (b0, b1) = (buckets(&m0, frames), buckets(&m1, frames));
    let batch = "earshot_edge_vad_batch_size";
    let batch_sum = |m: &str| {
        (
            metric(m, &format!("{batch}_sum")).unwrap_or(0.0),
            metric(m, &format!("{batch}_count")).unwrap_or(0.0),
        )
    };
    let ((s0, c0), (s1, c1)) = (batch_sum(&m0), batch_sum(&m1));
    let what = if speech {
        "spoken sentences"
    } else {
        "quiet noise"
    };
    println!(
        "edge: {streams} real-time streams (100 ms frames of {what}), {threads} VAD threads, {elapsed:.1} s measured"
    );
    println!(
        "  sessions open                 {active:.0} (client failures: {})",
        failures.load(Ordering::Relaxed)
    );
    println!(
        "  audio taken in / offered      {:.1}%",
        100.0 * taken / offered
    );
    println!(
        "  edge CPU                      {:.2} cores, {:.3} ms per stream-second",
        cpu / elapsed,
        1000.0 * cpu / offered
    );
    println!(
        "  frame wait p50 / p99 / p99.9  <= {:.1} / {:.1} / {:.1} ms (bucket bounds)",
        1000.0 * quantile(&b0, &b1, 0.5),
        1000.0 * quantile(&b0, &b1, 0.99),
        1000.0 * quantile(&b0, &b1, 0.999)
    );
    println!(
        "  VAD batch size, mean          {:.1} streams per call",
        (s1 - s0) / (c1 - c0).max(1.0)
    );
    println!("  worst client send lateness    {late_ms:.1} ms");
    let delta = |name: &str| metric(&m1, name).unwrap_or(0.0) - metric(&m0, name).unwrap_or(0.0);
    let skipped = "earshot_edge_partials_skipped_total";
    println!(
        "  partials sent / skipped busy  {:.0} / {:.0} ({:.2} per stream-second sent)",
        delta("earshot_edge_partials_total"),
        delta(&format!("{skipped}{{reason=\"busy\"}}")),
        delta("earshot_edge_partials_total") / offered
    );
    let compute = "earshot_edge_partial_compute_seconds";
    let (p0, p1) = (buckets(&m0, compute), buckets(&m1, compute));
    println!(
        "  partial compute p50 / p99     <= {:.0} / {:.0} ms (bucket bounds)",
        1000.0 * quantile(&p0, &p1, 0.5),
        1000.0 * quantile(&p0, &p1, 0.99)
    );
    println!(
        "  edge resident memory          {:.1} MiB",
        rss as f64 / 1024.0
    );

    let bound = compute_bound(threads, Duration::from_secs(3)).await?;
    println!(
        "  Silero compute bound          {:.0} stream-windows/s = {:.0} real-time streams on {threads} threads (this process, batches of up to 256)",
        bound,
        bound / 31.25
    );
    println!(
        "  streams / bound               {:.0}%",
        100.0 * streams as f64 / (bound / 31.25)
    );
    Ok(())
}

/// Stream-windows per second Silero evaluates on `threads` threads when
/// every stream always has a window waiting.
async fn compute_bound(threads: usize, run_for: Duration) -> anyhow::Result<f64> {
    let vad = Arc::new(Silero::load(
        &assets::onnxruntime_library()?,
        &assets::silero_model()?,
        threads,
        4096,
        Default::default(),
    )?);
    let done = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + run_for;
    let window: Vec<f32> = noise_frame(7)[..WINDOW * 2]
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    let tasks: Vec<_> = (0..1024)
        .map(|_| {
            let (vad, done, window) = (vad.clone(), done.clone(), window.clone());
            tokio::spawn(async move {
                let mut stream = VadStream::default();
                while Instant::now() < stop_at {
                    if vad
                        .probabilities(&mut stream, window.clone())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let began = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64())
}

/// Runs `--idle`.
pub async fn idle(connections: usize) -> anyhow::Result<()> {
    let extra = format!(
        "[limits]\nmax_sessions = {}\nidle_timeout_ms = 600000\n",
        connections + 16
    );
    let edge = EdgeProcess::start(&extra).await?;
    let url = format!("ws://127.0.0.1:{}/v1/listen", edge.port);
    // One session first, so what the first connection costs once (the
    // runtime's lazily grown pools) is not charged to all.
    let (warm, _) = tokio_tungstenite::connect_async(&url).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = edge.rss_kib()?;
    let mut open = Vec::with_capacity(connections);
    for batch in (0..connections).collect::<Vec<_>>().chunks(250) {
        let attempts = batch.iter().map(|_| tokio_tungstenite::connect_async(&url));
        for result in futures::future::join_all(attempts).await {
            let (mut ws, _) = result.context("an idle connection was refused")?;
            // Its `session` message: the session is fully set up.
            let _ = ws.next().await;
            open.push(ws);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = edge.rss_kib()?;
    let cpu0 = edge.cpu_seconds()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu = (edge.cpu_seconds()? - cpu0) / 5.0;
    let active = metric(&edge.metrics().await?, "earshot_edge_sessions_active").unwrap_or(0.0);
    drop(open);
    drop(warm);
    edge.stop();
    println!("edge: {connections} idle WebSocket sessions ({active:.0} open)");
    println!(
        "  resident memory               {:.1} MiB before, {:.1} MiB with them",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    println!(
        "  per connection                {:.1} KiB",
        after.saturating_sub(before) as f64 / connections as f64
    );
    println!("  CPU while idle                {:.3} cores", idle_cpu);
    Ok(())
}
