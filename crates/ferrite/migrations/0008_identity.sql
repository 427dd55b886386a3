-- People and services: refresh tokens of logged-in users, scopes and
-- expiry of API keys, and service accounts for the OAuth 2.0 client
-- credentials grant. All times are epoch milliseconds; secrets are stored
-- as SHA-256 hashes only.

-- One refresh token per row. A login starts a family; each refresh marks
-- the presented token used and adds its successor to the same family, so
-- presenting a used token again reveals a copy and revokes the family.
CREATE TABLE refresh_tokens (
    token_hash  BLOB PRIMARY KEY,
    family_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    revoked_at  INTEGER
);
CREATE INDEX refresh_tokens_by_family ON refresh_tokens(family_id);
CREATE INDEX refresh_tokens_by_user ON refresh_tokens(user_id);

-- Scopes narrow what the key's role allows: a space-separated list such as
-- "telemetry:read devices:read"; NULL keeps everything the role allows.
ALTER TABLE api_keys ADD COLUMN scopes TEXT;
ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;
ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;

-- A service that calls the API with short-lived tokens from
-- POST /api/v1/oauth/token (client credentials grant).
CREATE TABLE service_accounts (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    client_id    TEXT NOT NULL UNIQUE,
    secret_hash  BLOB NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    scopes       TEXT,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX service_accounts_by_tenant ON service_accounts(tenant_id);
