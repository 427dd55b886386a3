//! Scripted payload decoders for the pipeline.
//!
//! TODO: run decoders in the JavaScript sandbox; until then a profile with a
//! script codec sends its messages to the dead-letter log.

use std::sync::Arc;

use crate::config::ProcessingConfig;
use crate::decode::{DecodeError, ScriptRunner};
use crate::ids::ProfileId;
use crate::ingest::Envelope;
use crate::profiles::CodecSpec;

struct Unavailable;

impl ScriptRunner for Unavailable {
    fn decode_uplink(
        &mut self,
        _codec: &CodecSpec,
        _cache_key: (ProfileId, i64),
        _envelope: &Envelope,
    ) -> Result<Vec<u8>, DecodeError> {
        Err(DecodeError::Script(
            "scripted decoders are not available".to_owned(),
        ))
    }
}

pub type RunnerFactory = Arc<dyn Fn() -> Box<dyn ScriptRunner> + Send + Sync>;

pub fn runner_factory(_config: &ProcessingConfig) -> RunnerFactory {
    Arc::new(|| Box::new(Unavailable))
}
