//! The data-parallel script functions: `rank()`, `world_size()`, `all_reduce(...)`, for scripts
//! that write their own step (a SAM variant of their own under `mpirun`).

use super::convert::{op, Res};
use crate::models::Model;
use crate::train::TensorSet;
use rhai::{Engine, FLOAT, INT};

/// Registers `rank`, `world_size` and `all_reduce`.
pub fn register(engine: &mut Engine) {
    api!(engine, "rank", "-> int",
        "This process's rank among the ranks `mpirun -np N` started (0 alone). Rank 0 writes the run folder, prints and saves; the others compute the same steps on their share of each batch.",
        || crate::dist::world().rank() as INT);
    api!(engine, "world_size", "-> int",
        "How many ranks train together (1 alone). Under N ranks `batches(ds, B)` gives each rank rows r·B/N..(r+1)·B/N of every batch.",
        || crate::dist::world().size() as INT);
    api!(engine, "all_reduce", "g: TensorSet -> TensorSet",
        "The mean of `g` over the ranks (alone: `g`). `sam_step` and `train_step` average their direction themselves; a script that steps with `opt.step(g)` averages its gradient with this first, so every rank steps alike.",
        |g: &mut TensorSet| -> Res<TensorSet> { op("all_reduce", crate::train::data_parallel::mean(g)) });
    api!(engine, "all_reduce", "m: Model",
        "Averages the model's buffers (BatchNorm's running statistics) over the ranks, after a step taken with `opt.step(g)` (`sam_step` and `train_step` do it themselves). Alone: nothing.",
        |m: &mut Model| -> Res<()> { op("all_reduce", crate::train::data_parallel::average_buffers(m)) });
    api!(
        engine,
        "all_reduce",
        "x: float -> float",
        "The mean of `x` over the ranks (alone: `x`): a loss or a norm measured on each rank's share.",
        |x: FLOAT| -> Res<FLOAT> { op("all_reduce", crate::dist::mean(x)) }
    );
}
