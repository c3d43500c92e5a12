//! One client WebSocket session on `/v1/listen`.
//!
//! Audio arrives on binary frames, runs through Silero in 32 ms windows, and
//! the endpointer cuts it into utterances. Each utterance is sent to a
//! region by its own task; finals go back to the client in utterance order.
//! Reading from the client pauses while `max_pending_utterances` are in
//! flight, so a fast client cannot queue unbounded work. The session keeps
//! only the audio a current or future utterance can still need.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use earshot_common::audio::{Encoding, f32_to_s16le, f32le_to_f32, f32le_to_s16le, s16le_to_f32};
use earshot_common::client::{
    ClientErrorCode, ClientMessage, ConfigChange, ErrorMessage, FinalMessage, SegmentMessage,
    ServerMessage, SessionInfo, SpeechStartedMessage, TranslationMessage, hex, micros_to_ms,
    parse_client_message,
};
use earshot_common::wire::{self, Header, Translated};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::EdgeInner;
use crate::clock::{Expiry, SessionClock};
use crate::endpoint::{Endpointer, Segment};
use crate::metrics::{CodeLabel, ReceiptLabel, RegionLabel, RegionOutcome};
use crate::resample::{RATES, ToMono16k};
use crate::uplink::{Answer, Fetched, UplinkError};
use crate::vad::{VadStream, WINDOW};

/// WebSocket close codes used by the edge.
mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// Validated `/v1/listen` query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenParams {
    /// The client's rate, one of [`RATES`]; resampled to 16 kHz.
    pub sample_rate: u32,
    pub encoding: Encoding,
    /// 1, or 2 (downmixed to mono).
    pub channels: u16,
    pub language: Option<String>,
    /// Language to translate finals into (`translate=en`).
    pub translate: Option<String>,
    /// Finals carry their segments with timestamps (`timestamps=true`).
    pub timestamps: bool,
    /// Finals carry each word with its times (`words=true`).
    pub words: bool,
    /// `partial` messages while an utterance is open (`partials=false`
    /// turns them off); only where the edge has a partials model.
    pub partials: bool,
    /// Resume this session (`session=<id>`) after utterance `last`
    /// (`last=<n>`, default 0: every final the regions hold).
    pub resume: Option<(uuid::Uuid, u32)>,
}

/// A refusal before the session starts: code, message, close code.
type Refusal = (ClientErrorCode, String, u16);

const KNOWN_PARAMS: &str = "sample_rate, encoding, channels, language, translate, timestamps, words, partials, session, last";

/// `true` or `false`, else the query's refusal naming `param`.
fn boolean(param: &str, value: &str) -> Result<bool, Refusal> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err((
            ClientErrorCode::InvalidQuery,
            format!("{param} {:?} must be true or false", truncate(value)),
            close::POLICY,
        )),
    }
}

/// `value` if it is a language code (two or three lowercase letters),
/// else the query's refusal naming `param`.
fn language_code(param: &str, value: &str, alternatives: &str) -> Result<String, Refusal> {
    if earshot_common::client::is_language_code(value) {
        return Ok(value.to_owned());
    }
    Err((
        ClientErrorCode::InvalidQuery,
        format!(
            "{param} {:?} must be an ISO 639-1 code such as \"en\"{alternatives}",
            truncate(value)
        ),
        close::POLICY,
    ))
}

/// Parses the query. Every parameter is optional: the defaults are
/// `sample_rate=16000`, `encoding=pcm_s16le`, `channels=1` and no language
/// hint.
pub fn parse_params(query: &[(String, String)]) -> Result<ListenParams, Refusal> {
    let mut params = ListenParams {
        sample_rate: wire::SAMPLE_RATE,
        encoding: Encoding::PcmS16le,
        channels: 1,
        language: None,
        translate: None,
        timestamps: false,
        words: false,
        partials: true,
        resume: None,
    };
    let (mut session, mut last) = (None, None);
    for (key, value) in query {
        match key.as_str() {
            "sample_rate" => {
                let rate: u32 = value.parse().map_err(|_| {
                    (
                        ClientErrorCode::InvalidQuery,
                        format!("sample_rate {value:?} is not a number"),
                        close::POLICY,
                    )
                })?;
                if !RATES.contains(&rate) {
                    return Err((
                        ClientErrorCode::UnsupportedSampleRate,
                        format!(
                            "sample rate {rate} is not supported: send one of {RATES:?} Hz (16000 needs no resampling)"
                        ),
                        close::UNSUPPORTED,
                    ));
                }
                params.sample_rate = rate;
            }
            "channels" => {
                params.channels = match value.as_str() {
                    "1" => 1,
                    "2" => 2,
                    v if v.parse::<u16>().is_ok() => {
                        return Err((
                            ClientErrorCode::UnsupportedChannels,
                            format!(
                                "{v} channels are not supported: send mono (channels=1) or interleaved stereo (channels=2, downmixed on the edge)"
                            ),
                            close::UNSUPPORTED,
                        ));
                    }
                    v => {
                        return Err((
                            ClientErrorCode::InvalidQuery,
                            format!("channels {:?} is not a number", truncate(v)),
                            close::POLICY,
                        ));
                    }
                };
            }
            "encoding" => {
                params.encoding = Encoding::parse(value).ok_or_else(|| {
                    (
                        ClientErrorCode::UnsupportedEncoding,
                        format!(
                            "encoding {:?} is not supported: use one of {}",
                            truncate(value),
                            Encoding::SUPPORTED
                        ),
                        close::UNSUPPORTED,
                    )
                })?;
            }
            // `auto` (or nothing) lets the model detect the language.
            "language" if value == "auto" => params.language = None,
            "translate" => params.translate = Some(language_code("translate", value, "")?),
            "timestamps" => params.timestamps = boolean("timestamps", value)?,
            "words" => params.words = boolean("words", value)?,
            "partials" => params.partials = boolean("partials", value)?,
            "session" => {
                session = Some(uuid::Uuid::parse_str(value).map_err(|_| {
                    (
                        ClientErrorCode::InvalidQuery,
                        format!(
                            "session {:?} is not a session id: give the `session` of the session message you got",
                            truncate(value)
                        ),
                        close::POLICY,
                    )
                })?);
            }
            "last" => {
                last = Some(value.parse::<u32>().ok().filter(|&n| n <= MAX_LAST).ok_or_else(|| {
                    (
                        ClientErrorCode::InvalidQuery,
                        format!(
                            "last {:?} must be the number of the last utterance whose final you got (0 for none)",
                            truncate(value)
                        ),
                        close::POLICY,
                    )
                })?);
            }
            "language" => params.language = Some(language_code("language", value, ", or auto")?),
            other => {
                return Err((
                    ClientErrorCode::InvalidQuery,
                    format!(
                        "unknown query parameter {:?}: known are {KNOWN_PARAMS}",
                        truncate(other)
                    ),
                    close::POLICY,
                ));
            }
        }
    }
    params.resume = match (session, last) {
        (Some(id), last) => Some((id, last.unwrap_or(0))),
        (None, Some(_)) => {
            return Err((
                ClientErrorCode::InvalidQuery,
                "last needs session: resume with session=<id>&last=<n>".into(),
                close::POLICY,
            ));
        }
        (None, None) => None,
    };
    Ok(params)
}

