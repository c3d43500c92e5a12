//! Endpointing: turns per-window speech probabilities into utterances.
//!
//! Pure and clock-free: time is the position in the session's audio, in
//! samples, passed in with every window. The rules:
//! - speech *starts* once voiced windows (probability ≥ `threshold`, then
//!   staying ≥ `neg_threshold`) have lasted `min_speech`; the utterance
//!   begins `pre_roll` before the first voiced window, so soft onsets are
//!   kept;
//! - speech *ends* after `min_silence` of windows below `neg_threshold`; the
//!   utterance keeps `post_roll` of that silence;
//! - an utterance reaching `max_utterance` is cut there, and if the speaker
//!   goes on, the next utterance starts at the cut.

/// Endpointing parameters, in samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointConfig {
    pub threshold: f32,
    pub neg_threshold: f32,
    pub min_speech: u64,
    pub min_silence: u64,
    pub pre_roll: u64,
    pub post_roll: u64,
    pub max_utterance: u64,
}

/// A cut utterance: samples `[start, end)` of the session's audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
    /// Cut at `max_utterance` rather than at a pause.
    pub forced: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Silence,
    /// Voiced since `since`, not yet long enough to count as speech.
    Onset {
        since: u64,
    },
    /// In an utterance that began at `start`; below `neg_threshold` since
    /// `quiet_since`, if so.
    Speech {
        start: u64,
        quiet_since: Option<u64>,
    },
}

#[derive(Debug, Clone)]
pub struct Endpointer {
    cfg: EndpointConfig,
    state: State,
    /// Samples already handed out in a segment; a new utterance never starts
    /// before this, so pre-roll never overlaps the previous utterance.
    consumed: u64,
}

impl Endpointer {
    pub fn new(cfg: EndpointConfig) -> Self {
        Endpointer {
            cfg,
            state: State::Silence,
            consumed: 0,
        }
    }

    /// Feeds the probability of the window `[start, end)`.
    pub fn push(&mut self, prob: f32, start: u64, end: u64) -> Option<Segment> {
        let cfg = self.cfg;
        match self.state {
            State::Silence => {
                if prob >= cfg.threshold {
                    self.state = State::Onset { since: start };
                    return self.check_onset(end);
                }
                None
            }
            State::Onset { .. } => {
                if prob < cfg.neg_threshold {
                    self.state = State::Silence;
                    return None;
                }
                self.check_onset(end)
            }
            State::Speech {
                start: utt_start,
                quiet_since,
            } => {
                let quiet_since = if prob >= cfg.threshold {
                    None
                } else if prob < cfg.neg_threshold {
                    Some(quiet_since.unwrap_or(start))
                } else {
                    quiet_since
                };
                if let Some(quiet) = quiet_since
                    && end - quiet >= cfg.min_silence
                {
                    let cut = (quiet + cfg.post_roll).min(end);
                    return Some(self.emit(utt_start, cut, false, State::Silence));
                }
                if end - utt_start >= cfg.max_utterance {
                    let cut = utt_start + cfg.max_utterance;
                    let next = if prob >= cfg.neg_threshold {
                        State::Speech {
                            start: cut,
                            quiet_since: None,
                        }
                    } else {
                        State::Silence
                    };
                    return Some(self.emit(utt_start, cut, true, next));
                }
                self.state = State::Speech {
                    start: utt_start,
                    quiet_since,
                };
                None
            }
        }
    }

    fn check_onset(&mut self, now: u64) -> Option<Segment> {
        if let State::Onset { since } = self.state
            && now - since >= self.cfg.min_speech
        {
            let start = since.saturating_sub(self.cfg.pre_roll).max(self.consumed);
            self.state = State::Speech {
                start,
                quiet_since: None,
            };
        }
        None
    }

    fn emit(&mut self, start: u64, end: u64, forced: bool, next: State) -> Segment {
        self.state = next;
        self.consumed = end;
        Segment { start, end, forced }
    }

    /// Ends the current utterance at `now` (the client asked to finalize, or
    /// the session ends). An onset shorter than `min_speech` is dropped.
    pub fn finalize(&mut self, now: u64) -> Option<Segment> {
        match self.state {
            State::Speech { start, quiet_since } => {
                let end = match quiet_since {
                    Some(q) => (q + self.cfg.post_roll).min(now),
                    None => now,
                };
                (end > start).then(|| self.emit(start, end, false, State::Silence))
            }
            State::Onset { .. } | State::Silence => {
                self.state = State::Silence;
                None
            }
        }
    }

    /// The earliest sample a current or future utterance can include; audio
    /// before it may be discarded.
    pub fn retain_from(&self, now: u64) -> u64 {
        let from = match self.state {
            State::Silence => now.saturating_sub(self.cfg.pre_roll),
            State::Onset { since } => since.saturating_sub(self.cfg.pre_roll),
            State::Speech { start, .. } => start,
        };
        from.max(self.consumed).min(now)
    }

    pub fn in_speech(&self) -> bool {
        matches!(self.state, State::Speech { .. })
    }

