//! bf16 GEMM on the CPU: `C (f32) = A · B` with A and B rounded to bf16 (round to nearest even)
//! and the products accumulated in f32 — the numerics of PyTorch's CPU autocast.
//!
//! On x86-64 CPUs where avx512_bf16 is fast (AMD Zen 4/5; [`crate::cpu::bf16_dot_is_fast`]) a
//! packed micro-kernel runs `VDPBF16PS`, which multiplies 16 pairs of bf16 values and adds both
//! products of a pair to one f32 lane: twice the flops of an f32 FMA per instruction, and half the
//! bytes. Intel's Sapphire Rapids class has the instruction but issues it at half the FMA rate
//! (this kernel reaches ≈ 90 GFLOP/s per core there, the instruction's limit, against ≈ 80–95 for
//! the `gemm` crate's f32 kernel and twice that for f32 FMAs in a loop), so there AMX runs instead.
//! The operands are packed with their K values in pairs (a `u32` holds the bf16 of `k` in its low
//! and of `k + 1` in its high half; an odd K is padded with a zero):
//!
//! * B (K×N) once per call into [`Packed`] panels of [`NR`] columns, [`KCP`] pairs deep; a weight
//!   is packed once per optimizer step and reused by every matmul until then (`super::linear_bf16`);
//! * A (M×K) per task into [`MR`]-row panels, pair-major, so the kernel broadcasts one `u32` per
//!   row and K pair against the B panel.
//!
//! On Intel CPUs with AMX (Sapphire Rapids and later) the same B panels feed the tile unit
//! instead: `TDPBF16PS` multiplies a 16×32 bf16 tile of A by a 32×16 tile of B into a 16×16 f32
//! tile, and a 2×2 block of such tiles makes a 32×32 micro-kernel (`amx`). A is packed per task
//! row-major in pairs, zero-padded to whole tiles. This is several times the f32 FMA peak of the
//! same core (measured: ≈ 470 GFLOP/s per core on the Xeon dev VM for the kernel alone).
//!
//! Everywhere else (other CPUs, other architectures) [`Packed::Rounded`] keeps B rounded to bf16 as
//! f32 and the `gemm` crate multiplies the rounded values in f32: the same numbers up to summation
//! order, at f32 speed. [`Backend::detect`] picks one at run time, so the binary stays portable.

use super::SyncPtr;
use half::bf16;
use rayon::prelude::*;

/// Rows of the micro-kernel's C tile.
pub const MR: usize = 12;
/// Columns of the micro-kernel's C tile (two 16-lane vectors).
pub const NR: usize = 32;
/// K pairs per packed block: a B micro-panel (`KCP × NR` u32, 16 KiB) stays in L1 while the
/// kernel sweeps the A block of its task.
pub const KCP: usize = 128;
/// Rows of A per task (a multiple of [`MR`]): the packed A block (`MC × KCP` u32, 48 KiB) stays
/// in L2.
const MC: usize = MR * 8;

/// Round an f32 to bf16 bits, to nearest even (NaN stays NaN), like `VCVTNE2PS2BF16`.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The value `x` rounds to in bf16, as f32.
#[inline]
pub fn to_bf16_f32(x: f32) -> f32 {
    f32::from_bits((round_bf16(x) as u32) << 16)
}

/// The elements behind a [`MatRef`].
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    /// f32 values (rounded to bf16 when packed).
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
}

/// A read-only strided matrix: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: Elems<'a>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `data` as `rows × cols` with row stride `rs` and column stride `cs`.
    ///
    /// # Panics
    /// When the last element lies outside `data`.
    pub fn new(data: Elems<'a>, rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let len = match data {
            Elems::F32(d) => d.len(),
            Elems::Bf16(d) => d.len(),
        };
        if rows > 0 && cols > 0 {
            assert!(
                (rows - 1) * rs + (cols - 1) * cs < len,
                "matrix view {rows}x{cols} (rs {rs}, cs {cs}) exceeds {len} elements"
            );
        }
        Self { data, rows, cols, rs, cs }
    }

    /// A row-major f32 matrix.
    pub fn f32(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(Elems::F32(data), rows, cols, cols, 1)
    }

    /// The transpose (a view: strides swap).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    #[inline]
    fn bits(&self, r: usize, c: usize) -> u16 {
        match self.data {
            Elems::F32(d) => round_bf16(d[r * self.rs + c * self.cs]),
            Elems::Bf16(d) => d[r * self.rs + c * self.cs].to_bits(),
        }
    }

    /// Element `(r, c)` as bf16 bits (f32 values rounded to nearest even).
    #[inline]
    pub fn bf16_bits(&self, r: usize, c: usize) -> u16 {
        self.bits(r, c)
    }

    /// The K pair `(r, 2p), (r, 2p + 1)` along columns, zero past the last column.
    #[inline]
    fn pair_along_cols(&self, r: usize, p: usize) -> u32 {
        let k = 2 * p;
        let hi = if k + 1 < self.cols { self.bits(r, k + 1) } else { 0 };
        self.bits(r, k) as u32 | (hi as u32) << 16
    }

    /// The K pair `(2p, c), (2p + 1, c)` along rows, zero past the last row.
    #[inline]
    fn pair_along_rows(&self, p: usize, c: usize) -> u32 {
        let k = 2 * p;
        let hi = if k + 1 < self.rows { self.bits(k + 1, c) } else { 0 };
        self.bits(k, c) as u32 | (hi as u32) << 16
    }

    /// The f32 slice when the elements are f32 (the vectorised packing paths).
    /// The f32 data with its row and column strides.
    ///
    /// # Panics
    /// On a bf16 view.
    pub(crate) fn f32_parts(&self) -> (&'a [f32], usize, usize) {
        (self.f32_data().expect("an f32 matrix view"), self.rs, self.cs)
    }

    fn f32_data(&self) -> Option<&'a [f32]> {
        match self.data {
            Elems::F32(d) => Some(d),
            Elems::Bf16(_) => None,
        }
    }
}

