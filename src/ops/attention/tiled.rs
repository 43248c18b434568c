//! Attention per head on [`super::panel`]'s register tiles, one task per (sequence, head): the
//! head's keys and values are packed once, then blocks of [`BLOCK_ROWS`] query rows go through
//! the scores, their softmax and the context product while the block's probabilities are in
//! cache. The backward pass runs the probabilities' gradient and the queries' gradient by the same
//! blocks, then the keys' and values' gradients over the whole head. The probabilities are kept
//! for the backward pass as the forward pass leaves them: rows of [`Dims::stride`] values.
//!
//! Every output element is written once by one task, so no output is zero-filled first.
//!
//! Against the `gemm` crate's per-sequence products (`SAMHOST_ATTENTION_TILES=0`), the op alone
//! on 2 threads (medians of 15, two alternating runs each, 6 heads of 64): 257 tokens, batch 8
//! (ViT-S/14 at 224 px) forward 6.8-7.0 against 7.6-8.8 ms, backward 11.0-11.2 against 11.8-11.9;
//! 65 tokens, batch 32 (112 px) forward 2.3 against 2.6-2.7 ms, backward 3.4 against 4.1.

use super::panel::{product, Dest, Packed, Strided};
use super::Dims;
use crate::ops::softmax::{softmax_grad_in_place, softmax_in_place};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Query rows per block: their scores (rows of [`Dims::stride`] values) stay in cache between
/// the scores' product, the softmax and the context's product.
const BLOCK_ROWS: usize = 24;

/// Whether attention runs on these tiles: on CPUs with AVX2 and FMA, unless
/// `SAMHOST_ATTENTION_TILES=0` (for comparisons with the `gemm` crate's products).
pub(super) fn applies() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| crate::ops::cpu::env_switch("SAMHOST_ATTENTION_TILES") && crate::ops::cpu::has_avx2())
}