/// Sessions of one edge that have not ended yet, by id. A session whose
/// client is gone stays here until its utterances are finished, so that a
/// resume on this edge fetches their finals only after they exist.
#[derive(Debug, Default)]
pub struct LiveSessions(std::sync::Mutex<std::collections::HashMap<uuid::Uuid, Live>>);

#[derive(Debug, Clone)]
struct Live {
    /// Closed when the session ends.
    ended: tokio::sync::watch::Receiver<()>,
    /// Cancelled when a resume takes the session over: the old connection
    /// stops reading (its client reconnected; the edge may not have seen
    /// the old connection drop yet) and finishes its utterances.
    takeover: CancellationToken,
    /// The highest utterance number the connection has cut: a resume
    /// numbers new utterances after it even if some are still on their
    /// way to a region.
    dispatched: Arc<std::sync::atomic::AtomicU32>,
}

/// A session's place in [`LiveSessions`]; removed when dropped.
struct LiveGuard {
    edge: Arc<EdgeInner>,
    id: uuid::Uuid,
    ended: tokio::sync::watch::Sender<()>,
    takeover: CancellationToken,
    dispatched: Arc<std::sync::atomic::AtomicU32>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut map = self.edge.live.lock();
        if map
            .get(&self.id)
            .is_some_and(|l| l.ended.same_channel(&self.ended.subscribe()))
        {
            map.remove(&self.id);
        }
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<uuid::Uuid, Live>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Enters session `id` as live on this edge, taking over an earlier
/// connection of it, if any: that one stops reading and is waited for (up
/// to `wait`) while it finishes its utterances. The swap is one step under
/// the lock, so of two resumes at once the later takes over the earlier.
/// Also returns the highest utterance number the earlier one cut.
async fn enter(
    edge: &Arc<EdgeInner>,
    id: uuid::Uuid,
    resuming: bool,
    wait: Duration,
) -> (LiveGuard, u32) {
    let (ended, rx) = tokio::sync::watch::channel(());
    let takeover = CancellationToken::new();
    let dispatched = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let live = Live {
        ended: rx,
        takeover: takeover.clone(),
        dispatched: dispatched.clone(),
    };
    let earlier = {
        let mut map = edge.live.lock();
        if resuming || !map.contains_key(&id) {
            map.insert(id, live)
        } else {
            None
        }
    };
    let mut cut = 0;
    if let Some(mut earlier) = earlier {
        earlier.takeover.cancel();
        // `changed` fails once the earlier connection's guard is dropped.
        let _ = tokio::time::timeout(wait, async {
            while earlier.ended.changed().await.is_ok() {}
        })
        .await;
        cut = earlier
            .dispatched
            .load(std::sync::atomic::Ordering::Acquire);
    }
    let guard = LiveGuard {
        edge: edge.clone(),
        id,
        ended,
        takeover,
        dispatched,
    };
    (guard, cut)
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// Numbers in a row no region holds after which a resume stops looking.
const RESUME_GAP: usize = 3;

/// The largest `last` a resume takes: far beyond any session's utterances
/// (a 4-hour session cuts a few thousand), so numbers never run out.
const MAX_LAST: u32 = 1 << 30;

/// A resume's walk over the utterance numbers after `last` (pure): which
/// to ask the regions for next, and what their answers mean.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResumeScan {
    next: u32,
    highest: u32,
    /// Numbers since the last one found that no region holds; `true` when
    /// every permitted region said so (else one could not be asked).
    gap: Vec<(u32, bool)>,
    /// The first number a region could not be asked about.
    first_unreachable: Option<u32>,
}

impl ResumeScan {
    fn new(last: u32) -> Self {
        ResumeScan {
            next: last.saturating_add(1),
            highest: last,
            gap: Vec::new(),
            first_unreachable: None,
        }
    }

    /// The number to ask about next; `None` once [`RESUME_GAP`] in a row
    /// were held nowhere (or numbers ran out).
    fn ask(&self) -> Option<u32> {
        (self.gap.len() < RESUME_GAP && self.next > self.highest).then_some(self.next)
    }

    /// `n` was found; returns the numbers before it that every region
    /// said it holds nothing of: lost before they reached one.
    fn found(&mut self, n: u32) -> Vec<u32> {
        self.highest = n;
        self.next = n.saturating_add(1);
        std::mem::take(&mut self.gap)
            .into_iter()
            .filter_map(|(n, certain)| certain.then_some(n))
            .collect()
    }

    /// Every permitted region holds nothing of `n`.
    fn absent(&mut self, n: u32) {
        self.gap.push((n, true));
        self.next = n.saturating_add(1);
    }

    /// No region that could be asked holds `n`, and one could not be
    /// asked: it may hold it.
    fn unreachable(&mut self, n: u32) {
        self.first_unreachable.get_or_insert(n);
        self.gap.push((n, false));
        self.next = n.saturating_add(1);
    }

    /// The last number found (`last` if none).
    fn highest(&self) -> u32 {
        self.highest
    }

    /// New utterances are numbered after this: the last found, and any a
    /// region could not be asked about (it may hold them).
    fn numbered_after(&self) -> u32 {
        self.gap
            .iter()
            .filter(|(_, certain)| !certain)
            .map(|(n, _)| *n)
            .fold(self.highest, u32::max)
    }