/// Which kernel runs the bf16 matmuls on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The packed `VDPBF16PS` micro-kernel (x86-64 with avx512f and avx512_bf16).
    Avx512Bf16,
    /// The AMX tile kernel (x86-64 with AMX-BF16, granted by the OS; [`crate::cpu::has_amx_bf16`]).
    Amx,
    /// bf16-rounded operands multiplied by the `gemm` crate in f32.
    Fallback,
}

impl Backend {
    /// The fastest backend on this CPU: AMX where the CPU has it and the OS grants it, the
    /// `VDPBF16PS` kernel where that outruns f32 FMAs ([`crate::cpu::bf16_dot_is_fast`]), else the
    /// fallback (the same numbers).
    pub fn detect() -> Self {
        if crate::cpu::has_amx_bf16() {
            Backend::Amx
        } else if crate::cpu::bf16_dot_is_fast() {
            Backend::Avx512Bf16
        } else {
            Backend::Fallback
        }
    }
}

pub use crate::cpu::{has_amx_bf16, has_avx512_bf16};

/// The right-hand operand B (K×N) of [`gemm`], prepared once and reusable.
#[derive(Debug)]
pub enum Packed {
    /// For [`Backend::Avx512Bf16`] and [`Backend::Amx`]: K blocks of `kc` pairs, each holding
    /// the `ceil(N / NR)` column panels one after the other, each panel `pairs × NR` u32 (zero
    /// padded). Sixteen pair rows of a panel's half are one AMX B tile (the VNNI layout).
    Panels {
        /// The kernel that multiplies them.
        backend: Backend,
        /// K.
        k: usize,
        /// N.
        n: usize,
        /// Pairs per K block ([`KCP`] unless packed with [`Packed::with_k_block`]).
        kc: usize,
        /// The packed pairs.
        data: Vec<u32>,
    },
    /// For [`Backend::Fallback`]: B rounded to bf16, as row-major f32 `K × N`.
    Rounded {
        /// K.
        k: usize,
        /// N.
        n: usize,
        /// The rounded values.
        data: Vec<f32>,
    },
}

/// A packed B borrowed whole or as a window ([`Packed::window`]): what [`gemm_ptr`] multiplies.
#[derive(Clone, Copy, Debug)]
pub struct PackedRef<'a> {
    backend: Backend,
    k: usize,
    n: usize,
    data: PackedData<'a>,
}

