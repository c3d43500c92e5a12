//! The edge↔region wire protocol, sans IO.
//!
//! One QUIC bidirectional stream carries one utterance. The edge sends
//! `Header`, any number of `Audio` frames and `End`, then finishes its side;
//! the region answers with exactly one `Final` or `Error`.
//!
//! Every frame is `length: u32 BE` followed by `length` bytes: a one-byte
//! frame type and its payload. Strings are UTF-8 with a length prefix
//! (`str8`: u8, `str16`: u16 BE, `str32`: u32 BE). The full layout is in
//! `docs/protocol.md`.
//!
//! [`decode`] separates *incomplete* input (`Ok(None)`: read more bytes) from
//! *invalid* input (`Err`), in the manner of mini-redis's frame parser.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol version carried in every header.
pub const VERSION: u8 = 3;
/// ALPN protocol id for the QUIC connection: peers of different wire
/// versions fail at the handshake, not on every utterance.
pub const ALPN: &[u8] = b"earshot/3";
/// Largest frame body (type byte + payload) a peer may send.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Audio on the wire is mono PCM, signed 16-bit little endian, at this rate.
pub const SAMPLE_RATE: u32 = 16_000;
/// How many audio bytes one `Audio` frame carries at most when encoded by
/// [`encode_utterance`].
pub const AUDIO_CHUNK: usize = 64 * 1024;

const T_HEADER: u8 = 0x01;
const T_AUDIO: u8 = 0x02;
const T_END: u8 = 0x03;
const T_FINAL: u8 = 0x10;
const T_ERROR: u8 = 0x11;

/// Identifies an utterance across retries: the region treats a repeated
/// `(session, utterance)` as the same request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 16-byte session id (a UUID).
    pub session: [u8; 16],
    /// Utterance number within the session, from 1.
    pub utterance: u32,
    /// The session's jurisdiction (from the edge it entered).
    pub jurisdiction: String,
    /// The edge that cut the utterance.
    pub edge: String,
    /// Language hint, e.g. `en`; empty means "detect".
    pub language: String,
    /// Language to translate into, e.g. `en`; empty means no translation.
    pub translate: String,
    /// Return the transcript's segments with Whisper's timestamps. Encoded
    /// with `words` and `resume` in one trailing byte of options (bits 0,
    /// 1 and 2),
    /// written only when either is set, so a header without them is the
    /// same bytes as before the fields existed.
    pub timestamps: bool,
    /// Return each word of the transcript with its start and end.
    pub words: bool,
    /// A resumed session asking for what the region holds of utterance
    /// `utterance` of `session`, whichever edge of the jurisdiction cut it
    /// (bit 2 of the options): no audio follows; the answer is its final
    /// (waiting for it if still queued) or `not_found`.
    pub resume: bool,
    /// Where the utterance lies in its session, `(start, end)` in
    /// milliseconds of the session's audio: kept with the answer so that a
    /// resumed session can place finals it fetches. Bit 3 of the options,
    /// then two u32 after the options byte.
    pub span: Option<(u32, u32)>,
    /// Sample rate of the audio that follows; always [`SAMPLE_RATE`] today.
    pub sample_rate: u32,
}

/// A final transcript for one utterance.
#[derive(Debug, Clone, PartialEq)]
pub struct Final {
    pub utterance: u32,
    pub text: String,
    pub region: String,
    /// Model id and version that produced the text.
    pub model: String,
    /// SHA-256 of the PCM the worker transcribed.
    pub audio_sha256: [u8; 32],
    /// Microseconds the utterance waited in the region's queue.
    pub queue_us: u32,
    /// Microseconds the model took.
    pub inference_us: u32,
    /// Language of the speech (hinted or detected); empty if unknown.
    pub language: String,
    /// Probability of a detected language in [0, 1]; negative when the
    /// language was given, not detected.
    pub language_probability: f32,
    /// The text translated, or why it could not be, when the header asked
    /// for a translation.
    pub translation: Option<Translated>,
    /// The transcript's segments, when the header asked for timestamps
    /// (a trailing section, encoded only when this or `words` is not
    /// empty).
    pub segments: Vec<Segment>,
    /// The transcript's words, when the header asked for them (a trailing
    /// section after the segments, encoded only when not empty).
    pub words: Vec<Segment>,
    /// SHA-256 of the model version that made the text (its manifest), set
    /// by the worker; a trailing section after the words.
    pub model_sha256: Option<[u8; 32]>,
    /// The header's `span`, copied by the worker; a trailing section after
    /// the model digest (flag byte, then two u32).
    pub span: Option<(u32, u32)>,
    /// The region's signed receipt, added by its ingress; the last
    /// trailing section.
    pub receipt: Option<Box<Receipt>>,
}

/// A region's signed residency receipt for one final (see
/// [`crate::receipt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub claims: crate::receipt::Claims,
    /// TLS `SignatureScheme` code (one of [`crate::receipt::SCHEMES`]).
    pub scheme: u16,
    pub signature: Vec<u8>,
    /// The region's certificate, DER.
    pub certificate: Vec<u8>,
}

