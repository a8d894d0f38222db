// mimalloc with purging off: candle allocates a fresh buffer per op, and an allocator that hands
// freed pages back to the OS pays for re-faulting and zeroing them on the next op. Measured with
// `mmrun bench` (reference shape, 2 cores): 1114 train tokens/s with mimalloc's default purge delay,
// 1214-1323 with purging off (3 runs), at +2-4 % peak RSS; kernel time per run fell from 11 s to 5 s.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (the Rust bindings have no constant for
/// it); `-1` means never purge.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // SAFETY: `mi_option_set` only stores an option value; it is not thread safe, and no other
    // thread exists yet. (It overrides a `MIMALLOC_PURGE_DELAY` from the environment.)
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    debug_assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, -1);
    mmrun::cli::main()
}
