-- DTLS credentials of devices: one pre-shared key per device and any
-- number of registered client certificates.
-- All times are epoch milliseconds.

-- The PSK identity is unique across all tenants, because a DTLS client
-- sends only the identity and the server must find the key from it alone.
-- The key is sealed with the master key (see encryption.rs) under the
-- context "device_psk/{device id}", so a sealed key copied to another
-- device's row fails to open.
CREATE TABLE device_psks (
    device_id   TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    identity    BLOB NOT NULL UNIQUE,
    sealed_key  BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

-- A client certificate that authenticates its device by the SHA-256
-- fingerprint of its DER encoding, whoever issued it. The PEM is kept so
-- that the API can show the subject and validity again.
CREATE TABLE device_certificates (
    fingerprint  BLOB PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    subject      TEXT NOT NULL,
    not_after    INTEGER NOT NULL,
    pem          TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE INDEX device_certificates_by_device ON device_certificates(device_id);
