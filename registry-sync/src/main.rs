//! `earshot-registry`: publish, promote, roll back, replicate and inspect
//! model versions; run the sync agent; serve an embedded S3 registry.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use earshot_common::manifest::{Format, Kind, Quantization, Rollout, Tier};
use earshot_common::supervise::Supervisor;
use earshot_common::topology::Topology;
use earshot_registry::channels::{self, ChannelError};
use earshot_registry::publish::{self, Progress, PublishError, PublishRequest, Transfer};
use earshot_registry::replicate::{self, Outcome, Selection};
use earshot_registry::status::{self, human_bytes, table};
use earshot_registry::sync::{Agent, SyncConfig};
use earshot_registry::{Registry, metrics::SyncMetrics, read_manifest, server::EmbeddedS3};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "earshot model registry: publish, promote, roll back, replicate, sync"
)]
struct Args {
    /// The topology file (buckets, homes and the S3 endpoint come from it).
    #[arg(
        long,
        env = "EARSHOT_TOPOLOGY",
        global = true,
        default_value = "topology.toml"
    )]
    topology: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum TierArg {
    Edge,
    Regional,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Asr,
    Mt,
    Vad,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Safetensors,
    Gguf,
    Onnx,
}

/// The layout of the directory `import` reads.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SourceArg {
    /// Hugging Face's published layout: config.json, model.safetensors,
    /// tokenizer.json.
    Hf,
    /// faster-whisper's: CTranslate2's model.bin, config.json,
    /// tokenizer.json; converted on the way.
    Ctranslate2,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    None,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(clap::Args)]
struct Describe {
    #[arg(long)]
    name: String,
    #[arg(long)]
    version: String,
    #[arg(long, value_enum)]
    tier: TierArg,
    #[arg(long, value_enum, default_value = "asr")]
    kind: KindArg,
    /// `global`, or the jurisdiction the model must stay in (e.g. `eu`).
    #[arg(long)]
    residency: String,
    /// Comma-separated ISO 639-1 codes.
    #[arg(long, value_delimiter = ',')]
    languages: Vec<String>,
    /// The version this one derives from.
    #[arg(long)]
    parent: Option<String>,
    #[arg(long, default_value = "global")]
    training_data_jurisdiction: String,
    #[arg(long, env = "USER", default_value = "unknown")]
    publisher: String,
    /// Evaluation results, e.g. `--metric wer=0.121` (repeatable).
    #[arg(long = "metric", value_parser = parse_metric)]
    metrics: Vec<(String, f64)>,
    /// Multipart part size.
    #[arg(long, default_value_t = 16)]
    part_size_mib: usize,
    /// Parts uploaded at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
}

fn parse_metric(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((
        k.to_owned(),
        v.parse().map_err(|_| format!("{v:?} is not a number"))?,
    ))
}

#[derive(Subcommand)]
enum Cmd {
    /// Upload a model directory as a new, immutable version.
    Publish {
        dir: PathBuf,
        #[command(flatten)]
        describe: Describe,
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        #[arg(long, value_enum, default_value = "none")]
        quantization: QuantArg,
    },
    /// Publish downloaded Whisper weights (config.json, model.safetensors,
    /// tokenizer.json, or a faster-whisper directory with --from
    /// ctranslate2), optionally quantized to GGUF for the edge tier.
    Import {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "hf")]
        from: SourceArg,
        #[command(flatten)]
        describe: Describe,
        #[arg(long, value_enum)]
        quantize: Option<QuantArg>,
    },
    /// Point a channel at a version.
    Promote {
        #[arg(long)]
        name: String,
        #[arg(long)]
        channel: String,
        #[arg(long)]
        version: String,
        /// Share of nodes that take it (stable hash of the node id).
        #[arg(long, default_value_t = 100)]
        percent: u8,
        /// Limit the rollout to these regions (comma-separated).
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
    },
    /// Point a channel back at its previous version.
    Rollback {
        #[arg(long)]
        name: String,
        #[arg(long)]
        channel: String,
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
    },
    /// Copy versions to every region bucket their residency allows.
    Replicate {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        version: Option<String>,
        /// Only these regions (repeatable); a forbidden one is an error.
        #[arg(long)]
        to: Vec<String>,
    },
    /// Published versions and where they are.
    List {
        #[arg(long)]
        name: Option<String>,
    },
    /// One version's manifest.
    Show { name: String, version: String },
    /// Per region: versions present, channels, and what each node runs.
    Status {
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the sync agent beside a node.
    Sync {
        #[arg(long, env = "EARSHOT_SYNC_CONFIG")]
        config: PathBuf,
    },
    /// Serve buckets from a directory over S3 (embedded server).
    ServeS3 {
        #[arg(long)]
        root: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
    /// Create every region's bucket.
    InitBuckets,
}

const EX_FAILURE: u8 = 1;
const EX_CONFLICT: u8 = 3;
const EX_REFUSED: u8 = 4;
const EX_USAGE: u8 = 64;

struct Failure(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(EX_FAILURE, e.into())
    }
}

