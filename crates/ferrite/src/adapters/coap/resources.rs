//! CoAP requests: the paths Ferrite serves, the device that sends, the
//! payload, and the response. One request is a context ([`Request`]) and a
//! list of named steps.
//!
//! Paths follow ThingsBoard's CoAP device API, so existing firmware works:
//! - `POST /api/v1/{access_token}/telemetry`
//! - `POST /api/v1/{access_token}/attributes`: client attributes. Ferrite
//!   does not store them. They go to the device's own MQTT subscribers of
//!   `v1/devices/me/attributes` and CoAP observers, like an MQTT publish on
//!   that topic.
//! - `GET /api/v1/{access_token}/attributes`: the device's attributes set
//!   through the REST API, `{"shared": {...}}`; with Observe, later
//!   updates are notified.
//! - `GET /api/v1/{access_token}/rpc` with Observe: RPC requests as
//!   notifications `{"id", "method", "params"}`.
//! - `POST /api/v1/{access_token}/rpc/{request_id}`: the response to one.
//!
//! Ferrite's own `POST /telemetry?token={access_token}`, and `/telemetry`
//! without a token for a peer that DTLS authenticated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use coap_lite::{CoapOption, ObserveOption, Packet, RequestType, ResponseType};
use tracing::Instrument;

use super::blockwise::{BlockOutcome, TransferKey};
use super::endpoint::Endpoint;
use super::error::CoapError;
use super::events;
use super::message::{self, BlockValue, Reply, content_format};
use super::observe::Resource;
use super::transport::PeerAuth;
use crate::auth::DeviceIdentity;
use crate::decode::check_payload;
use crate::ingest::{ContentType, Envelope, Protocol};

/// Block size of responses when the client asks for none: 1024 bytes, the
/// largest over UDP.
const DEFAULT_BLOCK2_SZX: u8 = BlockValue::MAX_SZX;

/// Maximum bytes of all Uri-Query options of a request. Ferrite reads only
/// `token={access_token}`, about 60 bytes.
const MAX_URI_QUERY_BYTES: usize = 256;

/// A path Ferrite serves, with the access token it carries, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Telemetry,
    Attributes,
    Rpc,
    RpcResponse(u32),
}

impl Route {
    fn allows(&self, method: RequestType) -> bool {
        match self {
            Route::Telemetry | Route::RpcResponse(_) => method == RequestType::Post,
            Route::Attributes => matches!(method, RequestType::Get | RequestType::Post),
            Route::Rpc => method == RequestType::Get,
        }
    }

    fn allowed_methods(&self) -> &'static str {
        match self {
            Route::Telemetry | Route::RpcResponse(_) => "use POST",
            Route::Attributes => {
                "use GET to read shared attributes or POST to send client attributes"
            }
            Route::Rpc => "use GET with Observe to receive RPC requests",
        }
    }
}

/// One request being served.
struct Request<'a> {
    endpoint: &'a Arc<Endpoint>,
    peer: SocketAddr,
    packet: Packet,
    auth: PeerAuth,
    method: RequestType,
    path: String,
    /// SHA-256 of the access token that authenticated the request, if a
    /// token did; observers hold it to end on its revocation.
    token_hash: Option<[u8; 32]>,
}

/// The response to one request, and whether its device was authenticated.
pub struct Served {
    pub reply: Reply,
    /// False when the request failed before a device was known. The
    /// endpoint keeps no duplicate-detection entry for such a request.
    pub authenticated: bool,
}

/// Serves one request and returns its response; failures become error
/// responses here, in one place.
pub async fn serve(
    endpoint: &Arc<Endpoint>,
    peer: SocketAddr,
    packet: Packet,
    auth: PeerAuth,
) -> Served {
    let block2 = message::block_option(&packet, CoapOption::Block2)
        .ok()
        .flatten();
    let mut authenticated = false;
    let reply = match serve_request(endpoint, peer, packet, auth, &mut authenticated).await {
        Ok(reply) => reply,
        Err(error) => {
            if let CoapError::Internal = error {
                tracing::error!(%peer, "a CoAP request failed inside the server");
            } else {
                tracing::debug!(%peer, %error, "rejected a CoAP request");
            }
            events::request_rejected(error.reason());
            return Served {
                reply: error.reply(),
                authenticated,
            };
        }
    };
    let reply = match slice_block2(reply, block2) {
        Ok(reply) => reply,
        Err(error) => error.reply(),
    };
    Served {
        reply,
        authenticated,
    }
}

