//! Process-wide settings for training workloads, applied once at start-up by `main` and the
//! benchmarks, before any other thread exists.

/// Environment variable that sets how long candle's worker threads spin after each elementwise op
/// before they park.
pub const CANDLE_SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The spin limit samhost sets when the user has not: 1,000 rounds instead of candle's 25,000.
///
/// candle runs its elementwise ops on a pool of its own, whose workers spin-wait about a
/// millisecond after each op. samhost's heavy ops run on rayon's pool, so with one thread per
/// core those spinning workers take the cores the gemm threads need. Measured on 2 cores
/// (`cargo bench --bench speed`, 2 threads): mlp 9.75 -> 7.69 ms per SGD step, cnn 65.8 ->
/// 59.6 ms; no change with 1 thread.
pub const CANDLE_SPIN_LIMIT: u32 = 1000;

/// Applies the allocator settings ([`crate::alloc::keep_freed_buffers`]) and shortens candle's
/// spin-waits (unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set). Call first thing in `main`.
pub fn tune() {
    crate::alloc::keep_freed_buffers();
    if std::env::var_os(CANDLE_SPIN_VAR).is_none() {
        // Called before any other thread starts, so no thread reads the environment meanwhile.
        std::env::set_var(CANDLE_SPIN_VAR, CANDLE_SPIN_LIMIT.to_string());
    }
}
