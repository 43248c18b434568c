//! Consecutive blocks as one op: the blocks of a network's residual trunk run in turn inside a
//! single node of candle's graph, each block's input gradient handed straight to the block below.
//!
//! As separate nodes, every block's input gradient went back to candle, whose backward pass adds
//! it into a freshly zero-filled tensor (`GradStore::or_insert`, then `add`): an activation-sized
//! memset on the calling thread and an add over three arrays per block, while the pool's
//! threads wait. In a chain only the first block's input gradient goes to candle.

use super::{admissible, run, BlockOutput, Form, FormGrads, Pass, Saved};
use candle_core::{Result, Tensor};
use std::borrow::Cow;

/// Consecutive blocks in training mode as one op: each block's tensors in the op's list
/// (`list`) and its form for the input dimensions it gets (`form`, `None` where the fused block
/// does not apply). The last block's output and every block's statistics in block order, or
/// `None` where a block declines (or fewer than two are given, or `SAMHOST_FUSED_CHAIN=0`), and the
/// caller runs them one by one.
pub(super) fn chain_train<T, F: Form>(
    x: &Tensor,
    blocks: &[T],
    list: impl Fn(&T) -> Vec<Option<Tensor>>,
    form: impl Fn(&[usize], &[Option<Tensor>], &T) -> Result<Option<F>>,
) -> Result<Option<BlockOutput>> {
    if blocks.len() < 2 || !super::chain_enabled() {
        return Ok(None);
    }
    let lists: Vec<Vec<Option<Tensor>>> = blocks.iter().map(list).collect();
    let p: Vec<Option<Tensor>> = lists.iter().flatten().cloned().collect();
    if !admissible(x, &p) {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    let mut forms = Vec::with_capacity(blocks.len());
    for (t, list) in blocks.iter().zip(&lists) {
        let Some(f) = form(&dims, list, t)? else { return Ok(None) };
        dims = f.out_dims().to_vec();
        forms.push((f, list.len()));
    }
    run(x, p, Chain::new(forms)?)
}

/// Blocks of one form applied in turn; block `i`'s tensors are the op's slots
/// `slots[i]..slots[i + 1]`.
pub(super) struct Chain<F> {
    forms: Vec<F>,
    slots: Vec<usize>,
    names: Vec<&'static str>,
}

impl<F: Form> Chain<F> {
    /// The chain of `forms` (at least two, each block's output shaped as the next one's input),
    /// each with `slots` tensors in the op's list.
    pub(super) fn new(forms: Vec<(F, usize)>) -> Result<Self> {
        if forms.len() < 2 {
            candle_core::bail!("residual chain: {} block(s), a chain has at least two", forms.len());
        }
        let mut slots = vec![0];
        let mut names = Vec::new();
        for (form, n) in &forms {
            if form.names().len() != *n {
                candle_core::bail!("residual chain: a block of {} tensors given {n}", form.names().len());
            }
            names.extend_from_slice(form.names());
            slots.push(slots[slots.len() - 1] + n);
        }
        Ok(Self { forms: forms.into_iter().map(|(f, _)| f).collect(), slots, names })
    }

    /// Block `i`'s tensors.
    fn of<'a, T>(&self, i: usize, all: &'a [T]) -> &'a [T] {
        &all[self.slots[i]..self.slots[i + 1]]
    }
}

impl<F: Form> Form for Chain<F> {
    fn names(&self) -> &[&'static str] {
        &self.names
    }

    fn out_dims(&self) -> [usize; 4] {
        self.forms.last().map_or([0; 4], Form::out_dims)
    }

    fn counts(&self) -> Vec<usize> {
        self.forms.iter().flat_map(Form::counts).collect()
    }

    /// The last block's output; kept: every block's own state and (for the backward pass) the
    /// outputs between blocks. The statistics are every block's, in block order.
    fn forward(&self, x: &[f32], w: &[&[f32]], keep: bool) -> Result<(Vec<f32>, Saved)> {
        let mut inner = Vec::with_capacity(self.forms.len());
        let mut between = Vec::new();
        let mut cur: Option<Vec<f32>> = None;
        for (i, form) in self.forms.iter().enumerate() {
            let (out, saved) = form.forward(cur.as_deref().unwrap_or(x), self.of(i, w), keep)?;
            inner.push(saved);
            if let Some(prev) = cur.replace(out) {
                if keep {
                    between.push(prev);
                }
            }
        }
        let out = cur.unwrap_or_default();
        let stats = inner.iter().flat_map(|s| s.stats.iter().cloned()).collect();
        Ok((out, Saved { stats, acts: between, inner }))
    }

    fn backward(&self, Pass { x, out, g, w, saved, need_x, tracks }: Pass) -> Result<FormGrads> {
        let n = self.forms.len();
        if saved.inner.len() != n || saved.acts.len() + 1 != n {
            candle_core::bail!("residual chain: the forward pass's activations are missing");
        }
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; self.names.len()];
        let mut g_cur = Cow::Borrowed(g);
        for i in (0..n).rev() {
            let base = self.slots[i];
            // Whether anything below this block's output takes a gradient.
            let below = need_x || (0..base).any(tracks);
            let input = if i == 0 { x } else { &saved.acts[i - 1][..] };
            let output = if i + 1 == n { out } else { &saved.acts[i][..] };
            let block_tracks = |j: usize| tracks(base + j);
            let pass = Pass {
                x: input,
                out: output,
                g: &g_cur,
                w: self.of(i, w),
                saved: &saved.inner[i],
                need_x: below,
                tracks: &block_tracks,
            };
            let (dx, block_grads) = self.forms[i].backward(pass)?;
            for (j, grad) in block_grads.into_iter().enumerate() {
                grads[base + j] = grad;
            }
            match dx {
                Some(dx) if i > 0 => g_cur = Cow::Owned(dx),
                dx => return Ok((dx.filter(|_| need_x), grads)),
            }
        }
        Ok((None, grads))
    }
}
