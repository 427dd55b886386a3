//! Scripted payload decoders for the pipeline: JavaScript formatters in the
//! style of The Things Stack device repository, run by `ferrite-script`.
//!
//! Each pipeline worker owns a [`ScriptCache`] of compiled decoders keyed by
//! profile id and version; a decoder is not `Send`, so it stays on the
//! worker's thread. A profile change gives a new version and so a new
//! decoder; the cache drops the oldest entries beyond [`MAX_DECODERS`].
//! Decoders keep their global state between calls, which is about 150
//! times faster than a fresh context per call (see the crate docs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrite_script::{Decoder, Limits, UplinkInput};

use crate::config::ProcessingConfig;
use crate::decode::{DecodeError, ScriptRunner};
use crate::ids::ProfileId;
use crate::ingest::Envelope;
use crate::profiles::CodecSpec;

/// Compiled decoders one worker keeps (each holds a JavaScript runtime of
/// up to `processing.script_max_memory_bytes`, usually far less).
const MAX_DECODERS: usize = 64;

/// Creates one [`ScriptRunner`] per pipeline worker.
pub type RunnerFactory = Arc<dyn Fn() -> Box<dyn ScriptRunner> + Send + Sync>;

pub fn runner_factory(config: &ProcessingConfig) -> RunnerFactory {
    let memory = config.script_max_memory_bytes;
    let run_time = config.script_max_run_time;
    Arc::new(move || {
        Box::new(ScriptCache {
            decoders: HashMap::new(),
            uses: 0,
            max_memory_bytes: memory,
            default_run_time: run_time,
        })
    })
}

struct CachedDecoder {
    decoder: Decoder,
    last_use: u64,
}

pub struct ScriptCache {
    decoders: HashMap<(ProfileId, i64), CachedDecoder>,
    /// Counts calls, to find the least recently used decoder.
    uses: u64,
    max_memory_bytes: usize,
    default_run_time: Duration,
}

/// Reads `f_port` from the envelope's transport metadata (LoRaWAN uplinks);
/// other transports have none, and scripts see port 1.
fn f_port(envelope: &Envelope) -> u8 {
    if envelope.meta.is_empty() {
        return 1;
    }
    serde_json::from_slice::<serde_json::Value>(&envelope.meta)
        .ok()
        .and_then(|meta| meta.get("f_port").and_then(serde_json::Value::as_u64))
        .and_then(|port| u8::try_from(port).ok())
        .unwrap_or(1)
}

impl ScriptRunner for ScriptCache {
    fn decode_uplink(
        &mut self,
        codec: &CodecSpec,
        cache_key: (ProfileId, i64),
        envelope: &Envelope,
    ) -> Result<Vec<u8>, DecodeError> {
        let CodecSpec::Script {
            script,
            max_run_time,
        } = codec
        else {
            return Err(DecodeError::Codec(format!(
                "the profile's codec is {}, not a script",
                codec.name()
            )));
        };
        self.uses += 1;
        if !self.decoders.contains_key(&cache_key) {
            let limits = Limits {
                max_run_time: max_run_time.unwrap_or(self.default_run_time),
                max_memory_bytes: self.max_memory_bytes,
                ..Limits::default()
            };
            let decoder = Decoder::compile(script, limits).map_err(|error| {
                DecodeError::Script(format!("the profile's script does not compile: {error}"))
            })?;
            if self.decoders.len() >= MAX_DECODERS
                && let Some(oldest) = self
                    .decoders
                    .iter()
                    .min_by_key(|(_, cached)| cached.last_use)
                    .map(|(key, _)| *key)
            {
                self.decoders.remove(&oldest);
            }
            // Older versions of the same profile are not used again.
            self.decoders
                .retain(|(profile, _), _| *profile != cache_key.0);
            self.decoders.insert(
                cache_key,
                CachedDecoder {
                    decoder,
                    last_use: 0,
                },
            );
        }
        let cached = self.decoders.get_mut(&cache_key).expect("inserted above");
        cached.last_use = self.uses;

        let input = UplinkInput {
            bytes: &envelope.payload,
            f_port: f_port(envelope),
            recv_time_ms: ferrite_core::nanos_to_millis(envelope.received_at_ns),
        };
        let decoded = cached.decoder.decode_uplink(&input).map_err(|error| {
            metrics::counter!("ferrite_script_errors_total", "kind" => if error.is_resource_limit() { "limit" } else { "script" })
                .increment(1);
            DecodeError::Script(format!("decodeUplink failed: {error}"))
        })?;
        serde_json::to_vec(&decoded.data).map_err(|error| {
            DecodeError::Script(format!("the decoder's data cannot be encoded: {error}"))
        })
    }
}
