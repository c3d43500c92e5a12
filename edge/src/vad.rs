//! Silero VAD through ONNX Runtime.
//!
//! The model (`silero_vad.onnx` from the `silero-vad` package) is a small
//! recurrent network: each call takes 512 new samples at 16 kHz plus the 64
//! samples before them, and a 2×1×128 state, and returns the probability
//! that the window is speech and the next state. The state and context live
//! per client session in [`VadStream`]; the ONNX sessions are a shared pool,
//! since one can serve any stream.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

/// New samples per window at 16 kHz.
pub const WINDOW: usize = 512;
/// Samples of the previous window the model sees again.
const CONTEXT: usize = 64;
const STATE: usize = 2 * 128;

#[derive(Debug, thiserror::Error)]
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

/// Per-stream recurrent state.
#[derive(Debug, Clone)]
pub struct VadStream {
    state: Vec<f32>,
    context: [f32; CONTEXT],
    input: Vec<f32>,
}

impl Default for VadStream {
    fn default() -> Self {
        VadStream {
            state: vec![0.0; STATE],
            context: [0.0; CONTEXT],
            input: vec![0.0; CONTEXT + WINDOW],
        }
    }
}

/// A pool of ONNX Runtime sessions of the Silero model. Inference runs on
/// blocking threads, at most one call per session at a time
/// ([`Silero::probabilities`]), never on the async executor.
pub struct Silero {
    sessions: Vec<Mutex<Session>>,
    permits: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Silero {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Silero")
            .field("sessions", &self.sessions.len())
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
    /// Loads `pool` sessions of the model at `model`, using the ONNX Runtime
    /// shared library at `library`. Each session runs on one thread.
    pub fn load(library: &Path, model: &Path, pool: usize) -> Result<Self, VadError> {
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
        let mut sessions = Vec::with_capacity(pool.max(1));
        for _ in 0..pool.max(1) {
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
            sessions.push(Mutex::new(session));
        }
        let permits = tokio::sync::Semaphore::new(sessions.len());
        Ok(Silero { sessions, permits })
    }

    /// The speech probability of each [`WINDOW`] of `samples` (whose length
    /// must be a multiple of it), advancing `stream`. Runs on a blocking
    /// thread, waiting for a free session first: a slow model delays only
    /// the sessions waiting for it, never sockets or timers.
    pub async fn probabilities(
        self: &Arc<Self>,
        stream: &mut VadStream,
        samples: Vec<f32>,
    ) -> Result<Vec<f32>, VadError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let silero = self.clone();
        let mut state = std::mem::take(stream);
        let (state, result) = tokio::task::spawn_blocking(move || {
            let result = samples
                .chunks(WINDOW)
                .map(|w| silero.probability(&mut state, w))
                .collect::<Result<Vec<f32>, VadError>>();
            (state, result)
        })
        .await
        .map_err(|e| VadError::Inference(format!("VAD task failed: {e}")))?;
        *stream = state;
        result
    }

    /// The speech probability of one window of exactly [`WINDOW`] samples;
    /// advances `stream`.
    pub fn probability(&self, stream: &mut VadStream, window: &[f32]) -> Result<f32, VadError> {
        if window.len() != WINDOW {
            return Err(VadError::Inference(format!(
                "window has {} samples, expected {WINDOW}",
                window.len()
            )));
        }
        stream.input[..CONTEXT].copy_from_slice(&stream.context);
        stream.input[CONTEXT..].copy_from_slice(window);
        stream.context.copy_from_slice(&window[WINDOW - CONTEXT..]);

        let err = |e: ort::Error| VadError::Inference(e.to_string());
        let input =
            Tensor::from_array(([1usize, CONTEXT + WINDOW], stream.input.clone())).map_err(err)?;
        let state = Tensor::from_array(([2usize, 1, 128], stream.state.clone())).map_err(err)?;
        let sr = Tensor::from_array(((), vec![16_000i64])).map_err(err)?;

        let mut session = self.session();
        let outputs = session
            .run(ort::inputs!["input" => input, "state" => state, "sr" => sr])
            .map_err(err)?;
        let (_, prob) = outputs["output"].try_extract_tensor::<f32>().map_err(err)?;
        let (_, next) = outputs["stateN"].try_extract_tensor::<f32>().map_err(err)?;
        if next.len() != STATE || prob.is_empty() {
            return Err(VadError::Inference("unexpected output shapes".into()));
        }
        stream.state.copy_from_slice(next);
        Ok(prob[0])
    }

    /// A free session if there is one, else waits for the first.
    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        for s in &self.sessions {
            if let Ok(guard) = s.try_lock() {
                return guard;
            }
        }
        // A panic while holding the lock cannot leave the session in a state
        // that matters (inputs are passed per call), so recover it.
        self.sessions[0]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
