//! Webhook secrets and header values sealed inside stored profiles.
//!
//! People write a webhook's `secret` and `headers` in plain text. Before a
//! profile is stored, every such value is sealed under the tenant's data
//! key and replaced by the string `ferrite-sealed:` followed by the sealed
//! bytes in base64, so the profile stays a valid document. The API shows a
//! sealed value as `<set>`, and a document sent back with `<set>` keeps the
//! stored value of the same webhook URL. The runner opens the values just
//! before an attempt.
//!
//! Every header value is treated as a secret, because headers such as
//! `Authorization` carry credentials and the spec does not mark which do.
//! A value is sealed under the context `webhook/{url}/secret` or
//! `webhook/{url}/header/{name}`, so a sealed value copied to a webhook
//! with another URL fails to open instead of sending the secret elsewhere.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::spec::{ActionSpec, WebhookSpec};
use crate::encryption::{Keyring, KeyringError};
use crate::ids::TenantId;
use crate::metadata::SqliteMetadata;
use crate::profiles::spec::ProfileSpec;

/// Prefix of a sealed value in a stored spec.
pub const SEALED_PREFIX: &str = "ferrite-sealed:";
/// Placeholder the API shows in place of a sealed value; a client sends it
/// to keep the stored value.
pub const REDACTED: &str = "<set>";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "{field} of the webhook {url} is \"<set>\", but the stored profile has no such value for this URL; give the value again (it is required after the URL changes)"
    )]
    NothingToKeep { url: String, field: String },
    #[error(
        "{field} of the webhook {url} starts with {SEALED_PREFIX:?}, which is reserved for sealed values; give the value in plain text"
    )]
    ReservedPrefix { url: String, field: String },
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

fn context(url: &str, field: &str) -> String {
    format!("webhook/{url}/{field}")
}

fn header_field(name: &str) -> String {
    format!("header/{}", name.to_ascii_lowercase())
}

fn webhooks(spec: &ProfileSpec) -> impl Iterator<Item = &WebhookSpec> {
    spec.rules
        .iter()
        .flat_map(|rule| rule.actions.iter())
        .filter_map(|action| match action {
            ActionSpec::Webhook(webhook) => Some(webhook),
            _ => None,
        })
}

fn webhooks_mut(spec: &mut ProfileSpec) -> impl Iterator<Item = &mut WebhookSpec> {
    spec.rules
        .iter_mut()
        .flat_map(|rule| rule.actions.iter_mut())
        .filter_map(|action| match action {
            ActionSpec::Webhook(webhook) => Some(webhook),
            _ => None,
        })
}

/// Returns the sealed value that `existing` stores for `field` of a webhook
/// with `url`.
fn stored_value(existing: Option<&ProfileSpec>, url: &str, field: &str) -> Option<String> {
    webhooks(existing?)
        .filter(|webhook| webhook.url == url)
        .find_map(|webhook| {
            let value = if field == "secret" {
                webhook.secret.clone()
            } else {
                webhook
                    .headers
                    .iter()
                    .find(|(name, _)| header_field(name) == field)
                    .map(|(_, value)| value.clone())
            }?;
            value.starts_with(SEALED_PREFIX).then_some(value)
        })
}

/// Returns the secret and header values of one webhook with their field
/// names, in a fixed order.
fn fields_of(webhook: &mut WebhookSpec) -> Vec<(String, &mut String)> {
    let mut fields = Vec::new();
    if let Some(secret) = webhook.secret.as_mut() {
        fields.push(("secret".to_owned(), secret));
    }
    for (name, value) in webhook.headers.iter_mut() {
        fields.push((header_field(name), value));
    }
    fields
}

/// Seals every plain secret and header value of the webhooks in `spec`, a
/// document a client sent. A value `<set>` takes the sealed value of the
/// same URL and field from `existing`, the stored version of the profile.
pub async fn seal_profile(
    keyring: &Keyring,
    tenant: TenantId,
    spec: &mut ProfileSpec,
    existing: Option<&ProfileSpec>,
) -> Result<(), SecretError> {
    for webhook in webhooks_mut(spec) {
        seal_webhook(keyring, tenant, webhook, existing).await?;
    }
    Ok(())
}

