//! Tests of the runner with a real metadata database and a local webhook
//! receiver on 127.0.0.1: signing, retries, `Retry-After`, rejections,
//! restarts and the queue limit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::runner::Submission;
use super::{ActionEvent, ActionSpec, Actions};
use crate::adapters::mqtt::Router;
use crate::config::{ActionsConfig, MqttConfig};
use crate::ids::{AlarmId, DeviceId, TenantId};
use crate::live::AlarmChange;
use crate::metadata::{
    AttemptResult, Delivery, DeliveryFilter, DeliveryId, DeliveryStatus, MetadataStore,
    SqliteMetadata,
};

/// Maximum wait for a delivery to reach an expected state.
const WAIT: Duration = Duration::from_secs(10);

/// A scripted response: status, headers and body.
type ScriptedResponse = (StatusCode, Vec<(&'static str, String)>, &'static str);

/// A request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// A webhook receiver on 127.0.0.1 that responds with scripted responses
/// (then 200) and records every request.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<ScriptedResponse>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script: Arc<Mutex<VecDeque<ScriptedResponse>>> = Arc::default();
        let handler = {
            let received = received.clone();
            let script = script.clone();
            move |headers: HeaderMap, body: Bytes| {
                let received = received.clone();
                let script = script.clone();
                async move {
                    received.lock().push(Received {
                        headers,
                        body,
                        at: Instant::now(),
                    });
                    let (status, headers, body) =
                        script
                            .lock()
                            .pop_front()
                            .unwrap_or((StatusCode::OK, Vec::new(), ""));
                    let mut response = (status, body).into_response();
                    for (name, value) in headers {
                        response
                            .headers_mut()
                            .insert(name, value.parse().expect("header value"));
                    }
                    response
                }
            }
        };
        let app = axum::Router::new().route("/hook", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver runs");
        });
        Receiver {
            url,
            received,
            script,
            task,
        }
    }

    fn respond(&self, status: u16, headers: Vec<(&'static str, String)>, body: &'static str) {
        self.script
            .lock()
            .push_back((StatusCode::from_u16(status).unwrap(), headers, body));
    }

    fn requests(&self) -> Vec<Received> {
        self.received.lock().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    metadata: Arc<SqliteMetadata>,
    keyring: Arc<crate::encryption::Keyring>,
    tenant: TenantId,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let metadata = Arc::new(SqliteMetadata::open(dir.path()).await.expect("metadata"));
    let tenant = metadata.default_tenant().await.expect("tenant").id;
    let source = crate::encryption::MasterKeySource::Files {
        data_dir: dir.path().to_owned(),
    };
    let keyring = Arc::new(
        crate::encryption::Keyring::load(source, metadata.clone(), true)
            .await
            .expect("keyring"),
    );
    Setup {
        _dir: dir,
        metadata,
        keyring,
        tenant,
    }
}

fn fast_config() -> ActionsConfig {
    ActionsConfig {
        retry_initial_delay: Duration::from_millis(50),
        retry_max_delay: Duration::from_millis(200),
        attempt_timeout: Duration::from_secs(2),
        ..ActionsConfig::default()
    }
}

fn start(setup: &Setup, config: &ActionsConfig) -> Actions {
    Actions::start(
        config,
        setup.metadata.clone(),
        setup.keyring.clone(),
        Router::new(&MqttConfig::default()),
    )
    .expect("start the runner")
}

fn event(tenant: TenantId, change: AlarmChange) -> ActionEvent {
    ActionEvent {
        tenant_id: tenant,
        device_id: DeviceId::new_random(),
        device_name: "boiler-1".to_owned(),
        change,
        alarm: json!({
            "id": AlarmId::new_random(),
            "rule": "overheat",
            "severity": "critical",
            "status": "active",
            "value": 97.5,
        }),
    }
}

fn webhook(url: &str, extra: Value) -> ActionSpec {
    let mut spec = json!({"type": "webhook", "url": url});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let spec: ActionSpec = serde_json::from_value(spec).expect("valid spec");
    spec.validate().expect("valid spec");
    spec
}

fn queued(submission: Submission) -> DeliveryId {
    match submission {
        Submission::Queued(id) => id,
        other => panic!("delivery not queued: {other:?}"),
    }
}

/// Polls the delivery until it has `status`; panics with the last state
/// after [`WAIT`].
async fn wait_for_status(setup: &Setup, id: DeliveryId, status: DeliveryStatus) -> Delivery {
    let deadline = Instant::now() + WAIT;
    loop {
        let delivery = setup.metadata.action_delivery(setup.tenant, id).await;
        if let Ok(delivery) = &delivery
            && delivery.status == status
        {
            return delivery.clone();
        }
        assert!(
            Instant::now() < deadline,
            "delivery {id} did not become {status:?} within {WAIT:?}: {delivery:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// HMAC-SHA256 written out from RFC 2104 on top of SHA-256, so that the
/// test does not check the `hmac` crate against itself.
fn independent_hmac_sha256(key: &[u8], message: &[u8]) -> String {
    const BLOCK: usize = 64;
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let inner_pad: Vec<u8> = block_key.iter().map(|byte| byte ^ 0x36).collect();
    let outer_pad: Vec<u8> = block_key.iter().map(|byte| byte ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&inner_pad)
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(&outer_pad)
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

fn header<'a>(request: &'a Received, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .expect("ASCII header")
}

#[tokio::test]
async fn webhook_is_signed_and_carries_the_event() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(204, Vec::new(), "");
    let actions = start(&setup, &fast_config());
    let spec = webhook(
        &receiver.url,
        json!({"secret": "hunter2", "headers": {"X-Api-Key": "k-1"}}),
    );
    let event = event(setup.tenant, AlarmChange::Raised);

    let id = queued(actions.submit(&spec, &event));
    let delivery = wait_for_status(&setup, id, DeliveryStatus::Succeeded).await;
    assert_eq!(delivery.attempts, 1);
    assert_eq!(delivery.last_status_code, Some(204));
    assert_eq!(delivery.last_error, None);
    assert_eq!(delivery.event, "alarm.raised");
    assert_eq!(delivery.target, receiver.url);
    assert_eq!(delivery.alarm_id, event.alarm_id());

    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(header(request, "content-type"), "application/json");
    assert_eq!(header(request, "x-ferrite-event"), "alarm.raised");
    assert_eq!(header(request, "x-ferrite-delivery"), id.to_string());
    assert_eq!(header(request, "x-api-key"), "k-1");
    let timestamp = header(request, "x-ferrite-timestamp");
    let sent_at: i64 = timestamp.parse().expect("numeric timestamp");
    assert!((chrono::Utc::now().timestamp() - sent_at).abs() < 60);

    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&request.body);
    let expected = format!("sha256={}", independent_hmac_sha256(b"hunter2", &signed));
    assert_eq!(header(request, "x-ferrite-signature"), expected);

    let body: Value = serde_json::from_slice(&request.body).expect("JSON body");
    assert_eq!(body["event"], "alarm.raised");
    assert_eq!(body["device"]["id"], json!(event.device_id));
    assert_eq!(body["device"]["name"], "boiler-1");
    assert_eq!(body["alarm"], event.alarm);
    assert!(body["sent_at"].as_i64().is_some_and(|at| at > 0), "{body}");
    actions.shutdown().await;
}

#[tokio::test]
async fn webhook_without_secret_is_unsigned() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    let actions = start(&setup, &fast_config());
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Cleared),
    ));

    wait_for_status(&setup, id, DeliveryStatus::Succeeded).await;
    let request = &receiver.requests()[0];
    assert!(request.headers.get("x-ferrite-signature").is_none());
    assert_eq!(header(request, "x-ferrite-event"), "alarm.cleared");
    actions.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(500, Vec::new(), "database down");
    receiver.respond(502, Vec::new(), "");
    let actions = start(&setup, &fast_config());
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Succeeded).await;
    assert_eq!(delivery.attempts, 3);
    assert_eq!(delivery.last_status_code, Some(200));
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(header(request, "x-ferrite-delivery"), id.to_string());
    }
    // Backoff: the second retry waits about twice as long as the first.
    let first = requests[1].at - requests[0].at;
    let second = requests[2].at - requests[1].at;
    assert!(
        first >= Duration::from_millis(40),
        "first retry after {first:?}"
    );
    assert!(
        second >= Duration::from_millis(80),
        "second retry after {second:?}"
    );
    actions.shutdown().await;
}