async fn serve_request(
    endpoint: &Arc<Endpoint>,
    peer: SocketAddr,
    packet: Packet,
    auth: PeerAuth,
    authenticated: &mut bool,
) -> Result<Reply, CoapError> {
    check_options(&packet)?;
    let method = message::method(&packet).ok_or_else(|| CoapError::MethodNotAllowed {
        method: format!("method code {}", packet.header.code),
        path: "any path".into(),
        allowed: "Ferrite serves GET and POST",
    })?;
    let segments = message::path_segments(&packet);
    let path = redacted_path(&segments);
    let (route, path_token) = route(&segments).ok_or_else(|| {
        CoapError::NotFound(format!(
            "no resource at {path}; POST telemetry to /api/v1/{{access_token}}/telemetry or /telemetry?token={{access_token}}"
        ))
    })?;
    if !route.allows(method) {
        return Err(CoapError::MethodNotAllowed {
            method: format!("{method:?}").to_uppercase(),
            path,
            allowed: route.allowed_methods(),
        });
    }

    let mut request = Request {
        endpoint,
        peer,
        packet,
        auth,
        method,
        path,
        token_hash: None,
    };
    let token = path_token.or_else(|| message::query_value(&request.packet, "token"));
    let device = authenticate(&request, token.as_deref()).await?;
    request.token_hash = token.as_deref().map(crate::auth::hash_secret);
    *authenticated = true;
    let span = tracing::debug_span!("coap_request", %peer, device_id = %device.device_id);
    let dispatch = async {
        match (route, method) {
            (Route::Telemetry, _) => post_telemetry(&mut request, &device).await,
            (Route::Attributes, RequestType::Post) => post_attributes(&mut request, &device).await,
            (Route::Attributes, _) => get_attributes(&request, &device).await,
            (Route::Rpc, _) => observe_rpc(&request, &device),
            (Route::RpcResponse(request_id), _) => {
                post_rpc_response(&mut request, &device, request_id).await
            }
        }
    };
    dispatch.instrument(span).await
}

/// Step 1: options Ferrite must understand (RFC 7252 section 5.4.1).
fn check_options(packet: &Packet) -> Result<(), CoapError> {
    // Every unknown option is looked at, because an elective one may come
    // before a critical one. A proxy option wins, so the client learns
    // that no proxy is here (5.05) before it hears of other options.
    let unknown: Vec<u16> = message::unknown_options(packet).collect();
    if unknown
        .iter()
        .any(|number| message::is_proxy_option(*number))
    {
        return Err(CoapError::ProxyingNotSupported);
    }
    if let Some(number) = unknown.iter().find(|number| message::is_critical(**number)) {
        return Err(CoapError::BadOption(*number));
    }
    let query_bytes: usize = packet
        .get_option(CoapOption::UriQuery)
        .map(|values| values.iter().map(Vec::len).sum())
        .unwrap_or(0);
    if query_bytes > MAX_URI_QUERY_BYTES {
        return Err(CoapError::BadRequest(format!(
            "the Uri-Query options have {query_bytes} bytes, more than the limit of {MAX_URI_QUERY_BYTES}; Ferrite reads only token={{access_token}}"
        )));
    }
    if message::block_option(packet, CoapOption::Block1).is_err()
        || message::block_option(packet, CoapOption::Block2).is_err()
    {
        return Err(CoapError::BadRequest(
            "a Block1 or Block2 option is malformed (longer than 3 bytes or SZX 7)".into(),
        ));
    }
    Ok(())
}

