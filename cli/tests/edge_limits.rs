//! The edge's limits against clients that misbehave on purpose: silent,
//! ping-only, keepalive-only, slow-loris (HTTP head and WebSocket frame),
//! too long, too many, and a burst of 2,000 connections.
//!
//! The timeout tests run on tokio's paused clock: the edge (real sockets,
//! real Silero) and the clients share one runtime whose time jumps to the
//! next timer whenever every task waits, so a 10 s idle timeout takes no
//! wall time and "on time" is measured exactly, in virtual time. No region
//! is started: these sessions never finish an utterance.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use earshot_cli::cluster::{http_get, lone_edge, metric};
use earshot_common::client::{ClientErrorCode, ServerMessage};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const S: Duration = Duration::from_secs(1);

/// A served edge with `extra` config; its port, shutdown and scratch dir.
async fn edge(extra: &str) -> (u16, CancellationToken, tempfile::TempDir) {
    let shutdown = CancellationToken::new();
    let (edge, dir) = lone_edge(extra, shutdown.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(edge.serve(listener));
    (port, shutdown, dir)
}

fn url(port: u16) -> String {
    format!("ws://127.0.0.1:{port}/v1/listen")
}

/// What a session ended with: its error codes, close code, and when the
/// close came.
struct Ending {
    codes: Vec<ClientErrorCode>,
    closing: Option<String>,
    close: Option<u16>,
    at: Duration,
    /// When the client last began to send something.
    last_sent: Duration,
}

/// Runs a session that does `act` every `every` (virtual time) until the
/// edge closes it.
async fn session_until_closed(
    port: u16,
    every: Duration,
    mut act: impl FnMut(Duration) -> Option<Message>,
) -> Ending {
    let began = Instant::now();
    let (ws, _) = tokio_tungstenite::connect_async(url(port)).await.unwrap();
    let (mut sink, mut source) = ws.split();
    let mut ticks = tokio::time::interval_at(began + every, every);
    let mut ending = Ending {
        codes: Vec::new(),
        closing: None,
        close: None,
        at: Duration::ZERO,
        last_sent: Duration::ZERO,
    };
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let now = began.elapsed();
                if let Some(m) = act(now) {
                    // Stamped before the send: the edge cannot have it
                    // earlier, so `last_sent + idle` is a true lower bound.
                    ending.last_sent = now;
                    let _ = sink.send(m).await;
                }
            }
            msg = source.next() => match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(&t).unwrap() {
                    ServerMessage::Error(e) => ending.codes.push(e.code),
                    ServerMessage::Closing(c) => ending.closing = Some(c.reason),
                    _ => {}
                },
                Some(Ok(Message::Close(frame))) => {
                    ending.close = frame.map(|f| u16::from(f.code));
                    ending.at = began.elapsed();
                    return ending;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    ending.at = began.elapsed();
                    return ending;
                }
            }
        }
    }
}

fn within(at: Duration, from: Duration, slack: Duration) -> bool {
    at >= from && at <= from + slack
}

