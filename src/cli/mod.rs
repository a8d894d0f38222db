//! Command-line interface: argument parsing and dispatch; no logic of its own.

use std::process::ExitCode;

/// Entry point of the `mmrun` binary.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
