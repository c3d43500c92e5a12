//! `earshot`: the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use earshot_asr::{TestModelSpec, generate_test_model};
use earshot_cli::{assets, bench, certs, client, demo, speech, up};
use earshot_common::topology::Topology;

/// Whisper allocates and frees tensors of megabytes on every layer; glibc's
/// malloc returns such blocks to the kernel each time (page faults on every
/// reuse), mimalloc keeps them. See docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "earshot operator CLI")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the whole planet of a topology on loopback (regions with Redis,
    /// sync agents and regional nodes; edges; the registry's S3 server;
    /// GeoDNS), print what runs where, and run until Ctrl-C or SIGTERM.
    Up {
        #[arg(long, default_value = "topology/local.toml")]
        topology: PathBuf,
        /// Where the planet keeps its files (wiped at start).
        #[arg(long, default_value = ".cache/planet")]
        run_dir: PathBuf,
        /// ASR workers per region.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Run in the background; stop it with `earshot down`.
        #[arg(long)]
        detach: bool,
        /// Pick free ports for everything instead of the topology's (QUIC,
        /// the edges' port, DNS, S3): beside another planet, or when 8080 or
        /// 5353 is taken.
        #[arg(long)]
        free_ports: bool,
    },
    /// Stop the planet `earshot up` runs from a run directory.
    Down {
        #[arg(long, default_value = ".cache/planet")]
        run_dir: PathBuf,
    },
    /// Break one part of a running planet while EU and US clients stream
    /// speech, restore it, and report lost / duplicated / residency-violating
    /// finals (exit status 1 unless all three are 0), recovery time, WER and
    /// latency before/during/after, DNS answers; with a timeline plot.
    /// Scenarios: region-down REGION, redis-down REGION, worker-kill REGION,
    /// edge-down EDGE, partition EDGE REGION, az-flap REGION.
    Drill {
        scenario: String,
        targets: Vec<String>,
        #[command(flatten)]
        load: LoadArgs,
        /// Seconds of load before the fault, with the fault, and after.
        #[arg(long, default_value_t = 15.0)]
        before: f64,
        #[arg(long, default_value_t = 15.0)]
        during: f64,
        #[arg(long, default_value_t = 15.0)]
        after: f64,
        /// Where the report goes (default: <run-dir>/drills/<scenario>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Stream spoken sentences from EU and US clients through the edges
    /// GeoDNS gives their subnets, and report throughput, latency, errors by
    /// code, word error rate, and lost / duplicated / residency-violating
    /// finals.
    Loadtest {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
    },
    /// Relay UDP between LISTEN and TO (one upstream socket per peer): the
    /// proxies `earshot up` puts on each edge's QUIC path to a region, which
    /// the `partition` drill cuts.
    UdpProxy {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        to: std::net::SocketAddr,
    },
    /// What the planet's GeoDNS answers a client in SUBNET (e.g.
    /// 10.1.0.0/16), as a resolver sending EDNS client subnet would see it.
    Dns {
        subnet: String,
        #[arg(long, default_value = ".cache/planet")]
        run_dir: PathBuf,
        /// Another DNS server than the planet's (ip:port).
        #[arg(long)]
        server: Option<std::net::SocketAddr>,
    },
    /// Run a whole deployment on loopback and stream a spoken file through it.
    Demo {
        /// Where the demo keeps its files (models, certificates, logs).
        #[arg(long, default_value = ".cache/demo")]
        workdir: PathBuf,
    },
    /// Stream a 16 kHz mono WAV file to an edge and print what comes back.
    Listen {
        /// The WAV file.
        file: PathBuf,
        /// The edge's listen URL.
        #[arg(long, default_value = "ws://127.0.0.1:8080/v1/listen")]
        url: String,
        /// Milliseconds of audio per WebSocket frame.
        #[arg(long, default_value_t = 100)]
        chunk_ms: u64,
        /// Send in real time instead of as fast as possible.
        #[arg(long)]
        realtime: bool,
    },
    /// Check the residency receipts of finals (JSON lines of server
    /// messages, as `earshot listen` prints them; `-` reads standard input)
    /// against the CA and the topology. Exit status 0: every final verified;
    /// 1: one or more did not (each is listed with its code).
    Verify {
        file: PathBuf,
        /// PEM file of the deployment's CA.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, env = "EARSHOT_TOPOLOGY")]
        topology: PathBuf,
        /// Check every final against this session jurisdiction (default:
        /// the one in the `session` message before it).
        #[arg(long)]
        jurisdiction: Option<String>,
    },
    /// Generate development TLS certificates for every node of a topology.
    Certs {
        #[arg(long)]
        topology: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks (numbers go to docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
    /// Model utilities.
    Models {
        #[command(subcommand)]
        command: ModelsCmd,
    },
    /// Speak sentences with espeak-ng into a 16 kHz WAV, with silence between them.
    Speech {
        #[arg(long)]
        out: PathBuf,
        /// Seconds of silence between sentences.
        #[arg(long, default_value_t = 1.5)]
        gap: f64,
        #[arg(required = true)]
        sentences: Vec<String>,
    },
}

/// The planet and the clients a load (or a drill's load) runs.
#[derive(clap::Args)]
struct LoadArgs {
    #[arg(long, default_value = ".cache/planet")]
    run_dir: PathBuf,
    /// Clients in the EU test subnet (10.1.0.0/16).
    #[arg(long, default_value_t = 4)]
    eu_clients: usize,
    /// Clients in the US test subnet (10.2.0.0/16).
    #[arg(long, default_value_t = 2)]
    us_clients: usize,
    /// 1 streams in real time.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Per-utterance time outside the model (VAD, QUIC, Redis, fan-in) on loopback.
    Overhead {
        /// Utterances to send.
        #[arg(long, default_value_t = 200)]
        utterances: usize,
        /// How many times faster than real time to stream.
        #[arg(long, default_value_t = 4.0)]
        speed: f64,
        /// Whisper model directory (default: a generated test model).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Word error rate and latency of Whisper on real weights, per file, in
    /// the JSON-lines format of ../shared/peers (faster-whisper side by side).
    Asr {
        /// Model directory (default: .cache/models/whisper-tiny.en).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Where the audio set and results go.
        #[arg(long, default_value = ".cache/bench-asr")]
        out: PathBuf,
        /// Timed runs per file (the median counts).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Encoder window: full, fit, or padded to N seconds (the worker's
        /// default, 10s).
        #[arg(long, default_value = "10s")]
        window: earshot_asr::EncoderWindow,
        /// Decode with timestamp tokens (as `timestamps=true` sessions do).
        #[arg(long)]
        timestamps: bool,
        /// Also time each word (as `words=true` sessions do).
        #[arg(long)]
        words: bool,
    },
    /// Jobs per second of one worker's model with batching on and off: N
    /// utterances waiting at once, recognised in batches of up to B.
    Batch {
        /// Model directory (default: .cache/models/whisper-tiny.en).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Where the audio set is (written once).
        #[arg(long, default_value = ".cache/bench-asr")]
        out: PathBuf,
        /// Utterances waiting at once (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        concurrency: Vec<usize>,
        /// Largest batches (comma-separated; 1 is batching off).
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        #[arg(long, default_value = "10s")]
        window: earshot_asr::EncoderWindow,
    },
    /// Live partials on the edge tier's model: how soon a partial shows each
    /// word and what a partial costs (docs/benchmarks.md).
    Partials {
        /// The partials model (default: .cache/models/whisper-tiny.en-q8_0).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The model whose word timestamps say when each word ends
        /// (default: .cache/models/whisper-tiny.en).
        #[arg(long)]
        reference: Option<PathBuf>,
        #[arg(long, default_value = ".cache/bench-asr")]
        out: PathBuf,
        #[arg(long, default_value = "10s")]
        window: earshot_asr::EncoderWindow,
        /// Audio between two partials of one utterance.
        #[arg(long, default_value_t = 400)]
        cadence_ms: u32,
    },
    /// What one edge costs: real-time streams it sustains (`--streams`),
    /// or memory per idle connection (`--idle`). Runs the built
    /// earshot-edge as its own process: use a release build.
    Edge {
        /// Real-time streams to send (100 ms frames of quiet noise).
        #[arg(long, conflicts_with = "idle")]
        streams: Option<usize>,
        /// Streams play spoken sentences instead of noise (utterances cut,
        /// partials asked when the edge has a partials model:
        /// EARSHOT_EDGE_EXTRA).
        #[arg(long, requires = "streams")]
        speech: bool,
        /// Idle connections to hold open instead.
        #[arg(long)]
        idle: Option<usize>,
        /// Seconds to measure the streams over.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// The edge's VAD threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Registry publish/sync throughput and promote/rollback times.
    Registry {
        /// Size of the model to publish.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// The sync agents' poll interval.
        #[arg(long, default_value_t = 5000)]
        poll_ms: u64,
        /// Scratch directory (on the disk to measure).
        #[arg(long, default_value = ".cache/bench-registry")]
        workdir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Write a Whisper model with seeded random weights in the published
    /// layout (config.json, model.safetensors, tokenizer.json).
    GenerateWhisper {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = Preset::Test)]
        preset: Preset,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Convert a faster-whisper (CTranslate2) model directory (model.bin,
    /// config.json, tokenizer.json) into the published layout.
    ImportCt2 {
        /// The CTranslate2 model directory.
        src: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Transcribe 16 kHz mono WAV files with a model directory, one JSON
    /// line per file (text, language, guards, time per stage).
    Transcribe {
        model: PathBuf,
        wavs: Vec<PathBuf>,
        #[arg(long)]
        language: Option<String>,
        /// Also run Whisper's translate task (speech to English).
        #[arg(long)]
        translate: bool,
        /// Encoder window: full, fit, or padded to N seconds (the worker's
        /// default, 10s).
        #[arg(long, default_value = "10s")]
        window: earshot_asr::EncoderWindow,
    },
    /// Quantize a model in the published layout to GGUF (the edge tier).
    Quantize {
        src: PathBuf,
        #[arg(long, value_enum, default_value_t = SchemeArg::Q8_0)]
        scheme: SchemeArg,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemeArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// Tiny dimensions: fast enough for tests.
    Test,
    /// whisper-tiny's dimensions: for benchmarks.
    Tiny,
}

fn main() -> ExitCode {
    earshot_common::telemetry::init(false);
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("earshot: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("earshot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Demo { workdir } => demo::run(&workdir).await,
        Cmd::Up {
            topology,
            run_dir,
            workers,
            detach,
            free_ports,
        } => {
            let args = up::UpArgs {
                topology,
                run_dir,
                workers,
                detach,
                free_ports,
            };
            up::up(&args).await
        }
        Cmd::Down { run_dir } => up::down(&run_dir).await,
        Cmd::Drill {
            scenario,
            targets,
            load:
                LoadArgs {
                    run_dir,
                    eu_clients,
                    us_clients,
                    speed,
                },
            before,
            during,
            after,
            out,
        } => {
            use earshot_cli::drill;
            let scenario = drill::Scenario::parse(&scenario, &targets)?;
            let target = drill::Target::open(&run_dir)?;
            let seconds = |name: &str, v: f64| {
                Duration::try_from_secs_f64(v)
                    .with_context(|| format!("--{name} {v}: give a number of seconds, 0 or more"))
            };
            let options = drill::DrillOptions {
                before: seconds("before", before)?,
                during: seconds("during", during)?,
                after: seconds("after", after)?,
                eu_clients,
                us_clients,
                speed,
                ..drill::DrillOptions::default()
            };
            let out = out.unwrap_or_else(|| run_dir.join("drills").join(scenario.name()));
            eprintln!(
                "drill {}: load {before} s, fault {during} s, after {after} s …",
                scenario.title()
            );
            let report = drill::run(
                &target,
                &scenario,
                &options,
                &run_dir.join("drills").join("speech"),
            )
            .await?;
            let files = drill::write(&report, &out)?;
            println!("{}", drill::markdown(&report));
            for f in files {
                println!("wrote {}", f.display());
            }
            if !report.clean() {
                anyhow::bail!("the drill found lost, duplicated or residency-violating finals");
            }
            Ok(())
        }
        Cmd::Loadtest {
            load:
                LoadArgs {
                    run_dir,
                    eu_clients,
                    us_clients,
                    speed,
                },
            seconds,
        } => earshot_cli::loadtest::command(&run_dir, seconds, eu_clients, us_clients, speed).await,
        Cmd::UdpProxy { listen, to } => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(earshot_common::signals::cancel_on_signal(shutdown.clone()));
            earshot_cli::udp_proxy::run(listen, to, shutdown).await
        }
        Cmd::Dns {
            subnet,
            run_dir,
            server,
        } => up::dns(&run_dir, &subnet, server).await,
        Cmd::Listen {
            file,
            url,
            chunk_ms,
            realtime,
        } => {
            let samples = speech::read_wav(&file)?;
            let pcm: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
            let options = client::StreamOptions {
                chunk_bytes: (chunk_ms as usize * 32).max(2),
                pace: realtime.then(|| Duration::from_millis(chunk_ms)),
            };
            let transcript =
                client::stream(&url, &pcm, options, |m| println!("{}", m.to_json())).await?;
            if let Some((code, reason)) = transcript.close {
                eprintln!("closed: {code} {reason}");
            }
            Ok(())
        }
        Cmd::Bench {
            command:
                BenchCmd::Asr {
                    model,
                    out,
                    runs,
                    window,
                    timestamps,
                    words,
                },
        } => {
            let model = match model {
                Some(m) => m,
                None => assets::real_model("whisper-tiny.en")?,
            };
            earshot_cli::bench_asr::run(&model, &out, runs, window, timestamps, words)
        }
        Cmd::Bench {
            command:
                BenchCmd::Batch {
                    model,
                    out,
                    concurrency,
                    batch,
                    window,
                },
        } => {
            let model = match model {
                Some(m) => m,
                None => assets::real_model("whisper-tiny.en")?,
            };
            earshot_cli::bench_asr::batch(&model, &out, &concurrency, &batch, window)
        }
        Cmd::Bench {
            command:
                BenchCmd::Partials {
                    model,
                    reference,
                    out,
                    window,
                    cadence_ms,
                },
        } => {
            let model = match model {
                Some(m) => m,
                None => assets::real_model("whisper-tiny.en-q8_0")?,
            };
            let reference = match reference {
                Some(m) => m,
                None => assets::real_model("whisper-tiny.en")?,
            };
            earshot_cli::bench_asr::partials(&model, &reference, &out, window, cadence_ms)
        }
        Cmd::Bench {
            command:
                BenchCmd::Overhead {
                    utterances,
                    speed,
                    model,
                },
        } => {
            let scratch = tempfile::tempdir()?;
            let model = match model {
                Some(m) => m,
                None => {
                    let dir = scratch.path().join("whisper-test");
                    generate_test_model(&dir, &TestModelSpec::TEST)?;
                    dir
                }
            };
            bench::overhead(&model, utterances, speed).await
        }
        Cmd::Bench {
            command:
                BenchCmd::Registry {
                    size_mib,
                    poll_ms,
                    workdir,
                },
        } => bench::registry::run(size_mib, poll_ms, &workdir).await,
        Cmd::Bench {
            command:
                BenchCmd::Edge {
                    streams,
                    speech,
                    idle,
                    seconds,
                    threads,
                },
        } => match (streams, idle) {
            (_, Some(n)) => earshot_cli::bench_edge::idle(n).await,
            (n, None) => {
                earshot_cli::bench_edge::streams(n.unwrap_or(1500), seconds, threads, speech).await
            }
        },
        Cmd::Verify {
            file,
            ca,
            topology,
            jurisdiction,
        } => {
            let topology = std::sync::Arc::new(Topology::load(&topology)?);
            let verifier = earshot_common::receipt::ReceiptVerifier::load(&ca, topology)?;
            let report = if file.as_os_str() == "-" {
                earshot_cli::verify::verify(
                    &verifier,
                    std::io::stdin().lock(),
                    jurisdiction.as_deref(),
                )?
            } else {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("cannot open {}", file.display()))?;
                earshot_cli::verify::verify(
                    &verifier,
                    std::io::BufReader::new(f),
                    jurisdiction.as_deref(),
                )?
            };
            for r in &report.rejected {
                println!("line {}: {}: {}", r.line, r.code, r.message);
            }
            println!(
                "{} finals: {} verified, {} failed",
                report.finals,
                report.verified,
                report.rejected.len()
            );
            if report.rejected.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "{} finals did not verify",
                    report.rejected.len()
                ))
            }
        }
        Cmd::Certs { topology, out } => {
            let topology = Topology::load(&topology)?;
            certs::generate(&topology, &out)?;
            println!(
                "wrote CA, region and edge certificates to {}",
                out.display()
            );
            Ok(())
        }
        Cmd::Models {
            command: ModelsCmd::GenerateWhisper { out, preset, seed },
        } => {
            let mut spec = match preset {
                Preset::Test => TestModelSpec::TEST,
                Preset::Tiny => TestModelSpec::TINY,
            };
            if let Some(seed) = seed {
                spec.seed = seed;
            }
            generate_test_model(&out, &spec).context("generating the model")?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Models {
            command: ModelsCmd::ImportCt2 { src, out },
        } => {
            let shape = earshot_asr::ct2::convert(&src, &out)
                .with_context(|| format!("converting {}", src.display()))?;
            println!(
                "wrote {} (d_model {}, {}+{} layers, {} tokens, {})",
                out.display(),
                shape.d_model,
                shape.encoder_layers,
                shape.decoder_layers,
                shape.vocab_size,
                if shape.multilingual {
                    "multilingual"
                } else {
                    "English only"
                }
            );
            Ok(())
        }
        Cmd::Models {
            command:
                ModelsCmd::Transcribe {
                    model,
                    wavs,
                    language,
                    translate,
                    window,
                },
        } => {
            let whisper = earshot_asr::WhisperModel::load(&model, window)
                .with_context(|| format!("loading {}", model.display()))?;
            for wav in wavs {
                let pcm: Vec<f32> = speech::read_wav(&wav)?
                    .iter()
                    .map(|&s| f32::from(s) / 32768.0)
                    .collect();
                let started = std::time::Instant::now();
                let (r, t) = whisper.recognize(&pcm, language.as_deref(), translate)?;
                let total = started.elapsed();
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                let tr = &r.transcript;
                let line = serde_json::json!({
                    "wav": wav.display().to_string(),
                    "text": tr.text,
                    "translation": r.translation.as_ref().map(|t| t.text.clone()),
                    "language": tr.language,
                    "language_probability": tr.language_probability,
                    "no_speech_probability": tr.no_speech_probability,
                    "avg_logprob": tr.avg_logprob,
                    "compression_ratio": tr.compression_ratio,
                    "withheld": tr.withheld.map(|w| w.as_str()),
                    "n_tokens": tr.tokens.len(),
                    "tokens": tr.tokens,
                    "total_ms": ms(total),
                    "mel_ms": ms(t.mel),
                    "encoder_ms": ms(t.encoder),
                    "decode_ms": ms(t.decoder),
                });
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Models {
            command: ModelsCmd::Quantize { src, scheme, out },
        } => {
            let scheme = match scheme {
                SchemeArg::Q8_0 => earshot_asr::quantize::Scheme::Q8_0,
                SchemeArg::Q4_0 => earshot_asr::quantize::Scheme::Q4_0,
            };
            earshot_asr::quantize::quantize_whisper(&src, &out, scheme)
                .with_context(|| format!("quantizing {}", src.display()))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Speech {
            out,
            gap,
            sentences,
        } => {
            let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
            let work = tempfile::tempdir()?;
            let spoken = speech::synthesize(&refs, gap, 0.5, work.path())?;
            spoken.write_wav(&out)?;
            for (i, (start, end)) in spoken.spans.iter().enumerate() {
                println!("sentence {}: {start:.2}-{end:.2} s", i + 1);
            }
            Ok(())
        }
    }
}
