//! Word-level timestamps from cross-attention, as OpenAI's `timing.py`
//! computes them (and CTranslate2's `align`): the decoder is run once more
//! over the transcript, the cross-attention of the heads the model names
//! (`alignment_heads`) is turned into a token-by-frame matrix, and dynamic
//! time warping finds the monotonic path through it. A word starts at the
//! frame where the path reaches its first token and ends where the next
//! word's first token is reached.
//!
//! Everything here is plain arithmetic on `f32` slices, so it is tested
//! without a model.

/// Encoder positions per second of audio (10 ms mel frames, stride 2).
pub const POSITIONS_PER_SECOND: f32 = 50.0;

/// Width of the median filter over each head's attention (OpenAI's default).
pub const MEDIAN_FILTER_WIDTH: usize = 7;

/// Python's `string.punctuation`; a subword whose stripped text is a
/// substring of it does not start a new word (OpenAI's rule, kept as is).
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
/// Punctuation merged into the following word.
const PREPENDED: &str = "\"'\u{201c}\u{bf}([{-";
/// Punctuation merged into the preceding word.
const APPENDED: &str = "\"'.\u{3002},\u{ff0c}!\u{ff01}?\u{ff1f}:\u{ff1a}\u{201d})]}\u{3001}";
/// Words that end a sentence (for clipping over-long words).
const SENTENCE_ENDS: &str = ".\u{3002}!\u{ff01}?\u{ff1f}";

/// Languages written without spaces: words are split at character
/// boundaries instead.
const UNSPACED: [&str; 6] = ["zh", "ja", "th", "lo", "my", "yue"];

/// One word and when it was spoken, in seconds from the start of the audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    /// As decoded, with its leading space (`" word"`).
    pub text: String,
    pub start: f32,
    pub end: f32,
    /// Mean probability of the word's tokens.
    pub probability: f32,
}

/// The token-by-position matrix DTW runs on, from each alignment head's
/// raw (pre-softmax) cross-attention scores.
///
/// `heads` holds one `rows x columns` row-major matrix per head; only the
/// first `content` columns (the positions that hold audio, not padding)
/// are used. Per head, each row is softmaxed over the content, each
/// column is standardised over the rows, and each row is median-filtered
/// along time; the heads are then averaged. Returns `rows x content`.
pub fn attention_matrix(
    heads: &[Vec<f32>],
    rows: usize,
    columns: usize,
    content: usize,
) -> Vec<f32> {
    let content = content.min(columns);
    let mut mean = vec![0f32; rows * content];
    if heads.is_empty() || rows == 0 || content == 0 {
        return mean;
    }
    for scores in heads {
        let mut w = vec![0f32; rows * content];
        for r in 0..rows {
            let Some(src) = scores.get(r * columns..r * columns + content) else {
                continue;
            };
            let dst = &mut w[r * content..(r + 1) * content];
            let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = (s - max).exp();
                total += *d;
            }
            if total > 0.0 {
                dst.iter_mut().for_each(|d| *d /= total);
            }
        }
        // Standardise each position over the tokens (population std).
        for c in 0..content {
            let column = (0..rows).map(|r| w[r * content + c]);
            let m = column.clone().sum::<f32>() / rows as f32;
            let var = column.map(|x| (x - m) * (x - m)).sum::<f32>() / rows as f32;
            let std = var.sqrt();
            for r in 0..rows {
                let x = &mut w[r * content + c];
                *x = if std > 0.0 { (*x - m) / std } else { 0.0 };
            }
        }
        for r in 0..rows {
            let filtered = median_filter(&w[r * content..(r + 1) * content], MEDIAN_FILTER_WIDTH);
            for (acc, x) in mean[r * content..(r + 1) * content]
                .iter_mut()
                .zip(filtered)
            {
                *acc += x;
            }
        }
    }
    let n = heads.len() as f32;
    mean.iter_mut().for_each(|x| *x /= n);
    mean
}

/// A median filter of odd `width` with reflected edges (`x[-1] = x[1]`),
/// as OpenAI's; a row no longer than half the width is returned as is.
pub fn median_filter(x: &[f32], width: usize) -> Vec<f32> {
    let pad = width / 2;
    if x.len() <= pad || width < 3 {
        return x.to_vec();
    }
    let n = x.len() as isize;
    let at = |i: isize| -> f32 {
        let i = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        x[i.clamp(0, n - 1) as usize]
    };
    let mut window = vec![0f32; width];
    (0..n)
        .map(|i| {
            for (k, w) in window.iter_mut().enumerate() {
                *w = at(i - pad as isize + k as isize);
            }
            window.sort_unstable_by(f32::total_cmp);
            window[pad]
        })
        .collect()
}

