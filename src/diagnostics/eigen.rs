//! Eigenvalues and eigenvectors of a small dense symmetric matrix by cyclic Jacobi rotations
//! (Lanczos' tridiagonal matrices, test references): accurate to rounding, fine up to a few
//! hundred rows.

/// The eigenvalues (ascending) and the matching eigenvectors (as columns, `vectors[i][k]` is
/// component `i` of eigenvector `k`) of the symmetric `n`x`n` matrix `a` (row-major).
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut m: Vec<Vec<f64>> = (0..n).map(|i| a[i * n..(i + 1) * n].to_vec()).collect();
    let mut v: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect()).collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i][j] * m[i][j])
            .sum();
        let scale: f64 = (0..n).map(|i| m[i][i] * m[i][i]).sum::<f64>().max(1e-300);
        if off <= 1e-30 * scale || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if m[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (m[q][q] - m[p][p]) / (2.0 * m[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in m.iter_mut() {
                    let (mkp, mkq) = (row[p], row[q]);
                    row[p] = c * mkp - s * mkq;
                    row[q] = s * mkp + c * mkq;
                }
                let (rp, rq) = (m[p].clone(), m[q].clone());
                for (k, (&mpk, &mqk)) in rp.iter().zip(&rq).enumerate() {
                    m[p][k] = c * mpk - s * mqk;
                    m[q][k] = s * mpk + c * mqk;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| m[a][a].total_cmp(&m[b][b]));
    let values = order.iter().map(|&k| m[k][k]).collect();
    let vectors = (0..n).map(|i| order.iter().map(|&k| v[i][k]).collect()).collect();
    (values, vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_spectrum_comes_back() {
        // Q diag(3, 1, -2) Qᵀ with a rotation Q.
        let (c, s) = (0.6f64, 0.8f64);
        let q = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
        let d = [3.0, 1.0, -2.0];
        let mut a = vec![0.0; 9];
        for i in 0..3 {
            for j in 0..3 {
                a[i * 3 + j] = (0..3).map(|k| q[i][k] * d[k] * q[j][k]).sum();
            }
        }
        let (vals, vecs) = symmetric_eigen(&a, 3);
        for (got, want) in vals.iter().zip([-2.0, 1.0, 3.0]) {
            assert!((got - want).abs() < 1e-12, "{vals:?}");
        }
        // A v = λ v for the largest.
        let v: Vec<f64> = (0..3).map(|i| vecs[i][2]).collect();
        for i in 0..3 {
            let av: f64 = (0..3).map(|j| a[i * 3 + j] * v[j]).sum();
            assert!((av - 3.0 * v[i]).abs() < 1e-12);
        }
    }
}
