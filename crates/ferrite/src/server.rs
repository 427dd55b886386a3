//! `ferrite serve`: opens the data directory, starts the ingest log, the
//! pipeline and the listeners, and shuts them down in order.
//!
//! Start-up order: bind the listeners (a taken port fails at once), open the
//! metadata and the store, open the log (replaying what the store has not
//! flushed), start the pipeline, then serve. Shutdown on SIGTERM or Ctrl-C
//! runs backwards: stop accepting, let in-flight requests finish, commit the
//! log's queue, drain the pipeline, flush the store.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::actions::Actions;
use crate::adapters;
use crate::auth::{self, Auth};
use crate::config::Config;
use crate::ids::{DeviceId, TenantId};
use crate::ingest::{self, IngestHandle};
use crate::metadata::{Labels, MetadataStore, Role, SqliteMetadata};
use crate::pipeline::{Pipeline, PipelineOptions, SeenDevices};
use crate::store::{EmbeddedStore, TimeSeriesStore};

/// State shared by the HTTP handlers.
pub struct AppState {
    pub config: Config,
    pub auth: Arc<Auth>,
    pub metadata: Arc<SqliteMetadata>,
    pub store: Arc<dyn TimeSeriesStore>,
    /// Requests a flush from the pipeline's flusher.
    pub flush_requests: Arc<crate::pipeline::FlushRequests>,
    pub ingest: IngestHandle,
    pub metrics: PrometheusHandle,
    /// Set once every listener accepts connections.
    pub ready: AtomicBool,
    /// Newest receive time per device since the last metadata update.
    pub seen: SeenDevices,
    /// Labels written since the last metadata update, merged per device.
    pub pending_labels: parking_lot::Mutex<std::collections::HashMap<DeviceId, Labels>>,
    /// Device ids by name, for line-protocol fleet writes.
    pub device_names: parking_lot::Mutex<std::collections::HashMap<(TenantId, String), DeviceId>>,
    /// Processed telemetry and alarm changes for live subscribers.
    pub live: crate::live::LiveBus,
    /// Cached devices and compiled profiles; the API invalidates what it
    /// changes.
    pub directory: Arc<crate::profiles::Directory>,
    pub alarms: Arc<crate::alarms::AlarmManager>,
    /// Sends to devices connected over MQTT (commands).
    pub mqtt_router: adapters::mqtt::Router,
    /// The MQTT server's state, for MQTT over WebSocket and the device
    /// WebSocket.
    pub mqtt: adapters::mqtt::MqttServer,
    /// One permit per open device WebSocket (`websocket.max_connections`).
    pub device_socket_slots: Arc<tokio::sync::Semaphore>,
    /// Runs the actions of alarm rules and records their deliveries.
    pub actions: Actions,
    /// Stores uplinks from ChirpStack and The Things Stack.
    pub lorawan_integrations: Arc<adapters::lorawan_integrations::IntegrationContext>,
    /// Tenant data keys: seal and open secrets stored in the metadata
    /// database.
    pub keyring: Arc<crate::encryption::Keyring>,
    /// DTLS credentials of the devices, mirrored for the DTLS listener; the
    /// credentials API updates it.
    pub dtls_credentials: Arc<crate::auth::dtls::DtlsCredentials>,
    /// Device CAs and registered certificates of the MQTT over TLS
    /// listener; `None` when TLS is off. The device CA API updates it.
    pub device_trust: Option<Arc<crate::tls::DeviceTrust>>,
    /// Rate and connection limits, shared with the other listeners.
    pub limits: crate::limits::Limits,
}

impl AppState {
    pub fn forget_device_name(&self, tenant: TenantId, name: &str) {
        self.device_names.lock().remove(&(tenant, name.to_owned()));
    }

    /// Gives the store the retention of every device whose profile sets
    /// one. Called at start and after changes to profiles or to a device's
    /// profile; a failure keeps the previous retention and is logged.
    pub async fn sync_device_retention(&self) {
        if let Err(error) = sync_device_retention(&self.metadata, &self.store).await {
            tracing::warn!(%error, "cannot apply the retention of device profiles; the previous retention stays in force");
        }
    }
}

async fn sync_device_retention(
    metadata: &SqliteMetadata,
    store: &Arc<dyn TimeSeriesStore>,
) -> anyhow::Result<()> {
    let retentions = metadata.device_retentions().await?;
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.set_device_retention(retentions)).await??;
    Ok(())
}

