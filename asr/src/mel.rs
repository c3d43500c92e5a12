//! The mel filterbank Whisper's front end multiplies each power spectrum by.
//!
//! Whisper defines it as `librosa.filters.mel(sr=16000, n_fft=400,
//! n_mels=N)`: Slaney-style mel scale (linear below 1 kHz, logarithmic
//! above) with triangular filters normalised to constant area ("slaney"
//! norm). It is computed here in f64 and rounded to f32, as librosa does.
//!
//! [`LogMel`] is Whisper's front end (`log_mel_spectrogram` in OpenAI's
//! `audio.py`): a periodic Hann window, a centred STFT with reflect padding
//! (hop 160), power spectra, the filterbank, `log10` clamped at 1e-10, then
//! `max(x, global_max - 8)` and `(x + 4) / 4`. Whisper pads the audio with
//! 30 s of zeros first; frames of padding only have a known value, so only
//! the frames the audio reaches are transformed.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

/// Sample rate Whisper expects.
pub const SAMPLE_RATE: f64 = 16_000.0;
/// FFT size of Whisper's STFT.
pub const N_FFT: usize = 400;
/// Number of frequency bins of one power spectrum.
pub const N_FREQS: usize = N_FFT / 2 + 1;

const F_SP: f64 = 200.0 / 3.0;
const MIN_LOG_HZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;

fn log_step() -> f64 {
    6.4f64.ln() / 27.0
}

/// Hertz to Slaney mel.
pub fn hz_to_mel(hz: f64) -> f64 {
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() / log_step()
    } else {
        hz / F_SP
    }
}

/// Slaney mel to hertz.
pub fn mel_to_hz(mel: f64) -> f64 {
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * (log_step() * (mel - MIN_LOG_MEL)).exp()
    } else {
        mel * F_SP
    }
}

/// The `n_mels` × [`N_FREQS`] filterbank, row-major (`filters[m * N_FREQS +
/// k]`), covering 0 Hz to the Nyquist frequency.
pub fn filterbank(n_mels: usize) -> Vec<f32> {
    let fmax = SAMPLE_RATE / 2.0;
    let (mel_min, mel_max) = (hz_to_mel(0.0), hz_to_mel(fmax));
    // n_mels + 2 band edges, equally spaced in mel.
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let fft_freqs: Vec<f64> = (0..N_FREQS)
        .map(|k| k as f64 * fmax / (N_FREQS - 1) as f64)
        .collect();

    let mut out = vec![0f32; n_mels * N_FREQS];
    for m in 0..n_mels {
        let (lo, centre, hi) = (edges[m], edges[m + 1], edges[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let rising = (f - lo) / (centre - lo);
            let falling = (hi - f) / (hi - centre);
            let w = rising.min(falling).max(0.0);
            out[m * N_FREQS + k] = (w * enorm) as f32;
        }
    }
    out
}

/// Hop between frames, in samples.
pub const HOP: usize = 160;
/// Whisper's window: 30 s of 16 kHz audio.
pub const WINDOW_SAMPLES: usize = 480_000;

/// Computes Whisper's log-mel spectrogram. Holds the FFT plan and buffers;
/// not shared between threads.
pub struct LogMel {
    n_mels: usize,
    filters: Vec<f32>,
    hann: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel")
            .field("n_mels", &self.n_mels)
            .finish()
    }
}

