//! Device selection from the recipe's `device` string.

use candle_core::Device;

/// Why a device string could not be turned into a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The string is not `auto`, `cpu` or `cuda:N`.
    #[error("unknown device '{0}': use \"auto\", \"cpu\" or \"cuda:N\" (e.g. \"cuda:0\") in [recipe] device")]
    Unknown(String),
    /// CUDA was asked for but this binary has no CUDA support.
    #[error("device '{0}' needs CUDA, but this mmrun was built without it: rebuild with `cargo build --release --features cuda`, or set [recipe] device = \"cpu\"")]
    NoCuda(String),
    /// CUDA was asked for but the device could not be opened.
    #[error("could not open CUDA device '{device}': {source}; check `nvidia-smi`, or set [recipe] device = \"cpu\"")]
    Open {
        /// The device string.
        device: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Turn `"auto"`, `"cpu"` or `"cuda:N"` into a candle device. `auto` picks CUDA device 0 when this
/// binary was built with the `cuda` feature and a GPU is present, else the CPU.
pub fn select(spec: &str) -> Result<Device, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        "cuda" => open_cuda(spec, 0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => open_cuda(spec, n),
            _ => Err(DeviceError::Unknown(spec.to_string())),
        },
    }
}

fn open_cuda(spec: &str, ordinal: usize) -> Result<Device, DeviceError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NoCuda(spec.to_string()));
    }
    Device::new_cuda(ordinal).map_err(|source| DeviceError::Open { device: spec.to_string(), source })
}

/// A short human name for a device, used in metrics and the bench JSON.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert!(select("cpu").unwrap().is_cpu());
        assert!(select(" CPU ").unwrap().is_cpu());
        assert!(matches!(select("tpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(select("cuda:x"), Err(DeviceError::Unknown(_))));
        if !candle_core::utils::cuda_is_available() {
            assert!(select("auto").unwrap().is_cpu());
            assert!(matches!(select("cuda:0"), Err(DeviceError::NoCuda(_))));
        }
    }
}
