//! The region's utterance queue on Redis Streams, and result fan-in.
//!
//! - Jobs: `XADD earshot:{region}:utterances MAXLEN ~ N * field value …`,
//!   audio as a binary field. Workers read them in consumer group `asr`.
//! - Results: a worker `PUBLISH`es `request id (16 bytes) ‖ wire frame` on
//!   the channel named in the job's `reply` field. Each ingress process has
//!   one channel and one subscriber connection for all its requests
//!   ([`ResultRouter`]), so Redis connections do not grow with clients.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use earshot_common::client::hex;
use earshot_common::retry::Backoff;
use earshot_common::wire::Header;
use futures::StreamExt;
use redis::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Consumer group of the ASR workers.
pub const GROUP: &str = "asr";

/// Redis key of a region's utterance stream.
pub fn stream_key(region: &str) -> String {
    format!("earshot:{region}:utterances")
}

/// Pub/sub channel of one ingress process.
pub fn results_channel(region: &str, ingress: &str) -> String {
    format!("earshot:{region}:results:{ingress}")
}

/// One queued utterance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Routes the result back to the waiting stream.
    pub request: [u8; 16],
    /// Channel to publish the result on.
    pub reply: String,
    pub header: Header,
    pub audio: Bytes,
    /// SHA-256 of `audio`, as the edge computed it.
    pub audio_sha256: [u8; 32],
    /// Unix time of enqueueing, in microseconds.
    pub enqueued_us: u64,
}

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Job {
    /// The stream entry's fields. Everything but `audio` is text, so the
    /// stream stays readable with `redis-cli`.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let h = &self.header;
        vec![
            ("request", hex(&self.request).into_bytes()),
            ("reply", self.reply.clone().into_bytes()),
            ("session", hex(&h.session).into_bytes()),
            ("utterance", h.utterance.to_string().into_bytes()),
            ("jurisdiction", h.jurisdiction.clone().into_bytes()),
            ("edge", h.edge.clone().into_bytes()),
            ("language", h.language.clone().into_bytes()),
            ("translate", h.translate.clone().into_bytes()),
            (
                "timestamps",
                if h.timestamps {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                },
            ),
            (
                "words",
                if h.words {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                },
            ),
            ("sample_rate", h.sample_rate.to_string().into_bytes()),
            ("sha256", hex(&self.audio_sha256).into_bytes()),
            ("enqueued_us", self.enqueued_us.to_string().into_bytes()),
            ("audio", self.audio.to_vec()),
        ]
    }

    /// Parses a stream entry. Fails, naming the field, on anything missing or
    /// malformed.
    pub fn from_fields(map: &HashMap<String, Value>) -> Result<Job, String> {
        let bytes = |name: &str| -> Result<Vec<u8>, String> {
            match map.get(name) {
                Some(Value::BulkString(b)) => Ok(b.clone()),
                Some(Value::SimpleString(s)) => Ok(s.clone().into_bytes()),
                _ => Err(format!("field {name} missing")),
            }
        };
        let text = |name: &str| -> Result<String, String> {
            String::from_utf8(bytes(name)?).map_err(|_| format!("field {name} is not UTF-8"))
        };
        let number = |name: &str| -> Result<u64, String> {
            text(name)?
                .parse()
                .map_err(|_| format!("field {name} is not a number"))
        };
        Ok(Job {
            request: unhex(&text("request")?).ok_or("field request is not 16 hex bytes")?,
            reply: text("reply")?,
            header: Header {
                session: unhex(&text("session")?).ok_or("field session is not 16 hex bytes")?,
                utterance: u32::try_from(number("utterance")?)
                    .map_err(|_| "utterance out of range")?,
                jurisdiction: text("jurisdiction")?,
                edge: text("edge")?,
                language: text("language")?,
                // Absent in entries queued by an ingress older than wire v2.
                translate: text("translate").unwrap_or_default(),
                // Absent in entries queued before timestamps existed.
                timestamps: text("timestamps").is_ok_and(|t| t == "1"),
                words: text("words").is_ok_and(|t| t == "1"),
                sample_rate: u32::try_from(number("sample_rate")?)
                    .map_err(|_| "sample rate out of range")?,
            },
            audio_sha256: unhex(&text("sha256")?).ok_or("field sha256 is not 32 hex bytes")?,
            enqueued_us: number("enqueued_us")?,
            audio: Bytes::from(bytes("audio")?),
        })
    }
}

/// Parses lowercase or uppercase hex into exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// Appends a job to the stream; returns the entry id.
pub async fn enqueue(
    conn: &mut redis::aio::ConnectionManager,
    stream: &str,
    max_len: usize,
    job: &Job,
) -> redis::RedisResult<String> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("MAXLEN").arg("~").arg(max_len).arg("*");
    for (k, v) in job.to_fields() {
        cmd.arg(k).arg(v);
    }
    cmd.query_async(conn).await
}