impl LogMel {
    pub fn new(n_mels: usize) -> Self {
        let hann = (0..N_FFT)
            .map(|n| (0.5 - 0.5 * (std::f64::consts::TAU * n as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        LogMel {
            n_mels,
            filters: filterbank(n_mels),
            hann,
            fft: RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT),
        }
    }

    /// The first `frames` frames of the log-mel spectrogram of `pcm` (16 kHz
    /// mono in [-1, 1]) followed by 30 s of silence, as Whisper computes it;
    /// `n_mels × frames`, row-major.
    pub fn compute(&self, pcm: &[f32], frames: usize) -> Vec<f32> {
        let len = pcm.len();
        // Frames in Whisper's padded signal, and those the audio reaches (a
        // frame t covers samples [160t - 200, 160t + 200)).
        let total = (len + WINDOW_SAMPLES) / HOP;
        let audible = (len + N_FFT / 2).div_ceil(HOP).min(total);
        let sample = |i: isize| -> f32 {
            // Reflect at the start; zeros past the end.
            let i = i.unsigned_abs();
            pcm.get(i).copied().unwrap_or(0.0)
        };

        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut power = vec![0f32; N_FREQS];
        let mut logs = vec![0f32; self.n_mels * audible];
        let mut max = f32::NEG_INFINITY;
        for t in 0..audible {
            let start = (t * HOP) as isize - (N_FFT / 2) as isize;
            for (n, x) in input.iter_mut().enumerate() {
                *x = self.hann[n] * sample(start + n as isize);
            }
            // The input and output lengths come from the plan itself.
            let _ = self.fft.process(&mut input, &mut spectrum);
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for m in 0..self.n_mels {
                let row = &self.filters[m * N_FREQS..(m + 1) * N_FREQS];
                let energy: f32 = row.iter().zip(&power).map(|(w, p)| w * p).sum();
                let v = energy.max(1e-10).log10();
                logs[m * audible + t] = v;
                max = max.max(v);
            }
        }
        // Frames of padding only: zero energy, clamped to 1e-10.
        const SILENT: f32 = -10.0;
        if audible < total {
            max = max.max(SILENT);
        }
        let floor = max - 8.0;
        let mut out = vec![0f32; self.n_mels * frames];
        for m in 0..self.n_mels {
            for t in 0..frames {
                let v = if t < audible {
                    logs[m * audible + t]
                } else {
                    SILENT
                };
                out[m * frames + t] = (v.max(floor) + 4.0) / 4.0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test signal the reference values below were computed on: a chirp
    /// plus a 3 kHz tone, 1.5 s.
    fn chirp() -> Vec<f32> {
        (0..24_000)
            .map(|n| {
                let t = f64::from(n) / 16_000.0;
                (0.3 * (std::f64::consts::TAU * (200.0 + 400.0 * t) * t).sin()
                    + 0.05 * (std::f64::consts::TAU * 3000.0 * t).sin()) as f32
            })
            .collect()
    }

    /// OpenAI's `log_mel_spectrogram(audio, padding=480000)` written out in
    /// numpy (np.pad reflect, np.fft.rfft, librosa 0.11.0's filterbank) on
    /// `chirp()`: (mel, frame, value).
    const REFERENCE: &[(usize, usize, f32)] = &[
        (0, 0, 1.060_843_3),
        (0, 1, 0.463_546_1),
        (20, 150, 0.556_312_1),
        (54, 136, 0.814_041_85),
        (22, 132, -0.414_537_2),
        (73, 0, -0.031_139_374),
        (9, 71, -0.503_989_1),
        (27, 42, -0.573_974_4),
        (40, 151, 0.121_961_474),
        (27, 150, 0.652_747_6),
        (9, 6, 0.326_121_1),
        (11, 78, -0.383_387_7),
        (21, 75, 1.288_942_7),
    ];

    #[test]
    fn matches_whisper_s_reference_front_end() {
        let mel = LogMel::new(80).compute(&chirp(), 3000);
        assert_eq!(mel.len(), 80 * 3000);
        for &(m, t, want) in REFERENCE {
            let got = mel[m * 3000 + t];
            assert!(
                (got - want).abs() < 2e-4,
                "mel {m} frame {t}: {got} vs {want}"
            );
        }
        // Frames past the audio hold the floor value: max - 8, rescaled.
        let floor = -0.658_597_2;
        assert!((mel[5 * 3000 + 2999] - floor).abs() < 2e-4);
        assert!((mel[79 * 3000 + 152] - floor).abs() < 2e-4);
        // numpy: float(m[:, :152].sum()) == -4823.87693554163
        let sum: f64 = (0..80)
            .flat_map(|m| (0..152).map(move |t| (m, t)))
            .map(|(m, t)| f64::from(mel[m * 3000 + t]))
            .sum();
        assert!((sum + 4_823.876_935).abs() < 0.05, "{sum}");
    }

    #[test]
    fn fewer_frames_are_a_prefix_and_silence_is_flat() {
        let front = LogMel::new(80);
        let full = front.compute(&chirp(), 3000);
        let fit = front.compute(&chirp(), 150);
        for m in 0..80 {
            assert_eq!(
                &fit[m * 150..(m + 1) * 150],
                &full[m * 3000..m * 3000 + 150]
            );
        }
        let silent = front.compute(&vec![0.0; 8000], 100);
        assert!(silent.iter().all(|&v| v == (-10.0f32 + 4.0) / 4.0));
        // Very short input reflects into the zero padding without panicking.
        assert_eq!(front.compute(&[0.5; 3], 4).len(), 320);
        assert_eq!(front.compute(&[], 2).len(), 160);
    }

    /// Reference values printed by librosa 0.11.0:
    /// `librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)`, every non-zero
    /// entry of rows 0, 1, 10, 40 and the last row.
    const LIBROSA_80: &[(usize, &[(usize, f32)])] = &[
        (0, &[(1, 0.024_862_595)]),
        (1, &[(1, 0.001_990_822), (2, 0.022_871_772)]),
        (10, &[(10, 0.019_908_218), (11, 0.004_954_375)]),
        (
            40,
            &[(42, 0.005_411_105), (43, 0.014_735_566), (44, 0.006_518_19)],
        ),
        (
            79,
            &[
                (186, 0.000_366_741_67),
                (187, 0.000_833_07),
                (188, 0.001_299_398_4),
                (189, 0.001_765_726_8),
                (190, 0.002_232_055),
                (191, 0.002_698_383_3),
                (192, 0.003_164_711_9),
                (193, 0.003_141_313_3),
                (194, 0.002_692_554_1),
                (195, 0.002_243_795_2),
                (196, 0.001_795_036),
                (197, 0.001_346_277_1),
                (198, 0.000_897_518),
                (199, 0.000_448_759),
            ],
        ),
    ];

    #[test]
    fn matches_librosa_reference_values() {
        let fb = filterbank(80);
        assert_eq!(fb.len(), 80 * 201);
        for (row, entries) in LIBROSA_80 {
            let nonzero: Vec<usize> = (0..N_FREQS)
                .filter(|&k| fb[row * N_FREQS + k] != 0.0)
                .collect();
            let expected: Vec<usize> = entries.iter().map(|(k, _)| *k).collect();
            assert_eq!(nonzero, expected, "support of row {row}");
            for &(k, want) in *entries {
                let got = fb[row * N_FREQS + k];
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "row {row} bin {k}: {got} vs librosa {want}"
                );
            }
        }
        // librosa: float(m.sum(dtype=np.float64)) == 1.999024092387117
        let total: f64 = fb.iter().map(|&x| f64::from(x)).sum();
        assert!((total - 1.999_024_092_387_117).abs() < 1e-6, "{total}");
    }

    #[test]
    fn mel_scale_is_linear_below_1khz_and_round_trips() {
        assert_eq!(hz_to_mel(0.0), 0.0);
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        assert!((hz_to_mel(500.0) - 7.5).abs() < 1e-12);
        for hz in [0.0, 123.0, 999.0, 1000.0, 4321.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-9);
        }
    }

    #[test]
    fn large_v3_bank_has_128_rows() {
        let fb = filterbank(128);
        assert_eq!(fb.len(), 128 * N_FREQS);
        assert!((0..128).all(|m| fb[m * N_FREQS..(m + 1) * N_FREQS].iter().any(|&x| x > 0.0)));
    }
}
