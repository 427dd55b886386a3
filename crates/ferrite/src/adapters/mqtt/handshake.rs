//! The CONNECT step: checks the packet, authenticates the device, checks
//! the will message, and works out the session parameters and the CONNACK.
//! The connection task does the reading and writing.
//!
//! Refusals, with the MQTT 5 reason code and the MQTT 3.1.1 return code:
//!
//! | case | 5 | 3.1.1 |
//! |---|---|---|
//! | protocol level other than 4 and 5 | 0x84 | 0x01 |
//! | malformed CONNECT | 0x81 | none, close |
//! | empty client id with clean session 0 | server assigns an id | 0x02 |
//! | client id in use by another device or by the applications of the same tenant | 0x85 | 0x02 |
//! | no user name and no API key as password | 0x86 | 0x04 |
//! | TLS client certificate that names no device | 0x87 | 0x05 |
//! | unknown or revoked access token or API key, wrong password | 0x86 | 0x05 |
//! | too many failed API keys or passwords from the address or for the email | 0x9F | 0x05 |
//! | metadata store unavailable | 0x88 | 0x03 |
//! | will topic outside the device's namespace | 0x87 | 0x05 |
//! | application will: viewer, or topic outside `apps/` | 0x87 | 0x05 |
//! | enhanced authentication requested | 0x8C | n/a |

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqtt5_protocol::packet::connack::ConnAckPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;

use mqtt5_protocol::{
    Packet, PropertyId, PropertyValue, ProtocolVersion, QoS, ReasonCode, WillProperties,
};

use super::MqttContext;
use super::application::{self, AppPublishTarget, Client, classify_app_publish};
use super::codec::{self, ConnectProtocol, Frame, FrameError};
use super::session::{ClientId, MessageProperties};
use super::topics::{PublishTarget, classify_publish, is_valid_topic_name};
use crate::auth::{AuthError, HeldCredential, Subject, is_api_key};
use crate::ids::TenantId;
use crate::metadata::Role;
use crate::tls::ClientCertificate;
use crate::tls::client_auth::DeviceLookupError;

/// Session Expiry Interval value meaning "never expires" (MQTT 5 3.1.2.11.2).
const EXPIRY_NEVER: u32 = u32::MAX;
/// Topic aliases an MQTT 5 client may set per connection (Topic Alias
/// Maximum in CONNACK). Each costs one topic string of memory.
pub const TOPIC_ALIAS_MAXIMUM: u16 = 64;

/// A will message stored at CONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Published as a retained message.
    pub retain: bool,
    /// MQTT 5 Will Delay Interval; zero for 3.1.1.
    pub delay: Duration,
    /// MQTT 5 will properties that are forwarded with the message, User
    /// Properties in the order the client sent them ([MQTT-3.1.3-10]).
    pub properties: Option<Arc<MessageProperties>>,
    /// MQTT 5 Message Expiry Interval, counted from when the will is
    /// published.
    pub message_expiry: Option<Duration>,
}

/// An accepted CONNECT: who connected and on which terms.
#[derive(Debug)]
pub struct Connected {
    pub version: ProtocolVersion,
    pub client_id: ClientId,
    /// The client sent an empty client id and the server chose one.
    pub client_id_assigned: bool,
    pub client: Client,
    /// The credential of `client`, checked again while the connection is
    /// open.
    pub credential: HeldCredential,
    pub clean_start: bool,
    /// Keep alive requested by the client; `None` when it is zero (off).
    pub keep_alive: Option<Duration>,
    /// Granted session expiry: zero for a clean session.
    pub session_expiry: Duration,
    /// MQTT 5: the client requested a longer expiry than granted, so
    /// CONNACK carries the granted value.
    pub session_expiry_capped: bool,
    pub will: Option<Will>,
    /// MQTT 5 Receive Maximum of the client: QoS 1 messages it accepts
    /// unacknowledged.
    pub client_receive_maximum: u16,
    /// MQTT 5 Maximum Packet Size of the client, in bytes.
    pub client_maximum_packet_size: usize,
    /// MQTT 5 Request Problem Information: reason strings are allowed in
    /// acknowledgements.
    pub request_problem_information: bool,
    /// MQTT 5 Request Response Information: the client asks for a prefix
    /// for its response topics in CONNACK.
    pub request_response_information: bool,
}