fn main() -> ExitCode {
    earshot_common::telemetry::init(false);
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("earshot-registry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("earshot-registry: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn registry(args: &Args) -> Result<Registry, Failure> {
    let topology = Topology::load(&args.topology).map_err(|e| Failure(EX_USAGE, e.into()))?;
    Registry::from_env(Arc::new(topology)).map_err(|e| Failure(EX_USAGE, e.into()))
}

fn state_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("earshot-registry")
}

fn transfer(d: &Describe) -> Transfer {
    let mut t = Transfer::new(state_dir());
    t.part_size = d.part_size_mib.max(5) << 20;
    t.parallelism = d.parallel.max(1);
    t.progress = if std::io::stderr().is_terminal() {
        Arc::new(Bar::new())
    } else {
        Arc::new(Lines::default())
    };
    let cancel = t.cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        cancel.cancel();
    });
    t
}

fn request(
    dir: PathBuf,
    d: &Describe,
    format: Option<Format>,
    quantization: Quantization,
) -> PublishRequest {
    PublishRequest {
        dir,
        name: d.name.clone(),
        version: d.version.clone(),
        tier: match d.tier {
            TierArg::Edge => Tier::Edge,
            TierArg::Regional => Tier::Regional,
        },
        kind: match d.kind {
            KindArg::Asr => Kind::Asr,
            KindArg::Mt => Kind::Mt,
            KindArg::Vad => Kind::Vad,
        },
        format,
        quantization,
        languages: d.languages.clone(),
        residency: d.residency.clone(),
        parent: d.parent.clone(),
        training_data_jurisdiction: d.training_data_jurisdiction.clone(),
        publisher: d.publisher.clone(),
        metrics: d.metrics.iter().cloned().collect::<BTreeMap<_, _>>(),
    }
}

fn quantization(q: QuantArg) -> Quantization {
    match q {
        QuantArg::None => Quantization::None,
        QuantArg::F16 => Quantization::F16,
        QuantArg::Q8_0 => Quantization::Q8_0,
        QuantArg::Q4_0 => Quantization::Q4_0,
    }
}

fn publish_failure(e: PublishError) -> Failure {
    match e {
        PublishError::VersionExists { .. } => Failure(EX_CONFLICT, e.into()),
        other => Failure(EX_FAILURE, other.into()),
    }
}