#[derive(Clone, Copy, Debug)]
enum PackedData<'a> {
    /// The panels of a packing whose K blocks hold `kc` pairs and `np` column panels.
    Panels { data: &'a [u32], kc: usize, np: usize },
    /// Row-major rounded values with row stride `ld`.
    Rounded { data: &'a [f32], ld: usize },
}

/// Column panels for `n` columns.
fn panels(n: usize) -> usize {
    n.div_ceil(NR)
}

impl Packed {
    /// Pack `b` (K×N) for `backend`.
    pub fn new(b: MatRef, backend: Backend) -> Self {
        Self::with_k_block(b, backend, KCP)
    }

    /// Pack `b` in K blocks of `kc` pairs (`1..=KCP`; the bigger, the fewer loads and stores of C),
    /// so that [`Self::window`] can take any whole number of blocks.
    pub fn with_k_block(b: MatRef, backend: Backend, kc: usize) -> Self {
        assert!((1..=KCP).contains(&kc), "gemm: K block of {kc} pairs (1..={KCP})");
        let (k, n) = (b.rows, b.cols);
        match backend {
            Backend::Fallback => {
                let mut data = vec![0f32; k * n];
                data.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| {
                    for (c, o) in row.iter_mut().enumerate() {
                        *o = f32::from_bits((b.bits(r, c) as u32) << 16);
                    }
                });
                Packed::Rounded { k, n, data }
            }
            Backend::Avx512Bf16 | Backend::Amx => {
                let (kp, np) = (k.div_ceil(2), panels(n));
                // Every panel is written whole, zero padding included (`pack_b_panel`).
                let mut data = super::output_buffer(kp * np * NR);
                // One rayon task per K block: each block is a contiguous run of the buffer.
                data.par_chunks_mut((kc * np * NR).max(1)).enumerate().for_each(|(kb, block)| {
                    let p0 = kb * kc;
                    let bp = block.len() / (np * NR);
                    for j in 0..np {
                        let panel = &mut block[j * bp * NR..(j + 1) * bp * NR];
                        pack_b_panel(&b, p0, bp, j * NR, panel);
                    }
                });
                Packed::Panels { backend, k, n, kc, data }
            }
        }
    }

    /// All of it, borrowed.
    pub fn as_ref(&self) -> PackedRef<'_> {
        self.window(self.k(), self.n()).expect("the whole packing is a window of itself")
    }

    /// The top-left `k × n` of B, without packing again, where the layout allows: any window of
    /// the fallback's rows; for the panels, the first `k` rows when they are whole K blocks (or
    /// all of K), and the first `n` columns when K is one block. `None` otherwise.
    pub fn window(&self, k: usize, n: usize) -> Option<PackedRef<'_>> {
        if k > self.k() || n > self.n() {
            return None;
        }
        let data = match self {
            Packed::Rounded { n: ld, data, .. } => PackedData::Rounded { data, ld: *ld },
            Packed::Panels { k: full_k, n: full_n, kc, data, .. } => {
                let whole_blocks = k == *full_k || k.is_multiple_of(2 * kc);
                let one_block = full_k.div_ceil(2) <= *kc;
                if !whole_blocks || (n != *full_n && !one_block) {
                    return None;
                }
                // Block `kb` starts at `kb · kc · panels(full_n) · NR`: the same for the window
                // when N is whole, and only block 0 exists when N is cut.
                PackedData::Panels { data, kc: *kc, np: panels(*full_n) }
            }
        };
        Some(PackedRef { backend: self.backend(), k, n, data })
    }

    /// K (rows of B).
    pub fn k(&self) -> usize {
        match self {
            Packed::Panels { k, .. } | Packed::Rounded { k, .. } => *k,
        }
    }

    /// N (columns of B).
    pub fn n(&self) -> usize {
        match self {
            Packed::Panels { n, .. } | Packed::Rounded { n, .. } => *n,
        }
    }

    /// The backend this was packed for.
    pub fn backend(&self) -> Backend {
        match self {
            Packed::Panels { backend, .. } => *backend,
            Packed::Rounded { .. } => Backend::Fallback,
        }
    }
}

/// Pack the B panel of columns `c0..c0+NR`, pairs `p0..p0+bp`, into `out` (`bp × NR`), writing all
/// of it (columns past N and a missing last K row as zeros).
fn pack_b_panel(b: &MatRef, p0: usize, bp: usize, c0: usize, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(d) = b.f32_data() {
        // SAFETY: only packed for `Backend::Avx512Bf16`, which `Backend::detect` returns only when
        // the CPU has avx512f + avx512bf16; `MatRef::new` checked the bounds of the view.
        if b.cs == 1 {
            unsafe { avx512::pack_b_panel_rows(d, b.rows, b.cols, b.rs, p0, bp, c0, out) };
            return;
        }
        // A transposed weight (the forward's `Wᵀ`): each column's K run is contiguous.
        if b.rs == 1 {
            unsafe { avx512::pack_b_panel_cols(d, b.rows, b.cols, b.cs, p0, bp, c0, out) };
            return;
        }
    }
    for p in 0..bp {
        for c in 0..NR {
            out[p * NR + c] = if c0 + c < b.cols { b.pair_along_rows(p0 + p, c0 + c) } else { 0 };
        }
    }
}

/// Pack rows `m0..m0+rows` of A, pairs `p0..p0+bp`, into `MR`-row panels (`[panel][pair][MR]`).
fn pack_a(a: &MatRef, m0: usize, rows: usize, p0: usize, bp: usize, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(d) = a.f32_data() {
        // SAFETY: as in `pack_b_panel`; the view's bounds were checked by `MatRef::new`.
        if a.cs == 1 {
            unsafe { avx512::pack_a_row_major(d, a.cols, a.rs, m0, rows, p0, bp, out) };
            return;
        }
        if a.rs == 1 {
            unsafe { avx512::pack_a_col_major(d, a.rows, a.cols, a.cs, m0, rows, p0, bp, out) };
            return;
        }
    }
    for (i, panel) in out.chunks_mut(bp * MR).take(rows.div_ceil(MR)).enumerate() {
        for p in 0..bp {
            for r in 0..MR {
                let m = i * MR + r;
                panel[p * MR + r] = if m < rows { a.pair_along_cols(m0 + m, p0 + p) } else { 0 };
            }
        }
    }
}