/// A stretch of a transcript (a segment, or one word); times in
/// milliseconds from the start of the utterance's audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub start_ms: u32,
    pub end_ms: u32,
    pub text: String,
}

/// A final's text in another language.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub language: String,
    pub text: String,
}

/// What became of a requested translation.
#[derive(Debug, Clone, PartialEq)]
pub enum Translated {
    Text(Translation),
    /// The region has no model for this pair (or it failed); the final's
    /// transcript is unaffected.
    Unavailable {
        language: String,
        reason: String,
    },
}

/// A refusal or failure for one utterance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub utterance: u32,
    pub code: ErrorCode,
    pub message: String,
}

/// Stable error codes a region may answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frames broke the protocol (order, size, encoding).
    InvalidFrame,
    /// The session's jurisdiction may not be processed in this region.
    ResidencyRefused,
    /// The region's queue (Redis) is unreachable.
    QueueUnavailable,
    /// No worker answered in time.
    Timeout,
    /// The audio hash in `End` does not match the audio received.
    AudioCorrupted,
    /// More audio than the region accepts for one utterance.
    AudioTooLong,
    /// The header asks for something the region cannot do.
    Unsupported,
    /// The model failed on this input.
    InferenceFailed,
    /// The region is draining and takes no new utterances.
    ShuttingDown,
    /// The region is at its in-flight limit.
    Overloaded,
    /// The region's queue is past its threshold (queued and unacknowledged
    /// entries): the edge tries the next permitted region.
    Busy,
    /// A resume asked for an utterance the region holds nothing of (never
    /// admitted here, or expired).
    NotFound,
    /// A code this build does not know (from a newer peer).
    Unknown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidFrame,
        ErrorCode::ResidencyRefused,
        ErrorCode::QueueUnavailable,
        ErrorCode::Timeout,
        ErrorCode::AudioCorrupted,
        ErrorCode::AudioTooLong,
        ErrorCode::Unsupported,
        ErrorCode::InferenceFailed,
        ErrorCode::ShuttingDown,
        ErrorCode::Overloaded,
        ErrorCode::Busy,
        ErrorCode::NotFound,
        ErrorCode::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::ResidencyRefused => "residency_refused",
            ErrorCode::QueueUnavailable => "queue_unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::AudioCorrupted => "audio_corrupted",
            ErrorCode::AudioTooLong => "audio_too_long",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::InferenceFailed => "inference_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Busy => "busy",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unknown => "unknown",
        }
    }

    pub fn parse(code: &str) -> ErrorCode {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap_or(ErrorCode::Unknown)
    }

    /// Whether another permitted region may succeed where this one failed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::QueueUnavailable
                | ErrorCode::Timeout
                | ErrorCode::ShuttingDown
                | ErrorCode::Overloaded
                | ErrorCode::Busy
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Header(Header),
    Audio(Bytes),
    /// End of the utterance's audio, with the SHA-256 of all audio bytes.
    End {
        audio_sha256: [u8; 32],
    },
    Final(Final),
    Error(WireError),
}

/// Why bytes could not be decoded. Any of these ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("frame type 0x{kind:02x} is truncated: {what} missing")]
    Truncated { kind: u8, what: &'static str },
    #[error("frame type 0x{kind:02x} has {extra} unexpected trailing bytes")]
    Trailing { kind: u8, extra: usize },
    #[error("{what} flag is {value}, not 0 or 1")]
    InvalidFlag { what: &'static str, value: u8 },
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("protocol version {0} is not supported (this build speaks {VERSION})")]
    Version(u8),
    #[error("string {what} is {len} bytes, longer than its {max}-byte limit")]
    StringTooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "a final's receipt claims are not valid (JSON with exactly the documented fields, at most {} bytes)",
        crate::receipt::MAX_CLAIMS_BYTES
    )]
    InvalidReceipt,
}

/// Decodes one frame from the front of `buf`, consuming it. `Ok(None)` means
/// more bytes are needed; nothing is consumed then.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len).freeze();
    parse_body(body).map(Some)
}