#[tokio::test]
async fn retry_after_sets_the_delay_of_429() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(429, vec![("retry-after", "1".to_owned())], "slow down");
    let actions = start(&setup, &fast_config());
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Succeeded).await;
    assert_eq!(delivery.attempts, 2);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    // The backoff alone would retry after about 50 ms.
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "retried after {waited:?}");
    actions.shutdown().await;
}

#[tokio::test]
async fn pending_delivery_shows_the_last_error() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(503, vec![("retry-after", "3600".to_owned())], "maintenance");
    let actions = start(&setup, &fast_config());
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));

    // The delivery is recorded shortly after submit returns.
    let deadline = Instant::now() + WAIT;
    let delivery = loop {
        let delivery = setup.metadata.action_delivery(setup.tenant, id).await;
        if let Ok(delivery) = &delivery
            && delivery.attempts == 1
        {
            break delivery.clone();
        }
        assert!(Instant::now() < deadline, "no attempt: {delivery:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(delivery.status, DeliveryStatus::Pending);
    assert_eq!(delivery.last_status_code, Some(503));
    let error = delivery.last_error.unwrap();
    assert!(
        error.contains("503") && error.contains("maintenance"),
        "{error}"
    );
    let next = delivery.next_attempt_at.expect("next attempt time");
    let expected = chrono::Utc::now().timestamp_millis() + 3_600_000;
    assert!((next - expected).abs() < 60_000, "next attempt at {next}");
    actions.shutdown().await;
}

#[tokio::test]
async fn client_error_is_not_retried() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(400, Vec::new(), "unknown field \"alarm\"");
    let actions = start(&setup, &fast_config());
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Failed).await;
    assert_eq!(delivery.attempts, 1);
    assert_eq!(delivery.last_status_code, Some(400));
    assert_eq!(delivery.next_attempt_at, None);
    let error = delivery.last_error.unwrap();
    assert!(
        error.contains("400") && error.contains("unknown field"),
        "{error}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1);
    actions.shutdown().await;
}

