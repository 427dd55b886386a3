//! One QuickJS runtime and context holding an evaluated script, and the
//! guard that runs code in it under the time limit.
//!
//! Ownership and shutdown: an [`Engine`] owns a [`Sandbox`] (the runtime and
//! its single context) and a saved reference to the original `Date`
//! constructor. Fields drop in declaration order, so the saved reference is
//! released before the context and the context before the runtime. QuickJS
//! aborts the process if a runtime is freed while a job (a promise reaction
//! or a `queueMicrotask` callback) is still queued, so [`Sandbox`] runs or
//! discards every queued job before it is dropped.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use rquickjs::context::{EvalOptions, intrinsic};
use rquickjs::{CaughtError, Constructor, Context, Ctx, Persistent, Runtime, Type, Value, qjs};

use crate::{Limits, ScriptError};

/// File name under which the script is compiled; stack traces and syntax
/// errors refer to it.
pub(crate) const SCRIPT_NAME: &str = "decoder.js";

/// Name used in errors for the evaluation of the script's top-level code.
pub(crate) const TOP_LEVEL: &str = "top-level code";

/// Maximum length in bytes of an exception message kept in a [`ScriptError`].
const MAX_MESSAGE_BYTES: usize = 1024;

/// Built-in objects added on top of QuickJS's base objects (`Object`,
/// `Function`, `Array`, `String`, `Number`, `Boolean`, `Symbol`, `BigInt`,
/// `Math`, `Reflect`, `Iterator`, the `Error` types and the global functions
/// such as `parseInt`). Left out: `Proxy`, `WeakRef` and
/// `FinalizationRegistry`, and `performance`, because a payload formatter has
/// no use for them.
type Intrinsics = (
    intrinsic::Date,
    intrinsic::Eval,
    intrinsic::RegExpCompiler,
    intrinsic::RegExp,
    intrinsic::Json,
    intrinsic::MapSet,
    intrinsic::TypedArrays,
    intrinsic::Promise,
);

/// Script evaluated before the formatter. It defines a `console` whose
/// methods discard their arguments, and it guards the built-in methods that
/// the time limit cannot interrupt (see the comments in the file).
const PRELUDE: &str = include_str!("prelude.js");

/// Reason a call failed, before it is turned into a [`ScriptError`].
#[derive(Debug)]
pub(crate) enum Failure {
    /// An error from rquickjs; `Error::Exception` means a JavaScript
    /// exception is pending in the context.
    Js(rquickjs::Error),
    /// An error that this crate detected, such as an invalid result.
    Script(ScriptError),
}

impl From<rquickjs::Error> for Failure {
    fn from(error: rquickjs::Error) -> Self {
        Failure::Js(error)
    }
}

impl From<ScriptError> for Failure {
    fn from(error: ScriptError) -> Self {
        Failure::Script(error)
    }
}

/// A runtime with its single context.
struct Sandbox {
    context: Context,
    runtime: Runtime,
    watch: Watch,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.runtime.is_job_pending() {
            return;
        }

        // A memory limit of one byte makes every allocation fail, and queuing
        // a job allocates, so each job that runs here can queue no other and
        // the loop ends after the jobs already queued. The interrupt handler
        // stops any job at its next check.
        self.watch.expire();
        self.runtime.set_memory_limit(1);
        const MAX_DISCARDED_JOBS: usize = 1_000_000;
        for _ in 0..MAX_DISCARDED_JOBS {
            if !self.runtime.is_job_pending() {
                return;
            }
            // The job's outcome is ignored, because its script is discarded.
            let _ = self.runtime.execute_pending_job();
        }

        // NOTE: never reached in the tests. Keeping an extra reference to
        // the runtime and context leaks them, which is better than the
        // process abort that freeing them with queued jobs would cause.
        std::mem::forget(self.context.clone());
        std::mem::forget(self.runtime.clone());
    }
}