/// A refused CONNECT.
#[derive(Debug)]
pub struct Rejection {
    /// CONNACK to send before closing, when the protocol has one.
    pub connack: Option<ConnAckPacket>,
    /// Label for `ferrite_mqtt_connections_refused_total`.
    pub reason: &'static str,
    /// Detail for the debug log.
    pub detail: String,
}

impl Rejection {
    fn new(
        version: ProtocolVersion,
        code: ReasonCode,
        reason: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            connack: Some(connack(version, code)),
            reason,
            detail: detail.into(),
        }
    }
}

fn connack(version: ProtocolVersion, code: ReasonCode) -> ConnAckPacket {
    match version {
        ProtocolVersion::V311 => ConnAckPacket::new_v311(false, code),
        ProtocolVersion::V5 => ConnAckPacket::new(false, code),
    }
}

/// Checks a CONNECT frame and authenticates its device.
pub async fn accept_connect(
    frame: Frame,
    context: &MqttContext,
    peer: Option<IpAddr>,
    certificate: Option<&ClientCertificate>,
) -> Result<Connected, Rejection> {
    let version = protocol_version(&frame)?;
    let connect = decode_connect(frame, version)?;
    check_features(&connect, version)?;
    let (client, credential) = match certificate {
        Some(certificate) => authenticate_certificate(certificate, version, context).await?,
        None => authenticate(&connect, version, context, peer).await?,
    };
    if let Client::Device(identity) = &client {
        context.directory.warm(identity.profile_id).await;
    }
    let will = check_will(&connect, version, &client)?;
    let (client_id, client_id_assigned) = client_id(&connect, version, client.owner().tenant_id())?;
    let (session_expiry, session_expiry_capped) = session_expiry(&connect, version, context);

    let properties = &connect.properties;
    Ok(Connected {
        version,
        client_id,
        client_id_assigned,
        client,
        credential,
        clean_start: connect.clean_start,
        keep_alive: (connect.keep_alive > 0)
            .then(|| Duration::from_secs(u64::from(connect.keep_alive))),
        session_expiry,
        session_expiry_capped,
        will,
        client_receive_maximum: properties.get_receive_maximum().unwrap_or(u16::MAX),
        client_maximum_packet_size: properties
            .get_maximum_packet_size()
            .map_or(usize::MAX, |size| size as usize),
        request_problem_information: properties.get_request_problem_information().unwrap_or(true),
        request_response_information: properties
            .get_request_response_information()
            .unwrap_or(false),
    })
}

/// Reads the protocol level; an unsupported level gets the CONNACK of the
/// version the client most likely speaks ([MQTT-3.1.2-2]).
fn protocol_version(frame: &Frame) -> Result<ProtocolVersion, Rejection> {
    match codec::connect_protocol(&frame.body) {
        Ok(ConnectProtocol::Supported(version)) => Ok(version),
        Ok(ConnectProtocol::Unsupported(level)) => {
            let version = if level > 5 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V311
            };
            Err(Rejection::new(
                version,
                ReasonCode::UnsupportedProtocolVersion,
                "unsupported_protocol",
                format!("unsupported protocol level {level}"),
            ))
        }
        Err(error) => Err(malformed(None, &error)),
    }
}

fn malformed(version: Option<ProtocolVersion>, error: &FrameError) -> Rejection {
    Rejection {
        // MQTT 3.1.1 has no return code for a malformed CONNECT.
        connack: (version == Some(ProtocolVersion::V5))
            .then(|| connack(ProtocolVersion::V5, ReasonCode::MalformedPacket)),
        reason: "malformed",
        detail: error.to_string(),
    }
}

fn decode_connect(frame: Frame, version: ProtocolVersion) -> Result<Box<ConnectPacket>, Rejection> {
    match codec::decode(frame, version) {
        Ok(Packet::Connect(connect)) => Ok(connect),
        Ok(other) => Err(malformed(
            Some(version),
            &FrameError::Malformed(format!(
                "expected CONNECT, got {}",
                other.packet_type_name()
            )),
        )),
        Err(error) => Err(malformed(Some(version), &error)),
    }
}

