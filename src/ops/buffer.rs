//! Output buffers of the CPU kernels, zero-filled by the rayon pool.
//!
//! A kernel's output (an activation or its gradient: megabytes at the batch sizes of training)
//! used to be `vec![0.0; n]`, which the allocator zero-fills on the calling thread while the
//! pool waits: the largest serial part of a ResNet-20 step on 2 threads in a profile
//! (`perf record` of `benches/ranks.rs`'s step, 2026-12-01). Filled here, the pool shares it.

use rayon::prelude::*;

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
}
