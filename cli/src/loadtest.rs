//! `earshot loadtest`: concurrent clients streaming spoken sentences whose
//! text is known (espeak-ng), each through the edge GeoDNS gives its client
//! subnet, in real time or faster.
//!
//! Every sentence a client starts to send gets one record: its final (text,
//! region, latency from the end of the sentence's audio, word errors
//! against what was said, whether its residency receipt verifies against
//! the client's jurisdiction), its error, or `lost` when neither came. A
//! second final for the same utterance is a duplicate. Sessions run back
//! to back, each resolving its edge again, so clients move when GeoDNS
//! does.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use earshot_common::client::{ClientErrorCode, ServerMessage};
use earshot_common::receipt::ReceiptVerifier;
use earshot_common::topology::GeoDns;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::{self, StreamOptions};
use crate::{geodns, speech};

/// Sentences with known text the clients speak (in turn).
pub const SENTENCES: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog.",
    "Every region keeps its own queue of utterances.",
    "Audio from the European Union stays in the European Union.",
    "Please call me back before the end of the day.",
    "The weather tomorrow will be sunny and warm.",
    "We moved the meeting to Thursday afternoon.",
    "Turn left at the next corner and walk two blocks.",
    "The train to the airport leaves every ten minutes.",
];

/// Speech shorter than this before an edge's cut may not become an
/// utterance (the edge's `vad.min_speech_ms` + `pre_roll_ms`, 250 + 200 ms).
const CUT_MARGIN_S: f64 = 0.5;

/// Seconds of silence between sentences (the edge's endpointing needs 0.5).
const GAP_S: f64 = 1.0;

/// Clients of one jurisdiction, all in one client subnet.
#[derive(Debug, Clone)]
pub struct Population {
    pub jurisdiction: String,
    pub subnet: String,
    pub clients: usize,
}

/// The documented test subnets of `topology/local.toml`: EU and US.
pub fn default_populations(eu: usize, us: usize) -> Vec<Population> {
    vec![
        Population {
            jurisdiction: "eu".into(),
            subnet: "10.1.0.0/16".into(),
            clients: eu,
        },
        Population {
            jurisdiction: "us".into(),
            subnet: "10.2.0.0/16".into(),
            clients: us,
        },
    ]
}

pub struct LoadConfig {
    pub dns: SocketAddr,
    pub geodns: GeoDns,
    pub verifier: Arc<ReceiptVerifier>,
    pub populations: Vec<Population>,
    /// 1.0 streams in real time; 2.0 twice as fast.
    pub speed: f64,
    pub sentences_per_session: usize,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

/// What happened to one sentence a client sent.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub client: usize,
    /// The client's jurisdiction (what its finals' receipts must show).
    pub jurisdiction: String,
    pub session: String,
    pub edge: String,
    /// Index into [`SENTENCES`].
    pub sentence: usize,
    /// Seconds from the load's start to when the sentence's last audio was
    /// sent.
    pub spoken_at: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Final {
        region: String,
        /// Seconds from the load's start to the final's arrival.
        at: f64,
        /// Seconds from the end of the sentence's audio to its final.
        latency_s: f64,
        text: String,
        word_errors: usize,
        words: usize,
        /// The receipt's failure code, when it does not verify against the
        /// client's jurisdiction (a residency violation).
        receipt_failure: Option<String>,
    },
    Error {
        code: String,
        at: f64,
    },
    Lost,
}

/// Everything a load run saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    pub records: Vec<Record>,
    /// Finals beyond the first for one utterance of a session.
    pub duplicates: usize,
    /// Sentences the edge did not read before it closed the session (it
    /// said so in `closing`): a client sends them again.
    pub not_accepted: usize,
    pub sessions: usize,
    /// Sessions that could not start (resolve or connect), by reason.
    pub failed_sessions: BTreeMap<String, usize>,
    /// Seconds the load ran.
    pub seconds: f64,
}