/// Refuses MQTT 5 features that this server does not offer and values
/// that the specification forbids.
fn check_features(connect: &ConnectPacket, version: ProtocolVersion) -> Result<(), Rejection> {
    if version != ProtocolVersion::V5 {
        return Ok(());
    }
    let properties = &connect.properties;
    if properties.get_authentication_method().is_some() {
        return Err(Rejection::new(
            version,
            ReasonCode::BadAuthenticationMethod,
            "unsupported_feature",
            "enhanced authentication is not supported",
        ));
    }
    if properties.get_receive_maximum() == Some(0)
        || properties.get_maximum_packet_size() == Some(0)
    {
        return Err(Rejection::new(
            version,
            ReasonCode::ProtocolError,
            "malformed",
            "Receive Maximum or Maximum Packet Size of 0",
        ));
    }
    Ok(())
}

/// The credentials of a CONNECT, distinguished by their form.
#[derive(Debug, PartialEq, Eq)]
enum Credentials<'a> {
    /// A device access token as user name; the password is ignored.
    DeviceToken(&'a str),
    /// An API key as user name, or as password with any user name.
    ApiKey(&'a str),
    /// A user's email as user name and their password.
    User {
        email: &'a str,
        password: &'a str,
    },
    Missing,
}

fn credentials(connect: &ConnectPacket) -> Credentials<'_> {
    let username = connect.username.as_deref().unwrap_or("");
    let password = connect
        .password
        .as_deref()
        .and_then(|password| std::str::from_utf8(password).ok())
        .unwrap_or("");
    if is_api_key(username) {
        Credentials::ApiKey(username)
    } else if is_api_key(password) {
        Credentials::ApiKey(password)
    } else if username.contains('@') && !password.is_empty() {
        Credentials::User {
            email: username,
            password,
        }
    } else if !username.is_empty() {
        Credentials::DeviceToken(username)
    } else {
        Credentials::Missing
    }
}

/// Authenticates the device of a TLS client certificate that the handshake
/// accepted. The CONNECT's user name and password are not used.
async fn authenticate_certificate(
    certificate: &ClientCertificate,
    version: ProtocolVersion,
    context: &MqttContext,
) -> Result<(Client, HeldCredential), Rejection> {
    match crate::tls::client_auth::resolve_device(&context.metadata, certificate).await {
        Ok((identity, credential)) => Ok((Client::Device(identity), credential)),
        Err(DeviceLookupError::Metadata(error)) => {
            tracing::error!(%error, "cannot authenticate an MQTT client certificate: the metadata store failed");
            Err(Rejection::new(
                version,
                ReasonCode::ServerUnavailable,
                "server_unavailable",
                "metadata store unavailable",
            ))
        }
        Err(error) => Err(Rejection::new(
            version,
            ReasonCode::NotAuthorized,
            "bad_certificate",
            error.to_string(),
        )),
    }
}

/// Authenticates a device (access token as user name) or an application
/// (API key, or email and password).
async fn authenticate(
    connect: &ConnectPacket,
    version: ProtocolVersion,
    context: &MqttContext,
    peer: Option<IpAddr>,
) -> Result<(Client, HeldCredential), Rejection> {
    let authenticated = match credentials(connect) {
        Credentials::Missing => {
            return Err(Rejection::new(
                version,
                ReasonCode::BadUsernameOrPassword,
                "bad_credentials",
                "no user name; devices send their access token as user name, applications an API key or their email and password",
            ));
        }
        Credentials::DeviceToken(token) => {
            context
                .auth
                .authenticate_device(token)
                .await
                .map(|identity| {
                    (
                        Client::Device(identity),
                        HeldCredential::device_token(token),
                    )
                })
        }
        Credentials::ApiKey(key) => context
            .auth
            .authenticate_api_key_from(key, peer)
            .await
            // An application client reads telemetry; a key scoped to
            // other things has no business on the broker.
            .and_then(|principal| {
                principal.require_scope(crate::auth::scopes::Scope::TelemetryRead)?;
                Ok(principal)
            })
            .map(|principal| (Client::Application(principal), HeldCredential::api_key(key))),
        Credentials::User { email, password } => context
            .auth
            .authenticate_user(email, password, peer)
            .await
            .and_then(|principal| {
                let Subject::User(id) = principal.subject else {
                    return Err(AuthError::InvalidLogin);
                };
                let credential = HeldCredential::User {
                    email: email.to_owned(),
                    id,
                };
                Ok((Client::Application(principal), credential))
            }),
    };

    match authenticated {
        Ok(authenticated) => Ok(authenticated),
        Err(error @ AuthError::Throttled { .. }) => {
            // MQTT 3.1.1 has no code for it, so it gets the one of a wrong
            // password.
            let code = match version {
                ProtocolVersion::V311 => ReasonCode::NotAuthorized,
                ProtocolVersion::V5 => ReasonCode::ConnectionRateExceeded,
            };
            Err(Rejection::new(
                version,
                code,
                "throttled",
                error.to_string(),
            ))
        }
        Err(error @ AuthError::ScopeMissing { .. }) => Err(Rejection::new(
            version,
            ReasonCode::NotAuthorized,
            "not_authorized",
            error.to_string(),
        )),
        Err(AuthError::Metadata(error)) => {
            tracing::error!(error = %error, "cannot authenticate an MQTT client: the metadata store failed");
            Err(Rejection::new(
                version,
                ReasonCode::ServerUnavailable,
                "server_unavailable",
                "metadata store unavailable",
            ))
        }
        Err(error) => {
            // In MQTT 3.1.1 credentials that match no device, key or user get 0x05 (not
            // authorized), and a missing user name gets 0x04.
            let code = match version {
                ProtocolVersion::V311 => ReasonCode::NotAuthorized,
                ProtocolVersion::V5 => ReasonCode::BadUsernameOrPassword,
            };
            Err(Rejection::new(
                version,
                code,
                "bad_credentials",
                error.to_string(),
            ))
        }
    }
}

