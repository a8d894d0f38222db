//! Collectives for data-parallel training: the [`Collective`] trait the training loop talks to,
//! and [`TcpCollective`], its implementation over TCP (loopback on one machine, or a cluster's
//! network), so the arithmetic of several ranks is the same on a laptop as in CI.
//!
//! The TCP collective is a star: every rank keeps one connection to rank 0, which sums the
//! buffers in rank order and sends the result back. Every rank therefore ends a step with
//! bit-identical gradients (the sum is done once, in one order), which keeps the replicas' weights
//! identical without ever comparing them. Rank 0 moves `world_size` buffers per call; for the small
//! models and few CPU ranks this serves, that is far from the bottleneck.
//!
//! Nothing here waits forever: every receive has a timeout, and an error names the rank that did
//! not answer and where its log is.

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The default for how long a rank waits for another before giving up: generous, because the
/// first exchange waits for every rank to load its data and model (rank 0 may be tokenising the
/// dataset for all of them). `MMRUN_DIST_TIMEOUT_SECS` overrides it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// [`DEFAULT_TIMEOUT`], or `MMRUN_DIST_TIMEOUT_SECS` when set to a number of seconds.
pub fn timeout_from_env() -> Duration {
    std::env::var("MMRUN_DIST_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// What went wrong between ranks. Each variant names the rank at fault.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The peer closed its connection (its process exited or crashed).
    #[error("rank {rank} closed its connection: it died or stopped{}", log_hint(.log))]
    Died {
        /// The rank that went away.
        rank: usize,
        /// Its log, when known.
        log: Option<PathBuf>,
    },
    /// The peer sent nothing within the timeout.
    #[error(
        "rank {rank} sent nothing for {secs} s: it died or hung{}. Raise MMRUN_DIST_TIMEOUT_SECS if it is \
         only slow",
        log_hint(.log)
    )]
    Silent {
        /// The silent rank.
        rank: usize,
        /// The timeout, in seconds.
        secs: String,
        /// Its log, when known.
        log: Option<PathBuf>,
    },
    /// The ranks disagree about what they are doing (a different step or buffer): a bug or a
    /// stranger on the port.
    #[error("rank {rank} is out of step: {what}")]
    OutOfStep {
        /// The rank that sent the unexpected message.
        rank: usize,
        /// What was expected and what came.
        what: String,
    },
    /// Not every rank joined in time.
    #[error(
        "only {joined} of {world} ranks joined at {addr} within {secs} s (missing: {missing}); check that every \
         rank was started with the same MMRUN_MASTER_ADDR and world size"
    )]
    Rendezvous {
        /// The address ranks connect to.
        addr: String,
        /// Ranks joined, rank 0 included.
        joined: usize,
        /// The expected number of ranks.
        world: usize,
        /// The ranks that did not join.
        missing: String,
        /// The timeout, in seconds.
        secs: String,
    },
    /// Rank 0 could not be reached.
    #[error("rank {rank} could not reach rank 0 at {addr} within {secs} s: {source}")]
    Connect {
        /// The connecting rank.
        rank: usize,
        /// Rank 0's address.
        addr: String,
        /// The timeout, in seconds.
        secs: String,
        /// The last connection error.
        source: std::io::Error,
    },
    /// Any other socket error, with the peer it happened with.
    #[error("talking to rank {rank}: {source}")]
    Io {
        /// The peer.
        rank: usize,
        /// The socket error.
        source: std::io::Error,
    },
    /// Moving a buffer between this rank's device and the host (or reshaping it) failed.
    #[error("rank {rank}: copying a buffer for the exchange: {source}")]
    Tensor {
        /// This rank.
        rank: usize,
        /// candle's error.
        source: candle_core::Error,
    },
    /// NCCL failed, or its collective did not finish in time (a rank died or hung inside it).
    #[error("rank {rank}: NCCL {what}")]
    Nccl {
        /// The rank that saw it.
        rank: usize,
        /// What failed, and what to do.
        what: String,
    },
}

fn log_hint(log: &Option<PathBuf>) -> String {
    match log {
        Some(p) => format!("; see its log {}", p.display()),
        None => String::new(),
    }
}

