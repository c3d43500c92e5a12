//! The region's utterance queue on Redis Streams, and result fan-in.
//!
//! - Jobs: `XADD earshot:{region}:utterances * field value …`, audio as a
//!   binary field. Workers read them in consumer group `asr`, and delete
//!   each entry when they acknowledge it, so the stream's length is what is
//!   queued or in progress: nothing is ever trimmed unread. Past
//!   `queue_limit` entries the ingress answers `busy` instead of adding.
//! - Idempotency: every utterance has a key, `(edge, session, utterance)`
//!   from its header, the same on every attempt. A hash
//!   `earshot:{region}:utterance:{edge}:{session}:{n}` (TTL `result_ttl`)
//!   records the job (`entry`), the ingress channel waiting for it
//!   (`reply`) and, once answered, the answer (`result`). [`admit`] checks
//!   and adds atomically (one Lua script): a retry of an answered utterance
//!   gets the stored answer, a retry of a queued one waits for the same job
//!   (its channel replaces the old one), and only a new key adds an entry.
//! - Results: a worker `PUBLISH`es `request id (16 bytes) ‖ wire frame`
//!   on the channel the hash names, then stores the answer in the hash
//!   ([`store_result`], two scripts: the first writes nothing, so it is not
//!   held behind an fsync). Each ingress process has one channel
//!   and one subscriber connection for all its requests ([`ResultRouter`]),
//!   so Redis connections do not grow with clients; a waiting ingress also
//!   reads the hash now and then, so a result published while it was not
//!   subscribed (Redis restarted) is not lost.
//! - Dead letters: an entry delivered `max_deliveries` times without being
//!   answered moves to `earshot:{region}:dead` with why, and its utterance
//!   is answered with an error.

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
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Consumer group of the ASR workers.
pub const GROUP: &str = "asr";

/// Redis key of a region's utterance stream.
pub fn stream_key(region: &str) -> String {
    format!("earshot:{region}:utterances")
}

/// Redis key of a region's dead-letter stream.
pub fn dead_letter_key(region: &str) -> String {
    format!("earshot:{region}:dead")
}

/// Redis key of a session's index: utterance number → the edge that cut
/// it, for resumed sessions (see [`fetch`]).
pub fn session_key(region: &str, session: &[u8; 16]) -> String {
    format!("earshot:{region}:session:{}", hex(session))
}

/// Redis key of one utterance's idempotency record.
pub fn utterance_key(region: &str, header: &Header) -> String {
    format!(
        "earshot:{region}:utterance:{}:{}:{}",
        header.edge,
        hex(&header.session),
        header.utterance
    )
}

/// The id results are routed by: the same for every attempt of one
/// utterance, so a retry waits for the first attempt's result.
pub fn request_id(header: &Header) -> [u8; 16] {
    request_key(&header.edge, &header.session, header.utterance)
}

/// [`request_id`] of utterance `utterance` of `session` as cut by `edge`.
pub fn request_key(edge: &str, session: &[u8; 16], utterance: u32) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(edge.as_bytes());
    h.update([0]);
    h.update(session);
    h.update(utterance.to_be_bytes());
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
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
        let mut fields = vec![
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
        ];
        if let Some((start, end)) = h.span {
            fields.push(("span", format!("{start},{end}").into_bytes()));
        }
        fields
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
                resume: false,
                // "start,end" in ms; absent in entries queued before spans.
                span: text("span").ok().and_then(|t| {
                    let (a, b) = t.split_once(',')?;
                    Some((a.parse().ok()?, b.parse().ok()?))
                }),
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

/// What [`admit`] did with an utterance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// New: added to the stream as this entry.
    Added(String),
    /// Seen before and still queued or in progress: wait for that job.
    Queued,
    /// Seen before and answered: the stored wire frame.
    Answered(Vec<u8>),
    /// The stream holds `queue_limit` entries or more: not added.
    Busy,
}

/// KEYS: record, stream, session index. ARGV: reply channel, TTL seconds,
/// queue limit, utterance number, edge, then the entry's fields and values.
const ADMIT: &str = r"
local result = redis.call('HGET', KEYS[1], 'result')
if result then return {'answered', result} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'reply', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'queued'}
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then return {'busy'} end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
redis.call('HSET', KEYS[1], 'reply', ARGV[1], 'entry', id)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return {'added', id}
";

