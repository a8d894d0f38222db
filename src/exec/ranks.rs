//! Data-parallel stages (`world_size` > 1): the executor's own process is rank 0 (it holds the
//! key lock, writes checkpoints and publishes), and ranks `1..N` are child processes of the same
//! binary (`mmrun stage-job` with `MMRUN_RANK`, `MMRUN_WORLD_SIZE` and `MMRUN_MASTER_ADDR` set),
//! which replay the run's recipe, train on their slice of each batch and exit; they write nothing
//! to the cache but shared derived data (shards) and the logs `runs/<run>/ranks/<stage>.rank<r>.log`.
//!
//! Under `srun` (`SLURM_PROCID` / `SLURM_NTASKS` > 1, `MMRUN_MASTER_ADDR` set) Slurm has started
//! every rank already: task 0 is rank 0 and listens at `MMRUN_MASTER_ADDR`, the others join it.
//!
//! When any rank fails, rank 0's exchange names it; rank 0 then kills the others, so nothing is
//! left running, and the stage resumes from rank 0's last checkpoint with the same command.

use super::{Executor, Job};
use crate::dist::{DistError, Listener, RankEnv, TcpCollective};
use crate::recipe::{DeviceSpec, Ranks, Recipe, RecipeError};
use crate::stages::{Rank, StageContext};
use crate::train::device::{cuda_device_count, for_rank};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Ranks `1..N` of a stage as started by this process (empty under `srun`, which started them).
pub(crate) struct Workers {
    children: Vec<(usize, Child)>,
    logs: BTreeMap<usize, PathBuf>,
}

/// The log of rank `rank` of `stage` in run directory `run_dir`.
pub fn rank_log(run_dir: &Path, stage: &str, rank: usize) -> PathBuf {
    run_dir.join("ranks").join(format!("{stage}.rank{rank}.log"))
}

/// The device each rank of a stage computes on: its listed device, else the recipe's device
/// spread over GPUs as [`crate::stages::StageContext::compute`] does.
fn rank_devices(recipe: &Recipe, ranks: &Ranks) -> Vec<DeviceSpec> {
    (0..ranks.world_size)
        .map(|r| ranks.devices.get(r).copied().unwrap_or_else(|| for_rank(recipe.meta.device, r)))
        .collect()
}

/// Refuse stage `stage` when its ranks need more GPUs than the `gpus` this machine has, before
/// any rank starts: the diagnostic points at the recipe field that asked for them (the first
/// `devices` entry past the last GPU, else `world_size`) and says what to change.
pub(crate) fn check_gpus(recipe: &Recipe, stage: &str, ranks: &Ranks, gpus: usize) -> Result<(), RecipeError> {
    let devices = rank_devices(recipe, ranks);
    let Some(rank) = devices.iter().position(|d| matches!(d, DeviceSpec::Cuda(n) if *n >= gpus)) else {
        return Ok(());
    };
    let world = ranks.world_size;
    let has = match gpus {
        0 => "no CUDA device is visible (check `nvidia-smi` and CUDA_VISIBLE_DEVICES)".to_string(),
        1 => "this machine has 1 GPU (cuda:0)".to_string(),
        n => format!("this machine has {n} GPUs (cuda:0 to cuda:{})", n - 1),
    };
    let elsewhere = format!(
        "or run it where it has the GPUs (e.g. `--executor slurm` with [stages.{stage}.resources] gpus = {world})"
    );
    let index = rank.to_string();
    let (path, message, fix): (Vec<&str>, _, _) = if ranks.devices.is_empty() {
        let first = match recipe.meta.device {
            DeviceSpec::Cuda(n) => n,
            _ => 0,
        };
        (
            vec!["stages", stage, "world_size"],
            format!(
                "stage '{stage}' runs {world} ranks, one GPU each from cuda:{first} up (rank {rank} on {}), but {has}",
                devices[rank]
            ),
            format!("set world_size to at most {}, {elsewhere}", gpus.saturating_sub(first).max(1)),
        )
    } else {
        (
            vec!["stages", stage, "devices", &index],
            format!("stage '{stage}' puts rank {rank} on {}, but {has}", devices[rank]),
            format!("list only GPUs this machine has, {elsewhere}"),
        )
    };
    Err(RecipeError::Invalid(vec![recipe.diagnostic_at(&path, message, fix)]))
}

