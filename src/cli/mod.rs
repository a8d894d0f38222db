//! Command-line interface: argument parsing and dispatch; no logic of its own.
//!
//! Exit codes: 0 success, 1 a stage or command failed, 2 bad usage or a bad recipe, 130
//! interrupted (Ctrl-C; a checkpoint was saved).

use crate::exec::pipeline::{self, Paths, RecipeSource, RunEnd};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Train small MiniMind-style language models end to end from one TOML recipe.
#[derive(Debug, Parser)]
#[command(name = "mmrun", version, about, long_about = None)]
pub struct Cli {
    /// Override a recipe value, e.g. `--set stages.base.lr=3e-4` (repeatable; recorded in the run).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE", global = true)]
    pub set: Vec<String>,
    /// More log output (`-v` debug, `-vv` trace); `RUST_LOG` takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Cache directory (content-addressed artifacts, checkpoints, locks).
    #[arg(long, env = "MMRUN_HOME", default_value = ".mmrun", global = true)]
    pub home: PathBuf,
    /// Where run records are written.
    #[arg(long, env = "MMRUN_RUNS_DIR", default_value = "runs", global = true)]
    pub runs_dir: PathBuf,
    /// Who builds the stale stages: `local` (this process) or `slurm` (one `sbatch` job per stage,
    /// on a cache the nodes share); overrides `[recipe] executor`.
    #[arg(long, value_name = "local|slurm", global = true)]
    pub executor: Option<crate::recipe::ExecutorKind>,
    /// The command (`mmrun <recipe>` is short for `mmrun run <recipe>`).
    #[command(subcommand)]
    pub command: Command,
}

