//! The QUIC uplink: sends each utterance to the first permitted region that
//! answers, one bidirectional stream per utterance.
//!
//! Only regions the session's jurisdiction permits are ever dialled: the
//! target list is computed from the topology's residency policy when the
//! edge starts, and nothing else can be added to it. A region that cannot be
//! reached, drops the stream, times out or answers a retryable error is
//! skipped for the next one; a region that refuses the utterance
//! (non-retryable error) ends the attempt. The region treats a repeated
//! `(session, utterance)` as the same request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use earshot_common::topology::Region;
use earshot_common::wire::{self, ErrorCode, Final, Frame, Header};

use crate::metrics::{Metrics, RegionOutcome};

/// Most bytes a region's answer may take before it is treated as broken.
const MAX_ANSWER: usize = wire::MAX_FRAME_LEN + 4;

#[derive(Debug)]
struct Target {
    name: String,
    quic: String,
    tls_name: String,
    /// The live connection, if any. Held while connecting, so concurrent
    /// utterances share one connection attempt (and one connection).
    connection: tokio::sync::Mutex<Option<quinn::Connection>>,
}

/// A failure of one attempt, as reported to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub region: String,
    pub problem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("region {region} refused the utterance ({code}): {message}")]
    Refused {
        region: String,
        code: ErrorCode,
        message: String,
    },
    #[error("no permitted region could transcribe the utterance: {}", describe(.0))]
    Exhausted(Vec<Attempt>),
    #[error("cannot encode the utterance: {0}")]
    Encode(#[from] wire::FrameError),
}

fn describe(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| format!("{}: {}", a.region, a.problem))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A region's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub region: String,
    pub fin: Final,
}

impl Target {
    async fn forget(&self) {
        *self.connection.lock().await = None;
    }
}

enum AttemptError {
    Transport(String),
    Answered(wire::WireError),
}

pub struct Uplink {
    endpoint: quinn::Endpoint,
    targets: Vec<Target>,
    connect_timeout: Duration,
    attempt_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("targets", &self.targets)
            .finish()
    }
}

impl Uplink {
    /// `regions` must be the residency-filtered list from
    /// [`earshot_common::topology::Topology::permitted_regions`].
    pub fn new(
        bind: SocketAddr,
        client: quinn::ClientConfig,
        regions: &[&Region],
        connect_timeout: Duration,
        attempt_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(client);
        Ok(Uplink {
            endpoint,
            targets: regions
                .iter()
                .map(|r| Target {
                    name: r.name.clone(),
                    quic: r.quic.clone(),
                    tls_name: r.tls_name.clone(),
                    connection: tokio::sync::Mutex::new(None),
                })
                .collect(),
            connect_timeout,
            attempt_timeout,
            metrics,
        })
    }

    /// Transcribes one utterance in the first permitted region that can.
    pub async fn transcribe(
        &self,
        header: &Header,
        audio: &Bytes,
        audio_sha256: [u8; 32],
    ) -> Result<Answer, UplinkError> {
        let request = wire::encode_utterance(header, audio, audio_sha256)?.freeze();
        let mut failures = Vec::new();
        for target in &self.targets {
            let outcome =
                tokio::time::timeout(self.attempt_timeout, self.attempt(target, &request)).await;
            let (label, problem) = match outcome {
                Ok(Ok(fin))
                    if fin.audio_sha256 == audio_sha256 && fin.utterance == header.utterance =>
                {
                    self.count(target, "ok");
                    return Ok(Answer {
                        region: target.name.clone(),
                        fin,
                    });
                }
                Ok(Ok(_)) => (
                    "corrupted",
                    "answer does not match the utterance sent (audio hash or id)".to_owned(),
                ),
                Ok(Err(AttemptError::Answered(e))) if !e.code.is_retryable() => {
                    self.count(target, "refused");
                    return Err(UplinkError::Refused {
                        region: target.name.clone(),
                        code: e.code,
                        message: e.message,
                    });
                }
                Ok(Err(AttemptError::Answered(e))) => {
                    ("retryable", format!("{}: {}", e.code, e.message))
                }
                Ok(Err(AttemptError::Transport(e))) => {
                    target.forget().await;
                    ("transport", e)
                }
                Err(_) => (
                    "timeout",
                    format!("no answer within {:?}", self.attempt_timeout),
                ),
            };
            self.count(target, label);
            tracing::warn!(region = %target.name, outcome = label, %problem, "region attempt failed");
            failures.push(Attempt {
                region: target.name.clone(),
                problem,
            });
        }
        Err(UplinkError::Exhausted(failures))
    }

    fn count(&self, target: &Target, outcome: &'static str) {
        self.metrics
            .uplink_attempts
            .get_or_create(&RegionOutcome {
                region: target.name.clone(),
                outcome,
            })
            .inc();
    }

    async fn attempt(&self, target: &Target, request: &Bytes) -> Result<Final, AttemptError> {
        let transport = |e: &dyn std::fmt::Display| AttemptError::Transport(e.to_string());
        let connection = self.connection(target).await?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| transport(&e))?;
        send.write_all(request).await.map_err(|e| transport(&e))?;
        send.finish().map_err(|e| transport(&e))?;

        let mut buf = BytesMut::new();
        loop {
            match wire::decode(&mut buf) {
                Ok(Some(Frame::Final(fin))) => return Ok(fin),
                Ok(Some(Frame::Error(e))) => return Err(AttemptError::Answered(e)),
                Ok(Some(other)) => {
                    return Err(AttemptError::Transport(format!(
                        "unexpected {} frame from region",
                        other.name()
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(transport(&e)),
            }
            if buf.len() > MAX_ANSWER {
                return Err(AttemptError::Transport("answer too large".into()));
            }
            match recv
                .read_chunk(64 * 1024, true)
                .await
                .map_err(|e| transport(&e))?
            {
                Some(chunk) => buf.extend_from_slice(&chunk.bytes),
                None => {
                    return Err(AttemptError::Transport(
                        "stream closed before an answer".into(),
                    ));
                }
            }
        }
    }

    async fn connection(&self, target: &Target) -> Result<quinn::Connection, AttemptError> {
        let mut slot = target.connection.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let transport =
            |e: String| AttemptError::Transport(format!("connect to {}: {e}", target.quic));
        let addr = tokio::net::lookup_host(&target.quic)
            .await
            .map_err(|e| transport(e.to_string()))?
            .next()
            .ok_or_else(|| transport("no address".into()))?;
        let connecting = self
            .endpoint
            .connect(addr, &target.tls_name)
            .map_err(|e| transport(e.to_string()))?;
        let connection = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| transport(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| transport(e.to_string()))?;
        tracing::info!(region = %target.name, %addr, "connected to region");
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Closes every connection and waits (bounded) for the peers to learn.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"edge shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}
