//! The audit log in SQLite: an append-only, hash-chained record of
//! administrative actions.
//!
//! Layout (migration `0010_audit_log.sql`): one row per action. Rows form
//! one chain per tenant (`chain` is the tenant id) plus the chain
//! `system` for actions without a tenant. In a chain, `seq` runs from 1
//! without gaps and each row stores
//! `hash = SHA-256(prev_hash || canonical record)` in hex, where
//! `prev_hash` is the previous row's hash (64 zeros for the first row).
//! [`canonical_record`] defines the hashed bytes.
//!
//! Invariants: this module only ever INSERTs into the table, and it
//! appends inside a `BEGIN IMMEDIATE` transaction, so two writers never
//! take the same `seq`. Editing a row, deleting a row in the middle or
//! reordering rows breaks the chain at that row and [`verify`] reports it.
//! Deleting the newest rows of a chain leaves a shorter chain that is
//! still valid. Only a head hash kept elsewhere shows that, such as the
//! `head_hash` that verification returns.
//!
//! [`verify`]: SqliteMetadata::verify_audit_chain

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::sqlite::now_ms;
use super::{MetadataError, SqliteMetadata};
use crate::ids::{TenantId, UserId};

/// Chain of the actions that belong to no tenant.
pub const SYSTEM_CHAIN: &str = "system";

/// `prev_hash` of the first record of a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per query while verifying a chain.
const VERIFY_PAGE: i64 = 1000;

/// An action to record.
#[derive(Debug, Clone)]
pub struct NewAuditRecord {
    /// The tenant the action belongs to; `None` records it in the system
    /// chain.
    pub tenant_id: Option<TenantId>,
    /// `user`, `api_key`, `cli` or `anonymous`.
    pub actor_type: &'static str,
    /// User id or API key name; `None` for the CLI and anonymous callers.
    pub actor_id: Option<String>,
    /// Email of a user, name of an API key, OS user of the CLI or the
    /// email given in a failed login.
    pub actor_name: Option<String>,
    /// Dotted action name, such as `device.create` or `auth.login`.
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    /// Small JSON object with what else matters. Never a secret.
    pub detail: serde_json::Value,
    /// Source IP address and port of an API request.
    pub source: Option<String>,
    pub user_agent: Option<String>,
    /// `success`, `denied` (401/403) or `failed`.
    pub outcome: &'static str,
    /// HTTP status of an API request.
    pub status: Option<u16>,
}

/// A stored record, as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub chain: String,
    pub seq: i64,
    /// Time of the record in epoch milliseconds.
    pub at_ms: i64,
    pub tenant_id: Option<String>,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub actor_name: Option<String>,
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    /// The stored detail JSON text, exactly as hashed.
    #[serde(skip)]
    pub detail_text: String,
    pub detail: serde_json::Value,
    pub source: Option<String>,
    pub user_agent: Option<String>,
    pub outcome: String,
    pub status: Option<i64>,
    pub prev_hash: String,
    pub hash: String,
}

/// Filters of an audit query; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Records at or after this time (epoch milliseconds).
    pub from_ms: Option<i64>,
    /// Records before this time (epoch milliseconds).
    pub to_ms: Option<i64>,
    /// Matches `actor_id` or `actor_name` exactly.
    pub actor: Option<String>,
    /// An exact action name, or a prefix followed by `*` (`device.*`).
    pub action: Option<String>,
    /// Records with a `seq` below this one (paging, newest first).
    pub before_seq: Option<i64>,
    /// Records with a `seq` above this one (paging, oldest first).
    pub after_seq: Option<i64>,
}

/// Result of walking a chain.
#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    pub chain: String,
    /// Records checked before the first broken one (all when intact).
    pub records: i64,
    /// `seq` and hash of the last record, to keep outside the server: a
    /// later verification that ends before this head shows deleted rows.
    pub head_seq: i64,
    pub head_hash: String,
    pub intact: bool,
    pub first_broken: Option<BrokenRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokenRecord {
    /// Row id of the broken record.
    pub id: i64,
    pub seq: i64,
    pub reason: String,
}

