//! Sandbox that runs JavaScript payload formatters written for The Things
//! Stack and its device repository, unchanged.
//!
//! A formatter is a script that defines global functions:
//! - `decodeUplink(input)`, required, receives
//!   `{ bytes: [0-255, ...], fPort: number, recvTime: Date }` and returns
//!   `{ data: {...}, warnings: [...], errors: [...] }`.
//! - `encodeDownlink(input)`, optional, receives `{ data: {...} }` and
//!   returns `{ bytes: [...], fPort: number, warnings: [...], errors: [...] }`.
//! - `decodeDownlink(input)`, optional, receives `{ bytes, fPort }` and
//!   returns the same shape as `decodeUplink`.
//!
//! `warnings` and `errors` are optional. A non-empty `errors` array means the
//! call failed, and [`Decoder`] returns [`ScriptError::ReturnedErrors`] with
//! the script's messages. The contract follows The Things Stack's
//! documentation of JavaScript payload formatters.
//!
//! ```
//! use ferrite_script::{Decoder, Limits, UplinkInput};
//!
//! let source = "function decodeUplink(input) {
//!     return { data: { temperature: ((input.bytes[0] << 8) | input.bytes[1]) / 100 } };
//! }";
//! let mut decoder = Decoder::compile(source, Limits::default())?;
//! let decoded = decoder.decode_uplink(&UplinkInput {
//!     bytes: &[0x09, 0x29],
//!     f_port: 1,
//!     recv_time_ms: 1_714_564_800_000,
//! })?;
//! assert_eq!(decoded.data["temperature"], 23.45);
//! # Ok::<(), ferrite_script::ScriptError>(())
//! ```
//!
//! # Engine and language
//!
//! Scripts run in QuickJS-ng 0.16 through the `rquickjs` crate, which
//! supports ECMAScript 2023 and more. The Things Stack documents an
//! ECMAScript 5.1 runtime, so formatters written for it run here, and so do
//! newer ones that use `let`, arrow functions, classes or template strings.
//! Scripts run in sloppy mode, because many formatters assign to undeclared
//! variables.
//!
//! # What a script can reach
//!
//! A script can use these globals:
//! - the standard built-in objects of QuickJS-ng, among them `Object`,
//!   `Function`, `Array`, `String`, `Number`, `Boolean`, `Symbol`, `BigInt`,
//!   `Math`, `JSON`, `Date`, `RegExp`, `Map`, `Set`, `WeakMap`, `WeakSet`,
//!   `Promise`, `Reflect`, `Iterator`, `ArrayBuffer`, `SharedArrayBuffer`,
//!   `DataView`, the typed arrays and the `Error` types;
//! - `Atomics`, whose `wait` throws because the runtime may not block;
//! - the global functions `parseInt`, `parseFloat`, `isNaN`, `isFinite`,
//!   `encodeURIComponent` and its relatives, `escape`, `unescape`, `eval`
//!   and `queueMicrotask`;
//! - `console`, whose methods `log`, `info`, `warn`, `error`, `debug` and
//!   `trace` discard their arguments. Debugging calls left in a formatter
//!   therefore do no harm and write nowhere.
//!
//! Nothing else: no module loader (`import()` returns a rejected promise),
//! no `std` or `os` module (QuickJS's C library is not even compiled), no
//! file, network, timer or process access, no `Proxy`, `WeakRef`,
//! `FinalizationRegistry` or `performance`. `eval` and `new Function`
//! compile code inside the same sandbox and under the same limits. `Date`
//! reads the host's clock.
//!
//! NOTE: `Date` methods that use local time (`getHours`, `toString`) follow
//! the time zone of the Ferrite process, as in any QuickJS embedding.
//! Formatters that need a fixed zone use the `getUTC*` methods.
//!
//! Promise reactions and `queueMicrotask` callbacks that a call queues run
//! after the function returns, under the same time limit, and their results
//! are ignored. A function that returns a Promise (an `async` function) is
//! rejected with [`ScriptError::BadResult`].
//!
//! # Limits
//!
//! [`Limits`] bounds each call and the evaluation of the top-level code:
//! - Run time: QuickJS calls an interrupt handler once per 10,000 function
//!   calls and loop iterations, and regularly during regular expression
//!   matching. Once the deadline has passed, the handler raises an exception
//!   that the script cannot catch, so `while (true) {}` stops within
//!   microseconds of the limit. Built-in methods written in C do not call the handler while they
//!   loop. The sandbox therefore guards the `Array.prototype` methods that
//!   loop over a whole array without allocating (see `src/prelude.js`):
//!   they throw a RangeError on more than 65,536 elements. Other built-ins
//!   allocate as they loop, so the memory limit stops them.
//! - Memory: QuickJS's allocator rejects allocations beyond the limit and
//!   the script gets an "out of memory" InternalError, reported as
//!   [`ScriptError::OutOfMemory`]. The process is never aborted.
//! - Stack: deep recursion raises a RangeError, reported as
//!   [`ScriptError::StackOverflow`]. The limit is measured from the frame
//!   that starts each call.
//! - Source and output size: checked before compiling and while the result
//!   is converted to JSON.
//!
//! # Global state between calls
//!
//! A [`Decoder`] keeps one QuickJS context and calls the script's function
//! in it again and again, so globals that a script changes keep their value
//! for its next call. Starting every call from a freshly evaluated script
//! costs about 150 times as much. Measured with `examples/decode_rate.rs`
//! on a 2-core x86-64 machine shared with other builds, the temperature
//! formatter of the tests took about 3 µs per call with the state kept
//! (about 300,000 calls per second) and 450 to 600 µs with a fresh state
//! per call (about 2,000 calls per second). The pipeline needs thousands of
//! calls per second per core, so the state is kept.
//!
//! NOTE: The Things Stack evaluates the script again for every call: in its
//! v3 source, `pkg/scripting/javascript/javascript.go` creates a new goja VM
//! per run. A formatter that adds keys to a global object without clearing
//! it therefore returns keys of earlier uplinks here, but not there.
//! [`Decoder::reset`] discards the state on request.
//!
//! After a timeout, memory exhaustion or a stack overflow, the decoder
//! discards the state by itself, because the script may have stopped halfway
//! through changing it or may be holding the memory that ran out. The next
//! call evaluates the source again. After an ordinary exception the state is
//! kept, as it would be in a browser.
//!
//! # Results
//!
//! `data` must be an object. It is converted like `JSON.stringify` does,
//! with these differences, each reported with the path of the value (such
//! as `data.sensors[1].value`):
//! - `undefined` is left out of objects and becomes `null` in arrays, and
//!   `NaN` and `±Infinity` become `null`; each adds a warning to
//!   [`DecodedPayload::warnings`].
//! - A function, symbol or Promise is an error ([`ScriptError::BadResult`]).
//! - A BigInt becomes an integer if it fits in 64 bits and is an error
//!   otherwise; typed arrays become arrays of numbers.
//! - Integral numbers up to 2^53 become JSON integers.
//!
//! Objects nested deeper than 64 levels (usually circular references) are
//! an error. Object keys come out sorted.
//!
//! # Threads
//!
//! A [`Decoder`] is not `Send`, because the QuickJS runtime it owns is bound
//! to one thread; pipeline workers each keep their own. Calls are
//! synchronous and block the calling thread for at most about
//! [`Limits::max_run_time`]. The thread needs
//! [`Limits::max_stack_bytes`] of free stack plus about 64 KiB.
//!
//! Not supported: The Things Stack's optional `normalizeUplink` function.

mod convert;
mod decoder;
mod engine;
mod error;
mod limits;

pub use decoder::{DecodedPayload, Decoder, DownlinkInput, EncodedDownlink, UplinkInput};
pub use error::ScriptError;
pub use limits::Limits;
