//! Real speech audio for tests and the demo: espeak-ng speaks each
//! sentence, sox converts it to 16 kHz, and the sentences are joined with
//! silence of a known length, so the expected utterance count and spans are
//! known.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// A generated recording.
#[derive(Debug, Clone)]
pub struct Speech {
    /// 16 kHz mono samples.
    pub samples: Vec<i16>,
    /// `(start, end)` of each sentence in seconds.
    pub spans: Vec<(f64, f64)>,
}

pub const SAMPLE_RATE: u32 = 16_000;

impl Speech {
    /// The samples as s16le bytes, as the edge expects them.
    pub fn pcm_bytes(&self) -> Vec<u8> {
        self.samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    pub fn write_wav(&self, path: &Path) -> anyhow::Result<()> {
        write_wav(path, &self.samples)
    }
}

/// Speaks `sentences` with `gap` seconds of silence between them (and
/// `edge` seconds before the first and after the last).
pub fn synthesize(
    sentences: &[&str],
    gap: f64,
    edge: f64,
    workdir: &Path,
) -> anyhow::Result<Speech> {
    std::fs::create_dir_all(workdir)?;
    let silence = |secs: f64| vec![0i16; (secs * f64::from(SAMPLE_RATE)).round() as usize];
    let mut samples = silence(edge);
    let mut spans = Vec::new();
    for (i, sentence) in sentences.iter().enumerate() {
        if i > 0 {
            samples.extend(silence(gap));
        }
        let spoken = speak(sentence, "en-us", &workdir.join(format!("sentence-{i}")))?;
        let start = samples.len() as f64 / f64::from(SAMPLE_RATE);
        samples.extend(spoken);
        spans.push((start, samples.len() as f64 / f64::from(SAMPLE_RATE)));
    }
    samples.extend(silence(edge));
    Ok(Speech { samples, spans })
}

/// One sentence spoken by espeak-ng's `voice` (`en-us`, `de`, `fr`) as
/// 16 kHz mono samples; `stem` names its scratch files.
pub fn speak(sentence: &str, voice: &str, stem: &Path) -> anyhow::Result<Vec<i16>> {
    let raw = stem.with_extension("raw.wav");
    let resampled = stem.with_extension("16k.wav");
    run(Command::new("espeak-ng")
        .args(["-v", voice, "-s", "160", "-w"])
        .arg(&raw)
        .arg(sentence))?;
    run(Command::new("sox")
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&resampled))?;
    read_wav(&resampled)
}

/// English test sentences: the pipeline test, the word error rate
/// benchmark and the real-weight tests speak these.
pub const ENGLISH: [&str; 12] = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning at nine.",
    "The weather today is bright and cold with a light wind from the north.",
    "She said that the meeting would start at half past ten.",
    "Every region keeps its own queue of utterances.",
    "We measured the latency of every hop in the network.",
    "Bring the documents we talked about on Monday.",
    "The train to the city leaves in twenty minutes.",
    "I would like a cup of coffee with milk and no sugar.",
    "Our team will publish a new version of the model next week.",
    "The library opens at eight and closes at six.",
    "Turn left at the second light and park behind the bakery.",
];

/// German and French sentences for language detection.
pub const GERMAN: [&str; 3] = [
    "Guten Morgen, wie geht es Ihnen heute?",
    "Der Zug nach Berlin fährt in zehn Minuten ab.",
    "Ich möchte gerne einen Kaffee mit Milch bestellen.",
];
pub const FRENCH: [&str; 3] = [
    "Bonjour, comment allez-vous aujourd'hui?",
    "Le train pour Paris part dans dix minutes.",
    "Je voudrais un café au lait, s'il vous plaît.",
];

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().with_context(|| {
        format!("cannot run {program}: install it with `make setup` (Debian package {program})")
    })?;
    if !output.status.success() {
        bail!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Reads a mono 16-bit WAV at 16 kHz.
pub fn read_wav(path: &Path) -> anyhow::Result<Vec<i16>> {
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let spec = reader.spec();
    if spec.channels != 1 || spec.sample_rate != SAMPLE_RATE || spec.bits_per_sample != 16 {
        bail!(
            "{}: need 16 kHz mono 16-bit WAV, got {} Hz, {} channels, {} bits (convert with: sox in.wav -r 16000 -c 1 -b 16 out.wav)",
            path.display(),
            spec.sample_rate,
            spec.channels,
            spec.bits_per_sample
        );
    }
    reader
        .samples::<i16>()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading samples of {}", path.display()))
}

pub fn write_wav(path: &Path, samples: &[i16]) -> anyhow::Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)?;
    for s in samples {
        writer.write_sample(*s)?;
    }
    writer.finalize()?;
    Ok(())
}