/// Become rank 0 of `job`: start ranks `1..N` as child processes (or, under `srun`, wait for
/// those Slurm started) and join them.
pub(crate) fn start(exec: &Executor<'_>, job: &Job, ranks: &Ranks) -> anyhow::Result<(Rank, Workers)> {
    let world = ranks.world_size;
    let timeout = crate::dist::timeout_from_env();
    let external = RankEnv::from_env().map_err(anyhow::Error::msg)?;
    if external.is_none() {
        // This machine hosts every rank: a backstop for runs that did not check before starting
        // (a Slurm job's stage, checked on its node).
        check_gpus(exec.recipe, &job.name, ranks, cuda_device_count())?;
    }
    let (listener, mut workers) = match external {
        Some(env) => {
            if env.world_size != world {
                anyhow::bail!(
                    "stage '{}' has world_size = {world} but Slurm started {} tasks; run it with srun --ntasks={world}",
                    job.name,
                    env.world_size
                );
            }
            let l = Listener::bind(env.master.as_str(), &job.key)
                .with_context(|| format!("rank 0 listening at MMRUN_MASTER_ADDR={}", env.master))?;
            (l, Workers { children: Vec::new(), logs: BTreeMap::new() })
        }
        None => {
            let l = Listener::bind("127.0.0.1:0", &job.key).context("listening on loopback for the other ranks")?;
            let addr = l.local_addr().context("listening on loopback")?.to_string();
            (l, spawn(exec, job, world, &addr)?)
        }
    };
    eprintln!(
        "  {}: {world} data-parallel ranks{}",
        job.name,
        match workers.logs.get(&1) {
            Some(p) => format!(" (logs of ranks 1.. in {})", p.parent().unwrap_or(p).display()),
            None => String::new(),
        }
    );
    let cancel = exec.cancel;
    let joined = listener.accept_with(world, timeout, || {
        if cancel.is_cancelled() {
            return Err(DistError::Rendezvous {
                addr: "(interrupted)".into(),
                joined: 0,
                world,
                missing: "all".into(),
                secs: "0".into(),
            });
        }
        workers.exited()
    });
    let collective =
        match joined.and_then(|c| crate::dist::for_devices(c.with_logs(workers.logs.clone()), on_cuda(exec))) {
            Ok(c) => c,
            Err(e) => {
                workers.kill();
                return Err(anyhow::Error::new(e).context(format!("starting the ranks of stage '{}'", job.name)));
            }
        };
    Ok((Rank { collective, device: ranks.devices.first().copied() }, workers))
}

/// Whether the ranks compute on CUDA devices (then NCCL sums their gradients, where built in).
/// Every rank's device is of the recipe's device class ([`StageContext::compute`] refuses
/// others), so every rank answers the same.
fn on_cuda(exec: &Executor<'_>) -> bool {
    crate::train::device::resolve_class(exec.recipe.meta.device) == crate::recipe::DeviceClass::Cuda
}

fn spawn(exec: &Executor<'_>, job: &Job, world: usize, addr: &str) -> anyhow::Result<Workers> {
    let exe = std::env::current_exe().context("locating the mmrun binary to start the other ranks")?;
    let run_dir = exec.run.dir();
    let mut w = Workers { children: Vec::new(), logs: BTreeMap::new() };
    for rank in 1..world {
        let log = rank_log(run_dir, &job.name, rank);
        let file = crate::fs_error::IoContext::ctx(
            std::fs::create_dir_all(log.parent().expect("in ranks/")).and_then(|_| std::fs::File::create(&log)),
            "creating",
            &log,
        )?;
        let child = Command::new(&exe)
            .arg("--home")
            .arg(exec.cache.root())
            .arg("stage-job")
            .arg(run_dir)
            .arg(&job.name)
            .arg("--key")
            .arg(&job.key)
            .env("MMRUN_RANK", rank.to_string())
            .env("MMRUN_WORLD_SIZE", world.to_string())
            .env("MMRUN_MASTER_ADDR", addr)
            // A child of an srun task must not take Slurm's task numbers for its own.
            .env_remove("SLURM_PROCID")
            .env_remove("SLURM_NTASKS")
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| crate::fs_error::IoError::new("creating", &log, e))?)
            .stderr(file)
            .spawn();
        match child {
            Ok(c) => {
                w.children.push((rank, c));
                w.logs.insert(rank, log);
            }
            Err(e) => {
                w.kill();
                return Err(anyhow::Error::new(e).context(format!("starting rank {rank} ({})", exe.display())));
            }
        }
    }
    Ok(w)
}