/// mmrun's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a recipe: build every stage that is not cached, record the run.
    Run {
        /// The recipe file.
        recipe: PathBuf,
    },
    /// Dry run: show each stage as cached / stale / missing, with the reasons.
    Plan {
        /// The recipe file.
        recipe: PathBuf,
        /// Print `{"stages":[{"name","kind","key","status","reasons"}]}`.
        #[arg(long)]
        json: bool,
        /// Explain one stage: why it is stale and everything that enters its key.
        #[arg(long, value_name = "STAGE")]
        why: Option<String>,
    },
    /// List past runs.
    Runs,
    /// What a run produced: eval table, generations, models and the commands to talk to them
    /// (the last run when none is named).
    Show {
        /// Run directory name or unique prefix.
        run: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Talk to a model in the terminal: streaming, multi-turn, `/reset`, `/save <file>`; one
    /// answer with `-p "…"` or from stdin when it is not a terminal.
    Chat(crate::infer::chat::ChatArgs),
    /// Serve models over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health) with a web chat page at /; 127.0.0.1:8998 by default.
    Serve(crate::serve::ServeArgs),
    /// Compare two runs: params, stage keys, metrics, loss curves, eval generations.
    Diff {
        /// First run (directory name or unique prefix).
        a: String,
        /// Second run.
        b: String,
    },
    /// Continue the last unfinished run (or the one named), with its recipe and overrides.
    Resume {
        /// Run directory name or unique prefix.
        run: Option<String>,
    },
    /// Measure training and generation speed on this machine (tokens/s, MFU, memory).
    Bench(crate::train::bench::BenchArgs),
    /// Re-resolve the recipe's `hf://` inputs (datasets, adopted tokenizers, models) to their
    /// branches' current commits and rewrite the lock file next to the recipe (all, or only the
    /// one named). Until then a moved branch changes nothing.
    Update {
        /// The recipe file.
        recipe: PathBuf,
        /// Only the input with this name (a dataset, a tokenizer stage or a model).
        #[arg(value_name = "NAME")]
        dataset: Option<String>,
    },
    /// Export a model as a transformers folder (with a model card), a GGUF file or an Ollama folder.
    Export {
        /// The model: a stage of --recipe, `<run>:<stage>`, a local folder, or `hf://<owner>/<name>[@rev]`.
        model: String,
        /// Output format.
        #[arg(long, value_enum)]
        to: crate::export::Format,
        /// Target folder (must not exist unless --force).
        dir: PathBuf,
        /// GGUF tensor type (gguf and ollama).
        #[arg(long, value_enum, default_value = "f16")]
        dtype: crate::export::GgufDtype,
        /// Replace an existing target folder (only once the new export is complete).
        #[arg(long)]
        force: bool,
        /// For a LoRA stage: export the PEFT adapter instead of the merged model.
        #[arg(long)]
        adapter: bool,
        /// Recipe whose stage names `model` may use.
        #[arg(long)]
        recipe: Option<PathBuf>,
    },
    /// Upload a model to a Hugging Face Hub model repository as one commit (needs HF_TOKEN with
    /// write access). Stages, runs and Hub models are exported with `--to hf` first; a folder
    /// (config.json + safetensors) is pushed as it is. Large files already on the Hub are not sent
    /// again, so rerunning an interrupted push resumes it.
    Push {
        /// The model: a stage of --recipe, `<run>:<stage>`, a local folder, or `hf://<owner>/<name>[@rev]`.
        model: String,
        /// The repository: `hf://<owner>/<name>[@<branch>]` (created if missing; the branch must exist).
        target: String,
        /// Commit summary (default: "Upload <model> with mmrun").
        #[arg(long, short)]
        message: Option<String>,
        /// Create the repository private (an existing one keeps its visibility).
        #[arg(long)]
        private: bool,
        /// For a LoRA stage: push the PEFT adapter instead of the merged model.
        #[arg(long)]
        adapter: bool,
        /// Recipe whose stage names `model` may use.
        #[arg(long)]
        recipe: Option<PathBuf>,
    },
    /// Free every cache entry no run record references and no running mmrun uses (objects,
    /// shards, builtin data, checkpoints, temporary files, locks, old cache layouts).
    Gc {
        /// Only report what would be removed, bucket by bucket.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check every cache entry (objects, shards, builtin data) against its manifest: each file's
    /// size and blake3. Exits 1 when something is damaged, unless `--repair` removed it.
    Verify {
        /// Remove damaged entries, so the next run rebuilds them.
        #[arg(long)]
        repair: bool,
    },
    /// Upload a run's stage artifacts to the remote cache (its recipe's `[cache] remote`, or
    /// `--remote`): content first, each manifest last and only if the remote has none yet.
    PushCache {
        /// Run id (or a unique part of it) or run directory.
        run: String,
        /// `s3://<bucket>/<prefix>` or `file:///<path>` instead of the recipe's.
        #[arg(long)]
        remote: Option<String>,
    },
    /// Download a run's stage artifacts from the remote cache into this one, checking every
    /// file's blake3. Exits 1 when the remote lacks some of them.
    PullCache {
        /// Run id (or a unique part of it) or run directory.
        run: String,
        /// `s3://<bucket>/<prefix>` or `file:///<path>` instead of the recipe's.
        #[arg(long)]
        remote: Option<String>,
    },
    /// Build one stage of a run (what a Slurm job runs; not for direct use).
    #[command(hide = true)]
    StageJob {
        /// The run directory (its run.json has the recipe and overrides).
        run_dir: PathBuf,
        /// The stage.
        stage: String,
        /// The key the stage was submitted under (refused if the stage's key is now different).
        #[arg(long)]
        key: String,
    },
}

const SUBCOMMANDS: &[&str] = &[
    "run",
    "plan",
    "runs",
    "show",
    "chat",
    "serve",
    "diff",
    "resume",
    "bench",
    "update",
    "export",
    "push",
    "gc",
    "verify",
    "push-cache",
    "pull-cache",
    "stage-job",
    "help",
];
/// Global options that take a value (so the shorthand detection skips their values).
const VALUE_OPTS: &[&str] = &["--set", "--home", "--runs-dir", "--executor"];

/// Insert `run` before the first positional argument when it is not a subcommand, so
/// `mmrun recipe.toml` means `mmrun run recipe.toml`.
pub fn expand_shorthand(args: Vec<String>) -> Vec<String> {
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            break;
        }
        if a.starts_with('-') {
            if VALUE_OPTS.contains(&a.as_str()) {
                i += 1;
            }
            i += 1;
            continue;
        }
        if !SUBCOMMANDS.contains(&a.as_str()) {
            let mut out = args.clone();
            out.insert(i, "run".into());
            return out;
        }
        break;
    }
    args
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,mmrun=info",
        1 => "info,mmrun=debug",
        _ => "debug,mmrun=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(verbose > 0);
    let _ = if verbose > 0 { builder.try_init() } else { builder.without_time().try_init() };
}

