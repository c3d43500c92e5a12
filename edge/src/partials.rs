//! Live partials: while an utterance is open, the edge reads its audio so
//! far with a small Whisper (the edge tier: GGUF q8_0 by default) on its own
//! threads, off the async executor.
//!
//! A session has at most one partial in flight. Asking never waits: the
//! threads take work through a rendezvous channel, so when every thread is
//! busy the ask fails at once and the session skips that partial (counted),
//! and partials can never queue up behind each other, or delay the VAD or a
//! final. The model is a [`ModelSlot`]: when the sync agent moves the edge
//! channel's `current`, the next partial uses the new version.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use earshot_asr::slot::ModelSlot;
use earshot_asr::{AsrError, EncoderWindow};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::metrics::{Metrics, ReasonLabel};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialsConfig {
    /// The model directory (`config.json`, `tokenizer.json` and
    /// `model.gguf` or `model.safetensors`), or the sync agent's `current`
    /// link for the edge channel.
    pub model: PathBuf,
    /// How much of Whisper's 30 s window each partial encodes: `full`,
    /// `fit` or `<n>s` (docs/benchmarks.md has the measured trade-off).
    #[serde(default = "d_window")]
    pub window: EncoderWindow,
    /// New speech between two partials of one utterance.
    #[serde(default = "d_cadence")]
    pub cadence_ms: u32,
    /// Threads running partials, shared by every session (each runs one
    /// partial at a time, on one core: `earshot-edge` sets candle's
    /// `RAYON_NUM_THREADS` to 1 unless it is set).
    #[serde(default = "d_threads")]
    pub threads: usize,
    /// The nice value partials run at (0 to 19): below the VAD, sockets
    /// and timers, so that on a busy machine partials get what is left of
    /// the cores instead of delaying frames.
    #[serde(default = "d_nice")]
    pub nice: i32,
}

/// 5 s: on real tiny.en it showed 90% of the words in a partial with a
/// median delay of 0.35 s at 0.6 CPU-seconds per second of speech, where
/// 10 s cost half as much again and `fit` was slower and far less right
/// (docs/benchmarks.md).
fn d_window() -> EncoderWindow {
    EncoderWindow::Padded(5)
}

fn d_cadence() -> u32 {
    400
}

fn d_threads() -> usize {
    1
}

fn d_nice() -> i32 {
    19
}

impl PartialsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(100..=10_000).contains(&self.cadence_ms) {
            return Err(format!(
                "partials.cadence_ms = {}: use 100 to 10000 (the default is 400)",
                self.cadence_ms
            ));
        }
        if !(0..=19).contains(&self.nice) {
            return Err(format!("partials.nice = {}: use 0 to 19", self.nice));
        }
        if !(1..=64).contains(&self.threads) {
            return Err(format!("partials.threads = {}: use 1 to 64", self.threads));
        }
        Ok(())
    }
}

/// When a session's next partial is due, on the session's audio clock (16
/// kHz samples; pure, `now` passed in): a cadence of speech after the
/// utterance's start or the last ask.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cadence {
    utterance: u32,
    asked_at: u64,
}

impl Cadence {
    /// Whether to ask now for a partial of `utterance`, whose speech began
    /// at sample `start`, with `now` samples heard and none in flight;
    /// when it says yes the next one is due `every` samples later.
    pub fn due(&mut self, utterance: u32, start: u64, now: u64, every: u64) -> bool {
        if self.utterance != utterance {
            self.utterance = utterance;
            self.asked_at = start;
        }
        if now < self.asked_at.saturating_add(every) {
            return false;
        }
        self.asked_at = now;
        true
    }
}

/// What one partial read.
#[derive(Debug)]
pub struct Reading {
    pub text: String,
    pub compute: Duration,
}

/// The answer to one ask: the reading, or why there is none.
pub type Answer = oneshot::Receiver<Result<Reading, String>>;

struct Job {
    pcm: Vec<f32>,
    language: Option<String>,
    reply: oneshot::Sender<Result<Reading, String>>,
}

/// The partials engine an edge shares among its sessions.
pub struct Partials {
    jobs: SyncSender<Job>,
    cadence_ms: u32,
    model_id: Arc<Mutex<String>>,
}