fn parse_body(mut body: Bytes) -> Result<Frame, FrameError> {
    let kind = body.get_u8();
    let mut r = Reader { kind, buf: body };
    let frame = match kind {
        T_HEADER => {
            let version = r.u8("version")?;
            if version != VERSION {
                return Err(FrameError::Version(version));
            }
            let session = r.array("session id")?;
            let utterance = r.u32("utterance")?;
            let sample_rate = r.u32("sample rate")?;
            let jurisdiction = r.str8("jurisdiction")?;
            let edge = r.str8("edge")?;
            let language = r.str8("language")?;
            let translate = r.str8("translate")?;
            // Optional trailing options: bit 0 timestamps, bit 1 words,
            // bit 2 resume, bit 3 span (two u32 follow).
            let options = if r.buf.has_remaining() {
                r.u8("options")?
            } else {
                0
            };
            if options > 0b1111 {
                return Err(FrameError::InvalidFlag {
                    what: "header options",
                    value: options,
                });
            }
            Frame::Header(Header {
                session,
                utterance,
                sample_rate,
                jurisdiction,
                edge,
                language,
                translate,
                timestamps: options & 1 != 0,
                words: options & 2 != 0,
                resume: options & 4 != 0,
                span: if options & 8 != 0 {
                    Some((r.u32("span start")?, r.u32("span end")?))
                } else {
                    None
                },
            })
        }
        T_AUDIO => Frame::Audio(std::mem::take(&mut r.buf)),
        T_END => Frame::End {
            audio_sha256: r.array("audio hash")?,
        },
        T_FINAL => Frame::Final(Final {
            utterance: r.u32("utterance")?,
            audio_sha256: r.array("audio hash")?,
            queue_us: r.u32("queue time")?,
            inference_us: r.u32("inference time")?,
            region: r.str8("region")?,
            model: r.str8("model")?,
            text: r.str32("text")?,
            language: r.str8("language")?,
            language_probability: r.f32("language probability")?,
            translation: match r.u8("translation flag")? {
                0 => None,
                1 => Some(Translated::Text(Translation {
                    language: r.str8("translation language")?,
                    text: r.str32("translation")?,
                })),
                2 => Some(Translated::Unavailable {
                    language: r.str8("translation language")?,
                    reason: r.str16("translation unavailable reason")?,
                }),
                other => {
                    return Err(FrameError::InvalidFlag {
                        what: "translation",
                        value: other,
                    });
                }
            },
            segments: r.spans("segment")?,
            words: r.spans("word")?,
            model_sha256: r.model_digest()?,
            span: r.span()?,
            receipt: r.receipt()?,
        }),
        T_ERROR => Frame::Error(WireError {
            utterance: r.u32("utterance")?,
            code: ErrorCode::parse(&r.str8("code")?),
            message: r.str16("message")?,
        }),
        other => return Err(FrameError::UnknownType(other)),
    };
    if r.buf.has_remaining() {
        return Err(FrameError::Trailing {
            kind,
            extra: r.buf.remaining(),
        });
    }
    Ok(frame)
}

struct Reader {
    kind: u8,
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            Err(FrameError::Truncated {
                kind: self.kind,
                what,
            })
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    /// An optional trailing section of spans (segments or words): a
    /// count, then start and end (ms) and text each; none when the frame
    /// ends here.
    fn spans(&mut self, what: &'static str) -> Result<Vec<Segment>, FrameError> {
        if !self.buf.has_remaining() {
            return Ok(Vec::new());
        }
        let count = self.u16(what)?;
        (0..count)
            .map(|_| {
                Ok(Segment {
                    start_ms: self.u32(what)?,
                    end_ms: self.u32(what)?,
                    text: self.str32(what)?,
                })
            })
            .collect()
    }

    /// The optional model digest section: a flag byte, then 32 bytes when
    /// it is 1.
    fn model_digest(&mut self) -> Result<Option<[u8; 32]>, FrameError> {
        if !self.buf.has_remaining() {
            return Ok(None);
        }
        match self.u8("model digest flag")? {
            0 => Ok(None),
            1 => Ok(Some(self.array("model digest")?)),
            other => Err(FrameError::InvalidFlag {
                what: "model digest",
                value: other,
            }),
        }
    }

    /// The optional span section: a flag byte, then start and end (u32).
    fn span(&mut self) -> Result<Option<(u32, u32)>, FrameError> {
        if !self.buf.has_remaining() {
            return Ok(None);
        }
        match self.u8("span flag")? {
            0 => Ok(None),
            1 => Ok(Some((self.u32("span start")?, self.u32("span end")?))),
            other => Err(FrameError::InvalidFlag {
                what: "span",
                value: other,
            }),
        }
    }

