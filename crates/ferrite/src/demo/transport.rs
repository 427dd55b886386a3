//! Sending simulated readings to the server's own listeners: each truck over
//! its own MQTT connection, the environment sensors over HTTP through one
//! shared client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Timelike;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fleet::DemoDevice;
use super::sensors::{EnvironmentSensor, Truck};
use crate::server::AppState;

pub const TRUCK_INTERVAL: Duration = Duration::from_secs(5);
pub const SENSOR_INTERVAL: Duration = Duration::from_secs(10);
/// Each wait between two messages is the interval times a random factor in
/// `1 ± JITTER`.
const JITTER: f64 = 0.1;
const TELEMETRY_TOPIC: &str = "v1/devices/me/telemetry";
const MQTT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Capacity of a truck's publish queue, which fills while its connection is
/// down. A publish beyond it fails and is counted.
const MQTT_QUEUE_CAPACITY: usize = 10;
const RECONNECT_MIN_DELAY: Duration = Duration::from_secs(1);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const FAILURE_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// How often the fleet checks whether the server is shutting down.
const SHUTDOWN_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Mixed into a device's index for the seed of its send schedule, so the
/// schedule draws do not repeat the model's draws.
const SCHEDULE_SEED_SALT: u64 = 0x5eed_5c4e_d01e_0001;

/// Returns the address to connect to for a listener: the loopback address
/// of the same family when the listener is bound to all interfaces.
pub fn connect_address(listen: SocketAddr) -> SocketAddr {
    let mut address = listen;
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => address.set_ip(Ipv4Addr::LOCALHOST.into()),
        IpAddr::V6(ip) if ip.is_unspecified() => address.set_ip(Ipv6Addr::LOCALHOST.into()),
        _ => {}
    }
    address
}

/// Shared state of all device tasks: the stop signal and the failure counts.
pub struct FleetContext {
    /// Read for its readiness flag, which the server clears first when it
    /// shuts down.
    state: Arc<AppState>,
    /// Cancelled when the server shuts down, which ends every device task.
    pub cancel: CancellationToken,
    /// Failed sends since the last report.
    mqtt_failures: AtomicU64,
    http_failures: AtomicU64,
}

impl FleetContext {
    pub fn new(state: Arc<AppState>) -> Self {
        Self {
            state,
            cancel: CancellationToken::new(),
            mqtt_failures: AtomicU64::new(0),
            http_failures: AtomicU64::new(0),
        }
    }

    fn server_ready(&self) -> bool {
        self.state.ready.load(Ordering::Acquire)
    }

    /// Counts a failed send and returns true. Once the server is shutting
    /// down it returns false and counts nothing: the server clears its
    /// readiness flag before it closes connections, so failures caused by
    /// the shutdown are not reported.
    fn count_failure(&self, counter: &AtomicU64) -> bool {
        if !self.server_ready() {
            return false;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Cancels [`Self::cancel`] once the server clears its readiness flag.
    /// The server gives start hooks no shutdown signal, so this polls.
    pub async fn cancel_on_shutdown(self: Arc<Self>) {
        while self.server_ready() {
            tokio::time::sleep(SHUTDOWN_POLL_INTERVAL).await;
        }
        tracing::debug!("demo fleet: the server is shutting down; stopping the simulated devices");
        self.cancel.cancel();
    }

    /// Logs one warning per [`FAILURE_REPORT_INTERVAL`] at most with the
    /// number of failed sends, so a server that rejects the whole fleet does
    /// not flood the log. Each failure itself is logged at debug.
    pub async fn report_failures(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(FAILURE_REPORT_INTERVAL);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let mqtt = self.mqtt_failures.swap(0, Ordering::Relaxed);
            let http = self.http_failures.swap(0, Ordering::Relaxed);
            if mqtt + http > 0 {
                tracing::warn!(
                    mqtt_failures = mqtt,
                    http_failures = http,
                    "demo fleet: sends failed in the last minute; set RUST_LOG=ferrite::demo=debug to log each error"
                );
            }
        }
    }
}

/// The send times of one device: every `interval` with jitter, starting at a
/// random phase, so devices do not send in lockstep.
struct Schedule {
    interval: Duration,
    next: Instant,
    rng: StdRng,
}

impl Schedule {
    fn new(interval: Duration, device_index: usize, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(device_index as u64 ^ SCHEDULE_SEED_SALT);
        let phase = interval.mul_f64(rng.random::<f64>());
        Self {
            interval,
            next: now + phase,
            rng,
        }
    }

