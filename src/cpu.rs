//! What this CPU can do, detected at run time, so that one binary runs everywhere and uses what
//! each machine has. A leaf: the precision policy (`recipe::Precision`) and the kernels
//! (`model::ops::gemm`) ask the same question here.

/// True on x86-64 CPUs with avx512f and avx512_bf16 (Cooper Lake, Sapphire Rapids and later,
/// Zen 4/5), where bf16 matmuls run natively (`VDPBF16PS`: twice the flops of an f32 FMA).
/// `MMRUN_NO_AVX512BF16=1` answers false (to compare with the fallback on the same machine).
pub fn has_avx512_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::env::var("MMRUN_NO_AVX512BF16").as_deref() != Ok("1") && detect_avx512_bf16())
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512_bf16() -> bool {
    false
}