/// Formats the path for messages and logs, with the access token segment
/// of `/api/v1/{access_token}/...` replaced by `{access_token}`, because
/// the token is a secret.
fn redacted_path(segments: &[String]) -> String {
    let mut shown: Vec<&str> = segments.iter().map(String::as_str).collect();
    if let ["api", "v1", token, ..] = shown.as_mut_slice() {
        *token = "{access_token}";
    }
    format!("/{}", shown.join("/"))
}

/// Step 2: the resource and the access token in the path, if any.
fn route(segments: &[String]) -> Option<(Route, Option<String>)> {
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        ["telemetry"] => Some((Route::Telemetry, None)),
        ["api", "v1", token, rest @ ..] => {
            let route = match rest {
                ["telemetry"] => Route::Telemetry,
                ["attributes"] => Route::Attributes,
                ["rpc"] => Route::Rpc,
                ["rpc", id] => Route::RpcResponse(id.parse().ok()?),
                _ => return None,
            };
            Some((route, Some((*token).to_owned())))
        }
        _ => None,
    }
}

/// Step 3: the device. A DTLS peer is its handshake's device; a token it
/// sends must name the same device (4.03 otherwise).
async fn authenticate(
    request: &Request<'_>,
    token: Option<&str>,
) -> Result<DeviceIdentity, CoapError> {
    let auth = &request.endpoint.context.auth;
    match (&request.auth, token) {
        (PeerAuth::Anonymous, None) => Err(CoapError::Unauthorized(format!(
            "{} needs an access token: use /api/v1/{{access_token}}/... or add the query token={{access_token}}",
            request.path
        ))),
        (PeerAuth::Anonymous, Some(token)) => Ok(auth.authenticate_device(token).await?),
        (PeerAuth::Device(identity), None) => Ok(identity.clone()),
        (PeerAuth::Device(identity), Some(token)) => {
            let named = auth.authenticate_device(token).await?;
            if named.device_id != identity.device_id {
                tracing::warn!(device_id = %identity.device_id, token_device_id = %named.device_id, "a DTLS device sent another device's access token");
                return Err(CoapError::Forbidden(
                    "the access token names another device than the DTLS identity; send no token or this device's own".into(),
                ));
            }
            Ok(named)
        }
    }
}

/// The request body after step 4.
enum Body {
    /// The whole body, and the Block1 value for the response when it came
    /// in blocks.
    Complete(Vec<u8>, Option<BlockValue>),
    /// A block was taken and the body is not complete: send this 2.31
    /// Continue.
    Continue(Reply),
}

/// Step 4 of POST requests: the whole body, reassembled from Block1
/// blocks when the client sends it in blocks.
fn request_body(request: &mut Request<'_>) -> Result<Body, CoapError> {
    let payload = std::mem::take(&mut request.packet.payload);
    let limit = request.endpoint.context.config.max_payload_bytes;
    // Step 1 checked that the option is well formed.
    let Some(block) = message::block_option(&request.packet, CoapOption::Block1)
        .ok()
        .flatten()
    else {
        if payload.len() > limit {
            return Err(CoapError::RequestEntityTooLarge {
                size: payload.len(),
                limit,
            });
        }
        return Ok(Body::Complete(payload, None));
    };

    let size1 = message::uint_option(&request.packet, CoapOption::Size1)
        .map_err(|()| CoapError::BadRequest("the Size1 option is longer than 4 bytes".into()))?;
    let key = TransferKey::new(request.peer, &transfer_request_key(request));
    let outcome =
        request
            .endpoint
            .blocks
            .lock()
            .receive(key, block, &payload, size1, Instant::now())?;
    match outcome {
        BlockOutcome::Continue(echo) => {
            let mut reply = Reply::new(ResponseType::Continue);
            reply.block1 = Some(echo);
            Ok(Body::Continue(reply))
        }
        BlockOutcome::Complete(body) => Ok(Body::Complete(
            body,
            Some(BlockValue {
                num: block.num,
                more: false,
                szx: block.szx,
            }),
        )),
    }
}

