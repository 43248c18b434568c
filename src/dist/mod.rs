//! Data-parallel training across processes: which rank this process is, and the collective
//! operations the training step needs (sums across ranks, a broadcast from rank 0).
//!
//! `mpirun -np N samhost run SCRIPT` starts N processes. Each reads its place from the launcher's
//! environment ([`Topology::from_env`]); [`start`] then connects them through a backend:
//! - MPI (the `mpi` cargo feature, over the system's OpenMPI) for CPU tensors;
//! - NCCL (the `nccl` feature, with `cuda`; through cudarc) when the run's device is a GPU;
//! - one process alone: [`Single`], where every collective is the identity.
//!
//! The training step ([`crate::train::data_parallel`]) keeps the first gradient of SAM local
//! (each rank perturbs its own weights, as Foret et al. do per accelerator) and averages the
//! second; rank 0 owns the run folder. The rest of samhost sees only [`world`].

mod env;
mod mpi;
mod nccl;
mod single;

pub use env::{share_cores, Topology};
pub use single::Single;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The collective operations of a group of processes. Every rank must call the same operations
/// in the same order (as MPI requires): samhost calls them from the training step, `evaluate`,
/// the start of a run and the Ctrl-C check before each step, which every rank reaches alike.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// What carries the messages (`single`, `mpi`, `nccl`).
    fn backend(&self) -> &'static str;
    /// Replaces `buf` by its element-wise sum over the ranks.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `buf` (f32, on the backend's device) by its element-wise sum over the ranks.
    fn sum_f32(&self, buf: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `bytes` on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Ends every rank at once with `code` (after an error on one rank, whose peers would
    /// otherwise wait for it forever).
    fn abort(&self, code: i32) -> !;
    /// Leaves the group cleanly (every rank, at the end).
    fn finish(&self) {}
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();
static TOPOLOGY: OnceLock<Topology> = OnceLock::new();

/// Where this process stands, from the launcher's environment (read once).
pub fn topology() -> &'static Topology {
    TOPOLOGY.get_or_init(Topology::from_env)
}

/// The group this process trains in: [`Single`] until [`start`] connected more.
pub fn world() -> &'static dyn Collective {
    static ALONE: Single = Single;
    match WORLD.get() {
        Some(w) => w.as_ref(),
        None => &ALONE,
    }
}

/// Whether more than one process trains together.
pub fn is_parallel() -> bool {
    world().size() > 1
}

/// Whether this process writes the run's records (rank 0, or a process alone).
pub fn is_leader() -> bool {
    world().rank() == 0
}

/// Connects this process with the other ranks the launcher started, for tensors on `device`:
/// NCCL for a GPU, MPI otherwise. Alone (no launcher, or one rank) it does nothing. Fails when
/// the launcher started several ranks and this build has no backend that can join them.
pub fn start(device: &Device) -> Result<()> {
    let topo = topology();
    if topo.size <= 1 || WORLD.get().is_some() {
        return Ok(());
    }
    let host = mpi::connect(topo).context("connecting the ranks through MPI")?;
    let world: Box<dyn Collective> = match nccl::connect(topo, device, host.as_deref())? {
        Some(n) => n,
        None => match host {
            Some(h) => h,
            None => anyhow::bail!(
                "{} started {} ranks, but this samhost was built without a backend for {}: {}",
                topo.launcher,
                topo.size,
                crate::device::device_name(device),
                if device.is_cuda() {
                    "rebuild with `--features nccl` (NCCL, README: data-parallel training)"
                } else {
                    "rebuild with `cargo build --release --features mpi` (README: data-parallel training)"
                }
            ),
        },
    };
    let _ = WORLD.set(world);
    Ok(())
}

