//! ASR workers: read utterances from the region's stream in consumer group
//! `asr`, transcribe them with Whisper, publish the result to the waiting
//! ingress, and acknowledge.
//!
//! A job is acknowledged (and deleted from the stream) only after its
//! result is stored and published, so a worker that dies mid-job leaves the
//! entry pending: another worker takes it over with `XAUTOCLAIM` once it
//! has been idle for `claim_idle_ms`, and a worker restarted under the same
//! name takes back its own pending entries at once. A job the model fails
//! on is left pending too, to be tried again; one delivered more than
//! `max_deliveries` times goes to the dead-letter stream and its utterance
//! is answered with an error. The worker checks residency again before
//! transcribing: a job whose jurisdiction may not be processed here is
//! refused, whatever put it in the stream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use earshot_common::audio::s16le_to_f32;
use earshot_common::retry::Backoff;
use earshot_common::topology::Topology;
use earshot_common::wire::{ErrorCode, Final, Frame, Segment, WireError};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::{JurisdictionLabel, Metrics, OutcomeLabel};
use crate::model::{JobAudio, ModelSlot, Recognized, Translators};
use crate::queue::{self, GROUP, Job};

/// How long one XREADGROUP blocks; bounds how late a worker notices
/// shutdown.
const BLOCK_MS: usize = 1_000;

/// Approximate cap on the dead-letter stream.
const DEAD_LETTER_MAX_LEN: usize = 10_000;

/// Everything a worker needs besides its model.
#[derive(Clone)]
pub struct WorkerContext {
    pub region: String,
    pub stream: String,
    pub consumer: String,
    pub topology: Arc<Topology>,
    pub metrics: Arc<Metrics>,
    pub claim_idle: Duration,
    /// Deliveries after which an unanswered entry is dead-lettered.
    pub max_deliveries: usize,
    /// How long an utterance's answer is kept for retries.
    pub result_ttl: Duration,
    /// Most entries recognised together.
    pub max_batch: usize,
    /// After the first entry of a batch, how long to wait for more.
    pub batch_window: Duration,
    /// Text translation models (Marian), shared by the region's workers.
    pub translators: Arc<Translators>,
    pub client: redis::Client,
    pub publisher: ConnectionManager,
}

/// Creates the consumer group (and the stream) if missing. Starting at `0`
/// means entries added before the group existed are processed too.
pub async fn ensure_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, GROUP, "0").await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// A model shared between a worker and its blocking inference task.
pub type SharedModel = Arc<Mutex<ModelSlot>>;

