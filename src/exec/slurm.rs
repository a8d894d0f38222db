//! The Slurm executor: every stale stage becomes one `sbatch` job that runs this same `mmrun`
//! binary for that one stage (`mmrun stage-job`) on the same cache, which must therefore be on
//! storage the nodes share.
//!
//! Jobs are submitted in plan order, each with `--dependency=afterok:<the jobs of its upstream
//! stages>` (and `--kill-on-invalid-dep=yes`, so a failed upstream cancels them), asking for the
//! stage's `[stages.<name>.resources]`. Cached stages are never submitted. mmrun then polls the
//! jobs with `scontrol show job -o <id>` (which works without accounting), streams each job's log
//! (`<run dir>/slurm/<stage>.log`) to stderr, and records ran / failed / cancelled / interrupted
//! in `run.json` as the local executor does. Ctrl-C `scancel`s every job it submitted; running
//! ones get SIGTERM, checkpoint and stop, so the same command resumes them.
//!
//! Inside the job the local executor builds the stage (key lock, re-check, tmp dir, publish),
//! so every cache invariant holds exactly as for a local run.

use super::{set_status, short, ExecCounts, ExecOutcome, Job};
use crate::cache::Cache;
use crate::cancel::CancelToken;
use crate::recipe::Recipe;
use crate::runs::{RunSink, StageStatus};
use crate::stages::InputRef;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What can go wrong talking to Slurm.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    /// A Slurm command is not installed.
    #[error("the slurm executor needs `{0}` on PATH, and it is not there: run mmrun on a Slurm login node (or use --executor local)")]
    Missing(&'static str),
    /// A Slurm command failed.
    #[error("`{cmd}` failed: {message}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr (or the spawn error).
        message: String,
    },
}

/// The Slurm commands mmrun uses, found on PATH.
#[derive(Clone, Debug, Default)]
pub struct Slurm;

/// A job as `scontrol show job -o` describes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobInfo {
    /// `JobState`, e.g. `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`.
    pub state: String,
    /// `Reason`, e.g. `Dependency`, `DependencyNeverSatisfied`, `None`.
    pub reason: String,
    /// The exit status of the batch script (`ExitCode=<status>:<signal>`).
    pub exit_code: i32,
    /// `RunTime` in seconds.
    pub run_seconds: f64,
    /// `NodeList`.
    pub nodes: String,
}

impl JobInfo {
    /// Parse one line of `scontrol show job -o`.
    pub fn parse(line: &str) -> Option<(String, JobInfo)> {
        let fields: BTreeMap<&str, &str> = line.split_whitespace().filter_map(|kv| kv.split_once('=')).collect();
        let id = fields.get("JobId")?.to_string();
        let info = JobInfo {
            state: fields.get("JobState")?.to_string(),
            reason: fields.get("Reason").unwrap_or(&"").to_string(),
            exit_code: fields
                .get("ExitCode")
                .and_then(|e| e.split(':').next())
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
            run_seconds: fields.get("RunTime").map(|t| parse_duration(t)).unwrap_or(0.0),
            nodes: fields.get("NodeList").unwrap_or(&"").to_string(),
        };
        Some((id, info))
    }

    /// Whether the job will not change any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "PREEMPTED"
                | "OUT_OF_MEMORY"
                | "BOOT_FAIL"
                | "DEADLINE"
        )
    }

    /// Whether the job's script is running (or winding down) on a node now.
    pub fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "RUNNING" | "COMPLETING" | "SUSPENDED" | "STOPPED")
    }

    /// Whether the job was ever given a node (a job cancelled while pending never was).
    pub fn got_a_node(&self) -> bool {
        !self.nodes.is_empty() && self.nodes != "(null)"
    }
}

/// `[D-]HH:MM:SS` → seconds.
fn parse_duration(t: &str) -> f64 {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (d.parse::<f64>().unwrap_or(0.0), r),
        None => (0.0, t),
    };
    let secs = rest.split(':').fold(0.0, |acc, p| acc * 60.0 + p.parse::<f64>().unwrap_or(0.0));
    days * 86400.0 + secs
}

