//! What this CPU can do, detected at run time, so that one binary runs everywhere and uses what
//! each machine has. A leaf: the precision policy (`recipe::Precision`) and the kernels
//! (`model::ops::gemm`) ask the same questions here.

/// True on x86-64 CPUs with avx512f and avx512_bf16 (Cooper Lake, Sapphire Rapids and later,
/// Zen 4/5): the bf16 kernel can run (whether it pays is [`bf16_dot_is_fast`]).
pub fn has_avx512_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(detect_avx512_bf16)
}

/// True on x86-64 CPUs with avx512f (the decoding kernels' bf16 → f32 widening path where
/// avx512_bf16 is absent, e.g. Skylake-X and Ice Lake servers).
pub fn has_avx512f() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(detect_avx512f)
}

/// True on x86-64 CPUs with AMX tiles and AMX-BF16 (Intel Sapphire Rapids and later) that the OS
/// lets this process use (Linux grants the tile state on request, once per process), plus
/// avx512_bf16 for packing the operands. `MMRUN_NO_AMX=1` answers false.
pub fn has_amx_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::env::var("MMRUN_NO_AMX").as_deref() != Ok("1") && has_avx512_bf16() && detect_amx())
}

/// True where bf16 matmuls run faster than f32 ones on this CPU: AMX ([`has_amx_bf16`]) or a fast
/// `VDPBF16PS` ([`bf16_dot_is_fast`]). `precision = "auto"` trains in bf16 there.
pub fn bf16_matmul_is_fast() -> bool {
    has_amx_bf16() || bf16_dot_is_fast()
}

/// True where the avx512_bf16 dot product (`VDPBF16PS`) outruns f32 FMAs, so that bf16 matmuls
/// are worth running natively: AMD Zen 4/5, which issue it at the FMA rate (twice the flops; the
/// reference measured PyTorch's bf16 GEMM at 2.5x its f32 one on Zen 4). Intel's Sapphire Rapids
/// class issues it at half that rate (measured on this project's 2-core Xeon VM: 80 GFLOP/s per
/// core against 135+ for f32 FMAs), so there bf16 only pays through AMX ([`has_amx_bf16`]).
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
fn detect_avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512f() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID leaf 7 (structured extended features): EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    // The OS must manage the tile state (XCR0 bits 17 and 18), which needs OSXSAVE to read XCR0.
    if __cpuid(1).ecx & (1 << 27) == 0 {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 is valid once CPUID reports OSXSAVE (checked above).
    unsafe { std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi, options(nomem, nostack)) };
    if lo & (3 << 17) != 3 << 17 {
        return false;
    }
    // Linux hands out the (8 KiB) tile data state only to processes that ask for it:
    // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Without it the first tile
    // instruction kills the process with SIGILL.
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a system call with integer arguments that changes only this process's permissions;
    // the kernel clobbers rcx and r11 on `syscall`.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack))
    };
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect_amx() -> bool {
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
