//! `POST /v1/audio/transcriptions` and `POST /v1/audio/translations`: whole
//! files in the OpenAI API's shape.
//!
//! The file is decoded (WAV: 8/16/24/32-bit PCM and 32-bit float; FLAC,
//! Ogg Vorbis and MP3 through symphonia), converted to 16 kHz mono by the
//! same resampler as streams, cut into utterances by the same VAD and
//! endpointer, and each utterance goes through the same uplink as a
//! session's: permitted regions only, failover, receipts checked. The
//! answer is the utterances' finals joined, in the format asked for.
//! Errors have OpenAI's shape: `{"error":{"message","type","param","code"}}`.

use std::sync::Arc;

use axum::extract::{Multipart, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use earshot_common::audio::f32_to_s16le;
use earshot_common::client::SegmentMessage;
use earshot_common::wire::{self, Header};
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::EdgeInner;
use crate::endpoint::{Endpointer, Segment};
use crate::resample::{RATES, ToMono16k};
use crate::session::{Delivered, check_receipt, to_client};
use crate::uplink::UplinkError;
use crate::vad::{VadStream, WINDOW};

/// Utterances of one file in flight to regions at once.
const IN_FLIGHT: usize = 4;
/// Longest text field (model, language, prompt, …) read.
const MAX_FIELD: usize = 4096;

/// What the answer looks like (`response_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

impl Format {
    fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "json" => Format::Json,
            "text" => Format::Text,
            "verbose_json" => Format::VerboseJson,
            "srt" => Format::Srt,
            "vtt" => Format::Vtt,
            _ => return None,
        })
    }
}

/// An error in the OpenAI API's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: &'static str,
    retry_after: Option<u32>,
}

impl ApiError {
    fn invalid(param: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
            code,
            retry_after: None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = serde_json::to_string(&ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind,
                param: self.param,
                code: self.code,
            },
        })
        .unwrap_or_default();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = secs.to_string().parse()
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// The form of one request.
#[derive(Debug)]
struct Form {
    file: Bytes,
    language: Option<String>,
    format: Format,
    words: bool,
    segments: bool,
}

pub async fn transcriptions(State(edge): State<Arc<EdgeInner>>, form: Multipart) -> Response {
    handle(edge, form, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn translations(State(edge): State<Arc<EdgeInner>>, form: Multipart) -> Response {
    handle(edge, form, true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn handle(
    edge: Arc<EdgeInner>,
    multipart: Multipart,
    translate: bool,
) -> Result<Response, ApiError> {
    // A file takes a session's place while it is processed.
    let permit = edge.sessions.clone().try_acquire_owned();
    let Ok(_permit) = permit
        .ok()
        .filter(|_| !edge.shutdown.is_cancelled())
        .ok_or(())
    else {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "this edge is draining or at its limit of {} sessions: retry after {} s",
                edge.config.limits.max_sessions, edge.config.limits.retry_after_s
            ),
            param: None,
            code: "server_busy",
            retry_after: Some(edge.config.limits.retry_after_s),
        });
    };
    let form = read_form(multipart, edge.config.limits.max_file_bytes).await?;
    let counted = |outcome: &'static str| {
        edge.metrics
            .files
            .get_or_create(&crate::metrics::ReasonLabel { reason: outcome })
            .inc();
    };
    let audio =
        match tokio::task::spawn_blocking(move || decode(&form.file).map(|a| (a, form))).await {
            Ok(Ok(decoded)) => decoded,
            Ok(Err(e)) => {
                counted("bad_file");
                return Err(e);
            }
            Err(e) => {
                counted("error");
                return Err(internal(format!("decoding failed: {e}")));
            }
        };
    let (samples, form) = audio;
    let result = transcribe(&edge, &samples, &form, translate).await;
    counted(if result.is_ok() { "ok" } else { "error" });
    let parts = result?;
    Ok(render(&form, &parts, samples.len(), translate))
}

fn internal(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        param: None,
        code: "internal_error",
        retry_after: None,
    }
}