#[tokio::test]
async fn redirect_is_not_followed() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(
        301,
        vec![("location", "https://example.com/new?token=x".to_owned())],
        "",
    );
    let actions = start(&setup, &fast_config());
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Failed).await;
    let error = delivery.last_error.unwrap();
    assert!(error.contains("https://example.com/new"), "{error}");
    assert!(!error.contains("token"), "{error}");
    assert_eq!(receiver.requests().len(), 1);
    actions.shutdown().await;
}

#[tokio::test]
async fn last_attempt_fails_the_delivery() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    for _ in 0..3 {
        receiver.respond(500, Vec::new(), "");
    }
    let config = ActionsConfig {
        max_attempts: 2,
        ..fast_config()
    };
    let actions = start(&setup, &config);
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Failed).await;
    assert_eq!(delivery.attempts, 2);
    let error = delivery.last_error.unwrap();
    assert!(error.contains("gave up after 2 attempts"), "{error}");
    assert_eq!(receiver.requests().len(), 2);
    actions.shutdown().await;
}

#[tokio::test]
async fn unreachable_receiver_is_retried() {
    let setup = setup().await;
    // A bound socket that does not listen: connecting is refused, and no
    // receiver of a test running alongside can take the port meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let config = ActionsConfig {
        max_attempts: 2,
        ..fast_config()
    };
    let actions = start(&setup, &config);
    let spec = webhook(
        &format!("http://127.0.0.1:{port}/hook?token=s3cr3t"),
        json!({}),
    );
    let id = queued(actions.submit(&spec, &event(setup.tenant, AlarmChange::Raised)));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Failed).await;
    assert_eq!(delivery.attempts, 2);
    assert_eq!(delivery.last_status_code, None);
    assert_eq!(delivery.target, format!("http://127.0.0.1:{port}/hook"));
    let error = delivery.last_error.unwrap();
    assert!(error.contains("request failed"), "{error}");
    assert!(!error.contains("s3cr3t"), "{error}");
    actions.shutdown().await;
}

