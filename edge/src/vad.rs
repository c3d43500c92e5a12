//! Silero VAD through ONNX Runtime, batched across streams.
//!
//! The model (`silero_vad.onnx` from the `silero-vad` package) is a small
//! recurrent network: each call takes 512 new samples at 16 kHz plus the 64
//! samples before them, and a 2×B×128 state, and returns the probability
//! that each window is speech and the next state. The state and context
//! live per client session in [`VadStream`].
//!
//! One call costs about the same for one stream as for dozens, so the
//! windows of every stream waiting at a moment go into one call: sessions
//! queue their windows ([`Silero::probabilities`]); a small pool of threads
//! (not the async executor) takes everything queued, up to
//! [`MAX_BATCH`] streams, runs them as one batch with each stream's own
//! state, and answers each stream. Under light load a batch is one stream
//! and nothing waits for company.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

/// New samples per window at 16 kHz.
pub const WINDOW: usize = 512;
/// Samples of the previous window the model sees again.
const CONTEXT: usize = 64;
const STATE: usize = 2 * 128;
/// The model's `sr` input.
static SAMPLE_RATE: [i64; 1] = [16_000];
/// Most streams in one ONNX Runtime call.
pub const MAX_BATCH: usize = 256;

#[derive(Debug, Clone, thiserror::Error)]
pub enum VadError {
    #[error(
        "cannot load ONNX Runtime from {path}: {reason} (install it with `make setup`, or set vad.onnxruntime)"
    )]
    Runtime { path: String, reason: String },
    #[error("cannot load the Silero VAD model {path}: {reason}")]
    Model { path: String, reason: String },
    #[error("VAD inference failed: {0}")]
    Inference(String),
}

/// Per-stream recurrent state: the model's state and the last
/// [`CONTEXT`] samples seen.
#[derive(Debug, Clone)]
pub struct VadStream {
    state: [f32; STATE],
    context: [f32; CONTEXT],
}

impl Default for VadStream {
    fn default() -> Self {
        VadStream {
            state: [0.0; STATE],
            context: [0.0; CONTEXT],
        }
    }
}

/// Where the VAD reports its work (clones of the edge's metrics).
#[derive(Debug, Clone, Default)]
pub struct VadMetrics {
    /// Streams per ONNX Runtime call.
    pub batch_size: Option<Histogram>,
    /// Seconds spent inside ONNX Runtime.
    pub compute_seconds: Counter<f64, AtomicU64>,
    /// Stream-windows evaluated.
    pub windows: Counter,
}

/// What a stream gets back: its advanced state and the probabilities.
type Reply = (VadStream, Result<Vec<f32>, VadError>);

/// One stream's request: its state and whole windows of samples.
struct Job {
    stream: VadStream,
    samples: Vec<f32>,
    reply: oneshot::Sender<Reply>,
}

/// The batched Silero service. Dropping it stops its threads once their
/// queue is empty.
pub struct Silero {
    queue: mpsc::Sender<Job>,
    threads: usize,
}

impl std::fmt::Debug for Silero {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Silero")
            .field("threads", &self.threads)
            .finish()
    }
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime from `library` once per process. ONNX Runtime allows
/// one environment per process; later calls reuse the first.
fn environment(library: &Path) -> Result<&'static ort::environment::Environment, VadError> {
    let env = ENVIRONMENT.get_or_init(|| {
        ort::init_from(library)
            .map_err(|e| e.to_string())?
            .with_name("earshot-edge")
            .build()
            .map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|reason| VadError::Runtime {
        path: library.display().to_string(),
        reason: reason.clone(),
    })
}

