-- kwollect schema, part 6: checkpoints of `kwollect migrate` (kwollect/migrate/).
--
-- A Kwollect 1.x database is copied time range by time range; each range's samples and its
-- row here are committed in one transaction, so an interrupted migration resumes at the
-- first range without a row, and never copies a range twice.
CREATE TABLE IF NOT EXISTS kwollect.migrated_ranges (
    source       text NOT NULL,
    range_start  timestamptz NOT NULL,
    range_end    timestamptz NOT NULL,
    source_rows  bigint NOT NULL,
    written_rows bigint NOT NULL,
    migrated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, range_start),
    CHECK (range_start < range_end)
);
-- Rows of series kwollect cannot hold (labels over 2000 bytes, ids over 255 characters).
ALTER TABLE kwollect.migrated_ranges ADD COLUMN IF NOT EXISTS refused_rows bigint NOT NULL DEFAULT 0;
COMMENT ON TABLE kwollect.migrated_ranges IS
    'Time ranges of a Kwollect 1.x source copied by kwollect migrate: source rows read, rows '
    'written (duplicates of the source kept once), rows refused (labels over 2000 bytes, ids '
    'over 255 characters), when.';
