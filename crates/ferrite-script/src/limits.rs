//! Resource limits for one compiled script.

use std::time::Duration;

use crate::ScriptError;

/// Resource limits of one [`Decoder`](crate::Decoder).
///
/// Every limit applies separately to each call and to the evaluation of the
/// top-level code when the script is compiled. Zero is rejected for every
/// field, because QuickJS reads a zero memory or stack limit as "no limit".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time one call may take, including the conversion of its
    /// result. Default: 100 ms.
    pub max_run_time: Duration,
    /// Memory that the JavaScript runtime may allocate, counted by QuickJS's
    /// allocator. The runtime, its built-in objects and the compiled script
    /// take part of it (about 100 KiB for the built-ins alone).
    /// Default: 16 MiB.
    pub max_memory_bytes: usize,
    /// Native stack that the interpreter may use below the frame that starts
    /// a call. The calling thread needs this much free stack plus about
    /// 64 KiB for the frames of this crate and QuickJS's entry points.
    /// Default: 512 KiB, enough for about 800 nested JavaScript calls (each
    /// took about 640 bytes with QuickJS-ng 0.16 on x86-64).
    pub max_stack_bytes: usize,
    /// Maximum length of the source code in bytes. The Things Stack limits
    /// formatters typed into its console to 40 KiB but accepts larger ones
    /// from its device repository. Default: 1 MiB.
    pub max_source_bytes: usize,
    /// Maximum size of a call's result counted as JSON text, including
    /// warnings and error messages. Default: 256 KiB.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_run_time: Duration::from_millis(100),
            max_memory_bytes: 16 * 1024 * 1024,
            max_stack_bytes: 512 * 1024,
            max_source_bytes: 1024 * 1024,
            max_output_bytes: 256 * 1024,
        }
    }
}

impl Limits {
    /// Checks that every limit can be used.
    pub fn validate(&self) -> Result<(), ScriptError> {
        if self.max_run_time.is_zero() {
            return Err(invalid("max_run_time", "must be greater than zero"));
        }
        if self.max_memory_bytes == 0 {
            return Err(invalid("max_memory_bytes", "must be greater than zero"));
        }
        if self.max_stack_bytes == 0 {
            return Err(invalid("max_stack_bytes", "must be greater than zero"));
        }
        if self.max_source_bytes == 0 {
            return Err(invalid("max_source_bytes", "must be greater than zero"));
        }
        if self.max_output_bytes == 0 {
            return Err(invalid("max_output_bytes", "must be greater than zero"));
        }
        Ok(())
    }
}

fn invalid(name: &'static str, message: &str) -> ScriptError {
    ScriptError::InvalidLimit {
        name,
        message: message.to_owned(),
    }
}
