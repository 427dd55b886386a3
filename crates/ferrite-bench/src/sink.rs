//! `sink`: an HTTP server that reads every request body and discards it.
//!
//! Pointing `lp` at it measures how fast the generator itself can send, with
//! no storage behind the socket: if that rate is well above what the
//! fastest server reaches, the generator is not what limits the figures. The
//! sink returns 204 No Content to every request, listens on loopback only
//! and stops after `--duration-s`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use clap::Args;
use serde::Serialize;

use crate::target::loopback_socket;

#[derive(Args, Debug)]
pub struct SinkArgs {
    /// Address to listen on, IP:PORT on loopback; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// File that receives the bound port once the server listens.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Seconds after which the server stops.
    #[arg(long, default_value_t = 120)]
    duration_s: u64,
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// The result line of one `sink` run.
#[derive(Debug, Serialize)]
pub struct SinkResult {
    figure: &'static str,
    listen: SocketAddr,
    requests: u64,
    bytes: u64,
}

pub async fn run(args: SinkArgs) -> anyhow::Result<SinkResult> {
    let addr = loopback_socket(&args.listen)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    if let Some(path) = &args.port_file {
        std::fs::write(path, format!("{}\n", bound.port()))
            .with_context(|| format!("cannot write the port file {}", path.display()))?;
    }

    let tally = Arc::new(Tally::default());
    let app = Router::new()
        .fallback(discard)
        .layer(DefaultBodyLimit::disable())
        .with_state(Arc::clone(&tally));
    let stop = tokio::time::sleep(Duration::from_secs(args.duration_s));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
        .context("the sink server failed")?;

    Ok(SinkResult {
        figure: "sink",
        listen: bound,
        requests: tally.requests.load(Ordering::Relaxed),
        bytes: tally.bytes.load(Ordering::Relaxed),
    })
}

async fn discard(State(tally): State<Arc<Tally>>, body: Bytes) -> StatusCode {
    tally.requests.fetch_add(1, Ordering::Relaxed);
    tally.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}
