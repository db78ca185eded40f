-- memplace state: the durable intent of every region, idempotency records, and the event log.

-- Agent-wide values, such as the secret that handoff tokens are derived from.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) STRICT;

CREATE TABLE regions (
    vm_id               TEXT NOT NULL,
    name                TEXT NOT NULL,
    uid                 TEXT NOT NULL UNIQUE,
    backend             TEXT NOT NULL CHECK (backend IN ('guest_memfd', 'memfd', 'memfd_hugetlb')),
    size_bytes          INTEGER NOT NULL CHECK (size_bytes > 0),
    hugepage_size_bytes INTEGER NOT NULL DEFAULT 0,
    generation          INTEGER NOT NULL CHECK (generation > 0),
    strategy            TEXT NOT NULL CHECK (strategy IN ('shared-policy', 'task-policy')),
    created_unix        INTEGER NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('active', 'lost')),
    adopted             INTEGER NOT NULL DEFAULT 0,
    -- The last process that acquired the fd, to take it back after an agent restart.
    holder_pid          INTEGER,
    holder_start_time   INTEGER,
    file_dev            INTEGER,
    file_ino            INTEGER,
    PRIMARY KEY (vm_id, name)
) STRICT;

-- The effective ranges of each region; together they tile [0, size_bytes).
CREATE TABLE ranges (
    vm_id          TEXT NOT NULL,
    name           TEXT NOT NULL,
    offset_bytes   INTEGER NOT NULL,
    length_bytes   INTEGER NOT NULL CHECK (length_bytes > 0),
    mode           TEXT NOT NULL,
    nodes          TEXT NOT NULL,
    static_nodes   INTEGER NOT NULL,
    relative_nodes INTEGER NOT NULL,
    placed         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (vm_id, name, offset_bytes),
    FOREIGN KEY (vm_id, name) REFERENCES regions (vm_id, name) ON DELETE CASCADE
) STRICT;

-- Idempotency: the first answer to each request_id.
CREATE TABLE requests (
    request_id   TEXT PRIMARY KEY NOT NULL,
    method       TEXT NOT NULL,
    fingerprint  BLOB NOT NULL,
    response     BLOB NOT NULL,
    created_unix INTEGER NOT NULL
) STRICT;

-- The event log behind WatchEvents, bounded by count.
CREATE TABLE events (
    sequence     INTEGER PRIMARY KEY AUTOINCREMENT,
    time_unix_ms INTEGER NOT NULL,
    kind         INTEGER NOT NULL,
    vm_id        TEXT NOT NULL,
    name         TEXT NOT NULL,
    message      TEXT NOT NULL,
    actor        TEXT NOT NULL
) STRICT;
CREATE INDEX events_vm ON events (vm_id, sequence);
