//! The client↔edge WebSocket protocol: JSON messages on text frames.
//!
//! Binary frames carry audio; text frames carry the control messages below.
//! `docs/protocol.md` has the full description with examples.

use serde::{Deserialize, Serialize};

/// What the edge sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Sent first, and again after each `config` message, with the
    /// session's settings as they now are.
    Session(SessionInfo),
    /// The VAD heard the start of speech: utterance `utterance` begins at
    /// `start` seconds of the session's audio. Its final (or error) follows.
    SpeechStarted(SpeechStartedMessage),
    /// While utterance `utterance` is open (and until its final), the
    /// edge's small model's reading of its audio so far. Each supersedes
    /// the previous one; the final supersedes them all. Best effort: an
    /// edge that is busy skips them.
    Partial(PartialMessage),
    /// One per utterance, in utterance order.
    Final(FinalMessage),
    /// Right after its utterance's final, when the session asked for a
    /// translation.
    Translation(TranslationMessage),
    Error(ErrorMessage),
    /// The edge is closing the session (it is shutting down): it read the
    /// first `audio_accepted` seconds of audio and no more. Every utterance
    /// in them still gets its final or error before the close; audio after
    /// them was not processed: send it again on a new connection.
    Closing(ClosingMessage),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechStartedMessage {
    pub utterance: u32,
    pub start: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialMessage {
    pub utterance: u32,
    pub text: String,
    /// Seconds of the utterance's audio the text covers (from its start).
    pub audio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosingMessage {
    /// `shutting_down` (the edge is stopping) or `session_too_long` (the
    /// session reached the edge's maximum length).
    pub reason: String,
    /// Seconds of the session's audio the edge read.
    pub audio_accepted: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session: String,
    pub edge: String,
    pub jurisdiction: String,
    /// Regions that may process this session, most preferred first.
    pub regions: Vec<String>,
    /// The client's audio as the session reads it (it is resampled to
    /// 16 kHz mono on the edge).
    pub sample_rate: u32,
    pub encoding: String,
    #[serde(default = "one")]
    pub channels: u16,
    /// The language hint; absent: detected per utterance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// The language finals are translated into, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translate: Option<String>,
    /// Whether `partial` messages come (asked with `partials=`, and the
    /// edge has a model for them).
    #[serde(default)]
    pub partials: bool,
    /// Set when this connection resumes session `session` (`session=` and
    /// `last=`): the finals after utterance `resumed_after` that the
    /// regions hold follow, in order, before new ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_after: Option<u32>,
}

fn one() -> u16 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalMessage {
    pub utterance: u32,
    pub text: String,
    pub region: String,
    pub model: String,
    /// Seconds from the start of the session's audio.
    pub start: f64,
    pub end: f64,
    /// SHA-256 (hex) of the 16 kHz s16le PCM the region transcribed.
    pub audio_sha256: String,
    /// Milliseconds from the end of the utterance (the VAD's cut) to its
    /// final reaching the edge (finals of later utterances may then wait
    /// for earlier ones, to keep their order).
    pub latency_ms: f64,
    /// Of which the utterance waited in the region's queue...
    pub queue_ms: f64,
    /// ...and the model ran.
    pub inference_ms: f64,
    /// Language of the speech: the session's hint, or what the model
    /// detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Probability of the detected language; absent when it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language_probability: Option<f32>,
    /// With `timestamps=true`: the text in segments, each with its times
    /// (seconds from the start of the session's audio, like `start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<SegmentMessage>>,
    /// With `words=true`: each word with its times (seconds from the start
    /// of the session's audio), from the alignment heads' cross-attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words: Option<Vec<SegmentMessage>>,
    /// What the region signed for this final: where it was made, for which
    /// session, from which audio and model, and the text's hash
    /// (`earshot verify` checks it; docs/protocol.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Box<crate::receipt::ReceiptMessage>>,
}

/// A stretch of a final's text between two of Whisper's timestamps, or one
/// word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentMessage {
    pub start: f64,
    pub end: f64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranslationMessage {
    pub utterance: u32,
    /// The language translated into.
    pub language: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub code: ClientErrorCode,
    pub message: String,
    /// The session ends after a fatal error.
    pub fatal: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utterance: Option<u32>,
    /// With `unavailable`: seconds after which trying again may succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,
}

/// Stable error codes sent to clients. Renaming one is a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientErrorCode {
    /// A query parameter is missing or malformed.
    InvalidQuery,
    UnsupportedEncoding,
    UnsupportedSampleRate,
    /// A binary frame is not a whole number of samples.
    InvalidAudioFrame,
    /// A text frame is not a JSON object with a string `type`.
    InvalidJson,
    UnknownMessageType,
    /// A frame exceeded the edge's message size limit.
    FrameTooLarge,
    /// The region refused or failed this utterance; see `message`.
    UtteranceFailed,
    /// No permitted region could take the utterance within the edge's retry
    /// budget (every one unreachable, busy, draining or failing); comes
    /// with `retry_after`. (Called `no_region_available` before.)
    Unavailable,
    /// The edge is at its session limit; retry later.
    ServerBusy,
    /// Neither audio nor a `keepalive` arrived within the idle timeout
    /// (WebSocket pings do not count).
    IdleTimeout,
    /// The session reached the edge's maximum length; its pending finals
    /// are delivered, then it closes. Reconnect to go on.
    SessionTooLong,
    /// A `config` message has a field that is not understood or a value
    /// that is not valid; the session goes on with its settings unchanged.
    InvalidConfig,
    /// The `channels` query parameter names a layout the edge does not
    /// take (it takes 1 or 2).
    UnsupportedChannels,
    /// The edge is shutting down.
    ShuttingDown,
    /// A WebSocket protocol violation.
    ProtocolError,
    /// No model translates into the requested language; transcription
    /// goes on without translations.
    TranslationUnavailable,
    /// A resumed session could not ask every permitted region for its
    /// finals; some may be missing: resume again later.
    ResumeIncomplete,
}

impl ClientErrorCode {
    pub const ALL: [ClientErrorCode; 18] = [
        ClientErrorCode::InvalidQuery,
        ClientErrorCode::UnsupportedEncoding,
        ClientErrorCode::UnsupportedSampleRate,
        ClientErrorCode::InvalidAudioFrame,
        ClientErrorCode::InvalidJson,
        ClientErrorCode::UnknownMessageType,
        ClientErrorCode::FrameTooLarge,
        ClientErrorCode::UtteranceFailed,
        ClientErrorCode::Unavailable,
        ClientErrorCode::ServerBusy,
        ClientErrorCode::IdleTimeout,
        ClientErrorCode::SessionTooLong,
        ClientErrorCode::InvalidConfig,
        ClientErrorCode::UnsupportedChannels,
        ClientErrorCode::ShuttingDown,
        ClientErrorCode::ProtocolError,
        ClientErrorCode::TranslationUnavailable,
        ClientErrorCode::ResumeIncomplete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientErrorCode::InvalidQuery => "invalid_query",
            ClientErrorCode::UnsupportedEncoding => "unsupported_encoding",
            ClientErrorCode::UnsupportedSampleRate => "unsupported_sample_rate",
            ClientErrorCode::InvalidAudioFrame => "invalid_audio_frame",
            ClientErrorCode::InvalidJson => "invalid_json",
            ClientErrorCode::UnknownMessageType => "unknown_message_type",
            ClientErrorCode::FrameTooLarge => "frame_too_large",
            ClientErrorCode::UtteranceFailed => "utterance_failed",
            ClientErrorCode::Unavailable => "unavailable",
            ClientErrorCode::ServerBusy => "server_busy",
            ClientErrorCode::IdleTimeout => "idle_timeout",
            ClientErrorCode::SessionTooLong => "session_too_long",
            ClientErrorCode::InvalidConfig => "invalid_config",
            ClientErrorCode::UnsupportedChannels => "unsupported_channels",
            ClientErrorCode::ShuttingDown => "shutting_down",
            ClientErrorCode::ProtocolError => "protocol_error",
            ClientErrorCode::TranslationUnavailable => "translation_unavailable",
            ClientErrorCode::ResumeIncomplete => "resume_incomplete",
        }
    }
}