/// The operations data-parallel training needs. Every rank must make the same calls in the same
/// order with buffers of the same length; a call returns when every rank has made it.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn world_size(&self) -> usize;
    /// Replace `buf` on every rank by the element-wise sum of every rank's `buf`. The result is
    /// bit-identical on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Replace `buf` on every rank by rank 0's.
    fn broadcast(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Return once every rank has called it.
    fn barrier(&self) -> Result<(), DistError> {
        self.all_reduce_sum(&mut [])
    }
    /// [`Self::all_reduce_sum`] of a tensor (any shape, any dtype; the sum is taken in f32), with
    /// the result on the tensor's device. The default copies it to the host and back around
    /// [`Self::all_reduce_sum`]; a collective that reduces on the device (NCCL) overrides it, so
    /// gradients on a GPU never leave it.
    fn all_reduce_sum_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor, DistError> {
        all_reduce_through_host(self, t)
    }
    /// [`Self::all_reduce_sum`] divided by the world size.
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_sum(buf)?;
        let n = self.world_size() as f32;
        buf.iter_mut().for_each(|x| *x /= n);
        Ok(())
    }
}

/// [`Collective::all_reduce_sum_tensor`] by a copy to the host, [`Collective::all_reduce_sum`]
/// and a copy back.
fn all_reduce_through_host<C: Collective + ?Sized>(
    c: &C,
    t: &candle_core::Tensor,
) -> Result<candle_core::Tensor, DistError> {
    let tensor = |source| DistError::Tensor { rank: c.rank(), source };
    let mut host =
        t.to_dtype(candle_core::DType::F32).and_then(|f| f.flatten_all()?.to_vec1::<f32>()).map_err(tensor)?;
    c.all_reduce_sum(&mut host)?;
    candle_core::Tensor::from_vec(host, t.shape(), t.device()).map_err(tensor)
}

/// The collective for ranks that `tcp` joined: [`NcclCollective`] when every rank computes on a
/// CUDA device (`cuda`) and this build has the `nccl` feature, else `tcp` itself (on CUDA without
/// NCCL, gradients then go through the host, with a warning). Every rank must pass the same
/// `cuda`: NCCL's set-up is itself an exchange.
pub fn for_devices(tcp: TcpCollective, cuda: bool) -> Result<std::sync::Arc<dyn Collective>, DistError> {
    #[cfg(feature = "nccl")]
    if cuda {
        return Ok(std::sync::Arc::new(NcclCollective::new(tcp)?));
    }
    if cuda && tcp.rank == 0 {
        tracing::warn!(
            "this mmrun was built without the `nccl` feature: the ranks' gradients are summed through the host \
             over TCP (correct, but slower than NCCL; build with `--features nccl` for multi-GPU training)"
        );
    }
    Ok(std::sync::Arc::new(tcp))
}

/// The one-rank collective: every operation is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
}

/// Where a rank finds its peers: rank, world size, rank 0's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    /// This process's rank.
    pub rank: usize,
    /// How many ranks take part.
    pub world_size: usize,
    /// Rank 0's `host:port`.
    pub master: String,
}

impl RankEnv {
    /// The rank from the environment: `MMRUN_RANK` / `MMRUN_WORLD_SIZE` (what mmrun sets for the
    /// ranks it starts), else Slurm's `SLURM_PROCID` / `SLURM_NTASKS` under `srun` when
    /// `MMRUN_MASTER_ADDR` is set too; rank 0's address from `MMRUN_MASTER_ADDR` (`host:port`).
    /// `None` when no world size above 1 is set.
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let num = |k: &str| -> Result<Option<usize>, String> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| format!("{k}={v:?} is not a number")),
            }
        };
        let (rank, world) = match (num("MMRUN_RANK")?, num("MMRUN_WORLD_SIZE")?) {
            (Some(r), Some(w)) => (r, w),
            // Slurm's numbers count only with a master address: `mmrun` run inside an allocation
            // of several tasks is not one of them.
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?, var("MMRUN_MASTER_ADDR")) {
                (Some(r), Some(w), Some(_)) => (r, w),
                _ => return Ok(None),
            },
            _ => return Err("set both MMRUN_RANK and MMRUN_WORLD_SIZE, or neither".into()),
        };
        if world <= 1 {
            return Ok(None);
        }
        if rank >= world {
            return Err(format!("rank {rank} is not below the world size {world}"));
        }
        let master = var("MMRUN_MASTER_ADDR").ok_or_else(|| {
            format!(
                "rank {rank} of {world} needs rank 0's address: set MMRUN_MASTER_ADDR=host:port (the same on every \
                 rank; rank 0 listens there)"
            )
        })?;
        Ok(Some(Self { rank, world_size: world, master }))
    }
}