impl Silero {
    /// Loads the model at `model` with the ONNX Runtime shared library at
    /// `library` and starts `threads` inference threads (one ONNX Runtime
    /// session each, one intra-op thread each). At most `queue` streams
    /// wait for a thread; more wait in [`Silero::probabilities`].
    pub fn load(
        library: &Path,
        model: &Path,
        threads: usize,
        queue: usize,
        metrics: VadMetrics,
    ) -> Result<Self, VadError> {
        if !library.is_file() {
            return Err(VadError::Runtime {
                path: library.display().to_string(),
                reason: "file not found".into(),
            });
        }
        let env = environment(library)?;
        let model_err = |reason: String| VadError::Model {
            path: model.display().to_string(),
            reason,
        };
        if !model.is_file() {
            return Err(model_err("file not found".into()));
        }
        let threads = threads.max(1);
        let mut sessions = Vec::with_capacity(threads);
        for _ in 0..threads {
            let session = Session::builder(env)
                .map_err(|e| model_err(e.to_string()))?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(|e| model_err(e.to_string()))?
                .with_intra_threads(1)
                .map_err(|e| model_err(e.to_string()))?
                .with_inter_threads(1)
                .map_err(|e| model_err(e.to_string()))?
                .commit_from_file(model)
                .map_err(|e| model_err(e.to_string()))?;
            let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
            if names != ["input", "state", "sr"] {
                return Err(model_err(format!(
                    "expected inputs [input, state, sr], found {names:?}: is this a Silero VAD v5+ model?"
                )));
            }
            sessions.push(session);
        }
        let (tx, rx) = mpsc::channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for (i, session) in sessions.into_iter().enumerate() {
            let rx = rx.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("vad-{i}"))
                .spawn(move || Batcher::new(session, metrics).run(&rx))
                .map_err(|e| VadError::Inference(format!("cannot start a VAD thread: {e}")))?;
        }
        Ok(Silero { queue: tx, threads })
    }

    /// The speech probability of each [`WINDOW`] of `samples` (whose length
    /// must be a multiple of it), advancing `stream`. Waits for a VAD
    /// thread, which may evaluate it together with other streams' windows:
    /// a slow model delays only the sessions waiting for it, never sockets
    /// or timers.
    pub async fn probabilities(
        &self,
        stream: &mut VadStream,
        samples: Vec<f32>,
    ) -> Result<Vec<f32>, VadError> {
        if !samples.len().is_multiple_of(WINDOW) {
            return Err(VadError::Inference(format!(
                "{} samples are not whole {WINDOW}-sample windows",
                samples.len()
            )));
        }
        if samples.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            stream: stream.clone(),
            samples,
            reply,
        };
        let gone = || VadError::Inference("the VAD threads have stopped".into());
        self.queue.send(job).await.map_err(|_| gone())?;
        let (next, result) = answer.await.map_err(|_| gone())?;
        if result.is_ok() {
            *stream = next;
        }
        result
    }
}

/// One inference thread: its ONNX Runtime session and reusable buffers.
struct Batcher {
    session: Session,
    metrics: VadMetrics,
    input: Vec<f32>,
    state: Vec<f32>,
}

impl Batcher {
    fn new(session: Session, metrics: VadMetrics) -> Self {
        Batcher {
            session,
            metrics,
            input: Vec::new(),
            state: Vec::new(),
        }
    }

    /// Takes everything queued (up to [`MAX_BATCH`] streams) and answers
    /// it, until the queue closes.
    fn run(mut self, queue: &Mutex<mpsc::Receiver<Job>>) {
        let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        loop {
            {
                // A poisoned lock only means another thread panicked while
                // taking jobs; the receiver itself is intact.
                let mut rx = queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match rx.blocking_recv() {
                    Some(job) => jobs.push(job),
                    None => return,
                }
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
            }
            let result = self.evaluate(&mut jobs);
            for (job, probs) in jobs.drain(..).zip(result.iter_and_fill()) {
                let _ = job.reply.send((job.stream, probs));
            }
        }
    }

    /// Runs every job's windows, window by window, each step one batched
    /// call over the jobs that still have a window.
    fn evaluate(&mut self, jobs: &mut [Job]) -> Outcomes {
        let mut out: Vec<Vec<f32>> = jobs
            .iter()
            .map(|j| Vec::with_capacity(j.samples.len() / WINDOW))
            .collect();
        let steps = jobs
            .iter()
            .map(|j| j.samples.len() / WINDOW)
            .max()
            .unwrap_or(0);
        for step in 0..steps {
            let live: Vec<usize> = (0..jobs.len())
                .filter(|&i| jobs[i].samples.len() / WINDOW > step)
                .collect();
            if let Err(e) = self.step(jobs, &live, step, &mut out) {
                return Outcomes::Failed(e, jobs.len());
            }
        }
        Outcomes::Done(out)
    }