/// The bytes a record's hash covers: every field except the row id and
/// the hashes, as a JSON object with a fixed field order. The detail is
/// the stored JSON text, so the hash does not depend on how a JSON library
/// orders keys.
#[derive(Serialize)]
struct CanonicalRecord<'a> {
    chain: &'a str,
    seq: i64,
    at_ms: i64,
    tenant_id: Option<&'a str>,
    actor_type: &'a str,
    actor_id: Option<&'a str>,
    actor_name: Option<&'a str>,
    action: &'a str,
    target_type: Option<&'a str>,
    target_id: Option<&'a str>,
    detail: &'a str,
    source: Option<&'a str>,
    user_agent: Option<&'a str>,
    outcome: &'a str,
    status: Option<i64>,
}

fn canonical_record(record: &AuditRecord) -> Vec<u8> {
    let canonical = CanonicalRecord {
        chain: &record.chain,
        seq: record.seq,
        at_ms: record.at_ms,
        tenant_id: record.tenant_id.as_deref(),
        actor_type: &record.actor_type,
        actor_id: record.actor_id.as_deref(),
        actor_name: record.actor_name.as_deref(),
        action: &record.action,
        target_type: record.target_type.as_deref(),
        target_id: record.target_id.as_deref(),
        detail: &record.detail_text,
        source: record.source.as_deref(),
        user_agent: record.user_agent.as_deref(),
        outcome: &record.outcome,
        status: record.status,
    };
    // serde_json fails only on maps with non-string keys and on failing
    // Serialize impls, and this struct has neither.
    serde_json::to_vec(&canonical).unwrap_or_default()
}

/// Computes `hex(SHA-256(prev_hash || canonical record))`.
pub fn record_hash(record: &AuditRecord) -> String {
    let mut hasher = Sha256::new();
    hasher.update(record.prev_hash.as_bytes());
    hasher.update(canonical_record(record));
    hex::encode(hasher.finalize())
}

/// Returns the chain of a tenant, or the system chain.
pub fn chain_of(tenant: Option<TenantId>) -> String {
    tenant.map_or_else(|| SYSTEM_CHAIN.to_owned(), |id| id.to_string())
}