/// Runs one worker until `shutdown`; the batch in hand is finished first.
pub async fn run(ctx: WorkerContext, model: ModelSlot, shutdown: CancellationToken) {
    let model: SharedModel = Arc::new(Mutex::new(model));
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !shutdown.is_cancelled() {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(None);
        let connected = ctx
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let result = match connected {
            Ok(mut conn) => match ensure_group(&mut conn, &ctx.stream).await {
                Ok(()) => {
                    backoff.reset();
                    consume(&ctx, &mut conn, &model, &shutdown).await
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => break,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "worker lost Redis; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    tracing::info!(consumer = %ctx.consumer, "worker stopped");
}

async fn consume(
    ctx: &WorkerContext,
    conn: &mut MultiplexedConnection,
    model: &SharedModel,
    shutdown: &CancellationToken,
) -> redis::RedisResult<()> {
    let claim_idle = ctx.claim_idle.as_millis() as u64;
    // What this consumer had in hand when its process died: at once, not
    // after `claim_idle`.
    loop {
        let own: redis::streams::StreamPendingCountReply = conn
            .xpending_consumer_count(&ctx.stream, GROUP, "-", "+", ctx.max_batch, &ctx.consumer)
            .await?;
        if own.ids.is_empty() {
            break;
        }
        let ids: Vec<&str> = own.ids.iter().map(|p| p.id.as_str()).collect();
        let taken: redis::streams::StreamClaimReply = conn
            .xclaim(&ctx.stream, GROUP, &ctx.consumer, 0, &ids)
            .await?;
        tracing::info!(
            entries = taken.ids.len(),
            "took back the jobs this worker had in hand before a restart"
        );
        if taken.ids.is_empty() {
            // Deleted meanwhile: their pending entries only need acking.
            ack(conn, &ctx.stream, &ids).await?;
            continue;
        }
        let entries = dead_letter_overdue(ctx, conn, taken.ids).await?;
        process_batch(ctx, conn, model, entries).await?;
    }
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // Entries a crashed consumer left pending come first.
        let claimed: redis::streams::StreamAutoClaimReply = conn
            .xautoclaim_options(
                &ctx.stream,
                GROUP,
                &ctx.consumer,
                claim_idle,
                "0-0",
                StreamAutoClaimOptions::default().count(ctx.max_batch),
            )
            .await?;
        if !claimed.deleted_ids.is_empty() {
            // Pending entries whose stream entry is gone (deleted by hand):
            // nothing to answer.
            ack(conn, &ctx.stream, &claimed.deleted_ids).await?;
        }
        if !claimed.claimed.is_empty() {
            ctx.metrics
                .jobs_claimed
                .inc_by(claimed.claimed.len() as u64);
            for entry in &claimed.claimed {
                tracing::info!(entry = %entry.id, "claimed an abandoned job");
            }
            let entries = dead_letter_overdue(ctx, conn, claimed.claimed).await?;
            process_batch(ctx, conn, model, entries).await?;
            continue;
        }
        let entries = read_batch(ctx, conn, shutdown).await?;
        if !entries.is_empty() {
            process_batch(ctx, conn, model, entries).await?;
        }
    }
}

/// New entries for this consumer: whatever is waiting, up to `max_batch`
/// (blocking up to [`BLOCK_MS`] for the first), then, for `batch_window`,
/// whatever else arrives until the batch is full. Entries that pile up
/// while a batch is recognised are read together by the next call, so a
/// busy worker batches even with no window. Shutdown interrupts only the
/// wait for the first entry: entries in hand are returned, to be answered.
async fn read_batch(
    ctx: &WorkerContext,
    conn: &mut MultiplexedConnection,
    shutdown: &CancellationToken,
) -> redis::RedisResult<Vec<StreamId>> {
    let keys = [ctx.stream.as_str()];
    let mut entries = Vec::new();
    let mut block = BLOCK_MS;
    let mut deadline = None;
    while entries.len() < ctx.max_batch {
        let read = StreamReadOptions::default()
            .group(GROUP, &ctx.consumer)
            .count(ctx.max_batch - entries.len())
            .block(block);
        let reply: Option<StreamReadReply> = if entries.is_empty() {
            tokio::select! {
                r = conn.xread_options(&keys, &[">"], &read) => r?,
                _ = shutdown.cancelled() => return Ok(entries),
            }
        } else {
            conn.xread_options(&keys, &[">"], &read).await?
        };
        let before = entries.len();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            entries.extend(key.ids);
        }
        if entries.is_empty() {
            return Ok(entries);
        }
        if before == 0 {
            deadline = Some(Instant::now() + ctx.batch_window);
        }
        // BLOCK 0 would wait forever: stop once the window has passed.
        let left = deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        });
        block = left.as_millis() as usize;
        if block == 0 {
            break;
        }
    }
    Ok(entries)
}

/// A parsed entry that passed the worker's checks, with its audio.
struct Admitted {
    entry: String,
    job: Job,
    queued_us: u64,
}