async fn read_form(mut multipart: Multipart, max_file: usize) -> Result<Form, ApiError> {
    let bad_form = |e: axum::extract::multipart::MultipartError| {
        ApiError::invalid(
            "file",
            "invalid_form",
            format!("the request is not a valid multipart form: {e}"),
        )
    };
    let mut file = None;
    let mut language = None;
    let mut format = Format::Json;
    let mut words = false;
    let mut segments = false;
    let mut granularities = false;
    while let Some(mut field) = multipart.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let mut data = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
                if data.len() + chunk.len() > max_file {
                    return Err(ApiError {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        message: format!(
                            "the file is larger than this edge's limit of {max_file} bytes"
                        ),
                        param: Some("file"),
                        code: "file_too_large",
                        retry_after: None,
                    });
                }
                data.extend_from_slice(&chunk);
            }
            file = Some(Bytes::from(data));
            continue;
        }
        let mut value = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
            value.extend_from_slice(&chunk);
            if value.len() > MAX_FIELD {
                return Err(ApiError::invalid(
                    "file",
                    "invalid_form",
                    format!("form field {name:?} is longer than {MAX_FIELD} bytes"),
                ));
            }
        }
        let value = String::from_utf8_lossy(&value).trim().to_owned();
        match name.as_str() {
            // Any model name is taken: the edge serves the model its
            // regions run (named in verbose_json and in every receipt).
            "model" | "prompt" | "temperature" => {}
            "language" if value.is_empty() => {}
            "language" => {
                if !earshot_common::client::is_language_code(&value) {
                    return Err(ApiError::invalid(
                        "language",
                        "invalid_language",
                        format!("language {value:?} must be an ISO 639-1 code such as \"en\""),
                    ));
                }
                language = Some(value);
            }
            "response_format" => {
                format = Format::parse(&value).ok_or_else(|| {
                    ApiError::invalid("response_format", "invalid_response_format", format!("response_format {value:?} must be one of json, text, verbose_json, srt, vtt"))
                })?;
            }
            "timestamp_granularities[]" | "timestamp_granularities" => {
                granularities = true;
                match value.as_str() {
                    "word" => words = true,
                    "segment" => segments = true,
                    _ => {
                        return Err(ApiError::invalid(
                            "timestamp_granularities",
                            "invalid_timestamp_granularities",
                            format!("timestamp granularity {value:?} must be word or segment"),
                        ));
                    }
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    "file",
                    "unknown_parameter",
                    format!(
                        "unknown form field {:?}: known are file, model, language, prompt, response_format, temperature, timestamp_granularities[]",
                        name.chars().take(32).collect::<String>()
                    ),
                ));
            }
        }
    }
    let Some(file) = file else {
        return Err(ApiError::invalid(
            "file",
            "missing_file",
            "the form has no `file` field: send the audio as multipart field `file`",
        ));
    };
    if granularities && format != Format::VerboseJson {
        return Err(ApiError::invalid(
            "timestamp_granularities",
            "invalid_timestamp_granularities",
            "timestamp_granularities need response_format verbose_json",
        ));
    }
    // verbose_json has segments unless only words were asked for.
    if format == Format::VerboseJson && !granularities {
        segments = true;
    }
    if matches!(format, Format::Srt | Format::Vtt) {
        segments = true;
    }
    Ok(Form {
        file,
        language,
        format,
        words,
        segments,
    })
}