#[tokio::test(start_paused = true)]
async fn silent_and_ping_only_clients_are_closed_at_the_idle_timeout() {
    let (port, shutdown, _dir) = edge("").await;
    // Nothing at all.
    let silent = session_until_closed(port, 3600 * S, |_| None).await;
    assert_eq!(silent.codes, [ClientErrorCode::IdleTimeout]);
    assert_eq!(silent.close, Some(1000));
    assert!(within(silent.at, 10 * S, S), "closed at {:?}", silent.at);

    // A ping every second, as client libraries do: pings are answered but
    // do not keep the session open.
    let pinger = session_until_closed(port, S, |_| Some(Message::Ping(vec![1].into()))).await;
    assert_eq!(pinger.codes, [ClientErrorCode::IdleTimeout]);
    assert!(within(pinger.at, 10 * S, S), "closed at {:?}", pinger.at);

    // Other text (an unknown type) does not count either.
    let chatty = session_until_closed(port, S, |_| {
        Some(Message::Text(r#"{"type":"hello"}"#.into()))
    })
    .await;
    assert_eq!(
        chatty.codes.last(),
        Some(&ClientErrorCode::IdleTimeout),
        "{:?}",
        chatty.codes
    );
    assert!(within(chatty.at, 10 * S, S), "closed at {:?}", chatty.at);
    shutdown.cancel();
}

// Input that must count runs in real time with short limits. On the paused
// clock the edge can see a message only after the clock has jumped past
// the instant it was sent (the runtime polls sockets and advances time in
// one step), and audio goes through the VAD on its own threads, which the
// paused clock does not wait for. The bounds checked are ones a slow
// machine cannot miss: never earlier than due, long before the generous
// upper bound.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_and_keepalive_keep_a_session_open_until_they_stop() {
    let (port, shutdown, _dir) = edge("[limits]\nidle_timeout_ms = 500\n").await;
    // Every 100 ms for 1.5 s (three idle timeouts), then nothing: silence
    // as audio, or a keepalive.
    let audio = || Message::Binary(vec![0; 3200].into());
    let keepalive = || Message::Text(r#"{"type":"keepalive"}"#.into());
    for (what, message) in [
        ("audio", &audio as &dyn Fn() -> Message),
        ("keepalive", &keepalive),
    ] {
        let ending = session_until_closed(port, S / 10, |t| (t <= S * 3 / 2).then(message)).await;
        assert_eq!(ending.codes, [ClientErrorCode::IdleTimeout], "{what}");
        assert!(
            ending.last_sent >= S * 14 / 10,
            "{what}: {:?}",
            ending.last_sent
        );
        assert!(
            within(ending.at, ending.last_sent + S / 2, 8 * S),
            "{what}: closed at {:?}, last sent at {:?}",
            ending.at,
            ending.last_sent
        );
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_at_its_maximum_length_even_while_busy() {
    let (port, shutdown, _dir) = edge("[limits]\nmax_session_ms = 1500\n").await;
    let busy = session_until_closed(port, S / 10, |_| {
        Some(Message::Binary(vec![0; 3200].into()))
    })
    .await;
    assert_eq!(busy.codes, [ClientErrorCode::SessionTooLong]);
    assert_eq!(busy.closing.as_deref(), Some("session_too_long"));
    assert_eq!(busy.close, Some(1000));
    assert!(within(busy.at, S * 3 / 2, 8 * S), "closed at {:?}", busy.at);
    shutdown.cancel();
}

/// Reads until the peer closes the connection; how long that took.
async fn until_dropped(stream: &mut (impl AsyncReadExt + Unpin)) -> Duration {
    let began = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return began.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn slow_loris_clients_are_dropped_on_time() {
    let (port, shutdown, _dir) = edge("").await;

    // An HTTP request head trickled a byte a second: dropped at the 5 s
    // header timeout, long before it could finish.
    let slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut reader, mut writer) = slow.into_split();
    writer
        .write_all(b"GET /v1/listen HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = async {
        loop {
            tokio::time::sleep(S).await;
            if writer.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    let dropped = tokio::select! {
        at = until_dropped(&mut reader) => at,
        _ = trickle => Duration::MAX,
    };
    assert!(within(dropped, 5 * S, S), "dropped after {dropped:?}");

    // After the upgrade, a binary frame that announces 3,200 bytes and
    // sends one a second: it never completes, so it is no input, and the
    // idle timeout closes the session at 10 s.
    let mut ws = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    ws.write_all(
        b"GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // FIN + binary, masked, 16-bit length 3200, mask key.
    ws.write_all(&[0x82, 0xFE, 0x0C, 0x80, 1, 2, 3, 4])
        .await
        .unwrap();
    let began = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            _ = tokio::time::sleep(S) => {
                if ws.write_all(&[0]).await.is_err() {
                    break;
                }
            }
            n = ws.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    // The close frame (0x88) ends the session.
                    if received.windows(2).any(|w| w[0] == 0x88 && w[1] < 126)
                        && String::from_utf8_lossy(&received).contains("idle_timeout")
                    {
                        break;
                    }
                }
            }
        }
    }
    let at = began.elapsed();
    assert!(
        String::from_utf8_lossy(&received).contains("\"idle_timeout\""),
        "{}",
        String::from_utf8_lossy(&received)
    );
    assert!(within(at, 10 * S, S), "closed after {at:?}");
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn over_the_session_limit_the_upgrade_is_refused_with_503() {
    let (port, shutdown, _dir) = edge("[limits]\nmax_sessions = 2\nretry_after_s = 3\n").await;
    let (a, _) = tokio_tungstenite::connect_async(url(port)).await.unwrap();
    let (_b, _) = tokio_tungstenite::connect_async(url(port)).await.unwrap();
    let refused = tokio_tungstenite::connect_async(url(port))
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused}");
    };
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "3");
    let body: ServerMessage =
        serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
    assert!(
        matches!(&body, ServerMessage::Error(e) if e.code == ClientErrorCode::ServerBusy && e.fatal),
        "{body:?}"
    );
    // A place frees when a session ends.
    drop(a);
    let mut again = None;
    for _ in 0..50 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(url(port)).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(S / 10).await;
    }
    assert!(again.is_some(), "no place freed after a session ended");
    let metrics = http_get(port, "/metrics").await.unwrap();
    assert!(
        metric(
            &metrics,
            r#"earshot_edge_refused_total{reason="max_sessions"}"#
        ) >= Some(1.0),
        "{metrics}"
    );
    shutdown.cancel();
}

/// Real time, both cores: 2,000 clients connect at once to an edge that
/// takes 500. Every one is either served (a `session` message) or refused
/// with 503; the edge counts each refusal and serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_2000_connections_is_served_or_refused_never_dropped() {
    let (port, shutdown, _dir) =
        edge("[limits]\nmax_sessions = 500\nidle_timeout_ms = 600000\n").await;
    let attempts = (0..2000).map(|_| async move {
        match tokio_tungstenite::connect_async(url(port)).await {
            Ok((mut ws, _)) => match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let first: ServerMessage = serde_json::from_str(&t).unwrap();
                    assert!(matches!(first, ServerMessage::Session(_)), "{first:?}");
                    // Held open until every attempt is done.
                    Ok(ws)
                }
                other => panic!("served but no session message: {other:?}"),
            },
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 503);
                Err(())
            }
            Err(e) => panic!("neither served nor refused: {e}"),
        }
    });
    let results = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join_all(attempts),
    )
    .await
    .expect("the burst was not answered within 120 s");
    let served = results.iter().filter(|r| r.is_ok()).count();
    let refused = results.len() - served;
    assert_eq!(served, 500);
    assert_eq!(refused, 1500);
    let metrics = http_get(port, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            r#"earshot_edge_refused_total{reason="max_sessions"}"#
        ),
        Some(1500.0)
    );
    assert_eq!(
        metric(&metrics, "earshot_edge_sessions_active"),
        Some(500.0)
    );
    drop(results);
    // Still serving: once the burst has gone, a new client gets in.
    let mut ok = false;
    for _ in 0..100 {
        if tokio_tungstenite::connect_async(url(port)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the edge did not serve again after the burst");
    shutdown.cancel();
}
