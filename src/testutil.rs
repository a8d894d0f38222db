//! Helpers shared by unit and integration tests (not part of the public API).

/// `../shared/data` relative to the crate, if present. When it is absent the caller should skip
/// (a notice is printed), unless `MMRUN_REQUIRE_SHARED=1`, in which case this panics so CI never
/// silently skips data-dependent tests.
pub fn shared_data() -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var("MMRUN_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("../shared/data is required (MMRUN_REQUIRE_SHARED=1) but missing");
    }
    eprintln!("SKIP: ../shared/data not found");
    None
}
