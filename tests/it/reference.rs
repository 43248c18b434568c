//! Independent float64 reference implementations, written from the formulas, not from samhost's
//! code: a one-hidden-layer MLP with cross-entropy (forward and hand-derived backward), SAM/ASAM
//! steps over it, and PyTorch-semantics SGD and AdamW.

#![allow(dead_code)]

/// Weights of `x -> relu(x W1ᵀ + b1) W2ᵀ + b2`, row-major.
#[derive(Clone, Debug)]
pub struct Mlp2 {
    pub d_in: usize,
    pub d_h: usize,
    pub d_out: usize,
    pub w1: Vec<f64>,
    pub b1: Vec<f64>,
    pub w2: Vec<f64>,
    pub b2: Vec<f64>,
}

impl Mlp2 {
    /// All parameters in samhost's sorted-name order: fc1.bias, fc1.weight, fc2.bias, fc2.weight.
    pub fn flat(&self) -> Vec<Vec<f64>> {
        vec![self.b1.clone(), self.w1.clone(), self.b2.clone(), self.w2.clone()]
    }

    pub fn with_params(&self, p: &[Vec<f64>]) -> Self {
        Self { b1: p[0].clone(), w1: p[1].clone(), b2: p[2].clone(), w2: p[3].clone(), ..self.clone() }
    }

    /// Mean cross-entropy with label smoothing `ls`, and its gradient (same order as `flat`).
    pub fn loss_grad(&self, x: &[f64], y: &[usize], ls: f64) -> (f64, Vec<Vec<f64>>) {
        let n = y.len();
        let (di, dh, dout) = (self.d_in, self.d_h, self.d_out);
        let mut g = vec![vec![0.0; dh], vec![0.0; dh * di], vec![0.0; dout], vec![0.0; dout * dh]];
        let mut loss = 0.0;
        for s in 0..n {
            let xs = &x[s * di..(s + 1) * di];
            let pre: Vec<f64> =
                (0..dh).map(|j| self.b1[j] + (0..di).map(|k| self.w1[j * di + k] * xs[k]).sum::<f64>()).collect();
            let h: Vec<f64> = pre.iter().map(|&v| v.max(0.0)).collect();
            let z: Vec<f64> =
                (0..dout).map(|c| self.b2[c] + (0..dh).map(|j| self.w2[c * dh + j] * h[j]).sum::<f64>()).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let p: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
            let t: Vec<f64> =
                (0..dout).map(|c| (1.0 - ls) * if c == y[s] { 1.0 } else { 0.0 } + ls / dout as f64).collect();
            loss += -(0..dout).map(|c| t[c] * (z[c] - lse)).sum::<f64>() / n as f64;
            // d loss / d z = (p - t) / n  (the targets sum to one)
            let dz: Vec<f64> = (0..dout).map(|c| (p[c] - t[c]) / n as f64).collect();
            for c in 0..dout {
                g[2][c] += dz[c];
                for j in 0..dh {
                    g[3][c * dh + j] += dz[c] * h[j];
                }
            }
            for j in 0..dh {
                let dhj: f64 = if pre[j] > 0.0 { (0..dout).map(|c| dz[c] * self.w2[c * dh + j]).sum() } else { 0.0 };
                g[0][j] += dhj;
                for k in 0..di {
                    g[1][j * di + k] += dhj * xs[k];
                }
            }
        }
        (loss, g)
    }
}

/// Global L2 norm over tensors whose `mask` entry is true.
pub fn norm(v: &[Vec<f64>], mask: &[bool]) -> f64 {
    v.iter().zip(mask).filter(|(_, &m)| m).flat_map(|(t, _)| t.iter()).map(|x| x * x).sum::<f64>().sqrt()
}

/// The SAM gradient at `p` (ASAM when `eta` is Some), perturbing only `mask`ed tensors.
pub fn sam_grad(
    p: &[Vec<f64>],
    rho: f64,
    eta: Option<f64>,
    mask: &[bool],
    grad: impl Fn(&[Vec<f64>]) -> Vec<Vec<f64>>,
) -> Vec<Vec<f64>> {
    let g = grad(p);
    let e: Vec<Vec<f64>> = match eta {
        None => {
            let n = norm(&g, mask);
            g.iter().map(|t| t.iter().map(|x| rho * x / (n + 1e-12)).collect()).collect()
        }
        Some(eta) => {
            let tg: Vec<Vec<f64>> =
                p.iter().zip(&g).map(|(w, g)| w.iter().zip(g).map(|(w, g)| (w.abs() + eta) * g).collect()).collect();
            let n = norm(&tg, mask);
            p.iter()
                .zip(&tg)
                .map(|(w, tg)| w.iter().zip(tg).map(|(w, tg)| rho * (w.abs() + eta) * tg / (n + 1e-12)).collect())
                .collect()
        }
    };
    let perturbed: Vec<Vec<f64>> = p
        .iter()
        .zip(&e)
        .zip(mask)
        .map(|((w, e), &m)| if m { w.iter().zip(e).map(|(w, e)| w + e).collect() } else { w.clone() })
        .collect();
    grad(&perturbed)
}

/// PyTorch SGD state for one tensor list.
#[derive(Default, Clone)]
pub struct SgdRef {
    pub buf: Option<Vec<Vec<f64>>>,
}

impl SgdRef {
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        p: &mut [Vec<f64>],
        g: &[Vec<f64>],
        lr: f64,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        wd: f64,
    ) {
        let d: Vec<Vec<f64>> =
            p.iter().zip(g).map(|(w, g)| w.iter().zip(g).map(|(w, g)| g + wd * w).collect()).collect();
        let d = if momentum != 0.0 {
            let buf: Vec<Vec<f64>> = match &self.buf {
                None => d.clone(),
                Some(b) => b
                    .iter()
                    .zip(&d)
                    .map(|(b, d)| b.iter().zip(d).map(|(b, d)| momentum * b + (1.0 - dampening) * d).collect())
                    .collect(),
            };
            self.buf = Some(buf.clone());
            if nesterov {
                d.iter().zip(&buf).map(|(d, b)| d.iter().zip(b).map(|(d, b)| d + momentum * b).collect()).collect()
            } else {
                buf
            }
        } else {
            d
        };
        for (w, d) in p.iter_mut().zip(&d) {
            for (w, d) in w.iter_mut().zip(d) {
                *w -= lr * d;
            }
        }
    }
}

/// PyTorch AdamW state.
#[derive(Default, Clone)]
pub struct AdamWRef {
    pub m: Vec<Vec<f64>>,
    pub v: Vec<Vec<f64>>,
    pub t: i32,
}

impl AdamWRef {
    #[allow(clippy::too_many_arguments)]
    pub fn step(&mut self, p: &mut [Vec<f64>], g: &[Vec<f64>], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64) {
        if self.m.is_empty() {
            self.m = p.iter().map(|w| vec![0.0; w.len()]).collect();
            self.v = self.m.clone();
        }
        self.t += 1;
        let (bc1, bc2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for i in 0..p.len() {
            for j in 0..p[i].len() {
                p[i][j] *= 1.0 - lr * wd;
                self.m[i][j] = b1 * self.m[i][j] + (1.0 - b1) * g[i][j];
                self.v[i][j] = b2 * self.v[i][j] + (1.0 - b2) * g[i][j] * g[i][j];
                let denom = (self.v[i][j] / bc2).sqrt() + eps;
                p[i][j] -= lr / bc1 * self.m[i][j] / denom;
            }
        }
    }
}
