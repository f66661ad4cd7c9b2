"""Version 1: tenants, tokens, VMs, idempotency records, the audit log and its metadata."""

DESCRIPTION = "initial schema"

SQL = """
-- The log's identity: one row, made by the first replica (or by `db import`).
CREATE TABLE log_meta (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    origin             text NOT NULL,
    -- SHA-256 (hex) of the operator's bearer token: replicas check the token against it,
    -- and a dump of the database does not hand the token out
    admin_token_sha256 text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- Signing keys shared by every replica: 'token' keys sign tenant tokens and cursors
-- (the keyring: the newest active one signs, every active one verifies); the 'audit' key
-- signs checkpoints (an Ed25519 private key, PKCS#8 PEM). A retired key has no secret.
CREATE TABLE signing_keys (
    id         text PRIMARY KEY,
    purpose    text NOT NULL CHECK (purpose IN ('token', 'audit')),
    created_at text NOT NULL,
    state      text NOT NULL CHECK (state IN ('active', 'retired')),
    secret     text,
    retired_at text,
    CHECK ((state = 'active') = (secret IS NOT NULL))
);

CREATE TABLE tenants (
    id                   text PRIMARY KEY,
    quota_vcpus          integer NOT NULL CHECK (quota_vcpus >= 0),
    quota_memory_mib     integer NOT NULL CHECK (quota_memory_mib >= 0),
    quota_vms            integer NOT NULL CHECK (quota_vms >= 0),
    -- the allocation, kept in step with the tenant's VM rows in the same transactions
    allocated_vcpus      bigint NOT NULL DEFAULT 0,
    allocated_memory_mib bigint NOT NULL DEFAULT 0,
    allocated_vms        integer NOT NULL DEFAULT 0,
    -- bumped by every change of the row: a cache of it is current iff versions match
    version              bigint NOT NULL DEFAULT 1
);

-- The tokens a tenant may use (a revoked token's row is deleted; a deleted tenant's
-- rows go with it), as the fold's TenantState.tokens.
CREATE TABLE tokens (
    tenant   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    token_id text NOT NULL,
    PRIMARY KEY (tenant, token_id)
);

-- One row per change of a tenant's tokens (issue, revoke, tenant create or delete), in
-- the same transaction, with NOTIFY vm_tenant_directory: a replica re-reads the tokens
-- of the tenants named after the last version it saw, on the notification or at the
-- latest at its next poll. Rows older than an hour are pruned.
CREATE TABLE directory_changes (
    version    bigserial PRIMARY KEY,
    tenant     text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vms (
    id              text PRIMARY KEY,
    tenant          text NOT NULL REFERENCES tenants (id),
    vcpus           integer NOT NULL,
    memory_mib      integer NOT NULL,
    image           text NOT NULL,
    name            text,
    created_at      text NOT NULL,
    state           text NOT NULL
        CHECK (state IN ('spawning', 'pending', 'running', 'destroying', 'unknown', 'error')),
    settled_state   text NOT NULL,
    idempotency_key text,
    doubt           text CHECK (doubt IN ('spawn', 'destroy')),
    -- an operation in flight: the replica that runs it and until when its lease holds;
    -- fence rises with every claim, and a write carries the fence it read
    owner           text,
    lease_expires   timestamptz,
    fence           bigint NOT NULL DEFAULT 0
);
CREATE INDEX vms_by_tenant ON vms (tenant, id);
CREATE INDEX vms_in_doubt ON vms (lease_expires)
    WHERE state IN ('spawning', 'destroying', 'unknown');

CREATE TABLE idempotency (
    tenant       text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key          text NOT NULL,
    request_hash text NOT NULL,
    status       integer NOT NULL,  -- 0 while the first request is in flight
    body         jsonb,
    created      text NOT NULL,     -- the audit ts of the decision (24-hour retention)
    PRIMARY KEY (tenant, key)
);

-- Entries written by transactions, waiting for the sequencer. body = the canonical JSON
-- of the entry's fields (op, outcome, tenant, vm, source, request_id, detail).
CREATE TABLE audit_queue (
    qid    bigserial PRIMARY KEY,
    tenant text,
    body   bytea NOT NULL
);

-- The chain: line = the stored line exactly as the file store writes it, without the
-- newline that ends it there. qid links an entry to the queue row it came from (NULL for
-- imported history).
CREATE TABLE audit_log (
    seq    bigint PRIMARY KEY CHECK (seq >= 1),
    qid    bigint UNIQUE,
    tenant text,
    hash   text NOT NULL,
    line   bytea NOT NULL
);
CREATE INDEX audit_log_by_tenant ON audit_log (tenant, seq);

-- The chain's head: one row, moved only by the sequencer, compare-and-set.
CREATE TABLE audit_head (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq  bigint NOT NULL,
    hash text NOT NULL,
    ts   text
);
INSERT INTO audit_head VALUES (true, 0, repeat('0', 64), NULL);

-- RFC 9162 complete subtrees: (level, idx) covers leaves [idx << level, (idx + 1) << level).
CREATE TABLE merkle_nodes (
    level smallint NOT NULL CHECK (level >= 0),
    idx   bigint NOT NULL CHECK (idx >= 0),
    hash  bytea NOT NULL,
    PRIMARY KEY (level, idx)
);

-- Signed checkpoints of the head, in the order they were made.
CREATE TABLE checkpoints (
    id        bigserial PRIMARY KEY,
    seq       bigint NOT NULL,
    hash      text NOT NULL,
    ts        text NOT NULL,
    signature text NOT NULL
);
"""
