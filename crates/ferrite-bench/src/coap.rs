//! `coap`: Confirmable CoAP telemetry from many simulated devices.
//!
//! Every device has its own UDP socket and access token (tokens are reused
//! round-robin when there are fewer than devices) and keeps one request
//! outstanding, as RFC 7252's NSTART = 1 requires. It POSTs the same small JSON
//! payload to `/api/v1/{token}/telemetry` as a Confirmable message and
//! sends the next one when the 2.04 response arrives, in the ACK or as a
//! separate response. A request without a reply within ACK_TIMEOUT is
//! sent again with the same message ID, up to MAX_RETRANSMIT times. After
//! `--warmup-s` the 2.04 responses that arrive during `--duration-s` are
//! counted, with the time from the first send of a request to its 2.04.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::stats::{LatencySummary, round3};
use crate::target::{load_tokens, loopback_socket};

/// ACK_TIMEOUT of RFC 7252 section 4.8, without the random factor.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// MAX_RETRANSMIT of RFC 7252 section 4.8.
const MAX_RETRANSMIT: u32 = 4;

#[derive(Args, Debug)]
pub struct CoapArgs {
    /// CoAP server address, IP:PORT on loopback.
    #[arg(long)]
    addr: String,
    /// A single device token used by every simulated device.
    #[arg(long, conflicts_with = "tokens_file")]
    token: Option<String>,
    /// File with one device token per line, used round-robin.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Simulated devices, each with its own UDP socket.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Seconds during which 2.04 responses are counted.
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    /// Seconds of sending before counting starts.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    #[arg(
        long,
        default_value = r#"{"temperature":21.5,"humidity":40,"battery":3.7}"#
    )]
    payload: String,
    /// Name of the system under test, copied into the result line.
    #[arg(long, default_value = "unnamed")]
    label: String,
}

/// The result line of one `coap` run.
#[derive(Debug, Serialize)]
pub struct CoapResult {
    figure: &'static str,
    system: String,
    devices: usize,
    payload_bytes: usize,
    duration_s: f64,
    acks: u64,
    acks_per_s: f64,
    latency_ms: LatencySummary,
    retransmissions: u64,
    /// Requests that got an error response or no reply after every
    /// retransmission.
    errors: u64,
    first_error: Option<String>,
}

#[derive(Default)]
struct DeviceTally {
    acks: u64,
    latencies: Vec<Duration>,
    retransmissions: u64,
    errors: u64,
    first_error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Schedule {
    measure_from: Instant,
    measure_until: Instant,
}

pub async fn run(args: CoapArgs) -> anyhow::Result<CoapResult> {
    let addr = loopback_socket(&args.addr)?;
    let tokens = load_tokens(args.token.as_deref(), args.tokens_file.as_deref())?;
    anyhow::ensure!(
        !tokens.is_empty(),
        "give --token or --tokens-file: CoAP requests need a device access token"
    );
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(args.duration_s > 0, "--duration-s must be at least 1");

    let payload: Arc<[u8]> = Arc::from(args.payload.as_bytes());
    let mut sockets = Vec::with_capacity(args.devices);
    for _ in 0..args.devices {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .context("cannot open a UDP socket; raise the open file limit for many devices")?;
        socket.connect(addr).await?;
        sockets.push(socket);
    }

    let measure_from = Instant::now() + Duration::from_secs(args.warmup_s);
    let schedule = Schedule {
        measure_from,
        measure_until: measure_from + Duration::from_secs(args.duration_s),
    };
    let mut tasks = Vec::with_capacity(args.devices);
    for (index, socket) in sockets.into_iter().enumerate() {
        let device = Device {
            socket,
            token: tokens[index % tokens.len()].clone(),
            payload: Arc::clone(&payload),
            next_message_id: rand::random(),
            request_token: (index as u32).to_be_bytes(),
        };
        tasks.push(tokio::spawn(device.run(schedule)));
    }

    let mut total = DeviceTally::default();
    for task in tasks {
        let tally = task.await.context("a simulated device task panicked")?;
        total.acks += tally.acks;
        total.latencies.extend(tally.latencies);
        total.retransmissions += tally.retransmissions;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }

    let duration = schedule.measure_until - schedule.measure_from;
    Ok(CoapResult {
        figure: "coap",
        system: args.label,
        devices: args.devices,
        payload_bytes: payload.len(),
        duration_s: round3(duration.as_secs_f64()),
        acks: total.acks,
        acks_per_s: (total.acks as f64 / duration.as_secs_f64()).round(),
        latency_ms: LatencySummary::from_durations(&total.latencies),
        retransmissions: total.retransmissions,
        errors: total.errors,
        first_error: total.first_error,
    })
}

/// One simulated device.
struct Device {
    socket: UdpSocket,
    token: String,
    payload: Arc<[u8]>,
    next_message_id: u16,
    request_token: [u8; 4],
}

/// The outcome of one request.
enum Outcome {
    Changed,
    Failed(String),
}

impl Device {
    async fn run(mut self, schedule: Schedule) -> DeviceTally {
        let mut tally = DeviceTally::default();
        while Instant::now() < schedule.measure_until {
            let started = Instant::now();
            let outcome = self.send_one(schedule.measure_until, &mut tally).await;
            let now = Instant::now();
            let measured = now >= schedule.measure_from && now < schedule.measure_until;
            match outcome {
                Some(Outcome::Changed) if measured => {
                    tally.acks += 1;
                    tally.latencies.push(now - started);
                }
                Some(Outcome::Changed) => {}
                Some(Outcome::Failed(error)) => {
                    tally.errors += 1;
                    tally.first_error.get_or_insert(error);
                }
                // The run ended while the request was outstanding.
                None => break,
            }
        }
        tally
    }