/// Live counters behind the progress line.
#[derive(Debug, Default)]
struct Counters {
    sessions: AtomicU64,
    finals: AtomicU64,
    errors: AtomicU64,
}

/// The spoken audio of one session: sentences `first..first + n` (wrapping).
struct SessionAudio {
    sentences: Vec<usize>,
    pcm: Vec<u8>,
    /// `(start, end)` seconds of each sentence in the audio.
    spans: Vec<(f64, f64)>,
}

/// Synthesizes one session's audio per starting sentence (once).
fn corpus(n: usize, workdir: &Path) -> anyhow::Result<Vec<Arc<SessionAudio>>> {
    (0..SENTENCES.len())
        .map(|first| {
            let sentences: Vec<usize> = (0..n).map(|i| (first + i) % SENTENCES.len()).collect();
            let texts: Vec<&str> = sentences.iter().map(|&i| SENTENCES[i]).collect();
            let said = speech::synthesize(&texts, GAP_S, 0.5, &workdir.join(format!("s{first}")))?;
            Ok(Arc::new(SessionAudio {
                sentences,
                pcm: said.samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
                spans: said.spans,
            }))
        })
        .collect()
}

/// Synthesizes the load's speech into `workdir` (once per run).
pub fn prepare(config: &LoadConfig, workdir: &Path) -> anyhow::Result<Speech> {
    Ok(Speech(
        corpus(config.sentences_per_session.max(1), workdir)
            .context("synthesizing the load's speech (espeak-ng, sox)")?,
    ))
}

/// The load's spoken audio, from [`prepare`].
pub struct Speech(Vec<Arc<SessionAudio>>);

/// Runs the load until `stop`; each client finishes the session it is in.
/// Times in the records count from `start`.
pub async fn run(
    config: LoadConfig,
    speech: Speech,
    start: Instant,
    stop: CancellationToken,
) -> anyhow::Result<LoadResult> {
    let audio = speech.0;
    let config = Arc::new(config);
    let counters = Arc::new(Counters::default());
    let mut clients = JoinSet::new();
    let mut id = 0;
    for population in &config.populations {
        for _ in 0..population.clients {
            let (config, audio, counters) = (config.clone(), audio.clone(), counters.clone());
            let population = population.clone();
            let token = stop.child_token();
            let span = tracing::info_span!("load_client", client = id, jurisdiction = %population.jurisdiction);
            clients.spawn(
                client_loop(id, population, config, audio, counters, start, token).instrument(span),
            );
            id += 1;
        }
    }
    let progress = config.progress.then(|| {
        let (counters, token) = (counters.clone(), stop.child_token());
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => eprint!(
                            "\r{:6.1} s  sessions {}  finals {}  errors {}   ",
                            start.elapsed().as_secs_f64(),
                            counters.sessions.load(Ordering::Relaxed),
                            counters.finals.load(Ordering::Relaxed),
                            counters.errors.load(Ordering::Relaxed),
                        ),
                        _ = token.cancelled() => break,
                    }
                }
                eprintln!();
            }
            .instrument(tracing::info_span!("load_progress")),
        )
    });
    let mut result = LoadResult::default();
    while let Some(done) = clients.join_next().await {
        let part = done.context("a load client panicked")?;
        result.records.extend(part.records);
        result.duplicates += part.duplicates;
        result.not_accepted += part.not_accepted;
        result.sessions += part.sessions;
        for (reason, n) in part.failed_sessions {
            *result.failed_sessions.entry(reason).or_default() += n;
        }
    }
    if let Some(p) = progress {
        let _ = p.await;
    }
    result.seconds = start.elapsed().as_secs_f64();
    result
        .records
        .sort_by(|a, b| a.spoken_at.total_cmp(&b.spoken_at));
    Ok(result)
}