impl Workers {
    /// A child that has exited already (while rank 0 waits for everyone to join).
    fn exited(&mut self) -> Result<(), DistError> {
        for (rank, c) in &mut self.children {
            if let Ok(Some(_)) = c.try_wait() {
                return Err(DistError::Died { rank: *rank, log: self.logs.get(rank).cloned() });
            }
        }
        Ok(())
    }

    /// Stop every child now (rank 0 failed: the others cannot go on without it).
    pub(crate) fn kill(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }

    /// After rank 0's stage ended: on success or interrupt, give the others the time they need to
    /// leave on their own (they finished the same steps), then stop any that has not; on failure
    /// stop them at once. A rank that failed after rank 0 succeeded is only a warning: it took part
    /// in every step.
    pub(crate) fn finish(mut self, ok_or_interrupted: bool) {
        if !ok_or_interrupted {
            self.kill();
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (rank, c) in &mut self.children {
            let status = loop {
                match c.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break None;
                    }
                }
            };
            if !status.is_some_and(|s| s.success() || s.code() == Some(130)) {
                let log = self.logs.get(rank).map(|p| p.display().to_string()).unwrap_or_default();
                tracing::warn!("rank {rank} did not exit cleanly after the stage finished; see {log}");
            }
        }
        self.children.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What rank `env.rank` (> 0) of a data-parallel stage does (`mmrun stage-job` with `MMRUN_RANK`
/// set): build the stage's inputs from the cache (rank 0 built everything upstream before
/// starting it), join rank 0, and run the stage into a scratch directory that is then dropped.
pub(crate) fn run_worker(
    exec: &Executor<'_>,
    job: &Job,
    keys: &BTreeMap<String, String>,
    env: &RankEnv,
) -> anyhow::Result<()> {
    let stage = exec
        .registry
        .iter()
        .find(|s| s.kind() == job.kind)
        .ok_or_else(|| anyhow::anyhow!("internal: stage kind '{}' is not registered", job.kind))?;
    let ranks = stage.ranks(&job.params);
    if ranks.world_size != env.world_size {
        anyhow::bail!(
            "stage '{}' has world_size = {} but this rank was started as one of {}",
            job.name,
            ranks.world_size,
            env.world_size
        );
    }
    let mut artifacts = BTreeMap::new();
    for input in &job.inputs {
        if let crate::stages::InputRef::Stage { stage: up, .. } = input {
            let key = keys.get(up).ok_or_else(|| anyhow::anyhow!("internal: no key for stage '{up}'"))?;
            let art = exec.cache.object(key).ok_or_else(|| {
                anyhow::anyhow!("stage '{up}' is not in the cache; rank 0 builds it before starting the ranks")
            })?;
            artifacts.insert(up.clone(), art);
        }
    }
    let inputs = exec.inputs_for(job, *stage, &artifacts)?;
    eprintln!("rank {} of {} (pid {}): joining rank 0 at {}", env.rank, env.world_size, std::process::id(), env.master);
    let tcp = TcpCollective::connect(&env.master, &job.key, env.rank, env.world_size, crate::dist::timeout_from_env())?;
    let collective = crate::dist::for_devices(tcp, on_cuda(exec))?;
    let scratch = exec.cache.tmp_dir()?;
    let work_dir = exec.cache.work_dir(&job.key)?;
    let mut ctx = StageContext {
        name: &job.name,
        key: &job.key,
        recipe: exec.recipe,
        inputs: &inputs,
        out_dir: scratch.path(),
        work_dir: &work_dir,
        cache: exec.cache,
        run: exec.run,
        cancel: exec.cancel,
        rank: Some(Rank { collective, device: ranks.devices.get(env.rank).copied() }),
    };
    stage.run(&mut ctx, &job.params).with_context(|| format!("rank {} of stage '{}'", env.rank, job.name))?;
    eprintln!("rank {}: done", env.rank);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str =
        "[recipe]\nname = \"g\"\ndevice = \"cpu\"\n[datasets.t]\nsource = \"t.jsonl\"\nformat = \"text\"\n\
                          [stages.tok]\nkind = \"tokenizer\"\ndata = [\"t\"]\n[stages.base]\nkind = \"pretrain\"\n\
                          tokenizer = \"tok\"\ndata = \"t\"\nworld_size = 3\ndevices = [\"cpu\", \"cpu\", \"cpu\"]\n";

    fn recipe(overrides: &[&str]) -> Recipe {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        crate::recipe::load_str(Path::new("r.toml"), RECIPE.into(), &overrides, &crate::stages::kinds()).unwrap()
    }

    fn refusal(recipe: &Recipe, ranks: &Ranks, gpus: usize) -> crate::recipe::Diagnostic {
        match check_gpus(recipe, "base", ranks, gpus) {
            Err(RecipeError::Invalid(mut d)) if d.len() == 1 => d.remove(0),
            other => panic!("expected one diagnostic, got {other:?}"),
        }
    }

    // A build without CUDA refuses `cuda:N` when the recipe loads, so these ranks stand for what a
    // CUDA build would load from the same lines.
    #[test]
    fn more_gpu_ranks_than_gpus_are_refused_at_the_field_that_asked() {
        let r = recipe(&[]);
        let listed =
            Ranks { world_size: 3, devices: vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1), DeviceSpec::Cuda(2)] };
        assert!(check_gpus(&r, "base", &listed, 3).is_ok());
        let d = refusal(&r, &listed, 2);
        assert_eq!((d.line(), d.column(), d.key.as_deref()), (Some(15), Some(26), Some("stages.base.devices[2]")));
        assert!(d.message.contains("rank 2 on cuda:2, but this machine has 2 GPUs (cuda:0 to cuda:1)"), "{d}");
        assert!(d.hint.as_deref().unwrap().contains("[stages.base.resources] gpus = 3"), "{d}");
        let d = refusal(&r, &listed, 0);
        assert!(d.message.contains("rank 0 on cuda:0, but no CUDA device is visible"), "{d}");

        // No `devices`: the ranks take GPUs from the recipe's device up, and world_size is at fault.
        let mut r = recipe(&[]);
        r.meta.device = DeviceSpec::Cuda(1);
        let spread = Ranks { world_size: 3, devices: vec![] };
        assert!(check_gpus(&r, "base", &spread, 4).is_ok());
        let d = refusal(&r, &spread, 2);
        assert_eq!((d.line(), d.key.as_deref()), (Some(14), Some("stages.base.world_size")));
        assert!(
            d.message.contains("3 ranks, one GPU each from cuda:1 up (rank 1 on cuda:2), but this machine has 2"),
            "{d}"
        );
        assert!(d.hint.as_deref().unwrap().starts_with("set world_size to at most 1"), "{d}");

        // A value from --set is pointed at on the command line, and CPU ranks need no GPU.
        let mut r = recipe(&["stages.base.world_size=3"]);
        r.meta.device = DeviceSpec::Cuda(0);
        let d = refusal(&r, &spread, 1);
        assert_eq!(d.location, crate::recipe::Location::Override("stages.base.world_size=3".into()), "{d}");
        let cpu = Ranks { world_size: 3, devices: vec![DeviceSpec::Cpu; 3] };
        assert!(check_gpus(&recipe(&[]), "base", &cpu, 0).is_ok());
    }
}