fn record_from_row(row: sqlx::sqlite::SqliteRow) -> Result<AuditRecord, MetadataError> {
    let detail_text: String = row.try_get("detail")?;
    // A detail that no longer parses was edited by hand; show it as text
    // so that the record stays readable and verification can name it.
    let detail = serde_json::from_str(&detail_text)
        .unwrap_or_else(|_| serde_json::Value::String(detail_text.clone()));
    Ok(AuditRecord {
        id: row.try_get("id")?,
        chain: row.try_get("chain")?,
        seq: row.try_get("seq")?,
        at_ms: row.try_get("at_ms")?,
        tenant_id: row.try_get("tenant_id")?,
        actor_type: row.try_get("actor_type")?,
        actor_id: row.try_get("actor_id")?,
        actor_name: row.try_get("actor_name")?,
        action: row.try_get("action")?,
        target_type: row.try_get("target_type")?,
        target_id: row.try_get("target_id")?,
        detail_text,
        detail,
        source: row.try_get("source")?,
        user_agent: row.try_get("user_agent")?,
        outcome: row.try_get("outcome")?,
        status: row.try_get("status")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// Expands to the SELECT clause of a full record, as a literal for
/// `concat!`, because sqlx takes only static SQL strings.
macro_rules! select_record {
    () => {
        "SELECT id, chain, seq, at_ms, tenant_id, actor_type, actor_id, actor_name, action, target_type, target_id, detail, source, user_agent, outcome, status, prev_hash, hash FROM audit_log "
    };
}

/// Expands to the WHERE clause of [`SqliteMetadata::list_audit`]. Every
/// filter is always bound, and a NULL parameter switches its condition
/// off.
macro_rules! list_filter {
    () => {
        "WHERE chain = ? \
         AND (? IS NULL OR at_ms >= ?) \
         AND (? IS NULL OR at_ms < ?) \
         AND (? IS NULL OR actor_id = ? OR actor_name = ?) \
         AND (? IS NULL OR action = ?) \
         AND (? IS NULL OR substr(action, 1, length(?)) = ?) \
         AND (? IS NULL OR seq < ?) \
         AND (? IS NULL OR seq > ?) "
    };
}

const LIST_NEWEST_FIRST: &str = concat!(
    select_record!(),
    list_filter!(),
    "ORDER BY seq DESC LIMIT ?"
);
const LIST_OLDEST_FIRST: &str =
    concat!(select_record!(), list_filter!(), "ORDER BY seq ASC LIMIT ?");
const VERIFY_PAGE_QUERY: &str = concat!(
    select_record!(),
    "WHERE chain = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
);

impl SqliteMetadata {
    /// Returns the email of a user, for the actor of a record.
    pub async fn user_email(&self, id: UserId) -> Result<Option<String>, MetadataError> {
        let email = sqlx::query_scalar("SELECT email FROM users WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(email)
    }

    /// Appends a record to the end of its chain and returns it once
    /// committed.
    pub async fn append_audit(&self, new: NewAuditRecord) -> Result<AuditRecord, MetadataError> {
        let chain = chain_of(new.tenant_id);
        let mut tx = self.begin_write().await?;

        let last: Option<(i64, String)> = sqlx::query_as(
            "SELECT seq, hash FROM audit_log WHERE chain = ? ORDER BY seq DESC LIMIT 1",
        )
        .bind(&chain)
        .fetch_optional(&mut *tx)
        .await?;
        let (prev_seq, prev_hash) = last.unwrap_or((0, GENESIS_HASH.to_owned()));

        let detail_text = new.detail.to_string();
        let mut record = AuditRecord {
            id: 0,
            chain,
            seq: prev_seq + 1,
            at_ms: now_ms(),
            tenant_id: new.tenant_id.map(|id| id.to_string()),
            actor_type: new.actor_type.to_owned(),
            actor_id: new.actor_id,
            actor_name: new.actor_name,
            action: new.action,
            target_type: new.target_type,
            target_id: new.target_id,
            detail_text,
            detail: new.detail,
            source: new.source,
            user_agent: new.user_agent,
            outcome: new.outcome.to_owned(),
            status: new.status.map(i64::from),
            prev_hash,
            hash: String::new(),
        };
        record.hash = record_hash(&record);

        let result = sqlx::query(
            "INSERT INTO audit_log (chain, seq, at_ms, tenant_id, actor_type, actor_id, actor_name, action, target_type, target_id, detail, source, user_agent, outcome, status, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&record.chain)
        .bind(record.seq)
        .bind(record.at_ms)
        .bind(&record.tenant_id)
        .bind(&record.actor_type)
        .bind(&record.actor_id)
        .bind(&record.actor_name)
        .bind(&record.action)
        .bind(&record.target_type)
        .bind(&record.target_id)
        .bind(&record.detail_text)
        .bind(&record.source)
        .bind(&record.user_agent)
        .bind(&record.outcome)
        .bind(record.status)
        .bind(&record.prev_hash)
        .bind(&record.hash)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        record.id = result.last_insert_rowid();
        Ok(record)
    }

    /// Lists records of one chain that match `filter`: newest first, or
    /// oldest first when `oldest_first` is set (exports and `after_seq`
    /// paging).
    pub async fn list_audit(
        &self,
        chain: &str,
        filter: &AuditFilter,
        oldest_first: bool,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, MetadataError> {
        let (action_exact, action_prefix) = match filter.action.as_deref() {
            Some(action) => match action.strip_suffix('*') {
                Some(prefix) => (None, Some(prefix.to_owned())),
                None => (Some(action.to_owned()), None),
            },
            None => (None, None),
        };
        let sql = if oldest_first {
            LIST_OLDEST_FIRST
        } else {
            LIST_NEWEST_FIRST
        };
        let rows = sqlx::query(sql)
            .bind(chain)
            .bind(filter.from_ms)
            .bind(filter.from_ms)
            .bind(filter.to_ms)
            .bind(filter.to_ms)
            .bind(&filter.actor)
            .bind(&filter.actor)
            .bind(&filter.actor)
            .bind(&action_exact)
            .bind(&action_exact)
            .bind(&action_prefix)
            .bind(&action_prefix)
            .bind(&action_prefix)
            .bind(filter.before_seq)
            .bind(filter.before_seq)
            .bind(filter.after_seq)
            .bind(filter.after_seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(record_from_row).collect()
    }

    /// Walks a chain from its first record and reports the first record
    /// whose sequence number, link or hash is wrong.
    pub async fn verify_audit_chain(&self, chain: &str) -> Result<ChainReport, MetadataError> {
        let mut report = ChainReport {
            chain: chain.to_owned(),
            records: 0,
            head_seq: 0,
            head_hash: GENESIS_HASH.to_owned(),
            intact: true,
            first_broken: None,
        };
        let mut expected_seq = 1;
        let mut expected_prev = GENESIS_HASH.to_owned();
        let mut after_seq = 0;
        loop {
            let page = sqlx::query(VERIFY_PAGE_QUERY)
                .bind(chain)
                .bind(after_seq)
                .bind(VERIFY_PAGE)
                .fetch_all(&self.pool)
                .await?;
            if page.is_empty() {
                return Ok(report);
            }
            for row in page {
                let record = record_from_row(row)?;
                after_seq = record.seq;
                if let Some(reason) = check_link(&record, expected_seq, &expected_prev) {
                    report.intact = false;
                    report.first_broken = Some(BrokenRecord {
                        id: record.id,
                        seq: record.seq,
                        reason,
                    });
                    return Ok(report);
                }
                report.records += 1;
                report.head_seq = record.seq;
                report.head_hash = record.hash.clone();
                expected_seq = record.seq + 1;
                expected_prev = record.hash;
            }
        }
    }
}

/// Checks one record against the previous one; returns why it is broken.
fn check_link(record: &AuditRecord, expected_seq: i64, expected_prev: &str) -> Option<String> {
    if record.seq != expected_seq {
        return Some(format!(
            "sequence number {} where {expected_seq} was expected: records before it were deleted",
            record.seq
        ));
    }
    if record.prev_hash != expected_prev {
        return Some(format!(
            "prev_hash {} does not match the hash {expected_prev} of the record before it: a record was replaced or reordered",
            record.prev_hash
        ));
    }
    let computed = record_hash(record);
    if record.hash != computed {
        return Some(format!(
            "stored hash {} does not match the hash {computed} of the record's content: the record was edited",
            record.hash
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open() -> (tempfile::TempDir, SqliteMetadata) {
        let dir = tempfile::tempdir().unwrap();
        let metadata = SqliteMetadata::open(dir.path()).await.unwrap();
        (dir, metadata)
    }

    fn record(tenant: Option<TenantId>, action: &str) -> NewAuditRecord {
        NewAuditRecord {
            tenant_id: tenant,
            actor_type: "cli",
            actor_id: None,
            actor_name: Some("root".into()),
            action: action.into(),
            target_type: Some("device".into()),
            target_id: Some("d1".into()),
            detail: serde_json::json!({"name": "pump-1", "b": 1, "a": 2}),
            source: None,
            user_agent: None,
            outcome: "success",
            status: None,
        }
    }

    #[tokio::test]
    async fn audit_chain_links_records() {
        let (_dir, metadata) = open().await;
        let tenant = TenantId::new_random();
        let first = metadata
            .append_audit(record(Some(tenant), "device.create"))
            .await
            .unwrap();
        let second = metadata
            .append_audit(record(Some(tenant), "device.delete"))
            .await
            .unwrap();
        let other = metadata
            .append_audit(record(None, "auth.login"))
            .await
            .unwrap();

        assert_eq!(first.seq, 1);
        assert_eq!(first.prev_hash, GENESIS_HASH);
        assert_eq!(second.seq, 2);
        assert_eq!(second.prev_hash, first.hash);
        assert_eq!(other.chain, SYSTEM_CHAIN);
        assert_eq!(other.seq, 1);

        let report = metadata
            .verify_audit_chain(&tenant.to_string())
            .await
            .unwrap();
        assert!(report.intact, "{report:?}");
        assert_eq!(report.records, 2);
        assert_eq!(report.head_hash, second.hash);
    }

    #[tokio::test]
    async fn audit_verify_finds_edited_record() {
        let (_dir, metadata) = open().await;
        let tenant = TenantId::new_random();
        for action in ["a.one", "a.two", "a.three"] {
            metadata
                .append_audit(record(Some(tenant), action))
                .await
                .unwrap();
        }

        sqlx::query("DROP TRIGGER audit_log_no_update")
            .execute(&metadata.pool)
            .await
            .unwrap();
        sqlx::query("UPDATE audit_log SET actor_name = 'someone else' WHERE seq = 2")
            .execute(&metadata.pool)
            .await
            .unwrap();

        let report = metadata
            .verify_audit_chain(&tenant.to_string())
            .await
            .unwrap();
        assert!(!report.intact);
        assert_eq!(report.records, 1);
        let broken = report.first_broken.unwrap();
        assert_eq!(broken.seq, 2);
        assert!(broken.reason.contains("edited"), "{}", broken.reason);
    }

    #[tokio::test]
    async fn audit_verify_finds_deleted_record() {
        let (_dir, metadata) = open().await;
        let tenant = TenantId::new_random();
        for action in ["a.one", "a.two", "a.three"] {
            metadata
                .append_audit(record(Some(tenant), action))
                .await
                .unwrap();
        }

        sqlx::query("DROP TRIGGER audit_log_no_delete")
            .execute(&metadata.pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit_log WHERE seq = 2")
            .execute(&metadata.pool)
            .await
            .unwrap();

        let report = metadata
            .verify_audit_chain(&tenant.to_string())
            .await
            .unwrap();
        let broken = report.first_broken.unwrap();
        assert_eq!(broken.seq, 3);
        assert!(broken.reason.contains("deleted"), "{}", broken.reason);
    }

    #[tokio::test]
    async fn audit_table_rejects_update() {
        let (_dir, metadata) = open().await;
        metadata
            .append_audit(record(None, "auth.login"))
            .await
            .unwrap();

        let error = sqlx::query("UPDATE audit_log SET outcome = 'failed'")
            .execute(&metadata.pool)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("append-only"), "{error}");
        let error = sqlx::query("DELETE FROM audit_log")
            .execute(&metadata.pool)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("append-only"), "{error}");
    }

    #[tokio::test]
    async fn audit_list_filters_by_action_prefix() {
        let (_dir, metadata) = open().await;
        let tenant = TenantId::new_random();
        for action in ["device.create", "device.delete", "profile.create"] {
            metadata
                .append_audit(record(Some(tenant), action))
                .await
                .unwrap();
        }
        let filter = AuditFilter {
            action: Some("device.*".into()),
            ..Default::default()
        };

        let records = metadata
            .list_audit(&tenant.to_string(), &filter, false, 10)
            .await
            .unwrap();

        let actions: Vec<_> = records.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(actions, ["device.delete", "device.create"]);
    }
}
