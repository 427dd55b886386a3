-- CAs that a tenant registered for its devices' client certificates over
-- MQTT over TLS. A certificate that chains to one of them authenticates a
-- device of that tenant, found by the certificate's subject CN (device id
-- or name). All times are epoch milliseconds.

-- The fingerprint (SHA-256 of the DER encoding) is unique across tenants,
-- so a client certificate always leads to one tenant.
CREATE TABLE device_cas (
    fingerprint          BLOB PRIMARY KEY,
    tenant_id            TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    subject              TEXT NOT NULL,
    not_after            INTEGER NOT NULL,
    pem                  TEXT NOT NULL,
    -- 1: a certificate whose CN names no device creates a device of that
    -- name at its first connection.
    auto_create_devices  INTEGER NOT NULL,
    created_at           INTEGER NOT NULL
);
CREATE INDEX device_cas_by_tenant ON device_cas(tenant_id);
