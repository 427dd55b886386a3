//! The error type of the crate.

use std::time::Duration;

/// Errors from compiling a payload formatter or from one of its calls.
///
/// [`ScriptError::Timeout`], [`ScriptError::OutOfMemory`] and
/// [`ScriptError::StackOverflow`] mean that the script hit a resource limit.
/// After one of them the [`Decoder`](crate::Decoder) throws away the script's
/// global state and evaluates the source again before its next call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScriptError {
    /// A value in [`Limits`](crate::Limits) cannot be used.
    #[error("invalid limit {name}: {message}")]
    InvalidLimit {
        /// Field name in `Limits`.
        name: &'static str,
        /// Description of the problem and of the accepted values.
        message: String,
    },

    /// The source is longer than [`Limits::max_source_bytes`](crate::Limits::max_source_bytes).
    #[error(
        "the script is {size} bytes long, more than the limit of {limit} bytes; shorten it or raise max_source_bytes"
    )]
    SourceTooLarge {
        /// Length of the source in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// The source is not valid JavaScript.
    #[error("syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// The parser's message.
        message: String,
        /// 1-based line in the source.
        line: u32,
        /// 1-based column in the source.
        column: u32,
    },

    /// The script does not define a function that the call needs.
    #[error(
        "the script defines no function {name}; define `function {name}(input)` at the top level"
    )]
    MissingFunction {
        /// `decodeUplink`, `encodeDownlink` or `decodeDownlink`.
        name: &'static str,
    },

    /// An exception was thrown and not caught inside the script.
    #[error("{function} threw {message}{}", format_location(*line, *column))]
    Exception {
        /// The function that was called, or `top-level code` while compiling.
        function: &'static str,
        /// The error name and message, such as `TypeError: cannot read
        /// property 'x' of undefined`, or the thrown value as text.
        message: String,
        /// 1-based line of the innermost stack frame in the script, if known.
        line: Option<u32>,
        /// 1-based column of that frame, if known.
        column: Option<u32>,
    },

    /// The call ran longer than [`Limits::max_run_time`](crate::Limits::max_run_time).
    #[error(
        "{function} did not finish within {limit:?}; look for an endless loop or raise max_run_time"
    )]
    Timeout {
        /// The function that was called, or `top-level code` while compiling.
        function: &'static str,
        /// The configured limit.
        limit: Duration,
    },

    /// The script needed more memory than [`Limits::max_memory_bytes`](crate::Limits::max_memory_bytes).
    #[error("{function} ran out of memory: the limit is {limit} bytes")]
    OutOfMemory {
        /// The function that was called, or `top-level code` while compiling.
        function: &'static str,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// The script recursed deeper than [`Limits::max_stack_bytes`](crate::Limits::max_stack_bytes) allows.
    #[error(
        "{function} exceeded the stack limit of {limit} bytes; look for endless recursion or raise max_stack_bytes"
    )]
    StackOverflow {
        /// The function that was called, or `top-level code` while compiling.
        function: &'static str,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// The script returned a non-empty `errors` array, which means that
    /// decoding or encoding failed.
    #[error("{function} returned errors: {}", errors.join("; "))]
    ReturnedErrors {
        /// The function that was called.
        function: &'static str,
        /// The script's error messages.
        errors: Vec<String>,
        /// The script's warnings, kept because they often explain the errors.
        warnings: Vec<String>,
    },

    /// The script returned a value that does not follow the codec contract,
    /// or one that JSON cannot represent.
    #[error("{function} returned an invalid result: {message}")]
    BadResult {
        /// The function that was called.
        function: &'static str,
        /// Description of the problem, naming the offending key such as
        /// `data.sensors[1]`.
        message: String,
    },

    /// The result, counted as JSON text, is larger than
    /// [`Limits::max_output_bytes`](crate::Limits::max_output_bytes).
    #[error("{function} returned more than {limit} bytes of output")]
    OutputTooLarge {
        /// The function that was called.
        function: &'static str,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// The caller passed an input that the script cannot receive.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The JavaScript engine failed in a way that none of the other variants
    /// describes, for example when a conversion between Rust and JavaScript
    /// values fails.
    #[error("JavaScript engine error in {function}: {message}")]
    Engine {
        /// The function that was called, or `top-level code` while compiling.
        function: &'static str,
        /// The engine's message.
        message: String,
    },
}

impl ScriptError {
    /// Returns true for the errors after which the decoder evaluates the
    /// source again: a timeout, memory exhaustion or a stack overflow.
    pub fn is_resource_limit(&self) -> bool {
        matches!(
            self,
            ScriptError::Timeout { .. }
                | ScriptError::OutOfMemory { .. }
                | ScriptError::StackOverflow { .. }
        )
    }
}

fn format_location(line: Option<u32>, column: Option<u32>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(" at line {line}, column {column}"),
        (Some(line), None) => format!(" at line {line}"),
        _ => String::new(),
    }
}
