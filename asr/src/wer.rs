//! Word error rate, with a small English normaliser: lower case, digits as
//! words (0–99), hyphens as spaces, every other non-letter dropped. Enough
//! to score espeak-ng sentences fairly; the benchmark scorer in
//! `../shared/peers/score.py` normalises more (currency, years) for richer
//! text.

/// Edits (substitutions, insertions, deletions) and reference words summed
/// over a corpus: `WER = edits / words`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WordErrors {
    pub edits: usize,
    pub words: usize,
}

impl WordErrors {
    /// Adds one reference/hypothesis pair.
    pub fn add(&mut self, reference: &str, hypothesis: &str) {
        let r = normalize(reference);
        let h = normalize(hypothesis);
        self.edits += edit_distance(&r, &h);
        self.words += r.len();
    }

    /// The corpus word error rate; 0 for an empty corpus.
    pub fn rate(&self) -> f64 {
        if self.words == 0 {
            0.0
        } else {
            self.edits as f64 / self.words as f64
        }
    }
}

impl std::fmt::Display for WordErrors {
    /// `25.6% (31 edits / 121 words)`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}% ({} edits / {} words)",
            100.0 * self.rate(),
            self.edits,
            self.words
        )
    }
}

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 10] = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];

fn number_words(n: u32) -> Option<String> {
    match n {
        0..=19 => Some(ONES[n as usize].to_owned()),
        20..=99 if n.is_multiple_of(10) => Some(TENS[(n / 10) as usize].to_owned()),
        20..=99 => Some(format!(
            "{} {}",
            TENS[(n / 10) as usize],
            ONES[(n % 10) as usize]
        )),
        _ => None,
    }
}

/// The words of `text` after normalisation.
pub fn normalize(text: &str) -> Vec<String> {
    let lowered = text.to_lowercase().replace(['-', '\u{2014}'], " ");
    let mut out = Vec::new();
    for raw in lowered.split_whitespace() {
        let word: String = raw.chars().filter(|c| c.is_alphanumeric()).collect();
        if word.is_empty() {
            continue;
        }
        match word.parse::<u32>().ok().and_then(number_words) {
            Some(words) => out.extend(words.split(' ').map(str::to_owned)),
            None => out.push(word),
        }
    }
    out
}

/// Levenshtein distance over words.
pub fn edit_distance(a: &[String], b: &[String]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(x != y);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_punctuation_and_numbers() {
        assert_eq!(
            normalize("She said: half-past 10, at 42!"),
            ["she", "said", "half", "past", "ten", "at", "forty", "two"]
        );
        assert_eq!(normalize("  ... "), Vec::<String>::new());
    }

    #[test]
    fn counts_substitutions_insertions_and_deletions() {
        let mut w = WordErrors::default();
        w.add("the quick brown fox", "the quick round fox");
        assert_eq!((w.edits, w.words), (1, 4));
        w.add("jumps over", "jumps right over it");
        assert_eq!((w.edits, w.words), (3, 6));
        w.add("the lazy dog", "");
        assert_eq!((w.edits, w.words), (6, 9));
        assert!((w.rate() - 6.0 / 9.0).abs() < 1e-12);
        assert_eq!(WordErrors::default().rate(), 0.0);
    }
}
