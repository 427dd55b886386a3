//! The demo fleet started by `ferrite serve --demo`.

use std::sync::Arc;

use crate::server::{AfterStart, AppState, ServerAddrs};

/// Returns the start hook that launches `devices` simulated devices.
pub fn starter(devices: usize) -> AfterStart {
    Box::new(move |_state: Arc<AppState>, _addrs: ServerAddrs| {
        tracing::warn!(devices, "the demo fleet is not available in this build");
    })
}