/// `C = A · B` (or `C += A · B` with `accumulate`), C row-major `M × N` with row stride `ldc`,
/// operands rounded to bf16 and products summed in f32. `b` must have been packed for the
/// backend this CPU supports (as [`Backend::detect`] says) or for [`Backend::Fallback`].
///
/// # Panics
/// On mismatched shapes, a C too small, or a packing for a backend this CPU lacks.
pub fn gemm(a: MatRef, b: &Packed, c: &mut [f32], ldc: usize, accumulate: bool) {
    let (m, n) = (a.rows, b.n());
    assert!(
        m == 0 || n == 0 || (ldc >= n && c.len() >= (m - 1) * ldc + n),
        "gemm: C ({} elements, ldc {ldc}) is too small for {m}x{n}",
        c.len()
    );
    // SAFETY: C's extent was checked above, and the `&mut` borrow makes it this call's alone.
    unsafe { gemm_ptr(a, b.as_ref(), SyncPtr(c.as_mut_ptr()), ldc, accumulate) }
}

/// [`gemm`] into a C given by pointer: for callers whose parallel tasks each own a strided block
/// of one buffer (the attention's heads), which no `&mut` slice can express.
///
/// # Safety
/// `c` must be valid for reads and writes of the `M × N` block with row stride `ldc`, and nothing
/// else may access that block during the call.
///
/// # Panics
/// As [`gemm`], except that C's extent is the caller's to guarantee.
pub(crate) unsafe fn gemm_ptr(a: MatRef, b: PackedRef, c: SyncPtr, ldc: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert_eq!(k, b.k, "gemm: A is {m}x{k} but B has {} rows", b.k);
    assert!(ldc >= n, "gemm: ldc {ldc} < N {n}");
    if m == 0 || n == 0 {
        return;
    }
    match (b.backend, b.data) {
        (_, PackedData::Rounded { data, ld }) => gemm_fallback(a, data, ld, n, c, ldc, accumulate),
        (Backend::Amx, PackedData::Panels { data, kc, np }) => {
            assert!(has_amx_bf16(), "gemm: B was packed for AMX, which this CPU (or OS) lacks");
            gemm_amx(a, Panels { data, kc, np }, n, c, ldc, accumulate)
        }
        (_, PackedData::Panels { data, kc, np }) => {
            assert!(has_avx512_bf16(), "gemm: B was packed for avx512_bf16, which this CPU lacks");
            gemm_panels(a, Panels { data, kc, np }, n, c, ldc, accumulate)
        }
    }
}

/// Zero the `m × n` block of C (an empty K), unless accumulating.
///
/// # Safety
/// As for [`gemm_ptr`]'s C.
unsafe fn zero_c(m: usize, n: usize, c: SyncPtr, ldc: usize, accumulate: bool) {
    if !accumulate {
        for r in 0..m {
            std::slice::from_raw_parts_mut(c.get().add(r * ldc), n).fill(0.0);
        }
    }
}

/// # Safety
/// As for [`gemm_ptr`]'s C.
unsafe fn gemm_fallback(a: MatRef, b: &[f32], ldb: usize, n: usize, c: SyncPtr, ldc: usize, accumulate: bool) {
    let (m, k) = (a.rows, a.cols);
    if k == 0 {
        zero_c(m, n, c, ldc, accumulate);
        return;
    }
    let mut ar = vec![0f32; m * k];
    ar.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
        for (j, o) in row.iter_mut().enumerate() {
            *o = f32::from_bits((a.bits(r, j) as u32) << 16);
        }
    });
    // SAFETY: the shapes were checked by `gemm_ptr`, C's extent by its caller; the buffers outlive
    // the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.get(),
            1,
            ldc as isize,
            accumulate,
            ar.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// The panels of a packed B as the kernels walk them.
#[derive(Clone, Copy)]
struct Panels<'a> {
    data: &'a [u32],
    /// Pairs per K block.
    kc: usize,
    /// Column panels per K block in the packing (more than a window's when N was cut).
    np: usize,
}

impl<'a> Panels<'a> {
    /// The K block starting at pair `p0`: its panels one after the other.
    fn block(&self, p0: usize) -> &'a [u32] {
        &self.data[p0 * self.np * NR..]
    }
}

/// The rows `m0..m0 + rows` of C and the B panels `j0..j1` one task of a panel GEMM owns.
#[derive(Clone, Copy)]
struct Task {
    m0: usize,
    rows: usize,
    j0: usize,
    j1: usize,
}

/// Run `body` in parallel on the tasks of `C (M × N) (+)= A · B` over `kp` K pairs: `mc`-row
/// blocks of C, split along N too when there are too few rows to feed every thread (the weight
/// gradient of a small layer, decoding). An empty K only zeroes C (unless accumulating).
///
/// # Safety
/// As for [`gemm_ptr`]'s C.
#[allow(clippy::too_many_arguments)]
unsafe fn par_tasks(
    m: usize,
    n: usize,
    kp: usize,
    mc: usize,
    cp: SyncPtr,
    ldc: usize,
    accumulate: bool,
    body: impl Fn(Task, SyncPtr) + Send + Sync,
) {
    if kp == 0 {
        zero_c(m, n, cp, ldc, accumulate);
        return;
    }
    let np = panels(n);
    let mblocks = m.div_ceil(mc);
    let groups = (2 * rayon::current_num_threads()).div_ceil(mblocks).clamp(1, np);
    let per_group = np.div_ceil(groups);
    let groups = np.div_ceil(per_group);
    (0..mblocks * groups).into_par_iter().for_each(|task| {
        let (mb, g) = (task / groups, task % groups);
        let (m0, rows) = (mb * mc, mc.min(m - mb * mc));
        let (j0, j1) = (g * per_group, ((g + 1) * per_group).min(np));
        body(Task { m0, rows, j0, j1 }, cp)
    });
}

