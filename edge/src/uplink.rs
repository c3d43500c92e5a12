//! The QUIC uplink: sends each utterance to a permitted region, one
//! bidirectional stream per utterance, until one answers it.
//!
//! Only regions the session's jurisdiction permits are ever dialled: the
//! target list is computed from the topology's residency policy when the
//! edge starts, and nothing else can be added to it.
//!
//! Each region has a circuit breaker ([`crate::breaker`]) fed by transport
//! failures, timeouts and retryable answers (`busy`, `overloaded`,
//! `shutting_down`, …): while it is open the region is skipped without
//! dialling. Dialling happens once per region however many utterances
//! wait for it (they share the attempt), and QUIC keep-alives with a short
//! idle timeout notice a dead region within about a second. An utterance
//! whose region fails is tried on the next permitted region; when every
//! permitted region has failed or is open, it waits for the first breaker
//! to let a probe through and tries again (the same region, reconnected),
//! until `retry_budget` has passed: only then does it fail with
//! [`UplinkError::Unavailable`]. A region that refuses the utterance
//! (non-retryable error) ends the attempt.
//!
//! Every attempt of one utterance carries the same header, so the same
//! idempotency key (edge, session, utterance): a region that sees it again
//! answers from the first attempt's job instead of transcribing twice.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use earshot_common::retry::Backoff;
use earshot_common::topology::Region;
use earshot_common::wire::{self, ErrorCode, Final, Frame, Header};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::breaker::Breaker;
use crate::metrics::{Metrics, RegionLabel, RegionOutcome};

/// Most bytes a region's answer may take before it is treated as broken.
const MAX_ANSWER: usize = wire::MAX_FRAME_LEN + 4;

/// Failed attempts kept for the error message of one utterance.
const MAX_ATTEMPTS_KEPT: usize = 8;

type Dial = Shared<BoxFuture<'static, Result<quinn::Connection, String>>>;

/// A region's connection, or the dial every waiting utterance shares.
enum Slot {
    Idle,
    Dialling { generation: u64, dial: Dial },
    Connected(quinn::Connection),
}

struct Target {
    name: String,
    quic: String,
    tls_name: String,
    slot: Mutex<Slot>,
    generation: std::sync::atomic::AtomicU64,
    breaker: Mutex<Breaker>,
    /// The last failure any utterance saw here: what an utterance that
    /// only ever found the breaker open reports.
    last_problem: Mutex<Option<String>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("quic", &self.quic)
            .finish()
    }
}

/// How the uplink tries regions.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Time to establish a QUIC connection to a region.
    pub connect_timeout: Duration,
    /// Time one region has to answer one utterance it was sent.
    pub attempt_timeout: Duration,
    /// How long an utterance keeps trying while no permitted region can
    /// take it.
    pub retry_budget: Duration,
    /// Consecutive failures that open a region's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker skips its region before a probe.
    pub breaker_open: Duration,
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
    #[error("no permitted region could take the utterance: {}", describe(.attempts))]
    Unavailable {
        attempts: Vec<Attempt>,
        /// When trying again may succeed.
        retry_after: Duration,
    },
    #[error("cannot encode the utterance: {0}")]
    Encode(#[from] wire::FrameError),
}

fn describe(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return "every permitted region's circuit breaker is open".into();
    }
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

/// What the permitted regions hold of one utterance of a resumed session.
#[derive(Debug)]
pub enum Fetched {
    Found(Box<Answer>),
    /// Every permitted region was asked and holds nothing of it.
    NotFound,
    /// No region had it, and these could not be asked.
    Unreachable(Vec<Attempt>),
}

enum AttemptError {
    Transport(String),
    Answered(wire::WireError),
}