/// Dynamic time warping on the negated matrix (`rows x columns`): the
/// monotonic path from the first token and position to the last that
/// maximises the attention it passes through. Returns the path's
/// `(token, position)` pairs in order, OpenAI's `dtw_cpu` with its
/// tie-breaking.
pub fn dtw(matrix: &[f32], rows: usize, columns: usize) -> Vec<(usize, usize)> {
    if rows == 0 || columns == 0 || matrix.len() < rows * columns {
        return Vec::new();
    }
    let (n, m) = (rows + 1, columns + 1);
    let mut cost = vec![f32::INFINITY; n * m];
    let mut trace = vec![-1i8; n * m];
    cost[0] = 0.0;
    for j in 1..m {
        for i in 1..n {
            let c0 = cost[(i - 1) * m + j - 1];
            let c1 = cost[(i - 1) * m + j];
            let c2 = cost[i * m + j - 1];
            let (c, t) = if c0 < c1 && c0 < c2 {
                (c0, 0)
            } else if c1 < c0 && c1 < c2 {
                (c1, 1)
            } else {
                (c2, 2)
            };
            cost[i * m + j] = -matrix[(i - 1) * columns + j - 1] + c;
            trace[i * m + j] = t;
        }
    }
    trace[..m].fill(2);
    for row in trace.chunks_mut(m) {
        row[0] = 1;
    }
    let (mut i, mut j) = (rows, columns);
    let mut path = Vec::with_capacity(rows + columns);
    while i > 0 || j > 0 {
        path.push((i.saturating_sub(1), j.saturating_sub(1)));
        match trace[i * m + j] {
            0 => {
                i -= 1;
                j -= 1;
            }
            1 => i -= 1,
            _ => j -= 1,
        }
    }
    path.reverse();
    path
}

/// The transcript's tokens grouped into words, each with its text, as
/// OpenAI's tokenizer splits them: at spaces and punctuation, or at
/// character boundaries for languages written without spaces. `decode`
/// turns tokens into text (special tokens included). A token that ends
/// inside a multi-byte character joins the next.
pub fn split_words(
    tokens: &[u32],
    language: &str,
    is_special: impl Fn(u32) -> bool,
    decode: impl Fn(&[u32]) -> String,
) -> Vec<(String, Vec<u32>)> {
    let full = decode(tokens);
    let mut subwords: Vec<(String, Vec<u32>)> = Vec::new();
    let mut current = Vec::new();
    let mut offset = 0usize;
    for &t in tokens {
        current.push(t);
        let text = decode(&current);
        let complete = match text.find('\u{fffd}') {
            None => true,
            // A replacement character that is really in the text.
            Some(at) => full
                .get(offset + at..)
                .is_some_and(|s| s.starts_with('\u{fffd}')),
        };
        if complete {
            offset += text.len();
            subwords.push((text, std::mem::take(&mut current)));
        }
    }
    if UNSPACED.contains(&language) {
        return subwords;
    }
    let mut words: Vec<(String, Vec<u32>)> = Vec::new();
    for (text, ids) in subwords {
        let special = ids.first().is_some_and(|&t| is_special(t));
        let punctuation = PUNCTUATION.contains(text.trim());
        match words.last_mut() {
            Some(last) if !special && !text.starts_with(' ') && !punctuation => {
                last.0.push_str(&text);
                last.1.extend(ids);
            }
            _ => words.push((text, ids)),
        }
    }
    words
}

/// Words with their times from a DTW `path` over rows that predict each
/// text token and then end-of-text: `words` must cover exactly those
/// tokens, the last "word" being end-of-text itself (not returned).
/// `probabilities` are the text tokens' (a word's is 0 without them).
pub fn word_times(
    path: &[(usize, usize)],
    words: &[(String, Vec<u32>)],
    probabilities: &[f32],
) -> Vec<Word> {
    if words.len() < 2 {
        return Vec::new();
    }
    // The position where the path first reaches each row.
    let mut jumps = Vec::new();
    let mut previous = None;
    for &(row, position) in path {
        if previous != Some(row) {
            jumps.push(position as f32 / POSITIONS_PER_SECOND);
            previous = Some(row);
        }
    }
    let mut boundary = 0usize;
    let mut out = Vec::with_capacity(words.len() - 1);
    for (text, ids) in &words[..words.len() - 1] {
        let next = boundary + ids.len();
        let (Some(&start), Some(&end)) = (jumps.get(boundary), jumps.get(next)) else {
            break;
        };
        let probs = probabilities.get(boundary..next.min(probabilities.len()));
        let probability = match probs {
            Some(p) if !p.is_empty() => p.iter().sum::<f32>() / p.len() as f32,
            _ => 0.0,
        };
        out.push(Word {
            text: text.clone(),
            start,
            end,
            probability,
        });
        boundary = next;
    }
    out
}

