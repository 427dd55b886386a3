//! The devices of the demo fleet: their layout, and their records and access
//! tokens in the metadata store.

use crate::auth::{self, Auth};
use crate::ids::{DeviceId, TenantId};
use crate::metadata::{MetadataError, MetadataStore, SqliteMetadata};

/// Kind of a simulated device, which decides its model and its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A truck that publishes over MQTT.
    Truck,
    /// A temperature and humidity sensor that posts over HTTP.
    EnvironmentSensor,
}

/// A simulated device before it has a record in the metadata store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Position in the fleet, which also seeds the device's model.
    pub index: usize,
    pub kind: DeviceKind,
    pub name: String,
}

/// Lays out a fleet of `count` devices: two of every five are trucks, the
/// rest environment sensors.
///
/// Each kind is numbered from 1 in fleet order, so a device keeps its name
/// and its index (and with them its behaviour) when the fleet size changes.
pub fn layout(count: usize) -> Vec<DeviceSpec> {
    let mut trucks = 0;
    let mut sensors = 0;
    (0..count)
        .map(|index| {
            let (kind, name) = if index % 5 < 2 {
                trucks += 1;
                (DeviceKind::Truck, format!("demo-truck-{trucks:03}"))
            } else {
                sensors += 1;
                (
                    DeviceKind::EnvironmentSensor,
                    format!("demo-sensor-{sensors:03}"),
                )
            };
            DeviceSpec { index, kind, name }
        })
        .collect()
}

/// A simulated device with its record and a fresh access token.
#[derive(Debug, Clone)]
pub struct DemoDevice {
    pub spec: DeviceSpec,
    pub id: DeviceId,
    pub token: String,
}

/// Result of [`provision`].
pub struct Provisioned {
    pub devices: Vec<DemoDevice>,
    /// Number of devices created on this start. The others existed and got a
    /// new token.
    pub created: usize,
}

/// Creates the devices that do not exist yet and gives the others a new
/// token, because only hashes of the old tokens are stored.
pub async fn provision(
    metadata: &SqliteMetadata,
    auth: &Auth,
    tenant: TenantId,
    specs: Vec<DeviceSpec>,
) -> Result<Provisioned, MetadataError> {
    let mut devices = Vec::with_capacity(specs.len());
    let mut created = 0;
    for spec in specs {
        let token = auth::generate_device_token();
        let token_hash = auth::hash_secret(&token);
        let id = match metadata.device_by_name(tenant, &spec.name).await? {
            Some(existing) => {
                metadata
                    .rotate_device_token(tenant, existing.id, &token_hash)
                    .await?;
                // The process may have cached the revoked token.
                auth.forget_device(existing.id);
                existing.id
            }
            None => {
                created += 1;
                metadata
                    .create_device(tenant, &spec.name, &token_hash)
                    .await?
                    .id
            }
        };
        devices.push(DemoDevice { spec, id, token });
    }
    Ok(Provisioned { devices, created })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_forty_percent_trucks() {
        let fleet = layout(120);
        let trucks = fleet.iter().filter(|d| d.kind == DeviceKind::Truck).count();
        assert_eq!(fleet.len(), 120);
        assert_eq!(trucks, 48);
    }

    #[test]
    fn layout_names_are_unique() {
        let fleet = layout(2000);
        let mut names: Vec<&str> = fleet.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 2000);
    }

    #[test]
    fn layout_is_stable_across_sizes() {
        let small = layout(7);
        let large = layout(120);
        assert_eq!(small[..], large[..7]);
        assert_eq!(small[0].name, "demo-truck-001");
        assert_eq!(small[2].name, "demo-sensor-001");
    }

    #[test]
    fn layout_starts_with_truck() {
        assert_eq!(layout(1)[0].kind, DeviceKind::Truck);
        assert!(layout(0).is_empty());
    }

    async fn open_auth(dir: &std::path::Path) -> (std::sync::Arc<SqliteMetadata>, Auth) {
        let metadata = std::sync::Arc::new(SqliteMetadata::open(dir).await.unwrap());
        let auth =
            Auth::open(dir, metadata.clone(), &crate::config::AuthConfig::default()).unwrap();
        (metadata, auth)
    }

    #[tokio::test]
    async fn provision_creates_then_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let (metadata, auth) = open_auth(dir.path()).await;
        let tenant = metadata.default_tenant().await.unwrap().id;

        let first = provision(&metadata, &auth, tenant, layout(5))
            .await
            .unwrap();
        assert_eq!(first.created, 5);
        let old_token = first.devices[0].token.clone();
        let identity = auth.authenticate_device(&old_token).await.unwrap();
        assert_eq!(identity.device_id, first.devices[0].id);
        assert_eq!(identity.name, "demo-truck-001");

        let second = provision(&metadata, &auth, tenant, layout(6))
            .await
            .unwrap();
        assert_eq!(second.created, 1);
        assert_eq!(second.devices[0].id, first.devices[0].id);
        assert_ne!(second.devices[0].token, old_token);
        assert!(auth.authenticate_device(&old_token).await.is_err());
        let identity = auth
            .authenticate_device(&second.devices[0].token)
            .await
            .unwrap();
        assert_eq!(identity.device_id, first.devices[0].id);
    }
}