impl ErrorMessage {
    pub fn new(code: ClientErrorCode, message: impl Into<String>, fatal: bool) -> Self {
        ErrorMessage {
            code,
            message: message.into(),
            fatal,
            utterance: None,
            retry_after: None,
        }
    }
}

impl ServerMessage {
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// What a client may send on a text frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// End the current utterance now.
    Finalize,
    /// End the session after the pending finals.
    Close,
    /// The client is still there (it has nothing to send): restarts the
    /// idle timer, as audio does.
    KeepAlive,
    /// Change settings for the utterances that start after it.
    Config(ConfigChange),
}

/// A `config` message: each field present is changed, each absent one
/// stays as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigChange {
    /// `Some(None)`: detect the language (`"auto"`).
    pub language: Option<Option<String>>,
    /// `Some(None)`: stop translating (`null` or `""`).
    pub translate: Option<Option<String>>,
}

const MESSAGE_TYPES: &str = "\"finalize\", \"keepalive\", \"config\" or \"close\"";

/// Parses a control message, telling malformed JSON apart from an unknown
/// message type and a bad `config`.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ErrorMessage> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        ErrorMessage::new(
            ClientErrorCode::InvalidJson,
            format!("text frames must be JSON objects like {{\"type\":\"finalize\"}}: {e}"),
            false,
        )
    })?;
    let kind = value.get("type").and_then(|t| t.as_str()).ok_or_else(|| {
        ErrorMessage::new(
            ClientErrorCode::InvalidJson,
            "text frames must be JSON objects with a string \"type\" field",
            false,
        )
    })?;
    match kind {
        "finalize" => Ok(ClientMessage::Finalize),
        "close" => Ok(ClientMessage::Close),
        "keepalive" => Ok(ClientMessage::KeepAlive),
        "config" => parse_config(&value).map(ClientMessage::Config),
        other => Err(ErrorMessage::new(
            ClientErrorCode::UnknownMessageType,
            format!(
                "unknown message type {:?}: expected {MESSAGE_TYPES}",
                truncate(other, 64)
            ),
            false,
        )),
    }
}

