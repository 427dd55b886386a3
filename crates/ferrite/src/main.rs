//! The `ferrite` command: the server and the administrative commands.

mod actions;
mod adapters;
mod alarms;
mod api;
mod auth;
mod certs;
mod config;
mod decode;
mod demo;
mod encryption;
mod export;
mod ids;
mod ingest;
mod limits;
mod live;
mod metadata;
mod pipeline;
mod profiles;
mod rules;
mod scripts;
mod server;
mod store;
mod tls;
mod warn_limit;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::config::{Config, LogFormat};

// Line-protocol ingest spent about 40 % of its CPU samples in glibc's
// allocator (perf on 2 cores, see docs/benchmarks.md), because decoding
// allocates per line and per point. mimalloc serves such small, short-lived
// allocations faster.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use crate::metadata::{MetadataStore, Role};

#[derive(Parser)]
#[command(
    name = "ferrite",
    version,
    about = "Ferrite IoT platform: collect, process, store and serve device telemetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: MQTT, HTTP ingest, the pipeline and the REST API.
    Serve(ServeArgs),
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API keys.
    #[command(name = "api-key", subcommand)]
    ApiKey(ApiKeyCommand),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Configuration helpers.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Export stored telemetry to a Parquet or CSV file. Runs on the data
    /// directory of a stopped server; use GET /api/v1/export while it runs.
    Export(ExportArgs),
    /// Create a development CA, a server certificate and device client
    /// certificates for the TLS listeners.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Manage the master key that wraps the tenants' data keys.
    #[command(name = "master-key", subcommand)]
    MasterKey(MasterKeyCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the CA (unless the directory has one) and a new server
    /// certificate for localhost, 127.0.0.1, ::1 and the --san names, then
    /// print the configuration lines.
    Init {
        /// Directory for the PEM files; keys get mode 0600.
        #[arg(long, default_value = "ferrite-certs")]
        dir: PathBuf,
        /// Another DNS name or IP address of the server; repeat for more.
        #[arg(long = "san")]
        alt_names: Vec<String>,
        /// Validity of the server certificate in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue a client certificate signed by the directory's CA, with the
    /// device id (or, for a tenant's registered CA, the device name) as
    /// subject CN.
    Device {
        /// Device id, or device name for a CA registered with
        /// POST /api/v1/device-cas.
        device: String,
        /// Directory of `ferrite certs init`.
        #[arg(long, default_value = "ferrite-certs")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum MasterKeyCommand {
    /// Create a new master key and rewrap every tenant data key under it,
    /// while the server runs. With FERRITE_MASTER_KEY set, rewrap under
    /// that key, opening old wrappings with FERRITE_MASTER_KEY_PREVIOUS.
    Rotate {
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Print a new random master key as 64 hex digits, for FERRITE_MASTER_KEY.
    Generate,
}

#[derive(Args)]
struct DataDirArg {
    /// Data directory of the server [default: from the configuration, "ferrite-data"].
    #[arg(long, env = "FERRITE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, env = "FERRITE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    data: DataDirArg,
    /// Address of the HTTP listener (REST API and HTTP telemetry) [default: 0.0.0.0:8080].
    #[arg(long, env = "FERRITE_HTTP_LISTEN", value_parser = parse_listen)]
    http_listen: Option<SocketAddr>,
    /// Address of the MQTT listener [default: 0.0.0.0:1883].
    #[arg(long, env = "FERRITE_MQTT_LISTEN", value_parser = parse_listen)]
    mqtt_listen: Option<SocketAddr>,
    /// Address of the CoAP listener (UDP) [default: 0.0.0.0:5683].
    #[arg(long, env = "FERRITE_COAP_LISTEN", value_parser = parse_listen)]
    coap_listen: Option<SocketAddr>,
    /// UDP address of the LoRaWAN listener (Semtech packet forwarder protocol) [default: 0.0.0.0:1700].
    #[arg(long, env = "FERRITE_LORAWAN_LISTEN", value_parser = parse_listen)]
    lorawan_listen: Option<SocketAddr>,
    /// Address of the CoAP over DTLS listener [default: 0.0.0.0:5684].
    #[arg(long, env = "FERRITE_COAPS_LISTEN", value_parser = parse_listen)]
    coaps_listen: Option<SocketAddr>,
    /// Address of the HTTPS listener, when tls.cert_file is set [default: 0.0.0.0:8443].
    #[arg(long, value_parser = parse_listen)]
    https_listen: Option<SocketAddr>,
    /// Address of the MQTT over TLS listener, when tls.cert_file is set [default: 0.0.0.0:8883].
    #[arg(long, value_parser = parse_listen)]
    mqtts_listen: Option<SocketAddr>,
    /// Also start a simulated fleet of devices that publish over MQTT and HTTP.
    #[arg(long)]
    demo: bool,
    /// Number of simulated devices with --demo.
    #[arg(long, default_value_t = 120)]
    demo_devices: usize,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    data: DataDirArg,
    #[command(flatten)]
    options: export::cli::ExportOptions,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Create a device and print its id and access token as JSON. The token is shown only once.
    Create {
        /// Device name, unique in the tenant.
        name: String,
        #[command(flatten)]
        tenant: TenantArg,
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; the password is read from standard input.
    Create {
        /// The user's email address, used to log in.
        email: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "viewer")]
        role: Role,
        #[command(flatten)]
        tenant: TenantArg,
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create an API key and print it as JSON. The key is shown only once.
    Create {
        /// A name that says who uses the key.
        name: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "viewer")]
        role: Role,
        #[command(flatten)]
        tenant: TenantArg,
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Args)]
struct TenantArg {
    /// Name of the tenant to create it in [default: the default tenant].
    #[arg(long)]
    tenant: Option<String>,
}

/// Tenant commands. `ferrite tenant delete` lives with the at-rest
/// encryption code, because it also destroys the tenant's key.
#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant and print its id and name as JSON.
    Create {
        /// Tenant name: 1 to 64 letters, digits, '-', '_' or '.'.
        name: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Print every tenant as a JSON array.
    List {
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Delete a tenant with its devices, users, API keys, profiles, alarms
    /// and credentials, and destroy its data keys, so that its sealed
    /// secrets and sealed ingest log records can never be read again.
    Delete {
        /// Name of the tenant.
        name: String,
        /// Confirm the deletion, which cannot be undone.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Add a new data key version for a tenant: new secrets are sealed
    /// under it, older ones stay readable.
    #[command(name = "rotate-key")]
    RotateKey {
        /// Name of the tenant.
        name: String,
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a commented configuration file with every default.
    Example,
}

impl clap::builder::ValueParserFactory for Role {
    type Parser = clap::builder::ValueParser;

    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|text: &str| text.parse::<Role>())
    }
}

fn load_config(data: &DataDirArg) -> anyhow::Result<Config> {
    let mut config = config::load(data.config.as_deref())?;
    if let Some(dir) = &data.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));

    // Print the cause chain on one line; a backtrace would only bury the
    // message for the mistakes users make (a taken port, a duplicate name).
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses a listen address, with a hint for the usual mistakes.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "invalid listen address {text:?}: give IP:PORT, such as 127.0.0.1:8080 or 0.0.0.0:1883 (host names are not accepted)"
        )
    })
}