    /// Where the utterance in progress began, once speech has started.
    pub fn speech_start(&self) -> Option<u64> {
        match self.state {
            State::Speech { start, .. } => Some(start),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 512;

    fn cfg() -> EndpointConfig {
        EndpointConfig {
            threshold: 0.5,
            neg_threshold: 0.35,
            min_speech: 4 * W,
            min_silence: 8 * W,
            pre_roll: 3 * W,
            post_roll: 2 * W,
            max_utterance: 40 * W,
        }
    }

    /// Feeds one probability per window from sample 0 and collects segments.
    fn run(ep: &mut Endpointer, probs: &[f32]) -> Vec<Segment> {
        probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| ep.push(p, i as u64 * W, (i as u64 + 1) * W))
            .collect()
    }

    fn pattern(parts: &[(f32, usize)]) -> Vec<f32> {
        parts
            .iter()
            .flat_map(|&(p, n)| std::iter::repeat_n(p, n))
            .collect()
    }

    #[test]
    fn one_utterance_with_pre_and_post_roll() {
        let mut ep = Endpointer::new(cfg());
        let probs = pattern(&[(0.1, 10), (0.9, 20), (0.1, 12)]);
        let segs = run(&mut ep, &probs);
        // Voiced from window 10; starts 3 windows earlier; quiet from
        // window 30, so it ends 2 windows into the silence.
        assert_eq!(
            segs,
            [Segment {
                start: 7 * W,
                end: 32 * W,
                forced: false
            }]
        );
        assert!(!ep.in_speech());
    }

    #[test]
    fn short_blips_are_not_speech() {
        let mut ep = Endpointer::new(cfg());
        let probs = pattern(&[(0.1, 5), (0.9, 3), (0.1, 20), (0.9, 2), (0.2, 20)]);
        assert!(run(&mut ep, &probs).is_empty());
        assert!(!ep.in_speech());
    }

    #[test]
    fn hysteresis_keeps_speech_through_middling_probabilities() {
        let mut ep = Endpointer::new(cfg());
        // 0.4 is below threshold but above neg_threshold: neither starts
        // nor ends a pause.
        let probs = pattern(&[(0.9, 6), (0.4, 20), (0.9, 2), (0.0, 9)]);
        let segs = run(&mut ep, &probs);
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].start, 0);
        assert_eq!(segs[0].end, 28 * W + 2 * W);
    }

    #[test]
    fn a_pause_shorter_than_min_silence_does_not_split() {
        let mut ep = Endpointer::new(cfg());
        let probs = pattern(&[(0.9, 10), (0.1, 7), (0.9, 10), (0.1, 8)]);
        let segs = run(&mut ep, &probs);
        assert_eq!(
            segs,
            [Segment {
                start: 0,
                end: 27 * W + 2 * W,
                forced: false
            }]
        );
    }

    #[test]
    fn two_utterances_never_overlap_even_with_pre_roll() {
        // A pre-roll longer than min_silence - post_roll would reach back
        // into the previous utterance.
        let mut ep = Endpointer::new(EndpointConfig {
            pre_roll: 8 * W,
            ..cfg()
        });
        let probs = pattern(&[(0.9, 10), (0.1, 9), (0.9, 10), (0.1, 10)]);
        let segs = run(&mut ep, &probs);
        assert_eq!(
            segs,
            [
                Segment {
                    start: 0,
                    end: 12 * W,
                    forced: false
                },
                // Onset at window 19 minus 8 windows of pre-roll would be 11.
                Segment {
                    start: 12 * W,
                    end: 31 * W,
                    forced: false
                },
            ]
        );
    }

    #[test]
    fn long_speech_is_cut_at_the_cap_and_continues() {
        let mut ep = Endpointer::new(cfg());
        let probs = pattern(&[(0.9, 100), (0.0, 10)]);
        let segs = run(&mut ep, &probs);
        assert_eq!(
            segs,
            [
                Segment {
                    start: 0,
                    end: 40 * W,
                    forced: true
                },
                Segment {
                    start: 40 * W,
                    end: 80 * W,
                    forced: true
                },
                Segment {
                    start: 80 * W,
                    end: 102 * W,
                    forced: false
                },
            ]
        );
    }

    #[test]
    fn finalize_flushes_speech_and_drops_onsets() {
        let mut ep = Endpointer::new(cfg());
        run(&mut ep, &pattern(&[(0.1, 4), (0.9, 10)]));
        assert_eq!(
            ep.finalize(14 * W),
            Some(Segment {
                start: W,
                end: 14 * W,
                forced: false
            })
        );
        assert_eq!(ep.finalize(14 * W), None);

        let mut ep = Endpointer::new(cfg());
        run(&mut ep, &pattern(&[(0.9, 2)]));
        assert_eq!(ep.finalize(2 * W), None, "onset shorter than min_speech");

        // Finalizing during a pause trims to the post-roll.
        let mut ep = Endpointer::new(cfg());
        run(&mut ep, &pattern(&[(0.9, 10), (0.1, 4)]));
        assert_eq!(
            ep.finalize(14 * W),
            Some(Segment {
                start: 0,
                end: 12 * W,
                forced: false
            })
        );
    }

    #[test]
    fn retained_audio_is_bounded() {
        let mut ep = Endpointer::new(cfg());
        run(&mut ep, &pattern(&[(0.1, 50)]));
        assert_eq!(ep.retain_from(50 * W), 47 * W);
        run(&mut ep, &pattern(&[(0.1, 50), (0.9, 2)]));
        // Onset at 50 (restarted indices): keeps pre-roll before it.
        assert_eq!(ep.retain_from(52 * W), 47 * W);
    }
}