impl std::fmt::Debug for Partials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partials")
            .field("cadence_ms", &self.cadence_ms)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked mid-partial leaves nothing half-written that
    // the next one could misread.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Partials {
    /// Loads the model and starts `config.threads` threads. They end when
    /// the engine is dropped.
    pub fn start(config: &PartialsConfig, metrics: Arc<Metrics>) -> Result<Self, AsrError> {
        // Loaded on a thread already at the partials' priority: threads
        // candle starts for its kernels inherit it.
        let (model, window, nice) = (config.model.clone(), config.window, config.nice);
        let slot = std::thread::Builder::new()
            .name("partials-load".into())
            .spawn(move || {
                lower_priority(nice);
                ModelSlot::load(&model, window, None)
            })
            .map_err(|e| AsrError::Batch(format!("cannot start a partials thread: {e}")))?
            .join()
            .map_err(|_| AsrError::Batch("loading the partials model panicked".into()))??;
        let model_id = Arc::new(Mutex::new(slot.id().to_owned()));
        tracing::info!(model = %slot.id(), window = %config.window, "partials model loaded");
        let slot = Arc::new(Mutex::new(slot));
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(0);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..config.threads {
            let (rx, slot, metrics, model_id) =
                (rx.clone(), slot.clone(), metrics.clone(), model_id.clone());
            std::thread::Builder::new()
                .name(format!("partials-{n}"))
                .spawn(move || {
                    lower_priority(nice);
                    work(&rx, &slot, &metrics, &model_id)
                })
                .map_err(|e| AsrError::Batch(format!("cannot start a partials thread: {e}")))?;
        }
        Ok(Partials {
            jobs,
            cadence_ms: config.cadence_ms,
            model_id,
        })
    }

    /// Samples (16 kHz) of new speech between two partials.
    pub fn cadence_samples(&self) -> u64 {
        u64::from(self.cadence_ms) * 16
    }

    /// The model version partials are read with now.
    pub fn model_id(&self) -> String {
        lock(&self.model_id).clone()
    }

    /// Hands `pcm` (16 kHz mono) to an idle thread; `None` when every
    /// thread is busy (the caller skips this partial).
    pub fn ask(&self, pcm: Vec<f32>, language: Option<String>) -> Option<Answer> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(Job {
            pcm,
            language,
            reply,
        }) {
            Ok(()) => Some(answer),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }
}

/// Sets the calling thread's nice value (Linux keeps one per thread);
/// threads it starts inherit it. Raising it needs no privilege.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: plain integer arguments naming the calling thread; nothing
    // is read or written through a pointer.
    let failed =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) != 0 };
    #[cfg(not(target_os = "linux"))]
    let failed = nice != 0;
    if failed {
        tracing::warn!(nice, "cannot lower the partials threads' priority");
    }
}

/// One partials thread: waits for a job, runs it on the slot's model
/// (swapped first if its directory moved), replies.
fn work(
    jobs: &Mutex<Receiver<Job>>,
    slot: &Mutex<ModelSlot>,
    metrics: &Metrics,
    model_id: &Mutex<String>,
) {
    loop {
        // Only the thread holding the lock waits in `recv`; the others
        // wait for the lock. Either way none is taking work, so an ask
        // while all are busy finds no receiver and fails.
        let job = match lock(jobs).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let model = {
            let mut slot = lock(slot);
            match slot.refresh() {
                None => {}
                Some(Ok(id)) => {
                    tracing::info!(model = %id, "partials model swapped");
                    *lock(model_id) = id;
                    metrics
                        .partial_model_loads
                        .get_or_create(&ReasonLabel { reason: "loaded" })
                        .inc();
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, model = %slot.id(), "new partials model failed to load; keeping the current one");
                    metrics
                        .partial_model_loads
                        .get_or_create(&ReasonLabel { reason: "failed" })
                        .inc();
                }
            }
            slot.model().clone()
        };
        let started = Instant::now();
        let result = model
            .transcribe(&job.pcm, job.language.as_deref())
            .map(|t| Reading {
                text: t.text,
                compute: started.elapsed(),
            })
            .map_err(|e| e.to_string());
        metrics
            .partial_compute_seconds
            .observe(started.elapsed().as_secs_f64());
        // The session may have gone; its answer has no reader then.
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::Cadence;

    const EVERY: u64 = 6_400; // 400 ms

    #[test]
    fn a_partial_is_due_a_cadence_after_the_start_then_after_each_ask() {
        let mut c = Cadence::default();
        // Utterance 1 began at 1 s: nothing before 1.4 s.
        assert!(!c.due(1, 16_000, 16_000, EVERY));
        assert!(!c.due(1, 16_000, 22_399, EVERY));
        assert!(c.due(1, 16_000, 22_400, EVERY));
        // The next one a cadence after that ask, not after the start.
        assert!(!c.due(1, 16_000, 28_000, EVERY));
        assert!(c.due(1, 16_000, 28_800, EVERY));
        // An ask that could not go (busy, or one in flight) is simply
        // asked again later: a long gap gives one partial, not a backlog.
        assert!(c.due(1, 16_000, 80_000, EVERY));
        assert!(!c.due(1, 16_000, 80_512, EVERY));
    }

    #[test]
    fn a_new_utterance_starts_its_own_cadence() {
        let mut c = Cadence::default();
        assert!(c.due(1, 0, 7_000, EVERY));
        // Utterance 2 starts at 2 s: its first partial is due at 2.4 s,
        // however recently utterance 1's was asked.
        assert!(!c.due(2, 32_000, 38_000, EVERY));
        assert!(c.due(2, 32_000, 38_400, EVERY));
    }
}