/// Seals the secret and header values of an action a client sent outside
/// a profile (a test run); `<set>` is not accepted there.
pub async fn seal_action(
    keyring: &Keyring,
    tenant: TenantId,
    action: &mut ActionSpec,
) -> Result<(), SecretError> {
    match action {
        ActionSpec::Webhook(webhook) => seal_webhook(keyring, tenant, webhook, None).await,
        _ => Ok(()),
    }
}

async fn seal_webhook(
    keyring: &Keyring,
    tenant: TenantId,
    webhook: &mut WebhookSpec,
    existing: Option<&ProfileSpec>,
) -> Result<(), SecretError> {
    let url = webhook.url.clone();
    let mut data_key = None;
    for (field, value) in fields_of(webhook) {
        if value.as_str() == REDACTED {
            *value =
                stored_value(existing, &url, &field).ok_or_else(|| SecretError::NothingToKeep {
                    url: url.clone(),
                    field: field.clone(),
                })?;
            continue;
        }
        if value.starts_with(SEALED_PREFIX) {
            return Err(SecretError::ReservedPrefix { url, field });
        }
        if data_key.is_none() {
            data_key = Some(keyring.data_key(tenant).await?);
        }
        let key = data_key.as_ref().expect("set above");
        let sealed = key.seal(&context(&url, &field), value.as_bytes());
        *value = format!("{SEALED_PREFIX}{}", STANDARD.encode(sealed));
    }
    Ok(())
}

/// Seals the plain values of a stored profile written by an older version.
/// Returns whether anything was sealed.
pub async fn seal_stored_profile(
    keyring: &Keyring,
    tenant: TenantId,
    spec: &mut ProfileSpec,
) -> Result<bool, KeyringError> {
    let mut sealed_any = false;
    for webhook in webhooks_mut(spec) {
        let url = webhook.url.clone();
        for (field, value) in fields_of(webhook) {
            if value.starts_with(SEALED_PREFIX) {
                continue;
            }
            let sealed = keyring
                .seal(tenant, &context(&url, &field), value.as_bytes())
                .await?;
            *value = format!("{SEALED_PREFIX}{}", STANDARD.encode(sealed));
            sealed_any = true;
        }
    }
    Ok(sealed_any)
}

/// Seals the plain webhook values of every stored profile, which older
/// versions stored in plain text. Returns how many profiles changed; each
/// gets a new version.
pub async fn seal_stored_profiles(
    keyring: &Keyring,
    metadata: &SqliteMetadata,
) -> Result<usize, SecretError> {
    let mut changed = 0;
    for tenant in metadata.tenant_ids().await.map_err(KeyringError::from)? {
        let profiles = metadata
            .list_profiles(tenant)
            .await
            .map_err(KeyringError::from)?;
        for mut profile in profiles {
            if seal_stored_profile(keyring, tenant, &mut profile.spec).await? {
                metadata
                    .update_profile(tenant, profile.id, &profile.spec)
                    .await
                    .map_err(KeyringError::from)?;
                changed += 1;
            }
        }
    }
    Ok(changed)
}

/// Returns `spec` with every sealed value replaced by `<set>`, for output.
pub fn redact_profile(spec: &ProfileSpec) -> ProfileSpec {
    let mut redacted = spec.clone();
    for webhook in webhooks_mut(&mut redacted) {
        for (_, value) in fields_of(webhook) {
            if value.starts_with(SEALED_PREFIX) {
                *value = REDACTED.to_owned();
            }
        }
    }
    redacted
}

