-- Bounded idempotency history: request records are pruned by age and by count (the writer does
-- it, see server/src/store/prune.rs). A pruned id leaves a tombstone: a 64-bit digest of the id,
-- so a retry of it is refused as "record pruned" instead of running a second time. Tombstones
-- are bounded by age and count in turn.

-- Age pruning looks records up by their creation time.
CREATE INDEX requests_created ON requests (created_unix);

CREATE TABLE pruned_requests (
    -- The order tombstones were made in (oldest first); count pruning cuts at max(seq) - limit.
    seq         INTEGER PRIMARY KEY,
    -- The first 8 bytes of SHA-256(request_id), big-endian, as a signed integer.
    id_hash     INTEGER NOT NULL,
    pruned_unix INTEGER NOT NULL
) STRICT;
CREATE INDEX pruned_requests_hash ON pruned_requests (id_hash);
CREATE INDEX pruned_requests_time ON pruned_requests (pruned_unix);
