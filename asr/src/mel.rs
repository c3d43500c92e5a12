//! The mel filterbank Whisper's front end multiplies each power spectrum by.
//!
//! Whisper defines it as `librosa.filters.mel(sr=16000, n_fft=400,
//! n_mels=N)`: Slaney-style mel scale (linear below 1 kHz, logarithmic
//! above) with triangular filters normalised to constant area ("slaney"
//! norm). It is computed here in f64 and rounded to f32, as librosa does.

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

#[cfg(test)]
mod tests {
    use super::*;

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