/// # Safety
/// As for [`gemm_ptr`]'s C.
unsafe fn gemm_panels(a: MatRef, b: Panels, n: usize, c: SyncPtr, ldc: usize, accumulate: bool) {
    let (m, k) = (a.rows, a.cols);
    let kp = k.div_ceil(2);
    par_tasks(m, n, kp, MC, c, ldc, accumulate, |Task { m0, rows, j0, j1 }, cp| {
        let mut abuf = vec![0u32; rows.div_ceil(MR) * MR * b.kc];
        for kb in 0..kp.div_ceil(b.kc) {
            let p0 = kb * b.kc;
            let bp = b.kc.min(kp - p0);
            pack_a(&a, m0, rows, p0, bp, &mut abuf);
            let block = b.block(p0);
            for j in j0..j1 {
                let bpanel = &block[j * bp * NR..(j + 1) * bp * NR];
                let nr = NR.min(n - j * NR);
                for (i, apanel) in abuf.chunks(bp * MR).take(rows.div_ceil(MR)).enumerate() {
                    let mr = MR.min(rows - i * MR);
                    // SAFETY: the tile (rows m0+i*MR.., mr; columns j*NR.., nr) lies inside C
                    // (checked by `gemm`) and belongs to this task alone; the CPU has the
                    // features (checked by `gemm`).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let cptr = cp.get().add((m0 + i * MR) * ldc + j * NR);
                        avx512::kernel(bp, apanel.as_ptr(), bpanel.as_ptr(), cptr, ldc, mr, nr, accumulate || kb > 0);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (cp, apanel, bpanel, mr, nr);
                }
            }
        }
    });
}

/// Rows of C one AMX task owns (a multiple of the kernel's 32).
const MC_AMX: usize = 64;

/// The AMX path: tasks as in [`gemm_panels`], each packing its rows of A per K block into
/// zero-padded whole tiles and running the 32×32 tile kernel down every B panel it owns.
///
/// # Safety
/// As for [`gemm_ptr`]'s C.
unsafe fn gemm_amx(a: MatRef, b: Panels, n: usize, c: SyncPtr, ldc: usize, accumulate: bool) {
    let (m, k) = (a.rows, a.cols);
    let kp = k.div_ceil(2);
    par_tasks(m, n, kp, MC_AMX, c, ldc, accumulate, |Task { m0, rows, j0, j1 }, cp| {
        let tiles = rows.div_ceil(amx::M);
        // A block: `tiles × 32` rows of `KCP` pairs (a whole number of 16-pair tiles), in this
        // thread's buffer: `pack_a_rows` writes every element a tile loads, so the buffer needs
        // no zeroing, and an allocation plus memset per task was 15 % of the attention's
        // small GEMMs.
        A_BUF.with(|buf| {
            let mut fresh = Vec::new();
            let mut held = buf.try_borrow_mut();
            let abuf: &mut Vec<u32> = match held.as_deref_mut() {
                Ok(v) => v,
                Err(_) => &mut fresh,
            };
            let need = tiles * amx::M * b.kc.div_ceil(amx::PAIRS) * amx::PAIRS;
            if abuf.len() < need {
                abuf.resize(need, 0);
            }
            // The last 16 pair rows of a panel when a K block is not a whole number of them, zero padded
            // (reading them in place would run past the panel).
            let mut btail = [0u32; amx::PAIRS * NR];
            let mut ctmp = [0f32; amx::M * NR];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: this CPU has AMX and the OS granted it (checked by `gemm`).
            unsafe {
                amx::configure()
            };
            for kb in 0..kp.div_ceil(b.kc) {
                let p0 = kb * b.kc;
                let bp = b.kc.min(kp - p0);
                let (full, tail) = (bp / amx::PAIRS, bp % amx::PAIRS);
                let lda = bp.div_ceil(amx::PAIRS) * amx::PAIRS;
                pack_a_rows(&a, m0, rows, tiles * amx::M, p0, bp, lda, abuf);
                let block = b.block(p0);
                for j in j0..j1 {
                    let bpanel = &block[j * bp * NR..(j + 1) * bp * NR];
                    if tail > 0 {
                        btail[..tail * NR].copy_from_slice(&bpanel[full * amx::PAIRS * NR..]);
                        btail[tail * NR..].fill(0);
                    }
                    let nr = NR.min(n - j * NR);
                    for t in 0..tiles {
                        let mr = amx::M.min(rows - t * amx::M);
                        let load = accumulate || kb > 0;
                        let apanel = abuf[t * amx::M * lda..].as_ptr();
                        let tail_b = if tail > 0 { Some(btail.as_ptr()) } else { None };
                        // SAFETY: A holds `M × lda` pairs from `apanel`, B `full` tiles from `bpanel`
                        // (and the padded tail); the C block (rows m0+t*M.., columns j*NR..) lies
                        // inside C (checked by `gemm`) and belongs to this task alone; when it is cut
                        // by C's edge, the kernel works on `ctmp` and only the inside is copied back.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            let cptr = cp.get().add((m0 + t * amx::M) * ldc + j * NR);
                            if mr == amx::M && nr == NR {
                                amx::kernel(full, apanel, lda, bpanel.as_ptr(), tail_b, cptr, ldc, load);
                            } else {
                                for r in 0..amx::M {
                                    let dst = &mut ctmp[r * NR..(r + 1) * NR];
                                    dst.fill(0.0);
                                    if load && r < mr {
                                        std::ptr::copy_nonoverlapping(cptr.add(r * ldc), dst.as_mut_ptr(), nr);
                                    }
                                }
                                amx::kernel(full, apanel, lda, bpanel.as_ptr(), tail_b, ctmp.as_mut_ptr(), NR, load);
                                for r in 0..mr {
                                    std::ptr::copy_nonoverlapping(ctmp[r * NR..].as_ptr(), cptr.add(r * ldc), nr);
                                }
                            }
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (cp, apanel, tail_b, mr, nr, load, &mut ctmp, full);
                    }
                }
            }
        });
    });
}