/// Returns a copy of `webhook` with its sealed values opened, for one
/// attempt. Plain values (stored by older versions) pass unchanged.
pub fn open_webhook(
    keyring: &Keyring,
    tenant: TenantId,
    webhook: &WebhookSpec,
) -> Result<WebhookSpec, String> {
    let mut opened = webhook.clone();
    let url = opened.url.clone();
    for (field, value) in fields_of(&mut opened) {
        let Some(encoded) = value.strip_prefix(SEALED_PREFIX) else {
            continue;
        };
        let sealed = STANDARD
            .decode(encoded)
            .map_err(|_| format!("the sealed {field} is not valid base64"))?;
        let plain = keyring
            .open(tenant, &context(&url, &field), &sealed)
            .map_err(|error| format!("cannot open the sealed {field}: {error}"))?;
        *value = String::from_utf8(plain)
            .map_err(|_| format!("the sealed {field} is not UTF-8 text"))?;
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::encryption::MasterKeySource;
    use crate::metadata::MetadataStore;

    async fn keyring(dir: &std::path::Path) -> (Keyring, TenantId) {
        let metadata = Arc::new(SqliteMetadata::open(dir).await.unwrap());
        let tenant = metadata.default_tenant().await.unwrap().id;
        let source = MasterKeySource::Files {
            data_dir: dir.to_owned(),
        };
        (Keyring::load(source, metadata, true).await.unwrap(), tenant)
    }

    fn profile(secret: &str, token: &str, url: &str) -> ProfileSpec {
        serde_json::from_value(serde_json::json!({
            "name": "boiler",
            "rules": [{
                "name": "overheat",
                "condition": {"threshold": {"key": "t", "op": ">", "value": 90}},
                "actions": [{
                    "type": "webhook", "url": url, "secret": secret,
                    "headers": {"Authorization": token},
                }],
            }],
        }))
        .unwrap()
    }

    fn first_webhook(spec: &ProfileSpec) -> &WebhookSpec {
        webhooks(spec).next().unwrap()
    }

    #[tokio::test]
    async fn sealed_profile_hides_and_reopens_values() {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, tenant) = keyring(dir.path()).await;
        let mut spec = profile("s3cr3t", "Bearer t0ken", "https://a.example/hook");
        seal_profile(&keyring, tenant, &mut spec, None)
            .await
            .unwrap();

        let stored = serde_json::to_string(&spec).unwrap();
        assert!(!stored.contains("s3cr3t"), "{stored}");
        assert!(!stored.contains("t0ken"), "{stored}");
        let redacted = serde_json::to_string(&redact_profile(&spec)).unwrap();
        assert!(redacted.contains("\"secret\":\"<set>\""), "{redacted}");
        assert!(!redacted.contains(SEALED_PREFIX), "{redacted}");

        let opened = open_webhook(&keyring, tenant, first_webhook(&spec)).unwrap();
        assert_eq!(opened.secret.as_deref(), Some("s3cr3t"));
        assert_eq!(opened.headers["Authorization"], "Bearer t0ken");
    }

    #[tokio::test]
    async fn redacted_value_keeps_stored_one_for_same_url() {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, tenant) = keyring(dir.path()).await;
        let mut stored = profile("s3cr3t", "Bearer t0ken", "https://a.example/hook");
        seal_profile(&keyring, tenant, &mut stored, None)
            .await
            .unwrap();

        let mut resent = profile(REDACTED, REDACTED, "https://a.example/hook");
        seal_profile(&keyring, tenant, &mut resent, Some(&stored))
            .await
            .unwrap();
        assert_eq!(resent, stored);

        let mut moved = profile(REDACTED, "Bearer new", "https://evil.example/hook");
        let error = seal_profile(&keyring, tenant, &mut moved, Some(&stored))
            .await
            .unwrap_err();
        assert!(
            matches!(error, SecretError::NothingToKeep { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn copied_value_fails_for_other_url() {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, tenant) = keyring(dir.path()).await;
        let mut spec = profile("s3cr3t", "Bearer t0ken", "https://a.example/hook");
        seal_profile(&keyring, tenant, &mut spec, None)
            .await
            .unwrap();

        let mut copied = first_webhook(&spec).clone();
        copied.url = "https://evil.example/hook".to_owned();
        let error = open_webhook(&keyring, tenant, &copied).unwrap_err();
        assert!(error.contains("cannot open the sealed"), "{error}");

        let mut forged = profile("ferrite-sealed:AAAA", "x", "https://a.example/hook");
        let error = seal_profile(&keyring, tenant, &mut forged, None)
            .await
            .unwrap_err();
        assert!(
            matches!(error, SecretError::ReservedPrefix { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn stored_plain_values_are_sealed_once() {
        let dir = tempfile::tempdir().unwrap();
        let (keyring, tenant) = keyring(dir.path()).await;
        let mut spec = profile("s3cr3t", "Bearer t0ken", "https://a.example/hook");
        assert!(
            seal_stored_profile(&keyring, tenant, &mut spec)
                .await
                .unwrap()
        );
        assert!(
            !seal_stored_profile(&keyring, tenant, &mut spec)
                .await
                .unwrap()
        );
        let opened = open_webhook(&keyring, tenant, first_webhook(&spec)).unwrap();
        assert_eq!(opened.secret.as_deref(), Some("s3cr3t"));
    }
}
