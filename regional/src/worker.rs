//! ASR workers: read utterances from the region's stream in consumer group
//! `asr`, transcribe them with Whisper, publish the result to the waiting
//! ingress, and acknowledge.
//!
//! A job is acknowledged only after its result is published, so a worker
//! that dies mid-job leaves the entry pending; another worker takes it over
//! with `XAUTOCLAIM` once it has been idle for `claim_idle_ms`. The worker
//! checks residency again before transcribing: a job whose jurisdiction may
//! not be processed here is refused, whatever put it in the stream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use earshot_common::audio::s16le_to_f32;
use earshot_common::retry::Backoff;
use earshot_common::topology::Topology;
use earshot_common::wire::{ErrorCode, Final, Frame, Translation, WireError};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::{JurisdictionLabel, Metrics, OutcomeLabel};
use crate::model::ModelSlot;
use crate::queue::{self, GROUP, Job};

/// How long one XREADGROUP blocks; bounds how late a worker notices
/// shutdown.
const BLOCK_MS: usize = 1_000;

/// Everything a worker needs besides its model.
#[derive(Clone)]
pub struct WorkerContext {
    pub region: String,
    pub stream: String,
    pub consumer: String,
    pub topology: Arc<Topology>,
    pub metrics: Arc<Metrics>,
    pub claim_idle: Duration,
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

/// Runs one worker until `shutdown`; the job in hand is finished first.
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
    let read = StreamReadOptions::default()
        .group(GROUP, &ctx.consumer)
        .count(1)
        .block(BLOCK_MS);
    let claim_idle = ctx.claim_idle.as_millis() as u64;
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
                StreamAutoClaimOptions::default().count(1),
            )
            .await?;
        if !claimed.claimed.is_empty() {
            ctx.metrics
                .jobs_claimed
                .inc_by(claimed.claimed.len() as u64);
            for entry in claimed.claimed {
                tracing::info!(entry = %entry.id, "claimed an abandoned job");
                process(ctx, conn, model, entry).await?;
            }
            continue;
        }
        let keys = [ctx.stream.as_str()];
        let reply: Option<StreamReadReply> = tokio::select! {
            r = conn.xread_options(&keys, &[">"], &read) => r?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                process(ctx, conn, model, entry).await?;
            }
        }
    }
}

/// Transcribes one entry, publishes its result and acknowledges it. Only
/// Redis errors propagate (the entry then stays pending for a retry).
async fn process(
    ctx: &WorkerContext,
    conn: &mut MultiplexedConnection,
    model: &SharedModel,
    entry: StreamId,
) -> redis::RedisResult<()> {
    let job = match Job::from_fields(&entry.map) {
        Ok(job) => job,
        Err(problem) => {
            // Nothing can answer a job that cannot be parsed; acknowledge it
            // so it does not block the group, and count it.
            tracing::error!(entry = %entry.id, %problem, "malformed job acknowledged and dropped");
            ctx.metrics
                .jobs
                .get_or_create(&OutcomeLabel {
                    outcome: "malformed",
                })
                .inc();
            let _: i64 = conn.xack(&ctx.stream, GROUP, &[&entry.id]).await?;
            return Ok(());
        }
    };
    let span = tracing::info_span!("job", entry = %entry.id, utterance = job.header.utterance);
    async move {
        let queued = queue::unix_us().saturating_sub(job.enqueued_us);
        ctx.metrics.queue_wait.observe(queued as f64 / 1e6);

        let (frame, outcome) = answer(ctx, model, &job, queued).await;
        let mut payload = BytesMut::from(&job.request[..]);
        if let Err(e) = frame.encode(&mut payload) {
            tracing::error!(error = %e, "cannot encode result");
        }
        let mut publisher = ctx.publisher.clone();
        let _: i64 = publisher.publish(&job.reply, payload.to_vec()).await?;
        let _: i64 = conn.xack(&ctx.stream, GROUP, &[&entry.id]).await?;
        ctx.metrics
            .jobs
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        Ok(())
    }
    .instrument(span)
    .await
}

async fn answer(
    ctx: &WorkerContext,
    model: &SharedModel,
    job: &Job,
    queued_us: u64,
) -> (Frame, &'static str) {
    let utterance = job.header.utterance;
    let refuse = |code: ErrorCode, message: String| {
        Frame::Error(WireError {
            utterance,
            code,
            message,
        })
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
        tracing::warn!(jurisdiction = %job.header.jurisdiction, "worker refused a job outside its residency");
        let msg = format!(
            "jurisdiction {} may not be processed in region {}",
            job.header.jurisdiction, ctx.region
        );
        return (refuse(ErrorCode::ResidencyRefused, msg), "refused");
    }
    let sha: [u8; 32] = Sha256::digest(&job.audio).into();
    if sha != job.audio_sha256 {
        return (
            refuse(
                ErrorCode::AudioCorrupted,
                "queued audio does not match its hash".into(),
            ),
            "failed",
        );
    }

    let pcm = s16le_to_f32(&job.audio);
    let language = (!job.header.language.is_empty()).then(|| job.header.language.clone());
    let translate = (!job.header.translate.is_empty()).then(|| job.header.translate.clone());
    let started = Instant::now();
    // Inference is CPU-bound: keep it off the async workers.
    let model = model.clone();
    let metrics = ctx.metrics.clone();
    let target = translate.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut slot = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A new model version (the sync agent switched `current`) takes
        // over from this job on.
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
        slot.recognize(&pcm, language.as_deref(), target.as_deref())
            .map(|r| (r, slot.id().to_owned()))
    })
    .await;
    let took = started.elapsed();
    let result = result.unwrap_or_else(|e| {
        Err(earshot_asr::AsrError::Decode(format!(
            "inference task failed: {e}"
        )))
    });
    ctx.metrics.inference.observe(took.as_secs_f64());
    match result {
        Ok((r, model_id)) => {
            let t = r.transcript;
            tracing::info!(
                inference_ms = took.as_millis() as u64,
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
            let translation = r.translation.zip(translate).map(|(tr, to)| Translation {
                language: to,
                text: tr.text,
            });
            let frame = Frame::Final(Final {
                utterance,
                text: t.text,
                language: t.language.unwrap_or_default(),
                language_probability: t.language_probability.unwrap_or(-1.0),
                translation,
                region: ctx.region.clone(),
                model: model_id,
                audio_sha256: sha,
                queue_us: u32::try_from(queued_us).unwrap_or(u32::MAX),
                inference_us: u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
            });
            (frame, "final")
        }
        Err(e) => {
            tracing::error!(error = %e, "transcription failed");
            (refuse(ErrorCode::InferenceFailed, e.to_string()), "failed")
        }
    }
}