fn channel_failure(e: ChannelError) -> Failure {
    match e {
        ChannelError::Conflict { .. } => Failure(EX_CONFLICT, e.into()),
        ChannelError::RegionForbidden { .. } => Failure(EX_REFUSED, e.into()),
        other => Failure(EX_FAILURE, other.into()),
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

async fn run(args: Args) -> Result<(), Failure> {
    match &args.command {
        Cmd::ServeS3 { root, listen } => {
            let key = std::env::var("AWS_ACCESS_KEY_ID").context("set AWS_ACCESS_KEY_ID")?;
            let secret =
                std::env::var("AWS_SECRET_ACCESS_KEY").context("set AWS_SECRET_ACCESS_KEY")?;
            let server = EmbeddedS3::start(root, *listen, &key, &secret).await?;
            println!("serving {} at {}", root.display(), server.endpoint());
            let shutdown = CancellationToken::new();
            earshot_common::signals::cancel_on_signal(shutdown.clone()).await;
            server.stop().await;
            Ok(())
        }
        Cmd::InitBuckets => {
            let registry = registry(&args)?;
            registry.ensure_buckets().await?;
            for r in registry.topology.regions() {
                println!("{}  s3://{}", r.name, r.bucket);
            }
            Ok(())
        }
        Cmd::Publish {
            dir,
            describe,
            format,
            quantization: q,
        } => {
            let registry = registry(&args)?;
            let format = format.map(|f| match f {
                FormatArg::Safetensors => Format::Safetensors,
                FormatArg::Gguf => Format::Gguf,
                FormatArg::Onnx => Format::Onnx,
            });
            let req = request(dir.clone(), describe, format, quantization(*q));
            let report = publish::publish(&registry, &req, &transfer(describe))
                .await
                .map_err(publish_failure)?;
            print_published(&args, &report);
            Ok(())
        }
        Cmd::Import {
            dir,
            from,
            describe,
            quantize,
        } => {
            let registry = registry(&args)?;
            let scratch = tempfile::tempdir()?;
            let converted = tempfile::tempdir()?;
            let dir = if *from == SourceArg::Ctranslate2 {
                let (src, out) = (dir.clone(), converted.path().to_owned());
                eprintln!("converting {} from CTranslate2", src.display());
                tokio::task::spawn_blocking(move || earshot_asr::ct2::convert(&src, &out))
                    .await
                    .context("conversion task")?
                    .with_context(|| format!("converting {}", dir.display()))?;
                &converted.path().to_owned()
            } else {
                dir
            };
            let (source, format, q) = match quantize {
                None | Some(QuantArg::None) => {
                    (dir.clone(), Format::Safetensors, Quantization::None)
                }
                Some(QuantArg::F16) => {
                    return Err(Failure(
                        EX_USAGE,
                        anyhow::anyhow!("--quantize takes q8_0 or q4_0"),
                    ));
                }
                Some(q @ (QuantArg::Q8_0 | QuantArg::Q4_0)) => {
                    let scheme = match q {
                        QuantArg::Q8_0 => earshot_asr::quantize::Scheme::Q8_0,
                        _ => earshot_asr::quantize::Scheme::Q4_0,
                    };
                    let (src, out) = (dir.clone(), scratch.path().to_owned());
                    eprintln!(
                        "quantizing {} to {}",
                        src.display(),
                        if matches!(q, QuantArg::Q8_0) {
                            "q8_0"
                        } else {
                            "q4_0"
                        }
                    );
                    tokio::task::spawn_blocking(move || {
                        earshot_asr::quantize::quantize_whisper(&src, &out, scheme)
                    })
                    .await
                    .context("quantization task")??;
                    (scratch.path().to_owned(), Format::Gguf, quantization(*q))
                }
            };
            let req = request(source, describe, Some(format), q);
            let report = publish::publish(&registry, &req, &transfer(describe))
                .await
                .map_err(publish_failure)?;
            print_published(&args, &report);
            Ok(())
        }
        Cmd::Promote {
            name,
            channel,
            version,
            percent,
            regions,
            by,
        } => {
            let registry = registry(&args)?;
            let rollout = Rollout {
                percent: *percent,
                regions: regions.clone(),
            };
            let updated = channels::promote(&registry, name, channel, version, rollout, by)
                .await
                .map_err(channel_failure)?;
            print_updated(&args, &updated);
            Ok(())
        }
        Cmd::Rollback { name, channel, by } => {
            let registry = registry(&args)?;
            let updated = channels::rollback(&registry, name, channel, by)
                .await
                .map_err(channel_failure)?;
            print_updated(&args, &updated);
            Ok(())
        }
        Cmd::Replicate { name, version, to } => {
            let registry = registry(&args)?;
            let selection = Selection {
                name: name.clone(),
                version: version.clone(),
                to: to.clone(),
            };
            let mut t = Transfer::new(state_dir());
            std::fs::create_dir_all(&t.state_dir)?;
            t.progress = Arc::new(publish::Quiet);
            let items = replicate::replicate(&registry, &selection, &t).await?;
            let refused: Vec<&replicate::Item> = items
                .iter()
                .filter(|i| i.outcome == Outcome::Refused { requested: true })
                .collect();
            if args.json {
                let rows: Vec<serde_json::Value> = items
                    .iter()
                    .map(|i| serde_json::json!({"model": i.model, "region": i.region, "outcome": format!("{:?}", i.outcome)}))
                    .collect();
                print_json(&rows);
            } else {
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|i| {
                        let what = match &i.outcome {
                            Outcome::Copied { bytes } => format!("copied {}", human_bytes(*bytes)),
                            Outcome::Present => "present".into(),
                            Outcome::Refused { requested: true } => {
                                "refused: residency forbids it".into()
                            }
                            Outcome::Refused { requested: false } => "skipped: residency".into(),
                        };
                        vec![i.model.clone(), i.region.clone(), what]
                    })
                    .collect();
                print!("{}", table(&["MODEL", "REGION", "RESULT"], &rows));
            }
            if !refused.is_empty() {
                let list: Vec<String> = refused
                    .iter()
                    .map(|i| format!("{} to {}", i.model, i.region))
                    .collect();
                return Err(Failure(
                    EX_REFUSED,
                    anyhow::anyhow!(
                        "refused (the model's residency forbids those regions): {}",
                        list.join(", ")
                    ),
                ));
            }
            Ok(())
        }
        Cmd::List { name } => {
            let registry = registry(&args)?;
            let rows = status::list(&registry, name.as_deref()).await?;
            if args.json {
                print_json(&rows);
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.model.clone(),
                            r.version.clone(),
                            format!("{}/{}", r.tier, r.kind),
                            format!("{} {}", r.format, r.quantization),
                            r.residency.clone(),
                            human_bytes(r.bytes),
                            r.created.clone(),
                            r.regions.join(","),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "MODEL",
                            "VERSION",
                            "TIER/KIND",
                            "FORMAT",
                            "RESIDENCY",
                            "SIZE",
                            "CREATED",
                            "REGIONS"
                        ],
                        &cells
                    )
                );
            }
            Ok(())
        }
        Cmd::Show { name, version } => {
            let registry = registry(&args)?;
            let (home, manifest) = registry
                .find_version(name, version)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{name}@{version} is not published"))?;
            if args.json {
                print_json(&manifest);
            } else {
                println!("{} (home bucket {})", manifest.id(), home.bucket);
                println!("{}", String::from_utf8_lossy(&manifest.to_json()));
            }
            let _ = read_manifest;
            Ok(())
        }
        Cmd::Status { name } => {
            let registry = registry(&args)?;
            let regions = status::status(&registry, name.as_deref()).await;
            if args.json {
                print_json(&regions);
                return Ok(());
            }
            for r in &regions {
                println!("{} (s3://{})", r.region, r.bucket);
                if let Some(e) = &r.error {
                    println!("  unreachable: {e}");
                    continue;
                }
                println!(
                    "  versions: {}",
                    if r.versions.is_empty() {
                        "-".into()
                    } else {
                        r.versions.join(", ")
                    }
                );
                for c in &r.channels {
                    let scope = if c.rollout.regions.is_empty() {
                        "all regions".into()
                    } else {
                        c.rollout.regions.join(",")
                    };
                    println!(
                        "  channel {}/{} -> {} ({}% of nodes, {scope}; previous {}; generation {} by {} at {})",
                        c.name,
                        c.channel,
                        c.version,
                        c.rollout.percent,
                        c.previous.as_deref().unwrap_or("-"),
                        c.generation,
                        c.updated_by,
                        c.updated_at
                    );
                }
                let rows: Vec<Vec<String>> = r
                    .nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.node.clone(),
                            n.model.clone(),
                            n.version.clone().unwrap_or_else(|| "-".into()),
                            n.channel.clone().unwrap_or_else(|| "-".into()),
                            n.reported_at.clone(),
                        ]
                    })
                    .collect();
                if !rows.is_empty() {
                    for line in
                        table(&["NODE", "MODEL", "VERSION", "CHANNEL", "REPORTED"], &rows).lines()
                    {
                        println!("  {line}");
                    }
                }
            }
            Ok(())
        }
        Cmd::Sync { config } => {
            let config = SyncConfig::load(config).map_err(|e| Failure(EX_USAGE, e.into()))?;
            let topology =
                Topology::load(&config.topology).map_err(|e| Failure(EX_USAGE, e.into()))?;
            let registry =
                Registry::from_env(Arc::new(topology)).map_err(|e| Failure(EX_USAGE, e.into()))?;
            let metrics = Arc::new(SyncMetrics::new());
            let shutdown = CancellationToken::new();
            tokio::spawn(earshot_common::signals::cancel_on_signal(shutdown.clone()));
            let http = match config.http_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("listening on {addr}"))?,
                ),
                None => None,
            };
            let agent = Agent::new(config, &registry, metrics.clone())
                .map_err(|e| Failure(EX_USAGE, e.into()))?;
            // Both parts run until SIGTERM; one that dies first takes the
            // other down and the process exits 1 (an orchestrator restarts
            // it), never a sync loop without its health endpoint or the
            // reverse.
            let supervisor = Supervisor::new(shutdown.clone());
            let http = http.map(|listener| {
                let shutdown = shutdown.clone();
                supervisor.spawn("http", async move {
                    let served =
                        earshot_registry::sync::serve_http(listener, metrics, shutdown).await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "HTTP server failed");
                    }
                })
            });
            let sync = supervisor.spawn("sync", agent.run(shutdown.clone()));
            shutdown.cancelled().await;
            let _ = sync.await;
            if let Some(http) = http {
                let _ = http.await;
            }
            match supervisor.failure() {
                Some(why) => Err(Failure(EX_FAILURE, anyhow::anyhow!(why))),
                None => Ok(()),
            }
        }
    }
}