    /// Waits until the next send time. Returns false when cancelled.
    async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep_until(self.next) => {}
        }
        self.advance(Instant::now());
        true
    }

    /// Moves the next send time on by one jittered interval.
    fn advance(&mut self, now: Instant) {
        let wait = self
            .interval
            .mul_f64(1.0 + self.rng.random_range(-JITTER..JITTER));
        self.next += wait;

        // After a stall, go on from now instead of sending the missed
        // messages in a burst.
        if self.next < now {
            self.next = now + wait;
        }
    }
}

/// Seconds since `last`, which becomes now: the model's time step.
fn seconds_since(last: &mut Instant) -> f64 {
    let now = Instant::now();
    let elapsed = now.duration_since(*last).as_secs_f64();
    *last = now;
    elapsed
}

/// Builds a JSON telemetry message stamped with the current time.
fn telemetry_message(values: serde_json::Value) -> Vec<u8> {
    let ts = chrono::Utc::now().timestamp_millis();
    json!({"ts": ts, "values": values}).to_string().into_bytes()
}

/// Hours since local midnight on this machine, for the daily cycle.
fn local_hour() -> f64 {
    f64::from(chrono::Local::now().num_seconds_from_midnight()) / 3600.0
}

/// Runs a truck until the fleet is cancelled: publishes its readings every
/// [`TRUCK_INTERVAL`] with QoS 1 over its own MQTT connection.
pub async fn run_truck(device: DemoDevice, mqtt: SocketAddr, fleet: Arc<FleetContext>) {
    let name = device.spec.name;
    // rumqttc joins host and port with a colon, so an IPv6 host needs brackets.
    let host = match mqtt.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let mut options = MqttOptions::new(name.clone(), host, mqtt.port());
    options.set_credentials(device.token, "");
    options.set_keep_alive(MQTT_KEEP_ALIVE);
    let (client, event_loop) = AsyncClient::new(options, MQTT_QUEUE_CAPACITY);
    let connection = tokio::spawn(drive_connection(event_loop, name.clone(), fleet.clone()));

    let mut truck = Truck::new(device.spec.index as u64);
    let mut schedule = Schedule::new(TRUCK_INTERVAL, device.spec.index, Instant::now());
    let mut last_step = Instant::now();
    while schedule.wait(&fleet.cancel).await {
        let reading = truck.step(seconds_since(&mut last_step));
        let payload = telemetry_message(reading.to_json());
        // `try_publish` only queues for the event loop, so a truck whose
        // connection is down keeps simulating instead of blocking.
        let result = client.try_publish(TELEMETRY_TOPIC, QoS::AtLeastOnce, false, payload);
        if let Err(error) = result
            && fleet.count_failure(&fleet.mqtt_failures)
        {
            tracing::debug!(device = %name, %error, "demo truck failed to queue a publish");
        }
    }
    let _ = connection.await;
}

/// Polls a truck's MQTT event loop, which connects, sends the queued
/// publishes and receives the acknowledgements, and reconnects with
/// exponential backoff after an error.
async fn drive_connection(mut event_loop: EventLoop, name: String, fleet: Arc<FleetContext>) {
    let mut delay = RECONNECT_MIN_DELAY;
    loop {
        // Cancelling `poll` can cut a packet short, but that happens only at
        // shutdown, when the connection is dropped anyway.
        let event = tokio::select! {
            _ = fleet.cancel.cancelled() => return,
            event = event_loop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = RECONNECT_MIN_DELAY;
                tracing::debug!(device = %name, "demo truck connected over MQTT");
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(error) => {
                if fleet.count_failure(&fleet.mqtt_failures) {
                    tracing::debug!(device = %name, %error, retry_in = ?delay, "demo truck's MQTT connection failed");
                }
                tokio::select! {
                    _ = fleet.cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX_DELAY);
            }
        }
    }
}

/// Builds the HTTP client that all environment sensors share.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder().timeout(HTTP_TIMEOUT).build()
}