thread_local! {
    /// Each thread's packed-A buffer for [`gemm_amx`] (grown, never shrunk or zeroed).
    static A_BUF: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Pack rows `m0..m0+rows` of A, pairs `p0..p0+bp`, row-major into `out` (`padded_rows × lda`
/// u32, one u32 per K pair): what an AMX A tile loads. Rows past `rows` and pairs past `bp` are
/// zero, so whole tiles multiply the padding by zero.
#[allow(clippy::too_many_arguments)]
fn pack_a_rows(
    a: &MatRef,
    m0: usize,
    rows: usize,
    padded_rows: usize,
    p0: usize,
    bp: usize,
    lda: usize,
    out: &mut [u32],
) {
    let out = &mut out[..padded_rows * lda];
    #[cfg(target_arch = "x86_64")]
    if let Some(d) = a.f32_data() {
        // SAFETY: only called for `Backend::Amx`, whose CPUs have avx512f + avx512bf16 (checked by
        // `has_amx_bf16`); the view's bounds were checked by `MatRef::new`.
        if a.cs == 1 {
            unsafe { avx512::pack_a_rows_row_major(d, a.cols, a.rs, m0, rows, p0, bp, lda, out) };
            out[rows * lda..].fill(0);
            return;
        }
        if a.rs == 1 {
            unsafe { avx512::pack_a_rows_col_major(d, a.cols, a.cs, m0, rows, p0, bp, lda, out) };
            out[rows * lda..].fill(0);
            return;
        }
    }
    for (r, row) in out.chunks_mut(lda).enumerate() {
        for (p, o) in row.iter_mut().enumerate() {
            *o = if r < rows && p < bp { a.pair_along_cols(m0 + r, p0 + p) } else { 0 };
        }
    }
}

mod amx {
    //! The AMX tile kernel. Every function needs AMX-TILE and AMX-BF16 granted to the process
    //! ([`crate::cpu::has_amx_bf16`]; callers check). The tile registers are not known to the
    //! compiler; nothing else in the process uses them, so their contents live from one `asm!`
    //! to the next within [`kernel`] and the configuration from [`configure`] to the task's end.

    #[cfg(target_arch = "x86_64")]
    use {super::NR, std::arch::asm};

    /// Rows of C (and of A) one kernel call computes: two tiles of 16.
    pub(super) const M: usize = 32;
    /// K pairs one A/B tile holds (64 bytes of bf16 per row).
    pub(super) const PAIRS: usize = 16;

    /// The tile configuration (palette 1): tiles 0–3 the 16×16 f32 C tiles, 4–5 the A tiles
    /// (16 rows × 16 pairs), 6–7 the B tiles (16 pair rows × 16 columns); all 16 rows of 64 bytes.
    #[cfg(target_arch = "x86_64")]
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Load the tile configuration on this thread (each rayon worker runs it before its tiles).
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn configure() {
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
    }

    /// `C[32×32] (+)= A · B`: A is 32 rows of `lda` u32 pairs from `a`, of which `full` tiles of
    /// 16 pairs (and one more when `tail` is given) are used; B is `full` 16-pair-row tiles of the
    /// `NR`-wide panel at `b`, then the padded `tail` tile. C has row stride `ldc` (f32 elements);
    /// `load` adds to what C holds instead of overwriting it.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel(
        full: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        tail: Option<*const u32>,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let sc = ldc * 4;
        let (c1, c2) = (c.add(16), c.add(16 * ldc));
        let c3 = c2.add(16);
        if load {
            asm!(
                "tileloadd tmm0, [{c} + {sc}*1]",
                "tileloadd tmm1, [{c1} + {sc}*1]",
                "tileloadd tmm2, [{c2} + {sc}*1]",
                "tileloadd tmm3, [{c3} + {sc}*1]",
                c = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, sc = in(reg) sc,
                options(nostack, readonly),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        let sa = lda * 4;
        let a2 = a.add(16 * lda);
        if full > 0 {
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{a2} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 64",
                "add {a2}, 64",
                "add {b}, {bstep}",
                "dec {n}",
                "jnz 2b",
                a = inout(reg) a => _, a2 = inout(reg) a2 => _, b = inout(reg) b => _,
                sa = in(reg) sa, sb = in(reg) NR * 4, bstep = in(reg) PAIRS * NR * 4,
                n = inout(reg) full => _,
                options(nostack, readonly),
            );
        }
        if let Some(bt) = tail {
            let (at, at2) = (a.add(full * PAIRS), a2.add(full * PAIRS));
            asm!(
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{a2} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) at, a2 = in(reg) at2, b = in(reg) bt, sa = in(reg) sa, sb = in(reg) NR * 4,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, sc = in(reg) sc,
            options(nostack),
        );
    }
}

/// `C = A · B` for a B used once: packs it for this CPU and multiplies.
pub fn matmul(a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, accumulate: bool) {
    gemm(a, &Packed::new(b, Backend::detect()), c, ldc, accumulate)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The avx512_bf16 kernels. Every function needs avx512f + avx512bf16 (callers check).

    use super::{KCP, MR, NR};
    use std::arch::x86_64::*;

    /// A mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Pairs `(lo[i], hi[i])` as 16 u32 (lo in the low half), both rounded to bf16.
    #[inline(always)]
    unsafe fn interleave(lo: __m512, hi: __m512) -> __m512i {
        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(lo));
        let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(hi));
        _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)))
    }

    /// B panel from a matrix whose columns are contiguous (`cs == 1`): rows `2p` and `2p + 1`
    /// load as vectors and interleave.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pack_b_panel_rows(
        d: &[f32],
        rows: usize,
        cols: usize,
        rs: usize,
        p0: usize,
        bp: usize,
        c0: usize,
        out: &mut [u32],
    ) {
        let base = d.as_ptr();
        for p in 0..bp {
            let k = 2 * (p0 + p);
            for v in 0..NR / 16 {
                let c = c0 + v * 16;
                let mask = lanes(cols.saturating_sub(c));
                let lo =
                    if mask != 0 { _mm512_maskz_loadu_ps(mask, base.add(k * rs + c)) } else { _mm512_setzero_ps() };
                let hi = if mask != 0 && k + 1 < rows {
                    _mm512_maskz_loadu_ps(mask, base.add((k + 1) * rs + c))
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_storeu_si512(out.as_mut_ptr().add(p * NR + v * 16) as *mut _, interleave(lo, hi));
            }
        }
    }

    /// B panel from a matrix whose rows are contiguous (`rs == 1`): each column's K run converts
    /// as vectors into pairs, scattered down the panel's column.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pack_b_panel_cols(
        d: &[f32],
        rows: usize,
        cols: usize,
        cs: usize,
        p0: usize,
        bp: usize,
        c0: usize,
        out: &mut [u32],
    ) {
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(NR as i32),
        );
        let k0 = 2 * p0;
        let kn = (rows - k0).min(2 * bp);
        for c in 0..NR {
            if c0 + c >= cols {
                for p in 0..bp {
                    out[p * NR + c] = 0;
                }
                continue;
            }
            let col = d.as_ptr().add((c0 + c) * cs + k0);
            let mut k = 0;
            while k < kn {
                let lo = _mm512_maskz_loadu_ps(lanes(kn - k), col.add(k));
                let hi = if kn > k + 16 {
                    _mm512_maskz_loadu_ps(lanes(kn - k - 16), col.add(k + 16))
                } else {
                    _mm512_setzero_ps()
                };
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let pairs = (bp - k / 2).min(16);
                _mm512_mask_i32scatter_epi32::<4>(out.as_mut_ptr().add(k / 2 * NR + c) as *mut _, lanes(pairs), idx, v);
                k += 32;
            }
        }
    }

    /// A panels from a row-major matrix (`cs == 1`): each row's K run converts as vectors into
    /// pairs, which then spread to the pair-major panel.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pack_a_row_major(
        d: &[f32],
        cols: usize,
        rs: usize,
        m0: usize,
        rows: usize,
        p0: usize,
        bp: usize,
        out: &mut [u32],
    ) {
        let mut tmp = [0u32; KCP];
        let k0 = 2 * p0;
        let kn = (cols - k0).min(2 * bp);
        for (i, panel) in out.chunks_mut(bp * MR).take(rows.div_ceil(MR)).enumerate() {
            for r in 0..MR {
                let m = i * MR + r;
                if m >= rows {
                    for p in 0..bp {
                        panel[p * MR + r] = 0;
                    }
                    continue;
                }
                let row = d.as_ptr().add((m0 + m) * rs + k0);
                let mut k = 0;
                while k < kn {
                    let lo = _mm512_maskz_loadu_ps(lanes(kn - k), row.add(k));
                    let hi = if kn > k + 16 {
                        _mm512_maskz_loadu_ps(lanes(kn - k - 16), row.add(k + 16))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(tmp.as_mut_ptr().add(k / 2) as *mut _, v);
                    k += 32;
                }
                for p in 0..bp {
                    panel[p * MR + r] = tmp[p];
                }
            }
        }
    }

    /// A panels from a column-major matrix (`rs == 1`, the transposed gradient of a weight
    /// gradient): K columns `2p` and `2p + 1` load `MR` rows as vectors and interleave.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pack_a_col_major(
        d: &[f32],
        all_rows: usize,
        cols: usize,
        cs: usize,
        m0: usize,
        rows: usize,
        p0: usize,
        bp: usize,
        out: &mut [u32],
    ) {
        debug_assert!(m0 + rows <= all_rows);
        let base = d.as_ptr();
        for (i, panel) in out.chunks_mut(bp * MR).take(rows.div_ceil(MR)).enumerate() {
            let mask = lanes((rows - i * MR).min(MR));
            let m = m0 + i * MR;
            for p in 0..bp {
                let k = 2 * (p0 + p);
                let lo = _mm512_maskz_loadu_ps(mask, base.add(k * cs + m));
                let hi = if k + 1 < cols {
                    _mm512_maskz_loadu_ps(mask, base.add((k + 1) * cs + m))
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_mask_storeu_epi32(panel.as_mut_ptr().add(p * MR) as *mut i32, lanes(MR), interleave(lo, hi));
            }
        }
    }

    /// AMX A rows from a row-major matrix (`cs == 1`): each row's K run converts as vectors into
    /// pairs, stored in place; pairs `bp..lda` are zero.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pack_a_rows_row_major(
        d: &[f32],
        cols: usize,
        rs: usize,
        m0: usize,
        rows: usize,
        p0: usize,
        bp: usize,
        lda: usize,
        out: &mut [u32],
    ) {
        let k0 = 2 * p0;
        let kn = (cols - k0).min(2 * bp);
        for r in 0..rows {
            let src = d.as_ptr().add((m0 + r) * rs + k0);
            let dst = out.as_mut_ptr().add(r * lda);
            let mut k = 0;
            // `lda` is a multiple of 16 pairs, so every 32-value step fills whole vectors.
            while k < 2 * lda {
                let lo = if k < kn { _mm512_maskz_loadu_ps(lanes(kn - k), src.add(k)) } else { _mm512_setzero_ps() };
                let hi = if kn > k + 16 {
                    _mm512_maskz_loadu_ps(lanes(kn - k - 16), src.add(k + 16))
                } else {
                    _mm512_setzero_ps()
                };
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.add(k / 2) as *mut _, v);
                k += 32;
            }
        }
    }

    /// AMX A rows from a column-major matrix (`rs == 1`, the transposed gradient of a weight
    /// gradient): K columns `2p` and `2p + 1` load 16 rows as vectors, interleave into pairs and
    /// scatter down the rows; pairs `bp..lda` are zero.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pack_a_rows_col_major(
        d: &[f32],
        cols: usize,
        cs: usize,
        m0: usize,
        rows: usize,
        p0: usize,
        bp: usize,
        lda: usize,
        out: &mut [u32],
    ) {
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(lda as i32),
        );
        let base = d.as_ptr();
        for r0 in (0..rows).step_by(16) {
            let mask = lanes(rows - r0);
            let m = m0 + r0;
            let dst = out.as_mut_ptr().add(r0 * lda);
            for p in 0..lda {
                let v = if p < bp {
                    let k = 2 * (p0 + p);
                    let lo = _mm512_maskz_loadu_ps(mask, base.add(k * cs + m));
                    let hi = if k + 1 < cols {
                        _mm512_maskz_loadu_ps(mask, base.add((k + 1) * cs + m))
                    } else {
                        _mm512_setzero_ps()
                    };
                    interleave(lo, hi)
                } else {
                    _mm512_setzero_si512()
                };
                _mm512_mask_i32scatter_epi32::<4>(dst.add(p) as *mut _, mask, idx, v);
            }
        }
    }

    /// The `MR × NR` micro-kernel: `C[..mr, ..nr] (+)= A_panel · B_panel` over `pairs` K pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        accumulate: bool,
    ) {
        const NV: usize = NR / 16;
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..pairs {
            let bv: [__m512bh; NV] =
                std::array::from_fn(|v| std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + v * 16) as *const _)));
            for (r, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
                for (x, bv) in row.iter_mut().zip(&bv) {
                    *x = _mm512_dpbf16_ps(*x, av, *bv);
                }
            }
        }
        let masks = [lanes(nr), lanes(nr.saturating_sub(16))];
        for (r, row) in acc.iter().enumerate().take(mr) {
            let cr = c.add(r * ldc);
            for (v, (&x, &mask)) in row.iter().zip(&masks).enumerate() {
                if mask == 0 {
                    continue;
                }
                let x = if accumulate { _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, cr.add(v * 16))) } else { x };
                _mm512_mask_storeu_ps(cr.add(v * 16), mask, x);
            }
        }
    }
}