/// Operation codes on the wire (a rank that sends another op than expected is out of step).
const OP_REDUCE: u8 = 1;
const OP_BROADCAST: u8 = 2;
const MAGIC: &[u8; 8] = b"MMRUNDP1";

/// The collective over TCP (see the module doc for the topology).
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: the connection to rank `i + 1` at `peers[i]`. Other ranks: one, to rank 0.
    peers: Mutex<Vec<TcpStream>>,
    timeout: Duration,
    /// The log of each rank, named in errors about it.
    logs: BTreeMap<usize, PathBuf>,
}

impl std::fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpCollective(rank {} of {})", self.rank, self.world)
    }
}

/// Rank 0 before the others have joined: bound, so their address can be handed out first.
pub struct Listener {
    listener: TcpListener,
    /// Identifies the job (e.g. the stage key): a rank of another job is refused.
    job: String,
}

impl Listener {
    /// Listen at `addr` (`127.0.0.1:0` picks a free port) for the ranks of `job`.
    pub fn bind(addr: impl ToSocketAddrs, job: &str) -> std::io::Result<Self> {
        Ok(Self { listener: TcpListener::bind(addr)?, job: job.to_string() })
    }

    /// The address the other ranks connect to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Wait for ranks `1..world` to join (each within `timeout` of the start), then become rank 0.
    pub fn accept(self, world: usize, timeout: Duration) -> Result<TcpCollective, DistError> {
        self.accept_with(world, timeout, || Ok(()))
    }