#[tokio::test]
async fn pending_delivery_survives_a_restart() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(503, vec![("retry-after", "1".to_owned())], "");
    let first = start(&setup, &fast_config());
    let id = queued(first.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));
    let deadline = Instant::now() + WAIT;
    while receiver.requests().is_empty() {
        assert!(Instant::now() < deadline, "no first attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.shutdown().await;
    let pending = setup
        .metadata
        .action_delivery(setup.tenant, id)
        .await
        .unwrap();
    assert_eq!(pending.status, DeliveryStatus::Pending);

    let second = start(&setup, &fast_config());
    let delivery = wait_for_status(&setup, id, DeliveryStatus::Succeeded).await;
    assert_eq!(delivery.attempts, 2);
    assert_eq!(receiver.requests().len(), 2);
    second.shutdown().await;
}

#[tokio::test]
async fn manual_retry_starts_a_new_round() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(404, Vec::new(), "");
    let actions = start(&setup, &fast_config());
    let id = queued(actions.submit(
        &webhook(&receiver.url, json!({})),
        &event(setup.tenant, AlarmChange::Raised),
    ));
    wait_for_status(&setup, id, DeliveryStatus::Failed).await;

    let restarted = actions.retry(setup.tenant, id).await.expect("retry");
    assert_eq!(restarted.attempts, 0);
    let delivery = wait_for_status(&setup, id, DeliveryStatus::Succeeded).await;
    assert_eq!(delivery.attempts, 1);
    assert_eq!(receiver.requests().len(), 2);

    let other_tenant = actions.retry(TenantId::new_random(), id).await;
    assert!(other_tenant.is_err(), "another tenant retried the delivery");
    actions.shutdown().await;
}

#[tokio::test]
async fn untriggered_change_is_not_queued() {
    let setup = setup().await;
    let actions = start(&setup, &fast_config());
    let spec = webhook("http://127.0.0.1:9/hook", json!({}));
    assert_eq!(
        actions.submit(&spec, &event(setup.tenant, AlarmChange::Updated)),
        Submission::NotTriggered
    );
    assert_eq!(
        actions.submit(&spec, &event(setup.tenant, AlarmChange::Acknowledged)),
        Submission::NotTriggered
    );
    actions.shutdown().await;
}

// The recorder cannot run during the loop on a current-thread runtime, so
// only the first delivery fits into a queue of one.
#[tokio::test(flavor = "current_thread")]
async fn full_queue_drops_without_waiting() {
    let setup = setup().await;
    let config = ActionsConfig {
        queue_capacity: 1,
        ..fast_config()
    };
    let actions = start(&setup, &config);
    let spec = webhook("http://127.0.0.1:9/hook", json!({}));

    let started = Instant::now();
    let submissions: Vec<Submission> = (0..100)
        .map(|_| actions.submit(&spec, &event(setup.tenant, AlarmChange::Raised)))
        .collect();
    assert!(started.elapsed() < Duration::from_secs(1));
    let dropped = submissions
        .iter()
        .filter(|submission| **submission == Submission::Dropped)
        .count();
    assert_eq!(dropped, 99);
    actions.shutdown().await;
}

#[tokio::test]
async fn mqtt_publish_without_broker_fails_with_the_setting() {
    let setup = setup().await;
    let actions = start(&setup, &fast_config());
    let spec: ActionSpec = serde_json::from_value(json!({
        "type": "mqtt_publish", "topic": "alarms/{device_name}/{rule}"
    }))
    .unwrap();
    let id = queued(actions.submit(&spec, &event(setup.tenant, AlarmChange::Raised)));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Failed).await;
    assert_eq!(delivery.target, "alarms/boiler-1/overheat");
    let error = delivery.last_error.unwrap();
    assert!(error.contains("actions.mqtt.url"), "{error}");
    actions.shutdown().await;
}

#[tokio::test]
async fn command_to_absent_device_is_retried() {
    let setup = setup().await;
    let config = ActionsConfig {
        max_attempts: 2,
        ..fast_config()
    };
    let actions = start(&setup, &config);
    let spec: ActionSpec =
        serde_json::from_value(json!({"type": "command", "method": "shutOff"})).unwrap();
    let event = event(setup.tenant, AlarmChange::Raised);
    let id = queued(actions.submit(&spec, &event));

    let delivery = wait_for_status(&setup, id, DeliveryStatus::Failed).await;
    assert_eq!(delivery.attempts, 2);
    assert_eq!(delivery.target, "shutOff");
    let error = delivery.last_error.unwrap();
    assert!(
        error.contains(&event.device_id.to_string()) && error.contains("rpc/request"),
        "{error}"
    );
    actions.shutdown().await;
}