    fn request(&mut self) -> (u16, Vec<u8>) {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(RequestType::Post);
        packet.header.message_id = self.next_message_id;
        packet.set_token(self.request_token.to_vec());
        for segment in ["api", "v1", &self.token, "telemetry"] {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        packet.add_option(CoapOption::ContentFormat, vec![50]);
        packet.payload = self.payload.to_vec();
        let bytes = packet.to_bytes().expect("a small request encodes");
        (self.next_message_id, bytes)
    }

    /// Sends one request and waits for its 2.04; `None` when `until`
    /// passes first.
    async fn send_one(&mut self, until: Instant, tally: &mut DeviceTally) -> Option<Outcome> {
        let (message_id, bytes) = self.request();
        let mut buffer = vec![0u8; 2048];
        let mut timeout = ACK_TIMEOUT;
        let mut acknowledged = false;

        for attempt in 0..=MAX_RETRANSMIT {
            if attempt > 0 {
                tally.retransmissions += 1;
            }
            if !acknowledged && self.socket.send(&bytes).await.is_err() {
                return Some(Outcome::Failed("cannot send a datagram".into()));
            }
            let deadline = (Instant::now() + timeout).min(until);
            loop {
                let received =
                    tokio::time::timeout_at(deadline, self.socket.recv(&mut buffer)).await;
                let Ok(Ok(length)) = received else {
                    break;
                };
                let Ok(reply) = Packet::from_bytes(&buffer[..length]) else {
                    continue;
                };
                match classify(&reply, message_id, &self.request_token) {
                    Reply::EmptyAck => acknowledged = true,
                    Reply::Response(code) => {
                        if reply.header.get_type() == MessageType::Confirmable {
                            let id = reply.header.message_id.to_be_bytes();
                            let _ = self.socket.send(&[0x60, 0, id[0], id[1]]).await;
                        }
                        return Some(match code {
                            MessageClass::Response(ResponseType::Changed) => Outcome::Changed,
                            other => Outcome::Failed(format!(
                                "response {other}: {}",
                                String::from_utf8_lossy(&reply.payload)
                            )),
                        });
                    }
                    Reply::Other => {}
                }
            }
            if Instant::now() >= until {
                return None;
            }
            timeout *= 2;
        }
        Some(Outcome::Failed(format!(
            "no response after {MAX_RETRANSMIT} retransmissions"
        )))
    }
}

enum Reply {
    EmptyAck,
    Response(MessageClass),
    Other,
}

fn classify(reply: &Packet, message_id: u16, token: &[u8]) -> Reply {
    let ack_of_request = reply.header.get_type() == MessageType::Acknowledgement
        && reply.header.message_id == message_id;
    if ack_of_request && reply.header.code == MessageClass::Empty {
        return Reply::EmptyAck;
    }
    let is_response = matches!(reply.header.code, MessageClass::Response(_));
    if is_response
        && reply.get_token() == token
        && (ack_of_request || reply.header.get_type() != MessageType::Acknowledgement)
    {
        return Reply::Response(reply.header.code);
    }
    Reply::Other
}