fn run_cmd(program: &'static str, args: &[String]) -> Result<String, SlurmError> {
    let out = Command::new(program).args(args).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SlurmError::Missing(program),
        _ => SlurmError::Command { cmd: format!("{program} {}", args.join(" ")), message: e.to_string() },
    })?;
    if !out.status.success() {
        return Err(SlurmError::Command {
            cmd: format!("{program} {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Slurm {
    /// Fail early, before anything is submitted, when Slurm is not installed here.
    pub fn check(&self) -> Result<(), SlurmError> {
        for program in ["sbatch", "scontrol", "scancel"] {
            if let Err(SlurmError::Missing(p)) = run_cmd(program, &["--version".into()]) {
                return Err(SlurmError::Missing(p));
            }
        }
        Ok(())
    }

    /// `sbatch --parsable <args> <script>` → the job id.
    pub fn submit(&self, args: &[String], script: &Path) -> Result<String, SlurmError> {
        let mut a = vec!["--parsable".to_string()];
        a.extend(args.iter().cloned());
        a.push(script.display().to_string());
        let out = run_cmd("sbatch", &a)?;
        // `<id>` or `<id>;<cluster>`.
        let id = out.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SlurmError::Command {
                cmd: format!("sbatch {}", a.join(" ")),
                message: format!("unexpected output {:?} (expected a job id)", out.trim()),
            });
        }
        Ok(id)
    }

    /// The job's state, or `None` once Slurm no longer knows it (it finished longer than
    /// `MinJobAge` ago).
    pub fn query(&self, id: &str) -> Result<Option<JobInfo>, SlurmError> {
        match run_cmd("scontrol", &["show".into(), "job".into(), "-o".into(), id.into()]) {
            Ok(out) => Ok(out.lines().filter_map(JobInfo::parse).find(|(i, _)| i == id).map(|(_, j)| j)),
            Err(SlurmError::Command { message, .. }) if message.contains("Invalid job id") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `scancel <ids…>`.
    pub fn cancel(&self, ids: &[String]) -> Result<(), SlurmError> {
        if ids.is_empty() {
            return Ok(());
        }
        run_cmd("scancel", ids).map(|_| ())
    }
}

/// Runs stale stages as Slurm jobs.
pub struct SlurmExecutor<'a> {
    /// The cache (shared with the nodes).
    pub cache: &'a Cache,
    /// The run record; job logs go to `<its dir>/slurm/`.
    pub run: &'a RunSink,
    /// Raised on Ctrl-C.
    pub cancel: &'a CancelToken,
    /// The loaded recipe (stage resources).
    pub recipe: &'a Recipe,
    /// The command that builds one stage in a job, up to the subcommand: the mmrun binary and
    /// its global options (`--home <absolute cache path>`).
    pub mmrun: Vec<String>,
    /// How often the jobs are polled.
    pub poll: Duration,
}

/// One submitted stage.
struct Submitted {
    /// Index into the jobs.
    job: usize,
    id: String,
    log: PathBuf,
    log_offset: u64,
    /// When mmrun first saw it running (RunTime has whole seconds only).
    started: Option<std::time::Instant>,
    done: bool,
}

/// How the stages that ended badly ended.
#[derive(Default)]
struct Ends {
    failed: Option<(String, anyhow::Error)>,
    interrupted: Option<String>,
}

impl SlurmExecutor<'_> {
    /// Submit every stale stage of `jobs` (topologically ordered) and follow the jobs to the end,
    /// keeping `run.json` current.
    pub fn execute(&self, jobs: &[Job]) -> (ExecOutcome, ExecCounts) {
        let slurm = Slurm;
        let mut counts = ExecCounts::default();
        let total = jobs.len();
        let tag = |i: usize| format!("[{}/{}] {} ({})", i + 1, total, jobs[i].name, jobs[i].kind);
        if let Err(e) = slurm.check() {
            let first = jobs.iter().find(|j| self.cache.object(&j.key).is_none());
            return match first {
                None => self.all_cached(jobs, &mut counts),
                Some(j) => self.fail_before_submitting(jobs, &j.name, anyhow::Error::from(e), counts),
            };
        }
        // Absolute, so the job finds them from whatever directory it starts in.
        let run_dir = std::fs::canonicalize(self.run.dir()).unwrap_or_else(|_| self.run.dir().to_path_buf());
        let log_dir = run_dir.join("slurm");
        if let Err(e) = std::fs::create_dir_all(&log_dir) {
            let err = anyhow::anyhow!("creating {}: {e}", log_dir.display());
            return self.fail_before_submitting(
                jobs,
                &jobs.first().map(|j| j.name.clone()).unwrap_or_default(),
                err,
                counts,
            );
        }

        // Submit, in plan order, so every upstream job id is known when its dependents go in.
        let mut submitted: Vec<Submitted> = Vec::new();
        let mut job_of: BTreeMap<&str, String> = BTreeMap::new();
        for (i, job) in jobs.iter().enumerate() {
            if self.cancel.is_cancelled() {
                self.cancel_all(&slurm, &submitted);
                for j in &jobs[i..] {
                    set_status(self.run, self.cache, &j.name, StageStatus::Skipped, 0.0, None, None);
                }
                for s in &submitted {
                    set_status(self.run, self.cache, &jobs[s.job].name, StageStatus::Cancelled, 0.0, None, None);
                }
                return (ExecOutcome::Interrupted { stage: job.name.clone() }, counts);
            }
            if let Some(art) = self.cache.object(&job.key) {
                eprintln!("{}: cached {}", tag(i), short(&job.key));
                set_status(self.run, self.cache, &job.name, StageStatus::Cached, 0.0, Some(&art), None);
                counts.cached += 1;
                continue;
            }
            let after: Vec<&str> = upstream(job).filter_map(|u| job_of.get(u).map(String::as_str)).collect();
            match self.submit(&slurm, job, &after, &run_dir) {
                Ok((id, log)) => {
                    eprintln!(
                        "{}: submitted as Slurm job {id}{} (log {})",
                        tag(i),
                        if after.is_empty() { String::new() } else { format!(" after {}", after.join(",")) },
                        log.display()
                    );
                    self.record_job(&job.name, &id);
                    job_of.insert(job.name.as_str(), id.clone());
                    submitted.push(Submitted { job: i, id, log, log_offset: 0, started: None, done: false });
                }
                Err(e) => {
                    // Nothing half-submitted may run on: take back what went in.
                    self.cancel_all(&slurm, &submitted);
                    for s in &submitted {
                        set_status(self.run, self.cache, &jobs[s.job].name, StageStatus::Cancelled, 0.0, None, None);
                    }
                    let error = e.context(format!("submitting stage '{}'", job.name));
                    set_status(
                        self.run,
                        self.cache,
                        &job.name,
                        StageStatus::Failed,
                        0.0,
                        None,
                        Some(format!("{error:#}")),
                    );
                    for j in &jobs[i + 1..] {
                        set_status(self.run, self.cache, &j.name, StageStatus::Skipped, 0.0, None, None);
                    }
                    return (ExecOutcome::Failed { stage: job.name.clone(), error }, counts);
                }
            }
        }

        let ends = self.follow(&slurm, jobs, &mut submitted, &mut counts, &tag);
        let outcome = match ends {
            Ends { failed: Some((stage, error)), .. } => ExecOutcome::Failed { stage, error },
            Ends { interrupted: Some(stage), .. } => ExecOutcome::Interrupted { stage },
            _ => ExecOutcome::Succeeded,
        };
        (outcome, counts)
    }

    /// Poll until every submitted job has ended, streaming logs and recording each end.
    fn follow(
        &self,
        slurm: &Slurm,
        jobs: &[Job],
        submitted: &mut [Submitted],
        counts: &mut ExecCounts,
        tag: &dyn Fn(usize) -> String,
    ) -> Ends {
        let mut ends = Ends::default();
        let mut cancelled_by_us = false;
        let mut query_failures = 0;
        while submitted.iter().any(|s| !s.done) {
            if self.cancel.is_cancelled() && !cancelled_by_us {
                cancelled_by_us = true;
                eprintln!("interrupt: cancelling the Slurm jobs of this run (running stages checkpoint and stop)");
                self.cancel_all(slurm, submitted);
                ends.interrupted.get_or_insert_with(|| {
                    submitted.iter().find(|s| !s.done).map(|s| jobs[s.job].name.clone()).unwrap_or_default()
                });
            }
            for k in 0..submitted.len() {
                if submitted[k].done {
                    continue;
                }
                stream_log(&jobs[submitted[k].job].name, &mut submitted[k]);
                let info = match slurm.query(&submitted[k].id) {
                    Ok(i) => i,
                    Err(e) => {
                        // A busy controller is normal on a big cluster; only a lasting failure is ours.
                        query_failures += 1;
                        if query_failures % 30 == 1 {
                            eprintln!("warning: polling Slurm job {}: {e}", submitted[k].id);
                        }
                        continue;
                    }
                };
                query_failures = 0;
                let s = &mut submitted[k];
                let job = &jobs[s.job];
                let Some(info) = info else {
                    // Slurm forgot the job (it ended more than MinJobAge ago): the cache knows.
                    s.done = true;
                    stream_log(&job.name, s);
                    self.finish(job, s, None, cancelled_by_us, counts, &mut ends, tag(s.job));
                    continue;
                };
                if info.is_running() && s.started.is_none() {
                    s.started = Some(std::time::Instant::now());
                    eprintln!("{}: running on {} (Slurm job {})", tag(s.job), info.nodes, s.id);
                    set_status(self.run, self.cache, &job.name, StageStatus::Running, 0.0, None, None);
                }
                if info.is_terminal() {
                    s.done = true;
                    stream_log(&job.name, s);
                    let failed_before = ends.failed.is_some();
                    self.finish(job, s, Some(&info), cancelled_by_us, counts, &mut ends, tag(s.job));
                    if !failed_before && ends.failed.is_some() {
                        self.cancel_dependents(slurm, jobs, submitted, k);
                    }
                }
            }
            if submitted.iter().any(|s| !s.done) {
                self.sleep();
            }
        }
        ends
    }

    /// Record how one job ended.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        job: &Job,
        s: &Submitted,
        info: Option<&JobInfo>,
        cancelled_by_us: bool,
        counts: &mut ExecCounts,
        ends: &mut Ends,
        tag: String,
    ) {
        let seen = s.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let secs = info.map(|i| i.run_seconds).unwrap_or(0.0).max(seen);
        // The artifact is the truth: whatever Slurm says, a published object is a built stage.
        if let Some(art) = self.cache.object(&job.key) {
            eprintln!("{tag}: ran in {secs:.1}s (Slurm job {})", s.id);
            counts.ran += 1;
            set_status(self.run, self.cache, &job.name, StageStatus::Ran, secs, Some(&art), None);
            return;
        }
        let state = info.map(|i| i.state.as_str()).unwrap_or("GONE");
        if state == "CANCELLED" && s.started.is_none() && !info.is_some_and(JobInfo::got_a_node) {
            eprintln!("{tag}: cancelled before it started (Slurm job {})", s.id);
            set_status(self.run, self.cache, &job.name, StageStatus::Cancelled, 0.0, None, None);
            if !cancelled_by_us && info.is_some_and(|i| !i.reason.starts_with("Dependency")) {
                let error = anyhow::anyhow!(
                    "Slurm job {} of stage '{}' was cancelled outside mmrun (scancel?); run the same command again",
                    s.id,
                    job.name
                );
                ends.failed.get_or_insert((job.name.clone(), error));
            }
            return;
        }
        let exit = info.map(|i| i.exit_code).unwrap_or(-1);
        if cancelled_by_us || exit == 130 {
            eprintln!("{tag}: interrupted after {secs:.1}s (checkpoint kept; Slurm job {})", s.id);
            set_status(self.run, self.cache, &job.name, StageStatus::Interrupted, secs, None, None);
            ends.interrupted.get_or_insert_with(|| job.name.clone());
            return;
        }
        let why = match (state, info) {
            ("TIMEOUT", _) => format!(
                "hit its time limit ({}); its checkpoint is kept: raise [stages.{}.resources] time and run again",
                job_time(self.recipe, &job.name).unwrap_or_else(|| "the partition's default".into()),
                job.name
            ),
            ("OUT_OF_MEMORY", _) => {
                format!("ran out of memory: raise [stages.{}.resources] mem and run again", job.name)
            }
            ("GONE", _) => "ended without publishing its artifact".to_string(),
            (_, Some(i)) => format!("ended {} with exit code {}", i.state, i.exit_code),
            (_, None) => unreachable!("GONE is the only state without info"),
        };
        let last_error = last_error_line(&s.log);
        let error = anyhow::anyhow!(
            "stage '{}' (Slurm job {}) {why}{}; full log: {}",
            job.name,
            s.id,
            last_error.map(|l| format!(": {l}")).unwrap_or_default(),
            s.log.display()
        );
        eprintln!("{tag}: failed after {secs:.1}s (Slurm job {})", s.id);
        set_status(self.run, self.cache, &job.name, StageStatus::Failed, secs, None, Some(format!("{error:#}")));
        ends.failed.get_or_insert((job.name.clone(), error));
    }

    /// After stage `k` failed: cancel (and record as cancelled) every stage downstream of it.
    /// Slurm would do so too (`--kill-on-invalid-dep`), but not every site allows that option.
    fn cancel_dependents(&self, slurm: &Slurm, jobs: &[Job], submitted: &mut [Submitted], k: usize) {
        let failed = jobs[submitted[k].job].name.as_str();
        let mut bad: BTreeSet<&str> = BTreeSet::from([failed]);
        let mut ids = Vec::new();
        for s in submitted.iter_mut() {
            let job = &jobs[s.job];
            if !s.done && upstream(job).any(|u| bad.contains(u)) {
                bad.insert(job.name.as_str());
                s.done = true;
                ids.push(s.id.clone());
                eprintln!("  {}: cancelled (upstream stage '{failed}' failed; Slurm job {})", job.name, s.id);
                set_status(self.run, self.cache, &job.name, StageStatus::Cancelled, 0.0, None, None);
            }
        }
        if let Err(e) = slurm.cancel(&ids) {
            eprintln!("warning: cancelling the dependents of a failed stage: {e}");
        }
    }

    fn cancel_all(&self, slurm: &Slurm, submitted: &[Submitted]) {
        let ids: Vec<String> = submitted.iter().filter(|s| !s.done).map(|s| s.id.clone()).collect();
        if let Err(e) = slurm.cancel(&ids) {
            eprintln!("warning: could not cancel Slurm jobs {}: {e}; cancel them with `scancel`", ids.join(" "));
        }
    }

    /// Write the job script and submit it.
    fn submit(&self, slurm: &Slurm, job: &Job, after: &[&str], run_dir: &Path) -> anyhow::Result<(String, PathBuf)> {
        let log_dir = run_dir.join("slurm");
        let script = log_dir.join(format!("{}.sh", job.name));
        let log = log_dir.join(format!("{}.log", job.name));
        let mut cmd = self.mmrun.clone();
        cmd.extend([
            "stage-job".to_string(),
            run_dir.display().to_string(),
            job.name.clone(),
            "--key".into(),
            job.key.clone(),
        ]);
        let text = format!(
            "#!/bin/sh\n# mmrun: stage '{}' ({}) of run {}, key {}\nexec {}\n",
            job.name,
            job.kind,
            self.run.id(),
            job.key,
            cmd.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
        );
        std::fs::write(&script, text).map_err(|e| anyhow::anyhow!("writing {}: {e}", script.display()))?;
        let cwd = std::env::current_dir().map_err(|e| anyhow::anyhow!("the current directory: {e}"))?;
        let mut args = vec![
            format!("--job-name=mmrun-{}-{}", self.recipe.meta.name, job.name),
            format!("--output={}", log.display()),
            format!("--chdir={}", cwd.display()),
            "--kill-on-invalid-dep=yes".into(),
        ];
        if !after.is_empty() {
            args.push(format!("--dependency=afterok:{}", after.join(":")));
        }
        if let Some(spec) = self.recipe.stages.iter().find(|s| s.name == job.name) {
            args.extend(spec.resources.sbatch_args());
        }
        let id = slurm.submit(&args, &script)?;
        Ok((id, log))
    }

    fn record_job(&self, stage: &str, id: &str) {
        let res = self.run.update(|r| {
            if let Some(st) = r.stage_mut(stage) {
                st.job = Some(format!("slurm:{id}"));
            }
        });
        if let Err(e) = res {
            tracing::warn!("could not update the run record: {e}");
        }
    }

    fn all_cached(&self, jobs: &[Job], counts: &mut ExecCounts) -> (ExecOutcome, ExecCounts) {
        for (i, job) in jobs.iter().enumerate() {
            if let Some(art) = self.cache.object(&job.key) {
                eprintln!("[{}/{}] {} ({}): cached {}", i + 1, jobs.len(), job.name, job.kind, short(&job.key));
                set_status(self.run, self.cache, &job.name, StageStatus::Cached, 0.0, Some(&art), None);
                counts.cached += 1;
            }
        }
        (ExecOutcome::Succeeded, counts.clone())
    }

    fn fail_before_submitting(
        &self,
        jobs: &[Job],
        stage: &str,
        error: anyhow::Error,
        counts: ExecCounts,
    ) -> (ExecOutcome, ExecCounts) {
        for j in jobs {
            let st = if j.name == stage { StageStatus::Failed } else { StageStatus::Skipped };
            set_status(self.run, self.cache, &j.name, st, 0.0, None, (j.name == stage).then(|| format!("{error:#}")));
        }
        (ExecOutcome::Failed { stage: stage.to_string(), error }, counts)
    }

    /// Wait one poll interval, waking early on Ctrl-C.
    fn sleep(&self) {
        let step = Duration::from_millis(50);
        let mut left = self.poll;
        while !left.is_zero() && !self.cancel.is_cancelled() {
            let d = left.min(step);
            std::thread::sleep(d);
            left -= d;
        }
    }
}

