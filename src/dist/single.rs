//! [`Single`]: one process alone, where every collective operation is the identity.

use super::Collective;
use anyhow::Result;
use candle_core::Tensor;

/// The group of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn backend(&self) -> &'static str {
        "single"
    }

    fn sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn sum_f32(&self, buf: &Tensor) -> Result<Tensor> {
        Ok(buf.clone())
    }

    fn broadcast(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