/// Recognises a batch of entries together, then publishes each result and
/// acknowledges each entry. Only Redis errors propagate (unacknowledged
/// entries then stay pending for a retry).
async fn process_batch(
    ctx: &WorkerContext,
    conn: &mut MultiplexedConnection,
    model: &SharedModel,
    entries: Vec<StreamId>,
) -> redis::RedisResult<()> {
    let mut admitted = Vec::with_capacity(entries.len());
    for entry in entries {
        let job = match Job::from_fields(&entry.map) {
            Ok(job) => job,
            Err(problem) => {
                // Nothing can answer a job that cannot be parsed: keep it
                // in the dead-letter stream, out of the group's way.
                tracing::error!(entry = %entry.id, %problem, "malformed job moved to the dead-letter stream");
                ctx.metrics
                    .jobs
                    .get_or_create(&OutcomeLabel {
                        outcome: "malformed",
                    })
                    .inc();
                bury(ctx, conn, &entry, &format!("malformed: {problem}"), 1).await?;
                continue;
            }
        };
        let queued_us = queue::unix_us().saturating_sub(job.enqueued_us);
        ctx.metrics.queue_wait.observe(queued_us as f64 / 1e6);
        match check(ctx, &job) {
            Ok(()) => admitted.push(Admitted {
                entry: entry.id,
                job,
                queued_us,
            }),
            Err((error, outcome)) => {
                let span = job_span(&entry.id, &job);
                reply(ctx, conn, &entry.id, &job, Frame::Error(error), outcome)
                    .instrument(span)
                    .await?;
            }
        }
    }
    if admitted.is_empty() {
        return Ok(());
    }
    let (results, model_id, took) = recognize(ctx, model, &admitted).await;
    ctx.metrics.batch_size.observe(admitted.len() as f64);
    for (a, result) in admitted.iter().zip(results) {
        let span = job_span(&a.entry, &a.job);
        let answered = {
            let _enter = span.enter();
            answer(ctx, a, result, &model_id, took, admitted.len())
        };
        match answered {
            Some((frame, outcome)) => {
                reply(ctx, conn, &a.entry, &a.job, frame, outcome)
                    .instrument(span)
                    .await?;
            }
            // Left pending: claimed again after `claim_idle`, until it
            // succeeds or is dead-lettered.
            None => {
                ctx.metrics
                    .jobs
                    .get_or_create(&OutcomeLabel { outcome: "failed" })
                    .inc();
            }
        }
    }
    Ok(())
}

/// Acknowledges entries and deletes them from the stream, in one step: the
/// stream holds only what is queued or in progress.
async fn ack<I: redis::ToRedisArgs + Sync>(
    conn: &mut MultiplexedConnection,
    stream: &str,
    ids: &[I],
) -> redis::RedisResult<()> {
    let _: () = redis::pipe()
        .atomic()
        .xack(stream, GROUP, ids)
        .ignore()
        .xdel(stream, ids)
        .ignore()
        .query_async(conn)
        .await?;
    Ok(())
}

/// Dead-letters the claimed entries delivered more than `max_deliveries`
/// times; returns the others.
async fn dead_letter_overdue(
    ctx: &WorkerContext,
    conn: &mut MultiplexedConnection,
    entries: Vec<StreamId>,
) -> redis::RedisResult<Vec<StreamId>> {
    let mut keep = Vec::with_capacity(entries.len());
    for entry in entries {
        let pending: redis::streams::StreamPendingCountReply = conn
            .xpending_count(&ctx.stream, GROUP, &entry.id, &entry.id, 1)
            .await?;
        let deliveries = pending.ids.first().map_or(0, |p| p.times_delivered);
        if deliveries <= ctx.max_deliveries {
            keep.push(entry);
            continue;
        }
        let why = format!("not answered after {} deliveries", deliveries - 1);
        tracing::error!(entry = %entry.id, deliveries, "job moved to the dead-letter stream");
        if let Ok(job) = Job::from_fields(&entry.map) {
            let error = Frame::Error(WireError {
                utterance: job.header.utterance,
                code: ErrorCode::InferenceFailed,
                message: format!(
                    "the region could not transcribe this utterance: {why}; it is kept in the dead-letter stream"
                ),
            });
            let mut frame = BytesMut::new();
            if let Err(e) = error.encode(&mut frame) {
                tracing::error!(error = %e, "cannot encode the dead letter's answer");
            }
            let mut publisher = ctx.publisher.clone();
            queue::store_result(&mut publisher, &ctx.region, &job, &frame, ctx.result_ttl).await?;
        }
        bury(ctx, conn, &entry, &why, deliveries).await?;
        ctx.metrics
            .jobs
            .get_or_create(&OutcomeLabel {
                outcome: "dead_letter",
            })
            .inc();
    }
    Ok(keep)
}