/// Formats the request without its token, payload and block options,
/// which identifies the upload a block belongs to (RFC 7959 section 2.4).
fn transfer_request_key(request: &Request<'_>) -> String {
    let queries: Vec<String> = request
        .packet
        .get_option(CoapOption::UriQuery)
        .map(|values| {
            values
                .iter()
                .map(|value| String::from_utf8_lossy(value).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let format = message::uint_option(&request.packet, CoapOption::ContentFormat)
        .ok()
        .flatten();
    format!(
        "{:?} {}?{} {:?}",
        request.method,
        request.path,
        queries.join("&"),
        format
    )
}

/// Step 5 of telemetry: the media type that chooses the decoder, from the
/// Content-Format. CBOR (60) is converted to JSON by [`telemetry_payload`],
/// so it maps like JSON telemetry.
fn telemetry_media_type(format: Option<u32>) -> Result<Option<&'static str>, CoapError> {
    let Some(format) = format else {
        return Ok(None);
    };
    match u16::try_from(format).unwrap_or(u16::MAX) {
        content_format::TEXT_PLAIN | content_format::JSON | content_format::CBOR => {
            Ok(Some("application/json"))
        }
        content_format::SENML_JSON => Ok(Some("application/senml+json")),
        content_format::SENML_CBOR => Ok(Some("application/senml+cbor")),
        content_format::OCTET_STREAM => Ok(Some("application/octet-stream")),
        other => Err(CoapError::UnsupportedContentFormat(format!(
            "Content-Format {other} is not supported; send JSON (50), CBOR (60), SenML JSON (110), SenML CBOR (112) or, for a profile with a binary codec, octet-stream (42)"
        ))),
    }
}

/// Returns the payload as the pipeline decodes it: CBOR converted to JSON,
/// other formats unchanged.
fn telemetry_payload(format: Option<u32>, body: Vec<u8>) -> Result<Vec<u8>, CoapError> {
    if format == Some(u32::from(content_format::CBOR)) {
        cbor_to_json(&body)
    } else {
        Ok(body)
    }
}

/// Converts one CBOR data item to JSON text.
pub fn cbor_to_json(body: &[u8]) -> Result<Vec<u8>, CoapError> {
    let mut reader = body;
    let value: serde_json::Value = ciborium::from_reader(&mut reader).map_err(|error| {
        CoapError::BadRequest(format!(
            "invalid CBOR telemetry: {error}; send one map with text keys, like the JSON telemetry object"
        ))
    })?;
    if !reader.is_empty() {
        return Err(CoapError::BadRequest(format!(
            "invalid CBOR telemetry: {} bytes follow the first data item; send exactly one map",
            reader.len()
        )));
    }
    Ok(value.to_string().into_bytes())
}

fn content_format(request: &Request<'_>) -> Result<Option<u32>, CoapError> {
    message::uint_option(&request.packet, CoapOption::ContentFormat).map_err(|()| {
        CoapError::BadRequest("the Content-Format option is longer than 4 bytes".into())
    })
}

/// Takes a token for one message of the device once its body is complete,
/// so that the blocks of a block-wise upload count as one message.
fn check_message_rate(request: &Request<'_>, device: &DeviceIdentity) -> Result<(), CoapError> {
    let sender = crate::limits::Sender {
        tenant: device.tenant_id,
        device: Some(device.device_id),
        address: Some(request.peer.ip()),
    };
    request
        .endpoint
        .context
        .limits
        .check_message(&sender)
        .map_err(|limited| {
            crate::limits::count_rate_limited("coap", &limited);
            CoapError::TooManyRequests(limited)
        })
}

async fn post_telemetry(
    request: &mut Request<'_>,
    device: &DeviceIdentity,
) -> Result<Reply, CoapError> {
    let format = content_format(request)?;
    // Checked before blocks are buffered, so an unsupported upload fails at
    // its first block.
    let declared = telemetry_media_type(format)?;
    let (body, block1) = match request_body(request)? {
        Body::Complete(body, block1) => (body, block1),
        Body::Continue(reply) => return Ok(reply),
    };
    check_message_rate(request, device)?;
    let payload = telemetry_payload(format, body)?;
    let context = &request.endpoint.context;
    let payload = Bytes::from(payload);
    let received_at_ns = chrono::Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or(i64::MAX - 1);

    context.directory.warm(device.profile_id).await;
    let content_type = context
        .directory
        .content_type_for(device.profile_id, declared, &payload)
        .map_err(CoapError::UnsupportedContentFormat)?;
    if content_type != ContentType::Raw {
        check_payload(
            content_type,
            &payload,
            received_at_ns,
            context.time_window(&device.tenant_id.to_string()),
        )?;
    }

    let envelope = Envelope {
        tenant_id: device.tenant_id,
        device_id: device.device_id,
        protocol: Protocol::Coap,
        received_at_ns,
        content_type,
        payload,
        meta: Bytes::new(),
    };
    context
        .ingest
        .append(vec![envelope])
        .await
        .map_err(|error| {
            tracing::debug!(%error, "CoAP telemetry not stored");
            CoapError::from(error)
        })?;
    events::ingested();
    let mut reply = Reply::new(ResponseType::Changed);
    reply.block1 = block1;
    Ok(reply)
}

/// Client attributes: checked to be one JSON object, then routed to the
/// device's own receivers (not stored).
async fn post_attributes(
    request: &mut Request<'_>,
    device: &DeviceIdentity,
) -> Result<Reply, CoapError> {
    let format = content_format(request)?;
    let (body, block1) = match request_body(request)? {
        Body::Complete(body, block1) => (body, block1),
        Body::Continue(reply) => return Ok(reply),
    };
    let body = match format.map(|format| u16::try_from(format).unwrap_or(u16::MAX)) {
        None | Some(content_format::TEXT_PLAIN | content_format::JSON) => body,
        Some(content_format::CBOR) => cbor_to_json(&body)?,
        Some(other) => {
            return Err(CoapError::UnsupportedContentFormat(format!(
                "Content-Format {other} is not supported for attributes; send JSON (50) or CBOR (60)"
            )));
        }
    };
    check_message_rate(request, device)?;
    let attributes: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|error| {
            CoapError::BadRequest(format!("attributes must be one JSON object: {error}"))
        })?;
    let payload = Bytes::from(serde_json::Value::Object(attributes).to_string());
    request.endpoint.context.router.publish_to_device(
        device.device_id,
        "attributes",
        payload,
        mqtt5_protocol::QoS::AtLeastOnce,
    );
    let mut reply = Reply::new(ResponseType::Changed);
    reply.block1 = block1;
    Ok(reply)
}

/// Checks the Accept option of a GET: responses are JSON only.
fn check_accept(request: &Request<'_>) -> Result<(), CoapError> {
    let accept = message::uint_option(&request.packet, CoapOption::Accept)
        .map_err(|()| CoapError::BadRequest("the Accept option is longer than 4 bytes".into()))?;
    match accept {
        Some(format) if format != u32::from(content_format::JSON) => {
            Err(CoapError::NotAcceptable(format))
        }
        _ => Ok(()),
    }
}

/// Shared attributes, with Observe registration or deregistration.
async fn get_attributes(
    request: &Request<'_>,
    device: &DeviceIdentity,
) -> Result<Reply, CoapError> {
    use crate::metadata::MetadataStore;
    check_accept(request)?;
    // Registered before the read, so a change that lands between the two
    // is either in the read or notified afterwards.
    let observe = observe(request, device, Resource::Attributes)?;
    let stored = request
        .endpoint
        .context
        .directory
        .metadata()
        .device(device.tenant_id, device.device_id)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "cannot read device attributes for CoAP");
            if observe.is_some() {
                forget_observer(request, device, Resource::Attributes);
            }
            CoapError::Internal
        })?;
    let body = serde_json::json!({"shared": stored.attributes});
    let mut reply = Reply::json(ResponseType::Content, &body);
    reply.observe = observe;
    Ok(reply)
}