    /// The optional receipt section: claims JSON (str16), scheme (u16),
    /// signature and certificate (u16-length bytes each).
    fn receipt(&mut self) -> Result<Option<Box<Receipt>>, FrameError> {
        if !self.buf.has_remaining() {
            return Ok(None);
        }
        let what = "receipt";
        let len = self.u16(what)? as usize;
        self.need(len, what)?;
        let json = self.buf.split_to(len);
        let claims =
            crate::receipt::Claims::from_json(&json).map_err(|_| FrameError::InvalidReceipt)?;
        let scheme = self.u16(what)?;
        let len = self.u16(what)? as usize;
        self.need(len, what)?;
        let signature = self.buf.split_to(len).to_vec();
        let len = self.u16(what)? as usize;
        self.need(len, what)?;
        let certificate = self.buf.split_to(len).to_vec();
        Ok(Some(Box::new(Receipt {
            claims,
            scheme,
            signature,
            certificate,
        })))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn f32(&mut self, what: &'static str) -> Result<f32, FrameError> {
        self.need(4, what)?;
        Ok(self.buf.get_f32())
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        self.need(N, what)?;
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    fn string(&mut self, len: usize, what: &'static str) -> Result<String, FrameError> {
        self.need(len, what)?;
        let bytes = self.buf.split_to(len);
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::InvalidUtf8 { what })
    }

    fn str8(&mut self, what: &'static str) -> Result<String, FrameError> {
        let len = self.u8(what)? as usize;
        self.string(len, what)
    }

    fn str16(&mut self, what: &'static str) -> Result<String, FrameError> {
        self.need(2, what)?;
        let len = self.buf.get_u16() as usize;
        self.string(len, what)
    }

    fn str32(&mut self, what: &'static str) -> Result<String, FrameError> {
        let len = self.u32(what)? as usize;
        self.string(len, what)
    }
}

impl Frame {
    /// Appends this frame's bytes to `dst`. Fails, writing nothing, if a
    /// string is longer than its length prefix allows or the frame would
    /// exceed [`MAX_FRAME_LEN`].
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let mut body = BytesMut::new();
        match self {
            Frame::Header(h) => {
                body.put_u8(T_HEADER);
                body.put_u8(VERSION);
                body.put_slice(&h.session);
                body.put_u32(h.utterance);
                body.put_u32(h.sample_rate);
                put_str8(&mut body, &h.jurisdiction, "jurisdiction")?;
                put_str8(&mut body, &h.edge, "edge")?;
                put_str8(&mut body, &h.language, "language")?;
                put_str8(&mut body, &h.translate, "translate")?;
                let options = u8::from(h.timestamps)
                    | u8::from(h.words) << 1
                    | u8::from(h.resume) << 2
                    | u8::from(h.span.is_some()) << 3;
                if options != 0 {
                    body.put_u8(options);
                }
                if let Some((start, end)) = h.span {
                    body.put_u32(start);
                    body.put_u32(end);
                }
            }
            Frame::Audio(audio) => {
                body.put_u8(T_AUDIO);
                body.put_slice(audio);
            }
            Frame::End { audio_sha256 } => {
                body.put_u8(T_END);
                body.put_slice(audio_sha256);
            }
            Frame::Final(f) => {
                body.put_u8(T_FINAL);
                body.put_u32(f.utterance);
                body.put_slice(&f.audio_sha256);
                body.put_u32(f.queue_us);
                body.put_u32(f.inference_us);
                put_str8(&mut body, &f.region, "region")?;
                put_str8(&mut body, &f.model, "model")?;
                put_str32(&mut body, &f.text)?;
                put_str8(&mut body, &f.language, "language")?;
                body.put_f32(f.language_probability);
                match &f.translation {
                    None => body.put_u8(0),
                    Some(Translated::Text(t)) => {
                        body.put_u8(1);
                        put_str8(&mut body, &t.language, "translation language")?;
                        put_str32(&mut body, &t.text)?;
                    }
                    Some(Translated::Unavailable { language, reason }) => {
                        body.put_u8(2);
                        put_str8(&mut body, language, "translation language")?;
                        put_str16(&mut body, reason);
                    }
                }
                // Trailing sections are positional: each is written when
                // it or a later one is present, so a final without them is
                // the same bytes as before they existed.
                let last = if f.receipt.is_some() {
                    5
                } else if f.span.is_some() {
                    4
                } else if f.model_sha256.is_some() {
                    3
                } else if !f.words.is_empty() {
                    2
                } else if !f.segments.is_empty() {
                    1
                } else {
                    0
                };
                if last >= 1 {
                    put_spans(&mut body, &f.segments, "segments")?;
                }
                if last >= 2 {
                    put_spans(&mut body, &f.words, "words")?;
                }
                if last >= 3 {
                    match &f.model_sha256 {
                        None => body.put_u8(0),
                        Some(digest) => {
                            body.put_u8(1);
                            body.put_slice(digest);
                        }
                    }
                }
                if last >= 4 {
                    match f.span {
                        None => body.put_u8(0),
                        Some((start, end)) => {
                            body.put_u8(1);
                            body.put_u32(start);
                            body.put_u32(end);
                        }
                    }
                }
                if let Some(receipt) = &f.receipt {
                    let claims = serde_json::to_vec(&receipt.claims)
                        .map_err(|_| FrameError::InvalidReceipt)?;
                    if claims.len() > crate::receipt::MAX_CLAIMS_BYTES {
                        return Err(FrameError::InvalidReceipt);
                    }
                    put_bytes16(&mut body, &claims, "receipt claims")?;
                    body.put_u16(receipt.scheme);
                    put_bytes16(&mut body, &receipt.signature, "receipt signature")?;
                    put_bytes16(&mut body, &receipt.certificate, "receipt certificate")?;
                }
            }
            Frame::Error(e) => {
                body.put_u8(T_ERROR);
                body.put_u32(e.utterance);
                put_str8(&mut body, e.code.as_str(), "code")?;
                put_str16(&mut body, &e.message);
            }
        }
        if body.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(body.len()));
        }
        dst.put_u32(body.len() as u32);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