/// Copies an entry to the dead-letter stream with why, then acknowledges
/// and deletes it. The dead-letter stream is capped (`MAXLEN ~`): its
/// entries were all answered.
async fn bury(
    ctx: &WorkerContext,
    conn: &mut MultiplexedConnection,
    entry: &StreamId,
    why: &str,
    deliveries: usize,
) -> redis::RedisResult<()> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(queue::dead_letter_key(&ctx.region))
        .arg("MAXLEN")
        .arg("~")
        .arg(DEAD_LETTER_MAX_LEN)
        .arg("*")
        .arg("dead_entry")
        .arg(&entry.id)
        .arg("dead_reason")
        .arg(why)
        .arg("dead_deliveries")
        .arg(deliveries);
    for (k, v) in &entry.map {
        if let Value::BulkString(b) = v {
            cmd.arg(k).arg(b.as_slice());
        }
    }
    let _: String = cmd.query_async(conn).await?;
    ctx.metrics.dead_letters.inc();
    ack(conn, &ctx.stream, &[&entry.id]).await
}

fn job_span(entry: &str, job: &Job) -> tracing::Span {
    tracing::info_span!("job", entry = %entry, utterance = job.header.utterance)
}

/// Stores a job's answer under its utterance's key and publishes it to the
/// waiting ingress, then acknowledges (and deletes) the entry.
async fn reply(
    ctx: &WorkerContext,
    conn: &mut MultiplexedConnection,
    entry: &str,
    job: &Job,
    frame: Frame,
    outcome: &'static str,
) -> redis::RedisResult<()> {
    let mut encoded = BytesMut::new();
    if let Err(e) = frame.encode(&mut encoded) {
        tracing::error!(error = %e, "cannot encode result");
    }
    let mut publisher = ctx.publisher.clone();
    queue::store_result(&mut publisher, &ctx.region, job, &encoded, ctx.result_ttl).await?;
    ack(conn, &ctx.stream, &[entry]).await?;
    ctx.metrics
        .jobs
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
    Ok(())
}

/// The worker's own checks before any inference: residency (whatever put
/// the job in the stream) and the audio's integrity.
fn check(ctx: &WorkerContext, job: &Job) -> Result<(), (WireError, &'static str)> {
    let refuse = |code: ErrorCode, message: String| WireError {
        utterance: job.header.utterance,
        code,
        message,
    };
    let permitted = ctx
        .topology
        .region(&ctx.region)
        .is_some_and(|r| ctx.topology.may_process(&job.header.jurisdiction, r));
    if !permitted {
        ctx.metrics
            .residency_refusals
            .get_or_create(&JurisdictionLabel {
                jurisdiction: crate::metrics::jurisdiction_label(
                    &ctx.topology,
                    &job.header.jurisdiction,
                ),
                layer: "worker",
            })
            .inc();
        tracing::warn!(utterance = job.header.utterance, jurisdiction = %job.header.jurisdiction, "worker refused a job outside its residency");
        let msg = format!(
            "jurisdiction {} may not be processed in region {}",
            job.header.jurisdiction, ctx.region
        );
        return Err((refuse(ErrorCode::ResidencyRefused, msg), "refused"));
    }
    let sha: [u8; 32] = Sha256::digest(&job.audio).into();
    if sha != job.audio_sha256 {
        return Err((
            refuse(
                ErrorCode::AudioCorrupted,
                "queued audio does not match its hash".into(),
            ),
            "failed",
        ));
    }
    Ok(())
}

/// `None` for a header's empty (absent) field.
fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

type BatchResults = Vec<Result<Recognized, earshot_asr::AsrError>>;