fn print_published(args: &Args, report: &publish::PublishReport) {
    if args.json {
        print_json(&report.manifest);
        return;
    }
    println!(
        "published {} to s3://{} ({} files, {}; {} parts sent, {} parts and {} files reused from an interrupted upload)",
        report.manifest.id(),
        report.bucket,
        report.manifest.files.len(),
        human_bytes(report.manifest.total_size()),
        report.parts_sent,
        report.parts_reused,
        report.files_reused
    );
}

fn print_updated(args: &Args, u: &channels::Updated) {
    if args.json {
        print_json(
            &serde_json::json!({"channel": u.channel, "propagated": u.propagated, "lagging": u.lagging}),
        );
        return;
    }
    let c = &u.channel;
    println!(
        "{}/{} -> {} ({}% of nodes{}), previous {}, generation {}",
        c.name,
        c.channel,
        c.version,
        c.rollout.percent,
        if c.rollout.regions.is_empty() {
            String::new()
        } else {
            format!(" in {}", c.rollout.regions.join(","))
        },
        c.previous.as_deref().unwrap_or("-"),
        c.generation
    );
    if !u.lagging.is_empty() {
        println!(
            "note: not yet replicated to {}: nodes there keep their model until `earshot-registry replicate` copies it",
            u.lagging.join(", ")
        );
    }
}

