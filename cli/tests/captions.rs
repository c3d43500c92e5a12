//! The live-captions page at `/` in headless Chromium (Debian's package),
//! its microphone faked from a WAV of spoken sentences: finals of real
//! tiny.en appear on the page. The test reads the page through Chromium's
//! DevTools protocol while it runs (the page streams in real time), and
//! saves a screenshot under target/tmp.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use earshot_cli::cluster::Cluster;
use earshot_cli::speech;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const SENTENCES: [&str; 2] = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning at nine.",
];

type DevTools =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One DevTools call; its `result`.
async fn call(
    ws: &mut DevTools,
    id: u64,
    method: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let msg = serde_json::json!({"id": id, "method": method, "params": params});
    ws.send(Message::Text(msg.to_string().into()))
        .await
        .unwrap();
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                return v["result"].clone();
            }
        }
    }
    panic!("DevTools closed during {method}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_captions_page_shows_finals_of_the_microphone_in_chromium() {
    let model_dir = earshot_cli::assets::real_model("whisper-tiny.en").unwrap();
    let cluster = Cluster::single(&model_dir, "").await.unwrap();
    // Long pauses: the connection is dropped in the one after the first
    // sentence (below), and must not cut a sentence.
    let speech = speech::synthesize(&SENTENCES, 4.0, 0.5, cluster.dir.path()).unwrap();
    let wav = cluster.dir.path().join("microphone.wav");
    speech.write_wav(&wav).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/?autostart=1&language=en",
        cluster.edge_ports["edge-fra"]
    );
    let profile = cluster.dir.path().join("chromium-profile");
    let mut chromium = tokio::process::Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required",
            "--remote-debugging-port=0",
            "--window-size=900,600",
        ])
        .arg(format!(
            "--use-file-for-fake-audio-capture={}",
            wav.display()
        ))
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(&url)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run chromium: install it with `make setup`");
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
    let mut lines = BufReader::new(chromium.stderr.take().unwrap()).lines();
    let port: u16 = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                return rest.split('/').next().unwrap().parse().unwrap();
            }
        }
        panic!("chromium exited before DevTools listened");
    })
    .await
    .expect("chromium's DevTools did not start within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // DevTools' HTTP server wants HTTP/1.1 with a Host header, and keeps
    // the connection open: read the body by its Content-Length.
    let body = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        return body.to_owned();
                    }
                }
                if n == 0 {
                    panic!("DevTools answered {text:?}");
                }
            }
        })
        .await
        .expect("DevTools did not answer /json/list")
    };
    let targets: serde_json::Value = serde_json::from_str(&body).unwrap();
    let page = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .expect("no page target");
    let page_url = format!(
        "ws://127.0.0.1:{port}/devtools/page/{}",
        page["id"].as_str().unwrap()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&page_url)
        .await
        .unwrap_or_else(|e| panic!("{page_url}: {e}"));

    // The page streams the microphone in real time: wait (up to 60 s)
    // until both sentences have their final on the page.
    let finals_js = "JSON.stringify([...document.querySelectorAll('p.final')].map(p => [p.firstChild.textContent, p.dataset.region]))";
    let mut finals: Vec<(String, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut id = 0;
    // After the first final the page's connection is closed under it (in
    // the pause before the next sentence): the page resumes the session
    // and the next final still arrives.
    let mut dropped: Option<String> = None;
    while finals.len() < SENTENCES.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if dropped.is_none() && !finals.is_empty() {
            id += 1;
            let r = call(
                &mut ws,
                id,
                "Runtime.evaluate",
                serde_json::json!({"expression": "ws.close(); document.body.dataset.session"}),
            )
            .await;
            dropped = r["result"]["value"].as_str().map(str::to_owned);
        }
        id += 1;
        let r = call(
            &mut ws,
            id,
            "Runtime.evaluate",
            serde_json::json!({"expression": finals_js}),
        )
        .await;
        finals =
            serde_json::from_str(r["result"]["value"].as_str().unwrap_or("[]")).unwrap_or_default();
    }
    id += 1;
    let status = call(
        &mut ws,
        id,
        "Runtime.evaluate",
        serde_json::json!({"expression": "document.getElementById('status').textContent"}),
    )
    .await;
    eprintln!(
        "finals on the page: {finals:#?}\nstatus: {}",
        status["result"]["value"]
    );
    assert!(
        finals.len() >= SENTENCES.len(),
        "status: {}",
        status["result"]["value"]
    );
    // The words come through: the audio takes Chromium's path (its fake
    // capture device, the AudioContext's own resampling to 16 kHz, the
    // worklet), which costs tiny.en more than a clean 16 kHz stream (16%
    // on these sentences); random weights score about 100%.
    let mut errors = earshot_asr::wer::WordErrors::default();
    for ((text, region), sentence) in finals.iter().zip(SENTENCES) {
        errors.add(sentence, text);
        assert_eq!(region, "eu-west");
    }
    eprintln!("WER on the page {errors}");
    assert!(errors.rate() < 0.5, "{finals:?}");
    id += 1;
    let after = call(
        &mut ws,
        id,
        "Runtime.evaluate",
        serde_json::json!({"expression": "JSON.stringify([document.body.dataset.session, document.body.dataset.resumes, [...document.querySelectorAll('p.final')].map(p => p.dataset.utterance)])"}),
    )
    .await;
    let (session, resumes, numbers): (String, String, Vec<String>) =
        serde_json::from_str(after["result"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        Some(session),
        dropped,
        "the page did not resume its session"
    );
    assert_ne!(resumes, "0");
    let mut unique = numbers.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        numbers.len(),
        "a final shown twice: {numbers:?}"
    );
    id += 1;
    let shot = call(
        &mut ws,
        id,
        "Page.captureScreenshot",
        serde_json::json!({"format": "png"}),
    )
    .await;
    if let Some(data) = shot["data"].as_str() {
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("captions.png");
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
    let _ = chromium.kill().await;
    cluster.stop().await.unwrap();
}