/// OpenAI's clean-up of aligned words: an over-long word at a sentence
/// boundary is clipped, and punctuation is merged into its neighbour.
pub fn tidy(mut words: Vec<Word>) -> Vec<Word> {
    clip_long_words(&mut words);
    merge_punctuation(&mut words);
    words.retain(|w| !w.text.is_empty());
    words
}

/// Frames of 10 ms louder (RMS) than this fraction of the loudest frame
/// count as voiced: -34 dB, below a fricative's onset, above digital
/// silence and quiet room noise.
const VOICED: f32 = 0.02;

/// Moves each word's start to the first voiced 10 ms frame inside it and
/// its end after the last one. DTW gives the silence before a word to that
/// word (the first word of an utterance always starts at 0); the audio
/// says where the speech is. A word with no voiced frame, and audio too
/// noisy to have quiet frames, is left as it is.
pub fn snap_to_voice(words: &mut [Word], pcm: &[f32], sample_rate: u32) {
    let frame = (sample_rate / 100).max(1) as usize;
    let energy: Vec<f32> = pcm
        .chunks(frame)
        .map(|c| (c.iter().map(|x| x * x).sum::<f32>() / c.len() as f32).sqrt())
        .collect();
    let loudest = energy.iter().copied().fold(0f32, f32::max);
    if loudest <= 0.0 {
        return;
    }
    let voiced = |i: &usize| energy.get(*i).is_some_and(|e| *e > VOICED * loudest);
    let seconds = |i: usize| i as f32 / 100.0;
    for w in words {
        let from = (w.start * 100.0).floor().max(0.0) as usize;
        let to = ((w.end * 100.0).ceil().max(0.0) as usize).min(energy.len());
        let Some(first) = (from..to).find(voiced) else {
            continue;
        };
        let last = (from..to).rfind(voiced).unwrap_or(first);
        w.start = w.start.max(seconds(first));
        w.end = w.end.min(seconds(last + 1)).max(w.start);
    }
}

/// A word longer than twice the median word (at most 1.4 s) next to a
/// sentence end is cut to that length: its time is mostly the pause.
fn clip_long_words(words: &mut [Word]) {
    let mut durations: Vec<f32> = words
        .iter()
        .map(|w| w.end - w.start)
        .filter(|d| *d != 0.0)
        .collect();
    if durations.is_empty() {
        return;
    }
    durations.sort_unstable_by(f32::total_cmp);
    let n = durations.len();
    let median = if n % 2 == 1 {
        durations[n / 2]
    } else {
        (durations[n / 2 - 1] + durations[n / 2]) / 2.0
    };
    let max = median.min(0.7) * 2.0;
    for i in 1..words.len() {
        if words[i].end - words[i].start > max {
            if SENTENCE_ENDS.contains(words[i].text.as_str()) {
                words[i].end = words[i].start + max;
            } else if SENTENCE_ENDS.contains(words[i - 1].text.as_str()) {
                words[i].start = words[i].end - max;
            }
        }
    }
}

