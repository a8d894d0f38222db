//! What this CPU can do, detected at run time, so that one binary runs everywhere and uses what
//! each machine has. A leaf: the precision policy (`recipe::Precision`) and the kernels
//! (`model::ops::gemm`) ask the same questions here.

/// True on x86-64 CPUs with avx512f and avx512_bf16 (Cooper Lake, Sapphire Rapids and later,
/// Zen 4/5): the bf16 kernel can run (whether it pays is [`bf16_dot_is_fast`]).
pub fn has_avx512_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(detect_avx512_bf16)
}

/// True where the avx512_bf16 dot product (`VDPBF16PS`) outruns f32 FMAs, so that bf16 matmuls
/// are worth running natively: AMD Zen 4/5, which issue it at the FMA rate (twice the flops; the
/// reference measured PyTorch's bf16 GEMM at 2.5x its f32 one on Zen 4). Intel's Sapphire Rapids
/// class issues it at half that rate (measured on this project's 2-core Xeon VM: 80 GFLOP/s per
/// core against 135+ for f32 FMAs), so there bf16 only pays through AMX, which mmrun does not use.
/// `MMRUN_NO_AVX512BF16=1` answers false (to compare with the fallback on the same machine).
pub fn bf16_dot_is_fast() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| {
        std::env::var("MMRUN_NO_AVX512BF16").as_deref() != Ok("1") && has_avx512_bf16() && vendor_is_amd()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512_bf16() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn vendor_is_amd() -> bool {
    // CPUID leaf 0 exists on every x86-64 CPU (the intrinsic is safe to call there).
    let r = std::arch::x86_64::__cpuid(0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &v == b"AuthenticAMD"
}

#[cfg(not(target_arch = "x86_64"))]
fn vendor_is_amd() -> bool {
    false
}