/// Ends the group at the end of the process with exit code `code`. A run that finished (0) or
/// that every rank stopped before the same step (a signal: 129, 130, 143) meets the others, so
/// that rank 0 has written its records, and leaves cleanly. After an error, which the other
/// ranks may not share, rank 0 (its records written) ends them all; another rank waits
/// [`ABORT_GRACE`] for rank 0 to do so, then ends them itself.
pub fn finish(code: i32) {
    let Some(w) = WORLD.get() else { return };
    if matches!(code, 0 | 129 | 130 | 143) {
        let _ = any(false);
        w.finish();
        return;
    }
    if w.rank() != 0 {
        std::thread::sleep(ABORT_GRACE);
    }
    w.abort(code)
}

/// How long a rank that failed waits for rank 0 to end the run (see [`finish`]).
pub const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Time and volume of the collective operations so far (this process's view).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Collective calls.
    pub calls: u64,
    /// Bytes this rank contributed.
    pub bytes: u64,
    /// Seconds spent in them (waiting for the slowest rank included).
    pub seconds: f64,
}

static CALLS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static NANOS: AtomicU64 = AtomicU64::new(0);

/// What the collective operations have cost so far.
pub fn comm_stats() -> CommStats {
    CommStats {
        calls: CALLS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
        seconds: NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

/// Runs one collective of `bytes` bytes, counting it in [`comm_stats`].
fn timed<T>(bytes: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let out = f();
    CALLS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// The sum over the ranks of each value of `values`.
pub fn sum(values: &mut [f64]) -> Result<()> {
    if is_parallel() {
        timed(values.len() * 8, || world().sum_f64(values))?;
    }
    Ok(())
}

/// Whether `flag` is set on any rank.
pub fn any(flag: bool) -> Result<bool> {
    if !is_parallel() {
        return Ok(flag);
    }
    let mut v = [flag as u8 as f64];
    sum(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Rank 0's `text` on every rank.
pub fn broadcast_text(text: &str) -> Result<String> {
    if !is_parallel() {
        return Ok(text.to_string());
    }
    let mut bytes = text.as_bytes().to_vec();
    let mut len = [bytes.len() as f64 * is_leader() as u8 as f64];
    sum(&mut len)?;
    bytes.resize(len[0] as usize, 0);
    timed(bytes.len(), || world().broadcast(&mut bytes, 0))?;
    String::from_utf8(bytes).context("the text rank 0 sent is not UTF-8")
}

/// The mean over the ranks of `x` (each rank's weight equal).
pub fn mean(x: f64) -> Result<f64> {
    let mut v = [x];
    sum(&mut v)?;
    Ok(v[0] / world().size() as f64)
}

/// The mean over the ranks of `tensors` (each rank's weight equal), as one message.
pub fn mean_tensors(tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if !is_parallel() {
        return Ok(tensors.to_vec());
    }
    let scale = 1.0 / world().size() as f64;
    let local: Vec<Tensor> = tensors.iter().map(|t| t.affine(scale, 0.0)).collect::<candle_core::Result<_>>()?;
    sum_tensors(&local)
}

/// The sum over the ranks of `tensors` (any shapes and float dtypes, on one device), as one
/// message: they are flattened into one f32 buffer, summed, and cut back into their shapes.
pub fn sum_tensors(tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if !is_parallel() || tensors.is_empty() {
        return Ok(tensors.to_vec());
    }
    // Timed whole: the packing into one buffer and the unpacking are the collective's cost too.
    let bytes = tensors.iter().map(|t| t.elem_count() * 4).sum();
    timed(bytes, || {
        let flat: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.to_dtype(candle_core::DType::F32)?.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let buf = Tensor::cat(&flat, 0)?;
        let summed = world().sum_f32(&buf)?;
        let mut out = Vec::with_capacity(tensors.len());
        let mut at = 0;
        for t in tensors {
            let n = t.elem_count();
            out.push(summed.narrow(0, at, n)?.reshape(t.shape())?.to_dtype(t.dtype())?);
            at += n;
        }
        Ok(out)
    })
}
