//! `earshot bench asr`: word error rate and per-utterance latency of the
//! regional worker's Whisper on real weights, in the JSON-lines format of
//! `../shared/peers/` so faster-whisper runs on the same WAVs land in the
//! same tables.
//!
//! The audio set (`<out>/audio/manifest.tsv` and its WAVs: the English
//! sentences of [`speech::ENGLISH`] spoken by espeak-ng `en-us`) is written
//! once and reused. Each file is transcribed once untimed (the first only,
//! as a warm-up) and then `runs` times; its time is the median. The thread
//! count is candle's (`RAYON_NUM_THREADS`, else every core).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use earshot_asr::{EncoderWindow, WhisperModel};

use crate::speech;

/// One file of the audio set.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub lang: String,
    pub wav: PathBuf,
    pub text: String,
}

/// Writes (once) and lists the audio set under `dir`.
pub fn audio_set(dir: &Path) -> anyhow::Result<Vec<Item>> {
    let manifest = dir.join("manifest.tsv");
    let items: Vec<Item> = speech::ENGLISH
        .iter()
        .enumerate()
        .map(|(i, text)| Item {
            id: format!("en-{i:02}"),
            lang: "en".into(),
            wav: dir.join(format!("en/en-{i:02}.wav")),
            text: (*text).to_owned(),
        })
        .collect();
    if manifest.is_file() && items.iter().all(|i| i.wav.is_file()) {
        return Ok(items);
    }
    std::fs::create_dir_all(dir.join("en"))?;
    let mut tsv = String::from("id\tlang\tvoice\tseconds\twav\ttext\n");
    for item in &items {
        let samples = speech::speak(&item.text, "en-us", &dir.join("en").join(&item.id))?;
        speech::write_wav(&item.wav, &samples)?;
        tsv.push_str(&format!(
            "{}\t{}\ten-us\t{:.2}\ten/{}.wav\t{}\n",
            item.id,
            item.lang,
            samples.len() as f64 / 16_000.0,
            item.id,
            item.text
        ));
    }
    std::fs::write(&manifest, tsv)?;
    Ok(items)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark for `model` and appends its JSON lines to
/// `<out>/results/earshot-<model>-<window>-t<threads>.jsonl`.
pub fn run(
    model: &Path,
    out: &Path,
    runs: usize,
    window: EncoderWindow,
    timestamps: bool,
    words: bool,
) -> anyhow::Result<()> {
    let items = audio_set(&out.join("audio"))?;
    let whisper = WhisperModel::load(model, window)
        .with_context(|| format!("loading {}", model.display()))?;
    let threads = earshot_asr::inference_threads();
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let window_name = format!(
        "{window}{}{}",
        if timestamps { "-timestamps" } else { "" },
        if words { "-words" } else { "" }
    );
    std::fs::create_dir_all(out.join("results"))?;
    let path = out
        .join("results")
        .join(format!("earshot-{name}-{window_name}-t{threads}.jsonl"));
    let mut file = std::fs::File::create(&path)?;
    let mut errors = earshot_asr::wer::WordErrors::default();
    let mut totals = Vec::new();
    let mut per_token = Vec::new();
    for (n, item) in items.iter().enumerate() {
        let pcm: Vec<f32> = speech::read_wav(&item.wav)?
            .iter()
            .map(|&s| f32::from(s) / 32768.0)
            .collect();
        // The file's language is given, as the peers' runner does by
        // default (its `--language auto` means "each file's own").
        let language = Some(item.lang.as_str());
        let recognize = || {
            let utterance = earshot_asr::Utterance {
                pcm: &pcm,
                language,
                translate: false,
                timestamps,
                words,
            };
            let (mut results, timings) = whisper.recognize_batch(&[utterance]);
            let result = results.pop().context("no result")?;
            anyhow::Ok((result?, timings))
        };
        if n == 0 {
            recognize()?;
        }
        let mut walls = Vec::new();
        let mut last = None;
        for _ in 0..runs.max(1) {
            let started = Instant::now();
            let r = recognize()?;
            walls.push(started.elapsed().as_secs_f64() * 1e3);
            last = Some(r);
        }
        let (r, t) = last.context("no run")?;
        let tr = r.transcript;
        let total = median(walls.clone());
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        errors.add(&item.text, &tr.text);
        totals.push(total);
        per_token.push(ms(t.decoder) / (tr.tokens.len() + 1) as f64);
        let line = serde_json::json!({
            "engine": "earshot", "tag": "", "model": name, "window": window_name,
            "threads": threads, "mode": "transcribe", "task": "transcribe",
            "id": item.id, "lang": item.lang, "hint": language,
            "seconds": pcm.len() as f64 / 16_000.0, "runs": runs,
            "total_ms": total, "walls_ms": walls,
            "mel_ms": ms(t.mel), "encoder_ms": ms(t.encoder), "decode_ms": ms(t.decoder),
            "ref": item.text, "text": tr.text, "n_tokens": tr.tokens.len(),
            "tokens": tr.tokens, "language": tr.language,
            "no_speech_prob": tr.no_speech_probability, "avg_logprob": tr.avg_logprob,
            "words": tr.words.iter().map(|w| (w.text.trim(), w.start, w.end)).collect::<Vec<_>>(),
        });
        writeln!(file, "{line}")?;
        println!("{}\t{total:>7.0} ms\t{}", item.id, tr.text);
    }
    println!(
        "{name} ({window_name} window, {threads} threads): WER {errors}, \
         median {:.0} ms, p90 {:.0} ms per utterance, decoder {:.1} ms/token; wrote {}",
        median(totals.clone()),
        crate::bench::summarize(&totals).p90,
        median(per_token),
        path.display()
    );
    Ok(())
}

/// Jobs per second of one worker's model when `concurrency` utterances wait
/// at once and are recognised in batches of up to `batch` (as the worker
/// reads them: `XREADGROUP COUNT batch`). The utterances cycle through the
/// audio set; each configuration also reports how many transcripts differ
/// from batching off (batched products may round differently).
pub fn batch(
    model: &Path,
    out: &Path,
    concurrency: &[usize],
    batch: &[usize],
    window: EncoderWindow,
) -> anyhow::Result<()> {
    let items = audio_set(&out.join("audio"))?;
    let whisper = WhisperModel::load(model, window)
        .with_context(|| format!("loading {}", model.display()))?;
    let pcms: Vec<Vec<f32>> = items
        .iter()
        .map(|item| {
            Ok(speech::read_wav(&item.wav)?
                .iter()
                .map(|&s| f32::from(s) / 32768.0)
                .collect())
        })
        .collect::<anyhow::Result<_>>()?;
    let threads = earshot_asr::inference_threads();
    // Warm-up, and the unbatched transcripts to compare with.
    let reference: Vec<String> = pcms
        .iter()
        .map(|pcm| Ok(whisper.transcribe(pcm, Some("en"))?.text))
        .collect::<anyhow::Result<_>>()?;
    println!(
        "| utterances waiting | max batch | jobs/s | ms per job | encoder ms per job | decoder ms per job | transcripts unlike batch 1 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &n in concurrency {
        for &b in batch {
            let b = b.max(1);
            let started = Instant::now();
            let mut differ = 0;
            let mut stages = earshot_asr::Timings::default();
            let order: Vec<usize> = (0..n).map(|i| i % pcms.len()).collect();
            for chunk in order.chunks(b) {
                let utterances: Vec<earshot_asr::Utterance<'_>> = chunk
                    .iter()
                    .map(|&i| earshot_asr::Utterance {
                        pcm: &pcms[i],
                        language: Some("en"),
                        translate: false,
                        timestamps: false,
                        words: false,
                    })
                    .collect();
                let (results, t) = whisper.recognize_batch(&utterances);
                stages.encoder += t.encoder;
                stages.decoder += t.decoder;
                for (&i, r) in chunk.iter().zip(results) {
                    if r?.transcript.text != reference[i] {
                        differ += 1;
                    }
                }
            }
            let secs = started.elapsed().as_secs_f64();
            let per_job = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n as f64;
            println!(
                "| {n} | {b} | {:.2} | {:.0} | {:.0} | {:.0} | {differ} of {n} |",
                n as f64 / secs,
                secs * 1e3 / n as f64,
                per_job(stages.encoder),
                per_job(stages.decoder),
            );
        }
    }
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned());
    println!(
        "{} ({window} window, {threads} threads)",
        name.unwrap_or_default()
    );
    Ok(())
}