async fn client_loop(
    id: usize,
    population: Population,
    config: Arc<LoadConfig>,
    audio: Vec<Arc<SessionAudio>>,
    counters: Arc<Counters>,
    start: Instant,
    stop: CancellationToken,
) -> LoadResult {
    let mut out = LoadResult::default();
    let mut turn = id;
    // A session that could not start (an edge down, GeoDNS not yet moved)
    // is tried again after the shared jittered backoff.
    let mut backoff =
        earshot_common::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    while !stop.is_cancelled() {
        let session_audio = &audio[turn % audio.len()];
        turn += 1;
        let url = match geodns::edge_url(config.dns, &config.geodns, &population.subnet).await {
            Ok(url) => url,
            Err(e) => {
                *out.failed_sessions
                    .entry(format!("resolve: {e}"))
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let session = run_session(
            id,
            &population,
            &config,
            session_audio,
            &url,
            start,
            &counters,
        )
        .await;
        match session {
            Ok(part) => {
                out.records.extend(part.records);
                out.duplicates += part.duplicates;
                out.not_accepted += part.not_accepted;
                out.sessions += 1;
                backoff.reset();
                counters.sessions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                *out.failed_sessions.entry(format!("{e:#}")).or_default() += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    out
}

/// One session: stream the audio, then account for every sentence.
async fn run_session(
    id: usize,
    population: &Population,
    config: &LoadConfig,
    audio: &SessionAudio,
    url: &str,
    start: Instant,
    counters: &Counters,
) -> anyhow::Result<LoadResult> {
    let chunk_ms = 100.0;
    let options = StreamOptions {
        chunk_bytes: 3_200,
        pace: Some(Duration::from_secs_f64(
            chunk_ms / 1000.0 / config.speed.max(0.01),
        )),
    };
    let mut arrivals: Vec<Instant> = Vec::new();
    let transcript = client::stream(url, &audio.pcm, options, |m| {
        arrivals.push(Instant::now());
        match m {
            ServerMessage::Final(_) => counters.finals.fetch_add(1, Ordering::Relaxed),
            ServerMessage::Error(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    })
    .await?;
    let began = transcript.started_at.unwrap_or(start);
    let closed = transcript.closed_at.unwrap_or_else(Instant::now);
    let since = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    let sent_at = |audio_s: f64| began + Duration::from_secs_f64(audio_s / config.speed.max(0.01));
    let (mut session, mut edge) = (String::new(), String::new());
    let mut seen_utterances: HashMap<u32, usize> = HashMap::new();
    // Per sentence: its outcome, first come first kept.
    let mut outcomes: Vec<Option<Outcome>> = vec![None; audio.sentences.len()];
    let mut session_error: Option<(String, f64)> = None;
    // How much audio the edge read, when it closed the session itself.
    let mut accepted: Option<f64> = None;
    let mut duplicates = 0;
    for (m, at) in transcript.messages.iter().zip(&arrivals) {
        match m {
            ServerMessage::Session(info) => {
                session = info.session.clone();
                edge = info.edge.clone();
            }
            ServerMessage::Final(f) => {
                let n = seen_utterances.entry(f.utterance).or_default();
                *n += 1;
                if *n > 1 {
                    duplicates += 1;
                    continue;
                }
                let Some(i) = sentence_of(&audio.spans, f.start, f.end) else {
                    continue;
                };
                if outcomes[i].is_some() {
                    continue;
                }
                let reference = SENTENCES[audio.sentences[i]];
                let mut errors = earshot_asr::wer::WordErrors::default();
                errors.add(reference, &f.text);
                let receipt_failure = config
                    .verifier
                    .verify(f, Some(&population.jurisdiction))
                    .err()
                    .map(|e| e.code().to_owned());
                outcomes[i] = Some(Outcome::Final {
                    region: f.region.clone(),
                    at: since(*at),
                    latency_s: at
                        .saturating_duration_since(sent_at(audio.spans[i].1))
                        .as_secs_f64(),
                    text: f.text.clone(),
                    word_errors: errors.edits,
                    words: errors.words,
                    receipt_failure,
                });
            }
            ServerMessage::Error(e) => {
                let code = code_name(e.code);
                // Utterances are answered in order, so an utterance's error
                // belongs to the first sentence still open.
                let open = outcomes.iter().position(Option::is_none);
                match (e.utterance, open) {
                    (Some(_), Some(i)) => {
                        outcomes[i] = Some(Outcome::Error {
                            code,
                            at: since(*at),
                        });
                    }
                    (Some(_), None) => {}
                    // An error for the whole session answers every sentence
                    // still open.
                    (None, _) => session_error = Some((code, since(*at))),
                }
            }
            ServerMessage::Closing(c) => accepted = Some(c.audio_accepted),
            ServerMessage::Translation(_)
            | ServerMessage::SpeechStarted(_)
            | ServerMessage::Partial(_) => {}
        }
    }
    let mut part = LoadResult {
        duplicates,
        ..LoadResult::default()
    };
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let (start_s, end_s) = audio.spans[i];
        // A sentence that began after what the edge said it read (or after
        // the session closed) was not accepted: a client sends it again.
        // (The edge drops a speech onset shorter than its minimum speech
        // plus pre-roll at a cut, so a sentence starting that close to the
        // end of what was read is not counted as read either.)
        let read = accepted.map_or(sent_at(start_s) < closed, |a| start_s + CUT_MARGIN_S < a);
        if !read {
            part.not_accepted += 1;
            continue;
        }
        let outcome = outcome.unwrap_or_else(|| match &session_error {
            Some((code, at)) => Outcome::Error {
                code: code.clone(),
                at: *at,
            },
            None => Outcome::Lost,
        });
        part.records.push(Record {
            client: id,
            jurisdiction: population.jurisdiction.clone(),
            session: session.clone(),
            edge: edge.clone(),
            sentence: audio.sentences[i],
            spoken_at: since(sent_at(end_s)),
            outcome,
        });
    }
    Ok(part)
}

/// The sentence whose span overlaps `[start, end]` most.
fn sentence_of(spans: &[(f64, f64)], start: f64, end: f64) -> Option<usize> {
    spans
        .iter()
        .enumerate()
        .map(|(i, (s, e))| (i, (end.min(*e) - start.max(*s)).max(0.0)))
        .filter(|(_, overlap)| *overlap > 0.0)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

fn code_name(code: ClientErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{code:?}"))
}

/// Summary figures of a set of records.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    pub sentences: usize,
    pub finals: usize,
    pub errors: BTreeMap<String, usize>,
    pub lost: usize,
    pub residency_violations: usize,
    /// Word error rate of the finals against what was said.
    pub wer: Option<f64>,
    pub p50_latency_s: Option<f64>,
    pub p99_latency_s: Option<f64>,
    /// Finals by region and client jurisdiction: who served whom.
    pub served: BTreeMap<String, BTreeMap<String, usize>>,
}

pub fn summarize<'a>(records: impl IntoIterator<Item = &'a Record>) -> Summary {
    let mut s = Summary::default();
    let (mut edits, mut words) = (0usize, 0usize);
    let mut latencies = Vec::new();
    for r in records {
        s.sentences += 1;
        match &r.outcome {
            Outcome::Final {
                region,
                latency_s,
                word_errors,
                words: w,
                receipt_failure,
                ..
            } => {
                s.finals += 1;
                edits += word_errors;
                words += w;
                latencies.push(*latency_s);
                if receipt_failure.is_some() {
                    s.residency_violations += 1;
                }
                *s.served
                    .entry(region.clone())
                    .or_default()
                    .entry(r.jurisdiction.clone())
                    .or_default() += 1;
            }
            Outcome::Error { code, .. } => *s.errors.entry(code.clone()).or_default() += 1,
            Outcome::Lost => s.lost += 1,
        }
    }
    if words > 0 {
        s.wer = Some(edits as f64 / words as f64);
    }
    latencies.sort_by(f64::total_cmp);
    s.p50_latency_s = percentile(&latencies, 0.50);
    s.p99_latency_s = percentile(&latencies, 0.99);
    s
}

/// The `q` quantile of sorted `values` (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// `earshot loadtest`: runs the load against the planet of `run_dir` for
/// `seconds` and prints what it saw.
pub async fn command(
    run_dir: &Path,
    seconds: f64,
    eu: usize,
    us: usize,
    speed: f64,
) -> anyhow::Result<()> {
    let planet = crate::planet::RunFile::read(run_dir)?;
    let topology = Arc::new(earshot_common::topology::Topology::load(&planet.topology)?);
    let config = LoadConfig {
        dns: planet.dns,
        geodns: geodns::settings(&topology)?.clone(),
        verifier: Arc::new(ReceiptVerifier::load(&planet.ca, topology.clone())?),
        populations: default_populations(eu, us),
        speed,
        sentences_per_session: 3,
        progress: true,
    };
    let speech = prepare(&config, &run_dir.join("loadtest"))?;
    let stop = CancellationToken::new();
    let timer = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO)).await;
        timer.cancel();
    });
    let result = run(config, speech, Instant::now(), stop).await?;
    let s = summarize(&result.records);
    println!(
        "{} sessions, {} sentences in {:.1} s: {} finals ({:.2} finals/s)",
        result.sessions,
        s.sentences,
        result.seconds,
        s.finals,
        s.finals as f64 / result.seconds.max(0.001)
    );
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0} ms", v * 1000.0));
    println!(
        "final latency after the end of speech: p50 {}, p99 {}",
        ms(s.p50_latency_s),
        ms(s.p99_latency_s)
    );
    println!(
        "word error rate: {}",
        s.wer.map_or("-".into(), |w| format!("{:.1}%", w * 100.0))
    );
    println!("errors by code: {:?}", s.errors);
    println!("who served whom: {:?}", s.served);
    println!(
        "lost {}, duplicated {}, residency violations {}",
        s.lost, result.duplicates, s.residency_violations
    );
    for (why, n) in &result.failed_sessions {
        println!("sessions that could not start: {n} × {why}");
    }
    if s.lost + result.duplicates + s.residency_violations > 0 {
        anyhow::bail!("lost, duplicated or residency-violating finals");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finals_are_matched_to_the_sentence_they_overlap_most() {
        let spans = [(0.5, 3.0), (4.0, 6.5), (7.5, 9.0)];
        assert_eq!(sentence_of(&spans, 0.3, 3.2), Some(0));
        assert_eq!(sentence_of(&spans, 2.9, 6.0), Some(1));
        assert_eq!(sentence_of(&spans, 9.5, 10.0), None);
    }

    #[test]
    fn summaries_count_outcomes_latency_and_who_served_whom() {
        let record = |outcome| Record {
            client: 0,
            jurisdiction: "eu".into(),
            session: "s".into(),
            edge: "edge-eu-1".into(),
            sentence: 0,
            spoken_at: 1.0,
            outcome,
        };
        let fin = |latency_s, receipt_failure: Option<&str>| Outcome::Final {
            region: "eu-west".into(),
            at: 2.0,
            latency_s,
            text: "x".into(),
            word_errors: 1,
            words: 4,
            receipt_failure: receipt_failure.map(str::to_owned),
        };
        let records = [
            record(fin(0.4, None)),
            record(fin(0.8, Some("region_jurisdiction"))),
            record(Outcome::Error {
                code: "unavailable".into(),
                at: 3.0,
            }),
            record(Outcome::Lost),
        ];
        let s = summarize(&records);
        assert_eq!(
            (s.sentences, s.finals, s.lost, s.residency_violations),
            (4, 2, 1, 1)
        );
        assert_eq!(s.errors["unavailable"], 1);
        assert_eq!(s.wer, Some(0.25));
        assert_eq!(s.p50_latency_s, Some(0.4));
        assert_eq!(s.p99_latency_s, Some(0.8));
        assert_eq!(s.served["eu-west"]["eu"], 2);
        assert_eq!(percentile(&[], 0.5), None);
    }
}