pub struct Uplink {
    endpoint: quinn::Endpoint,
    targets: Vec<Target>,
    policy: Policy,
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
        policy: Policy,
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
                    slot: Mutex::new(Slot::Idle),
                    generation: std::sync::atomic::AtomicU64::new(0),
                    breaker: Mutex::new(Breaker::new(policy.breaker_failures, policy.breaker_open)),
                    last_problem: Mutex::new(None),
                })
                .collect(),
            policy,
            metrics,
        })
    }

    /// Transcribes one utterance in a permitted region: the first one that
    /// can, retrying (bounded by the retry budget) while none can.
    pub async fn transcribe(
        &self,
        header: &Header,
        audio: &Bytes,
        audio_sha256: [u8; 32],
    ) -> Result<Answer, UplinkError> {
        let request = wire::encode_utterance(header, audio, audio_sha256)?.freeze();
        let deadline = Instant::now() + self.policy.retry_budget;
        let mut failures: Vec<Attempt> = Vec::new();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let mut next_probe: Option<Instant> = None;
            for (index, target) in self.targets.iter().enumerate() {
                if !self.allow(target, &mut next_probe) {
                    self.count(target, "skipped");
                    continue;
                }
                let outcome = tokio::time::timeout(
                    self.policy.attempt_timeout,
                    self.attempt(target, &request),
                )
                .await;
                let (label, problem) = match outcome {
                    Ok(Ok(fin))
                        if fin.audio_sha256 == audio_sha256
                            && fin.utterance == header.utterance =>
                    {
                        self.succeeded(target);
                        self.count(target, "ok");
                        if index > 0 {
                            self.metrics
                                .failovers
                                .get_or_create(&RegionLabel {
                                    region: target.name.clone(),
                                })
                                .inc();
                        }
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
                        // The region is alive and decided: no other region
                        // would decide differently.
                        self.succeeded(target);
                        self.count(target, "refused");
                        return Err(UplinkError::Refused {
                            region: target.name.clone(),
                            code: e.code,
                            message: e.message,
                        });
                    }
                    Ok(Err(AttemptError::Answered(e))) => (
                        if e.code == ErrorCode::Busy {
                            "busy"
                        } else {
                            "retryable"
                        },
                        format!("{}: {}", e.code, e.message),
                    ),
                    Ok(Err(AttemptError::Transport(e))) => {
                        self.forget(target);
                        ("transport", e)
                    }
                    Err(_) => (
                        "timeout",
                        format!("no answer within {:?}", self.policy.attempt_timeout),
                    ),
                };
                self.attempt_failed(target, label, &problem);
                if failures.len() == MAX_ATTEMPTS_KEPT {
                    failures.remove(0);
                }
                failures.push(Attempt {
                    region: target.name.clone(),
                    problem,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let retry_after = next_probe
                    .map_or(self.policy.breaker_open, |t| {
                        t.saturating_duration_since(now)
                    })
                    .max(Duration::from_secs(1));
                if failures.is_empty() {
                    // Every round found the breakers open (other utterances
                    // failed there): say why they opened.
                    failures = self
                        .targets
                        .iter()
                        .filter_map(|t| {
                            let last = t
                                .last_problem
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner);
                            Some(Attempt {
                                region: t.name.clone(),
                                problem: format!(
                                    "circuit breaker open; last failure: {}",
                                    last.as_ref()?
                                ),
                            })
                        })
                        .collect();
                }
                return Err(UplinkError::Unavailable {
                    attempts: failures,
                    retry_after,
                });
            }
            // No permitted region took it: wait for the first breaker to let
            // a probe through (or back off), within the budget.
            self.metrics.retry_rounds.inc();
            let wait = retry_wait(
                next_probe.map_or_else(
                    || backoff.next_delay(),
                    |t| t.saturating_duration_since(now),
                ),
                deadline - now,
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Asks the permitted regions, in order, for what they hold of the
    /// utterance `header` names (`header.resume` set): an utterance may
    /// have been answered by any of them (failover), so each is asked until
    /// one has it. One round, no retries: the caller decides what a region
    /// it could not ask means.
    pub async fn fetch(&self, header: &Header) -> Result<Fetched, UplinkError> {
        let empty: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest([]).into();
        let request = wire::encode_utterance(header, &Bytes::new(), empty)?.freeze();
        let mut failures = Vec::new();
        for target in &self.targets {
            if !self.allow(target, &mut None) {
                self.count(target, "skipped");
                failures.push(Attempt {
                    region: target.name.clone(),
                    problem: "circuit breaker open".into(),
                });
                continue;
            }
            let outcome =
                tokio::time::timeout(self.policy.attempt_timeout, self.attempt(target, &request))
                    .await;
            let (label, problem) = match outcome {
                Ok(Ok(fin)) if fin.utterance == header.utterance => {
                    self.succeeded(target);
                    self.count(target, "ok");
                    return Ok(Fetched::Found(Box::new(Answer {
                        region: target.name.clone(),
                        fin,
                    })));
                }
                Ok(Ok(_)) => ("corrupted", "answer names another utterance".to_owned()),
                Ok(Err(AttemptError::Answered(e))) if e.code == ErrorCode::NotFound => {
                    self.succeeded(target);
                    self.count(target, "not_found");
                    continue;
                }
                Ok(Err(AttemptError::Answered(e))) => {
                    self.succeeded(target);
                    self.count(target, "refused");
                    failures.push(Attempt {
                        region: target.name.clone(),
                        problem: format!("{}: {}", e.code, e.message),
                    });
                    continue;
                }
                Ok(Err(AttemptError::Transport(e))) => {
                    self.forget(target);
                    ("transport", e)
                }
                Err(_) => (
                    "timeout",
                    format!("no answer within {:?}", self.policy.attempt_timeout),
                ),
            };
            self.attempt_failed(target, label, &problem);
            failures.push(Attempt {
                region: target.name.clone(),
                problem,
            });
        }
        Ok(if failures.is_empty() {
            Fetched::NotFound
        } else {
            Fetched::Unreachable(failures)
        })
    }

    /// An attempt on `target` failed (`label`: how): fed to its breaker,
    /// counted, logged, kept as its last problem.
    fn attempt_failed(&self, target: &Target, label: &'static str, problem: &str) {
        self.failed(target);
        self.count(target, label);
        tracing::warn!(region = %target.name, outcome = label, %problem, "region attempt failed");
        *target
            .last_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(problem.to_owned());
    }

    fn breaker<T>(&self, target: &Target, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut breaker = target
            .breaker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut breaker);
        self.metrics
            .region_breaker
            .get_or_create(&RegionLabel {
                region: target.name.clone(),
            })
            .set(breaker.state(Instant::now()).gauge());
        out
    }

    /// Whether `target` may be tried now; if not, notes when it may.
    fn allow(&self, target: &Target, next_probe: &mut Option<Instant>) -> bool {
        let now = Instant::now();
        self.breaker(target, |b| {
            if b.allow(now) {
                return true;
            }
            if let Some(at) = b.retry_at(now) {
                *next_probe = Some(next_probe.map_or(at, |n| n.min(at)));
            }
            false
        })
    }

    fn succeeded(&self, target: &Target) {
        self.breaker(target, Breaker::success);
    }

    fn failed(&self, target: &Target) {
        let opened = self.breaker(target, |b| b.failure(Instant::now()));
        if opened {
            tracing::warn!(region = %target.name, open_for = ?self.policy.breaker_open, "circuit breaker opened");
            self.metrics
                .breaker_opened
                .get_or_create(&RegionLabel {
                    region: target.name.clone(),
                })
                .inc();
        }
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

    /// The region's live connection, dialling if there is none. Utterances
    /// that need it while a dial is under way share that dial.
    async fn connection(&self, target: &Target) -> Result<quinn::Connection, AttemptError> {
        let (generation, dial) = {
            let mut slot = target.slot.lock().unwrap_or_else(PoisonError::into_inner);
            match &*slot {
                Slot::Connected(c) if c.close_reason().is_none() => return Ok(c.clone()),
                Slot::Dialling { generation, dial } => (*generation, dial.clone()),
                _ => {
                    let generation = target
                        .generation
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let dial = self.dial(target).boxed().shared();
                    *slot = Slot::Dialling {
                        generation,
                        dial: dial.clone(),
                    };
                    (generation, dial)
                }
            }
        };
        let result = dial.await;
        let mut slot = target.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*slot, Slot::Dialling { generation: g, .. } if *g == generation) {
            *slot = match &result {
                Ok(c) => Slot::Connected(c.clone()),
                Err(_) => Slot::Idle,
            };
        }
        result.map_err(AttemptError::Transport)
    }

    fn dial(
        &self,
        target: &Target,
    ) -> impl std::future::Future<Output = Result<quinn::Connection, String>> + Send + 'static {
        let endpoint = self.endpoint.clone();
        let quic = target.quic.clone();
        let tls_name = target.tls_name.clone();
        let name = target.name.clone();
        let timeout = self.policy.connect_timeout;
        async move {
            let fail = |e: String| format!("connect to {quic}: {e}");
            let addr = tokio::net::lookup_host(&quic)
                .await
                .map_err(|e| fail(e.to_string()))?
                .next()
                .ok_or_else(|| fail("no address".into()))?;
            let connecting = endpoint
                .connect(addr, &tls_name)
                .map_err(|e| fail(e.to_string()))?;
            let connection = tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| fail(format!("timed out after {timeout:?}")))?
                .map_err(|e| fail(e.to_string()))?;
            tracing::info!(region = %name, %addr, "connected to region");
            Ok(connection)
        }
    }

    /// Drops a connection that failed, so the next attempt dials again.
    fn forget(&self, target: &Target) {
        let mut slot = target.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*slot, Slot::Connected(_)) {
            *slot = Slot::Idle;
        }
    }

    /// Closes every connection and waits (bounded) for the peers to learn.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"edge shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// How long a retry round waits: until the next probe (or the backoff's
/// delay), at least 10 ms so a round never spins, and never past the
/// budget `left` (which may itself be under 10 ms).
fn retry_wait(until_next: Duration, left: Duration) -> Duration {
    until_next.max(Duration::from_millis(10)).min(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_waits_at_least_10_ms_and_never_past_the_budget() {
        let ms = Duration::from_millis;
        assert_eq!(retry_wait(ms(0), ms(500)), ms(10));
        assert_eq!(retry_wait(ms(200), ms(500)), ms(200));
        assert_eq!(retry_wait(ms(900), ms(500)), ms(500));
        // Less than 10 ms of budget left: wait that, do not panic.
        assert_eq!(retry_wait(ms(200), ms(3)), ms(3));
        assert_eq!(retry_wait(ms(0), ms(0)), ms(0));
    }
}
