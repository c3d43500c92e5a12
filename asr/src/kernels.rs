//! CPU kernels for the two element-wise steps candle runs slowly: the exact
//! GELU (candle evaluates a scalar, branchy `erf` on one thread) and the
//! attention softmax (a scalar `expf` per score). Both here are branch-free
//! polynomials the compiler vectorises, split across the inference threads
//! for large tensors. Other devices and dtypes use candle's own.
//!
//! Accuracy: `erf` within 1e-6 and `exp` within 2e-7 relative of the exact
//! functions on the ranges used (tested below), far inside the f32 noise of
//! the matrix products around them; the encoder still matches CTranslate2
//! within tolerance and greedy tokens stay identical (cli/tests/whisper_real.rs).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Elements below which the work stays on the calling thread (spawning
/// costs more than it saves).
const PARALLEL_MIN: usize = 1 << 16;

/// `x * (1 + erf(x / sqrt 2)) / 2`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1_no_bwd(&SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("expected f32 storage");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("input has to be contiguous"),
    }
}

/// Runs `f` over matching chunks of `src` and `dst` (whole multiples of
/// `unit` elements), on several threads when the tensor is large.
fn split<F>(src: &[f32], dst: &mut [f32], unit: usize, f: F)
where
    F: Fn(&[f32], &mut [f32]) + Sync,
{
    let threads = candle_core::utils::get_num_threads().clamp(1, 16);
    if threads == 1 || src.len() < PARALLEL_MIN || unit == 0 {
        f(src, dst);
        return;
    }
    let units = src.len() / unit;
    let per = units.div_ceil(threads).max(1) * unit;
    std::thread::scope(|s| {
        for (src, dst) in src.chunks(per).zip(dst.chunks_mut(per)) {
            let f = &f;
            s.spawn(move || f(src, dst));
        }
    });
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "earshot-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous(storage, layout)?;
        let mut dst = vec![0f32; src.len()];
        split(src, &mut dst, 1, |src, dst| {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "earshot-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous(storage, layout)?;
        let width = layout.shape().dims().last().copied().unwrap_or(1);
        let mut dst = vec![0f32; src.len()];
        split(src, &mut dst, width, |src, dst| {
            for (row, out) in src.chunks(width).zip(dst.chunks_mut(width)) {
                softmax_row(row, out);
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

fn softmax_row(row: &[f32], out: &mut [f32]) {
    let max = lanes(row, f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // A fully masked row: nothing to attend to.
        out.fill(0.0);
        return;
    }
    // Separate passes, each free of a loop-carried dependency, so each is
    // vectorised.
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp(x - max);
    }
    let scale = 1.0 / lanes(out, 0.0, |a, b| a + b);
    for o in out.iter_mut() {
        *o *= scale;
    }
}

/// Reduces `values` with `f` in 8 independent lanes (a vector register's
/// worth), then across the lanes.
#[inline(always)]
fn lanes(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for chunk in chunks {
        for i in 0..8 {
            acc[i] = f(acc[i], chunk[i]);
        }
    }
    acc.iter().fold(tail, |a, &b| f(a, b))
}

/// `e^x`, branch-free: `x = k ln 2 + r` with `|r| <= ln 2 / 2`, then
/// `2^k` from the exponent bits and `e^r` from its degree-6 Taylor
/// polynomial (relative error below 2e-7). Inputs below -87.3 give the
/// smallest normal number rather than 0, which no softmax can tell apart.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((k as i32 + 127) << 23) as u32;
    p * f32::from_bits(bits)
}

/// `erf(x)`, branch-free: a rational approximation on [-4, 4] (odd
/// numerator of degree 13, even denominator of degree 8; beyond, erf is
/// +-1 in f32), as Eigen evaluates it.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329_2e-3;
    q = x2 * q - 1.426_473_9e-2;
    p / q
}

/// The largest element-wise difference between two tensors of one shape
/// (for tests that compare implementations).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .max(0)?
        .to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_exp_match_the_exact_functions() {
        let mut worst_erf = 0f64;
        let mut worst_exp = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f64 / 10_000.0;
            let exact = libm_erf(x);
            worst_erf = worst_erf.max((f64::from(erf(x as f32)) - exact).abs());
            let y = (x * 14.0) as f32; // -84 .. 84
            let e = f64::from(y).exp();
            worst_exp = worst_exp.max(((f64::from(exp(y)) - e) / e).abs());
        }
        assert!(worst_erf < 1e-6, "erf off by {worst_erf:e}");
        assert!(
            worst_exp < 2e-7 + f64::from(f32::EPSILON),
            "exp off by {worst_exp:e}"
        );
    }

    /// erf in f64 from its series and continued fraction (reference only).
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.5 series converges well for |x| < 3; beyond,
        // erfc's continued fraction.
        let a = x.abs();
        let v = if a < 3.0 {
            let mut term = a;
            let mut sum = a;
            for n in 1..200 {
                term *= -a * a / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            let mut f = 0.0;
            for n in (1..60).rev() {
                f = n as f64 / 2.0 / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        v.copysign(x)
    }

    #[test]
    fn kernels_agree_with_candle() {
        let device = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (3, 70_000), &device).unwrap();
        let diff = max_abs_diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()).unwrap();
        assert!(diff < 1e-5, "gelu differs by {diff}");

        let mut scores = Tensor::randn(0f32, 4.0, (2, 3, 500, 300), &device).unwrap();
        let mask: Vec<f32> = (0..300)
            .map(|j| if j > 200 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        scores = scores
            .broadcast_add(&Tensor::new(mask, &device).unwrap())
            .unwrap();
        let diff = max_abs_diff(
            &softmax_last_dim(&scores).unwrap(),
            &candle_nn::ops::softmax_last_dim(&scores).unwrap(),
        )
        .unwrap();
        assert!(diff < 5e-6, "softmax differs by {diff}");
    }
}
