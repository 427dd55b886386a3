-- Deliveries of alarm actions: one row per action run for one alarm
-- change, with the state of its attempts. Pending rows are the retry queue
-- and survive a restart; finished rows are deleted after
-- actions.succeeded_retention or actions.failed_retention.
-- All times are epoch milliseconds.

CREATE TABLE action_deliveries (
    -- UUID v7, so that ids sort by creation time.
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    -- No foreign key: deliveries stay visible after their device is deleted.
    device_id         TEXT NOT NULL,
    alarm_id          TEXT,
    kind              TEXT NOT NULL CHECK (kind IN ('webhook', 'mqtt_publish', 'command')),
    -- Where the action sends to, without credentials.
    target            TEXT NOT NULL,
    -- Event name, such as alarm.raised.
    event             TEXT NOT NULL,
    -- The action as JSON, including a webhook's secret and headers, which
    -- the API never returns.
    spec              TEXT NOT NULL,
    -- The device and the alarm as JSON.
    payload           TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT,
    last_status_code  INTEGER,
    -- Set only while pending.
    next_attempt_at   INTEGER,
    -- Start of the current round of attempts, from which actions.max_age
    -- counts; a manual retry starts a new round.
    started_at        INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);

CREATE INDEX action_deliveries_due ON action_deliveries(status, next_attempt_at);
CREATE INDEX action_deliveries_finished ON action_deliveries(status, updated_at);
CREATE INDEX action_deliveries_by_tenant ON action_deliveries(tenant_id, id);
CREATE INDEX action_deliveries_by_alarm ON action_deliveries(tenant_id, alarm_id);