/// Stores the will message after checking that the client may publish to
/// its topic.
fn check_will(
    connect: &ConnectPacket,
    version: ProtocolVersion,
    client: &Client,
) -> Result<Option<Will>, Rejection> {
    let Some(will) = &connect.will else {
        return Ok(None);
    };
    if !is_valid_topic_name(&will.topic) {
        return Err(Rejection::new(
            version,
            ReasonCode::TopicNameInvalid,
            "malformed",
            format!("invalid will topic {:?}", will.topic),
        ));
    }
    let allowed = match client {
        Client::Device(identity) => {
            classify_publish(&will.topic, identity.device_id) != PublishTarget::Forbidden
        }
        Client::Application(principal) => {
            principal.role >= Role::Operator
                && classify_app_publish(&will.topic) == AppPublishTarget::Shared
        }
    };
    if !allowed {
        return Err(Rejection::new(
            version,
            ReasonCode::NotAuthorized,
            "not_authorized",
            format!("the client may not publish to will topic {:?}", will.topic),
        ));
    }
    Ok(Some(Will {
        topic: will.topic.clone(),
        payload: Bytes::from(will.payload.clone()),
        qos: will.qos,
        retain: will.retain,
        delay: Duration::from_secs(u64::from(will.properties.will_delay_interval.unwrap_or(0))),
        properties: will_forwarded_properties(&will.properties),
        message_expiry: will
            .properties
            .message_expiry_interval
            .map(|seconds| Duration::from_secs(u64::from(seconds))),
    }))
}

/// Returns the will properties that subscribers receive with the will
/// message, or `None` when the client set none of them.
fn will_forwarded_properties(properties: &WillProperties) -> Option<Arc<MessageProperties>> {
    let forwarded = MessageProperties {
        payload_is_utf8: properties.payload_format_indicator == Some(true),
        response_topic: properties.response_topic.clone(),
        correlation_data: properties.correlation_data.clone().map(Bytes::from),
        content_type: properties.content_type.clone(),
        user_properties: properties.user_properties.clone(),
    };
    (forwarded != MessageProperties::default()).then(|| Arc::new(forwarded))
}

/// Returns the client id, assigning one to a client that sent none
/// ([MQTT-3.1.3-6]); a 3.1.1 client asking for a persistent session must
/// send one ([MQTT-3.1.3-8]).
fn client_id(
    connect: &ConnectPacket,
    version: ProtocolVersion,
    tenant_id: TenantId,
) -> Result<(ClientId, bool), Rejection> {
    if !connect.client_id.is_empty() {
        return Ok((ClientId::scoped(tenant_id, &connect.client_id), false));
    }
    if version == ProtocolVersion::V311 && !connect.clean_start {
        return Err(Rejection::new(
            version,
            ReasonCode::ClientIdentifierNotValid,
            "client_id_rejected",
            "empty client id with clean session 0",
        ));
    }
    let assigned = format!("ferrite-{}", uuid::Uuid::new_v4().simple());
    Ok((ClientId::scoped(tenant_id, &assigned), true))
}

