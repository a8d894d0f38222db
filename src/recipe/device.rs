//! `[recipe] device`: parsed once, when the recipe loads ([`DeviceSpec`]), and resolved once, by
//! the executor, to the [`DeviceClass`] the stage keys use.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a recipe computes: `auto`, `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA device 0 when this build has CUDA and it opens, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device `n`.
    Cuda(usize),
}

/// Why a device string is not a [`DeviceSpec`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown device '{0}'")]
pub struct UnknownDevice(pub String);

impl UnknownDevice {
    /// How to write it instead.
    pub const HINT: &'static str = "use \"auto\", \"cpu\" or \"cuda:N\"";
}

impl FromStr for DeviceSpec {
    type Err = UnknownDevice;

    /// Case and surrounding spaces are ignored (`" CPU "` is `cpu`).
    fn from_str(s: &str) -> Result<Self, UnknownDevice> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(UnknownDevice(s.to_string())),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = UnknownDevice;
    fn try_from(s: String) -> Result<Self, UnknownDevice> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl JsonSchema for DeviceSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DeviceSpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(auto|cpu|cuda(:[0-9]+)?)$",
            "description": "`auto` (CUDA if built with it and present, else CPU), `cpu`, or `cuda:N`"
        })
    }
}

impl DeviceSpec {
    /// The class this names without probing the machine; `None` for `auto`, which only the
    /// executor resolves (it may open a GPU to find out).
    pub fn explicit_class(self) -> Option<DeviceClass> {
        match self {
            DeviceSpec::Auto => None,
            DeviceSpec::Cpu => Some(DeviceClass::Cpu),
            DeviceSpec::Cuda(_) => Some(DeviceClass::Cuda),
        }
    }
}

/// What enters stage keys about the device: numerics differ between classes, not between two
/// GPUs of one machine (see `plan::key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    /// The CPU.
    Cpu,
    /// Any CUDA device.
    Cuda,
}

impl DeviceClass {
    /// `"cpu"` or `"cuda"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::Cpu => "cpu",
            DeviceClass::Cuda => "cuda",
        }
    }
}

impl fmt::Display for DeviceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_once_and_print_back() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!(" CPU ".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:1".parse(), Ok(DeviceSpec::Cuda(1)));
        for bad in ["tpu", "cuda:x", "cuda:", "gpu:0", ""] {
            assert_eq!(bad.parse::<DeviceSpec>(), Err(UnknownDevice(bad.to_string())), "{bad}");
        }
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert_eq!(DeviceSpec::Cuda(1).explicit_class(), Some(DeviceClass::Cuda));
        assert_eq!(DeviceSpec::Auto.explicit_class(), None);
    }
}