/// Opening punctuation joins the next word, closing punctuation the one
/// before (OpenAI's `merge_punctuations`); the emptied words are dropped
/// by the caller.
fn merge_punctuation(words: &mut [Word]) {
    if words.len() < 2 {
        return;
    }
    let mut j = words.len() - 1;
    for i in (0..words.len() - 1).rev() {
        let text = &words[i].text;
        if text.starts_with(' ') && PREPENDED.contains(text.trim()) {
            let moved = std::mem::take(&mut words[i].text);
            words[j].text.insert_str(0, &moved);
        } else {
            j = i;
        }
    }
    let mut i = 0;
    for j in 1..words.len() {
        if !words[i].text.ends_with(' ') && APPENDED.contains(words[j].text.as_str()) {
            let moved = std::mem::take(&mut words[j].text);
            words[i].text.push_str(&moved);
        } else {
            i = j;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_filter_reflects_at_the_edges() {
        let x = [5.0, 1.0, 9.0, 2.0, 8.0];
        // Padded by reflection: 9 1 | 5 1 9 2 8 | 2 9.
        assert_eq!(median_filter(&x, 5), vec![5.0, 2.0, 5.0, 2.0, 8.0]);
        assert_eq!(median_filter(&[3.0, 1.0], 7), vec![3.0, 1.0]);
    }

    #[test]
    fn dtw_follows_the_diagonal_of_strong_attention() {
        // Three tokens over six positions: token 0 at 0-1, 1 at 2-3, 2 at 4-5.
        let mut m = vec![-1f32; 3 * 6];
        for (r, cols) in [(0, [0, 1]), (1, [2, 3]), (2, [4, 5])] {
            for c in cols {
                m[r * 6 + c] = 1.0;
            }
        }
        let path = dtw(&m, 3, 6);
        assert_eq!(path.first(), Some(&(0, 0)));
        assert_eq!(path.last(), Some(&(2, 5)));
        let first_at = |row: usize| path.iter().find(|p| p.0 == row).map(|p| p.1);
        assert_eq!(
            (first_at(0), first_at(1), first_at(2)),
            (Some(0), Some(2), Some(4))
        );
        // Monotonic, one step at a time.
        for w in path.windows(2) {
            let (a, b) = (w[0], w[1]);
            assert!(b.0 >= a.0 && b.1 >= a.1 && b.0 - a.0 <= 1 && b.1 - a.1 <= 1);
        }
    }

    fn decode_chars(tokens: &[u32]) -> String {
        tokens
            .iter()
            .map(|&t| match t {
                0 => " The".to_owned(),
                1 => " qu".to_owned(),
                2 => "ick".to_owned(),
                3 => ",".to_owned(),
                4 => " \"".to_owned(),
                5 => "fox".to_owned(),
                6 => ".".to_owned(),
                _ => "<|endoftext|>".to_owned(),
            })
            .collect()
    }

    #[test]
    fn words_split_at_spaces_and_punctuation_and_keep_special_tokens_apart() {
        let words = split_words(&[0, 1, 2, 3, 4, 5, 6, 9], "en", |t| t >= 9, decode_chars);
        let texts: Vec<&str> = words.iter().map(|w| w.0.as_str()).collect();
        assert_eq!(
            texts,
            [" The", " quick", ",", " \"fox", ".", "<|endoftext|>"]
        );
        assert_eq!(words[1].1, vec![1, 2]);
        // Without spaces, every complete character is a word.
        let unspaced = split_words(&[0, 1, 2], "ja", |_| false, decode_chars);
        assert_eq!(unspaced.len(), 3);
    }

    #[test]
    fn word_times_come_from_the_first_position_of_each_word_and_merge_punctuation() {
        let words = split_words(&[0, 1, 2, 3, 9], "en", |t| t >= 9, decode_chars);
        // Rows: " The", " qu", "ick", ",", end-of-text; the path reaches
        // them at positions 5, 20, 30, 40, 42 (0.1 s, 0.4 s, ...).
        let path: Vec<(usize, usize)> = (0..50)
            .map(|p| {
                let row = match p {
                    0..20 => 0,
                    20..30 => 1,
                    30..40 => 2,
                    40..42 => 3,
                    _ => 4,
                };
                (row, p)
            })
            .collect();
        let w = tidy(word_times(&path, &words, &[0.9, 0.5, 0.7, 0.8]));
        assert_eq!(w.len(), 2, "the comma joins the word before: {w:?}");
        assert_eq!(w[0].text, " The");
        assert_eq!((w[0].start, w[0].end), (0.0, 0.4));
        assert_eq!(w[1].text, " quick,");
        assert_eq!((w[1].start, w[1].end), (0.4, 0.8));
        assert!((w[1].probability - 0.6).abs() < 1e-6);
    }

    #[test]
    fn words_snap_to_the_voiced_audio_inside_them() {
        // 1 s of audio: silence, a tone from 0.30 to 0.60 s, silence.
        let pcm: Vec<f32> = (0..16_000)
            .map(|i| {
                if (4_800..9_600).contains(&i) {
                    0.5
                } else {
                    0.0
                }
            })
            .collect();
        let word = |start, end| Word {
            text: " w".into(),
            start,
            end,
            probability: 1.0,
        };
        let mut words = vec![word(0.0, 0.7), word(0.7, 1.0)];
        snap_to_voice(&mut words, &pcm, 16_000);
        assert_eq!((words[0].start, words[0].end), (0.3, 0.6));
        // Nothing voiced inside: left alone.
        assert_eq!((words[1].start, words[1].end), (0.7, 1.0));
    }

    #[test]
    fn the_matrix_standardises_and_averages_heads_over_the_content_only() {
        // Two rows over four positions, of which three hold audio; the
        // padding column (a huge score) must not take the attention.
        let head = vec![5.0, 0.0, 0.0, 99.0, 0.0, 0.0, 5.0, 99.0];
        let m = attention_matrix(&[head.clone(), head], 2, 4, 3);
        assert_eq!(m.len(), 6);
        assert!(
            m[0] > 0.0 && m[2] < 0.0,
            "row 0 attends to position 0: {m:?}"
        );
        assert!(
            m[5] > 0.0 && m[3] < 0.0,
            "row 1 attends to position 2: {m:?}"
        );
    }
}
