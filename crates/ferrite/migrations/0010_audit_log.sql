-- The audit log: administrative actions, append-only and hash-chained.
--
-- Each tenant has its own chain (`chain` = tenant id); actions without a
-- tenant, such as a failed login for an unknown email, go to the chain
-- named 'system'. `seq` counts from 1 in each chain without gaps, and
-- `hash` = SHA-256(prev_hash || canonical record), hex-encoded, where the
-- first record's prev_hash is 64 zeros. The server never updates or
-- deletes a row; the triggers below reject such statements, and the chain
-- shows when someone drops them and edits the file anyway.
--
-- tenant_id has no foreign key on purpose: deleting a tenant must not
-- delete the record of what was done in it.

CREATE TABLE audit_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    chain        TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    at_ms        INTEGER NOT NULL,
    tenant_id    TEXT,
    actor_type   TEXT NOT NULL,
    actor_id     TEXT,
    actor_name   TEXT,
    action       TEXT NOT NULL,
    target_type  TEXT,
    target_id    TEXT,
    detail       TEXT NOT NULL,
    source       TEXT,
    user_agent   TEXT,
    outcome      TEXT NOT NULL,
    status       INTEGER,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL,
    UNIQUE (chain, seq)
);
CREATE INDEX audit_log_by_time ON audit_log(chain, at_ms);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be updated');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be deleted');
END;
