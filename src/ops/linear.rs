//! `x·wᵀ` on CPU as one gemm per pass, with a backward pass that writes each gradient once.
//!
//! Through candle's ops, `x.matmul(&w.t())` differentiates into a product for `wᵀ` followed by a
//! transpose, and the transposed gradient is then added into a zero-filled `[N, K]` tensor element
//! by element (the strided add was a quarter of the mlp's step in a profile). Here the weight
//! gradient `dyᵀ·x` is written contiguous by the gemm directly, and the input gradient is only
//! computed when the input needs one (not for a data batch). Other devices and dtypes use candle.

use super::cpu::{f32_slice, fused_ok};
use super::gemm::matmul;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `x·wᵀ` for `x` `[.., K]` and `w` `[N, K]` (PyTorch's linear layer without its bias).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let k = x.dims().last().copied().unwrap_or(0);
    let (n, wk) = w.dims2()?;
    let m = x.elem_count() / k.max(1);
    let fast = fused_ok(x) && w.dtype() == DType::F32 && w.device().is_cpu() && m > 0 && n > 0 && k > 0;
    if !fast || wk != k {
        return x.broadcast_matmul(&w.t()?);
    }
    let mut out = x.dims().to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    x.contiguous()?.reshape((m, k))?.apply_op2(&w.contiguous()?, Linear)?.reshape(out)
}

/// `(x [M, K], w [N, K]) -> x·wᵀ [M, N]`.
struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "samhost-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "linear input")?, f32_slice(s2, l2, "linear weight")?);
        let ((m, k), (n, _)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let mut y = vec![0f32; m * n];
        // wᵀ as a k×n matrix: element (kk, nn) is w[nn·k + kk].
        matmul((m, n, k), &mut y, (n as isize, 1), x, (k as isize, 1), w, (1, k as isize), false, true);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = if x.track_op() { Some(dy.apply_op2_no_bwd(w, &GradInput)?) } else { None };
        let dw = if w.track_op() { Some(dy.apply_op2_no_bwd(x, &GradWeight)?) } else { None };
        Ok((dx, dw))
    }
}

/// `(dy [M, N], w [N, K]) -> dy·w [M, K]`.
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "samhost-linear-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dy, w) = (f32_slice(s1, l1, "linear gradient")?, f32_slice(s2, l2, "linear weight")?);
        let ((m, n), (_, k)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let mut dx = vec![0f32; m * k];
        matmul((m, k, n), &mut dx, (k as isize, 1), dy, (n as isize, 1), w, (k as isize, 1), false, true);
        Ok((CpuStorage::F32(dx), Shape::from((m, k))))
    }
}

/// `(dy [M, N], x [M, K]) -> dyᵀ·x [N, K]`.
struct GradWeight;

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "samhost-linear-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dy, x) = (f32_slice(s1, l1, "linear gradient")?, f32_slice(s2, l2, "linear input")?);
        let ((m, n), (_, k)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let mut dw = vec![0f32; n * k];
        // dyᵀ as an n×m matrix: element (nn, mm) is dy[mm·n + nn].
        matmul((n, k, m), &mut dw, (k as isize, 1), dy, (1, n as isize), x, (k as isize, 1), false, true);
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}