fn parse_config(value: &serde_json::Value) -> Result<ConfigChange, ErrorMessage> {
    let bad = |m: String| ErrorMessage::new(ClientErrorCode::InvalidConfig, m, false);
    let mut change = ConfigChange::default();
    // `type` is checked above; every other field must be known.
    let Some(fields) = value.as_object() else {
        return Err(bad("config must be a JSON object".into()));
    };
    for (key, v) in fields {
        match key.as_str() {
            "type" => {}
            "language" => match v.as_str() {
                Some("auto") => change.language = Some(None),
                Some(code) if is_language_code(code) => {
                    change.language = Some(Some(code.to_owned()))
                }
                _ => {
                    return Err(bad(format!(
                        "config language {} must be an ISO 639-1 code such as \"en\", or \"auto\"",
                        truncate(&v.to_string(), 32)
                    )));
                }
            },
            "translate" => match v {
                serde_json::Value::Null => change.translate = Some(None),
                serde_json::Value::String(s) if s.is_empty() => change.translate = Some(None),
                serde_json::Value::String(s) if is_language_code(s) => {
                    change.translate = Some(Some(s.clone()))
                }
                _ => {
                    return Err(bad(format!(
                        "config translate {} must be a language code such as \"en\", or null to stop translating",
                        truncate(&v.to_string(), 32)
                    )));
                }
            },
            other => {
                return Err(bad(format!(
                    "config field {:?} is not known: known are language, translate",
                    truncate(other, 32)
                )));
            }
        }
    }
    Ok(change)
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

/// Microseconds as milliseconds, rounded to the microsecond.
pub fn micros_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub use crate::receipt::hex;

/// Whether `s` has the form of a language code as sessions and configs
/// write them: two or three lowercase ASCII letters (`en`, `de`, `haw`).
pub fn is_language_code(s: &str) -> bool {
    (2..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_parse() {
        assert_eq!(
            parse_client_message(r#"{"type":"finalize"}"#),
            Ok(ClientMessage::Finalize)
        );
        assert_eq!(
            parse_client_message(r#" {"type":"close","extra":1} "#),
            Ok(ClientMessage::Close)
        );
        assert_eq!(
            parse_client_message(r#"{"type":"keepalive"}"#),
            Ok(ClientMessage::KeepAlive)
        );
        assert_eq!(
            parse_client_message(r#"{"type":"config","language":"de","translate":null}"#),
            Ok(ClientMessage::Config(ConfigChange {
                language: Some(Some("de".into())),
                translate: Some(None),
            }))
        );
        assert_eq!(
            parse_client_message(r#"{"type":"config","language":"auto"}"#),
            Ok(ClientMessage::Config(ConfigChange {
                language: Some(None),
                translate: None,
            }))
        );
    }

    #[test]
    fn bad_control_messages_get_distinct_codes() {
        let code = |t: &str| parse_client_message(t).unwrap_err().code;
        assert_eq!(code("hello"), ClientErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ClientErrorCode::InvalidJson);
        assert_eq!(code(r#"{"type":3}"#), ClientErrorCode::InvalidJson);
        assert_eq!(
            code(r#"{"type":"config","language":"German"}"#),
            ClientErrorCode::InvalidConfig
        );
        assert_eq!(
            code(r#"{"type":"config","translate":5}"#),
            ClientErrorCode::InvalidConfig
        );
        assert_eq!(
            code(r#"{"type":"config","speed":2}"#),
            ClientErrorCode::InvalidConfig
        );
        assert_eq!(
            code(r#"{"type":"dance"}"#),
            ClientErrorCode::UnknownMessageType
        );
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(10_000));
        assert!(parse_client_message(&long).unwrap_err().message.len() < 200);
    }

    #[test]
    fn server_messages_have_the_documented_shape() {
        let m = ServerMessage::Final(FinalMessage {
            utterance: 2,
            text: "hi".into(),
            region: "eu-west".into(),
            model: "whisper@1".into(),
            start: 1.5,
            end: 2.25,
            audio_sha256: "00".into(),
            latency_ms: 31.25,
            queue_ms: 0.5,
            inference_ms: 25.0,
            language: Some("en".into()),
            language_probability: None,
            segments: None,
            words: Some(vec![SegmentMessage {
                start: 1.5,
                end: 1.75,
                text: "hi".into(),
            }]),
            receipt: None,
        });
        assert_eq!(
            m.to_json(),
            r#"{"type":"final","utterance":2,"text":"hi","region":"eu-west","model":"whisper@1","start":1.5,"end":2.25,"audio_sha256":"00","latency_ms":31.25,"queue_ms":0.5,"inference_ms":25.0,"language":"en","words":[{"start":1.5,"end":1.75,"text":"hi"}]}"#
        );
        let e = ServerMessage::Error(ErrorMessage::new(
            ClientErrorCode::InvalidAudioFrame,
            "m",
            false,
        ));
        assert_eq!(
            e.to_json(),
            r#"{"type":"error","code":"invalid_audio_frame","message":"m","fatal":false}"#
        );
        let back: ServerMessage = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn error_code_strings_match_serde() {
        for code in ClientErrorCode::ALL {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f]), "00ab0f");
    }
}
