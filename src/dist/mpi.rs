//! The MPI backend (the `mpi` cargo feature): the ranks `mpirun` started, joined through the
//! system's MPI library (Open MPI) by the `mpi` crate. Tensors travel through host memory.

use super::{Collective, Topology};
use anyhow::Result;

/// Joins the ranks through MPI; `None` in a build without the `mpi` feature.
#[cfg(not(feature = "mpi"))]
pub fn connect(_topo: &Topology) -> Result<Option<Box<dyn Collective>>> {
    Ok(None)
}

/// Joins the ranks through MPI (initialised here, once; only the main thread calls it).
#[cfg(feature = "mpi")]
pub fn connect(topo: &Topology) -> Result<Option<Box<dyn Collective>>> {
    imp::connect(topo)
}

#[cfg(feature = "mpi")]
mod imp {
    use super::{Collective, Topology};
    use anyhow::{bail, Result};
    use candle_core::{DType, Device, Tensor};
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use std::sync::Mutex;

    /// The ranks of `MPI_COMM_WORLD`. The universe is kept so that [`Collective::finish`] can
    /// finalise MPI.
    struct Mpi {
        rank: usize,
        size: usize,
        universe: Mutex<Option<mpi::environment::Universe>>,
    }

    pub fn connect(topo: &Topology) -> Result<Option<Box<dyn Collective>>> {
        let Some((universe, _level)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
            bail!("MPI was initialised already");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (topo.rank, topo.size) {
            bail!(
                "MPI says rank {rank} of {size}, {} said rank {} of {}: is samhost linked to the MPI library of the mpirun that started it?",
                topo.launcher,
                topo.rank,
                topo.size
            );
        }
        Ok(Some(Box::new(Mpi { rank, size, universe: Mutex::new(Some(universe)) })))
    }

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }

        fn size(&self) -> usize {
            self.size
        }

        fn backend(&self) -> &'static str {
            "mpi"
        }

        fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            world().all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }

        fn sum_f32(&self, buf: &Tensor) -> Result<Tensor> {
            let send: Vec<f32> = buf.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut recv = vec![0f32; send.len()];
            world().all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
            Ok(Tensor::from_vec(recv, buf.shape(), &Device::Cpu)?.to_device(buf.device())?)
        }

        fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            world().process_at_rank(root as i32).broadcast_into(&mut bytes[..]);
            Ok(())
        }

        fn abort(&self, code: i32) -> ! {
            world().abort(code)
        }

        fn finish(&self) {
            // Dropping the universe calls MPI_Finalize.
            if let Ok(mut u) = self.universe.lock() {
                u.take();
            }
        }
    }
}
