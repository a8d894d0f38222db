//! Device selection from the recipe's [`DeviceSpec`], and the numeric policy (`precision`) that
//! goes with it.

use crate::model::{MiniMind, ModelConfig, ModelError};
use crate::recipe::{DeviceClass, DeviceSpec, Precision, RecipeMeta};
use candle_core::{DType, Device};
use std::path::Path;

/// Why a [`DeviceSpec`] could not be turned into a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// CUDA was asked for but this binary has no CUDA support.
    #[error("device '{0}' needs CUDA, but this mmrun was built without it: rebuild with `cargo build --release --features cuda`, or set [recipe] device = \"cpu\"")]
    NoCuda(DeviceSpec),
    /// CUDA was asked for but the device could not be opened.
    #[error("could not open CUDA device '{device}': {source}; check `nvidia-smi`, or set [recipe] device = \"cpu\"")]
    Open {
        /// The device asked for.
        device: DeviceSpec,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Open the device a spec names. `auto` picks CUDA device 0 when this binary was built with the
/// `cuda` feature and a GPU is present, else the CPU.
pub fn select(spec: DeviceSpec) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto if auto_has_cuda() => open_cuda(spec, 0),
        DeviceSpec::Auto => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => open_cuda(spec, n),
    }
}

/// The class `spec` computes on, by the rule [`select`] follows, without keeping the device
/// open: what the executor hands the planner, so stage keys match what the stages will run on.
pub fn resolve_class(spec: DeviceSpec) -> DeviceClass {
    spec.explicit_class().unwrap_or_else(|| if auto_has_cuda() { DeviceClass::Cuda } else { DeviceClass::Cpu })
}

/// Whether `auto` means CUDA: this build has it *and* device 0 opens. Probed once per process.
fn auto_has_cuda() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| candle_core::utils::cuda_is_available() && Device::new_cuda(0).is_ok())
}

/// How many CUDA devices this process sees: 0 on a build without the `cuda` feature or when the
/// driver cannot be loaded.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

fn open_cuda(spec: DeviceSpec, ordinal: usize) -> Result<Device, DeviceError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NoCuda(spec));
    }
    Device::new_cuda(ordinal).map_err(|source| DeviceError::Open { device: spec, source })
}

/// A short human name for a device, used in metrics and the bench JSON.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// The device class a device belongs to, as the stage keys name it.
pub fn class(device: &Device) -> DeviceClass {
    if device.is_cuda() {
        DeviceClass::Cuda
    } else {
        DeviceClass::Cpu
    }
}

/// The compute dtype of a precision on `device`: `auto` is bf16 on CUDA and on CPUs with
/// fast bf16 matmuls (AMX, AMD Zen 4/5), f32 elsewhere (by [`Precision::resolve`], the rule the stage keys use too).
pub fn compute_dtype(precision: Precision, device: &Device) -> DType {
    match precision.resolve(class(device)) {
        Precision::Bf16 => DType::BF16,
        _ => DType::F32,
    }
}

/// The device of rank `rank` of a data-parallel stage that lists no `devices`: one GPU per rank
/// from the recipe's (`cuda:N` → `cuda:N+rank`, `auto` → `cuda:rank` when this build has CUDA,
/// as torchrun's `LOCAL_RANK`, when `auto` means CUDA here), or the CPU, which CPU ranks share.
pub fn for_rank(spec: DeviceSpec, rank: usize) -> DeviceSpec {
    match spec {
        DeviceSpec::Cpu => DeviceSpec::Cpu,
        DeviceSpec::Cuda(n) => DeviceSpec::Cuda(n + rank),
        DeviceSpec::Auto if auto_has_cuda() => DeviceSpec::Cuda(rank),
        DeviceSpec::Auto => DeviceSpec::Cpu,
    }
}