/// Adds `job` to the stream unless its utterance was seen before or the
/// queue is full; all in one atomic step.
pub async fn admit(
    conn: &mut redis::aio::ConnectionManager,
    region: &str,
    stream: &str,
    queue_limit: usize,
    result_ttl: Duration,
    job: &Job,
) -> redis::RedisResult<Admission> {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(ADMIT));
    let mut invocation = SCRIPT.key(utterance_key(region, &job.header));
    invocation
        .key(stream)
        .key(session_key(region, &job.header.session))
        .arg(&job.reply)
        .arg(result_ttl.as_secs().max(1))
        .arg(queue_limit)
        .arg(job.header.utterance)
        .arg(&job.header.edge);
    for (k, v) in job.to_fields() {
        invocation.arg(k).arg(v);
    }
    let reply: Vec<Value> = invocation.invoke_async(conn).await?;
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => b.clone(),
        Some(Value::SimpleString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    };
    let kind = text(reply.first());
    Ok(match kind.as_slice() {
        b"added" => Admission::Added(String::from_utf8_lossy(&text(reply.get(1))).into_owned()),
        b"queued" => Admission::Queued,
        b"answered" => Admission::Answered(text(reply.get(1))),
        b"busy" => Admission::Busy,
        other => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply from the admit script",
                String::from_utf8_lossy(other).into_owned(),
            )));
        }
    })
}

/// What [`fetch`] found of an utterance of a resumed session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Answered: the stored wire frame, and the edge that cut it.
    Answered { frame: Vec<u8>, edge: String },
    /// Still queued or in progress: its record now names the asking
    /// ingress as where to publish the answer; wait for `request`.
    Queued { edge: String, request: [u8; 16] },
    /// Never admitted here, or expired.
    Unknown,
}

/// KEYS: session index. ARGV: utterance, record key prefix (up to the
/// edge), record key suffix (from the session on), reply channel, TTL.
const FETCH: &str = r"
local edge = redis.call('HGET', KEYS[1], ARGV[1])
if not edge then return {'unknown'} end
local key = ARGV[2] .. edge .. ARGV[3]
local result = redis.call('HGET', key, 'result')
if result then return {'answered', edge, result} end
if redis.call('EXISTS', key) == 1 then
  redis.call('HSET', key, 'reply', ARGV[4])
  redis.call('EXPIRE', key, ARGV[5])
  return {'queued', edge}
end
return {'unknown'}
";

/// What this region holds of utterance `utterance` of `session`, whichever
/// edge cut it (the session index says which). A queued one is redirected
/// to `reply`, as a retry is.
pub async fn fetch(
    conn: &mut redis::aio::ConnectionManager,
    region: &str,
    session: &[u8; 16],
    utterance: u32,
    reply: &str,
    result_ttl: Duration,
) -> redis::RedisResult<Fetched> {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(FETCH));
    let reply_value: Vec<Value> = SCRIPT
        .key(session_key(region, session))
        .arg(utterance)
        .arg(format!("earshot:{region}:utterance:"))
        .arg(format!(":{}:{utterance}", hex(session)))
        .arg(reply)
        .arg(result_ttl.as_secs().max(1))
        .invoke_async(conn)
        .await?;
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => b.clone(),
        Some(Value::SimpleString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    };
    let edge = String::from_utf8_lossy(&text(reply_value.get(1))).into_owned();
    Ok(match text(reply_value.first()).as_slice() {
        b"answered" => Fetched::Answered {
            frame: text(reply_value.get(2)),
            edge,
        },
        b"queued" => Fetched::Queued {
            request: request_key(&edge, session, utterance),
            edge,
        },
        _ => Fetched::Unknown,
    })
}

/// Appends a job to the stream as it is, with no idempotency record or
/// limit: what an older ingress (or a test playing one) does.
pub async fn enqueue(
    conn: &mut redis::aio::ConnectionManager,
    stream: &str,
    job: &Job,
) -> redis::RedisResult<String> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in job.to_fields() {
        cmd.arg(k).arg(v);
    }
    cmd.query_async(conn).await
}

/// KEYS: record. ARGV: the wire frame, request id, TTL seconds, fallback
/// channel (the job's own `reply`, for a record that expired).
/// Publishes an answer to the ingress the record names (else the job's
/// own): reads and `PUBLISH` only, so with `appendfsync always` the waiting
/// ingress is not held behind an fsync.
const NOTIFY_RESULT: &str = r"
local reply = redis.call('HGET', KEYS[1], 'reply')
if not reply then reply = ARGV[3] end
redis.call('PUBLISH', reply, ARGV[2] .. ARGV[1])
return reply
";