/// The stages `job` reads from.
fn upstream(job: &Job) -> impl Iterator<Item = &str> {
    job.inputs.iter().filter_map(|i| match i {
        InputRef::Stage { stage, .. } => Some(stage.as_str()),
        InputRef::Dataset { .. } => None,
    })
}

fn job_time(recipe: &Recipe, stage: &str) -> Option<String> {
    recipe.stages.iter().find(|s| s.name == stage)?.resources.time.clone().map(|t| format!("time = \"{t}\""))
}

/// Print the complete lines the job has added to its log since the last call, prefixed with the
/// stage name. The log itself stays in the run directory.
fn stream_log(stage: &str, s: &mut Submitted) {
    let Ok(mut f) = std::fs::File::open(&s.log) else { return };
    if f.seek(SeekFrom::Start(s.log_offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return;
    }
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else { return };
    for line in String::from_utf8_lossy(&buf[..end]).lines() {
        eprintln!("  [{stage}] {line}");
    }
    s.log_offset += end as u64 + 1;
}

/// The last `error: …` line the job's mmrun printed.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| l.strip_prefix("error: ")).map(|l| l.trim().to_string())
}

/// Quote for `/bin/sh`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:+,@".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_parse() {
        let line = "JobId=17 JobName=mmrun-q-tok UserId=root(0) JobState=FAILED Reason=NonZeroExitCode \
                    Dependency=(null) ExitCode=1:0 RunTime=1-00:01:05 NodeList=vm BatchHost=vm";
        let (id, info) = JobInfo::parse(line).unwrap();
        assert_eq!(id, "17");
        assert_eq!(info.state, "FAILED");
        assert_eq!(info.exit_code, 1);
        assert_eq!(info.run_seconds, 86400.0 + 65.0);
        assert!(info.is_terminal() && !info.is_running() && info.got_a_node());
        let (_, pending) =
            JobInfo::parse("JobId=18 JobState=PENDING Reason=Dependency ExitCode=0:0 NodeList=(null)").unwrap();
        assert!(!pending.is_terminal() && !pending.is_running() && !pending.got_a_node());
        assert!(JobInfo::parse("No jobs in the system").is_none());
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/a/b-c.d"), "/a/b-c.d");
        assert_eq!(shell_quote("it's here"), r"'it'\''s here'");
        assert_eq!(shell_quote(""), "''");
    }
}
