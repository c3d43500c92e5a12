//! A small `/v1/listen` client: streams PCM, ends the session with
//! `{"type":"close"}`, and collects what the edge sends until it closes.

use std::time::{Duration, Instant};

use anyhow::Context;
use earshot_common::client::ServerMessage;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Everything a session produced.
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    pub messages: Vec<ServerMessage>,
    /// The close frame's code and reason, if the edge sent one.
    pub close: Option<(u16, String)>,
    /// When the first audio frame was sent.
    pub started_at: Option<Instant>,
    /// When the edge closed the session (or the connection ended).
    pub closed_at: Option<Instant>,
    /// Why the connection broke without a close frame, if it did.
    pub broken: Option<String>,
}

impl Transcript {
    pub fn finals(&self) -> Vec<&earshot_common::client::FinalMessage> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Final(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    pub fn errors(&self) -> Vec<&earshot_common::client::ErrorMessage> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Error(e) => Some(e),
                _ => None,
            })
            .collect()
    }
}

/// How to send the audio.
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    /// Bytes per binary frame.
    pub chunk_bytes: usize,
    /// Send frame `i` at `i × pace` after the first (real-time pacing,
    /// without drift); `None` sends as fast as the edge reads.
    pub pace: Option<Duration>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        // 100 ms of 16 kHz s16le per frame.
        StreamOptions {
            chunk_bytes: 3_200,
            pace: None,
        }
    }
}

/// Streams `pcm` to `url` and returns what the edge sent. `on_message` sees
/// each message as it arrives.
pub async fn stream(
    url: &str,
    pcm: &[u8],
    options: StreamOptions,
    mut on_message: impl FnMut(&ServerMessage),
) -> anyhow::Result<Transcript> {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let (mut sink, mut source) = socket.split();
    let chunks: Vec<Vec<u8>> = pcm
        .chunks(options.chunk_bytes.max(2))
        .map(<[u8]>::to_vec)
        .collect();

    let started_at = Instant::now();
    let sender = async move {
        for (i, chunk) in chunks.into_iter().enumerate() {
            if let Some(pace) = options.pace {
                let at = started_at + pace.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
                tokio::time::sleep_until(at.into()).await;
            }
            if sink.send(Message::Binary(chunk.into())).await.is_err() {
                return sink;
            }
        }
        let _ = sink.send(Message::Text(r#"{"type":"close"}"#.into())).await;
        sink
    };
    let receiver = async {
        let mut out = Transcript {
            started_at: Some(started_at),
            ..Transcript::default()
        };
        while let Some(msg) = source.next().await {
            match msg {
                Ok(Message::Text(text)) => {
                    let parsed: ServerMessage = serde_json::from_str(&text)
                        .with_context(|| format!("edge sent an undocumented message: {text}"))?;
                    on_message(&parsed);
                    out.messages.push(parsed);
                }
                Ok(Message::Close(frame)) => {
                    out.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    break;
                }
                Ok(_) => {}
                // The connection broke: keep what arrived before.
                Err(e) => {
                    out.broken = Some(e.to_string());
                    break;
                }
            }
        }
        out.closed_at = Some(Instant::now());
        Ok(out)
    };
    let (mut sink, out) = tokio::join!(sender, receiver);
    let _ = sink.close().await;
    out
}
