-- Retained MQTT messages, so that they survive a restart. The MQTT server
-- keeps all of them in memory and writes each change here before it
-- acknowledges the PUBLISH. All times are epoch milliseconds.

CREATE TABLE mqtt_retained (
    tenant_id         TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    -- The device whose namespace contains the topic, or '' for the topic
    -- tree of the tenant's applications. Not a foreign key because of ''.
    device_id         TEXT NOT NULL,
    -- For a device: the topic after v1/devices/me/ or devices/{id}/. For
    -- applications: the whole topic.
    topic             TEXT NOT NULL,
    payload           BLOB NOT NULL,
    qos               INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    -- MQTT 5 properties forwarded with the message.
    payload_is_utf8   INTEGER NOT NULL DEFAULT 0,
    content_type      TEXT,
    response_topic    TEXT,
    correlation_data  BLOB,
    -- JSON array of [name, value] pairs, in order.
    user_properties   TEXT NOT NULL DEFAULT '[]',
    -- From the MQTT 5 Message Expiry Interval; NULL when it never expires.
    expires_at        INTEGER,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, device_id, topic)
);
