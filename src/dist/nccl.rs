//! The NCCL backend (the `nccl` feature, on top of `cuda`): the ranks of a run on GPUs, one GPU each, summing
//! tensors where they live, through cudarc's NCCL bindings on candle's CUDA stream.
//!
//! The ranks meet through NCCL's unique id, which rank 0 makes: sent by MPI when samhost was
//! built with the `mpi` feature too, else through a file (`SAMHOST_RENDEZVOUS`, or one in the
//! temporary folder named after the launcher's job id).

use super::{Collective, Topology};
use anyhow::Result;
use candle_core::Device;

/// Joins the ranks through NCCL when `device` is a GPU; `None` otherwise (and always in a build
/// without the `nccl` feature). `host` (MPI), when present, carries NCCL's id.
#[cfg(not(feature = "nccl"))]
pub fn connect(
    _topo: &Topology,
    _device: &Device,
    _host: Option<&dyn Collective>,
) -> Result<Option<Box<dyn Collective>>> {
    Ok(None)
}

/// Joins the ranks through NCCL when `device` is a GPU; `None` otherwise. `host` (MPI), when
/// present, carries NCCL's id.
#[cfg(feature = "nccl")]
pub fn connect(topo: &Topology, device: &Device, host: Option<&dyn Collective>) -> Result<Option<Box<dyn Collective>>> {
    match device {
        Device::Cuda(d) => Ok(Some(Box::new(imp::Nccl::connect(topo, d, host)?))),
        _ => Ok(None),
    }
}

#[cfg(feature = "nccl")]
mod imp {
    use super::{Collective, Topology};
    use anyhow::{anyhow, bail, Context, Result};
    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Tensor};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// A communicator. NCCL's handle is used by one thread at a time, under the mutex.
    struct Shared(Comm);
    // SAFETY: the communicator is only reached through `Nccl::comm`'s mutex, so no two threads
    // call NCCL on it at once, which is what NCCL asks of a communicator.
    unsafe impl Send for Shared {}
    // SAFETY: as above: every use goes through the mutex.
    unsafe impl Sync for Shared {}

    pub struct Nccl {
        comm: Mutex<Shared>,
        device: CudaDevice,
        stream: Arc<CudaStream>,
        rank: usize,
        size: usize,
    }

    fn nccl_err(e: impl std::fmt::Debug) -> anyhow::Error {
        anyhow!("NCCL: {e:?}")
    }

    /// Where the ranks meet when no MPI carries the id.
    fn rendezvous_file(topo: &Topology) -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("SAMHOST_RENDEZVOUS") {
            return Ok(PathBuf::from(p));
        }
        let job = topo.job.as_deref().with_context(|| {
            format!("{} gives no job id for the ranks to meet by: set SAMHOST_RENDEZVOUS to a file path every rank can reach", topo.launcher)
        })?;
        let safe: String = job.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        Ok(std::env::temp_dir().join(format!("samhost-nccl-{safe}.id")))
    }

    /// NCCL's id, made by rank 0 and handed to the others.
    fn exchange_id(topo: &Topology, host: Option<&dyn Collective>) -> Result<Id> {
        let mine = if topo.rank == 0 { Some(Id::new().map_err(nccl_err)?) } else { None };
        let mut bytes: Vec<u8> = match &mine {
            Some(id) => id.internal().iter().map(|&c| c as u8).collect(),
            None => vec![0u8; 128],
        };
        match host {
            Some(h) => h.broadcast(&mut bytes, 0)?,
            None => {
                let file = rendezvous_file(topo)?;
                if topo.rank == 0 {
                    crate::fsutil::write_atomic(&file, |p| Ok(std::fs::write(p, &bytes)?))?;
                } else {
                    let start = Instant::now();
                    loop {
                        if let Ok(b) = std::fs::read(&file) {
                            if b.len() == 128 {
                                bytes = b;
                                break;
                            }
                        }
                        if start.elapsed() > Duration::from_secs(120) {
                            bail!("rank {}: no NCCL id from rank 0 in {} after 120 s", topo.rank, file.display());
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        if let Some(id) = mine {
            return Ok(id);
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        Ok(Id::uninit(internal))
    }

    impl Nccl {
        pub fn connect(topo: &Topology, device: &CudaDevice, host: Option<&dyn Collective>) -> Result<Self> {
            let id = exchange_id(topo, host)?;
            let stream = device.cuda_stream();
            let comm = Comm::from_rank(stream.clone(), topo.rank, topo.size, id).map_err(nccl_err)?;
            Ok(Self {
                comm: Mutex::new(Shared(comm)),
                device: device.clone(),
                stream,
                rank: topo.rank,
                size: topo.size,
            })
        }

        fn with_comm<T>(&self, f: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
            let guard = self.comm.lock().map_err(|_| anyhow!("NCCL: the communicator's lock is poisoned"))?;
            f(&guard.0)
        }
    }

    /// The sum over the ranks of a contiguous f32 tensor on the GPU, as a candle op (no gradient).
    struct AllReduce<'a>(&'a Nccl);

    impl candle_core::CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce takes tensors on the GPU")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("the NCCL all-reduce takes a contiguous tensor")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let mut dst = self.0.device.alloc_zeros::<f32>(end - start)?;
            self.0
                .with_comm(|c| c.all_reduce(&src, &mut dst, &ReduceOp::Sum).map(|_| ()).map_err(nccl_err))
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, self.0.device.clone()), l.shape().clone()))
        }
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.rank
        }

        fn size(&self) -> usize {
            self.size
        }

        fn backend(&self) -> &'static str {
            "nccl"
        }

        fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let mut d = self.stream.clone_htod(&buf[..])?;
            self.with_comm(|c| c.all_reduce_in_place(&mut d, &ReduceOp::Sum).map(|_| ()).map_err(nccl_err))?;
            let host = self.stream.clone_dtoh(&d)?;
            buf.copy_from_slice(&host);
            Ok(())
        }

        fn sum_f32(&self, buf: &Tensor) -> Result<Tensor> {
            let t =
                buf.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cuda(self.device.clone()))?.contiguous()?;
            Ok(t.apply_op1_no_bwd(&AllReduce(self))?.to_device(buf.device())?)
        }

        fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            let mut d = self.stream.clone_htod(&bytes[..])?;
            self.with_comm(|c| c.broadcast_in_place(&mut d, root as i32).map(|_| ()).map_err(nccl_err))?;
            *bytes = self.stream.clone_dtoh(&d)?;
            Ok(())
        }

        fn abort(&self, code: i32) -> ! {
            // NCCL cannot end the other processes; the launcher does when this one exits.
            std::process::exit(code)
        }
    }
}