    /// Where a later resume should start to ask again, if a region could
    /// not be asked: just before the first number it was not asked about.
    fn resume_again_after(&self) -> Option<u32> {
        self.first_unreachable.map(|n| n - 1)
    }
}

/// What an utterance task returns.
struct Outcome {
    number: u32,
    segment: Segment,
    /// From the cut to the region's answer (not to delivery, which waits
    /// for earlier utterances).
    latency: Duration,
    result: Result<Answer, UplinkError>,
}

struct Session {
    edge: Arc<EdgeInner>,
    id: uuid::Uuid,
    params: ListenParams,
    vad: VadStream,
    endpointer: Endpointer,
    /// Samples not yet fed to the VAD (less than one window).
    pending: Vec<f32>,
    /// Samples fed to the VAD so far: the session's audio clock.
    processed: u64,
    /// Retained s16le audio, starting at sample `audio_base`.
    audio: Vec<u8>,
    audio_base: u64,
    next_utterance: u32,
    inflight: FuturesOrdered<JoinHandle<Outcome>>,
    /// The session was told its translation target is unavailable (one
    /// `translation_unavailable` per session).
    translation_refused: bool,
    /// Client audio to 16 kHz mono.
    converter: ToMono16k,
    clock: SessionClock,
    /// The utterance whose `speech_started` was sent last (0: none).
    announced: u32,
    /// The last utterance whose final (or error) was sent (0: none).
    delivered: u32,
    /// The partial in flight, if any (at most one per session).
    partial: Option<PartialAsk>,
    /// When the next partial is due.
    cadence: crate::partials::Cadence,
    /// This session among the edge's live ones.
    live: LiveGuard,
    /// The highest utterance an earlier connection of this session on this
    /// edge cut (0: none).
    earlier_cut: u32,
    _permit: OwnedSemaphorePermit,
}

/// A partial asked of the edge's partials threads.
struct PartialAsk {
    utterance: u32,
    /// Seconds of the utterance's audio it reads.
    audio: f64,
    answer: crate::partials::Answer,
}

/// The next answer of the partial in flight (pending forever without one;
/// the select guards on it).
async fn partial_answer(
    ask: &mut Option<PartialAsk>,
) -> (u32, f64, Result<crate::partials::Reading, String>) {
    match ask {
        Some(a) => {
            let result = (&mut a.answer)
                .await
                .unwrap_or_else(|_| Err("the partials thread went away".into()));
            (a.utterance, a.audio, result)
        }
        None => std::future::pending().await,
    }
}

/// Runs one session to completion. `permit` is its place under the edge's
/// session limit, taken before the upgrade.
pub async fn run(
    mut socket: WebSocket,
    query: Vec<(String, String)>,
    edge: Arc<EdgeInner>,
    permit: OwnedSemaphorePermit,
) {
    let params = match parse_params(&query) {
        Ok(p) => p,
        Err(refusal) => {
            refuse(&mut socket, &edge, refusal).await;
            return;
        }
    };
    let converter = match ToMono16k::new(params.sample_rate, usize::from(params.channels)) {
        Ok(c) => c,
        Err(e) => {
            let refusal = (
                ClientErrorCode::UnsupportedSampleRate,
                e.to_string(),
                close::UNSUPPORTED,
            );
            refuse(&mut socket, &edge, refusal).await;
            return;
        }
    };
    let resuming = params.resume.is_some();
    let id = params.resume.map_or_else(uuid::Uuid::new_v4, |(id, _)| id);
    let wait = Duration::from_millis(edge.config.limits.drain_timeout_ms);
    let (live, earlier_cut) = enter(&edge, id, resuming, wait).await;
    let span = tracing::info_span!("session", session = %id, edge = %edge.name, resumed = resuming);
    let limits = &edge.config.limits;
    let clock = SessionClock::new(
        Instant::now(),
        Duration::from_millis(limits.idle_timeout_ms),
        Duration::from_millis(limits.max_session_ms),
    );
    let mut session = Session {
        endpointer: Endpointer::new(edge.config.endpoint()),
        edge: edge.clone(),
        id,
        params,
        vad: VadStream::default(),
        pending: Vec::new(),
        processed: 0,
        audio: Vec::new(),
        audio_base: 0,
        next_utterance: 1,
        inflight: FuturesOrdered::new(),
        translation_refused: false,
        converter,
        clock,
        announced: 0,
        delivered: 0,
        partial: None,
        cadence: Default::default(),
        live,
        earlier_cut,
        _permit: permit,
    };
    edge.metrics.sessions.inc();
    edge.metrics.sessions_active.inc();
    session.serve(socket).instrument(span).await;
    edge.metrics.sessions_active.dec();
}

async fn refuse(socket: &mut WebSocket, edge: &EdgeInner, (code, message, close_code): Refusal) {
    edge.metrics
        .client_errors
        .get_or_create(&CodeLabel {
            code: code.as_str(),
        })
        .inc();
    tracing::info!(code = code.as_str(), "session refused");
    let msg = ServerMessage::Error(ErrorMessage::new(code, message, true));
    let _ = socket.send(Message::Text(msg.to_json().into())).await;
    close_socket(socket, close_code, code.as_str()).await;
}

/// Sends a close frame and reads until the peer's close (bounded), so the
/// client sees a clean close with our code rather than 1006.
async fn close_socket(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while socket.recv().await.is_some() {}
    })
    .await;
}

/// How the main loop ended.
enum End {
    /// Close with this code and reason after the pending finals; tell the
    /// client first with a `closing` message of this reason, if any.
    Close(u16, &'static str, Option<&'static str>),
    /// The client is gone; nothing more can be sent.
    Gone,
}

impl Session {
    fn info(&self) -> ServerMessage {
        ServerMessage::Session(SessionInfo {
            session: self.id.to_string(),
            edge: self.edge.name.clone(),
            jurisdiction: self.edge.jurisdiction.clone(),
            regions: self.edge.regions.clone(),
            sample_rate: self.params.sample_rate,
            encoding: self.params.encoding.as_str().to_owned(),
            channels: self.params.channels,
            language: self.params.language.clone(),
            translate: self.params.translate.clone(),
            partials: self.partials_on(),
            resumed_after: self.params.resume.map(|(_, last)| last),
        })
    }

    fn partials_on(&self) -> bool {
        self.params.partials && self.edge.partials.is_some()
    }

    /// Takes `target` as the session's translation target if the edge
    /// offers it; otherwise the session goes on without translations and
    /// this returns the message of the one `translation_unavailable` the
    /// client gets for it.
    fn choose_translation(&mut self, target: Option<String>) -> Option<String> {
        self.translation_refused = false;
        self.params.translate = None;
        let target = target?;
        let targets = &self.edge.config.translation.targets;
        if targets.contains(&target) {
            self.params.translate = Some(target);
            return None;
        }
        self.translation_refused = true;
        Some(format!(
            "no model translates into {target:?} (available: {}); finals come without translations",
            targets.join(", ")
        ))
    }

    /// Applies a `config` message to the utterances that start after it and
    /// answers with the session's settings as they now are.
    async fn configure(
        &mut self,
        socket: &mut WebSocket,
        change: ConfigChange,
    ) -> Result<(), axum::Error> {
        if let Some(language) = change.language {
            self.params.language = language;
        }
        let refused = change.translate.and_then(|t| self.choose_translation(t));
        tracing::info!(
            language = ?self.params.language,
            translate = ?self.params.translate,
            "session reconfigured"
        );
        self.send(socket, self.info()).await?;
        match refused {
            Some(message) => {
                self.send_error(
                    socket,
                    ClientErrorCode::TranslationUnavailable,
                    message,
                    false,
                )
                .await
            }
            None => Ok(()),
        }
    }

