//! Ferrite's own access tokens: JWTs signed with HS256 under the key in
//! `jwt.key`, and the opaque refresh tokens that renew them.
//!
//! An access token is accepted only when all of these hold:
//!
//! - the header names `HS256`, so `none` and RS256 signed with the HMAC
//!   key as if it were a public key are rejected before any check;
//! - the header has `typ: at+jwt` (RFC 9068), so that an ID token or
//!   another JWT signed with the same key does not pass as an access token;
//! - the signature verifies;
//! - `iss` is [`ISSUER`], `aud` is [`AUDIENCE`], and `exp` lies in the
//!   future, with [`LEEWAY_SECONDS`] for clock skew;
//! - `sub`, `jti`, `iat`, `tenant`, `role` and `kind` are present.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::metadata::Role;

/// `iss` of every access token.
pub const ISSUER: &str = "ferrite";
/// `aud` of every access token: this server's REST API.
pub const AUDIENCE: &str = "ferrite-api";
/// `typ` header of access tokens, from RFC 9068 section 2.1.
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";
/// Allowed clock skew for `exp`.
pub const LEEWAY_SECONDS: u64 = 5;
/// Prefix of refresh tokens, so a leaked token is recognizable.
pub const REFRESH_TOKEN_PREFIX: &str = "frt_";

/// The kind of subject an access token was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubjectKind {
    /// A person, after a password or OpenID Connect login; `sub` is the
    /// user id.
    User,
    /// A service account, after the client credentials grant; `sub` is
    /// the service account id.
    Service,
}

/// The claims of a Ferrite access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    /// Random token id (UUID), for log lines about one token.
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
    pub tenant: String,
    pub role: Role,
    pub kind: SubjectKind,
    /// The refresh token family of a user's login; revoking the family
    /// (logout, password change) also ends its access tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// Space-separated scopes of a service account's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The HS256 signing and verification keys of this server.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl JwtKeys {
    pub fn from_secret(key: &[u8]) -> anyhow::Result<Self> {
        Ok(Self {
            encoding: EncodingKey::from_secret(key)?,
            decoding: DecodingKey::from_secret(key)?,
        })
    }

    /// Signs `claims` as an access token.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(ACCESS_TOKEN_TYPE.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }

    /// Verifies an access token; the error is a sentence for the client.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, String> {
        let algorithm = header_algorithm(token)?;
        if algorithm != "HS256" {
            return Err(format!(
                "the access token is signed with {algorithm:?}; this server accepts only HS256 access tokens that it issued itself"
            ));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| format!("the access token's header is invalid: {error}"))?;
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYPE) {
            return Err(format!(
                "the token is not an access token of this server: its typ header is {:?}, expected {ACCESS_TOKEN_TYPE:?}",
                header.typ.unwrap_or_default()
            ));
        }

        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = LEEWAY_SECONDS;
        match jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &validation) {
            Ok(data) => Ok(data.claims),
            Err(error) => Err(match error.kind() {
                ErrorKind::ExpiredSignature => "the access token has expired; get a new one with POST /api/v1/auth/refresh or log in again".to_owned(),
                ErrorKind::InvalidSignature => "the access token's signature is invalid: it was changed or signed with another key".to_owned(),
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => format!(
                    "the access token was not issued by this server for its API (iss must be {ISSUER:?} and aud {AUDIENCE:?})"
                ),
                ErrorKind::MissingRequiredClaim(claim) => {
                    format!("the access token lacks the {claim:?} claim")
                }
                ErrorKind::Json(error) => format!("the access token's claims are invalid: {error}"),
                _ => format!("the access token is invalid: {error}"),
            }),
        }
    }
}

/// Returns the `alg` of a JWT's header without trusting anything else in
/// it, so that the error can name an algorithm the JWT library does not
/// know, such as `none`.
fn header_algorithm(token: &str) -> Result<String, String> {
    let not_a_jwt = || {
        "the bearer token is neither an API key nor a JWT access token; send the access_token from POST /api/v1/auth/login or an API key".to_owned()
    };
    let encoded = token.split('.').next().ok_or_else(not_a_jwt)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .map_err(|_| not_a_jwt())?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| not_a_jwt())?;
    if token.split('.').count() != 3 {
        return Err(not_a_jwt());
    }
    header
        .get("alg")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "the access token's header has no alg".to_owned())
}

/// Generates an opaque refresh token of 256 random bits.
pub fn generate_refresh_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{REFRESH_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Generates a random URL-safe value of `bytes` random bytes, for
/// `state`, `nonce`, PKCE verifiers and client secrets.
pub fn random_url_safe(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    URL_SAFE_NO_PAD.encode(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        JwtKeys::from_secret(&[7; 32]).unwrap()
    }

    fn claims(exp: u64) -> AccessClaims {
        let now = jsonwebtoken::get_current_timestamp();
        AccessClaims {
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            sub: "user".to_owned(),
            jti: "id".to_owned(),
            iat: now,
            exp,
            tenant: "tenant".to_owned(),
            role: Role::Viewer,
            kind: SubjectKind::User,
            sid: None,
            scope: None,
        }
    }

    fn encode_part(value: serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    #[test]
    fn signed_token_verifies() {
        let now = jsonwebtoken::get_current_timestamp();
        let token = keys().sign(&claims(now + 60)).unwrap();
        assert_eq!(keys().verify(&token).unwrap().sub, "user");
    }

    #[test]
    fn expired_token_is_rejected() {
        let now = jsonwebtoken::get_current_timestamp();
        let token = keys().sign(&claims(now - 60)).unwrap();
        assert!(keys().verify(&token).unwrap_err().contains("expired"));
    }

    #[test]
    fn alg_none_is_rejected() {
        let now = jsonwebtoken::get_current_timestamp();
        let header = encode_part(serde_json::json!({"alg": "none", "typ": "at+jwt"}));
        let payload = encode_part(serde_json::to_value(claims(now + 60)).unwrap());
        let error = keys().verify(&format!("{header}.{payload}.")).unwrap_err();
        assert!(error.contains("\"none\""), "{error}");
    }

    #[test]
    fn wrong_type_is_rejected() {
        let now = jsonwebtoken::get_current_timestamp();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(now + 60),
            &EncodingKey::from_secret(&[7; 32]).unwrap(),
        )
        .unwrap();
        assert!(keys().verify(&token).unwrap_err().contains("typ"));
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let now = jsonwebtoken::get_current_timestamp();
        let token = keys().sign(&claims(now + 60)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut changed = claims(now + 60);
        changed.role = Role::Admin;
        let payload = encode_part(serde_json::to_value(changed).unwrap());
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert!(keys().verify(&forged).unwrap_err().contains("signature"));
    }

    #[test]
    fn refresh_tokens_are_long_and_distinct() {
        let a = generate_refresh_token();
        assert_ne!(a, generate_refresh_token());
        assert_eq!(a.len(), REFRESH_TOKEN_PREFIX.len() + 43);
    }
}
