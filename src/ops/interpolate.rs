//! Bicubic resizing as PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` (cubic
//! convolution with A = -0.75, edge samples repeated), used to carry a ViT's position
//! embeddings to another image size as Hugging Face's `interpolate_pos_encoding` does.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

const A: f64 = -0.75;

fn cubic_near(x: f64) -> f64 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic_far(x: f64) -> f64 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// For each output index, the four source indices (clamped) and their weights.
fn taps(n_in: usize, n_out: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as i64 - 1;
    (0..n_out)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let f = src.floor();
            let t = src - f;
            let w = [cubic_far(t + 1.0), cubic_near(t), cubic_near(1.0 - t), cubic_far(2.0 - t)];
            let base = f as i64 - 1;
            let idx = [0, 1, 2, 3].map(|k| (base + k).clamp(0, last) as usize);
            (idx, w)
        })
        .collect()
}

/// Resizes a channels-last grid `[h * w, c]` (row-major rows of pixels) to `[h2 * w2, c]`.
pub fn bicubic_resize(values: &[f32], c: usize, (h, w): (usize, usize), (h2, w2): (usize, usize)) -> Result<Vec<f32>> {
    if values.len() != h * w * c || h == 0 || w == 0 {
        bail!("bicubic_resize: {} values do not form a {h}x{w} grid of {c} channels", values.len());
    }
    let (rows, cols) = (taps(h, h2), taps(w, w2));
    // Columns first: [h, w, c] -> [h, w2, c].
    let mut tmp = vec![0f64; h * w2 * c];
    for y in 0..h {
        for (x2, (idx, wt)) in cols.iter().enumerate() {
            let out = &mut tmp[(y * w2 + x2) * c..(y * w2 + x2 + 1) * c];
            for k in 0..4 {
                let src = &values[(y * w + idx[k]) * c..(y * w + idx[k] + 1) * c];
                for (o, s) in out.iter_mut().zip(src) {
                    *o += wt[k] * *s as f64;
                }
            }
        }
    }
    // Then rows: [h, w2, c] -> [h2, w2, c].
    let mut out = vec![0f32; h2 * w2 * c];
    for (y2, (idx, wt)) in rows.iter().enumerate() {
        for x2 in 0..w2 {
            let dst = &mut out[(y2 * w2 + x2) * c..(y2 * w2 + x2 + 1) * c];
            for (ch, d) in dst.iter_mut().enumerate() {
                let v: f64 = (0..4).map(|k| wt[k] * tmp[(idx[k] * w2 + x2) * c + ch]).sum();
                *d = v as f32;
            }
        }
    }
    Ok(out)
}

/// Resizes ViT position embeddings `[1, 1 + gh*gw, hidden]` (the `[CLS]` position first, kept
/// as it is) from a `from` patch grid to a `to` grid.
pub fn resize_position_embeddings(pos: &Tensor, from: (usize, usize), to: (usize, usize)) -> Result<Tensor> {
    let (one, n, hidden) = pos.dims3()?;
    if one != 1 || n != 1 + from.0 * from.1 {
        bail!(
            "position embeddings of shape {:?} do not match a {}x{} patch grid plus [CLS]",
            pos.dims(),
            from.0,
            from.1
        );
    }
    if from == to {
        return Ok(pos.clone());
    }
    let cpu = pos.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.squeeze(0)?;
    let cls = cpu.narrow(0, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
    let grid = cpu.narrow(0, 1, n - 1)?.flatten_all()?.to_vec1::<f32>()?;
    let mut values = cls;
    values.extend(bicubic_resize(&grid, hidden, from, to)?);
    let out = Tensor::from_vec(values, (1, 1 + to.0 * to.1, hidden), &Device::Cpu)?;
    Ok(out.to_dtype(pos.dtype())?.to_device(pos.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pytorch_on_a_ramp() {
        // [0, 1] upsampled to 4 by ATen's rule: sources at -0.25, 0.25, 0.75, 1.25 with edge
        // clamping; e.g. the first is 0·(w0 + w1 + w2) + 1·w3 with w3 = cubic_far(1.25).
        let out = bicubic_resize(&[0.0, 1.0], 1, (1, 2), (1, 4)).unwrap();
        let want = [-0.10546875, 0.2265625, 0.7734375, 1.10546875];
        for (o, w) in out.iter().zip(want) {
            assert!((*o as f64 - w).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn same_size_is_identity_and_constants_stay() {
        let v: Vec<f32> = (0..3 * 4 * 2).map(|i| i as f32 * 0.5).collect();
        let same = bicubic_resize(&v, 2, (3, 4), (3, 4)).unwrap();
        for (a, b) in same.iter().zip(&v) {
            assert!((a - b).abs() < 1e-5);
        }
        let ones = vec![1.0f32; 5 * 5 * 3];
        for x in bicubic_resize(&ones, 3, (5, 5), (7, 9)).unwrap() {
            assert!((x - 1.0).abs() < 1e-6);
        }
    }
}