/// Pending result waits, keyed by request id. Dropping the receiver (the
/// stream gave up) leaves a sender that is removed on the next sweep.
#[derive(Debug)]
pub struct ResultRouter {
    channel: String,
    waiters: std::sync::Mutex<HashMap<[u8; 16], oneshot::Sender<Bytes>>>,
    subscribed: AtomicBool,
}

impl ResultRouter {
    pub fn new(channel: String) -> Arc<Self> {
        Arc::new(ResultRouter {
            channel,
            waiters: std::sync::Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether the subscriber is connected: results can arrive.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Registers interest in `request`'s result.
    pub fn register(&self, request: [u8; 16]) -> oneshot::Receiver<Bytes> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.retain(|_, tx| !tx.is_closed());
            w.insert(request, tx);
        }
        rx
    }

    pub fn forget(&self, request: &[u8; 16]) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(request);
        }
    }

    fn dispatch(&self, payload: &[u8]) {
        if payload.len() < 16 {
            tracing::warn!(len = payload.len(), "malformed result message ignored");
            return;
        }
        let mut request = [0u8; 16];
        request.copy_from_slice(&payload[..16]);
        let waiter = self
            .waiters
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&request));
        match waiter {
            Some(tx) => {
                let _ = tx.send(Bytes::copy_from_slice(&payload[16..]));
            }
            None => tracing::debug!("result for a request no longer waiting"),
        }
    }

    /// Keeps one subscription open until `shutdown`, reconnecting with
    /// backoff. Results published while disconnected are lost; their
    /// streams time out and the edge retries.
    pub async fn run(self: Arc<Self>, client: redis::Client, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !shutdown.is_cancelled() {
            match self.subscribe_once(&client, &shutdown, &mut backoff).await {
                Ok(()) => break,
                Err(e) => {
                    self.subscribed.store(false, Ordering::Release);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "result subscriber disconnected; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        self.subscribed.store(false, Ordering::Release);
    }

    async fn subscribe_once(
        &self,
        client: &redis::Client,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> redis::RedisResult<()> {
        let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
        pubsub.subscribe(&self.channel).await?;
        self.subscribed.store(true, Ordering::Release);
        backoff.reset();
        tracing::info!(channel = %self.channel, "subscribed to results");
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => self.dispatch(msg.get_payload_bytes()),
                    None => return Err(redis::RedisError::from((redis::ErrorKind::Io, "subscription closed"))),
                },
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            request: [1; 16],
            reply: "earshot:r:results:x".into(),
            header: Header {
                session: [0xab; 16],
                utterance: 3,
                jurisdiction: "eu".into(),
                edge: "e".into(),
                language: String::new(),
                translate: "en".into(),
                timestamps: true,
                words: true,
                sample_rate: 16_000,
            },
            audio: Bytes::from_static(&[0, 1, 2, 255]),
            audio_sha256: [7; 32],
            enqueued_us: 1234,
        }
    }

    #[test]
    fn job_fields_round_trip() {
        let j = job();
        let map: HashMap<String, Value> = j
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::BulkString(v)))
            .collect();
        assert_eq!(Job::from_fields(&map), Ok(j));
    }

    #[test]
    fn malformed_entries_name_the_field() {
        let mut map: HashMap<String, Value> = job()
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::BulkString(v)))
            .collect();
        map.insert("utterance".into(), Value::BulkString(b"x".to_vec()));
        assert_eq!(
            Job::from_fields(&map),
            Err("field utterance is not a number".into())
        );
        map.remove("audio");
        map.insert("utterance".into(), Value::BulkString(b"1".to_vec()));
        assert_eq!(Job::from_fields(&map), Err("field audio missing".into()));
    }

    #[test]
    fn unhex_checks_length_and_digits() {
        assert_eq!(unhex::<2>("00ff"), Some([0, 255]));
        assert_eq!(unhex::<2>("00FF"), Some([0, 255]));
        assert_eq!(unhex::<2>("0ff"), None);
        assert_eq!(unhex::<2>("zzzz"), None);
    }

    #[test]
    fn router_delivers_to_the_right_waiter() {
        let router = ResultRouter::new("c".into());
        let mut a = router.register([1; 16]);
        let mut b = router.register([2; 16]);
        let mut payload = vec![2; 16];
        payload.extend_from_slice(b"frame");
        router.dispatch(&payload);
        assert_eq!(b.try_recv().unwrap(), Bytes::from_static(b"frame"));
        assert!(a.try_recv().is_err());
        router.dispatch(&[1; 3]); // too short: ignored
    }
}
