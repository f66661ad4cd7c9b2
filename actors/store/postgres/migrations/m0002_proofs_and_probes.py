"""Version 2: what the Merkle log, the health probe and bounded idempotency records need.

Old builds can live with it (columns and tables they do not read), but refuse to start
on it (``SchemaTooNew``): roll out by stopping them.
"""

DESCRIPTION = "checkpoint roots and notes, tenants' first entry, heartbeats, refusal index"

SQL = """
-- A checkpoint's tree root (base64) and its signed C2SP note; NULL for checkpoints made
-- before the tree was kept.
ALTER TABLE checkpoints ADD COLUMN root text, ADD COLUMN note text;
-- Where a tenant's own entries start (API.md "Proofs": from its latest tenant.create):
-- the queue id of that entry, or its seq for imported history.
ALTER TABLE tenants ADD COLUMN created_qid bigint, ADD COLUMN created_seq bigint;
-- tenants of a database made by version 1: found in the chain (one pass, at the upgrade)
UPDATE tenants t SET created_seq = (
    SELECT max(l.seq) FROM audit_log l WHERE l.tenant = t.id
    AND convert_from(l.line, 'UTF8')::jsonb @> '{"op": "tenant.create", "outcome": "succeeded"}'
);
-- One row per replica process, written by its health probe: /readyz follows a write
-- that commits, not a read (a read-only or full database still answers reads).
CREATE TABLE heartbeats (
    replica text PRIMARY KEY,
    at      timestamptz NOT NULL
);
-- A tenant's quota refusals, newest first: only the newest 1,000 are kept.
CREATE INDEX idempotency_refusals ON idempotency (tenant, created) WHERE status = 403;
"""
