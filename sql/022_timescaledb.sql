-- kwollect schema, part 2a: what only a TimescaleDB hypertable needs, and switching storages.
--
-- With kwollect-setup-db --timescaledb (docs/storage.md), kwollect.samples is a hypertable
-- (sql/020_storage.sql creates it): same columns, same (series_id, minute) index, so every
-- reader is the same on both storages.  These functions are defined on every storage (plpgsql
-- bodies are resolved when called) and called only on a hypertable, by the storage's entry
-- points: ensure_partitions -> record_chunks, archive_partitions -> archive_chunk,
-- compact_partitions (025) -> compress_chunks, apply_retention (040) -> chunks_before and
-- drop_chunk.  None is SECURITY DEFINER: they run inside kwollect.maintain(), as the owner
-- of the hypertable.

-- Record in kwollect.partitions the chunks that inserts created and no recorded range covers
-- (the writers' partition cache and the summaries' next_data_start read it): named after
-- the chunk, they may overlap a recorded range, which only matters to nobody.
CREATE OR REPLACE FUNCTION kwollect.record_chunks() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO kwollect.partitions (name, range_start, range_end)
    SELECT c.chunk_name, c.range_start, c.range_end
    FROM timescaledb_information.chunks c
    WHERE c.hypertable_schema = 'kwollect' AND c.hypertable_name = 'samples'
      AND NOT EXISTS (SELECT 1 FROM kwollect.partitions p
                      WHERE p.range_start <= c.range_start AND p.range_end >= c.range_end)
    ON CONFLICT (name) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Archiving on a hypertable: the oldest chunk whose range ended `p_after` ago and that is not
-- in the archive tablespace yet moves there, with its compressed data (TimescaleDB moves the
-- compressed chunk along) and the indexes of both; as partitions do on stock PostgreSQL, by
-- ALTER TABLE SET TABLESPACE (TimescaleDB's move_chunk would lock less, but cannot run
-- inside a transaction, hence not inside kwollect.maintain()).  One chunk per call.
CREATE OR REPLACE FUNCTION kwollect.archive_chunk(p_space text, p_after interval) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    chunk record;
    idx   regclass;
BEGIN
    SELECT c.chunk_name, format('%I.%I', c.chunk_schema, c.chunk_name)::regclass AS rel,
           (SELECT format('%I.%I', z.schema_name, z.table_name)::regclass
            FROM _timescaledb_catalog.chunk cc JOIN _timescaledb_catalog.chunk z
              ON z.id = cc.compressed_chunk_id
            WHERE cc.schema_name = c.chunk_schema AND cc.table_name = c.chunk_name) AS compressed
      INTO chunk
    FROM timescaledb_information.chunks c
    WHERE c.hypertable_schema = 'kwollect' AND c.hypertable_name = 'samples'
      AND c.range_end < now() - p_after
      AND c.chunk_tablespace IS DISTINCT FROM p_space
    ORDER BY c.range_start
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    EXECUTE format('ALTER TABLE %s SET TABLESPACE %I', chunk.rel, p_space);
    FOR idx IN SELECT x.indexrelid::regclass FROM pg_index x
               WHERE x.indrelid IN (chunk.rel, chunk.compressed)
    LOOP
        EXECUTE format('ALTER INDEX %s SET TABLESPACE %I', idx, p_space);
    END LOOP;
    RETURN chunk.chunk_name;
END $$;

-- Native compression of the chunks whose range ended chunk_compress_hour ago: those not
-- compressed yet, and those that received rows since (partially compressed: status bit 8),
-- which compress_chunk merges.  Driven by kwollect.maintain() like the stock compaction (one
-- scheduler for every storage, no TimescaleDB background job): oldest first, for at most
-- p_budget.  Their ranges are marked compacted in kwollect.partitions, so that get_metrics
-- reads them in chunks of an hour, as compacted blocks: a compressed batch (up to 1,000
-- samples of a series) is then decompressed once or twice per request, instead of once per
-- minute it spans (measured: docs/performance.md).  Returns the rows compressed (the
-- chunks' uncompressed rows).
CREATE OR REPLACE FUNCTION kwollect.compress_chunks(p_budget interval) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    after   interval := make_interval(hours => coalesce(kwollect.setting('chunk_compress_hour'), '24')::int);
    started timestamptz := clock_timestamp();
    chunk   record;
    n       bigint;
    total   bigint := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('kwollect.compact_partitions')) THEN
        RETURN 0;
    END IF;
    FOR chunk IN
        SELECT format('%I.%I', c.chunk_schema, c.chunk_name)::regclass AS rel,
               c.range_start, c.range_end
        FROM timescaledb_information.chunks c
        JOIN _timescaledb_catalog.chunk cc
          ON cc.schema_name = c.chunk_schema AND cc.table_name = c.chunk_name
        WHERE c.hypertable_schema = 'kwollect' AND c.hypertable_name = 'samples'
          AND c.range_end <= now() - after
          AND (NOT c.is_compressed OR cc.status & 8 = 8)
        ORDER BY c.range_start
    LOOP
        EXIT WHEN clock_timestamp() - started > p_budget;
        EXECUTE format('SELECT count(*) FROM ONLY %s', chunk.rel) INTO n;
        PERFORM public.compress_chunk(chunk.rel, if_not_compressed => true);
        UPDATE kwollect.partitions SET compacted_at = now()
        WHERE range_start < chunk.range_end AND range_end > chunk.range_start;
        total := total + n;
    END LOOP;
    RETURN total;
