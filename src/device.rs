//! Devices and dtypes as users name them (`cpu`, `cuda`, `cuda:1`; `f32`, `bf16`, `f16`).

use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// A compute dtype a user can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunDType {
    F32,
    Bf16,
    F16,
}

impl RunDType {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            RunDType::F32 => DType::F32,
            RunDType::Bf16 => DType::BF16,
            RunDType::F16 => DType::F16,
        }
    }

    /// The default for a device: f32 on CPU, bf16 on CUDA.
    pub fn default_for(device: &Device) -> Self {
        if device.is_cpu() {
            RunDType::F32
        } else {
            RunDType::Bf16
        }
    }
}

impl FromStr for RunDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(RunDType::F32),
            "bf16" | "bfloat16" => Ok(RunDType::Bf16),
            "f16" | "float16" | "fp16" | "half" => Ok(RunDType::F16),
            _ => Err(Error::setting("dtype", s, "must be one of f32, bf16, f16")),
        }
    }
}

impl std::fmt::Display for RunDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunDType::F32 => "f32",
            RunDType::Bf16 => "bf16",
            RunDType::F16 => "f16",
        })
    }
}

/// Short name of a candle dtype (`f32`, `bf16`, …).
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        DType::U32 => "u32",
        DType::U8 => "u8",
        DType::I64 => "i64",
        _ => "other",
    }
}

/// The most CPU threads a run may ask for: 4 × the available parallelism (1024 when it cannot be
/// told). The kernels split work per thread; past a few threads per core they only add
/// scheduling and synchronisation (1000 threads on 2 cores run ~100× slower than 2).
pub fn max_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_mul(4))
        .unwrap_or(1024)
}

/// Checks a `threads` setting: at least 1 and at most [`max_threads`].
pub fn check_threads(n: usize) -> Result<usize> {
    let max = max_threads();
    if n == 0 || n > max {
        return Err(Error::setting(
            "threads",
            n,
            format!("must be between 1 and {max} (at most 4 threads per available core)"),
        ));
    }
    Ok(n)
}

/// Sets the number of CPU threads of the kernels (candle and rayon read it once, before their
/// first parallel operation), after [`check_threads`].
pub fn set_threads(n: usize) -> Result<()> {
    check_threads(n)?;
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    Ok(())
}

/// Opens a device by name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::setting("device", &s, "must be cpu, cuda or cuda:N"))?,
        None => return Err(Error::setting("device", &s, "must be cpu, cuda or cuda:N")),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::setting(
            "device",
            &s,
            "this llada binary was built without CUDA support (rebuild with --features cuda)",
        ));
    }
    Device::new_cuda(ordinal)
        .map_err(|e| Error::setting("device", &s, format!("cannot open the GPU: {e}")))
}

/// Human name of a device.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        _ => "other".into(),
    }
}

/// Waits until the device has finished its queued work (for timing).
pub fn sync(d: &Device) -> Result<()> {
    Ok(d.synchronize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_bounded_by_the_cores() {
        let max = max_threads();
        let cores = std::thread::available_parallelism().map_or(256, |n| n.get());
        assert_eq!(max, 4 * cores);
        assert_eq!(check_threads(1).unwrap(), 1);
        assert_eq!(check_threads(max).unwrap(), max);
        for bad in [0, max + 1, usize::MAX] {
            let e = check_threads(bad).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("invalid setting threads={bad}: must be between 1 and {max} (at most 4 threads per available core)")
            );
        }
    }
}
