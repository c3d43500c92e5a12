//! Property tests of every decoder fed from the network or disk: the
//! edge↔region frames, the client's JSON, manifests, channel files and the
//! topology. Arbitrary bytes never panic and never make a decoder hold more
//! than its documented limit; every message survives `decode(encode(x))`;
//! whatever parses has only names that are safe as paths and keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use earshot_proto::client::{
    ClientErrorCode, ClientMessage, ErrorMessage, FinalMessage, PartialMessage, SegmentMessage,
    ServerMessage, SessionInfo, SpeechStartedMessage, TranslationMessage, parse_client_message,
};
use earshot_proto::manifest::{
    Channel, FileEntry, Format, Kind, Lineage, Manifest, Quantization, Rollout, Tier,
    is_valid_file_path, is_valid_model_name, is_valid_version,
};
use earshot_proto::receipt::{Claims, ReceiptMessage};
use earshot_proto::topology::{Topology, is_valid_name};
use earshot_proto::wire::{
    Assembler, ErrorCode, Final, Frame, FrameError, Header, MAX_FRAME_LEN, Receipt, Segment,
    Translated, Translation, WireError, decode,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Up to `n` characters of any kind (multi-byte ones included).
fn text(n: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("(?s).{{0,{n}}}")).unwrap()
}

/// Names as a hostile file would write them: valid ones, and `..`,
/// separators, absolute paths, empty, overlong, odd characters.
fn hostile_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,20}[a-z0-9]",
        Just(String::new()),
        Just("..".to_owned()),
        Just("../../etc/passwd".to_owned()),
        Just("/absolute".to_owned()),
        Just("a/b".to_owned()),
        Just("a\\b".to_owned()),
        Just(".hidden".to_owned()),
        Just("x".repeat(300)),
        text(12),
    ]
}

// ---- edge <-> region frames ----

fn header() -> impl Strategy<Value = Header> {
    (
        any::<[u8; 16]>(),
        any::<u32>(),
        (text(60), text(60), text(60), text(60)),
        (
            any::<(bool, bool, bool)>(),
            proptest::option::of(any::<(u32, u32)>()),
        ),
        any::<u32>(),
    )
        .prop_map(
            |(
                session,
                utterance,
                (jurisdiction, edge, language, translate),
                ((t, w, r), span),
                rate,
            )| {
                Header {
                    session,
                    utterance,
                    jurisdiction,
                    edge,
                    language,
                    translate,
                    timestamps: t,
                    words: w,
                    resume: r,
                    span,
                    sample_rate: rate,
                }
            },
        )
}

fn span() -> impl Strategy<Value = Segment> {
    (any::<u32>(), any::<u32>(), text(40)).prop_map(|(start_ms, end_ms, text)| Segment {
        start_ms,
        end_ms,
        text,
    })
}

fn translated() -> impl Strategy<Value = Option<Translated>> {
    prop_oneof![
        Just(None),
        (text(10), text(200))
            .prop_map(|(language, text)| Some(Translated::Text(Translation { language, text }))),
        (text(10), text(200))
            .prop_map(|(language, reason)| Some(Translated::Unavailable { language, reason })),
    ]
}

fn final_frame() -> impl Strategy<Value = Final> {
    (
        (any::<u32>(), text(300), text(60), text(60)),
        (any::<[u8; 32]>(), any::<u32>(), any::<u32>()),
        (
            text(10),
            -1.0f32..=1.0f32,
            translated(),
            proptest::option::of(any::<(u32, u32)>()),
        ),
        (
            vec(span(), 0..4),
            vec(span(), 0..4),
            proptest::option::of(any::<[u8; 32]>()),
            proptest::option::of(receipt().prop_map(Box::new)),
        ),
    )
        .prop_map(
            |(
                (utterance, text, region, model),
                (audio_sha256, queue_us, inference_us),
                (language, language_probability, translation, placed),
                (segments, words, model_sha256, receipt),
            )| Final {
                utterance,
                text,
                region,
                model,
                audio_sha256,
                queue_us,
                inference_us,
                language,
                language_probability,
                translation,
                segments,
                words,
                model_sha256,
                span: placed,
                receipt,
            },
        )
}

