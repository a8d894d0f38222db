//! The NCCL collective (cargo feature `nccl`): data-parallel ranks on CUDA devices sum their
//! gradients with NCCL on the GPUs, so they never cross the host. Everything else goes through
//! the [`TcpCollective`] that joined the ranks: NCCL's unique id (rank 0 makes it and broadcasts
//! its 128 bytes), host buffers (the start-of-training broadcast of rank 0's weights, barriers),
//! and a barrier before every NCCL all-reduce, so a rank that died is named by the TCP
//! collective's errors before NCCL could wait on it.
//!
//! NCCL itself has no timeout: an all-reduce that a rank never joins spins on the GPU. This rank
//! therefore waits for the operation's completion event with the collective's timeout
//! (`MMRUN_DIST_TIMEOUT_SECS`) and fails with [`DistError::Nccl`] when it passes; dropping the
//! communicator then aborts it (`ncclCommAbort`), so the process can exit.
//!
//! Every rank gets the same sum: NCCL's ring and tree all-reduces compute each element once and
//! send that value to every rank, which keeps the replicas' weights identical as the TCP
//! collective's rank-0 sum does.
//!
//! **Status:** type-checked by `scripts/check-cuda.sh` (`cargo check --features nccl`), not yet
//! run on GPUs: no session so far had two GPUs. `scripts/gpu-check.sh` runs the two-rank smoke
//! test when a machine has them.

use super::{secs, Collective, DistError, TcpCollective};
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A communicator that can move between threads. NCCL communicators are not thread-safe, so
/// every use goes through [`NcclCollective::comm`]'s mutex: never two calls at once.
struct SendComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; the mutex that
// owns it serialises every use.
unsafe impl Send for SendComm {}

/// Gradients through NCCL, the rest through TCP (see the module doc).
pub struct NcclCollective {
    tcp: TcpCollective,
    id: Id,
    /// Made at the first all-reduce, on the stream of the device the gradients live on (every
    /// rank makes its first all-reduce at the same step, and creating a communicator is a
    /// collective call).
    comm: Mutex<Option<SendComm>>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclCollective(rank {} of {})", self.tcp.rank, self.tcp.world)
    }
}

impl NcclCollective {
    /// Share NCCL's unique id over `tcp` (rank 0 makes it), keeping `tcp` for everything else.
    pub fn new(tcp: TcpCollective) -> Result<Self, DistError> {
        let rank = tcp.rank;
        let mut words = [0f32; 32];
        if rank == 0 {
            let id = Id::new().map_err(|e| DistError::Nccl {
                rank,
                what: format!(
                    "could not create a unique id ({e:?}): is libnccl installed and a GPU visible? Build without \
                     `--features nccl` to sum gradients over TCP instead"
                ),
            })?;
            for (w, b) in words.iter_mut().zip(id.internal().chunks_exact(4)) {
                *w = f32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
            }
        }
        // The broadcast copies bytes: the id's bits arrive unchanged even where they spell a NaN.
        tcp.broadcast(&mut words)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(words.iter().flat_map(|w| w.to_le_bytes())) {
            *c = b as std::ffi::c_char;
        }
        Ok(Self { tcp, id: Id::uninit(internal), comm: Mutex::new(None) })
    }

    fn nccl(&self, what: String) -> DistError {
        DistError::Nccl { rank: self.tcp.rank, what }
    }

    /// Sum `t` (an f32 CUDA tensor, contiguous) over every rank with NCCL.
    fn all_reduce_on_device(&self, t: &Tensor, dev: &candle_core::CudaDevice) -> Result<Tensor, DistError> {
        let rank = self.tcp.rank;
        let tensor = |source| DistError::Tensor { rank, source };
        // A rank that died or hung is named here, with the TCP collective's timeout.
        self.tcp.barrier()?;
        let mut guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let comm = Comm::from_rank(dev.cuda_stream(), rank, self.tcp.world, self.id)
                .map_err(|e| self.nccl(format!("could not join the communicator ({e:?})")))?;
            *guard = Some(SendComm(comm));
        }
        let comm = &guard.as_ref().expect("made above").0;
        let flat = t.to_dtype(DType::F32).and_then(|f| f.flatten_all()?.contiguous()).map_err(tensor)?;
        let summed = flat.apply_op1_no_bwd(&AllReduce { comm }).map_err(tensor)?;
        self.wait(dev)?;
        summed.reshape(t.shape()).map_err(tensor)
    }

    /// Wait for the work queued on `dev`'s stream (the all-reduce) to finish, at most the
    /// collective's timeout.
    fn wait(&self, dev: &candle_core::CudaDevice) -> Result<(), DistError> {
        let done = dev
            .cuda_stream()
            .record_event(None)
            .map_err(|e| self.nccl(format!("could not record the all-reduce's completion ({e:?})")))?;
        let timeout = self.tcp.timeout;
        let deadline = Instant::now() + timeout;
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(50)),
                Ok(false) => {
                    return Err(self.nccl(format!(
                        "all-reduce did not finish within {} s: another rank died or hung inside it (see the \
                         ranks' logs); raise MMRUN_DIST_TIMEOUT_SECS if it is only slow",
                        secs(timeout)
                    )))
                }
                Err(e) => return Err(self.nccl(format!("all-reduce failed on the GPU ({e:?})"))),
            }
        }
    }
}

/// NCCL's sum as a candle op, so the result is a tensor on the same device.
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let src = s.as_cuda_slice::<f32>()?;
        let Some((lo, hi)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let src = src.slice(lo..hi);
        let mut dst = s.device.alloc_zeros::<f32>(hi - lo)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, s.device.clone()), l.shape().clone()))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.tcp.rank
    }

    fn world_size(&self) -> usize {
        self.tcp.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.tcp.all_reduce_sum(buf)
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.tcp.broadcast(buf)
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, DistError> {
        match t.device() {
            Device::Cuda(dev) => self.all_reduce_on_device(t, dev),
            _ => super::all_reduce_through_host(self, t),
        }
    }
}