/// Opens the metadata of the data directory for a CLI command and reports on
/// standard error when the directory is new, because a server that uses
/// another directory would not see what the command creates.
async fn open_cli_metadata(config: &Config) -> anyhow::Result<metadata::SqliteMetadata> {
    let existed = config.data_dir.join("metadata.db").exists();
    let metadata = server::open_metadata(&config.data_dir).await?;
    if !existed {
        let full_path =
            std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
        eprintln!(
            "note: created a new data directory {}; a server started with another --data-dir does not see this. Pass the server's --data-dir (or FERRITE_DATA_DIR).",
            full_path.display()
        );
    }
    Ok(metadata)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let mut config = load_config(&args.data)?;
            if let Some(listen) = args.http_listen {
                config.http.listen = listen;
            }
            if let Some(listen) = args.mqtt_listen {
                config.mqtt.listen = listen;
            }
            if let Some(listen) = args.coap_listen {
                config.coap.listen = listen;
            }
            if let Some(listen) = args.lorawan_listen {
                config.lorawan.listen = listen;
            }
            if let Some(listen) = args.coaps_listen {
                config.coap.dtls.listen = listen;
            }
            if let Some(listen) = args.https_listen {
                config.tls.https_listen = listen;
            }
            if let Some(listen) = args.mqtts_listen {
                config.tls.mqtts_listen = listen;
            }
            config.validate()?;
            init_logging(&config);
            let after_start = args.demo.then(|| demo::starter(args.demo_devices));
            server::run(config, after_start).await
        }
        Command::Device(DeviceCommand::Create { name, tenant, data }) => {
            let config = load_config(&data)?;
            let metadata = open_cli_metadata(&config).await?;
            let tenant = cli_tenant(&metadata, &tenant).await?;
            let token = auth::generate_device_token();
            let device = metadata
                .create_device(tenant.id, &name, &auth::hash_secret(&token))
                .await?;
            cli_audit(
                &metadata,
                tenant.id,
                "device.create",
                ("device", device.id.to_string()),
                json!({"name": device.name}),
            )
            .await?;
            println!(
                "{}",
                json!({"id": device.id, "name": device.name, "token": token})
            );
            metadata.close().await;
            Ok(())
        }
        Command::User(UserCommand::Create {
            email,
            role,
            tenant,
            data,
        }) => {
            let config = load_config(&data)?;
            anyhow::ensure!(
                email.contains('@') && !email.starts_with('@') && !email.ends_with('@'),
                "invalid email {email:?}: give an address such as ops@example.com"
            );
            let password = read_password()?;
            auth::check_password_rules(&password, &email)?;
            let metadata = open_cli_metadata(&config).await?;
            let tenant = cli_tenant(&metadata, &tenant).await?;
            let hash = auth::hash_password(&password)?;
            let user = metadata.create_user(tenant.id, &email, &hash, role).await?;
            cli_audit(
                &metadata,
                tenant.id,
                "user.create",
                ("user", user.id.to_string()),
                json!({"email": user.email, "role": user.role}),
            )
            .await?;
            println!(
                "{}",
                json!({"id": user.id, "email": user.email, "role": user.role})
            );
            metadata.close().await;
            Ok(())
        }
        Command::ApiKey(ApiKeyCommand::Create {
            name,
            role,
            tenant,
            data,
        }) => {
            let config = load_config(&data)?;
            let metadata = open_cli_metadata(&config).await?;
            let tenant = cli_tenant(&metadata, &tenant).await?;
            let key = auth::generate_api_key();
            let created = metadata
                .create_api_key(tenant.id, &name, role, &auth::hash_secret(&key))
                .await?;
            cli_audit(
                &metadata,
                tenant.id,
                "api_key.create",
                ("api_key", created.id.to_string()),
                json!({"name": created.name, "role": created.role}),
            )
            .await?;
            println!(
                "{}",
                json!({"id": created.id, "name": created.name, "role": created.role, "key": key})
            );
            metadata.close().await;
            Ok(())
        }
        Command::Tenant(TenantCommand::Create { name, data }) => {
            metadata::check_tenant_name(&name).map_err(anyhow::Error::msg)?;
            let config = load_config(&data)?;
            let metadata = open_cli_metadata(&config).await?;
            let tenant = metadata.create_tenant(&name).await?;
            cli_audit(
                &metadata,
                tenant.id,
                "tenant.create",
                ("tenant", tenant.id.to_string()),
                json!({"name": tenant.name}),
            )
            .await?;
            println!("{}", json!(tenant));
            metadata.close().await;
            Ok(())
        }
        Command::Tenant(TenantCommand::List { data }) => {
            let config = load_config(&data)?;
            let metadata = open_cli_metadata(&config).await?;
            let tenants = metadata.list_tenants().await?;
            println!("{}", json!(tenants));
            metadata.close().await;
            Ok(())
        }
        Command::Config(ConfigCommand::Example) => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Certs(CertsCommand::Init {
            dir,
            alt_names,
            days,
        }) => certs::init(&dir, &alt_names, days),
        Command::Certs(CertsCommand::Device { device, dir, days }) => {
            certs::device(&dir, &device, days)
        }
        Command::Export(args) => {
            let config = load_config(&args.data)?;
            export::cli::run(&config, args.options).await
        }
        Command::Tenant(TenantCommand::Delete { name, yes, data }) => {
            anyhow::ensure!(
                yes,
                "deleting tenant {name:?} removes all its data and destroys its keys, which cannot be undone; run again with --yes"
            );
            let config = load_config(&data)?;
            let metadata = open_cli_metadata(&config).await?;
            let output = encryption::cli::delete_tenant(&metadata, &name).await?;
            println!("{output}");
            metadata.close().await;
            Ok(())
        }
        Command::Tenant(TenantCommand::RotateKey { name, data }) => {
            let config = load_config(&data)?;
            let metadata = std::sync::Arc::new(open_cli_metadata(&config).await?);
            let output =
                encryption::cli::rotate_tenant_key(&config.data_dir, metadata.clone(), &name)
                    .await?;
            println!("{output}");
            metadata.close().await;
            Ok(())
        }
        Command::MasterKey(MasterKeyCommand::Rotate { data }) => {
            let config = load_config(&data)?;
            let metadata = std::sync::Arc::new(open_cli_metadata(&config).await?);
            let output =
                encryption::cli::rotate_master_key(&config.data_dir, metadata.clone()).await?;
            println!("{output}");
            metadata.close().await;
            Ok(())
        }
        Command::MasterKey(MasterKeyCommand::Generate) => {
            println!("{}", encryption::master::generate_key_hex());
            Ok(())
        }
    }
}