/// Where and in which precision a training stage computes, from its recipe's `[recipe]` table.
///
/// Every stage that trains a model (pretrain, SFT, LoRA, DPO, …) builds and loads its models
/// through this, so the precision policy is applied in one place: models come back with their
/// compute dtype set, weights still f32 (see [`MiniMind::set_compute_dtype`]).
#[derive(Clone, Debug)]
pub struct Compute {
    /// The device.
    pub device: Device,
    /// The compute dtype (f32, or bf16 for mixed precision).
    pub dtype: DType,
}

impl Compute {
    /// Resolve `[recipe] device` and `precision`.
    pub fn for_recipe(meta: &RecipeMeta) -> Result<Self, DeviceError> {
        Self::new(meta.device, meta.precision)
    }

    /// Resolve a device and a precision.
    pub fn new(spec: DeviceSpec, precision: Precision) -> Result<Self, DeviceError> {
        let device = select(spec)?;
        let dtype = compute_dtype(precision, &device);
        if dtype != DType::F32 {
            tracing::info!(
                "training in {dtype:?} mixed precision on {} (f32 weights and optimizer state)",
                describe(&device)
            );
        }
        Ok(Self { device, dtype })
    }

    /// Set this policy's compute dtype on `model`.
    pub fn apply(&self, model: &mut MiniMind) -> Result<(), ModelError> {
        model.set_compute_dtype(self.dtype)
    }

    /// A freshly initialised, trainable model (see [`MiniMind::new`]) in this policy.
    pub fn new_model(&self, cfg: &ModelConfig, seed: u64) -> Result<MiniMind, ModelError> {
        let mut m = MiniMind::new(cfg, seed, &self.device)?;
        self.apply(&mut m)?;
        Ok(m)
    }

    /// Load a model folder (see [`crate::model::weights::load_dir`]) in this policy.
    pub fn load_model(&self, dir: &Path, trainable: bool) -> anyhow::Result<MiniMind> {
        let mut m = crate::model::weights::load_dir(dir, &self.device, trainable)?;
        self.apply(&mut m)?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert!(select(DeviceSpec::Cpu).unwrap().is_cpu());
        assert_eq!(resolve_class(DeviceSpec::Cpu), DeviceClass::Cpu);
        assert_eq!(resolve_class(DeviceSpec::Cuda(1)), DeviceClass::Cuda);
        assert_eq!(resolve_class(DeviceSpec::Auto), class(&select(DeviceSpec::Auto).unwrap()));
        if !candle_core::utils::cuda_is_available() {
            assert!(select(DeviceSpec::Auto).unwrap().is_cpu());
            assert!(matches!(select(DeviceSpec::Cuda(0)), Err(DeviceError::NoCuda(_))));
        }
    }

    #[test]
    fn precision_resolves_by_device_class() {
        let cpu = Device::Cpu;
        let auto_cpu = if crate::cpu::bf16_matmul_is_fast() { DType::BF16 } else { DType::F32 };
        assert_eq!(compute_dtype(Precision::Auto, &cpu), auto_cpu);
        assert_eq!(compute_dtype(Precision::F32, &cpu), DType::F32);
        assert_eq!(compute_dtype(Precision::Bf16, &cpu), DType::BF16);
        assert_eq!(Precision::Auto.resolve(DeviceClass::Cuda), Precision::Bf16);
        assert_eq!(Precision::F32.resolve(DeviceClass::Cuda), Precision::F32);
        let meta = |p| RecipeMeta {
            name: "t".into(),
            description: None,
            seed: 1,
            device: DeviceSpec::Cpu,
            precision: p,
            executor: Default::default(),
            resources: Default::default(),
        };
        let cfg = crate::model::preset("tiny").unwrap();
        let m = Compute::for_recipe(&meta(Precision::Bf16)).unwrap().new_model(&cfg, 1).unwrap();
        assert_eq!(m.compute_dtype(), DType::BF16);
        assert!(m.params().iter().all(|(_, v)| v.dtype() == DType::F32), "weights stay f32");
        let m = Compute::for_recipe(&meta(Precision::Auto)).unwrap().new_model(&cfg, 1).unwrap();
        assert_eq!(m.compute_dtype(), auto_cpu);
    }
}
