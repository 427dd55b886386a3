-- Device profiles, device attributes, the dead-letter log and alarms.

-- A profile is stored as the document users write (JSON), checked by the
-- server before it is saved. `version` grows by one on every change, so
-- pipeline workers can tell that their compiled copy is stale.
CREATE TABLE device_profiles (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);

-- NULL means no profile: telemetry JSON, no schema, no rules.
ALTER TABLE devices ADD COLUMN profile_id TEXT REFERENCES device_profiles(id) ON DELETE RESTRICT;
-- Server-side attributes set through the API (location and others), as a
-- JSON object.
ALTER TABLE devices ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
CREATE INDEX devices_by_profile ON devices(profile_id);

-- Messages the pipeline could not store, with the reason. `payload` is the
-- envelope's payload as received; the other envelope fields are columns so
-- a replay rebuilds the same envelope.
CREATE TABLE dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    device_id       TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    received_at_ns  INTEGER NOT NULL,
    protocol        TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    payload         BLOB NOT NULL,
    meta            BLOB NOT NULL,
    stage           TEXT NOT NULL,
    reason          TEXT NOT NULL,
    profile_id      TEXT,
    profile_version INTEGER,
    created_at      INTEGER NOT NULL,
    replayed_at     INTEGER,
    -- Ingest log position of the message, so that a replay of the log after
    -- a crash does not record the same letter twice.
    log_seq         INTEGER NOT NULL
);
CREATE UNIQUE INDEX dead_letters_by_position ON dead_letters(device_id, log_seq);
CREATE INDEX dead_letters_by_device ON dead_letters(device_id, id);
CREATE INDEX dead_letters_by_tenant ON dead_letters(tenant_id, id);

-- One alarm per rule and device from raise to clear. At most one alarm per
-- rule and device is open (not cleared) at a time.
CREATE TABLE alarms (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    device_id        TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    profile_id       TEXT,
    rule             TEXT NOT NULL,
    severity         TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('active', 'cleared')),
    acknowledged     INTEGER NOT NULL DEFAULT 0,
    message          TEXT NOT NULL,
    details          TEXT NOT NULL DEFAULT '{}',
    raised_at        INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    acknowledged_at  INTEGER,
    acknowledged_by  TEXT,
    cleared_at       INTEGER,
    -- Ingest log position of the last transition applied, so that a replay
    -- of the log after a crash does not apply it again. NULL for changes
    -- not caused by a message (silence, by hand).
    last_seq         INTEGER
);
CREATE UNIQUE INDEX alarms_open_per_rule ON alarms(device_id, rule) WHERE status = 'active';
CREATE INDEX alarms_by_tenant ON alarms(tenant_id, raised_at);

-- The history of each alarm: every change with its time and, for
-- acknowledgements and manual clears, who made it.
CREATE TABLE alarm_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    alarm_id  TEXT NOT NULL REFERENCES alarms(id) ON DELETE CASCADE,
    at        INTEGER NOT NULL,
    change    TEXT NOT NULL,
    severity  TEXT NOT NULL,
    details   TEXT NOT NULL DEFAULT '{}',
    actor     TEXT
);
CREATE INDEX alarm_events_by_alarm ON alarm_events(alarm_id, id);