    /// [`Self::accept`], calling `check` while it waits: an error from it (a rank's process
    /// exited before joining) ends the wait at once.
    pub fn accept_with(
        self,
        world: usize,
        timeout: Duration,
        mut check: impl FnMut() -> Result<(), DistError>,
    ) -> Result<TcpCollective, DistError> {
        let addr = self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let io0 = |source| DistError::Io { rank: 0, source };
        self.listener.set_nonblocking(true).map_err(io0)?;
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(io0)?;
                    // A stranger (or a rank of another job) is dropped, not fatal.
                    if let Ok(rank) = handshake_accept(&stream, &self.job, world, timeout) {
                        if slots[rank - 1].is_none() {
                            slots[rank - 1] = Some(stream);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    check()?;
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(DistError::Rendezvous {
                            addr,
                            joined: world - missing.len(),
                            world,
                            missing: missing.join(", "),
                            secs: secs(timeout),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io0(e)),
            }
        }
        let peers: Vec<TcpStream> = slots.into_iter().map(|s| s.expect("all joined")).collect();
        for (i, p) in peers.iter().enumerate() {
            configure(p, timeout).map_err(|source| DistError::Io { rank: i + 1, source })?;
            // Tell each rank everyone is here (its connect returns only then).
            (&*p).write_all(&[1]).map_err(|source| DistError::Io { rank: i + 1, source })?;
        }
        Ok(TcpCollective { rank: 0, world, peers: Mutex::new(peers), timeout, logs: BTreeMap::new() })
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

/// A joining rank's greeting: magic, job, rank, world.
fn hello(job: &str, rank: usize, world: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&(job.len() as u64).to_le_bytes());
    h.extend_from_slice(job.as_bytes());
    h.extend_from_slice(&(rank as u64).to_le_bytes());
    h.extend_from_slice(&(world as u64).to_le_bytes());
    h
}

/// Rank 0's side of the greeting: magic, job, rank, world. Returns the rank.
fn handshake_accept(s: &TcpStream, job: &str, world: usize, timeout: Duration) -> std::io::Result<usize> {
    s.set_read_timeout(Some(timeout.min(Duration::from_secs(10))))?;
    let mut r = s;
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    let mut n = [0u8; 8];
    r.read_exact(&mut n)?;
    let len = u64::from_le_bytes(n) as usize;
    if magic != *MAGIC || len > 4096 {
        return Err(ErrorKind::InvalidData.into());
    }
    let mut j = vec![0u8; len];
    r.read_exact(&mut j)?;
    r.read_exact(&mut n)?;
    let rank = u64::from_le_bytes(n) as usize;
    r.read_exact(&mut n)?;
    let their_world = u64::from_le_bytes(n) as usize;
    if j != job.as_bytes() || their_world != world || rank == 0 || rank >= world {
        return Err(ErrorKind::InvalidData.into());
    }
    Ok(rank)
}

impl TcpCollective {
    /// Join rank 0 at `master` as `rank` of `world` for `job`, retrying the connection until
    /// `timeout` (rank 0 may not be listening yet), then waiting up to `timeout` for every rank.
    pub fn connect(master: &str, job: &str, rank: usize, world: usize, timeout: Duration) -> Result<Self, DistError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let attempt = master.to_socket_addrs().and_then(|mut a| {
                let addr = a.next().ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address"))?;
                TcpStream::connect_timeout(&addr, Duration::from_secs(5).min(timeout))
            });
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(DistError::Connect { rank, addr: master.to_string(), secs: secs(timeout), source: e })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let io = |source| DistError::Io { rank: 0, source };
        configure(&stream, timeout).map_err(io)?;
        (&stream).write_all(&hello(job, rank, world)).map_err(io)?;
        let mut ready = [0u8; 1];
        read_from(&stream, &mut ready, 0, timeout, None)?;
        Ok(Self { rank, world, peers: Mutex::new(vec![stream]), timeout, logs: BTreeMap::new() })
    }

    /// Use `timeout` for every later receive instead of the rendezvous's.
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, DistError> {
        for (i, p) in self.peers.get_mut().unwrap_or_else(|p| p.into_inner()).iter().enumerate() {
            let rank = if self.rank == 0 { i + 1 } else { 0 };
            configure(p, timeout).map_err(|source| DistError::Io { rank, source })?;
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// Name each rank's log in errors about that rank.
    pub fn with_logs(mut self, logs: BTreeMap<usize, PathBuf>) -> Self {
        self.logs = logs;
        self
    }

    fn send(&self, s: &TcpStream, to: usize, op: u8, buf: &[f32]) -> Result<(), DistError> {
        let mut msg = Vec::with_capacity(9 + buf.len() * 4);
        msg.push(op);
        msg.extend_from_slice(&(buf.len() as u64).to_le_bytes());
        msg.extend_from_slice(bytemuck::cast_slice(buf));
        (&*s).write_all(&msg).map_err(|e| self.classify(e, to))
    }

    /// Receive an `op` message of exactly `out.len()` values from rank `from` into `out`.
    fn recv(&self, s: &TcpStream, from: usize, op: u8, out: &mut [f32]) -> Result<(), DistError> {
        let mut head = [0u8; 9];
        read_from(s, &mut head, from, self.timeout, self.logs.get(&from))?;
        let len = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes")) as usize;
        if head[0] != op || len != out.len() {
            return Err(DistError::OutOfStep {
                rank: from,
                what: format!(
                    "it sent {} of {len} values where {} of {} values was expected",
                    op_name(head[0]),
                    op_name(op),
                    out.len()
                ),
            });
        }
        read_from(s, bytemuck::cast_slice_mut(out), from, self.timeout, self.logs.get(&from))
    }

    fn classify(&self, e: std::io::Error, rank: usize) -> DistError {
        classify(e, rank, self.timeout, self.logs.get(&rank))
    }
}

fn op_name(op: u8) -> &'static str {
    match op {
        OP_REDUCE => "an all-reduce",
        OP_BROADCAST => "a broadcast",
        _ => "an unknown message",
    }
}

fn classify(e: std::io::Error, rank: usize, timeout: Duration, log: Option<&PathBuf>) -> DistError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            DistError::Silent { rank, secs: secs(timeout), log: log.cloned() }
        }
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => DistError::Died { rank, log: log.cloned() },
        _ => DistError::Io { rank, source: e },
    }
}

