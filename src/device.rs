//! Device selection: `--device cpu | cuda | cuda:N | auto`, what `auto` chose and why, and the
//! names devices are recorded under (`cpu`, `cuda:N`).

use anyhow::{bail, Result};
use candle_core::Device;

/// The device a run uses and, for `auto`, why it was chosen.
#[derive(Clone, Debug)]
pub struct DeviceChoice {
    /// The device.
    pub device: Device,
    /// What was asked for, lower-cased (`cpu`, `cuda:1`, `auto`).
    pub requested: String,
    /// For `auto`: why it chose what it chose (`no GPU found: …`, `built without CUDA`).
    pub note: Option<String>,
}

impl DeviceChoice {
    /// The CPU, asked for by name.
    pub fn cpu() -> Self {
        Self { device: Device::Cpu, requested: "cpu".into(), note: None }
    }

    /// `cuda:0` (auto) or `cpu (auto: built without CUDA)`: the device's name and the reason.
    pub fn describe(&self) -> String {
        match &self.note {
            Some(note) => format!("{} ({}: {note})", device_name(&self.device), self.requested),
            None => device_name(&self.device),
        }
    }
}

/// A human name for a device: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Whether this build has the CUDA backend (the `cuda` cargo feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU when this build has CUDA and one
/// opens, else the CPU).
pub fn parse_device(spec: &str) -> Result<DeviceChoice> {
    let requested = spec.trim().to_ascii_lowercase();
    let choice = |device: Device, note: Option<String>| DeviceChoice { device, requested: requested.clone(), note };
    match requested.as_str() {
        "cpu" => Ok(choice(Device::Cpu, None)),
        "auto" if !CUDA_BUILT => Ok(choice(Device::Cpu, Some("built without CUDA".into()))),
        "auto" => match Device::new_cuda(0) {
            Ok(d) => Ok(choice(d, Some("found a GPU".into()))),
            Err(e) => Ok(choice(Device::Cpu, Some(format!("no GPU opened: {e}")))),
        },
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| anyhow::anyhow!("--device {s}: `{n}` is not a GPU number"))?,
                None => 0,
            };
            if !CUDA_BUILT {
                bail!(
                    "--device {s}: this samhost was built without CUDA; rebuild it with \
                     `cargo build --release --features cuda` (scripts/cuda_build.sh installs the compiler)"
                );
            }
            let device = Device::new_cuda(n).map_err(|e| anyhow::anyhow!("--device {s}: cannot open GPU {n}: {e}"))?;
            Ok(choice(device, None))
        }
        other => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
    }
}