/// Removes the observer that this request registered, because its response
/// is no 2.05 (RFC 7641 section 4.1: only a 2.xx response keeps it).
fn forget_observer(request: &Request<'_>, device: &DeviceIdentity, resource: Resource) {
    request.endpoint.context.observers.deregister(
        device.device_id,
        resource,
        request.endpoint,
        request.peer,
    );
}

/// RPC requests reach the device only as Observe notifications.
fn observe_rpc(request: &Request<'_>, device: &DeviceIdentity) -> Result<Reply, CoapError> {
    check_accept(request)?;
    let observe_option = request.packet.get_observe_value();
    if observe_option.is_none() {
        return Err(CoapError::BadRequest(
            "GET on rpc needs the Observe option: 0 to receive RPC requests as notifications, 1 to stop".into(),
        ));
    }
    let mut reply = Reply::new(ResponseType::Content);
    reply.content_format = Some(content_format::JSON);
    reply.observe = observe(request, device, Resource::Rpc)?;
    Ok(reply)
}

/// Registers or deregisters an observer as the Observe option requests,
/// and returns the Observe value of the response (`None`: not observing).
fn observe(
    request: &Request<'_>,
    device: &DeviceIdentity,
    resource: Resource,
) -> Result<Option<u32>, CoapError> {
    let observers = &request.endpoint.context.observers;
    let value = match request.packet.get_observe_value() {
        None => return Ok(None),
        Some(Ok(value)) => value,
        Some(Err(_)) => {
            return Err(CoapError::BadRequest(
                "the Observe option is longer than 3 bytes".into(),
            ));
        }
    };
    match ObserveOption::try_from(value as usize) {
        // A request for a later block is no registration (RFC 7959 section
        // 2.6: only the first block's request carries Observe). Answering
        // it without Observe also keeps a failing block request, such as
        // one past the end, from adding an observer.
        Ok(ObserveOption::Register)
            if requested_block2(request).is_some_and(|block| block.num > 0) =>
        {
            Ok(None)
        }
        Ok(ObserveOption::Register) => Ok(observers.register(
            device,
            request.token_hash,
            resource,
            request.endpoint,
            request.peer,
            request.packet.get_token().to_vec(),
        )),
        Ok(ObserveOption::Deregister) => {
            observers.deregister(device.device_id, resource, request.endpoint, request.peer);
            Ok(None)
        }
        Err(_) => Err(CoapError::BadRequest(format!(
            "Observe {value} is not valid in a request; send 0 to register or 1 to deregister"
        ))),
    }
}