fn read_from(
    s: &TcpStream,
    buf: &mut [u8],
    rank: usize,
    timeout: Duration,
    log: Option<&PathBuf>,
) -> Result<(), DistError> {
    (&*s).read_exact(buf).map_err(|e| classify(e, rank, timeout, log))
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if self.rank == 0 {
            // Sum in rank order, so the result does not depend on who answered first.
            let mut other = vec![0f32; buf.len()];
            for (i, p) in peers.iter().enumerate() {
                self.recv(p, i + 1, OP_REDUCE, &mut other)?;
                buf.iter_mut().zip(&other).for_each(|(a, b)| *a += b);
            }
            for (i, p) in peers.iter().enumerate() {
                self.send(p, i + 1, OP_REDUCE, buf)?;
            }
        } else {
            self.send(&peers[0], 0, OP_REDUCE, buf)?;
            self.recv(&peers[0], 0, OP_REDUCE, buf)?;
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if self.rank == 0 {
            for (i, p) in peers.iter().enumerate() {
                self.send(p, i + 1, OP_BROADCAST, buf)?;
            }
        } else {
            self.recv(&peers[0], 0, OP_BROADCAST, buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Start `world` ranks on loopback: rank 0 here, the others on threads (each a real socket
    /// pair, as between processes). Returns them in rank order.
    fn ranks(world: usize, timeout: Duration) -> Vec<TcpCollective> {
        let l = Listener::bind("127.0.0.1:0", "job").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let joins: Vec<_> = (1..world)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || TcpCollective::connect(&addr, "job", r, world, timeout).unwrap())
            })
            .collect();
        let mut all = vec![l.accept(world, timeout).unwrap()];
        all.extend(joins.into_iter().map(|j| j.join().unwrap()));
        all
    }

    /// Run `f(rank)` on every rank at once and collect the results in rank order.
    fn on_all<T: Send + 'static>(
        ranks: Vec<TcpCollective>,
        f: impl Fn(&TcpCollective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(&c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_and_means_over_two_and_three_ranks() {
        for world in [2usize, 3] {
            let out = on_all(ranks(world, DEFAULT_TIMEOUT), |c| {
                let r = c.rank() as f32;
                let mut sum = vec![r, 10.0 * r + 1.0, -r];
                c.all_reduce_sum(&mut sum).unwrap();
                let mut mean = vec![r; 4];
                c.all_reduce_mean(&mut mean).unwrap();
                c.barrier().unwrap();
                (sum, mean)
            });
            let n = world as f32;
            let tri = (0..world).map(|r| r as f32).sum::<f32>();
            for (sum, mean) in out {
                assert_eq!(sum, vec![tri, 10.0 * tri + n, -tri]);
                assert_eq!(mean, vec![tri / n; 4]);
            }
        }
    }

    #[test]
    fn broadcast_gives_every_rank_rank_zeros_buffer() {
        let out = on_all(ranks(3, DEFAULT_TIMEOUT), |c| {
            let mut b = vec![c.rank() as f32 + 0.5; 1000];
            c.broadcast(&mut b).unwrap();
            b
        });
        assert!(out.iter().all(|b| b.iter().all(|&x| x == 0.5)));
    }

    #[test]
    fn a_rank_that_closed_its_socket_is_named() {
        let mut rs = ranks(3, DEFAULT_TIMEOUT);
        drop(rs.pop()); // rank 2 dies
        let rank1 = rs.pop().unwrap();
        let rank0 = rs.pop().unwrap().with_logs([(2, PathBuf::from("runs/x/ranks/s.rank2.log"))].into());
        let h = std::thread::spawn(move || rank1.all_reduce_sum(&mut [1.0]).unwrap_err());
        let e = rank0.all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(matches!(e, DistError::Died { rank: 2, .. }), "{e}");
        assert!(e.to_string().contains("rank 2 closed its connection") && e.to_string().contains("rank2.log"), "{e}");
        drop(rank0);
        // Rank 1 then learns that rank 0 went away instead of waiting.
        let e1 = h.join().unwrap();
        assert!(matches!(e1, DistError::Died { rank: 0, .. }), "{e1}");
    }

    #[test]
    fn a_silent_rank_times_out_with_its_name() {
        // A deliberately tiny timeout against a rank that never sends: nothing depends on speed.
        let mut rs: Vec<_> =
            ranks(2, DEFAULT_TIMEOUT).into_iter().map(|c| c.with_timeout(Duration::from_millis(50)).unwrap()).collect();
        let _silent = rs.pop().unwrap();
        let e = rs[0].all_reduce_sum(&mut [1.0, 2.0]).unwrap_err();
        assert!(matches!(e, DistError::Silent { rank: 1, .. }), "{e}");
        assert!(e.to_string().starts_with("rank 1 sent nothing for 0.05 s: it died or hung"), "{e}");
        // And a rank waiting on a silent rank 0.
        let e = _silent.broadcast(&mut [0.0]).unwrap_err();
        assert!(matches!(e, DistError::Silent { rank: 0, .. }), "{e}");
    }

    #[test]
    fn mismatched_calls_are_out_of_step_not_garbage() {
        let out = on_all(ranks(2, Duration::from_secs(30)), |c| {
            let mut b = vec![0.0; 3 + c.rank()];
            c.all_reduce_sum(&mut b).err().map(|e| e.to_string())
        });
        assert!(out[0].as_deref().unwrap().contains("rank 1 is out of step"), "{out:?}");
    }

    /// A rank that has greeted rank 0 (the connection waits in the listener's backlog, so no
    /// thread and no timing is involved).
    fn greeted(addr: SocketAddr, job: &str, rank: usize, world: usize) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        (&s).write_all(&hello(job, rank, world)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    #[test]
    fn a_missing_rank_fails_the_rendezvous_by_name() {
        let l = Listener::bind("127.0.0.1:0", "job").unwrap();
        let joined = greeted(l.local_addr().unwrap(), "job", 1, 3);
        let e = l.accept(3, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("only 2 of 3 ranks joined") && e.to_string().contains("missing: 2"), "{e}");
        // The joined rank learns that rank 0 gave up instead of waiting.
        assert_eq!((&joined).read(&mut [0u8; 1]).unwrap(), 0);
    }

    #[test]
    fn a_rank_that_exited_before_joining_ends_the_wait_by_name() {
        // With the full default timeout: only the check can end this wait.
        let l = Listener::bind("127.0.0.1:0", "job").unwrap();
        let e = l
            .accept_with(2, DEFAULT_TIMEOUT, || Err(DistError::Died { rank: 1, log: Some("r/base.rank1.log".into()) }))
            .unwrap_err();
        assert_eq!(e.to_string(), "rank 1 closed its connection: it died or stopped; see its log r/base.rank1.log");
    }

    #[test]
    fn a_tensor_all_reduce_sums_through_the_host_by_default() {
        let out = on_all(ranks(2, DEFAULT_TIMEOUT), |c| {
            let t =
                candle_core::Tensor::new(&[[1f32, 2.0], [3.0, c.rank() as f32]], &candle_core::Device::Cpu).unwrap();
            c.all_reduce_sum_tensor(&t).unwrap().to_vec2::<f32>().unwrap()
        });
        assert!(out.iter().all(|t| *t == vec![vec![2.0, 4.0], vec![6.0, 1.0]]), "{out:?}");
    }

    #[test]
    fn a_rank_of_another_job_is_refused() {
        let l = Listener::bind("127.0.0.1:0", "job-a").unwrap();
        let stranger = greeted(l.local_addr().unwrap(), "job-b", 1, 2);
        let e = l.accept(2, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("only 1 of 2 ranks joined"), "{e}");
        assert_eq!((&stranger).read(&mut [0u8; 1]).unwrap(), 0);
    }

    #[test]
    fn the_rank_comes_from_mmrun_or_slurm_variables() {
        let env = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            RankEnv::from_vars(move |k| m.get(k).cloned())
        };
        assert_eq!(env(&[]), Ok(None));
        assert_eq!(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]), Ok(None));
        assert_eq!(env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "4")]), Ok(None));
        assert_eq!(
            env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("MMRUN_MASTER_ADDR", "n1:29500")]),
            Ok(Some(RankEnv { rank: 1, world_size: 2, master: "n1:29500".into() }))
        );
        assert!(env(&[("MMRUN_RANK", "1"), ("MMRUN_WORLD_SIZE", "2")]).unwrap_err().contains("MMRUN_MASTER_ADDR"));
        assert!(env(&[("MMRUN_RANK", "2"), ("MMRUN_WORLD_SIZE", "2"), ("MMRUN_MASTER_ADDR", "a:1")]).is_err());
        assert!(env(&[("MMRUN_RANK", "1")]).is_err());
    }
}
