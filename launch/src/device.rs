//! Where a command computes (`device: cpu | cuda`, `--device`) and in which numeric policy
//! (`precision: fp32 | bf16-mixed`, `--precision`, [`dm_model::plan::Precision`]); the checks
//! that refuse what cannot run here before anything is written (exit 2, the reason, never a
//! silent fall-back to the CPU); one CUDA backend per rank; the dense bf16 peak of known GPUs.
//!
//! The CUDA paths of `train`, `sample`, `parity` and `bench step` are **untested on GPUs** (no
//! GPU where they were written); without one they refuse cleanly, which the tests check.

use anyhow::Result;
use dm_model::plan::Precision;
use dm_runtime::cuda::{CudaBackend, CudaOptions};
use serde::{Deserialize, Serialize};

/// The device a command runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the CUDA device name;
/// the first match wins, so more specific names come first. The MFU denominator of `bench step`
/// and `gpu-check`.
pub const PEAK_BF16_DENSE_TFLOPS: [(&str, f64); 8] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
];

/// The dense bf16 peak of the GPU named `name` (as the driver reports it), if the table knows it.
pub fn peak_bf16_tflops(name: &str) -> Option<f64> {
    PEAK_BF16_DENSE_TFLOPS.iter().find(|(key, _)| name.contains(key)).map(|&(_, tflops)| tflops)
}

/// Refuses, before anything is written, a precision the model does not implement: asks the
/// model's own policy switch ([`dm_model::DalleBart::with_precision`]) on a one-layer model.
pub fn check_precision(precision: Precision) -> Result<()> {
    let cfg = dm_model::DalleBartConfig {
        d_model: 8,
        encoder_layers: 1,
        decoder_layers: 1,
        encoder_attention_heads: 1,
        decoder_attention_heads: 1,
        encoder_ffn_dim: 8,
        decoder_ffn_dim: 8,
        encoder_vocab_size: 8,
        image_vocab_size: 8,
        image_length: 4,
        max_text_length: 4,
        init_std: 0.02,
        use_scan: true,
    };
    let model = dm_model::DalleBart::init(dm_runtime::cpu::CpuBackend::new(), cfg, 0)?;
    model
        .with_precision(precision)
        .map(drop)
        .map_err(|e| crate::bad_input!("--precision / precision: {}: {e}; nothing was written", precision.name()))
}

/// Refuses `--device cuda` where fewer than `gpus` usable GPUs exist on this host (or, with
/// `nccl`, libnccl is missing): the driver's or library's reason, and the way out.
pub fn check_cuda(gpus: usize, nccl: bool) -> Result<()> {
    let probe = CudaBackend::probe()
        .map_err(|e| crate::bad_input!("--device cuda: no usable GPU: {e}; use --device cpu (nothing was written)"))?;
    if probe.devices.len() < gpus {
        return Err(crate::bad_input!(
            "--device cuda: this run needs {gpus} GPU(s) on this host but the driver sees {}; use fewer ranks \
             (mesh.tp × mesh.dp, or --tp/--dp), one process per GPU across hosts, or --device cpu (nothing was \
             written)",
            probe.devices.len()
        ));
    }
    if nccl {
        dm_parallel::comm::nccl::nccl_available().map_err(|e| {
            crate::bad_input!(
                "--device cuda with several ranks talks over NCCL, which is not usable here: {e}; install NCCL \
                 (libnccl2), run one rank, or use --device cpu (nothing was written)"
            )
        })?;
    }
    Ok(())
}

/// The checks of `device` and `precision` for a run of `gpus_here` ranks' GPUs on this host
/// (the largest ordinal + 1) and `ranks` ranks in all.
pub fn check(device: Device, precision: Precision, gpus_here: usize, ranks: usize) -> Result<()> {
    check_precision(precision)?;
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda => check_cuda(gpus_here, ranks > 1),
    }
}

/// The CUDA backend of the rank on GPU `ordinal`: the run's precision for the GEMMs and the
/// per-rank memory budget.
pub fn cuda_backend(ordinal: usize, precision: Precision, memory_budget: Option<u64>) -> Result<CudaBackend> {
    let precision = match precision {
        Precision::Fp32 => dm_runtime::cuda::Precision::F32,
        Precision::Bf16Mixed => dm_runtime::cuda::Precision::Bf16Mixed,
    };
    let opts = CudaOptions { precision, memory_budget, ..Default::default() };
    CudaBackend::new(ordinal, opts)
        .map_err(|e| crate::bad_input!("--device cuda: GPU {ordinal} is not usable: {e}; use --device cpu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_by_device_name() {
        assert_eq!(peak_bf16_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(peak_bf16_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak_bf16_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(peak_bf16_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(peak_bf16_tflops("NVIDIA L40S"), Some(362.0));
        assert_eq!(peak_bf16_tflops("Tesla T4"), None);
    }

    #[test]
    fn fp32_is_supported_and_no_gpu_is_refused_cleanly() {
        check_precision(Precision::Fp32).unwrap();
        if CudaBackend::available() {
            return;
        }
        let e = check(Device::Cuda, Precision::Fp32, 1, 1).unwrap_err();
        assert!(format!("{e:#}").contains("no usable GPU") && format!("{e:#}").contains("--device cpu"), "{e:#}");
        assert_eq!(crate::exit_code::for_error(&e), crate::exit_code::BAD_INPUT);
    }
}