/// A worker thread's packed operands and the probabilities' gradient of its current head,
/// reused from head to head.
#[derive(Default)]
struct Scratch {
    first: Packed,
    second: Packed,
    third: Packed,
    fourth: Packed,
    ds: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` with this thread's scratch, or with a fresh one where it is in use (no task starts
/// another while it holds it, so this is only a guard against a panic).
fn with_scratch(f: impl FnOnce(&mut Scratch)) {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// An output buffer that the (sequence, head) tasks write together, each its own columns of the
/// rows of its sequence, without filling it first: every element is written by exactly one task.
struct SharedRows {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the tasks write disjoint elements (each head its own columns), and the buffer outlives
// the parallel loop that shares it.
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// The spare capacity of `v` for `len` values, to be written in full before [`SharedRows::done`].
    fn uninit(v: &mut Vec<f32>, len: usize) -> Self {
        v.clear();
        v.reserve_exact(len);
        SharedRows { ptr: v.spare_capacity_mut().as_mut_ptr().cast(), len }
    }

    /// `v` with its `len` values, once the tasks have written every one of them.
    ///
    /// # Safety
    /// Every element of the buffer must have been written.
    unsafe fn done(self, mut v: Vec<f32>) -> Vec<f32> {
        v.set_len(self.len);
        v
    }

    /// The destination of `m` rows `ldc` apart, `width` columns each, from element `offset`.
    ///
    /// # Panics
    /// When those rows do not lie inside the buffer.
    fn rows(&self, offset: usize, m: usize, ldc: usize, width: usize) -> Dest {
        assert!(
            m > 0 && width <= ldc && offset + (m - 1) * ldc + width <= self.len,
            "attention: output rows outside the buffer"
        );
        // SAFETY: inside the buffer (checked above).
        Dest { ptr: unsafe { self.ptr.add(offset) }, ldc }
    }
}

/// [`Dims::forward`] on the tiles: the context rows and the probabilities (each row's padding
/// past n written as zeros by the scores' product, whose packed keys are zero there).
pub(super) fn forward(dims: &Dims, qkv: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let Dims { batch, n, heads, d } = *dims;
    let (h, w, np) = (dims.hidden(), 3 * dims.hidden(), dims.stride());
    assert_eq!(qkv.len(), batch * n * w, "attention: the projection rows do not match the sizes");
    let (mut out, mut probs) = (Vec::new(), Vec::new());
    let ctx_rows = SharedRows::uninit(&mut out, batch * n * h);
    let prob_rows = SharedRows::uninit(&mut probs, batch * heads * n * np);
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (seq, head) = (task / heads, task % heads);
        let x = &qkv[seq * n * w..(seq + 1) * n * w];
        let (q, k, v) = (head * d, h + head * d, 2 * h + head * d);
        with_scratch(|s| {
            // kᵀ (d×n: element (c, j) is k[j, c]), zero-padded to the probabilities' stride, and v (n×d).
            s.first.pack(&x[k..], (d, n), (1, w), np);
            s.second.pack(&x[v..], (n, d), (w, 1), d);
            for r0 in (0..n).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(n - r0);
                let scores = prob_rows.rows((task * n + r0) * np, rows, np, np);
                // SAFETY: AVX2 (`applies`); this task alone writes this head's probabilities.
                unsafe { product(rows, Strided { data: &x[r0 * w + q..], rs: w, cs: 1 }, &s.first, scores) };
                // SAFETY: the product above wrote all `rows` rows of np values; nothing else
                // refers to them.
                let block = unsafe { std::slice::from_raw_parts_mut(scores.ptr, rows * np) };
                block.chunks_mut(np).for_each(|row| softmax_in_place(&mut row[..n], scale));
                let ctx = ctx_rows.rows((seq * n + r0) * h + head * d, rows, h, d);
                // SAFETY: AVX2; this task alone writes this head's columns of these rows.
                unsafe { product(rows, Strided { data: block, rs: np, cs: 1 }, &s.second, ctx) };
            }
        });
    });
    // SAFETY: the tasks wrote every head's n rows of probabilities (np values each) and its d
    // columns of every context row.
    unsafe { (ctx_rows.done(out), prob_rows.done(probs)) }
}

/// [`Dims::backward`] on the tiles: the gradient of the projection rows `x`.
pub(super) fn backward(dims: &Dims, x: &[f32], probs: &[f32], g: &[f32], scale: f32) -> Vec<f32> {
    let Dims { batch, n, heads, d } = *dims;
    let (h, w, np) = (dims.hidden(), 3 * dims.hidden(), dims.stride());
    assert!(
        probs.len() == batch * heads * n * np && x.len() == batch * n * w && g.len() == batch * n * h,
        "attention: the backward pass's buffers do not match the sizes"
    );
    let mut dx = Vec::new();
    let dx_rows = SharedRows::uninit(&mut dx, x.len());
    probs.par_chunks(n * np).enumerate().for_each(|(task, p)| {
        let (seq, head) = (task / heads, task % heads);
        let (x, g) = (&x[seq * n * w..(seq + 1) * n * w], &g[seq * n * h..(seq + 1) * n * h]);
        let (q, k, v, c) = (head * d, h + head * d, 2 * h + head * d, head * d);
        let rows_at = |col: usize, r0: usize, m: usize| dx_rows.rows((seq * n + r0) * w + col, m, w, d);
        with_scratch(|s| {
            // vᵀ (d×n) for the probabilities' gradient, k (n×d) for the queries'.
            s.first.pack(&x[v..], (d, n), (1, w), n);
            s.second.pack(&x[k..], (n, d), (w, 1), d);
            if s.ds.len() < n * np {
                s.ds.resize(n * np, 0.0);
            }
            for r0 in (0..n).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(n - r0);
                let block = &mut s.ds[r0 * np..(r0 + rows) * np];
                let dp = Dest { ptr: block.as_mut_ptr(), ldc: np };
                // dp = dctx·vᵀ. SAFETY: AVX2; the block holds `rows` rows of np >= n values.
                unsafe { product(rows, Strided { data: &g[r0 * h + c..], rs: h, cs: 1 }, &s.first, dp) };
                // ds = p ⊙ (dp - rowsum(dp ⊙ p)) · scale, the gradient of the scaled scores.
                for (dr, pr) in block.chunks_mut(np).zip(p[r0 * np..].chunks(np)) {
                    softmax_grad_in_place(&mut dr[..n], &pr[..n], scale);
                }
                // dq = ds·k. SAFETY: AVX2; this task alone writes this head's query columns.
                unsafe { product(rows, Strided { data: block, rs: np, cs: 1 }, &s.second, rows_at(q, r0, rows)) };
            }
            // dk = dsᵀ·q and dv = pᵀ·dctx over the whole head.
            s.third.pack(&x[q..], (n, d), (w, 1), d);
            s.fourth.pack(&g[c..], (n, d), (h, 1), d);
            // SAFETY: AVX2; this task alone writes this head's key and value columns.
            unsafe {
                product(n, Strided { data: &s.ds[..n * np], rs: 1, cs: np }, &s.third, rows_at(k, 0, n));
                product(n, Strided { data: p, rs: 1, cs: np }, &s.fourth, rows_at(v, 0, n));
            }
        });
    });
    // SAFETY: each (sequence, head) task wrote its query, key and value columns of every row of
    // its sequence, and the tasks cover every sequence and head.
    unsafe { dx_rows.done(dx) }
}