/// A progress bar for terminals.
struct Bar {
    bar: indicatif::ProgressBar,
}

impl Bar {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:24!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Bar { bar }
    }
}

impl Progress for Bar {
    fn file_started(&self, path: &str, size: u64) {
        self.bar.set_length(size);
        self.bar.set_position(0);
        self.bar.set_message(path.to_owned());
    }
    fn bytes(&self, n: u64) {
        self.bar.inc(n);
    }
    fn file_done(&self, _: &str) {}
}

/// Plain progress lines for logs: each file, and every 10 %.
#[derive(Default)]
struct Lines {
    size: AtomicU64,
    done: AtomicU64,
    reported: AtomicU64,
}

impl Progress for Lines {
    fn file_started(&self, path: &str, size: u64) {
        self.size.store(size, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.reported.store(0, Ordering::Relaxed);
        eprintln!("uploading {path} ({})", human_bytes(size));
    }
    fn bytes(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let size = self.size.load(Ordering::Relaxed).max(1);
        let tenth = done * 10 / size;
        if tenth > self.reported.swap(tenth, Ordering::Relaxed) && tenth < 10 {
            eprintln!("  {}%", tenth * 10);
        }
    }
    fn file_done(&self, path: &str) {
        eprintln!("  done {path}");
    }
}