/// Runs an environment sensor until the fleet is cancelled: posts its readings every
/// [`SENSOR_INTERVAL`] to the device telemetry endpoint.
pub async fn run_sensor(
    device: DemoDevice,
    client: reqwest::Client,
    http: SocketAddr,
    fleet: Arc<FleetContext>,
) {
    let name = device.spec.name;
    let url = format!("http://{http}/api/v1/{}/telemetry", device.token);
    let mut sensor = EnvironmentSensor::new(device.spec.index as u64);
    let mut schedule = Schedule::new(SENSOR_INTERVAL, device.spec.index, Instant::now());
    let mut last_step = Instant::now();
    while schedule.wait(&fleet.cancel).await {
        let reading = sensor.step(seconds_since(&mut last_step), local_hour());
        let request = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(telemetry_message(reading.to_json()));
        let result = tokio::select! {
            _ = fleet.cancel.cancelled() => return,
            result = request.send() => result,
        };

        match result {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => {
                if !fleet.count_failure(&fleet.http_failures) {
                    continue;
                }
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                tracing::debug!(device = %name, %status, %body, "server rejected demo sensor telemetry");
            }
            Err(error) => {
                if !fleet.count_failure(&fleet.http_failures) {
                    continue;
                }
                // The URL contains the device token, so it stays out of the log.
                let error = error.without_url();
                tracing::debug!(device = %name, %error, "demo sensor failed to send telemetry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_address_replaces_unspecified() {
        let cases = [
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::]:1883", "[::1]:1883"),
            ("127.0.0.1:18080", "127.0.0.1:18080"),
            ("192.0.2.7:8080", "192.0.2.7:8080"),
        ];
        for (listen, expected) in cases {
            let listen: SocketAddr = listen.parse().unwrap();
            assert_eq!(connect_address(listen).to_string(), expected, "{listen}");
        }
    }

    #[test]
    fn telemetry_message_has_ts_and_values() {
        let message = telemetry_message(json!({"speed": 42.5}));
        let parsed: serde_json::Value = serde_json::from_slice(&message).unwrap();
        assert!(parsed["ts"].as_i64().unwrap() > 1_600_000_000_000);
        assert_eq!(parsed["values"]["speed"], 42.5);
    }

    #[test]
    fn schedule_spreads_and_jitters() {
        let start = Instant::now();
        let mut schedule = Schedule::new(TRUCK_INTERVAL, 3, start);
        let mut times = vec![schedule.next];
        for _ in 0..20 {
            // Each wake-up is on time.
            schedule.advance(schedule.next);
            times.push(schedule.next);
        }

        assert!(
            times[0] - start < TRUCK_INTERVAL,
            "first send after {:?}",
            times[0] - start
        );
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for gap in &gaps {
            assert!(*gap >= TRUCK_INTERVAL.mul_f64(1.0 - JITTER), "gap {gap:?}");
            assert!(*gap <= TRUCK_INTERVAL.mul_f64(1.0 + JITTER), "gap {gap:?}");
        }
        assert!(
            gaps.iter().any(|gap| *gap != gaps[0]),
            "no jitter: {gaps:?}"
        );
    }

    #[test]
    fn schedule_phases_differ_by_device() {
        let start = Instant::now();
        let phases: Vec<Duration> = (0..10)
            .map(|index| Schedule::new(SENSOR_INTERVAL, index, start).next - start)
            .collect();
        let mut distinct = phases.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), phases.len(), "{phases:?}");
    }

    #[test]
    fn schedule_skips_missed_sends_after_stall() {
        let start = Instant::now();
        let mut schedule = Schedule::new(SENSOR_INTERVAL, 0, start);
        let late = schedule.next + 10 * SENSOR_INTERVAL;
        schedule.advance(late);
        assert!(schedule.next > late);
        assert!(schedule.next - late <= SENSOR_INTERVAL.mul_f64(1.0 + JITTER));
    }

    #[tokio::test]
    async fn schedule_stops_when_cancelled() {
        let cancel = CancellationToken::new();
        let mut schedule = Schedule::new(SENSOR_INTERVAL, 0, Instant::now());
        cancel.cancel();
        assert!(!schedule.wait(&cancel).await);
    }
}