    /// One batched call: window `step` of each job in `live`.
    fn step(
        &mut self,
        jobs: &mut [Job],
        live: &[usize],
        step: usize,
        out: &mut [Vec<f32>],
    ) -> Result<(), VadError> {
        let b = live.len();
        self.input.clear();
        self.state.clear();
        self.state.resize(STATE * b, 0.0);
        let half = STATE / 2;
        for (slot, &i) in live.iter().enumerate() {
            let job = &mut jobs[i];
            let window = &job.samples[step * WINDOW..(step + 1) * WINDOW];
            self.input.extend_from_slice(&job.stream.context);
            self.input.extend_from_slice(window);
            job.stream
                .context
                .copy_from_slice(&window[WINDOW - CONTEXT..]);
            // State is [2, B, 128]; each stream keeps its [2, 128].
            for layer in 0..2 {
                let to = layer * b * half + slot * half;
                self.state[to..to + half]
                    .copy_from_slice(&job.stream.state[layer * half..(layer + 1) * half]);
            }
        }
        let err = |e: ort::Error| VadError::Inference(e.to_string());
        let started = Instant::now();
        // Views of the batch buffers: nothing is copied into ONNX Runtime.
        let input =
            TensorRef::from_array_view(([b, CONTEXT + WINDOW], &self.input[..])).map_err(err)?;
        let state =
            TensorRef::from_array_view(([2usize, b, half], &self.state[..])).map_err(err)?;
        let sr = TensorRef::from_array_view(([1usize; 0], &SAMPLE_RATE[..])).map_err(err)?;
        let outputs = self
            .session
            .run(ort::inputs!["input" => input, "state" => state, "sr" => sr])
            .map_err(err)?;
        let (_, prob) = outputs["output"].try_extract_tensor::<f32>().map_err(err)?;
        let (_, next) = outputs["stateN"].try_extract_tensor::<f32>().map_err(err)?;
        if next.len() != STATE * b || prob.len() != b {
            return Err(VadError::Inference(format!(
                "unexpected output shapes for a batch of {b}: {} probabilities, {} state values",
                prob.len(),
                next.len()
            )));
        }
        for (slot, &i) in live.iter().enumerate() {
            let job = &mut jobs[i];
            for layer in 0..2 {
                let from = layer * b * half + slot * half;
                job.stream.state[layer * half..(layer + 1) * half]
                    .copy_from_slice(&next[from..from + half]);
            }
            out[i].push(prob[slot]);
        }
        self.metrics
            .compute_seconds
            .inc_by(started.elapsed().as_secs_f64());
        self.metrics.windows.inc_by(b as u64);
        if let Some(h) = &self.metrics.batch_size {
            h.observe(b as f64);
        }
        Ok(())
    }
}

/// What a batch gave each of its jobs.
enum Outcomes {
    Done(Vec<Vec<f32>>),
    /// The call failed: every job of the batch gets the error.
    Failed(VadError, usize),
}

impl Outcomes {
    fn iter_and_fill(self) -> Vec<Result<Vec<f32>, VadError>> {
        match self {
            Outcomes::Done(v) => v.into_iter().map(Ok).collect(),
            Outcomes::Failed(e, n) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Silero from the project's `.venv` (installed by `make setup`).
    fn session() -> Session {
        let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
        let site = std::fs::read_dir(&lib)
            .expect("no .venv: run `make setup`")
            .filter_map(Result::ok)
            .map(|e| e.path().join("site-packages"))
            .find(|p| p.is_dir())
            .expect("no site-packages in .venv");
        let env = environment(&site.join("onnxruntime/capi/libonnxruntime.so.1.31.1")).unwrap();
        Session::builder(env)
            .unwrap()
            .with_intra_threads(1)
            .unwrap()
            .commit_from_file(site.join("silero_vad/data/silero_vad.onnx"))
            .unwrap()
    }

    fn job(samples: Vec<f32>) -> (Job, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            stream: VadStream::default(),
            samples,
            reply,
        };
        (job, rx)
    }

    fn signal(seed: u32, windows: usize) -> Vec<f32> {
        (0..windows * WINDOW)
            .map(|i| {
                let t = i as f32 / 16_000.0;
                let voiced = (i / 4000 + seed as usize).is_multiple_of(2);
                let x = (t * 2.0 * std::f32::consts::PI * (120.0 + 40.0 * seed as f32)).sin();
                let buzz = (x * 3.0).tanh() * 0.3;
                if voiced { buzz } else { 0.001 * x }
            })
            .collect()
    }

    #[test]
    fn a_stream_gets_the_same_probabilities_alone_and_in_a_batch() {
        let mut batcher = Batcher::new(session(), VadMetrics::default());
        let a = signal(0, 40);
        let b = signal(1, 25);
        let alone = |batcher: &mut Batcher, s: &Vec<f32>| {
            let (j, _rx) = job(s.clone());
            let mut jobs = [j];
            match batcher.evaluate(&mut jobs) {
                Outcomes::Done(mut v) => v.remove(0),
                Outcomes::Failed(e, _) => panic!("{e}"),
            }
        };
        let a_alone = alone(&mut batcher, &a);
        let b_alone = alone(&mut batcher, &b);
        // Together, with different lengths: b drops out of the batch
        // after its 25 windows while a goes on.
        let (ja, _ra) = job(a.clone());
        let (jb, _rb) = job(b.clone());
        let mut jobs = [ja, jb];
        let Outcomes::Done(together) = batcher.evaluate(&mut jobs) else {
            panic!("batch failed");
        };
        assert_eq!(together[0].len(), 40);
        assert_eq!(together[1].len(), 25);
        for (x, y) in together[0]
            .iter()
            .zip(&a_alone)
            .chain(together[1].iter().zip(&b_alone))
        {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        // And the state carried over: the last window of `a` evaluated
        // from a fresh state differs from the one in context.
        let (jlast, _r) = job(a[39 * WINDOW..].to_vec());
        let mut last = [jlast];
        let Outcomes::Done(fresh) = batcher.evaluate(&mut last) else {
            panic!("batch failed");
        };
        assert!(
            (fresh[0][0] - a_alone[39]).abs() > 1e-6,
            "state made no difference"
        );
    }
}