/// The file as 16 kHz mono samples.
fn decode(file: &Bytes) -> Result<Vec<f32>, ApiError> {
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
    use symphonia::core::errors::Error;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let not_audio = |why: String| ApiError::invalid("file", "invalid_file", why);
    if file.is_empty() {
        return Err(not_audio("the file is empty".into()));
    }
    // The request's bytes themselves, not a copy.
    let source = MediaSourceStream::new(
        Box::new(std::io::Cursor::new(file.clone())),
        Default::default(),
    );
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| {
            not_audio(format!(
                "the file is not audio this edge can read (WAV, FLAC, Ogg Vorbis, MP3): {e}"
            ))
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| not_audio("the file has no audio track".into()))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let rate = params
        .sample_rate
        .ok_or_else(|| not_audio("the file does not say its sample rate".into()))?;
    let channels = params.channels.map_or(1, |c| c.count());
    if !RATES.contains(&rate) {
        return Err(ApiError::invalid(
            "file",
            "unsupported_sample_rate",
            format!("sample rate {rate} is not supported: use one of {RATES:?} Hz"),
        ));
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| not_audio(format!("cannot decode the file's audio: {e}")))?;
    // Downmix to mono here (any channel count), then resample.
    let mut converter = ToMono16k::new(rate, 1).map_err(|e| not_audio(e.to_string()))?;
    let mut out = Vec::new();
    let mut buffer: Option<SampleBuffer<f32>> = None;
    let mut decoded_any = false;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) if decoded_any => {
                // Trailing damage after good audio: keep what was read.
                tracing::info!(error = %e, "file ends in unreadable data");
                break;
            }
            Err(e) => return Err(not_audio(format!("the file's audio cannot be read: {e}"))),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let audio = match decoder.decode(&packet) {
            Ok(a) => a,
            Err(Error::DecodeError(e)) => {
                tracing::info!(error = %e, "skipping an undecodable packet");
                continue;
            }
            Err(e) => return Err(not_audio(format!("cannot decode the file's audio: {e}"))),
        };
        decoded_any = true;
        let spec = *audio.spec();
        let frames = audio.capacity() as u64;
        let buf = buffer.get_or_insert_with(|| SampleBuffer::new(frames, spec));
        if buf.capacity() < audio.frames() * spec.channels.count() {
            *buf = SampleBuffer::new(frames, spec);
        }
        buf.copy_interleaved_ref(audio);
        let mono: Vec<f32> = buf
            .samples()
            .chunks_exact(channels.max(1))
            .map(|f| f.iter().sum::<f32>() / f.len() as f32)
            .collect();
        out.extend(converter.push(&mono).map_err(|e| internal(e.to_string()))?);
    }
    out.extend(converter.flush().map_err(|e| internal(e.to_string()))?);
    if out.is_empty() {
        return Err(not_audio(
            "the file holds no audio samples (truncated?)".into(),
        ));
    }
    Ok(out)
}

/// One utterance's answer, in file seconds.
struct Part {
    delivered: Delivered,
}

async fn transcribe(
    edge: &Arc<EdgeInner>,
    samples: &[f32],
    form: &Form,
    translate: bool,
) -> Result<Vec<Part>, ApiError> {
    // The same VAD and endpointer as a session, over the whole file.
    let mut stream = VadStream::default();
    let whole = samples.len() / WINDOW * WINDOW;
    let probabilities = edge
        .vad
        .probabilities(&mut stream, samples[..whole].to_vec())
        .await
        .map_err(|e| internal(format!("voice detection failed: {e}")))?;
    let mut endpointer = Endpointer::new(edge.config.endpoint());
    let mut cuts: Vec<Segment> = Vec::new();
    for (i, p) in probabilities.iter().enumerate() {
        let start = (i * WINDOW) as u64;
        if let Some(s) = endpointer.push(*p, start, start + WINDOW as u64) {
            cuts.push(s);
        }
    }
    cuts.extend(endpointer.finalize(samples.len() as u64));
    let session = uuid::Uuid::new_v4();
    let session_text = session.to_string();
    tracing::info!(session = %session, utterances = cuts.len(), seconds = samples.len() as f64 / 16_000.0, "file cut");
    let requests = cuts.into_iter().enumerate().map(|(i, cut)| {
        let pcm = Bytes::from(f32_to_s16le(
            &samples[cut.start as usize..(cut.end as usize).min(samples.len())],
        ));
        let sha: [u8; 32] = Sha256::digest(&pcm).into();
        let header = Header {
            session: *session.as_bytes(),
            utterance: i as u32 + 1,
            jurisdiction: edge.jurisdiction.clone(),
            edge: edge.name.clone(),
            language: form.language.clone().unwrap_or_default(),
            translate: if translate {
                "en".into()
            } else {
                String::new()
            },
            timestamps: form.segments,
            words: form.words,
            resume: false,
            span: None,
            sample_rate: wire::SAMPLE_RATE,
        };
        let uplink = edge.uplink.clone();
        async move {
            let sent = Instant::now();
            let result = uplink.transcribe(&header, &pcm, sha).await;
            (header.utterance, cut, sent.elapsed(), result)
        }
    });
    let mut answers = futures::stream::iter(requests).buffered(IN_FLIGHT);
    let mut parts = Vec::new();
    while let Some((number, cut, latency, result)) = answers.next().await {
        let answer = result.map_err(|e| match e {
            UplinkError::Unavailable { retry_after, .. } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                param: None,
                code: "unavailable",
                retry_after: Some(retry_after.as_secs_f64().ceil() as u32),
            },
            other => ApiError {
                status: StatusCode::BAD_GATEWAY,
                message: other.to_string(),
                param: None,
                code: "utterance_failed",
                retry_after: None,
            },
        })?;
        let delivered = to_client(number, cut, latency, answer, form.segments, form.words);
        check_receipt(edge, &delivered.fin, &session_text).map_err(|why| ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: format!(
                "region {}'s answer was withheld: {why}",
                delivered.fin.region
            ),
            param: None,
            code: "utterance_failed",
            retry_after: None,
        })?;
        tracing::info!(utterance = number, region = %delivered.fin.region, text = %earshot_common::telemetry::content(&delivered.fin.text), "file utterance");
        parts.push(Part { delivered });
    }
    Ok(parts)
}