/// Entry point of the `mmrun` binary.
pub fn main() -> ExitCode {
    let args = expand_shorthand(std::env::args().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(cli.verbose);
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// Print an error (recipe diagnostics as rendered by the loader, others as `error: a: b: c`)
/// and choose the exit code.
fn report(e: &anyhow::Error) -> ExitCode {
    if let Some(re) = e.downcast_ref::<crate::recipe::RecipeError>() {
        if matches!(re, crate::recipe::RecipeError::Invalid(_)) {
            eprintln!("{re}");
            return ExitCode::from(2);
        }
    }
    eprintln!("error: {}", chain_text(e));
    ExitCode::from(1)
}

/// An error and its causes joined by ": ", like anyhow's `{:#}`, except that a cause whose text the
/// message before it already contains is left out: our thiserror messages end with `{source}`, and
/// anyhow's rendering then printed the same sentence twice.
fn chain_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if prev.is_empty() || !prev.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        prev = text;
    }
    out
}

fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    let paths = Paths { home: cli.home.clone(), runs_dir: cli.runs_dir.clone() };
    let opts = pipeline::RunOptions { executor: cli.executor };
    match &cli.command {
        Command::Run { recipe } => {
            let src = RecipeSource { path: recipe.clone(), overrides: cli.set.clone(), text: None };
            finish(pipeline::run_with(&src, &paths, &opts)?, &paths)
        }
        Command::Plan { recipe, json, why } => {
            let cache = crate::cache::Cache::open(&paths.home)
                .with_context(|| format!("opening the cache {}", paths.home.display()))?;
            let src = RecipeSource { path: recipe.clone(), overrides: cli.set.clone(), text: None };
            let (recipe, pipeline::Prepared { plan, .. }) = pipeline::make_plan(&src, &cache)?;
            // Locked Hub inputs stay pinned; tell the user when their branch has moved since
            // (one small request per input; nothing when offline).
            match crate::hub::lock::check_recipe(&recipe.path, &crate::hub::HubOptions::from_env()) {
                Ok(moved) => moved.iter().for_each(|m| eprintln!("note: {m}")),
                Err(e) => eprintln!("warning: could not check whether locked Hub branches moved: {e}"),
            }
            if let Some(stage) = why {
                print!("{}", pipeline::plan_why(&plan, stage)?);
            } else if *json {
                println!("{}", serde_json::to_string_pretty(&pipeline::plan_json(&plan))?);
            } else {
                print!("{}", pipeline::plan_text(&recipe, &plan));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs => {
            print!("{}", format_runs(&crate::runs::list_runs(&paths.runs_dir)?));
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { run, json } => {
            let target = match run {
                Some(name) => crate::runs::find_run(&paths.runs_dir, name)?,
                None => crate::runs::list_runs(&paths.runs_dir)?
                    .pop()
                    .ok_or_else(|| anyhow::anyhow!("no runs in {} yet", paths.runs_dir.display()))?,
            };
            let report = crate::runs::show_run(&target, crate::cache::Cache::open(&paths.home).ok().as_ref());
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::runs::render_show(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Chat(args) => {
            let model = model_ref(&args.model, &paths)?;
            crate::infer::chat::run(args.clone(), &model)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let models = args.models.iter().map(|m| model_ref(m, &paths)).collect::<anyhow::Result<Vec<_>>>()?;
            let runs = crate::serve::RunsDir { runs_dir: paths.runs_dir.clone(), home: paths.home.clone() };
            crate::serve::run(args.clone(), &models, runs)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b } => {
            let ra = crate::runs::find_run(&paths.runs_dir, a)?;
            let rb = crate::runs::find_run(&paths.runs_dir, b)?;
            let cache = crate::cache::Cache::open(&paths.home).ok();
            print!("{}", crate::runs::diff_runs(&ra, &rb, &crate::runs::DiffOptions { cache, loss_points: 8 }));
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { run } => {
            let target = match run {
                Some(name) => crate::runs::find_run(&paths.runs_dir, name)?,
                None => crate::runs::last_unfinished(&crate::runs::list_runs(&paths.runs_dir)?).ok_or_else(|| {
                    anyhow::anyhow!("no unfinished run in {}; nothing to resume", paths.runs_dir.display())
                })?,
            };
            let rec = &target.record;
            if !cli.set.is_empty() {
                anyhow::bail!(
                    "`resume` replays the run's own overrides {:?}; drop --set (or use `mmrun run`)",
                    rec.overrides
                );
            }
            eprintln!("resuming {} ({})", rec.id, rec.recipe_path);
            let src = RecipeSource {
                path: rec.recipe_path.clone().into(),
                overrides: rec.overrides.clone(),
                text: Some(rec.recipe_text.clone()),
            };
            finish(pipeline::run_with(&src, &paths, &opts)?, &paths)
        }
        Command::Bench(args) => {
            let json = args.json;
            let v = crate::train::bench::run(args.clone())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", crate::train::bench::render_text(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Update { recipe, dataset } => {
            let src = RecipeSource { path: recipe.clone(), overrides: cli.set.clone(), text: None };
            let lock = pipeline::update(&src, dataset.as_deref())?;
            println!("updated {}:", crate::hub::lock::lock_path(recipe).display());
            for kind in crate::hub::RemoteKind::ALL {
                for (name, d) in lock.table(kind) {
                    println!("  {} {name}: {} @ {} ({} files)", kind.noun(), d.uri, d.commit, d.files.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { model, to, dir, dtype, force, adapter, recipe } => {
            let src = recipe.as_ref().map(|p| RecipeSource { path: p.clone(), overrides: cli.set.clone(), text: None });
            let resolved = pipeline::resolve_model(model, &paths, src.as_ref())?;
            let opts = crate::export::ExportOptions {
                format: *to,
                out: dir.clone(),
                dtype: *dtype,
                force: *force,
                adapter: *adapter,
                runs_dir: Some(paths.runs_dir.clone()),
            };
            let out = crate::export::export(&resolved, &opts)?;
            println!("exported {} ({}) to {}", resolved.reference, resolved.origin, out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Push { model, target, message, private, adapter, recipe } => {
            // Everything that can be refused without the network is refused before any request.
            let target = crate::hub::push::PushTarget::parse(target)?;
            let hub = crate::hub::HubOptions::from_env();
            crate::hub::push::require_token(&target, &hub)?;
            let src = recipe.as_ref().map(|p| RecipeSource { path: p.clone(), overrides: cli.set.clone(), text: None });
            let resolved = pipeline::resolve_model(model, &paths, src.as_ref())?;
            let tmp;
            let dir = match &resolved.origin {
                crate::modelref::Origin::Folder(dir) if !*adapter => dir.clone(),
                _ => {
                    tmp = tempfile::tempdir().context("creating a temporary folder for the export")?;
                    let opts = crate::export::ExportOptions {
                        format: crate::export::Format::Hf,
                        out: tmp.path().join("model"),
                        dtype: crate::export::GgufDtype::F16,
                        force: false,
                        adapter: *adapter,
                        runs_dir: Some(paths.runs_dir.clone()),
                    };
                    crate::export::export(&resolved, &opts)
                        .with_context(|| format!("exporting {} before pushing it", resolved.reference))?
                }
            };
            // A local folder's path stays out of the public commit (its name is enough); stages,
            // runs and Hub models are named in full.
            let (name, from) = match &resolved.origin {
                crate::modelref::Origin::Folder(p) => {
                    (p.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned()), String::new())
                }
                origin => (resolved.reference.clone(), format!(" from {origin}")),
            };
            let opts = crate::hub::push::PushOptions {
                message: message.clone().unwrap_or_else(|| format!("Upload {name} with mmrun")),
                description: format!("Pushed by mmrun {}{from}.", crate::VERSION),
                private: *private,
            };
            let pushed = crate::hub::push::push_folder(&dir, &target, &hub, &opts)?;
            println!(
                "pushed {} ({}) to {target}: {} files, {} large files uploaded, {} already on the Hub",
                resolved.reference, resolved.origin, pushed.files, pushed.uploaded, pushed.already_there
            );
            println!("commit {}", pushed.commit_oid);
            if !pushed.commit_url.is_empty() {
                println!("{}", pushed.commit_url);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::PushCache { run, remote } => {
            let s = pipeline::push_cache(&paths, run, remote.as_deref())?;
            eprintln!(
                "push-cache: {} pushed, {} already there, {} not in the local cache ({})",
                s.moved, s.already, s.missing, s.url
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::PullCache { run, remote } => {
            let s = pipeline::pull_cache(&paths, run, remote.as_deref())?;
            eprintln!(
                "pull-cache: {} downloaded, {} already here, {} not on the remote ({})",
                s.moved, s.already, s.missing, s.url
            );
            Ok(if s.missing == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::StageJob { run_dir, stage, key } => {
            Ok(match pipeline::run_stage_job(run_dir, stage, key, &paths.home)? {
                pipeline::StageJobEnd::Done => ExitCode::SUCCESS,
                pipeline::StageJobEnd::Failed(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(1)
                }
                pipeline::StageJobEnd::Interrupted => ExitCode::from(130),
            })
        }
        Command::Gc { dry_run } => {
            let cache = crate::cache::Cache::open(&paths.home)
                .with_context(|| format!("opening the cache {}", paths.home.display()))?;
            // Read under gc's lock, so a run finishing meanwhile is accounted for.
            let r = cache.gc(|| anyhow::Ok(crate::runs::referenced_keys(&paths.runs_dir)?), *dry_run)?;
            print!("{}", format_gc(&r, *dry_run, &paths.runs_dir));
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { repair } => {
            let cache = crate::cache::Cache::open(&paths.home)
                .with_context(|| format!("opening the cache {}", paths.home.display()))?;
            let r = cache.verify_all(*repair)?;
            print!("{}", format_verify(&r));
            Ok(if r.damaged.is_empty() || *repair { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// A model reference (run stage, folder, Hub repository) as a loadable full model.
fn model_ref(reference: &str, paths: &Paths) -> anyhow::Result<crate::infer::ModelRef> {
    let resolved = pipeline::resolve_model(reference, paths, None)?;
    Ok(crate::infer::ModelRef::from_resolved(&resolved)?)
}

fn finish(end: RunEnd, paths: &Paths) -> anyhow::Result<ExitCode> {
    Ok(match end {
        RunEnd::Succeeded { run_dir, .. } => {
            // What the run produced, on stdout (the progress and "done" lines went to stderr).
            match crate::runs::find_run(&paths.runs_dir, &run_dir.display().to_string()) {
                Ok(run) => {
                    let cache = crate::cache::Cache::open(&paths.home).ok();
                    print!("{}", crate::runs::render_show(&crate::runs::show_run(&run, cache.as_ref())));
                }
                Err(e) => eprintln!("warning: could not read back the run record: {e}"),
            }
            ExitCode::SUCCESS
        }
        RunEnd::Failed { run_dir, error } => {
            eprintln!("error: {error:#}");
            eprintln!("run record: {}", run_dir.display());
            // A recipe the machine cannot run (GPUs it lacks) is a usage error, as at load time.
            let usage = matches!(error.downcast_ref(), Some(crate::recipe::RecipeError::Invalid(_)));
            ExitCode::from(if usage { 2 } else { 1 })
        }
        RunEnd::Interrupted { run_dir } => {
            eprintln!(
                "interrupted; run the same command or `mmrun resume` to continue (run record: {})",
                run_dir.display()
            );
            ExitCode::from(130)
        }
    })
}

/// `mmrun runs` table.
pub fn format_runs(runs: &[crate::runs::RunSummary]) -> String {
    use crate::runs::StageStatus;
    use std::fmt::Write;
    if runs.is_empty() {
        return "no runs yet\n".into();
    }
    let w = runs.iter().map(|r| r.record.id.len()).max().unwrap_or(10);
    let mut s =
        format!("{:w$}  {:12}  {:11}  {:>3} {:>6}  {:>8}\n", "run", "recipe", "status", "ran", "cached", "seconds");
    for r in runs {
        let _ = writeln!(
            s,
            "{:w$}  {:12}  {:11}  {:>3} {:>6}  {:>8.1}",
            r.record.id,
            r.record.recipe_name,
            r.record.effective_status(),
            r.count(StageStatus::Ran),
            r.count(StageStatus::Cached),
            r.record.seconds
        );
    }
    s
}

/// `mmrun gc` report: one line per bucket.
pub fn format_gc(r: &crate::cache::GcReport, dry_run: bool, runs_dir: &std::path::Path) -> String {
    use std::fmt::Write;
    let head = if dry_run { "would free" } else { "freed" };
    let mut s = format!("{:16}  {:>7} {:>10}  {:>7} {:>10}\n", "bucket", "removed", head, "kept", "kept size");
    for (name, b) in &r.buckets {
        let _ = writeln!(
            s,
            "{name:16}  {:>7} {:>10}  {:>7} {:>10}",
            b.removed,
            human_bytes(b.freed_bytes),
            b.kept,
            human_bytes(b.kept_bytes)
        );
    }
    let verb = if dry_run { "would free" } else { "freed" };
    let _ = writeln!(
        s,
        "{verb} {} in total; kept what run records in {} reference and running mmrun processes use",
        human_bytes(r.freed_bytes()),
        runs_dir.display()
    );
    s
}

/// `mmrun verify` report.
pub fn format_verify(r: &crate::cache::VerifyReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for (bucket, key, damage) in &r.damaged {
        let fate = if r.repaired { "removed; the next run rebuilds it" } else { "damaged" };
        let _ = writeln!(s, "{bucket}/{key}: {fate}: {damage}");
    }
    let _ = write!(s, "checked {} entries ({}): {} damaged", r.checked, human_bytes(r.bytes), r.damaged.len());
    if r.busy > 0 {
        let _ = write!(s, ", {} skipped (being built by another mmrun)", r.busy);
    }
    if !r.damaged.is_empty() && !r.repaired {
        s.push_str("; `mmrun verify --repair` removes them so the next run rebuilds them");
    }
    s.push('\n');
    s
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shorthand_inserts_run_before_a_recipe() {
        assert_eq!(expand_shorthand(v(&["mmrun", "r.toml"])), v(&["mmrun", "run", "r.toml"]));
        assert_eq!(
            expand_shorthand(v(&["mmrun", "--set", "a.b=1", "-v", "r.toml"])),
            v(&["mmrun", "--set", "a.b=1", "-v", "run", "r.toml"])
        );
        assert_eq!(expand_shorthand(v(&["mmrun", "plan", "r.toml"])), v(&["mmrun", "plan", "r.toml"]));
        assert_eq!(expand_shorthand(v(&["mmrun", "--help"])), v(&["mmrun", "--help"]));
    }

    #[test]
    fn parses_global_options_anywhere() {
        let cli = Cli::try_parse_from(v(&["mmrun", "run", "r.toml", "--set", "x.y=2", "--set", "z=3", "--home", "h"]))
            .unwrap();
        assert_eq!(cli.set, ["x.y=2", "z=3"]);
        assert_eq!(cli.home, PathBuf::from("h"));
        assert!(matches!(cli.command, Command::Run { .. }));
        let cli = Cli::try_parse_from(v(&["mmrun", "plan", "r.toml", "--why", "base"])).unwrap();
        assert!(matches!(cli.command, Command::Plan { why: Some(ref s), json: false, .. } if s == "base"));
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("could not reach the Hub")]
        struct Io;
        #[derive(Debug, thiserror::Error)]
        #[error("dataset d: {source}")]
        struct Fetch {
            source: Io,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("bad lock")]
        struct Lock {
            #[source]
            source: Io,
        }
        let e = anyhow::Error::new(Fetch { source: Io }).context("fetching");
        assert_eq!(format!("{e:#}"), "fetching: dataset d: could not reach the Hub: could not reach the Hub");
        assert_eq!(chain_text(&e), "fetching: dataset d: could not reach the Hub");
        // A cause its parent does not repeat is kept.
        let e = anyhow::Error::new(Lock { source: Io }).context("loading");
        assert_eq!(chain_text(&e), "loading: bad lock: could not reach the Hub");
    }

    #[test]
    fn human_bytes_is_readable() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
    }
}