/// Words of `reference` that an LCS alignment with `hypothesis` matches.
fn matched_words(reference: &[String], hypothesis: &[String]) -> Vec<bool> {
    let (n, m) = (reference.len(), hypothesis.len());
    let mut lcs = vec![vec![0u16; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if reference[i] == hypothesis[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut matched = vec![false; n];
    let (mut i, mut j) = (0, 0);
    while i < n && j < m {
        if reference[i] == hypothesis[j] {
            matched[i] = true;
            i += 1;
            j += 1;
        } else if lcs[i + 1][j] >= lcs[i][j + 1] {
            i += 1;
        } else {
            j += 1;
        }
    }
    matched
}

/// `earshot bench partials`: what live partials cost and how soon they show
/// each word, for `model` (the edge tier: a GGUF or safetensors directory)
/// with `window`, asked every `cadence_ms` of audio as a session asks them.
///
/// Each sentence of the audio set is played as one utterance in simulated
/// real time: a partial is asked once `cadence_ms` of new audio exists and
/// the previous partial is done (one in flight per session, as on the
/// edge), and reads the audio so far; its compute time is measured. A
/// word's time is when it ends, from `reference` (the regional f32 model
/// with word timestamps on the whole sentence). A word's latency is from
/// that end (the chunk that completes it) to the first partial whose text
/// contains it (an LCS alignment of normalised words); words no partial
/// shows before the audio ends are counted as left to the final.
pub fn partials(
    model: &Path,
    reference: &Path,
    out: &Path,
    window: EncoderWindow,
    cadence_ms: u32,
) -> anyhow::Result<()> {
    let items = audio_set(&out.join("audio"))?;
    let whisper = WhisperModel::load(model, window)
        .with_context(|| format!("loading {}", model.display()))?;
    let oracle = WhisperModel::load(reference, EncoderWindow::default())
        .with_context(|| format!("loading {}", reference.display()))?;
    let cadence = f64::from(cadence_ms) / 1e3;
    let (mut latencies, mut computes) = (Vec::new(), Vec::new());
    let (mut words, mut left, mut audio_seconds, mut compute_seconds) = (0, 0, 0.0, 0.0);
    let mut last_errors = earshot_asr::wer::WordErrors::default();
    for (n, item) in items.iter().enumerate() {
        let pcm: Vec<f32> = speech::read_wav(&item.wav)?
            .iter()
            .map(|&s| f32::from(s) / 32768.0)
            .collect();
        let seconds = pcm.len() as f64 / 16_000.0;
        let utterance = earshot_asr::Utterance {
            pcm: &pcm,
            language: Some("en"),
            translate: false,
            timestamps: false,
            words: true,
        };
        let (mut timed, _) = oracle.recognize_batch(&[utterance]);
        let timed = timed.pop().context("no result")??.transcript;
        // (normalised word, end in seconds) of the sentence.
        let ends: Vec<(String, f64)> = timed
            .words
            .iter()
            .flat_map(|w| {
                earshot_asr::wer::normalize(&w.text)
                    .into_iter()
                    .map(move |t| (t, f64::from(w.end)))
            })
            .collect();
        let reference: Vec<String> = ends.iter().map(|(w, _)| w.clone()).collect();
        if n == 0 {
            whisper.transcribe(&pcm, Some("en"))?;
        }
        let mut shown: Vec<Option<f64>> = vec![None; ends.len()];
        let mut ask = cadence;
        let mut last_text = String::new();
        while ask <= seconds + 1e-9 {
            let prefix = &pcm[..((ask * 16_000.0) as usize).min(pcm.len())];
            let started = Instant::now();
            let text = whisper.transcribe(prefix, Some("en"))?.text;
            let took = started.elapsed().as_secs_f64();
            computes.push(took * 1e3);
            compute_seconds += took;
            let answered = ask + took;
            let found = matched_words(&reference, &earshot_asr::wer::normalize(&text));
            for (i, hit) in found.into_iter().enumerate() {
                if hit && shown[i].is_none() {
                    shown[i] = Some(answered);
                }
            }
            last_text = text;
            // The next ask: a cadence of new audio, and this one done;
            // sessions ask at their next 20 ms chunk.
            let next = (ask + cadence).max(answered);
            ask = (next / 0.02).ceil() * 0.02;
        }
        last_errors.add(&item.text, &last_text);
        audio_seconds += seconds;
        for ((_, end), at) in ends.iter().zip(&shown) {
            words += 1;
            match at {
                Some(at) => latencies.push(((at - end).max(0.0)) * 1e3),
                None => left += 1,
            }
        }
    }
    let lat = crate::bench::summarize(&latencies);
    let cost = crate::bench::summarize(&computes);
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "| model | window | cadence | words shown by a partial | word → partial p50 | p99 | compute per partial p50 | p99 | CPU s per audio s | last partial WER |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {name} | {window} | {cadence_ms} ms | {} of {words} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} | {last_errors} |",
        words - left,
        lat.median,
        lat.p99,
        cost.median,
        cost.p99,
        compute_seconds / audio_seconds,
    );
    Ok(())
}