/// Extra work `serve` starts once the listeners are up (the demo fleet).
pub type AfterStart = Box<dyn FnOnce(Arc<AppState>, ServerAddrs) + Send>;

/// Addresses of the listeners; `None` for a listener that is off.
#[derive(Debug, Clone, Copy)]
pub struct ServerAddrs {
    pub http: Option<SocketAddr>,
    pub mqtt: Option<SocketAddr>,
    pub coap: Option<SocketAddr>,
    pub lorawan: SocketAddr,
    /// The CoAP over DTLS listener, unless DTLS is off.
    pub coaps: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
}

async fn bind(addr: SocketAddr, what: &str, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for {what} on {addr}; choose another address with {setting}")
    })
}

pub async fn run(config: Config, after_start: Option<AfterStart>) -> anyhow::Result<()> {
    let plain = config.tls.plain_listeners;
    let http_listener = match plain {
        true => Some(
            bind(
                config.http.listen,
                "HTTP",
                "--http-listen, FERRITE_HTTP_LISTEN or http.listen",
            )
            .await?,
        ),
        false => None,
    };
    let mqtt_listener = match plain {
        true => Some(
            bind(
                config.mqtt.listen,
                "MQTT",
                "--mqtt-listen, FERRITE_MQTT_LISTEN or mqtt.listen",
            )
            .await?,
        ),
        false => None,
    };
    let coap_socket = match plain {
        true => Some(
            tokio::net::UdpSocket::bind(config.coap.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen for CoAP on UDP {}; choose another address with --coap-listen, FERRITE_COAP_LISTEN or coap.listen",
                        config.coap.listen
                    )
                })?,
        ),
        false => None,
    };
    let (https_listener, mqtts_listener) = match config.tls.enabled() {
        true => (
            Some(
                bind(
                    config.tls.https_listen,
                    "HTTPS",
                    "--https-listen, FERRITE_TLS_HTTPS_LISTEN or tls.https_listen",
                )
                .await?,
            ),
            Some(
                bind(
                    config.tls.mqtts_listen,
                    "MQTT over TLS",
                    "--mqtts-listen, FERRITE_TLS_MQTTS_LISTEN or tls.mqtts_listen",
                )
                .await?,
            ),
        ),
        false => (None, None),
    };
    let lorawan_socket = adapters::lorawan::bind(config.lorawan.listen).await?;
    let coaps_socket = match config.coap.dtls.enabled() {
        true => Some(adapters::coap::dtls::bind_socket(config.coap.dtls.listen).await?),
        false => None,
    };
    let addrs = ServerAddrs {
        http: http_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?,
        mqtt: mqtt_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?,
        coap: coap_socket
            .as_ref()
            .map(tokio::net::UdpSocket::local_addr)
            .transpose()?,
        lorawan: lorawan_socket.local_addr()?,
        coaps: coaps_socket
            .as_ref()
            .map(tokio::net::UdpSocket::local_addr)
            .transpose()?,
        https: https_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?,
        mqtts: mqtts_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?,
    };

    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;

    let metadata = Arc::new(SqliteMetadata::open(&config.data_dir).await?);
    ensure_first_admin(&metadata).await?;
    let auth = Arc::new(Auth::open(
        &config.data_dir,
        metadata.clone(),
        &config.auth,
    )?);
    let limits = crate::limits::Limits::new(&config.limits);
    let keyring = crate::encryption::keyring::open_for_server(&config.data_dir, metadata.clone())
        .await
        .context("cannot load the encryption keys")?;
    let sealed_profiles = crate::actions::secrets::seal_stored_profiles(&keyring, &metadata)
        .await
        .context("cannot seal the webhook secrets of stored profiles")?;
    if sealed_profiles > 0 {
        tracing::info!(
            profiles = sealed_profiles,
            "sealed plain webhook secrets of stored profiles"
        );
    }
    let dtls_credentials = Arc::new(crate::auth::dtls::DtlsCredentials::default());
    if coaps_socket.is_some() || config.tls.enabled() {
        dtls_credentials
            .reload(&metadata)
            .await
            .context("cannot load the devices' DTLS credentials")?;
    }
    let tls = match config.tls.enabled() {
        true => {
            let tls = crate::tls::TlsSetup::new(&config.tls, dtls_credentials.clone())?;
            tls.trust
                .reload(&metadata)
                .await
                .context("cannot load the registered device CAs")?;
            Some(tls)
        }
        false => None,
    };
    let coaps_listener = match coaps_socket {
        Some(socket) => Some(
            adapters::coap::dtls::DtlsListener::new(
                socket,
                &config.coap.dtls,
                dtls_credentials.clone(),
                keyring.clone(),
            )?
            .with_limits(limits.clone()),
        ),
        None => None,
    };

    let store_dir = config.data_dir.join("tsdb");
    let storage_config = config.storage.clone();
    // The cipher is given even without storage.encrypt, so that blocks
    // sealed while it was on stay readable.
    let block_cipher: Arc<dyn ferrite_tsdb::BlockCipher> = Arc::new(
        crate::store::cipher::TenantBlockCipher::new(keyring.clone()),
    );
    let store: Arc<dyn TimeSeriesStore> = Arc::new(
        tokio::task::spawn_blocking(move || {
            EmbeddedStore::open_with_cipher(&store_dir, &storage_config, Some(block_cipher))
        })
        .await?
        .context("cannot open the time-series store")?,
    );

    let ingest::OpenedLog {
        handle: ingest,
        control: log_control,
        committed,
        ready: log_ready,
    } = ingest::open(&config, store.durable_marker(), Some(keyring.clone())).await?;
    // Before replay, so queries and maintenance know the profiles'
    // retention from the start.
    sync_device_retention(&metadata, &store)
        .await
        .context("cannot apply the retention of device profiles")?;
    let log_control = Arc::new(log_control);

    let mqtt_router = adapters::mqtt::Router::new(&config.mqtt);
    let actions = Actions::start(
        &config.actions,
        metadata.clone(),
        keyring.clone(),
        mqtt_router.clone(),
    )?;

    let seen = SeenDevices::default();
    let live = crate::live::LiveBus::default();
    let directory = Arc::new(crate::profiles::Directory::new(metadata.clone()));
    let (alarms, alarm_signals, alarm_receiver) = crate::alarms::AlarmManager::open(
        metadata.clone(),
        directory.clone(),
        live.clone(),
        actions.clone(),
        seen.clone(),
    )
    .await?;
    let processing = Arc::new(crate::pipeline::Processing {
        config: config.clone(),
        directory: directory.clone(),
        live: live.clone(),
        alarms: alarm_signals,
        open_alarms: alarms.open_alarms(),
        seen: seen.clone(),
        runtime: tokio::runtime::Handle::current(),
        scripts: crate::scripts::runner_factory(&config.processing),
    });
    let shutdown = CancellationToken::new();
    let keyring_task = tokio::spawn(keyring.clone().refresh_periodically(
        {
            let auth = auth.clone();
            move |tenant| {
                auth.revocations()
                    .publish(crate::auth::revocation::Revoked::Tenant(tenant))
            }
        },
        shutdown.clone(),
    ));
    let alarm_task = tokio::spawn(alarms.clone().run(alarm_receiver));
    let silence_task = tokio::spawn(alarms.clone().watch_silence(shutdown.clone()));
    let pipeline = Pipeline::start(
        committed,
        store.clone(),
        log_control.clone(),
        processing,
        PipelineOptions {
            workers: config.ingest.workers,
            flush_interval: config.storage.flush_interval,
        },
    )?;

    // Replay runs through the pipeline, so it can finish only now.
    match log_ready.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(error),
        Err(_) => anyhow::bail!("the ingest log writer stopped during start-up"),
    }

    let mqtt_context = Arc::new(adapters::mqtt::MqttContext {
        config: config.mqtt.clone(),
        auth: auth.clone(),
        ingest: ingest.clone(),
        max_future: config.ingest.max_future,
        max_past: config.ingest.max_past,
        storage: config.storage.clone(),
        directory: directory.clone(),
        live: live.clone(),
        metadata: metadata.clone(),
        limits: limits.clone(),
    });
    let mqtt_server =
        adapters::mqtt::MqttServer::new(mqtt_context, mqtt_router.clone(), shutdown.clone());

    let lorawan_integrations = Arc::new(adapters::lorawan_integrations::IntegrationContext {
        metadata: metadata.clone(),
        ingest: ingest.clone(),
        seen: seen.clone(),
        recent: Default::default(),
    });
    let state = Arc::new(AppState {
        lorawan_integrations: lorawan_integrations.clone(),
        flush_requests: pipeline.flush_requests(),
        config: config.clone(),
        auth: auth.clone(),
        metadata: metadata.clone(),
        store,
        ingest: ingest.clone(),
        metrics,
        ready: AtomicBool::new(false),
        seen: seen.clone(),
        device_names: Default::default(),
        pending_labels: Default::default(),
        live: live.clone(),
        directory,
        alarms,
        mqtt_router: mqtt_router.clone(),
        mqtt: mqtt_server.clone(),
        device_socket_slots: Arc::new(tokio::sync::Semaphore::new(
            config
                .websocket
                .max_connections
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        )),
        actions: actions.clone(),
        keyring: keyring.clone(),
        dtls_credentials,
        device_trust: tls.as_ref().map(|tls| tls.trust.clone()),
        limits: limits.clone(),
    });
    let certificate_task = tls
        .as_ref()
        .map(|tls| tls.watch_certificate(config.tls.reload_interval, shutdown.clone()));

    let last_seen_task = tokio::spawn(sync_device_status(state.clone(), shutdown.clone()));
    let https =
        https_listener
            .zip(tls.as_ref())
            .map(|(listener, tls)| adapters::http::TlsListener {
                listener,
                tls: tls.https.clone(),
            });
    let mqtts =
        mqtts_listener
            .zip(tls.as_ref())
            .map(|(listener, tls)| adapters::mqtt::TlsListener {
                listener,
                tls: tls.mqtts.clone(),
                trust: tls.trust.clone(),
            });
    let limits_task = tokio::spawn(limits.clone().run_sweeper(shutdown.clone()));
    let http_task = tokio::spawn(adapters::http::serve(
        http_listener,
        https,
        state.clone(),
        shutdown.clone(),
    ));
    let coap_context = adapters::coap::CoapContext::new(
        &config,
        auth.clone(),
        ingest.clone(),
        state.directory.clone(),
        mqtt_router.clone(),
        limits.clone(),
    );
    let mqtt_task = tokio::spawn(adapters::mqtt::serve(mqtt_listener, mqtts, mqtt_server));
    // The DTLS listener shares `coap_context`, and with it the observers
    // that the router delivers to.
    let coaps_task = coaps_listener.map(|listener| {
        let mode = match (listener.psk_enabled(), listener.certificates_enabled()) {
            (true, true) => "PSK and certificates",
            (true, false) => "PSK",
            _ => "certificates",
        };
        if let Some(addr) = addrs.coaps {
            tracing::info!(%addr, mode, "CoAP listening (DTLS)");
        }
        tokio::spawn(adapters::coap::dtls::serve(
            listener,
            coap_context.clone(),
            metadata.clone(),
            shutdown.clone(),
        ))
    });
    let coap_task = coap_socket.map(|socket| {
        tokio::spawn(adapters::coap::serve(
            socket,
            coap_context.clone(),
            shutdown.clone(),
        ))
    });
    let chirpstack_mqtt_tasks =
        start_chirpstack_mqtt(&config, lorawan_integrations, shutdown.clone())?;
    let lorawan_context = Arc::new(adapters::lorawan::LorawanContext {
        config: config.lorawan.clone(),
        metadata: metadata.clone(),
        keyring,
        ingest: ingest.clone(),
        seen: seen.clone(),
    });
    let lorawan_task = tokio::spawn(adapters::lorawan::serve(
        lorawan_socket,
        lorawan_context,
        shutdown.clone(),
    ));
    drop(ingest);

    state.ready.store(true, Ordering::Release);
    if let Some(addr) = addrs.http {
        tracing::info!(%addr, "HTTP listening (REST API, HTTP telemetry, line protocol, WebSocket)");
    }
    if let Some(addr) = addrs.mqtt {
        tracing::info!(%addr, "MQTT listening");
    }
    if let Some(addr) = addrs.coap {
        tracing::info!(%addr, "CoAP listening (UDP)");
    }
    if let Some(tls) = &tls {
        tls.certificate.warn_if_expiring();
        let fingerprint = tls.certificate.fingerprint();
        if let Some(addr) = addrs.https {
            tracing::info!(%addr, fingerprint, "HTTPS listening (REST API, HTTP telemetry, line protocol, WebSocket)");
        }
        if let Some(addr) = addrs.mqtts {
            tracing::info!(%addr, fingerprint, "MQTT over TLS listening");
        }
    }
    if !plain {
        tracing::info!("plain HTTP, MQTT and CoAP listeners are off (tls.plain_listeners = false)");
    }
    tracing::info!(addr = %addrs.lorawan, "LoRaWAN listening (Semtech UDP)");
    tracing::info!(data_dir = %config.data_dir.display(), "Ferrite is ready");
    if let Some(after_start) = after_start {
        after_start(state.clone(), addrs);
    }

    wait_for_signal().await;
    tracing::info!("shutting down: no new connections; finishing accepted messages");
    state.ready.store(false, Ordering::Release);
    shutdown.cancel();
    // Live streams never end by themselves; the HTTP listener would wait
    // for them until its drain timeout.
    state.live.close();
    let _ = http_task.await;
    let _ = mqtt_task.await;
    if let Some(task) = coap_task {
        let _ = task.await;
    }
    if let Some(task) = certificate_task {
        let _ = task.await;
    }
    let _ = lorawan_task.await;
    if let Some(task) = coaps_task {
        let _ = task.await;
    }
    for task in chirpstack_mqtt_tasks {
        let _ = task.await;
    }
    log_control.shutdown().await;
    tokio::task::spawn_blocking(move || pipeline.finish()).await?;
    // The workers are gone, so the alarm manager's queue has closed.
    let _ = alarm_task.await;
    let _ = silence_task.await;
    actions.shutdown().await;
    let _ = last_seen_task.await;
    let _ = limits_task.await;
    let _ = keyring_task.await;
    flush_device_status(&state).await;
    metadata.close().await;
    tracing::info!("Ferrite stopped");
    Ok(())
}

