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
    // candle runs element-wise ops of 64K+ elements on its own barrier pool, whose caller
    // spin-waits (unbounded) for the pool's threads. When the cores are shared (rayon's workers,
    // a second mmrun, parallel tests, a compiler) a descheduled pool thread leaves the caller
    // spinning through whole time slices: the 256x4 pretrain took 445 s with the pool and 218 s
    // without it on the same loaded 2-core machine. One pool thread (the caller alone) never waits;
    // `CANDLE_NUM_THREADS` still overrides.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    mmrun::cli::main()
}