#[tokio::test]
async fn old_finished_deliveries_are_deleted() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    let actions = start(&setup, &fast_config());
    let spec = webhook(&receiver.url, json!({}));
    let done = queued(actions.submit(&spec, &event(setup.tenant, AlarmChange::Raised)));
    wait_for_status(&setup, done, DeliveryStatus::Succeeded).await;
    actions.shutdown().await;

    let failed = DeliveryId::new_v7();
    let row = setup
        .metadata
        .action_delivery(setup.tenant, done)
        .await
        .unwrap();
    setup
        .metadata
        .insert_action_deliveries(&[crate::metadata::NewDelivery {
            id: failed,
            tenant_id: row.tenant_id,
            device_id: row.device_id,
            alarm_id: row.alarm_id,
            kind: row.kind,
            target: row.target.clone(),
            event: row.event.clone(),
            spec: row.spec.clone(),
            payload: row.payload.clone(),
            created_at: row.created_at,
        }])
        .await
        .unwrap();
    let failure = AttemptResult {
        status: DeliveryStatus::Failed,
        attempts: 1,
        last_error: Some("HTTP 410".to_owned()),
        last_status_code: Some(410),
        next_attempt_at: None,
        updated_at: chrono::Utc::now().timestamp_millis(),
    };
    setup
        .metadata
        .record_action_attempt(failed, &failure)
        .await
        .unwrap();

    let future = chrono::Utc::now().timestamp_millis() + 1;
    let deleted = setup
        .metadata
        .delete_finished_action_deliveries(future, 0)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let remaining = setup
        .metadata
        .list_action_deliveries(
            setup.tenant,
            &DeliveryFilter {
                limit: 10,
                ..DeliveryFilter::default()
            },
        )
        .await
        .unwrap();
    let ids: Vec<DeliveryId> = remaining.iter().map(|delivery| delivery.id).collect();
    assert_eq!(ids, [failed]);
}

#[tokio::test]
async fn list_filters_by_status_alarm_and_page() {
    let setup = setup().await;
    let receiver = Receiver::start().await;
    receiver.respond(400, Vec::new(), "");
    let actions = start(&setup, &fast_config());
    let spec = webhook(&receiver.url, json!({}));
    let first_event = event(setup.tenant, AlarmChange::Raised);
    let failed = queued(actions.submit(&spec, &first_event));
    wait_for_status(&setup, failed, DeliveryStatus::Failed).await;
    let mut ids = vec![failed];
    for _ in 0..2 {
        let id = queued(actions.submit(&spec, &event(setup.tenant, AlarmChange::Raised)));
        wait_for_status(&setup, id, DeliveryStatus::Succeeded).await;
        ids.push(id);
    }
    actions.shutdown().await;

    let list = |filter: DeliveryFilter| {
        let metadata = setup.metadata.clone();
        let tenant = setup.tenant;
        async move {
            metadata
                .list_action_deliveries(tenant, &filter)
                .await
                .unwrap()
                .iter()
                .map(|delivery| delivery.id)
                .collect::<Vec<_>>()
        }
    };
    let all = DeliveryFilter {
        limit: 10,
        ..DeliveryFilter::default()
    };
    assert_eq!(list(all.clone()).await, [ids[2], ids[1], ids[0]]);
    let only_failed = DeliveryFilter {
        status: Some(DeliveryStatus::Failed),
        ..all.clone()
    };
    assert_eq!(list(only_failed).await, [failed]);
    let by_alarm = DeliveryFilter {
        alarm_id: first_event.alarm_id(),
        ..all.clone()
    };
    assert_eq!(list(by_alarm).await, [failed]);
    let page = DeliveryFilter {
        before: Some(ids[2]),
        limit: 1,
        ..all.clone()
    };
    assert_eq!(list(page).await, [ids[1]]);
    let other_tenant = setup
        .metadata
        .list_action_deliveries(TenantId::new_random(), &all)
        .await
        .unwrap();
    assert!(other_tenant.is_empty());
}