    async fn serve(&mut self, mut socket: WebSocket) {
        let edge = self.edge.clone();
        let requested = self.params.translate.take();
        let refused = self.choose_translation(requested);
        if socket
            .send(Message::Text(self.info().to_json().into()))
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(
            encoding = self.params.encoding.as_str(),
            sample_rate = self.params.sample_rate,
            channels = self.params.channels,
            "session started"
        );
        if let Some(message) = refused {
            // One error for the session; its finals still come.
            let code = ClientErrorCode::TranslationUnavailable;
            if self
                .send_error(&mut socket, code, message, false)
                .await
                .is_err()
            {
                return;
            }
        }
        if let Some((_, last)) = self.params.resume
            && (self.live.takeover.is_cancelled() || self.replay(&mut socket, last).await.is_err())
        {
            self.left().await;
            return;
        }

        let max_pending = edge.config.limits.max_pending_utterances;
        let end = loop {
            let can_read = self.inflight.len() < max_pending;
            // A client waiting for finals it is owed (or held back by
            // backpressure) is not idle; its idle time starts again at the
            // last final.
            let owed = !self.inflight.is_empty();
            // Checked before waiting, so that a client sending without
            // pause cannot keep the session past its limits.
            if let Some(expiry) = self.clock.expired(Instant::now(), owed) {
                break self.expire(&mut socket, expiry).await;
            }
            let deadline = self.clock.deadline(owed);
            tokio::select! {
                biased;
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if self.deliver(&mut socket, done).await.is_err() {
                        break End::Gone;
                    }
                    self.clock.resume(Instant::now());
                }
                _ = edge.shutdown.cancelled() => {
                    break End::Close(close::GOING_AWAY, "edge shutting down", Some("shutting_down"));
                }
                _ = self.live.takeover.cancelled() => {
                    tracing::info!("a resume took the session over; this connection stops");
                    break End::Gone;
                }
                (utterance, audio, result) = partial_answer(&mut self.partial), if self.partial.is_some() => {
                    self.partial = None;
                    if self.on_partial(&mut socket, utterance, audio, result).await.is_err() {
                        break End::Gone;
                    }
                }
                msg = socket.recv(), if can_read => {
                    match msg {
                        None | Some(Ok(Message::Close(_))) => break End::Gone,
                        Some(Ok(Message::Binary(data))) => {
                            let arrived = Instant::now();
                            self.clock.input(arrived);
                            if let Err(e) = self.on_audio(&mut socket, data).await {
                                break e;
                            }
                            edge.metrics.frame_seconds.observe(arrived.elapsed().as_secs_f64());
                        }
                        Some(Ok(Message::Text(text))) => {
                            let sent = match parse_client_message(&text) {
                                Ok(ClientMessage::Finalize) => {
                                    self.finalize();
                                    Ok(())
                                }
                                Ok(ClientMessage::KeepAlive) => {
                                    self.clock.input(Instant::now());
                                    Ok(())
                                }
                                Ok(ClientMessage::Config(change)) => self.configure(&mut socket, change).await,
                                Ok(ClientMessage::Close) => break End::Close(close::NORMAL, "session closed", None),
                                Err(err) => self.send_counted(&mut socket, err).await,
                            };
                            if sent.is_err() {
                                break End::Gone;
                            }
                        }
                        // Pings are answered by the WebSocket layer; they do
                        // not keep the session open.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Err(e)) => {
                            let (code, close_code, msg) = if is_too_large(&e) {
                                (ClientErrorCode::FrameTooLarge, close::TOO_BIG, format!(
                                    "frame exceeds {} bytes: send audio in smaller chunks (e.g. 100 ms)",
                                    edge.config.limits.max_frame_bytes
                                ))
                            } else {
                                (ClientErrorCode::ProtocolError, close::PROTOCOL, format!("websocket error: {e}"))
                            };
                            tracing::info!(code = code.as_str(), "client protocol error");
                            let _ = self.send_error(&mut socket, code, msg, true).await;
                            break End::Close(close_code, code.as_str(), None);
                        }
                    }
                }
                // Checked at the top of the loop; input that is already
                // there wins over a deadline that falls due with it.
                _ = tokio::time::sleep_until(deadline) => {}
            }
        };

        match end {
            End::Gone => self.left().await,
            End::Close(code, reason, closing) => {
                // Nothing accepted is lost: cut what is left, say how much
                // was read (when the edge is the one closing), deliver every
                // pending final, then close.
                self.finalize();
                if let Some(why) = closing {
                    let closing = ServerMessage::Closing(earshot_common::client::ClosingMessage {
                        reason: why.into(),
                        audio_accepted: self.processed as f64 / f64::from(wire::SAMPLE_RATE),
                    });
                    if self.send(&mut socket, closing).await.is_err() {
                        return;
                    }
                }
                let drain = Duration::from_millis(edge.config.limits.drain_timeout_ms);
                let deadline = Instant::now() + drain;
                while let Some(done) = tokio::select! {
                    d = self.inflight.next() => d,
                    _ = tokio::time::sleep_until(deadline) => None,
                } {
                    if self.deliver(&mut socket, done).await.is_err() {
                        return;
                    }
                }
                let undelivered = self.inflight.len();
                if undelivered > 0 {
                    let msg = format!(
                        "{undelivered} utterances did not finish within the {} ms drain",
                        drain.as_millis()
                    );
                    let _ = self
                        .send_error(&mut socket, ClientErrorCode::ShuttingDown, msg, true)
                        .await;
                }
                close_socket(&mut socket, code, reason).await;
                tracing::info!(reason, "session closed");
            }
        }
    }

    /// The client is gone (it may resume): the utterance in progress is cut
    /// and every pending one finished at its region (bounded by the
    /// drain), so a resume finds their finals there.
    async fn left(&mut self) {
        self.finalize();
        let abandoned = self.inflight.len() as u64;
        if abandoned == 0 {
            return;
        }
        self.edge.metrics.utterances_abandoned.inc_by(abandoned);
        tracing::info!(
            abandoned,
            "client left with utterances pending; finishing them for a resume"
        );
        let drain = Duration::from_millis(self.edge.config.limits.drain_timeout_ms);
        let _ = tokio::time::timeout(drain, async {
            while self.inflight.next().await.is_some() {}
        })
        .await;
    }

    /// Sends the finals after utterance `last` that the permitted regions
    /// hold for this session, in order, each once; new utterances are
    /// numbered after the last one found. A number no region holds, with a
    /// later one found, was lost before it reached a region (the old
    /// connection dropped while it was being sent): it gets
    /// `utterance_failed`. After [`RESUME_GAP`] numbers in a row that no
    /// region holds, there are no more.
    async fn replay(&mut self, socket: &mut WebSocket, last: u32) -> Result<(), axum::Error> {
        let started = Instant::now();
        let mut scan = ResumeScan::new(last);
        let mut unreachable: Vec<crate::uplink::Attempt> = Vec::new();
        let mut replayed = 0u64;
        self.edge.metrics.resumes.inc();
        while let Some(n) = scan.ask() {
            let header = Header {
                session: *self.id.as_bytes(),
                utterance: n,
                jurisdiction: self.edge.jurisdiction.clone(),
                edge: self.edge.name.clone(),
                language: String::new(),
                translate: String::new(),
                timestamps: self.params.timestamps,
                words: self.params.words,
                resume: true,
                span: None,
                sample_rate: wire::SAMPLE_RATE,
            };
            let asked = Instant::now();
            match self.edge.uplink.fetch(&header).await {
                Ok(Fetched::Found(answer)) => {
                    for lost in scan.found(n) {
                        let mut msg = ErrorMessage::new(
                            ClientErrorCode::UtteranceFailed,
                            "this utterance did not reach a region before the connection dropped: send its audio again",
                            false,
                        );
                        msg.utterance = Some(lost);
                        self.send_counted(socket, msg).await?;
                    }
                    let (start, end) = answer.fin.span.unwrap_or((0, 0));
                    let segment = Segment {
                        start: u64::from(start) * 16,
                        end: u64::from(end) * 16,
                        forced: false,
                    };
                    let outcome = Outcome {
                        number: n,
                        segment,
                        latency: asked.elapsed(),
                        result: Ok(*answer),
                    };
                    self.deliver(socket, Ok(outcome)).await?;
                    replayed += 1;
                }
                Ok(Fetched::NotFound) => scan.absent(n),
                Ok(Fetched::Unreachable(attempts)) => {
                    scan.unreachable(n);
                    unreachable = attempts;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot ask the regions for a resumed final");
                    break;
                }
            }
        }
        self.edge.metrics.resumed_finals.inc_by(replayed);
        let highest = scan.highest();
        // After the last found, anything a region could not be asked
        // about, and anything an earlier connection on this edge cut (it
        // may still be on its way to a region).
        self.next_utterance = scan
            .numbered_after()
            .max(self.earlier_cut)
            .saturating_add(1);
        self.delivered = highest;
        tracing::info!(
            last,
            replayed,
            took_ms = started.elapsed().as_millis() as u64,
            "session resumed"
        );
        if let Some(again) = scan.resume_again_after() {
            let problems: Vec<String> = unreachable
                .iter()
                .map(|a| format!("{}: {}", a.region, a.problem))
                .collect();
            let message = format!(
                "could not ask every permitted region for this session's finals ({}); finals after utterance {again} may be missing: resume again later with last={again} (finals after it that came now come again)",
                problems.join("; ")
            );
            self.send_error(socket, ClientErrorCode::ResumeIncomplete, message, false)
                .await?;
        }
        Ok(())
    }

    /// The edge's own `stage` failed on this session's audio: logged, the
    /// client told (`protocol_error`, fatal), the session closed with 1011.
    async fn internal_failure(
        &self,
        socket: &mut WebSocket,
        stage: &str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> End {
        tracing::error!(%error, stage, "session failed on the edge");
        let msg = format!("{stage} failed on this edge");
        let _ = self
            .send_error(socket, ClientErrorCode::ProtocolError, msg, true)
            .await;
        End::Close(close::INTERNAL, "edge failure", None)
    }

    /// Tells the client why its time is up; how the session then ends.
    async fn expire(&mut self, socket: &mut WebSocket, expiry: Expiry) -> End {
        let (code, msg, end) = match expiry {
            Expiry::Idle => (
                ClientErrorCode::IdleTimeout,
                format!(
                    "no audio or keepalive for {} ms: the session is closed",
                    self.clock.idle_timeout().as_millis()
                ),
                End::Close(close::NORMAL, "idle timeout", None),
            ),
            Expiry::TooLong => (
                ClientErrorCode::SessionTooLong,
                format!(
                    "the session reached this edge's maximum length of {} s: pending finals follow, then the session closes; reconnect to go on",
                    self.clock.max_length().as_secs()
                ),
                End::Close(close::NORMAL, "session too long", Some("session_too_long")),
            ),
        };
        match self.send_error(socket, code, msg, true).await {
            Ok(()) => end,
            Err(_) => End::Gone,
        }
    }

    async fn on_audio(&mut self, socket: &mut WebSocket, data: Bytes) -> Result<(), End> {
        let bps = self.params.encoding.bytes_per_sample();
        let frame = bps * usize::from(self.params.channels);
        if !data.len().is_multiple_of(frame) {
            let msg = format!(
                "binary frame of {} bytes is not a whole number of {frame}-byte frames ({} × {bps}-byte {} samples): the frame was dropped",
                data.len(),
                self.params.channels,
                self.params.encoding.as_str()
            );
            return self
                .send_error(socket, ClientErrorCode::InvalidAudioFrame, msg, false)
                .await
                .map_err(|_| End::Gone);
        }
        self.edge
            .metrics
            .audio_received_seconds
            .inc_by((data.len() / frame) as f64 / f64::from(self.params.sample_rate));
        // 16 kHz mono s16le passes through byte for byte; anything else is
        // converted, and what the region gets is the 16-bit rendering of
        // the converted audio.
        let s16: Vec<u8> = if self.converter.is_identity() {
            match self.params.encoding {
                Encoding::PcmS16le => data.to_vec(),
                Encoding::PcmF32le => f32le_to_s16le(&data),
            }
        } else {
            let samples = match self.params.encoding {
                Encoding::PcmS16le => s16le_to_f32(&data),
                Encoding::PcmF32le => f32le_to_f32(&data),
            };
            match self.converter.push(&samples) {
                Ok(mono) => f32_to_s16le(&mono),
                Err(e) => return Err(self.internal_failure(socket, "resampling", &e).await),
            }
        };
        let samples = s16le_to_f32(&s16);
        self.audio.extend_from_slice(&s16);
        self.pending.extend_from_slice(&samples);

        let whole = self.pending.len() / WINDOW * WINDOW;
        if whole == 0 {
            return Ok(());
        }
        let windows: Vec<f32> = self.pending.drain(..whole).collect();
        let probabilities = match self.edge.vad.probabilities(&mut self.vad, windows).await {
            Ok(p) => p,
            Err(e) => return Err(self.internal_failure(socket, "voice detection", &e).await),
        };
        let mut started = Vec::new();
        for prob in probabilities {
            let start = self.processed;
            self.processed += WINDOW as u64;
            if let Some(segment) = self.endpointer.push(prob, start, self.processed) {
                self.dispatch(segment);
            }
            if let Some(at) = self.endpointer.speech_start()
                && self.announced != self.next_utterance
            {
                self.announced = self.next_utterance;
                started.push(SpeechStartedMessage {
                    utterance: self.next_utterance,
                    start: at as f64 / f64::from(wire::SAMPLE_RATE),
                });
            }
        }
        self.ask_partial();
        self.trim();
        for msg in started {
            self.send(socket, ServerMessage::SpeechStarted(msg))
                .await
                .map_err(|_| End::Gone)?;
        }
        Ok(())
    }

    /// Asks for a partial of the open utterance when one is due: a cadence
    /// of new speech since the last ask, none in flight. Busy threads mean
    /// this one is skipped (and counted), not queued.
    fn ask_partial(&mut self) {
        let Some(partials) = self.edge.partials.as_ref() else {
            return;
        };
        let Some(start) = self.endpointer.speech_start() else {
            return;
        };
        if !self.params.partials || self.partial.is_some() {
            return;
        }
        let utterance = self.next_utterance;
        if !self
            .cadence
            .due(utterance, start, self.processed, partials.cadence_samples())
        {
            return;
        }
        let from = (start.max(self.audio_base) - self.audio_base) as usize * 2;
        let to = ((self.processed - self.audio_base) as usize * 2).min(self.audio.len());
        let Some(bytes) = self.audio.get(from..to) else {
            return;
        };
        let pcm = s16le_to_f32(bytes);
        let audio = pcm.len() as f64 / f64::from(wire::SAMPLE_RATE);
        match partials.ask(pcm, self.params.language.clone()) {
            Some(answer) => {
                self.partial = Some(PartialAsk {
                    utterance,
                    audio,
                    answer,
                });
            }
            None => self.skip_partial("busy"),
        }
    }

    fn skip_partial(&self, reason: &'static str) {
        self.edge
            .metrics
            .partials_skipped
            .get_or_create(&crate::metrics::ReasonLabel { reason })
            .inc();
    }

    /// Sends a partial's text, unless its utterance's final went first.
    async fn on_partial(
        &mut self,
        socket: &mut WebSocket,
        utterance: u32,
        audio: f64,
        result: Result<crate::partials::Reading, String>,
    ) -> Result<(), axum::Error> {
        let reading = match result {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(%error, utterance, "partial failed");
                self.skip_partial("failed");
                return Ok(());
            }
        };
        if utterance <= self.delivered {
            self.skip_partial("stale");
            return Ok(());
        }
        let text = reading.text.trim();
        if text.is_empty() {
            return Ok(());
        }
        tracing::debug!(
            utterance,
            compute_ms = reading.compute.as_millis() as u64,
            text = %earshot_common::telemetry::content(text),
            "partial"
        );
        self.edge.metrics.partials.inc();
        let msg = earshot_common::client::PartialMessage {
            utterance,
            text: text.to_owned(),
            audio,
        };
        self.send(socket, ServerMessage::Partial(msg)).await
    }

    fn finalize(&mut self) {
        if let Some(segment) = self.endpointer.finalize(self.processed) {
            self.dispatch(segment);
        }
        self.trim();
    }

    /// Drops audio no utterance can need any more.
    fn trim(&mut self) {
        let keep_from = self.endpointer.retain_from(self.processed);
        let drop_samples = keep_from.saturating_sub(self.audio_base);
        let drop_bytes = (drop_samples as usize * 2).min(self.audio.len());
        self.audio.drain(..drop_bytes);
        self.audio_base += (drop_bytes / 2) as u64;
    }

    /// Cuts `segment` out of the retained audio and sends it to a region.
    fn dispatch(&mut self, mut segment: Segment) {
        let from = (segment.start.saturating_sub(self.audio_base) as usize) * 2;
        let to = (segment.end.saturating_sub(self.audio_base) as usize) * 2;
        let Some(pcm) = self.audio.get(from..to.min(self.audio.len())) else {
            tracing::error!(
                ?segment,
                base = self.audio_base,
                "segment outside retained audio; dropped"
            );
            return;
        };
        if segment.start < self.audio_base {
            tracing::error!(
                ?segment,
                base = self.audio_base,
                "segment starts before retained audio"
            );
            // What is sent starts at the retained audio: so do the final's
            // times (and its segments').
            segment.start = self.audio_base;
        }
        let audio = Bytes::copy_from_slice(pcm);
        let audio_sha256: [u8; 32] = Sha256::digest(&audio).into();
        let number = self.next_utterance;
        self.next_utterance += 1;
        self.live
            .dispatched
            .fetch_max(number, std::sync::atomic::Ordering::Release);
        let header = Header {
            session: *self.id.as_bytes(),
            utterance: number,
            jurisdiction: self.edge.jurisdiction.clone(),
            edge: self.edge.name.clone(),
            language: self.params.language.clone().unwrap_or_default(),
            translate: self.params.translate.clone().unwrap_or_default(),
            timestamps: self.params.timestamps,
            words: self.params.words,
            resume: false,
            span: Some((samples_to_ms(segment.start), samples_to_ms(segment.end))),
            sample_rate: wire::SAMPLE_RATE,
        };
        let uplink = self.edge.uplink.clone();
        let cut_at = Instant::now();
        tracing::debug!(
            utterance = number,
            start = segment.start,
            end = segment.end,
            forced = segment.forced,
            "utterance cut"
        );
        let span = tracing::info_span!("utterance", utterance = number);
        let task = tokio::spawn(
            async move {
                let result = uplink.transcribe(&header, &audio, audio_sha256).await;
                Outcome {
                    number,
                    segment,
                    latency: cut_at.elapsed(),
                    result,
                }
            }
            .instrument(span),
        );
        self.inflight.push_back(task);
    }

    async fn deliver(
        &mut self,
        socket: &mut WebSocket,
        done: Result<Outcome, tokio::task::JoinError>,
    ) -> Result<(), axum::Error> {
        let metrics = &self.edge.metrics;
        let outcome = match done {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "utterance task failed");
                let msg = ErrorMessage::new(
                    ClientErrorCode::UtteranceFailed,
                    "internal error on the edge",
                    false,
                );
                return self.send(socket, ServerMessage::Error(msg)).await;
            }
        };
        self.delivered = self.delivered.max(outcome.number);
        match outcome.result {
            Ok(answer) => {
                metrics
                    .utterances
                    .get_or_create(&RegionOutcome {
                        region: answer.region.clone(),
                        outcome: "final",
                    })
                    .inc();
                let latency = outcome.latency;
                metrics
                    .utterance_latency
                    .get_or_create(&RegionLabel {
                        region: answer.region.clone(),
                    })
                    .observe(latency.as_secs_f64());
                tracing::info!(
                    utterance = outcome.number,
                    region = %answer.region,
                    inference_us = answer.fin.inference_us,
                    text = %earshot_common::telemetry::content(&answer.fin.text),
                    "final"
                );
                let Delivered {
                    fin: final_message,
                    translation,
                    unavailable,
                } = to_client(
                    outcome.number,
                    outcome.segment,
                    latency,
                    answer,
                    self.params.timestamps,
                    self.params.words,
                );
                if let Err(why) = self.check_receipt(&final_message) {
                    let mut msg = ErrorMessage::new(
                        ClientErrorCode::UtteranceFailed,
                        format!(
                            "region {}'s final was withheld: {why}",
                            final_message.region
                        ),
                        false,
                    );
                    msg.utterance = Some(outcome.number);
                    return self.send(socket, ServerMessage::Error(msg)).await;
                }
                self.send(socket, ServerMessage::Final(final_message))
                    .await?;
                if let Some(t) = translation {
                    self.send(socket, ServerMessage::Translation(t)).await?;
                }
                match unavailable {
                    // The region found no model for the pair: one error for
                    // the session; its finals still come.
                    Some((language, reason)) if !self.translation_refused => {
                        self.translation_refused = true;
                        let message =
                            format!("{reason}; finals come without translations into {language:?}");
                        self.send_error(
                            socket,
                            ClientErrorCode::TranslationUnavailable,
                            message,
                            false,
                        )
                        .await
                    }
                    _ => Ok(()),
                }
            }
            Err(e) => {
                metrics
                    .utterances
                    .get_or_create(&RegionOutcome {
                        region: match &e {
                            UplinkError::Refused { region, .. } => region.clone(),
                            _ => "none".into(),
                        },
                        outcome: "error",
                    })
                    .inc();
                let (code, retry_after) = match &e {
                    UplinkError::Refused { .. } => (ClientErrorCode::UtteranceFailed, None),
                    UplinkError::Unavailable { retry_after, .. } => (
                        ClientErrorCode::Unavailable,
                        Some(retry_after.as_secs_f64().ceil() as u32),
                    ),
                    UplinkError::Encode(_) => (ClientErrorCode::UtteranceFailed, None),
                };
                tracing::warn!(utterance = outcome.number, error = %e, "utterance failed");
                let mut msg = ErrorMessage::new(code, e.to_string(), false);
                msg.utterance = Some(outcome.number);
                msg.retry_after = retry_after;
                metrics
                    .client_errors
                    .get_or_create(&CodeLabel {
                        code: code.as_str(),
                    })
                    .inc();
                self.send(socket, ServerMessage::Error(msg)).await
            }
        }
    }

    fn check_receipt(&self, fin: &FinalMessage) -> Result<(), String> {
        check_receipt(&self.edge, fin, &self.id.to_string())
    }

    async fn send_error(
        &self,
        socket: &mut WebSocket,
        code: ClientErrorCode,
        message: String,
        fatal: bool,
    ) -> Result<(), axum::Error> {
        self.edge
            .metrics
            .client_errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
        self.send(
            socket,
            ServerMessage::Error(ErrorMessage::new(code, message, fatal)),
        )
        .await
    }

    /// Sends an error the codec produced, counted by its code.
    async fn send_counted(
        &self,
        socket: &mut WebSocket,
        err: ErrorMessage,
    ) -> Result<(), axum::Error> {
        self.edge
            .metrics
            .client_errors
            .get_or_create(&CodeLabel {
                code: err.code.as_str(),
            })
            .inc();
        self.send(socket, ServerMessage::Error(err)).await
    }

    async fn send(&self, socket: &mut WebSocket, msg: ServerMessage) -> Result<(), axum::Error> {
        socket.send(Message::Text(msg.to_json().into())).await
    }
}

