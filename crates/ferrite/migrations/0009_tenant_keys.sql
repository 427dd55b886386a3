-- Per-tenant data keys (envelope encryption). Each tenant has one or more
-- random 256-bit data keys; secrets of the tenant are sealed under the
-- newest version and older versions stay to open what they sealed. A data
-- key is stored only wrapped (AES-256-GCM) by a master key, which is kept
-- outside the database (the master.key file or FERRITE_MASTER_KEY).
-- Deleting the rows of a tenant destroys its data keys, so whatever was
-- sealed under them cannot be opened again, even with the master key.
CREATE TABLE tenant_keys (
    tenant_id      TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    -- Starts at 1; the sealed format names the version that sealed it.
    version        INTEGER NOT NULL CHECK (version >= 1),
    -- 16 hex digits derived from the master key (see encryption/master.rs),
    -- so that a rotation knows which rows are still wrapped by the old key.
    master_key_id  TEXT NOT NULL,
    -- The data key sealed by the master key under the context
    -- "tenant_key/{tenant_id}/{version}".
    wrapped_key    BLOB NOT NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, version)
);
