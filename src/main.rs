// mimalloc with purging off: candle allocates a fresh buffer per op and glibc's habit of returning
// big buffers to the OS (then re-zeroing pages) cost ~half the CPU time (see shared candle-notes).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mmrun::cli::main()
}
