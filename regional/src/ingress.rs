//! The QUIC ingress: accepts utterances from edges (mutual TLS, one
//! bidirectional stream per utterance), checks them, queues them in Redis,
//! and answers each stream with the worker's result.
//!
//! Every refusal is an explicit error frame with a stable code, never a
//! hang: a malformed stream (`invalid_frame`), a jurisdiction this region
//! may not process (`residency_refused`, counted), audio that does not match
//! its hash (`audio_corrupted`), Redis down (`queue_unavailable`), no result
//! in time (`timeout`), too much in flight (`overloaded`), too much queued
//! (`busy`), or draining (`shutting_down`). An utterance seen before (the
//! edge retried it) is answered from its first attempt, never transcribed
//! twice: see [`crate::queue`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use earshot_common::receipt::ReceiptSigner;
use earshot_common::topology::Topology;
use earshot_common::wire::{self, Assembler, ErrorCode, Frame, Utterance, WireError};
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::{JurisdictionLabel, Metrics, OutcomeLabel};
use crate::queue::{self, Admission, Job, ResultRouter};

/// Time an edge has to send a whole utterance on its stream.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a waiting utterance reads its record, besides listening on
/// the result channel.
const RESULT_POLL: Duration = Duration::from_secs(1);

/// How often a waiting utterance checks the result channel, and how long
/// the channel may be down before the utterance is handed back.
const SUBSCRIPTION_CHECK: Duration = Duration::from_millis(100);
const SUBSCRIPTION_GRACE: Duration = Duration::from_millis(500);

pub struct Ingress {
    pub region: String,
    pub topology: Arc<Topology>,
    pub metrics: Arc<Metrics>,
    pub router: Arc<ResultRouter>,
    pub redis: ConnectionManager,
    pub stream: String,
    /// Entries queued or in progress past which utterances are `busy`.
    pub queue_limit: usize,
    /// How long an utterance's record (and answer) is kept for retries.
    pub result_ttl: Duration,
    pub redis_timeout: Duration,
    pub max_audio_bytes: usize,
    pub result_timeout: Duration,
    pub max_inflight: usize,
    pub inflight: Arc<Semaphore>,
    /// Signs each final's receipt.
    pub signer: Option<Arc<ReceiptSigner>>,
    pub shutdown: CancellationToken,
}