/// Finds the tenant a CLI command names with `--tenant`, or the default
/// tenant.
async fn cli_tenant(
    metadata: &metadata::SqliteMetadata,
    arg: &TenantArg,
) -> anyhow::Result<metadata::Tenant> {
    match &arg.tenant {
        None => Ok(metadata.default_tenant().await?),
        Some(name) => metadata.tenant_by_name(name).await.map_err(|error| match error {
            metadata::MetadataError::NotFound(_) => anyhow::anyhow!(
                "tenant {name:?} not found: create it with `ferrite tenant create {name}`, or see `ferrite tenant list`"
            ),
            other => other.into(),
        }),
    }
}

/// Records a CLI action in the tenant's audit chain. The actor is the
/// operating system user from `USER` or `LOGNAME`, if set.
async fn cli_audit(
    metadata: &metadata::SqliteMetadata,
    tenant: ids::TenantId,
    action: &str,
    (target_type, target_id): (&str, String),
    detail: serde_json::Value,
) -> anyhow::Result<()> {
    let os_user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok();
    metadata
        .append_audit(metadata::audit::NewAuditRecord {
            tenant_id: Some(tenant),
            actor_type: "cli",
            actor_id: None,
            actor_name: os_user,
            action: action.to_owned(),
            target_type: Some(target_type.to_owned()),
            target_id: Some(target_id),
            detail,
            source: Some("cli".to_owned()),
            user_agent: None,
            outcome: "success",
            status: None,
        })
        .await
        .context("the action was done, but writing its audit record failed")?;
    Ok(())
}

/// Reads a password from standard input: the first line, without its line ending.
fn read_password() -> anyhow::Result<String> {
    let mut input = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut input)
        .context("cannot read the password from standard input")?;
    let password = input.lines().next().unwrap_or("").to_owned();
    Ok(password)
}