/// Rejects a connection beyond `limits.connections_per_address` with
/// CONNACK 0x9F, Connection rate exceeded; MQTT 3.1.1 encodes it as 0x03,
/// Server unavailable.
pub fn connections_per_address_exceeded(frame: &Frame, max_per_address: u32) -> Rejection {
    match protocol_version(frame) {
        Ok(version) => Rejection::new(
            version,
            ReasonCode::ConnectionRateExceeded,
            "connections_per_address",
            format!(
                "{max_per_address} connections from this address are open (limits.connections_per_address)"
            ),
        ),
        Err(rejection) => rejection,
    }
}

/// Rejects a CONNECT whose client id names a session of another owner in
/// the same tenant (see `SessionStore::attach`).
pub fn client_id_in_use(version: ProtocolVersion) -> Rejection {
    Rejection::new(
        version,
        ReasonCode::ClientIdentifierNotValid,
        "client_id_rejected",
        "the client id belongs to a session of another device or of the tenant's applications; choose another client id",
    )
}

/// Returns the granted session expiry and whether it is shorter than
/// requested.
fn session_expiry(
    connect: &ConnectPacket,
    version: ProtocolVersion,
    context: &MqttContext,
) -> (Duration, bool) {
    let max = context.config.max_session_expiry;
    match version {
        ProtocolVersion::V311 if connect.clean_start => (Duration::ZERO, false),
        ProtocolVersion::V311 => (max, false),
        ProtocolVersion::V5 => {
            let requested = match connect.properties.get(PropertyId::SessionExpiryInterval) {
                Some(PropertyValue::FourByteInteger(EXPIRY_NEVER)) => Duration::MAX,
                Some(PropertyValue::FourByteInteger(seconds)) => {
                    Duration::from_secs(u64::from(*seconds))
                }
                _ => Duration::ZERO,
            };
            (requested.min(max), requested > max)
        }
    }
}

/// Builds the CONNACK of an accepted connection.
pub fn success_connack(
    connected: &Connected,
    session_present: bool,
    context: &MqttContext,
    max_packet_size: usize,
) -> ConnAckPacket {
    if connected.version == ProtocolVersion::V311 {
        return ConnAckPacket::new_v311(session_present, ReasonCode::Success);
    }

    let mut connack = ConnAckPacket::new(session_present, ReasonCode::Success)
        .with_receive_maximum(context.config.max_inflight)
        .with_maximum_packet_size(u32::try_from(max_packet_size).unwrap_or(u32::MAX))
        .with_retain_available(true)
        .with_shared_subscription_available(true)
        .with_subscription_identifier_available(true)
        .with_wildcard_subscription_available(true)
        .with_topic_alias_maximum(TOPIC_ALIAS_MAXIMUM);
    if connected.session_expiry_capped {
        let seconds = u32::try_from(connected.session_expiry.as_secs()).unwrap_or(EXPIRY_NEVER - 1);
        connack = connack.with_session_expiry_interval(seconds);
    }
    if connected.client_id_assigned {
        connack = connack.with_assigned_client_id(connected.client_id.to_string());
    }
    if connected.request_response_information && matches!(connected.client, Client::Application(_))
    {
        connack = connack.with_response_information(application::response_information(
            connected.client_id.as_str(),
        ));
    }
    connack
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connack_codes_for_3_1_1() {
        let cases = [
            (ReasonCode::UnsupportedProtocolVersion, 0x01),
            (ReasonCode::ClientIdentifierNotValid, 0x02),
            (ReasonCode::ServerUnavailable, 0x03),
            (ReasonCode::BadUsernameOrPassword, 0x04),
            (ReasonCode::NotAuthorized, 0x05),
        ];
        for (code, expected) in cases {
            let mut out = bytes::BytesMut::new();
            codec::encode(&connack(ProtocolVersion::V311, code), &mut out);
            assert_eq!(&out[..], &[0x20, 0x02, 0x00, expected], "{code:?}");
        }
    }
}