END $$;

-- Retention on a hypertable (kwollect.apply_retention, sql/040): the chunks whose range
-- ended by p_before, oldest first, by their schema-qualified names.
CREATE OR REPLACE FUNCTION kwollect.chunks_before(p_before timestamptz)
RETURNS TABLE (name text, range_start timestamptz, range_end timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT format('%I.%I', c.chunk_schema, c.chunk_name), c.range_start, c.range_end
    FROM timescaledb_information.chunks c
    WHERE c.hypertable_schema = 'kwollect' AND c.hypertable_name = 'samples'
      AND c.range_end <= p_before
    ORDER BY c.range_start;
END $$;

-- Drop one chunk, compressed or not (its compressed chunk, TOAST and indexes go with it), by
-- TimescaleDB's drop_chunks on exactly its range; returns the samples it held.  count(*) of
-- a compressed chunk reads its batches' counts, not their data.  drop_chunks locks the chunk
-- and its compressed chunk, not the hypertable (pg_locks inside its transaction), so the
-- rest of the samples stay readable and writable meanwhile.  The ranges recorded in
-- kwollect.partitions up to the chunk's end go too: chunks are dropped in time order from
-- the oldest, so nothing is left before that end.
CREATE OR REPLACE FUNCTION kwollect.drop_chunk(p_name text, p_start timestamptz,
                                               p_end timestamptz) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM %s', p_name::regclass) INTO n;
    PERFORM public.drop_chunks('kwollect.samples', older_than => p_end, newer_than => p_start);
    DELETE FROM kwollect.partitions WHERE range_end <= p_end;
    RETURN n;
END $$;

-- Switching an existing database to the other storage (kwollect-setup-db --timescaledb
-- on|off --switch_storage; docs/storage.md).  In the one transaction of kwollect-setup-db:
-- switch_storage_begin() sets the old samples aside, the SQL files create the new storage's
-- (and rebind every view and function to it), and switch_storage_finish() copies every
-- sample, raw or compacted, into it and drops the old one.  A failure anywhere rolls all of
-- it back: the database keeps its old storage, nothing lost.
CREATE OR REPLACE FUNCTION kwollect.switch_storage_begin() RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    was text := kwollect.storage();
BEGIN
    ALTER TABLE kwollect.samples RENAME TO samples_switching;
    ALTER INDEX kwollect.samples_series_minute_idx RENAME TO samples_switching_idx;
    ALTER TABLE kwollect_partitions.samples_default RENAME TO samples_default_switching;
    DELETE FROM kwollect.partitions;
    RETURN was;
END $$;

CREATE OR REPLACE FUNCTION kwollect.switch_storage_finish() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    step  interval := make_interval(hours => kwollect.setting('chunk_interval_hour')::int);
    n     bigint;
    stray boolean := NOT (SELECT relispartition FROM pg_class
                          WHERE oid = 'kwollect_partitions.samples_default_switching'::regclass);
BEGIN
    IF kwollect.storage() = 'stock' THEN  -- partitions first: nothing lands in the default
        PERFORM kwollect.ensure_partitions(array_agg(DISTINCT date_bin(step, ts, timestamptz '1970-01-01 00:00:00+00')))
        FROM (SELECT ts FROM kwollect.samples_switching
              UNION ALL SELECT block_start FROM kwollect.samples_compact) x;
    END IF;
    INSERT INTO kwollect.samples (ts, value, series_id)
    SELECT ts, value, series_id FROM kwollect.samples_switching
    UNION ALL
    SELECT d.ts, d.value, c.series_id
    FROM kwollect.samples_compact c CROSS JOIN LATERAL kwollect.block_samples(c) d;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF stray THEN  -- a hypertable's stand-in default partition (always empty)
        INSERT INTO kwollect.samples (ts, value, series_id)
        SELECT ts, value, series_id FROM kwollect_partitions.samples_default_switching;
        DROP TABLE kwollect_partitions.samples_default_switching;
    END IF;
    TRUNCATE kwollect.samples_compact;
    DROP TABLE kwollect.samples_switching;
    IF kwollect.storage() = 'timescaledb' THEN
        PERFORM kwollect.record_chunks();
    END IF;
    RETURN n;
END $$;