fn receipt() -> impl Strategy<Value = Receipt> {
    (
        (text(20), text(20), text(40), text(20), text(20)),
        (any::<u32>(), text(30), text(64), any::<u64>()),
        (
            any::<u16>(),
            vec(any::<u8>(), 0..100),
            vec(any::<u8>(), 0..600),
        ),
    )
        .prop_map(
            |(
                (region, region_jurisdiction, session, session_jurisdiction, edge),
                (utterance, model, digest, issued_at_ms),
                (scheme, signature, certificate),
            )| Receipt {
                claims: Claims {
                    region,
                    region_jurisdiction,
                    session,
                    session_jurisdiction,
                    edge,
                    utterance,
                    model,
                    model_sha256: digest.clone(),
                    audio_sha256: digest.clone(),
                    text_sha256: digest,
                    issued_at_ms,
                },
                scheme,
                signature,
                certificate,
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        header().prop_map(Frame::Header),
        vec(any::<u8>(), 0..2048).prop_map(|a| Frame::Audio(Bytes::from(a))),
        any::<[u8; 32]>().prop_map(|audio_sha256| Frame::End { audio_sha256 }),
        final_frame().prop_map(Frame::Final),
        (
            any::<u32>(),
            proptest::sample::select(&ErrorCode::ALL[..]),
            text(200)
        )
            .prop_map(|(utterance, code, message)| Frame::Error(WireError {
                utterance,
                code,
                message,
            })),
    ]
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    frame.encode(&mut out).unwrap();
    out
}

/// Decodes every frame in `buf` until it needs more bytes or fails,
/// checking what the decoder consumed and reserved on the way.
fn decode_all(buf: &mut BytesMut) -> (Vec<Frame>, Option<FrameError>) {
    let mut frames = Vec::new();
    loop {
        let before = buf.len();
        match decode(buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "a frame consumed nothing");
                frames.push(frame);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "needing more consumed bytes");
                // Waiting for a frame reserves at most that frame.
                assert!(buf.capacity() <= 2 * (4 + MAX_FRAME_LEN).max(before));
                return (frames, None);
            }
            Err(e) => return (frames, Some(e)),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn every_frame_survives_encode_then_decode(frame in frame()) {
        let mut buf = encoded(&frame);
        prop_assert_eq!(decode(&mut buf), Ok(Some(frame)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_stream_of_frames_decodes_whatever_the_read_sizes(
        frames in vec(frame(), 1..6),
        reads in vec(1usize..700, 1..40),
    ) {
        let mut all = BytesMut::new();
        for f in &frames {
            f.encode(&mut all).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut reads = reads.into_iter().cycle();
        while !all.is_empty() {
            let n = reads.next().unwrap().min(all.len());
            buf.extend_from_slice(&all.split_to(n));
            let (decoded, err) = decode_all(&mut buf);
            prop_assert!(err.is_none(), "{:?}", err);
            got.extend(decoded);
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096)) {
        decode_all(&mut BytesMut::from(&bytes[..]));
    }

    #[test]
    fn a_damaged_frame_is_refused_or_decodes_to_a_frame_that_encodes_back(
        frame in frame(),
        flips in vec((any::<proptest::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<proptest::sample::Index>(),
        fix_length in any::<bool>(),
    ) {
        let mut bytes = encoded(&frame).to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        // Half the time the length prefix is made to match, so the damage
        // reaches the body's parser.
        if fix_length && bytes.len() > 4 {
            let len = (bytes.len() - 4) as u32;
            bytes[..4].copy_from_slice(&len.to_be_bytes());
        }
        let (frames, _) = decode_all(&mut BytesMut::from(&bytes[..]));
        for f in frames {
            // Whatever decodes is a well-formed frame: it encodes, and
            // decodes back to itself (NaN probabilities aside).
            let mut again = encoded(&f);
            let back = decode(&mut again).unwrap().unwrap();
            if !matches!(&f, Frame::Final(x) if x.language_probability.is_nan()) {
                prop_assert_eq!(back, f);
            }
        }
    }

    #[test]
    fn a_length_past_the_limit_is_refused_before_any_body_arrives(
        len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
    ) {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        prop_assert_eq!(decode(&mut buf), Err(FrameError::TooLarge(len as usize)));
        prop_assert!(buf.capacity() < 64);
    }

    #[test]
    fn the_assembler_never_holds_more_audio_than_its_limit(
        frames in vec(frame(), 0..24),
        max in 0usize..6000,
    ) {
        let mut assembler = Assembler::new(max);
        for f in frames {
            match assembler.push(f) {
                Ok(Some(u)) => prop_assert!(u.audio.len() <= max && u.audio.len() % 2 == 0),
                Ok(None) => {}
                Err(_) => break, // the stream ends here
            }
        }
    }
}

// ---- client <-> edge JSON ----

fn seconds() -> impl Strategy<Value = f64> {
    // What the edge sends: microsecond counts in (milli)seconds.
    (0u64..10_000_000_000).prop_map(|us| us as f64 / 1_000.0)
}

fn client_code() -> impl Strategy<Value = ClientErrorCode> {
    proptest::sample::select(&ClientErrorCode::ALL[..])
}

fn segment_message() -> impl Strategy<Value = SegmentMessage> {
    (seconds(), seconds(), text(30)).prop_map(|(start, end, text)| SegmentMessage {
        start,
        end,
        text,
    })
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        (
            (text(40), text(20), text(10)),
            vec(text(12), 0..4),
            any::<u32>(),
            text(12),
            (
                any::<u16>(),
                proptest::option::of(text(5)),
                proptest::option::of(text(5)),
                any::<bool>(),
                proptest::option::of(any::<u32>()),
            ),
        )
            .prop_map(
                |(
                    (session, edge, jurisdiction),
                    regions,
                    sample_rate,
                    encoding,
                    (channels, language, translate, partials, resumed_after),
                )| {
                    ServerMessage::Session(SessionInfo {
                        session,
                        edge,
                        jurisdiction,
                        regions,
                        sample_rate,
                        encoding,
                        channels,
                        language,
                        translate,
                        partials,
                        resumed_after,
                    })
                }
            ),
        (any::<u32>(), text(200), seconds()).prop_map(|(utterance, text, audio)| {
            ServerMessage::Partial(PartialMessage {
                utterance,
                text,
                audio,
            })
        }),
        (any::<u32>(), seconds()).prop_map(|(utterance, start)| {
            ServerMessage::SpeechStarted(SpeechStartedMessage { utterance, start })
        }),
        (
            (any::<u32>(), text(200), text(12), text(20), text(64)),
            (seconds(), seconds(), seconds(), seconds(), seconds()),
            (
                proptest::option::of(text(5)),
                proptest::option::of((0u32..=1000).prop_map(|p| p as f32 / 1000.0)),
            ),
            (
                proptest::option::of(vec(segment_message(), 0..3)),
                proptest::option::of(vec(segment_message(), 0..3)),
                proptest::option::of(receipt().prop_map(|r| Box::new(ReceiptMessage {
                    claims: r.claims,
                    scheme: "ed25519".into(),
                    signature: "c2ln".into(),
                    certificate: "Y2VydA==".into(),
                }))),
            ),
        )
            .prop_map(
                |(
                    (utterance, text, region, model, audio_sha256),
                    (start, end, latency_ms, queue_ms, inference_ms),
                    (language, language_probability),
                    (segments, words, receipt),
                )| {
                    ServerMessage::Final(FinalMessage {
                        utterance,
                        text,
                        region,
                        model,
                        start,
                        end,
                        audio_sha256,
                        latency_ms,
                        queue_ms,
                        inference_ms,
                        language,
                        language_probability,
                        segments,
                        words,
                        receipt,
                    })
                },
            ),
        (any::<u32>(), text(5), text(200)).prop_map(|(utterance, language, text)| {
            ServerMessage::Translation(TranslationMessage {
                utterance,
                language,
                text,
            })
        }),
        (
            client_code(),
            text(200),
            any::<bool>(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(code, message, fatal, utterance, retry_after)| {
                ServerMessage::Error(ErrorMessage {
                    code,
                    message,
                    fatal,
                    utterance,
                    retry_after,
                })
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn every_server_message_survives_json(message in server_message()) {
        let json = serde_json::to_string(&message).unwrap();
        let back: ServerMessage = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, message);
    }

    #[test]
    fn any_client_text_is_a_message_or_a_short_error(text in text(2000)) {
        if let Err(e) = parse_client_message(&text) {
            prop_assert!(e.message.chars().count() <= 200, "{}", e.message);
            prop_assert!(!e.fatal);
        }
    }

    #[test]
    fn client_json_objects_are_told_apart_by_type(
        kind in prop_oneof![Just("finalize".to_owned()), Just("close".to_owned()), text(100)],
        extra in text(20),
    ) {
        let json = serde_json::json!({"type": kind, "x": extra}).to_string();
        let parsed = parse_client_message(&json);
        match kind.as_str() {
            "finalize" => prop_assert_eq!(parsed, Ok(ClientMessage::Finalize)),
            "close" => prop_assert_eq!(parsed, Ok(ClientMessage::Close)),
            _ => prop_assert_eq!(parsed.unwrap_err().code, ClientErrorCode::UnknownMessageType),
        }
    }
}

// ---- manifests and channel files ----

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        (
            "[a-z][a-z0-9-]{0,20}[a-z0-9]",
            "[A-Za-z0-9][A-Za-z0-9._-]{0,30}",
        ),
        (
            proptest::sample::select(&[Tier::Edge, Tier::Regional][..]),
            proptest::sample::select(&[Kind::Asr, Kind::Mt, Kind::Vad][..]),
            proptest::sample::select(&[Format::Safetensors, Format::Gguf, Format::Onnx][..]),
            proptest::sample::select(
                &[
                    Quantization::None,
                    Quantization::F16,
                    Quantization::Q8_0,
                    Quantization::Q4_0,
                ][..],
            ),
        ),
        vec("[a-z]{2}", 0..3),
        proptest::collection::btree_map(
            "[a-z0-9_-]{1,12}(/[a-z0-9_-][a-z0-9_.-]{0,11}){0,2}",
            (any::<u64>(), "[0-9a-f]{64}"),
            1..4,
        ),
        prop_oneof![Just("global".to_owned()), "[a-z]{2,5}"],
        proptest::collection::btree_map(
            "[a-z_]{1,8}",
            (0u32..100_000).prop_map(|x| f64::from(x) / 1000.0),
            0..3,
        ),
    )
        .prop_map(
            |(
                (name, version),
                (tier, kind, format, quantization),
                languages,
                files,
                residency,
                metrics,
            )| Manifest {
                schema: 1,
                name,
                version,
                tier,
                kind,
                format,
                quantization,
                languages,
                files: files
                    .into_iter()
                    .filter(|(p, _)| p != "manifest.json")
                    .map(|(path, (size, sha256))| FileEntry { path, size, sha256 })
                    .collect(),
                residency,
                lineage: Lineage {
                    parent: None,
                    training_data_jurisdiction: "eu".into(),
                    publisher: "ml@example".into(),
                    created: "2026-12-01T00:00:00Z".into(),
                },
                metrics,
            },
        )
        .prop_filter("a manifest lists files", |m| !m.files.is_empty())
}

fn channel() -> impl Strategy<Value = Channel> {
    (
        (
            "[a-z][a-z0-9-]{0,20}[a-z0-9]",
            "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        ),
        (
            "[A-Za-z0-9][A-Za-z0-9._-]{0,30}",
            proptest::option::of("[A-Za-z0-9][A-Za-z0-9._-]{0,30}"),
        ),
        (0u8..=100, vec("[a-z][a-z0-9-]{0,10}[a-z0-9]", 0..3)),
        any::<u64>(),
    )
        .prop_map(
            |((name, channel), (version, previous), (percent, regions), generation)| Channel {
                schema: 1,
                name,
                channel,
                version,
                previous,
                rollout: Rollout { percent, regions },
                updated_by: "ml@example".into(),
                updated_at: "2026-12-01T00:00:00Z".into(),
                generation,
            },
        )
}

/// `value` with the string at a random place replaced by `with`.
fn replace_a_string(value: &mut serde_json::Value, at: usize, with: &str) {
    let mut strings = Vec::new();
    collect_strings(value, &mut strings);
    if strings.is_empty() {
        return;
    }
    let target = at % strings.len();
    let mut seen = 0;
    set_string(value, target, &mut seen, with);
}

fn collect_strings<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(o) => o.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

fn set_string(value: &mut serde_json::Value, target: usize, seen: &mut usize, with: &str) {
    match value {
        serde_json::Value::String(s) => {
            if *seen == target {
                *s = with.to_owned();
            }
            *seen += 1;
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|v| set_string(v, target, seen, with)),
        serde_json::Value::Object(o) => o
            .values_mut()
            .for_each(|v| set_string(v, target, seen, with)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_manifest_survives_json(m in manifest()) {
        prop_assert_eq!(Manifest::from_json(&m.to_json()), Ok(m));
    }

    #[test]
    fn every_channel_survives_json(c in channel()) {
        prop_assert_eq!(Channel::from_json(&c.to_json()), Ok(c));
    }

    #[test]
    fn arbitrary_bytes_are_no_manifest_or_channel(bytes in vec(any::<u8>(), 0..2048)) {
        prop_assert!(Manifest::from_json(&bytes).is_err());
        prop_assert!(Channel::from_json(&bytes).is_err());
    }

    #[test]
    fn a_manifest_with_a_hostile_field_parses_only_with_safe_names(
        m in manifest(),
        at in any::<usize>(),
        with in hostile_name(),
    ) {
        let mut value = serde_json::to_value(&m).unwrap();
        replace_a_string(&mut value, at, &with);
        if let Ok(parsed) = Manifest::from_json(&serde_json::to_vec(&value).unwrap()) {
            prop_assert!(is_valid_model_name(&parsed.name));
            prop_assert!(is_valid_version(&parsed.version));
            for f in &parsed.files {
                prop_assert!(is_valid_file_path(&f.path), "{:?}", f.path);
            }
        }
    }

    #[test]
    fn a_channel_with_a_hostile_field_parses_only_with_safe_names(
        c in channel(),
        at in any::<usize>(),
        with in hostile_name(),
    ) {
        let mut value = serde_json::to_value(&c).unwrap();
        replace_a_string(&mut value, at, &with);
        match Channel::from_json(&serde_json::to_vec(&value).unwrap()) {
            Ok(parsed) => {
                prop_assert!(is_valid_model_name(&parsed.name));
                prop_assert!(is_valid_name(&parsed.channel));
                prop_assert!(is_valid_version(&parsed.version));
                prop_assert!(parsed.previous.iter().all(|v| is_valid_version(v)));
                prop_assert!(parsed.rollout.regions.iter().all(|r| is_valid_name(r)));
            }
            Err(e) => prop_assert!(e.to_string().len() < 400, "{}", e),
        }
    }
}

#[test]
fn a_document_past_the_limit_is_refused_unparsed() {
    use earshot_proto::manifest::{MAX_DOCUMENT_BYTES, ManifestError};
    let big = vec![b' '; MAX_DOCUMENT_BYTES + 1];
    assert_eq!(
        Manifest::from_json(&big),
        Err(ManifestError::TooLarge(big.len()))
    );
    assert_eq!(
        Channel::from_json(&big),
        Err(ManifestError::TooLarge(big.len()))
    );
}

// ---- the topology file ----

fn topology_text() -> impl Strategy<Value = String> {
    (
        vec((hostile_name(), any::<bool>()), 1..3),
        vec((hostile_name(), any::<proptest::sample::Index>(), 1u16..65535), 1..4),
        vec((hostile_name(), any::<proptest::sample::Index>(), vec(any::<proptest::sample::Index>(), 1..3)), 0..3),
    )
        .prop_map(|(jurisdictions, regions, edges)| {
            let mut t = String::new();
            for (name, strict) in &jurisdictions {
                t += &format!("[[jurisdiction]]\nname = {name:?}\nstrict = {strict}\n\n");
            }
            for (name, j, port) in &regions {
                let j = &jurisdictions[j.index(jurisdictions.len())].0;
                t += &format!(
                    "[[region]]\nname = {name:?}\njurisdiction = {j:?}\nquic = \"127.0.0.1:{port}\"\n\n"
                );
            }
            for (name, j, rs) in &edges {
                let j = &jurisdictions[j.index(jurisdictions.len())].0;
                let rs: Vec<&String> = rs.iter().map(|i| &regions[i.index(regions.len())].0).collect();
                t += &format!("[[edge]]\nname = {name:?}\njurisdiction = {j:?}\nregions = {rs:?}\n\n");
            }
            t
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_text_is_no_topology_and_never_panics(t in text(3000)) {
        // (Topology::load reads at most MAX_TOPOLOGY_BYTES of a file.)
        let _ = Topology::from_toml_str(&t);
    }

    #[test]
    fn a_topology_loads_only_with_valid_names_and_permitted_routes(t in topology_text()) {
        if let Ok(topology) = Topology::from_toml_str(&t) {
            for j in topology.jurisdictions() {
                prop_assert!(is_valid_name(&j.name), "{:?}", j.name);
            }
            for r in topology.regions() {
                prop_assert!(is_valid_name(&r.name), "{:?}", r.name);
            }
            for e in topology.edges() {
                prop_assert!(is_valid_name(&e.name), "{:?}", e.name);
                let strict = topology.jurisdiction(&e.jurisdiction).unwrap().strict;
                for r in &e.regions {
                    let region = topology.region(r).unwrap();
                    prop_assert!(!strict || region.jurisdiction == e.jurisdiction,
                        "edge {} of strict {} routes to {} in {}", e.name, e.jurisdiction, r, region.jurisdiction);
                }
            }
        }
    }
}