/// Keeps the answer under the utterance's key (KEYS[1]), and the session's
/// index (KEYS[2]) as long as it; publishes it again only if a retry moved
/// the record to another ingress since it was notified.
const STORE_RESULT: &str = r"
redis.call('HSET', KEYS[1], 'result', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
local reply = redis.call('HGET', KEYS[1], 'reply')
if reply and reply ~= ARGV[4] then
  redis.call('PUBLISH', reply, ARGV[2] .. ARGV[1])
end
return 1
";

/// Answers an utterance: publishes the answer to the ingress waiting for
/// it (first, so the answer does not wait for the write to be made
/// durable), then stores it under the utterance's key for retries. A
/// worker that dies between the two has not acknowledged the entry: it is
/// answered again by another worker, and an ingress that already answered
/// drops the second copy (`results_unrouted`).
pub async fn store_result(
    conn: &mut redis::aio::ConnectionManager,
    region: &str,
    job: &Job,
    frame: &[u8],
    result_ttl: Duration,
) -> redis::RedisResult<()> {
    static NOTIFY: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(NOTIFY_RESULT));
    static STORE: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(STORE_RESULT));
    let key = utterance_key(region, &job.header);
    let notified: String = NOTIFY
        .key(&key)
        .arg(frame)
        .arg(&job.request[..])
        .arg(&job.reply)
        .invoke_async(conn)
        .await?;
    let _: i64 = STORE
        .key(&key)
        .key(session_key(region, &job.header.session))
        .arg(frame)
        .arg(&job.request[..])
        .arg(result_ttl.as_secs().max(1))
        .arg(notified)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// The stored answer of an utterance, if it has one.
pub async fn stored_result(
    conn: &mut redis::aio::ConnectionManager,
    region: &str,
    header: &Header,
) -> redis::RedisResult<Option<Vec<u8>>> {
    redis::cmd("HGET")
        .arg(utterance_key(region, header))
        .arg("result")
        .query_async(conn)
        .await
}

/// Pending result waits, keyed by request id. Dropping the receiver (the
/// stream gave up) leaves a sender that is removed on the next sweep.
#[derive(Debug)]
pub struct ResultRouter {
    channel: String,
    /// Several waiters per request when an edge retried on this ingress
    /// while its first attempt still waited.
    waiters: std::sync::Mutex<HashMap<[u8; 16], Vec<oneshot::Sender<Bytes>>>>,
    subscribed: AtomicBool,
    /// Counts results that found no waiter.
    unrouted: prometheus_client::metrics::counter::Counter,
}

impl ResultRouter {
    pub fn new(
        channel: String,
        unrouted: prometheus_client::metrics::counter::Counter,
    ) -> Arc<Self> {
        Arc::new(ResultRouter {
            channel,
            waiters: std::sync::Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
            unrouted,
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
            w.retain(|_, txs| {
                txs.retain(|tx| !tx.is_closed());
                !txs.is_empty()
            });
            w.entry(request).or_default().push(tx);
        }
        rx
    }

    /// Drops the waiters of `request` that gave up.
    pub fn forget(&self, request: &[u8; 16]) {
        if let Ok(mut w) = self.waiters.lock()
            && let Some(txs) = w.get_mut(request)
        {
            txs.retain(|tx| !tx.is_closed());
            if txs.is_empty() {
                w.remove(request);
            }
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
            Some(txs) => {
                let frame = Bytes::copy_from_slice(&payload[16..]);
                for tx in txs {
                    let _ = tx.send(frame.clone());
                }
            }
            None => {
                self.unrouted.inc();
                tracing::debug!("result for a request no longer waiting; dropped");
            }
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
                resume: false,
                span: Some((1_000, 2_500)),
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
        let router = ResultRouter::new("c".into(), Default::default());
        let mut a = router.register([1; 16]);
        let mut b = router.register([2; 16]);
        let mut payload = vec![2; 16];
        payload.extend_from_slice(b"frame");
        router.dispatch(&payload);
        assert_eq!(b.try_recv().unwrap(), Bytes::from_static(b"frame"));
        assert!(a.try_recv().is_err());
        router.dispatch(&[1; 3]); // too short: ignored
    }

    #[test]
    fn every_waiter_of_a_retried_request_gets_its_result() {
        let unrouted = prometheus_client::metrics::counter::Counter::default();
        let router = ResultRouter::new("c".into(), unrouted.clone());
        let mut first = router.register([5; 16]);
        let mut retry = router.register([5; 16]);
        let mut payload = vec![5; 16];
        payload.extend_from_slice(b"frame");
        router.dispatch(&payload);
        assert_eq!(first.try_recv().unwrap(), Bytes::from_static(b"frame"));
        assert_eq!(retry.try_recv().unwrap(), Bytes::from_static(b"frame"));
        router.dispatch(&payload);
        assert_eq!(unrouted.get(), 1, "a second copy finds no waiter");
    }

    #[test]
    fn the_idempotency_key_is_the_same_for_every_attempt_and_differs_per_utterance() {
        let a = job().header;
        let mut b = a.clone();
        b.language = "de".into(); // options do not make another utterance
        assert_eq!(request_id(&a), request_id(&b));
        assert_eq!(utterance_key("r", &a), utterance_key("r", &b));
        b.utterance += 1;
        assert_ne!(request_id(&a), request_id(&b));
        let mut c = a.clone();
        c.edge = "other".into();
        assert_ne!(request_id(&a), request_id(&c));
        assert_ne!(utterance_key("r", &a), utterance_key("r", &c));
    }
}