/// Runs the model on the admitted jobs off the async executor (inference is
/// CPU-bound). Returns each job's result, the model's id and the batch's
/// time.
async fn recognize(
    ctx: &WorkerContext,
    model: &SharedModel,
    admitted: &[Admitted],
) -> (BatchResults, (String, [u8; 32]), Duration) {
    let jobs: Vec<Job> = admitted.iter().map(|a| a.job.clone()).collect();
    let count = jobs.len();
    let started = Instant::now();
    let model = model.clone();
    let metrics = ctx.metrics.clone();
    let translators = ctx.translators.clone();
    let span = tracing::Span::current();
    let result = tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        let mut slot = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A new model version (the sync agent switched `current`) takes
        // over from this batch on.
        match slot.refresh() {
            Some(Ok(id)) => {
                metrics.model_reloads.get_or_create(&OutcomeLabel { outcome: "ok" }).inc();
                tracing::info!(model = %id, "switched to a new model version");
            }
            Some(Err(e)) => {
                metrics.model_reloads.get_or_create(&OutcomeLabel { outcome: "failed" }).inc();
                tracing::error!(error = %e, model = %slot.id(), "new model version failed to load; keeping the current one");
            }
            None => {}
        }
        let pcm: Vec<Vec<f32>> = jobs.iter().map(|j| s16le_to_f32(&j.audio)).collect();
        let audio: Vec<JobAudio<'_>> = jobs
            .iter()
            .zip(&pcm)
            .map(|(j, pcm)| JobAudio {
                pcm,
                language: non_empty(&j.header.language),
                translate_to: non_empty(&j.header.translate),
                timestamps: j.header.timestamps,
                words: j.header.words,
            })
            .collect();
        (
            crate::model::recognize_batch(&slot, &audio, &translators),
            (slot.id().to_owned(), slot.digest()),
        )
    })
    .await;
    let took = started.elapsed();
    match result {
        Ok((results, id)) => (results, id, took),
        Err(e) => {
            let message = format!("inference task failed: {e}");
            let results = (0..count)
                .map(|_| Err(earshot_asr::AsrError::Batch(message.clone())))
                .collect();
            (results, (String::new(), [0; 32]), took)
        }
    }
}

/// The frame that answers one recognised job; `None` when the model failed
/// on it.
fn answer(
    ctx: &WorkerContext,
    admitted: &Admitted,
    result: Result<Recognized, earshot_asr::AsrError>,
    (model_id, model_sha256): &(String, [u8; 32]),
    took: Duration,
    batch: usize,
) -> Option<(Frame, &'static str)> {
    let job = &admitted.job;
    let utterance = job.header.utterance;
    ctx.metrics.inference.observe(took.as_secs_f64());
    match result {
        Ok(r) => {
            let t = r.transcript;
            tracing::info!(
                inference_ms = took.as_millis() as u64,
                batch,
                tokens = t.tokens.len(),
                language = t.language.as_deref().unwrap_or(""),
                no_speech = t.no_speech_probability,
                withheld = t.withheld.map(|w| w.as_str()),
                text = %earshot_common::telemetry::content(&t.text),
                "transcribed"
            );
            if let Some(w) = t.withheld {
                ctx.metrics
                    .text_withheld
                    .get_or_create(&crate::metrics::ReasonLabel { reason: w.as_str() })
                    .inc();
            }
            if let Some(earshot_common::wire::Translated::Unavailable { reason, .. }) =
                &r.translation
            {
                tracing::warn!(%reason, "translation unavailable");
            }
            let frame = Frame::Final(Final {
                utterance,
                text: t.text,
                language: t.language.unwrap_or_default(),
                language_probability: t.language_probability.unwrap_or(-1.0),
                translation: r.translation,
                segments: t
                    .segments
                    .iter()
                    .map(|s| span(s.start, s.end, &s.text))
                    .collect(),
                words: t
                    .words
                    .iter()
                    .map(|w| span(w.start, w.end, &w.text))
                    .collect(),
                region: ctx.region.clone(),
                model: model_id.clone(),
                model_sha256: Some(*model_sha256),
                span: job.header.span,
                receipt: None,
                audio_sha256: job.audio_sha256,
                queue_us: u32::try_from(admitted.queued_us).unwrap_or(u32::MAX),
                inference_us: u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
            });
            Some((frame, "final"))
        }
        Err(e) => {
            tracing::error!(error = %e, "transcription failed; the job stays pending to be tried again");
            None
        }
    }
}

/// A segment or word on the wire: seconds to milliseconds, and a word's
/// leading space dropped.
fn span(start: f32, end: f32, text: &str) -> Segment {
    Segment {
        start_ms: (start.max(0.0) * 1e3).round() as u32,
        end_ms: (end.max(0.0) * 1e3).round() as u32,
        text: text.trim().to_owned(),
    }
}