async fn post_rpc_response(
    request: &mut Request<'_>,
    device: &DeviceIdentity,
    request_id: u32,
) -> Result<Reply, CoapError> {
    let (body, block1) = match request_body(request)? {
        Body::Complete(body, block1) => (body, block1),
        Body::Continue(reply) => return Ok(reply),
    };
    let body = match content_format(request)? {
        Some(format) if format == u32::from(content_format::CBOR) => cbor_to_json(&body)?,
        _ => body,
    };
    check_message_rate(request, device)?;
    let delivered = request.endpoint.context.router.complete_rpc_response(
        device.device_id,
        request_id,
        &Bytes::from(body),
    );
    if !delivered {
        return Err(CoapError::NotFound(format!(
            "no RPC request {request_id} waits for a response from this device; it may have timed out"
        )));
    }
    let mut reply = Reply::new(ResponseType::Changed);
    reply.block1 = block1;
    Ok(reply)
}

fn requested_block2(request: &Request<'_>) -> Option<BlockValue> {
    // Step 1 checked that the option is well formed.
    message::block_option(&request.packet, CoapOption::Block2)
        .ok()
        .flatten()
}

/// Cuts a response into the block the client asked for with Block2, or
/// into the first block when it is larger than one (RFC 7959 section 2.4).
fn slice_block2(mut reply: Reply, requested: Option<BlockValue>) -> Result<Reply, CoapError> {
    let szx = requested.map_or(DEFAULT_BLOCK2_SZX, |block| {
        block.szx.min(DEFAULT_BLOCK2_SZX)
    });
    let size = 1usize << (szx + 4);
    let num = requested.map_or(0, |block| block.num);
    if requested.is_none() && reply.payload.len() <= size {
        return Ok(reply);
    }
    let total = reply.payload.len();
    let start = num as usize * size;
    if start >= total && !(start == 0 && total == 0) {
        return Err(CoapError::BadRequest(format!(
            "Block2 asks for block {num} of {size} bytes, but the response has only {total} bytes"
        )));
    }
    let end = (start + size).min(total);
    reply.payload = reply.payload[start..end].to_vec();
    reply.block2 = Some(BlockValue {
        num,
        more: end < total,
        szx,
    });
    reply.size2 = Some(u32::try_from(total).unwrap_or(u32::MAX));
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> Vec<String> {
        path.split('/')
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn routes_follow_thingsboard_paths() {
        let cases = [
            (
                "/api/v1/abc/telemetry",
                Some((Route::Telemetry, Some("abc"))),
            ),
            (
                "/api/v1/abc/attributes",
                Some((Route::Attributes, Some("abc"))),
            ),
            ("/api/v1/abc/rpc", Some((Route::Rpc, Some("abc")))),
            (
                "/api/v1/abc/rpc/17",
                Some((Route::RpcResponse(17), Some("abc"))),
            ),
            ("/api/v1/abc/rpc/x", None),
            ("/telemetry", Some((Route::Telemetry, None))),
            ("/api/v1/abc", None),
            ("/other", None),
        ];
        for (path, expected) in cases {
            let expected = expected.map(|(route, token)| (route, token.map(str::to_owned)));
            assert_eq!(route(&segments(path)), expected, "{path}");
        }
    }

    #[test]
    fn paths_in_messages_hide_the_token() {
        assert_eq!(
            redacted_path(&segments("/api/v1/fdt_secret/nothing")),
            "/api/v1/{access_token}/nothing"
        );
        assert_eq!(redacted_path(&segments("/other/x")), "/other/x");
        assert_eq!(redacted_path(&segments("/api/v2/x")), "/api/v2/x");
    }

    #[test]
    fn cbor_telemetry_converts_to_json() {
        let mut body = Vec::new();
        ciborium::into_writer(
            &serde_json::json!({"temperature": 21.5, "ok": true}),
            &mut body,
        )
        .unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&cbor_to_json(&body).unwrap()).unwrap();
        assert_eq!(json["temperature"], 21.5);
        assert_eq!(json["ok"], true);

        body.push(0);
        assert!(matches!(cbor_to_json(&body), Err(CoapError::BadRequest(_))));
        assert!(matches!(
            cbor_to_json(&[0xff]),
            Err(CoapError::BadRequest(_))
        ));
    }

    #[test]
    fn unsupported_content_format_is_rejected() {
        let error = telemetry_media_type(Some(41)).unwrap_err();
        assert!(matches!(error, CoapError::UnsupportedContentFormat(_)));
        assert_eq!(telemetry_media_type(None).unwrap(), None);
        assert_eq!(
            telemetry_media_type(Some(60)).unwrap(),
            Some("application/json")
        );
    }

    #[test]
    fn large_responses_are_cut_into_blocks() {
        let mut reply = Reply::new(ResponseType::Content);
        reply.payload = vec![7; 2500];
        let first = slice_block2(reply.clone(), None).unwrap();
        assert_eq!(first.payload.len(), 1024);
        assert_eq!(
            first.block2,
            Some(BlockValue {
                num: 0,
                more: true,
                szx: 6
            })
        );
        assert_eq!(first.size2, Some(2500));

        let last = slice_block2(
            reply.clone(),
            Some(BlockValue {
                num: 2,
                more: false,
                szx: 6,
            }),
        )
        .unwrap();
        assert_eq!(last.payload.len(), 452);
        assert_eq!(
            last.block2,
            Some(BlockValue {
                num: 2,
                more: false,
                szx: 6
            })
        );

        let beyond = slice_block2(
            reply,
            Some(BlockValue {
                num: 3,
                more: false,
                szx: 6,
            }),
        );
        assert!(beyond.is_err());
    }
}
