//! Output buffers of the CPU kernels, zero-filled by the rayon pool.
//!
//! A kernel's output (an activation or its gradient: megabytes at the batch sizes of training)
//! used to be `vec![0.0; n]`, which the allocator zero-fills on the calling thread while the
//! pool waits: the largest serial part of a ResNet-20 step on 2 threads in a profile
//! (`perf record` of `benches/ranks.rs`'s step, 2026-12-01). Filled here, the pool shares it.
//! An output that a kernel writes element by element anyway is not zero-filled first:
//! [`par_from_chunks`] writes each value once, straight into the new allocation (the zero fill
//! was 4-5 % of a ResNet-20 step, and a pass over memory that evicts the operands from cache).

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Below this many elements one thread fills the buffer (the pool's start costs more).
const PARALLEL_FROM: usize = 1 << 16;

/// `n` zeros (`T::default()`), filled by the rayon pool when `n` is large.
pub fn zeroed<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    if n < PARALLEL_FROM {
        return vec![T::default(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(T::default(), n));
    v
}

/// A vector of `n` values written chunk by chunk on the rayon pool: the chunk of elements
/// `range` (`chunk` of them, the last one fewer) takes the values `values(range)` yields, in
/// order. Nothing is written twice and nothing is zero-filled first.
///
/// # Panics
/// When `values(range)` yields fewer values than `range` has elements (a kernel's bug, not a
/// user's input).
pub fn par_from_chunks<T, I>(n: usize, chunk: usize, values: impl Fn(Range<usize>) -> I + Sync) -> Vec<T>
where
    T: Send,
    I: Iterator<Item = T>,
{
    let chunk = chunk.max(1);
    let mut v: Vec<T> = Vec::with_capacity(n);
    let fill = |(i, dst): (usize, &mut [MaybeUninit<T>])| {
        let (mut written, len) = (0, dst.len());
        for (slot, value) in dst.iter_mut().zip(values(i * chunk..i * chunk + len)) {
            slot.write(value);
            written += 1;
        }
        assert!(written == dst.len(), "buffer: chunk {i} got {written} of its {} values", dst.len());
    };
    let spare = &mut v.spare_capacity_mut()[..n];
    if n < PARALLEL_FROM {
        spare.chunks_mut(chunk).enumerate().for_each(fill);
    } else {
        spare.par_chunks_mut(chunk).enumerate().for_each(fill);
    }
    // SAFETY: every chunk of the first `n` slots was written in full (the assertion above; a
    // panic there leaves the length at 0, and `T`'s written values leak instead of dropping).
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn zeroed_has_the_length_and_only_zeros() {
        for n in [0, 5, super::PARALLEL_FROM, super::PARALLEL_FROM * 3 + 7] {
            let v: Vec<f32> = super::zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn par_from_chunks_writes_every_value_in_order() {
        for (n, chunk) in [(0, 4), (5, 2), (super::PARALLEL_FROM * 2 + 3, 1000), (super::PARALLEL_FROM, 7)] {
            let v: Vec<usize> = super::par_from_chunks(n, chunk, |r| {
                assert!(r.start.is_multiple_of(chunk) && r.len() == chunk.min(n - r.start));
                r
            });
            assert_eq!(v, (0..n).collect::<Vec<_>>(), "n={n} chunk={chunk}");
        }
    }

    #[test]
    #[should_panic(expected = "values")]
    fn par_from_chunks_refuses_a_short_chunk() {
        let _: Vec<u32> = super::par_from_chunks(10, 5, |r| 0..if r.start == 5 { 3 } else { 5 });
    }
}