/// A region's answer as the client sees it.
pub(crate) struct Delivered {
    pub fin: FinalMessage,
    pub translation: Option<TranslationMessage>,
    /// The region found no model for the session's translation pair:
    /// `(target, reason)`.
    pub unavailable: Option<(String, String)>,
}

/// The final (and translation) of utterance `number`, cut at `segment` of
/// the session's audio, answered `latency` after the cut; `segments` and
/// `words` when the session asked for them.
pub(crate) fn to_client(
    number: u32,
    segment: Segment,
    latency: Duration,
    answer: Answer,
    timestamps: bool,
    words: bool,
) -> Delivered {
    let seconds = |s: u64| s as f64 / f64::from(wire::SAMPLE_RATE);
    let language = (!answer.fin.language.is_empty()).then(|| answer.fin.language.clone());
    let language_probability =
        (answer.fin.language_probability >= 0.0).then_some(answer.fin.language_probability);
    let mut unavailable = None;
    let translation = match answer.fin.translation {
        Some(Translated::Text(t)) => Some(TranslationMessage {
            utterance: number,
            language: t.language,
            text: t.text,
        }),
        Some(Translated::Unavailable { language, reason }) => {
            unavailable = Some((language, reason));
            None
        }
        None => None,
    };
    let receipt = answer
        .fin
        .receipt
        .as_deref()
        .map(|r| Box::new(earshot_common::receipt::to_message(r)));
    let start = seconds(segment.start);
    let fin = FinalMessage {
        utterance: number,
        text: answer.fin.text,
        region: answer.region,
        model: answer.fin.model,
        start,
        end: seconds(segment.end),
        audio_sha256: hex(&answer.fin.audio_sha256),
        latency_ms: micros_to_ms(latency.as_micros() as u64),
        queue_ms: micros_to_ms(answer.fin.queue_us.into()),
        inference_ms: micros_to_ms(answer.fin.inference_us.into()),
        language,
        language_probability,
        segments: timestamps.then(|| in_session(answer.fin.segments, start)),
        words: words.then(|| in_session(answer.fin.words, start)),
        receipt,
    };
    Delivered {
        fin,
        translation,
        unavailable,
    }
}