fn put_str8(dst: &mut BytesMut, s: &str, what: &'static str) -> Result<(), FrameError> {
    let len = u8::try_from(s.len()).map_err(|_| FrameError::StringTooLong {
        what,
        len: s.len(),
        max: u8::MAX as usize,
    })?;
    dst.put_u8(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

/// Bytes with a u16 length prefix.
fn put_bytes16(dst: &mut BytesMut, bytes: &[u8], what: &'static str) -> Result<(), FrameError> {
    let len = u16::try_from(bytes.len()).map_err(|_| FrameError::StringTooLong {
        what,
        len: bytes.len(),
        max: u16::MAX as usize,
    })?;
    dst.put_u16(len);
    dst.put_slice(bytes);
    Ok(())
}

/// A section of spans as [`Reader::spans`] reads it.
fn put_spans(dst: &mut BytesMut, spans: &[Segment], what: &'static str) -> Result<(), FrameError> {
    let count = u16::try_from(spans.len()).map_err(|_| FrameError::StringTooLong {
        what,
        len: spans.len(),
        max: u16::MAX as usize,
    })?;
    dst.put_u16(count);
    for span in spans {
        dst.put_u32(span.start_ms);
        dst.put_u32(span.end_ms);
        put_str32(dst, &span.text)?;
    }
    Ok(())
}

fn put_str32(dst: &mut BytesMut, s: &str) -> Result<(), FrameError> {
    let len = u32::try_from(s.len()).map_err(|_| FrameError::TooLarge(s.len()))?;
    dst.put_u32(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

/// A human-readable string, cut (at a character boundary) to 64 KiB.
fn put_str16(dst: &mut BytesMut, s: &str) {
    let s = truncate_utf8(s, u16::MAX as usize);
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes a whole utterance as the edge sends it: header, audio in chunks
/// of at most [`AUDIO_CHUNK`] bytes, and the end frame with the audio hash.
pub fn encode_utterance(
    header: &Header,
    audio: &Bytes,
    audio_sha256: [u8; 32],
) -> Result<BytesMut, FrameError> {
    let mut out = BytesMut::with_capacity(audio.len() + 256);
    Frame::Header(header.clone()).encode(&mut out)?;
    let mut offset = 0;
    while offset < audio.len() {
        let end = (offset + AUDIO_CHUNK).min(audio.len());
        Frame::Audio(audio.slice(offset..end)).encode(&mut out)?;
        offset = end;
    }
    Frame::End { audio_sha256 }.encode(&mut out)?;
    Ok(out)
}

/// An utterance as the region receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Utterance {
    pub header: Header,
    pub audio: Bytes,
    /// The hash the edge sent in `End`.
    pub audio_sha256: [u8; 32],
}

/// Why a stream's frames do not form an utterance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("expected a header first, got {0}")]
    HeaderFirst(&'static str),
    #[error("unexpected {0} after the header")]
    Unexpected(&'static str),
    #[error("utterance audio exceeds {max} bytes")]
    TooLong { max: usize },
    #[error("audio byte count {0} is not a whole number of 16-bit samples")]
    OddAudio(usize),
    #[error("stream ended before the end frame")]
    Incomplete,
}

impl AssembleError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AssembleError::TooLong { .. } => ErrorCode::AudioTooLong,
            _ => ErrorCode::InvalidFrame,
        }
    }
}

/// Collects `Header, Audio*, End` into an [`Utterance`], enforcing the order
/// and a limit on the audio size. Sans IO: feed it frames as they decode.
#[derive(Debug)]
pub struct Assembler {
    max_audio: usize,
    header: Option<Header>,
    audio: BytesMut,
}

impl Assembler {
    pub fn new(max_audio_bytes: usize) -> Self {
        Assembler {
            max_audio: max_audio_bytes,
            header: None,
            audio: BytesMut::new(),
        }
    }

    /// Feeds one frame. Returns the utterance when `End` arrives.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Utterance>, AssembleError> {
        match (frame, self.header.is_some()) {
            (Frame::Header(h), false) => {
                self.header = Some(h);
                Ok(None)
            }
            (Frame::Audio(a), true) => {
                if self.audio.len() + a.len() > self.max_audio {
                    return Err(AssembleError::TooLong {
                        max: self.max_audio,
                    });
                }
                self.audio.extend_from_slice(&a);
                Ok(None)
            }
            (Frame::End { audio_sha256 }, true) => {
                if !self.audio.len().is_multiple_of(2) {
                    return Err(AssembleError::OddAudio(self.audio.len()));
                }
                let header = self.header.take().ok_or(AssembleError::Incomplete)?;
                Ok(Some(Utterance {
                    header,
                    audio: std::mem::take(&mut self.audio).freeze(),
                    audio_sha256,
                }))
            }
            (other, false) => Err(AssembleError::HeaderFirst(other.name())),
            (other, true) => Err(AssembleError::Unexpected(other.name())),
        }
    }

    /// The header received so far, for error replies.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Header(_) => "header",
            Frame::Audio(_) => "audio",
            Frame::End { .. } => "end",
            Frame::Final(_) => "final",
            Frame::Error(_) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            session: [0xab; 16],
            utterance: 7,
            jurisdiction: "eu".into(),
            edge: "e1".into(),
            language: "en".into(),
            translate: String::new(),
            timestamps: false,
            words: false,
            resume: false,
            span: None,
            sample_rate: 16_000,
        }
    }

    fn bytes_of(frame: &Frame) -> Vec<u8> {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        buf.to_vec()
    }

    fn decode_all(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
        decode(&mut BytesMut::from(bytes))
    }

    #[test]
    fn header_layout_is_fixed() {
        let mut expected = vec![0, 0, 0, 36, 0x01, 0x03];
        expected.extend([0xab; 16]);
        expected.extend([0, 0, 0, 7]); // utterance
        expected.extend([0, 0, 0x3e, 0x80]); // 16000
        expected.extend([2, b'e', b'u', 2, b'e', b'1', 2, b'e', b'n', 0]);
        assert_eq!(bytes_of(&Frame::Header(header())), expected);
        assert_eq!(decode_all(&expected), Ok(Some(Frame::Header(header()))));

        // Timestamps or words asked for: one trailing byte of options
        // (bit 0 timestamps, bit 1 words, bit 2 resume); any other bit is
        // invalid.
        let mut with = expected.clone();
        with[3] += 1;
        with.push(0);
        let last = with.len() - 1;
        for (timestamps, words, resume, byte) in [
            (true, false, false, 1),
            (false, true, false, 2),
            (true, true, false, 3),
            (false, false, true, 4),
            (true, true, true, 7),
        ] {
            let asked = Header {
                timestamps,
                words,
                resume,
                ..header()
            };
            with[last] = byte;
            assert_eq!(bytes_of(&Frame::Header(asked.clone())), with);
            assert_eq!(decode_all(&with), Ok(Some(Frame::Header(asked))));
        }
        // A span: bit 3, then start and end.
        let placed = Header {
            span: Some((1_000, 2_500)),
            ..header()
        };
        let mut spanned = with.clone();
        spanned[3] += 8;
        spanned[last] = 8;
        spanned.extend([0, 0, 0x03, 0xe8, 0, 0, 0x09, 0xc4]);
        assert_eq!(bytes_of(&Frame::Header(placed.clone())), spanned);
        assert_eq!(decode_all(&spanned), Ok(Some(Frame::Header(placed))));
        with[last] = 16;
        assert_eq!(
            decode_all(&with),
            Err(FrameError::InvalidFlag {
                what: "header options",
                value: 16
            })
        );
    }

    #[test]
    fn audio_end_final_error_round_trip_from_literals() {
        let audio = [0, 0, 0, 5, 0x02, 1, 2, 3, 4];
        assert_eq!(
            decode_all(&audio),
            Ok(Some(Frame::Audio(Bytes::from_static(&[1, 2, 3, 4]))))
        );

        let mut end = vec![0, 0, 0, 33, 0x03];
        end.extend([9; 32]);
        assert_eq!(
            decode_all(&end),
            Ok(Some(Frame::End {
                audio_sha256: [9; 32]
            }))
        );

        let fin = Final {
            utterance: 1,
            text: "hé".into(),
            region: "r".into(),
            model: "m@1".into(),
            audio_sha256: [1; 32],
            queue_us: 2,
            inference_us: 300,
            language: "fr".into(),
            language_probability: 0.5,
            translation: None,
            segments: Vec::new(),
            words: Vec::new(),
            model_sha256: None,
            span: None,
            receipt: None,
        };
        let mut expected = vec![0, 0, 0, 66, 0x10, 0, 0, 0, 1];
        expected.extend([1; 32]);
        expected.extend([0, 0, 0, 2, 0, 0, 1, 44]);
        expected.extend([1, b'r', 3, b'm', b'@', b'1', 0, 0, 0, 3, b'h', 0xc3, 0xa9]);
        expected.extend([2, b'f', b'r', 0x3f, 0, 0, 0, 0]); // language, 0.5f32, no translation
        assert_eq!(bytes_of(&Frame::Final(fin.clone())), expected);
        assert_eq!(decode_all(&expected), Ok(Some(Frame::Final(fin.clone()))));

        // With a translation: flag 1, its language and text.
        let translated = Final {
            translation: Some(Translated::Text(Translation {
                language: "en".into(),
                text: "hi".into(),
            })),
            ..fin.clone()
        };
        let mut with = expected.clone();
        with[3] += 9;
        let last = with.len() - 1;
        with[last] = 1;
        with.extend([2, b'e', b'n', 0, 0, 0, 2, b'h', b'i']);
        assert_eq!(bytes_of(&Frame::Final(translated.clone())), with);
        assert_eq!(decode_all(&with), Ok(Some(Frame::Final(translated))));
        // No model for the pair: flag 2, the language and the reason.
        let unavailable = Final {
            translation: Some(Translated::Unavailable {
                language: "de".into(),
                reason: "no".into(),
            }),
            ..fin.clone()
        };
        let mut without = expected.clone();
        without[3] += 7;
        without[last] = 2;
        without.extend([2, b'd', b'e', 0, 2, b'n', b'o']);
        assert_eq!(bytes_of(&Frame::Final(unavailable.clone())), without);
        assert_eq!(decode_all(&without), Ok(Some(Frame::Final(unavailable))));
        // Segments: a trailing count, then start and end (ms) and text each.
        let segmented = Final {
            segments: vec![Segment {
                start_ms: 20,
                end_ms: 1_500,
                text: "hé".into(),
            }],
            ..fin.clone()
        };
        let mut timed = expected.clone();
        timed[3] += 17;
        timed.extend([
            0, 1, 0, 0, 0, 20, 0, 0, 0x05, 0xdc, 0, 0, 0, 3, b'h', 0xc3, 0xa9,
        ]);
        assert_eq!(bytes_of(&Frame::Final(segmented.clone())), timed);
        assert_eq!(decode_all(&timed), Ok(Some(Frame::Final(segmented))));
        // Words without segments: an empty segment section, then the words
        // in the same layout.
        let worded = Final {
            words: vec![Segment {
                start_ms: 20,
                end_ms: 1_500,
                text: "hé".into(),
            }],
            ..fin.clone()
        };
        let mut spoken = expected.clone();
        spoken[3] += 19;
        spoken.extend([
            0, 0, 0, 1, 0, 0, 0, 20, 0, 0, 0x05, 0xdc, 0, 0, 0, 3, b'h', 0xc3, 0xa9,
        ]);
        assert_eq!(bytes_of(&Frame::Final(worded.clone())), spoken);
        assert_eq!(decode_all(&spoken), Ok(Some(Frame::Final(worded))));
        // A model digest alone: empty segment and word sections, flag 1,
        // the 32 bytes.
        let digested = Final {
            model_sha256: Some([7; 32]),
            ..fin.clone()
        };
        let mut hashed = expected.clone();
        hashed[3] += 4 + 1 + 32;
        hashed.extend([0, 0, 0, 0, 1]);
        hashed.extend([7; 32]);
        assert_eq!(bytes_of(&Frame::Final(digested.clone())), hashed);
        assert_eq!(decode_all(&hashed), Ok(Some(Frame::Final(digested))));
        // A span alone: empty segments and words, no digest, flag 1, start
        // and end.
        let placed = Final {
            span: Some((1_000, 2_500)),
            ..fin.clone()
        };
        let mut spanned = expected.clone();
        spanned[3] += 2 + 2 + 1 + 1 + 8;
        spanned.extend([0, 0, 0, 0, 0, 1, 0, 0, 0x03, 0xe8, 0, 0, 0x09, 0xc4]);
        assert_eq!(bytes_of(&Frame::Final(placed.clone())), spanned);
        assert_eq!(decode_all(&spanned), Ok(Some(Frame::Final(placed))));
        // A receipt without a digest: flag 0 for the digest, then the
        // claims' JSON, the scheme and two byte strings.
        let claims = crate::receipt::Claims {
            region: "r".into(),
            region_jurisdiction: "eu".into(),
            session: "s".into(),
            session_jurisdiction: "eu".into(),
            edge: "e".into(),
            utterance: 1,
            model: "m@1".into(),
            model_sha256: String::new(),
            audio_sha256: String::new(),
            text_sha256: String::new(),
            issued_at_ms: 5,
        };
        let json = serde_json::to_vec(&claims).unwrap();
        let signed = Final {
            receipt: Some(Box::new(Receipt {
                claims,
                scheme: 0x0403,
                signature: vec![0xaa, 0xbb],
                certificate: vec![0xcc],
            })),
            ..fin.clone()
        };
        let mut receipted = expected.clone();
        receipted.extend([0, 0, 0, 0, 0, 0]);
        receipted.extend((json.len() as u16).to_be_bytes());
        receipted.extend(&json);
        receipted.extend([0x04, 0x03, 0, 2, 0xaa, 0xbb, 0, 1, 0xcc]);
        let len = (receipted.len() - 4) as u32;
        receipted[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(bytes_of(&Frame::Final(signed.clone())), receipted);
        assert_eq!(decode_all(&receipted), Ok(Some(Frame::Final(signed))));
        // Claims that are not the documented JSON are refused.
        let mut forged = receipted.clone();
        let at = expected.len() + 6 + 2;
        forged[at] = b'[';
        assert_eq!(decode_all(&forged), Err(FrameError::InvalidReceipt));
        // A count the body does not hold is an error, not a short list.
        let mut short = expected.clone();
        short[3] += 2;
        short.extend([0, 1]);
        assert!(decode_all(&short).is_err());
        // Any other flag is invalid, not "present".
        let mut bad = expected.clone();
        bad[last] = 3;
        assert_eq!(
            decode_all(&bad),
            Err(FrameError::InvalidFlag {
                what: "translation",
                value: 3
            })
        );

        let err = [
            0, 0, 0, 25, 0x11, 0, 0, 0, 3, 17, b'r', b'e', b's', b'i', b'd', b'e', b'n', b'c',
            b'y', b'_', b'r', b'e', b'f', b'u', b's', b'e', b'd', 0, 0,
        ];
        assert_eq!(
            decode_all(&err),
            Ok(Some(Frame::Error(WireError {
                utterance: 3,
                code: ErrorCode::ResidencyRefused,
                message: String::new()
            })))
        );
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let full = bytes_of(&Frame::Header(header()));
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn two_frames_in_one_buffer_decode_in_order() {
        let mut buf = BytesMut::new();
        Frame::Audio(Bytes::from_static(&[1, 2]))
            .encode(&mut buf)
            .unwrap();
        Frame::End {
            audio_sha256: [0; 32],
        }
        .encode(&mut buf)
        .unwrap();
        buf.extend_from_slice(&[0, 0]); // start of a third frame
        assert!(matches!(decode(&mut buf), Ok(Some(Frame::Audio(_)))));
        assert!(matches!(decode(&mut buf), Ok(Some(Frame::End { .. }))));
        assert_eq!(decode(&mut buf), Ok(None));
        assert_eq!(buf.len(), 2);
    }

    #[test]
    fn malformed_frames_are_rejected() {
        assert_eq!(decode_all(&[0, 0, 0, 0]), Err(FrameError::Empty));
        assert_eq!(
            decode_all(&[0, 0x10, 0, 1]),
            Err(FrameError::TooLarge(0x0010_0001))
        );
        assert_eq!(
            decode_all(&[0xff, 0xff, 0xff, 0xff, 0]),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        assert_eq!(
            decode_all(&[0, 0, 0, 1, 0x7f]),
            Err(FrameError::UnknownType(0x7f))
        );
        assert_eq!(
            decode_all(&[0, 0, 0, 3, 0x01, 0x03, 0xab]),
            Err(FrameError::Truncated {
                kind: 1,
                what: "session id"
            })
        );
        assert_eq!(
            decode_all(&[0, 0, 0, 2, 0x01, 0x09]),
            Err(FrameError::Version(9))
        );
        let mut end = vec![0, 0, 0, 34, 0x03];
        end.extend([0; 33]);
        assert_eq!(
            decode_all(&end),
            Err(FrameError::Trailing { kind: 3, extra: 1 })
        );
        // An error frame whose code claims more bytes than it has.
        assert_eq!(
            decode_all(&[0, 0, 0, 7, 0x11, 0, 0, 0, 1, 5, b'x']),
            Err(FrameError::Truncated {
                kind: 0x11,
                what: "code"
            })
        );
        // Invalid UTF-8 in a string field.
        let mut bad = bytes_of(&Frame::Header(header()));
        let last_of_language = bad.len() - 2; // the last byte is translate's length
        bad[last_of_language] = 0xff;
        assert_eq!(
            decode_all(&bad),
            Err(FrameError::InvalidUtf8 { what: "language" })
        );
    }

    #[test]
    fn encode_refuses_oversized_strings_and_frames() {
        let mut h = header();
        h.edge = "x".repeat(256);
        let mut buf = BytesMut::new();
        assert!(matches!(
            Frame::Header(h).encode(&mut buf),
            Err(FrameError::StringTooLong { what: "edge", .. })
        ));
        assert!(buf.is_empty());
        let big = Frame::Audio(Bytes::from(vec![0; MAX_FRAME_LEN]));
        assert_eq!(
            big.encode(&mut buf),
            Err(FrameError::TooLarge(MAX_FRAME_LEN + 1))
        );
    }

    #[test]
    fn long_error_messages_are_truncated_on_a_char_boundary() {
        let e = Frame::Error(WireError {
            utterance: 1,
            code: ErrorCode::Timeout,
            message: "é".repeat(40_000),
        });
        let bytes = bytes_of(&e);
        match decode_all(&bytes) {
            Ok(Some(Frame::Error(w))) => assert_eq!(w.message.len(), 65_534),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_error_codes_decode_as_unknown() {
        assert_eq!(ErrorCode::parse("flux_capacitor"), ErrorCode::Unknown);
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), code);
        }
    }

    #[test]
    fn assembler_collects_an_utterance_in_chunks() {
        let audio = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let mut wire = encode_utterance(&header(), &audio, [3; 32]).unwrap();
        let mut asm = Assembler::new(1 << 20);
        let mut got = None;
        while let Some(frame) = decode(&mut wire).unwrap() {
            if let Some(u) = asm.push(frame).unwrap() {
                got = Some(u);
            }
        }
        let u = got.unwrap();
        assert_eq!(u.header, header());
        assert_eq!(u.audio, audio);
        assert_eq!(u.audio_sha256, [3; 32]);
    }

    #[test]
    fn assembler_enforces_order_and_limits() {
        let mut asm = Assembler::new(4);
        assert_eq!(
            asm.push(Frame::Audio(Bytes::new())),
            Err(AssembleError::HeaderFirst("audio"))
        );
        let mut asm = Assembler::new(4);
        asm.push(Frame::Header(header())).unwrap();
        assert_eq!(
            asm.push(Frame::Header(header())),
            Err(AssembleError::Unexpected("header"))
        );
        let mut asm = Assembler::new(4);
        asm.push(Frame::Header(header())).unwrap();
        asm.push(Frame::Audio(Bytes::from_static(&[1, 2, 3, 4])))
            .unwrap();
        let err = asm
            .push(Frame::Audio(Bytes::from_static(&[5, 6])))
            .unwrap_err();
        assert_eq!(err, AssembleError::TooLong { max: 4 });
        assert_eq!(err.code(), ErrorCode::AudioTooLong);
        let mut asm = Assembler::new(4);
        asm.push(Frame::Header(header())).unwrap();
        asm.push(Frame::Audio(Bytes::from_static(&[1]))).unwrap();
        assert_eq!(
            asm.push(Frame::End {
                audio_sha256: [0; 32]
            }),
            Err(AssembleError::OddAudio(1))
        );
    }
}
