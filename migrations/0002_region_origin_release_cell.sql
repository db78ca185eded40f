-- Who made each region's file (origin), a third status for a region whose memory was given back
-- when its last holder exited (released), and the guest NUMA cell a VMM's backend feeds
-- (guest_cell, NULL when unknown). The status CHECK can only change by rebuilding the table.
-- The migration runs in a transaction with foreign keys on, and dropping a parent table deletes
-- its children's rows, so ranges is rebuilt too and dropped first: renaming regions_v2 to
-- regions then rewrites ranges_v2's reference to it.
CREATE TABLE regions_v2 (
    vm_id               TEXT NOT NULL,
    name                TEXT NOT NULL,
    uid                 TEXT NOT NULL UNIQUE,
    backend             TEXT NOT NULL CHECK (backend IN ('guest_memfd', 'memfd', 'memfd_hugetlb')),
    size_bytes          INTEGER NOT NULL CHECK (size_bytes > 0),
    hugepage_size_bytes INTEGER NOT NULL DEFAULT 0,
    generation          INTEGER NOT NULL CHECK (generation > 0),
    strategy            TEXT NOT NULL CHECK (strategy IN ('shared-policy', 'task-policy')),
    created_unix        INTEGER NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('active', 'lost', 'released')),
    -- Who made the file: 'agent' (CreateRegion, also what `memplacectl exec` uses), or a VMM
    -- that brought its own ('attach', 'adopt').
    origin              TEXT NOT NULL CHECK (origin IN ('agent', 'attach', 'adopt')),
    -- The last process that acquired the fd, to take it back after an agent restart.
    holder_pid          INTEGER,
    holder_start_time   INTEGER,
    file_dev            INTEGER,
    file_ino            INTEGER,
    guest_cell          INTEGER CHECK (guest_cell IS NULL OR guest_cell >= 0),
    PRIMARY KEY (vm_id, name)
) STRICT;
INSERT INTO regions_v2 (vm_id, name, uid, backend, size_bytes, hugepage_size_bytes, generation,
                        strategy, created_unix, status, origin, holder_pid, holder_start_time,
                        file_dev, file_ino, guest_cell)
    SELECT vm_id, name, uid, backend, size_bytes, hugepage_size_bytes, generation, strategy,
           created_unix, status, CASE WHEN adopted THEN 'adopt' ELSE 'agent' END, holder_pid,
           holder_start_time, file_dev, file_ino, NULL
    FROM regions;
CREATE TABLE ranges_v2 (
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
    FOREIGN KEY (vm_id, name) REFERENCES regions_v2 (vm_id, name) ON DELETE CASCADE
) STRICT;
INSERT INTO ranges_v2 SELECT vm_id, name, offset_bytes, length_bytes, mode, nodes, static_nodes,
                             relative_nodes, placed FROM ranges;
DROP TABLE ranges;
DROP TABLE regions;
ALTER TABLE regions_v2 RENAME TO regions;
ALTER TABLE ranges_v2 RENAME TO ranges;