/// Deadline shared with QuickJS's interrupt handler.
#[derive(Clone)]
struct Watch {
    deadline: Rc<Cell<Option<Instant>>>,
    interrupted: Rc<Cell<bool>>,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            deadline: Rc::new(Cell::new(None)),
            interrupted: Rc::new(Cell::new(false)),
        }
    }

    /// Builds the handler that QuickJS calls once per 10,000 function calls
    /// and loop iterations, and regularly during regular expression matching.
    /// Returning true raises an exception that scripts cannot catch.
    fn interrupt_handler(&self) -> rquickjs::runtime::InterruptHandler {
        let watch = self.clone();
        Box::new(move || match watch.deadline.get() {
            Some(deadline) if Instant::now() >= deadline => {
                watch.interrupted.set(true);
                true
            }
            _ => false,
        })
    }

    fn start(&self, limits: &Limits) {
        self.interrupted.set(false);
        self.deadline
            .set(Some(Instant::now() + limits.max_run_time));
    }

    fn stop(&self) {
        self.deadline.set(None);
    }

    /// Makes the interrupt handler stop whatever script runs next.
    fn expire(&self) {
        self.deadline.set(Some(Instant::now()));
    }

    fn is_expired(&self) -> bool {
        self.deadline
            .get()
            .is_some_and(|deadline| Instant::now() >= deadline)
    }
}

/// An evaluated script, ready for calls.
pub(crate) struct Engine {
    date_constructor: Persistent<Constructor<'static>>,
    sandbox: Sandbox,
    limits: Limits,
}

impl Engine {
    /// Creates a runtime with `limits`, evaluates `source` in it and checks
    /// that it defines `decodeUplink`.
    pub(crate) fn new(source: &str, limits: &Limits) -> Result<Engine, ScriptError> {
        let runtime = Runtime::new().map_err(|error| startup_error(error, limits))?;
        runtime.set_memory_limit(limits.max_memory_bytes);
        runtime.set_max_stack_size(limits.max_stack_bytes);
        let watch = Watch::new();
        runtime.set_interrupt_handler(Some(watch.interrupt_handler()));

        let context = Context::custom::<Intrinsics>(&runtime)
            .map_err(|error| startup_error(error, limits))?;
        let sandbox = Sandbox {
            context,
            runtime,
            watch,
        };

        let date_constructor = run(&sandbox, limits, TOP_LEVEL, |ctx| {
            ctx.eval_with_options::<(), _>(PRELUDE, eval_options("prelude.js"))?;
            // Saved before the formatter runs, so that a script that replaces
            // the global `Date` still receives a real Date as `recvTime`.
            let date: Constructor = ctx.globals().get("Date")?;
            ctx.eval_with_options::<(), _>(source, eval_options(SCRIPT_NAME))?;

            let decode: Value = ctx.globals().get("decodeUplink")?;
            if !decode.is_function() {
                return Err(ScriptError::MissingFunction {
                    name: "decodeUplink",
                }
                .into());
            }
            Ok(Persistent::save(ctx, date))
        })?;

        Ok(Engine {
            date_constructor,
            sandbox,
            limits: limits.clone(),
        })
    }

    /// Calls the global function `call.function()` with the input that
    /// `call` builds and returns what `call` reads from the result.
    pub(crate) fn call<C: Call>(&mut self, call: &C) -> Result<C::Output, ScriptError> {
        let function = call.function();
        let date_constructor = self.date_constructor.clone();
        let max_output_bytes = self.limits.max_output_bytes;

        run(&self.sandbox, &self.limits, function, |ctx| {
            let target: Value = ctx.globals().get(function)?;
            let Some(target) = target.as_function() else {
                return Err(ScriptError::MissingFunction { name: function }.into());
            };

            let date = date_constructor.restore(ctx)?;
            let input = call.input(ctx, &date)?;
            let result: Value = target.call((input,))?;

            let mut converter = crate::convert::Converter::new(function, max_output_bytes);
            call.output(result, &mut converter)
        })
    }
}

/// One kind of call into the script: which function it calls, the input it
/// passes and how it reads the result.
pub(crate) trait Call {
    type Output;

