//! `exp` in straight-line f32 code that the compiler vectorises inside a loop (the C library's
//! `expf` is a scalar call per element: 4 % of a ViT SAM step went there, from GELU).
//!
//! Cody-Waite reduction `x = n·ln 2 + r`, |r| <= ln 2 / 2, Cephes' degree-6 polynomial for
//! `exp(r)` (relative error about 1e-7), then `2ⁿ` put into the exponent bits.

/// ln 2 split so that `n·LN2_HI` is exact in f32 for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding and subtracting it rounds an f32 below 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// `eˣ` for `x <= 0`, within 1e-7 relative of the exact value for `x >= -87` (8.0e-8 measured
/// by the test below against f64); `x` below -87 gives about 1.6e-38 instead of a smaller number or 0,
/// and NaN gives NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // Not `max`, which would turn NaN into -87: a NaN goes through as NaN.
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * (r * r) + r + 1.0;
    // n lies in [-126, 0]: its integer sits in the low mantissa bits of t.
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    e * f32::from_bits(((n + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_f64_exp_on_the_nonpositive_axis() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let exact = (x as f64).exp();
            worst = worst.max(((exp_nonpositive(x) as f64) - exact).abs() / exact);
        }
        assert!(worst < 1e-7, "relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 2e-38 && exp_nonpositive(f32::NEG_INFINITY) >= 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