/// Starts the client of ChirpStack's MQTT integration when
/// `lorawan.chirpstack_mqtt.url` is set.
fn start_chirpstack_mqtt(
    config: &Config,
    context: Arc<adapters::lorawan_integrations::IntegrationContext>,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use adapters::lorawan_integrations::{TenantScope, mqtt};

    let settings = &config.lorawan.chirpstack_mqtt;
    let Some(broker) = settings.broker_address()? else {
        return Ok(Vec::new());
    };
    let scope = match settings.tenant_id()? {
        Some(tenant) => TenantScope::Only(tenant),
        None => TenantScope::Any,
    };
    Ok(mqtt::start(
        settings.clone(),
        broker,
        scope,
        context,
        shutdown,
    ))
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Creates `admin@ferrite.local` with a random password on first start and
/// prints the login once.
async fn ensure_first_admin(metadata: &SqliteMetadata) -> anyhow::Result<()> {
    if metadata.count_users().await? > 0 {
        return Ok(());
    }
    let password = auth::generate_api_key()[4..24].to_owned();
    let hash = tokio::task::spawn_blocking({
        let password = password.clone();
        move || auth::hash_password(&password)
    })
    .await??;
    let tenant = metadata.default_tenant().await?;
    let email = "admin@ferrite.local";
    metadata
        .create_user(tenant.id, email, &hash, Role::Admin)
        .await?;
    println!(
        "\nCreated the first admin user.\n  email:    {email}\n  password: {password}\nThis password is shown only this once. Log in with POST /api/v1/auth/login.\n"
    );
    tracing::info!(email, "created the first admin user");
    Ok(())
}

/// Writes last-seen times and labels to the metadata store every 2 s.
async fn sync_device_status(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = ticker.tick() => flush_device_status(&state).await,
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn flush_device_status(state: &AppState) {
    flush_last_seen(&state.metadata, &state.seen).await;

    let pending: Vec<(DeviceId, Labels)> = state.pending_labels.lock().drain().collect();
    if pending.is_empty() {
        return;
    }
    if let Err(error) = state.metadata.merge_labels(&pending).await {
        tracing::warn!(%error, devices = pending.len(), "cannot record device labels; retrying later");
        let mut labels = state.pending_labels.lock();
        for (device, failed) in pending {
            // Newer labels that arrived meanwhile win over the failed ones.
            let entry = labels.entry(device).or_default();
            for (name, value) in failed {
                entry.entry(name).or_insert(value);
            }
        }
    }
}

async fn flush_last_seen(metadata: &SqliteMetadata, seen: &SeenDevices) {
    let pending: Vec<_> = seen.lock().drain().collect();
    if pending.is_empty() {
        return;
    }
    if let Err(error) = metadata.record_last_seen(&pending).await {
        tracing::warn!(%error, devices = pending.len(), "cannot record last-seen times; retrying later");
        let mut seen = seen.lock();
        for (device, at) in pending {
            let entry = seen.entry(device).or_insert(at);
            *entry = (*entry).max(at);
        }
    }
}

/// Opens only the metadata of a data directory, for the CLI commands that
/// run beside a server.
pub async fn open_metadata(data_dir: &Path) -> anyhow::Result<SqliteMetadata> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    Ok(SqliteMetadata::open(data_dir).await?)
}