impl Part {
    fn text(&self, translate: bool) -> &str {
        match (&self.delivered.translation, translate) {
            (Some(t), true) => &t.text,
            _ => &self.delivered.fin.text,
        }
    }
}

#[derive(Serialize)]
struct Verbose<'a> {
    task: &'static str,
    language: String,
    duration: f64,
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    segments: Option<Vec<VerboseSegment<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    words: Option<Vec<VerboseWord<'a>>>,
}

#[derive(Serialize)]
struct VerboseSegment<'a> {
    id: usize,
    start: f64,
    end: f64,
    text: &'a str,
}

#[derive(Serialize)]
struct VerboseWord<'a> {
    word: &'a str,
    start: f64,
    end: f64,
}

fn render(form: &Form, parts: &[Part], samples: usize, translate: bool) -> Response {
    let text = parts
        .iter()
        .map(|p| p.text(translate).trim())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    // Segments: Whisper's own (file seconds); for a translation, one per
    // utterance (the translation has no timestamps of its own).
    let segments: Vec<(f64, f64, &str)> = if translate {
        parts
            .iter()
            .map(|p| {
                (
                    p.delivered.fin.start,
                    p.delivered.fin.end,
                    p.text(true).trim(),
                )
            })
            .filter(|s| !s.2.is_empty())
            .collect()
    } else {
        parts
            .iter()
            .flat_map(|p| p.delivered.fin.segments.iter().flatten())
            .map(|s: &SegmentMessage| (s.start, s.end, s.text.trim()))
            .filter(|s| !s.2.is_empty())
            .collect()
    };
    let (body, content_type) = match form.format {
        Format::Json => (
            serde_json::json!({ "text": text }).to_string(),
            "application/json",
        ),
        Format::Text => (format!("{text}\n"), "text/plain; charset=utf-8"),
        Format::VerboseJson => {
            let language = if translate {
                "en".to_owned()
            } else {
                parts
                    .iter()
                    .find_map(|p| p.delivered.fin.language.clone())
                    .or_else(|| form.language.clone())
                    .unwrap_or_default()
            };
            let verbose = Verbose {
                task: if translate { "translate" } else { "transcribe" },
                language,
                duration: samples as f64 / 16_000.0,
                text,
                segments: form.segments.then(|| {
                    segments
                        .iter()
                        .enumerate()
                        .map(|(id, (start, end, text))| VerboseSegment {
                            id,
                            start: *start,
                            end: *end,
                            text,
                        })
                        .collect()
                }),
                words: form.words.then(|| {
                    parts
                        .iter()
                        .flat_map(|p| p.delivered.fin.words.iter().flatten())
                        .map(|w| VerboseWord {
                            word: w.text.trim(),
                            start: w.start,
                            end: w.end,
                        })
                        .collect()
                }),
            };
            (
                serde_json::to_string(&verbose).unwrap_or_default(),
                "application/json",
            )
        }
        Format::Srt => (subtitles(&segments, false), "application/x-subrip"),
        Format::Vtt => (subtitles(&segments, true), "text/vtt"),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// SubRip (`vtt` false) or WebVTT cues, one per segment.
fn subtitles(segments: &[(f64, f64, &str)], vtt: bool) -> String {
    let stamp = |t: f64| {
        let ms = (t.max(0.0) * 1000.0).round() as u64;
        let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        if vtt {
            format!("{h:02}:{m:02}:{s:02}.{ms:03}")
        } else {
            format!("{h:02}:{m:02}:{s:02},{ms:03}")
        }
    };
    let mut out = String::new();
    if vtt {
        out.push_str("WEBVTT\n\n");
    }
    for (i, (start, end, text)) in segments.iter().enumerate() {
        if !vtt {
            out.push_str(&format!("{}\n", i + 1));
        }
        out.push_str(&format!(
            "{} --> {}\n{text}\n\n",
            stamp(*start),
            stamp(*end)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtitles_have_each_format_s_stamps() {
        let segs = [(0.0, 1.5, "Hello."), (3661.25, 3662.0, "Again.")];
        assert_eq!(
            subtitles(&segs, false),
            "1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n2\n01:01:01,250 --> 01:01:02,000\nAgain.\n\n"
        );
        assert_eq!(
            subtitles(&segs, true),
            "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n\n01:01:01.250 --> 01:01:02.000\nAgain.\n\n"
        );
    }

    fn wav(bits: u16, float: bool, channels: u16, rate: u32, frames: &[f32]) -> Vec<u8> {
        let bytes_per = usize::from(bits / 8);
        let mut data = Vec::new();
        for &x in frames {
            for _ in 0..channels {
                match (bits, float) {
                    (32, true) => data.extend_from_slice(&x.to_le_bytes()),
                    (8, _) => data.push(((x * 127.0) + 128.0) as u8),
                    (16, _) => data.extend_from_slice(&((x * 32767.0) as i16).to_le_bytes()),
                    (24, _) => {
                        data.extend_from_slice(&((x * 8_388_607.0) as i32).to_le_bytes()[..3])
                    }
                    _ => data.extend_from_slice(
                        &((f64::from(x) * 2_147_483_647.0) as i32).to_le_bytes(),
                    ),
                }
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&(if float { 3u16 } else { 1u16 }).to_le_bytes());
        out.extend_from_slice(&channels.to_le_bytes());
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&(rate * u32::from(channels) * bytes_per as u32).to_le_bytes());
        out.extend_from_slice(&(channels * bits / 8).to_le_bytes());
        out.extend_from_slice(&bits.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn wav_of_every_sample_format_decodes_to_the_same_tone() {
        let tone: Vec<f32> = (0..24_000)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 24_000.0).sin())
            .collect();
        for (bits, float) in [
            (8, false),
            (16, false),
            (24, false),
            (32, false),
            (32, true),
        ] {
            for channels in [1, 2] {
                let file = wav(bits, float, channels, 24_000, &tone);
                let out = decode(&Bytes::from(file))
                    .unwrap_or_else(|e| panic!("{bits} bit {float}: {e:?}"));
                assert_eq!(out.len(), 16_000, "{bits} bit");
                // 440 Hz at 16 kHz, compared sample by sample mid-file.
                let tolerance = if bits == 8 { 0.02 } else { 0.002 };
                for (i, v) in out.iter().enumerate().skip(1000).take(14_000) {
                    let ideal =
                        0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin();
                    assert!(
                        (v - ideal).abs() < tolerance,
                        "{bits} bit, sample {i}: {v} vs {ideal}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_files_are_refused_with_a_code() {
        let code = |file: &[u8]| decode(&Bytes::copy_from_slice(file)).unwrap_err().code;
        assert_eq!(code(b""), "invalid_file");
        assert_eq!(code(b"this is not audio at all, just text"), "invalid_file");
        let good = wav(16, false, 1, 16_000, &[0.1; 1600]);
        // Header only: no samples.
        assert_eq!(code(&good[..44]), "invalid_file");
        // Cut inside the header.
        assert_eq!(code(&good[..20]), "invalid_file");
        let odd_rate = wav(16, false, 1, 11_025, &[0.1; 1600]);
        assert_eq!(code(&odd_rate), "unsupported_sample_rate");
    }
}