/// The receipt on `fin` verifies against the CA and topology, for a
/// session of the edge's jurisdiction, and names `session` and this edge;
/// every outcome is counted. A final that fails is not delivered.
pub(crate) fn check_receipt(
    edge: &EdgeInner,
    fin: &FinalMessage,
    session: &str,
) -> Result<(), String> {
    let checked = edge
        .receipts
        .verify(fin, Some(&edge.jurisdiction))
        .map_err(|f| (f.code(), f.to_string()))
        .and_then(|()| {
            let claims = fin.receipt.as_ref().map(|r| &r.claims);
            match claims {
                Some(c) if c.session == session && c.edge == edge.name => Ok(()),
                _ => Err(("mismatch", "the receipt names another session".to_owned())),
            }
        });
    let outcome = match &checked {
        Ok(()) => "verified",
        Err((code, _)) => *code,
    };
    edge.metrics
        .receipts
        .get_or_create(&ReceiptLabel {
            region: fin.region.clone(),
            outcome,
        })
        .inc();
    checked.map_err(|(code, why)| {
        tracing::error!(region = %fin.region, %code, %why, "final withheld: its receipt does not verify");
        why
    })
}

/// 16 kHz samples as milliseconds (saturating: a session is at most
/// `limits.max_session_ms` long).
fn samples_to_ms(samples: u64) -> u32 {
    u32::try_from(samples / 16).unwrap_or(u32::MAX)
}