type Refusal = (ErrorCode, String, &'static str);

impl Ingress {
    /// Accepts connections until shutdown, then waits (up to `drain`) for
    /// accepted utterances to be answered and closes the endpoint. During
    /// the drain, new streams are answered `shutting_down` so edges fail
    /// over at once.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        max_connections: usize,
        drain: Duration,
    ) {
        let connections = Arc::new(Semaphore::new(max_connections));
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    match connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let ingress = self.clone();
                            tokio::spawn(async move {
                                ingress.connection(incoming).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            tracing::warn!("connection limit reached; refusing");
                            incoming.refuse();
                        }
                    }
                }
                _ = self.shutdown.cancelled() => break,
            }
        }
        let all = u32::try_from(self.max_inflight).unwrap_or(u32::MAX);
        if tokio::time::timeout(drain, self.inflight.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("utterances still in flight after the drain timeout");
        }
        endpoint.close(0u32.into(), b"region shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tracing::info!("ingress stopped");
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let connection = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(error = %e, "handshake failed");
                return;
            }
        };
        let span = tracing::info_span!("connection", peer = %connection.remote_address());
        self.metrics.connections_active.inc();
        async {
            tracing::info!("edge connected");
            loop {
                match connection.accept_bi().await {
                    Ok((send, recv)) => {
                        let ingress = self.clone();
                        tokio::spawn(ingress.stream(send, recv).in_current_span());
                    }
                    Err(e) => {
                        tracing::info!(reason = %e, "edge disconnected");
                        break;
                    }
                }
            }
        }
        .instrument(span)
        .await;
        self.metrics.connections_active.dec();
    }

    async fn stream(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let (frame, outcome) = match tokio::time::timeout(READ_TIMEOUT, self.receive(&mut recv))
            .await
        {
            Ok(Ok(utterance)) => {
                let span = tracing::info_span!("utterance", utterance = utterance.header.utterance);
                let n = utterance.header.utterance;
                let header = utterance.header.clone();
                match self.handle(utterance).instrument(span).await {
                    Ok(frame) => match self.signed(&header, frame) {
                        Ok(frame) => (frame, "final"),
                        Err(message) => {
                            (error_frame(n, ErrorCode::InferenceFailed, message), "error")
                        }
                    },
                    Err((code, message, outcome)) => (error_frame(n, code, message), outcome),
                }
            }
            Ok(Err((n, (code, message, outcome)))) => (error_frame(n, code, message), outcome),
            Err(_) => (
                error_frame(
                    0,
                    ErrorCode::InvalidFrame,
                    format!("utterance not received within {READ_TIMEOUT:?}"),
                ),
                "invalid",
            ),
        };
        self.metrics
            .utterances
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        let mut out = BytesMut::new();
        if let Err(e) = frame.encode(&mut out) {
            tracing::error!(error = %e, "cannot encode answer");
            return;
        }
        if let Err(e) = send.write_all(&out).await {
            tracing::info!(error = %e, "edge went away before the answer");
            return;
        }
        let _ = send.finish();
        let _ = recv.stop(0u32.into());
    }

    /// `frame` (a final) with this region's receipt for the utterance
    /// `header` opened. A final is never sent unsigned: a signing failure
    /// (none seen; the key was loaded at start) answers with an error.
    fn signed(&self, header: &wire::Header, frame: Frame) -> Result<Frame, String> {
        let (mut fin, signer) = match (frame, &self.signer) {
            (Frame::Final(fin), Some(signer)) => (fin, signer),
            (frame, _) => return Ok(frame),
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match signer.sign(header, &fin, now_ms) {
            Ok(receipt) => {
                fin.receipt = Some(Box::new(receipt));
                Ok(Frame::Final(fin))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a receipt");
                Err(format!(
                    "region {} could not sign the final's receipt",
                    self.region
                ))
            }
        }
    }

    /// Reads `Header, Audio*, End` from the stream.
    async fn receive(&self, recv: &mut quinn::RecvStream) -> Result<Utterance, (u32, Refusal)> {
        let mut assembler = Assembler::new(self.max_audio_bytes);
        let mut buf = BytesMut::new();
        let invalid = |n: u32, m: String| (n, (ErrorCode::InvalidFrame, m, "invalid"));
        loop {
            loop {
                let n = assembler.header().map_or(0, |h| h.utterance);
                match wire::decode(&mut buf) {
                    Ok(Some(frame)) => match assembler.push(frame) {
                        Ok(Some(utterance)) => return Ok(utterance),
                        Ok(None) => {}
                        Err(e) => return Err((n, (e.code(), e.to_string(), "invalid"))),
                    },
                    Ok(None) => break,
                    Err(e) => return Err(invalid(n, e.to_string())),
                }
            }
            let n = assembler.header().map_or(0, |h| h.utterance);
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(invalid(n, "stream ended before the end frame".into())),
                Err(e) => return Err(invalid(n, format!("stream failed: {e}"))),
            }
        }
    }

    /// Checks, queues and waits for one utterance's result.
    async fn handle(&self, utterance: Utterance) -> Result<Frame, Refusal> {
        let h = &utterance.header;
        self.metrics
            .received
            .get_or_create(&crate::metrics::SessionJurisdictionLabel {
                jurisdiction: crate::metrics::jurisdiction_label(&self.topology, &h.jurisdiction),
            })
            .inc();
        if self.shutdown.is_cancelled() {
            return Err((
                ErrorCode::ShuttingDown,
                format!("region {} is draining", self.region),
                "shutting_down",
            ));
        }
        if h.sample_rate != wire::SAMPLE_RATE {
            return Err((
                ErrorCode::Unsupported,
                format!(
                    "sample rate {} is not supported; send {}",
                    h.sample_rate,
                    wire::SAMPLE_RATE
                ),
                "invalid",
            ));
        }
        self.check_residency(&h.jurisdiction, &h.edge)?;
        if h.resume {
            return self.resume(h).await;
        }
        let sha: [u8; 32] = Sha256::digest(&utterance.audio).into();
        if sha != utterance.audio_sha256 {
            return Err((
                ErrorCode::AudioCorrupted,
                "audio does not match the hash in the end frame".into(),
                "invalid",
            ));
        }
        let Ok(_permit) = self.inflight.try_acquire() else {
            return Err((
                ErrorCode::Overloaded,
                format!("region {} is at its in-flight limit", self.region),
                "overloaded",
            ));
        };
        if !self.router.is_subscribed() {
            return Err((
                ErrorCode::QueueUnavailable,
                "the region's result channel is not connected to Redis".into(),
                "queue_unavailable",
            ));
        }
        self.metrics.inflight.inc();
        let result = self.enqueue_and_wait(utterance).await;
        self.metrics.inflight.dec();
        result
    }

    /// Answers a resumed session's request for utterance `h.utterance` of
    /// `h.session` from what this region holds, whichever edge of the
    /// session's jurisdiction cut it: the stored final, or the final of
    /// the job still queued (waited for, as a retry waits), or `not_found`.
    /// What an edge of another jurisdiction cut is never returned.
    async fn resume(&self, h: &wire::Header) -> Result<Frame, Refusal> {
        let outcome = |outcome: &'static str| {
            self.metrics
                .resumes
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
        };
        let not_found = || {
            Err((
                ErrorCode::NotFound,
                format!(
                    "region {} holds nothing of utterance {} of this session",
                    self.region, h.utterance
                ),
                "not_found",
            ))
        };
        let mut conn = self.redis.clone();
        let fetched = tokio::time::timeout(
            self.redis_timeout,
            queue::fetch(
                &mut conn,
                &self.region,
                &h.session,
                h.utterance,
                self.router.channel(),
                self.result_ttl,
            ),
        )
        .await;
        let fetched = match fetched {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => return queue_unavailable(e.to_string()),
            Err(_) => {
                return queue_unavailable(format!("no reply within {:?}", self.redis_timeout));
            }
        };
        let of_jurisdiction = |edge: &str| {
            self.topology
                .edge(edge)
                .is_some_and(|e| e.jurisdiction == h.jurisdiction)
        };
        match fetched {
            queue::Fetched::Answered { frame, edge } if of_jurisdiction(&edge) => {
                outcome("answered");
                answer_from(&frame)
            }
            queue::Fetched::Queued { edge, request } if of_jurisdiction(&edge) => {
                outcome("queued");
                let waiting = self.router.register(request);
                let cut = wire::Header {
                    edge,
                    resume: false,
                    ..h.clone()
                };
                self.await_result(request, waiting, &cut, Instant::now())
                    .await
            }
            queue::Fetched::Unknown => {
                outcome("not_found");
                not_found()
            }
            // Another jurisdiction's session under the same id: as if
            // there were none.
            queue::Fetched::Answered { edge, .. } | queue::Fetched::Queued { edge, .. } => {
                tracing::warn!(%edge, jurisdiction = %h.jurisdiction, "resume asked for another jurisdiction's utterance; refused as not found");
                outcome("other_jurisdiction");
                not_found()
            }
        }
    }

    fn check_residency(&self, jurisdiction: &str, edge: &str) -> Result<(), Refusal> {
        let here = self.topology.region(&self.region);
        let edge_ok = self
            .topology
            .edge(edge)
            .is_some_and(|e| e.jurisdiction == jurisdiction);
        let allowed = here.is_some_and(|r| self.topology.may_process(jurisdiction, r));
        if allowed && edge_ok {
            return Ok(());
        }
        self.metrics
            .residency_refusals
            .get_or_create(&JurisdictionLabel {
                jurisdiction: crate::metrics::jurisdiction_label(&self.topology, jurisdiction),
                layer: "ingress",
            })
            .inc();
        let message = if !edge_ok {
            format!(
                "edge {edge:?} is not an edge of jurisdiction {jurisdiction:?} in this region's topology"
            )
        } else {
            format!(
                "jurisdiction {jurisdiction:?} may not be processed in region {}",
                self.region
            )
        };
        tracing::warn!(%jurisdiction, %edge, "residency refusal");
        Err((ErrorCode::ResidencyRefused, message, "refused"))
    }

    async fn enqueue_and_wait(&self, utterance: Utterance) -> Result<Frame, Refusal> {
        let request = queue::request_id(&utterance.header);
        let job = Job {
            request,
            reply: self.router.channel().to_owned(),
            header: utterance.header,
            audio: utterance.audio,
            audio_sha256: utterance.audio_sha256,
            enqueued_us: queue::unix_us(),
        };
        let waiting = self.router.register(request);
        let started = Instant::now();
        let mut conn = self.redis.clone();
        let admitted = tokio::time::timeout(
            self.redis_timeout,
            queue::admit(
                &mut conn,
                &self.region,
                &self.stream,
                self.queue_limit,
                self.result_ttl,
                &job,
            ),
        )
        .await;
        let give_up = |waiting: oneshot::Receiver<Bytes>| {
            drop(waiting);
            self.router.forget(&request);
        };
        let dedup = |state: &'static str| {
            self.metrics
                .deduplicated
                .get_or_create(&crate::metrics::StateLabel { state })
                .inc();
        };
        match admitted {
            Ok(Ok(Admission::Added(id))) => tracing::debug!(entry = %id, "queued"),
            Ok(Ok(Admission::Queued)) => {
                dedup("queued");
                tracing::info!("retry of a queued utterance; waiting for its job");
            }
            Ok(Ok(Admission::Answered(frame))) => {
                give_up(waiting);
                dedup("answered");
                tracing::info!("retry of an answered utterance; answering from its record");
                return answer_from(&frame);
            }
            Ok(Ok(Admission::Busy)) => {
                give_up(waiting);
                return Err((
                    ErrorCode::Busy,
                    format!(
                        "region {} has {} utterances queued or in progress",
                        self.region, self.queue_limit
                    ),
                    "busy",
                ));
            }
            Ok(Err(e)) => {
                give_up(waiting);
                return queue_unavailable(e.to_string());
            }
            Err(_) => {
                give_up(waiting);
                return queue_unavailable(format!("no reply within {:?}", self.redis_timeout));
            }
        }
        self.await_result(request, waiting, &job.header, started)
            .await
    }

    /// Waits for the answer to `request` (the utterance `header` names),
    /// registered as `waiting` on the router.
    async fn await_result(
        &self,
        request: [u8; 16],
        mut waiting: oneshot::Receiver<Bytes>,
        header: &wire::Header,
        started: Instant,
    ) -> Result<Frame, Refusal> {
        let give_up = |waiting: oneshot::Receiver<Bytes>| {
            drop(waiting);
            self.router.forget(&request);
        };
        // The result comes on the channel; the record is read now and then
        // too, for a result published while this ingress was not subscribed.
        // When the channel has been down for SUBSCRIPTION_GRACE (Redis is
        // gone), the utterance is handed back as `queue_unavailable`, so the
        // edge tries the next permitted region at once instead of waiting
        // for Redis; a retry here once Redis is back is answered from the
        // same job's record (deduplicated), never transcribed twice.
        let deadline = tokio::time::Instant::now() + self.result_timeout;
        let mut poll = tokio::time::interval(RESULT_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        let mut watch = tokio::time::interval(SUBSCRIPTION_CHECK);
        let mut lost_since: Option<tokio::time::Instant> = None;
        let bytes = loop {
            tokio::select! {
                got = &mut waiting => match got {
                    Ok(bytes) => break Some(bytes.to_vec()),
                    Err(_) => break None,
                },
                _ = tokio::time::sleep_until(deadline) => break None,
                now = watch.tick() => {
                    if self.router.is_subscribed() {
                        lost_since = None;
                    } else if now.duration_since(*lost_since.get_or_insert(now)) >= SUBSCRIPTION_GRACE {
                        give_up(waiting);
                        self.metrics.handed_back.inc();
                        return queue_unavailable(format!(
                            "lost the result channel (Redis) for {SUBSCRIPTION_GRACE:?} while this utterance waited; handed back"
                        ));
                    }
                }
                _ = poll.tick() => {
                    let mut conn = self.redis.clone();
                    let read = tokio::time::timeout(
                        self.redis_timeout,
                        queue::stored_result(&mut conn, &self.region, header),
                    )
                    .await;
                    if let Ok(Ok(Some(frame))) = read {
                        self.metrics.results_polled.inc();
                        break Some(frame);
                    }
                }
            }
        };
        give_up(waiting);
        self.metrics
            .result_wait
            .observe(started.elapsed().as_secs_f64());
        match bytes {
            Some(frame) => answer_from(&frame),
            None => Err((
                ErrorCode::Timeout,
                format!("no worker answered within {:?}", self.result_timeout),
                "timeout",
            )),
        }
    }
}

/// The answer when the region's Redis cannot be reached.
fn queue_unavailable(why: String) -> Result<Frame, Refusal> {
    tracing::warn!(%why, "cannot queue utterance");
    Err((
        ErrorCode::QueueUnavailable,
        format!("the region's queue is unavailable: {why}"),
        "queue_unavailable",
    ))
}

/// The frame a worker stored or published, checked.
fn answer_from(bytes: &[u8]) -> Result<Frame, Refusal> {
    match wire::decode(&mut BytesMut::from(bytes)) {
        Ok(Some(frame @ Frame::Final(_))) => Ok(frame),
        Ok(Some(Frame::Error(e))) => Err((e.code, e.message, "error")),
        _ => Err((
            ErrorCode::InferenceFailed,
            "worker sent a malformed result".into(),
            "error",
        )),
    }
}

fn error_frame(utterance: u32, code: ErrorCode, message: String) -> Frame {
    Frame::Error(WireError {
        utterance,
        code,
        message,
    })
}
