-- LoRaWAN gateways and devices, the DevNonces each device has used and the
-- downlink queue.

-- Gateways that may forward packets over the Semtech UDP protocol. Packets
-- of gateways missing here are rejected.
CREATE TABLE lorawan_gateways (
    -- 16 lowercase hex digits.
    gateway_eui   TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    last_seen_at  INTEGER
);
CREATE INDEX lorawan_gateways_by_tenant ON lorawan_gateways(tenant_id, gateway_eui);

-- The LoRaWAN identity, keys and session of a device. Keys are sealed with
-- the master key (AES-256-GCM) under the context
-- `lorawan/{field}/{device id}`; the server never stores them in clear.
-- `external` devices are run by another network server and have no keys
-- or session here.
CREATE TABLE lorawan_devices (
    device_id     TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    -- 16 lowercase hex digits, as are join_eui and (8 digits) dev_addr.
    dev_eui       TEXT NOT NULL UNIQUE,
    join_eui      TEXT,
    region        TEXT CHECK (region IN ('EU868', 'US915')),
    activation    TEXT NOT NULL CHECK (activation IN ('otaa', 'abp', 'external')),
    mac_version   TEXT NOT NULL,
    app_key       BLOB,
    nwk_s_key     BLOB,
    app_s_key     BLOB,
    dev_addr      TEXT,
    -- The 32-bit counter of the last accepted uplink; NULL before the first
    -- uplink of the session.
    f_cnt_up      INTEGER,
    -- The counter the next downlink uses.
    n_f_cnt_down  INTEGER NOT NULL DEFAULT 0,
    -- Epoch milliseconds of the last join accept.
    joined_at     INTEGER,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX lorawan_devices_by_dev_addr ON lorawan_devices(dev_addr);

-- Every DevNonce a device has joined with, so that a replayed join request
-- is rejected.
CREATE TABLE lorawan_dev_nonces (
    device_id   TEXT NOT NULL REFERENCES lorawan_devices(device_id) ON DELETE CASCADE,
    dev_nonce   INTEGER NOT NULL,
    used_at     INTEGER NOT NULL,
    PRIMARY KEY (device_id, dev_nonce)
);

-- Downlinks queued through the API, sent in the receive window after the
-- device's next uplink, oldest first.
CREATE TABLE lorawan_downlinks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT NOT NULL REFERENCES lorawan_devices(device_id) ON DELETE CASCADE,
    f_port      INTEGER NOT NULL CHECK (f_port BETWEEN 1 AND 223),
    data        BLOB NOT NULL,
    confirmed   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    -- Set when the downlink went to a gateway, with the counter it used.
    sent_at     INTEGER,
    f_cnt_down  INTEGER
);
CREATE INDEX lorawan_downlinks_pending ON lorawan_downlinks(device_id, id) WHERE sent_at IS NULL;
