//! Where stages run: `[recipe] executor` and the resources a stage asks a cluster scheduler for
//! (`[recipe.resources]` as recipe-wide defaults, `[stages.<name>.resources]` per stage).
//!
//! None of this enters a stage key: where and with how much a stage runs does not change what it
//! produces.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[recipe] executor` / `--executor`: who runs the stale stages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// In this process, one stage after another (default).
    #[default]
    Local,
    /// Each stale stage as one Slurm batch job (`sbatch`), chained with `afterok` dependencies.
    Slurm,
}

impl ExecutorKind {
    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(ExecutorKind::Local),
            "slurm" => Ok(ExecutorKind::Slurm),
            other => Err(format!("unknown executor '{other}' (use local or slurm)")),
        }
    }
}

/// What a stage asks the scheduler for. Every field is optional: unset fields take the recipe-wide
/// default (`[recipe.resources]`), then the cluster's own default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs on the node (`--gres=gpu:N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// CPU cores (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory (`--mem`): a number with an optional unit K, M, G or T, e.g. "16G" (default unit M).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// Time limit (`--time`): "minutes", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM" or "D-HH:MM:SS".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Partition (`--partition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
}

/// A resource value that Slurm would refuse: the field and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceError {
    /// The key inside `resources`.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
    /// What to write instead.
    pub hint: String,
}

impl Resources {
    /// `self`'s fields, falling back to `defaults` field by field.
    pub fn over(&self, defaults: &Resources) -> Resources {
        Resources {
            gpus: self.gpus.or(defaults.gpus),
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.clone().or_else(|| defaults.mem.clone()),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            partition: self.partition.clone().or_else(|| defaults.partition.clone()),
        }
    }

    /// Check every field has a form Slurm accepts, so a typo fails when the recipe loads rather
    /// than at submission, half-way through a pipeline.
    pub fn validate(&self) -> Vec<ResourceError> {
        let mut errs = Vec::new();
        if self.gpus == Some(0) {
            errs.push(ResourceError {
                key: "gpus",
                message: "gpus = 0 asks for no GPU".into(),
                hint: "remove gpus, or ask for 1 or more".into(),
            });
        }
        if self.cpus == Some(0) {
            errs.push(ResourceError {
                key: "cpus",
                message: "cpus = 0 asks for no CPU".into(),
                hint: "remove cpus, or ask for 1 or more".into(),
            });
        }
        if let Some(m) = &self.mem {
            if !valid_mem(m) {
                errs.push(ResourceError {
                    key: "mem",
                    message: format!("mem = \"{m}\" is not a memory size"),
                    hint: "write a whole number with an optional unit K, M, G or T, e.g. \"16G\"".into(),
                });
            }
        }
        if let Some(t) = &self.time {
            if !valid_time(t) {
                errs.push(ResourceError {
                    key: "time",
                    message: format!("time = \"{t}\" is not a Slurm time limit"),
                    hint: "write minutes (\"90\"), \"HH:MM:SS\" or \"D-HH:MM:SS\", e.g. \"2:00:00\"".into(),
                });
            }
        }
        if let Some(p) = &self.partition {
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
                errs.push(ResourceError {
                    key: "partition",
                    message: format!("partition = \"{p}\" is not a partition name"),
                    hint: "use the name `sinfo` lists (letters, digits, '_', '-', '.')".into(),
                });
            }
        }
        errs
    }

    /// The `sbatch` options asking for these resources.
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(p) = &self.partition {
            a.push(format!("--partition={p}"));
        }
        if let Some(g) = self.gpus {
            a.push(format!("--gres=gpu:{g}"));
        }
        if let Some(c) = self.cpus {
            a.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &self.mem {
            a.push(format!("--mem={m}"));
        }
        if let Some(t) = &self.time {
            a.push(format!("--time={t}"));
        }
        a
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn valid_mem(m: &str) -> bool {
    let num = m.strip_suffix(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']).unwrap_or(m);
    digits(num) && num.parse::<u64>().is_ok_and(|n| n > 0)
}

/// Slurm's `--time` forms: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.
fn valid_time(t: &str) -> bool {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    if days.is_some_and(|d| !digits(d)) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    parts.len() <= 3 && parts.iter().all(|p| digits(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_fields_win_over_defaults() {
        let d = Resources { partition: Some("gpu".into()), time: Some("1:00:00".into()), ..Default::default() };
        let s = Resources { gpus: Some(2), time: Some("10".into()), ..Default::default() };
        let r = s.over(&d);
        assert_eq!(r.sbatch_args(), ["--partition=gpu", "--gres=gpu:2", "--time=10"]);
    }

    #[test]
    fn slurm_forms_are_accepted_and_typos_refused() {
        for t in ["90", "30:00", "2:00:00", "1-0", "1-12:00", "2-00:00:00"] {
            assert!(valid_time(t), "{t}");
        }
        for t in ["", "1h", "1-", "a:00", "1:2:3:4", "-1"] {
            assert!(!valid_time(t), "{t}");
        }
        for m in ["16G", "500M", "1024", "2t"] {
            assert!(valid_mem(m), "{m}");
        }
        for m in ["", "16GB", "1.5G", "0", "G"] {
            assert!(!valid_mem(m), "{m}");
        }
        let r =
            Resources { gpus: Some(0), mem: Some("lots".into()), partition: Some("a b".into()), ..Default::default() };
        let keys: Vec<&str> = r.validate().iter().map(|e| e.key).collect();
        assert_eq!(keys, ["gpus", "mem", "partition"]);
    }
}