/// Whether a receive error is the message-size limit.
fn is_too_large(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_));
        }
        source = s.source();
    }
    false
}

/// Spans (segments or words) of an utterance that began `offset` seconds
/// into the session, in session seconds.
fn in_session(spans: Vec<wire::Segment>, offset: f64) -> Vec<SegmentMessage> {
    spans
        .into_iter()
        .map(|s| SegmentMessage {
            start: offset + f64::from(s.start_ms) / 1e3,
            end: offset + f64::from(s.end_ms) / 1e3,
            text: s.text,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_resume_scan_reports_lost_numbers_and_stops_after_a_gap() {
        let mut scan = ResumeScan::new(1);
        assert_eq!(scan.ask(), Some(2));
        assert!(scan.found(2).is_empty());
        assert_eq!(scan.ask(), Some(3));
        scan.absent(3);
        // 3 is held nowhere but 4 is: 3 was lost.
        assert_eq!(scan.ask(), Some(4));
        assert_eq!(scan.found(4), [3]);
        for n in 5..5 + RESUME_GAP as u32 {
            assert_eq!(scan.ask(), Some(n));
            scan.absent(n);
        }
        // Three in a row held nowhere: no more, and 5..7 are not lost
        // (they never existed).
        assert_eq!(scan.ask(), None);
        assert_eq!(scan.highest(), 4);
        // Nothing after `last`: new utterances follow `last`.
        let mut empty = ResumeScan::new(9);
        for _ in 0..RESUME_GAP {
            let n = empty.ask().unwrap();
            empty.absent(n);
        }
        assert_eq!((empty.ask(), empty.highest()), (None, 9));
        assert_eq!(
            (scan.numbered_after(), scan.resume_again_after()),
            (4, None)
        );
        // A number a region could not be asked about is not called lost,
        // new utterances are numbered after it, and a later resume starts
        // before it.
        let mut scan = ResumeScan::new(0);
        scan.unreachable(1);
        scan.absent(2);
        assert_eq!(scan.found(3), [2]);
        scan.unreachable(4);
        scan.absent(5);
        scan.absent(6);
        assert_eq!(scan.ask(), None);
        assert_eq!(scan.numbered_after(), 4);
        assert_eq!(scan.resume_again_after(), Some(0));
        // The numbers cannot run past u32::MAX.
        let mut top = ResumeScan::new(u32::MAX - 1);
        let n = top.ask().unwrap();
        assert!(top.found(n).is_empty());
        assert_eq!(top.ask(), None);
    }

    #[test]
    fn defaults_apply_without_parameters() {
        assert_eq!(
            parse_params(&[]).unwrap(),
            ListenParams {
                sample_rate: 16_000,
                encoding: Encoding::PcmS16le,
                channels: 1,
                language: None,
                translate: None,
                timestamps: false,
                words: false,
                partials: true,
                resume: None,
            }
        );
        let p = parse_params(&q(&[
            ("encoding", "pcm_f32le"),
            ("sample_rate", "44100"),
            ("channels", "2"),
            ("language", "de"),
            ("timestamps", "true"),
            ("words", "true"),
            ("partials", "false"),
        ]))
        .unwrap();
        assert!(!p.partials);
        assert_eq!(p.encoding, Encoding::PcmF32le);
        assert_eq!((p.sample_rate, p.channels), (44_100, 2));
        assert_eq!(p.language.as_deref(), Some("de"));
        assert!(p.timestamps && p.words);
    }

    #[test]
    fn bad_parameters_get_stable_codes() {
        let code = |pairs: &[(&str, &str)]| parse_params(&q(pairs)).unwrap_err().0;
        assert_eq!(
            code(&[("sample_rate", "11025")]),
            ClientErrorCode::UnsupportedSampleRate
        );
        assert_eq!(
            code(&[("channels", "6")]),
            ClientErrorCode::UnsupportedChannels
        );
        assert_eq!(code(&[("channels", "two")]), ClientErrorCode::InvalidQuery);
        assert_eq!(
            code(&[("sample_rate", "fast")]),
            ClientErrorCode::InvalidQuery
        );
        assert_eq!(
            code(&[("encoding", "opus")]),
            ClientErrorCode::UnsupportedEncoding
        );
        assert_eq!(
            code(&[("language", "English")]),
            ClientErrorCode::InvalidQuery
        );
        assert_eq!(code(&[("langauge", "en")]), ClientErrorCode::InvalidQuery);
        assert_eq!(code(&[("timestamps", "1")]), ClientErrorCode::InvalidQuery);
        assert_eq!(code(&[("words", "yes")]), ClientErrorCode::InvalidQuery);
        assert_eq!(code(&[("partials", "no")]), ClientErrorCode::InvalidQuery);
        assert_eq!(code(&[("session", "abc")]), ClientErrorCode::InvalidQuery);
        assert_eq!(code(&[("last", "3")]), ClientErrorCode::InvalidQuery);
        let id = "6ea26829-a6cd-4445-bd37-3e8e169d1acc";
        assert_eq!(
            code(&[("session", id), ("last", "-1")]),
            ClientErrorCode::InvalidQuery
        );
        assert_eq!(
            code(&[("session", id), ("last", "4294967294")]),
            ClientErrorCode::InvalidQuery
        );
        let p = parse_params(&q(&[("session", id), ("last", "4")])).unwrap();
        assert_eq!(p.resume, Some((id.parse().unwrap(), 4)));
        let p = parse_params(&q(&[("session", id)])).unwrap();
        assert_eq!(p.resume, Some((id.parse().unwrap(), 0)));
        let (_, msg, close_code) = parse_params(&q(&[("langauge", "en")])).unwrap_err();
        assert!(
            msg.contains("langauge") && msg.contains("language"),
            "{msg}"
        );
        assert_eq!(close_code, close::POLICY);
    }
}