    /// Name of the global function to call.
    fn function(&self) -> &'static str;

    /// Builds the function's single argument.
    fn input<'js>(&self, ctx: &Ctx<'js>, date: &Constructor<'js>) -> rquickjs::Result<Value<'js>>;

    /// Validates the returned value and converts it to Rust.
    fn output<'js>(
        &self,
        result: Value<'js>,
        converter: &mut crate::convert::Converter,
    ) -> Result<Self::Output, Failure>;
}

fn eval_options(file_name: &str) -> EvalOptions {
    let mut options = EvalOptions::default();
    options.global = true;
    // Formatters are written for sloppy mode: many assign to undeclared
    // variables.
    options.strict = false;
    options.filename = Some(file_name.to_owned());
    options
}

/// Runs `body` in the sandbox's context under the time limit, then runs the
/// jobs it queued, and turns any failure into a [`ScriptError`].
fn run<R>(
    sandbox: &Sandbox,
    limits: &Limits,
    function: &'static str,
    body: impl FnOnce(&Ctx<'_>) -> Result<R, Failure>,
) -> Result<R, ScriptError> {
    let watch = &sandbox.watch;
    watch.start(limits);

    let outcome = sandbox.context.with(|ctx| {
        // SAFETY: the pointer comes from a live context of this thread's
        // runtime. QuickJS measures the stack limit from the stack pointer
        // it records here, and rquickjs records it only when the runtime is
        // created, which may have been in a shallower or deeper frame.
        unsafe { qjs::JS_UpdateStackTop(qjs::JS_GetRuntime(ctx.as_raw().as_ptr())) };

        // A failure is classified before the queued jobs run, because a job
        // could replace the exception that is pending in the context.
        let outcome =
            body(&ctx).map_err(|failure| classify(&ctx, limits, function, watch, failure));
        let jobs = run_queued_jobs(&ctx, watch)
            .map_err(|failure| classify(&ctx, limits, function, watch, failure));
        match (outcome, jobs) {
            (Ok(value), Ok(())) => Ok(value),
            (Err(error), _) | (Ok(_), Err(error)) => Err(error),
        }
    });
    watch.stop();
    outcome
}

/// Runs the promise reactions and microtasks that the call queued, under the
/// same deadline. Formatters have no use for them, but a runtime must not
/// keep queued jobs (see the module documentation).
fn run_queued_jobs(ctx: &Ctx<'_>, watch: &Watch) -> Result<(), Failure> {
    loop {
        // An exception thrown by a job is dropped, as a browser reports an
        // unhandled rejection without stopping the page.
        if !ctx.execute_pending_job() {
            return Ok(());
        }
        if watch.is_expired() {
            watch.interrupted.set(true);
            return Err(Failure::Js(rquickjs::Error::Exception));
        }
    }
}

fn classify(
    ctx: &Ctx<'_>,
    limits: &Limits,
    function: &'static str,
    watch: &Watch,
    failure: Failure,
) -> ScriptError {
    // Take the pending exception first, so that it does not stay in the
    // context whatever the failure was.
    let caught = match failure {
        Failure::Script(error) => {
            let _ = ctx.catch();
            return error;
        }
        Failure::Js(error) => CaughtError::from_error(ctx, error),
    };

    if watch.interrupted.get() {
        return ScriptError::Timeout {
            function,
            limit: limits.max_run_time,
        };
    }

    match caught {
        CaughtError::Exception(exception) => {
            let object = exception.as_object();
            let name = object
                .get::<_, Option<String>>("name")
                .ok()
                .flatten()
                .unwrap_or_else(|| "Error".to_owned());
            let message = exception.message().unwrap_or_default();
            let stack = exception.stack().unwrap_or_default();
            exception_error(limits, function, &name, &message, &stack)
        }
        // QuickJS throws null when it cannot even allocate the "out of
        // memory" error object.
        // NOTE: a script that runs `throw null` is therefore reported as
        // out of memory, and its global state is discarded.
        CaughtError::Value(value) if value.is_null() => ScriptError::OutOfMemory {
            function,
            limit: limits.max_memory_bytes,
        },
        CaughtError::Value(value) => ScriptError::Exception {
            function,
            message: describe_thrown(&value),
            line: None,
            column: None,
        },
        CaughtError::Error(rquickjs::Error::Allocation) => ScriptError::OutOfMemory {
            function,
            limit: limits.max_memory_bytes,
        },
        CaughtError::Error(error) => ScriptError::Engine {
            function,
            message: truncate(error.to_string()),
        },
    }
}

/// Maps a JavaScript error object to a [`ScriptError`]. QuickJS reports its
/// own limits with fixed messages, which are matched here.
fn exception_error(
    limits: &Limits,
    function: &'static str,
    name: &str,
    message: &str,
    stack: &str,
) -> ScriptError {
    if name == "InternalError" && message == "out of memory" {
        return ScriptError::OutOfMemory {
            function,
            limit: limits.max_memory_bytes,
        };
    }
    if name == "RangeError" && message == "Maximum call stack size exceeded" {
        return ScriptError::StackOverflow {
            function,
            limit: limits.max_stack_bytes,
        };
    }

    // The parser's errors carry only a location as their first stack line
    // ("    at decoder.js:3:2"), while errors thrown by running code name a
    // function ("    at decodeUplink (decoder.js:3:2)").
    let first_frame = stack.lines().next().unwrap_or_default().trim();
    if name == "SyntaxError"
        && let Some(location) = first_frame.strip_prefix("at ")
        && let Some((line, column)) = parse_location(location)
    {
        return ScriptError::Syntax {
            message: truncate(message.to_owned()),
            line,
            column,
        };
    }

    let (line, column) = stack
        .lines()
        .find_map(|frame| {
            let start = frame.find(SCRIPT_NAME)?;
            parse_location(frame[start..].trim_end_matches(')'))
        })
        .unzip();
    let message = if message.is_empty() {
        name.to_owned()
    } else {
        format!("{name}: {message}")
    };
    ScriptError::Exception {
        function,
        message: truncate(message),
        line,
        column,
    }
}

/// Parses `decoder.js:LINE:COLUMN`.
fn parse_location(location: &str) -> Option<(u32, u32)> {
    let rest = location.strip_prefix(SCRIPT_NAME)?.strip_prefix(':')?;
    let (line, column) = rest.split_once(':')?;
    Some((line.parse().ok()?, column.parse().ok()?))
}

/// Describes a thrown value that is not an Error object, such as
/// `throw "bad length"`.
fn describe_thrown(value: &Value<'_>) -> String {
    let text = match value.type_of() {
        Type::String => value.get::<String>().ok(),
        Type::Object | Type::Array => value
            .ctx()
            .json_stringify(value.clone())
            .ok()
            .flatten()
            .and_then(|text| text.to_string().ok()),
        _ => value
            .get::<rquickjs::Coerced<String>>()
            .ok()
            .map(|text| text.0),
    };
    truncate(text.unwrap_or_else(|| format!("a value of type {}", value.type_name())))
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Maps a failure to create the runtime or context, which happens only when
/// memory runs out.
fn startup_error(error: rquickjs::Error, limits: &Limits) -> ScriptError {
    match error {
        rquickjs::Error::Allocation => ScriptError::OutOfMemory {
            function: TOP_LEVEL,
            limit: limits.max_memory_bytes,
        },
        other => ScriptError::Engine {
            function: TOP_LEVEL,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_parses() {
        assert_eq!(parse_location("decoder.js:12:5"), Some((12, 5)));
        assert_eq!(parse_location("decoder.js:12"), None);
        assert_eq!(parse_location("other.js:1:1"), None);
    }

    #[test]
    fn long_message_truncated() {
        let text = truncate("é".repeat(MAX_MESSAGE_BYTES));
        assert!(text.len() <= MAX_MESSAGE_BYTES + 3);
        assert!(text.ends_with("..."));
    }
}
