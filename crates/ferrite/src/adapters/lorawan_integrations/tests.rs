//! [`IntegrationContext::accept`] against a real metadata database and
//! embedded ingest log: tenant scopes, repeats and MAC-only frames.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::Config;
use crate::ids::TenantId;
use crate::metadata::MetadataStore;
use crate::metadata::lorawan::{Activation, NewLorawanDevice, SealedKeys};

struct Fixture {
    context: IntegrationContext,
    committed: tokio::sync::mpsc::Receiver<crate::ingest::Committed>,
    tenant: TenantId,
    device: DeviceId,
    _log: crate::ingest::LogControl,
    _dir: tempfile::TempDir,
}

const DEV_EUI: &str = "70b3d57ed0001b01";

/// Opens a data directory with one device registered as external under
/// [`DEV_EUI`].
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let metadata = Arc::new(SqliteMetadata::open(dir.path()).await.expect("metadata"));
    let tenant = metadata.default_tenant().await.expect("tenant").id;
    let device = metadata
        .create_device(tenant, "external-1", b"token-hash")
        .await
        .expect("device")
        .id;
    let registration = NewLorawanDevice {
        dev_eui: DEV_EUI.to_owned(),
        join_eui: None,
        region: None,
        activation: Activation::External,
        mac_version: "1.0.3".to_owned(),
        keys: SealedKeys {
            app_key: None,
            nwk_s_key: None,
            app_s_key: None,
        },
        dev_addr: None,
    };
    metadata
        .put_lorawan_device(tenant, device, &registration)
        .await
        .expect("registration");

    let crate::ingest::OpenedLog {
        handle,
        control,
        committed,
        ready,
    } = crate::ingest::open(&config, 0, None)
        .await
        .expect("ingest log");
    ready.await.expect("log writer").expect("replay");
    Fixture {
        context: IntegrationContext {
            metadata,
            ingest: handle,
            seen: Default::default(),
            recent: Default::default(),
        },
        committed,
        tenant,
        device,
        _log: control,
        _dir: dir,
    }
}

fn uplink(f_cnt: u32, f_port: u8, payload: &[u8]) -> Uplink {
    let body = serde_json::json!({
        "time": "2026-03-14T09:26:53.589Z",
        "deviceInfo": {"devEui": DEV_EUI.to_uppercase()},
        "fCnt": f_cnt,
        "fPort": f_port,
        "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, payload),
    });
    chirpstack::parse_uplink(body.to_string().as_bytes()).expect("valid event")
}

#[tokio::test]
async fn scope_of_other_tenant_finds_nothing() {
    let fixture = fixture().await;
    let error = fixture
        .context
        .accept(
            &uplink(1, 2, &[1]),
            TenantScope::Only(TenantId::new_random()),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, AcceptError::UnknownDevEui { ref dev_eui } if dev_eui == DEV_EUI),
        "{error}"
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn any_scope_stores_lorawan_envelope() {
    let mut fixture = fixture().await;
    let accepted = fixture
        .context
        .accept(&uplink(7, 2, &[1, 103, 0, 215]), TenantScope::Any)
        .await
        .expect("stored");
    assert_eq!(accepted, Accepted::Stored(fixture.device));

    let batch = tokio::time::timeout(Duration::from_secs(5), fixture.committed.recv())
        .await
        .expect("committed in time")
        .expect("a batch");
    let (_, envelope) = &batch.records[0];
    assert_eq!(envelope.tenant_id, fixture.tenant);
    assert_eq!(envelope.device_id, fixture.device);
    assert_eq!(envelope.protocol, Protocol::Lorawan);
    assert_eq!(envelope.content_type, ContentType::Raw);
    assert_eq!(&envelope.payload[..], [1, 103, 0, 215]);
    assert_eq!(envelope.received_at_ns, 1_773_480_413_589_000_000);
    let meta: serde_json::Value = serde_json::from_slice(&envelope.meta).unwrap();
    assert_eq!(meta["f_cnt"], 7);
    assert_eq!(meta["f_port"], 2);
}

#[tokio::test]
async fn own_tenant_scope_stores_then_drops_repeat() {
    let fixture = fixture().await;
    let scope = TenantScope::Only(fixture.tenant);
    let first = fixture.context.accept(&uplink(8, 2, &[5]), scope).await;
    assert_eq!(first.unwrap(), Accepted::Stored(fixture.device));
    let repeat = fixture.context.accept(&uplink(8, 2, &[5]), scope).await;
    assert_eq!(repeat.unwrap(), Accepted::Duplicate(fixture.device));
}

#[tokio::test]
async fn mac_only_frame_records_last_seen() {
    let fixture = fixture().await;
    let accepted = fixture
        .context
        .accept(&uplink(9, 0, &[]), TenantScope::Any)
        .await
        .expect("accepted");
    assert_eq!(accepted, Accepted::MacOnly(fixture.device));
    assert!(fixture.context.seen.lock().contains_key(&fixture.device));
}
