//! PCM audio: the encodings clients may send and conversions between them.

/// Audio encodings the edge accepts on `/v1/listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Signed 16-bit little-endian PCM, mono.
    PcmS16le,
    /// 32-bit float little-endian PCM in [-1, 1], mono.
    PcmF32le,
}

impl Encoding {
    pub const SUPPORTED: &'static str = "pcm_s16le, pcm_f32le";

    pub fn parse(s: &str) -> Option<Encoding> {
        match s {
            "pcm_s16le" => Some(Encoding::PcmS16le),
            "pcm_f32le" => Some(Encoding::PcmF32le),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::PcmS16le => "pcm_s16le",
            Encoding::PcmF32le => "pcm_f32le",
        }
    }

    pub fn bytes_per_sample(self) -> usize {
        match self {
            Encoding::PcmS16le => 2,
            Encoding::PcmF32le => 4,
        }
    }
}

/// Converts s16le bytes to samples in [-1, 1). A trailing odd byte is ignored.
pub fn s16le_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect()
}

/// Converts f32le bytes to s16le bytes, clamping to the 16-bit range and
/// mapping NaN to silence.
pub fn f32le_to_s16le(bytes: &[u8]) -> Vec<u8> {
    f32_to_s16le(&f32le_to_f32(bytes))
}

/// Reads f32le bytes as samples, mapping NaN to silence and clamping to
/// [-1, 1]. A trailing partial sample is ignored.
pub fn f32le_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| {
            let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if x.is_nan() { 0.0 } else { x.clamp(-1.0, 1.0) }
        })
        .collect()
}

/// Samples in [-1, 1] as s16le bytes, rounded and clamped.
pub fn f32_to_s16le(samples: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for &x in samples {
        let s = (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s16_round_trips_through_f32_encoding() {
        let s16: Vec<u8> = [0i16, 1, -1, 32767, -32768, 1234]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let f32s = s16le_to_f32(&s16);
        assert_eq!(f32s[3], 32767.0 / 32768.0);
        assert_eq!(f32s[4], -1.0);
        let f32_bytes: Vec<u8> = f32s.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(f32le_to_s16le(&f32_bytes), s16);
    }

    #[test]
    fn out_of_range_floats_clamp() {
        let bytes: Vec<u8> = [2.0f32, -2.0, f32::NAN, f32::INFINITY]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let out = f32le_to_s16le(&bytes);
        let samples: Vec<i16> = out
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(samples, [32767, -32768, 0, 32767]);
    }

    #[test]
    fn encodings_parse() {
        assert_eq!(Encoding::parse("pcm_s16le"), Some(Encoding::PcmS16le));
        assert_eq!(Encoding::parse("opus"), None);
        assert_eq!(Encoding::PcmF32le.bytes_per_sample(), 4);
    }
}
