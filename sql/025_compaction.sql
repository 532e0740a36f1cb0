-- kwollect schema, part 2b: compaction of old partitions on stock PostgreSQL (SQL only).
--
-- Once a partition's range ended chunk_compress_hour ago, kwollect.maintain() moves its rows
-- into kwollect.samples_compact: one row per series and hour ("block"), the samples encoded
-- as small integers in arrays that TOAST compresses with lz4.  Design, measured on the
-- issue's data set (docs/storage.md): 2.96 bytes per sample against 64 raw and 9.4 for
-- bigint[]/float8[] arrays under lz4.
--
-- Timestamps: with u the largest of 1 s, 1 ms, 1 us dividing every offset from the block's
-- first timestamp t0, and p the median step (in u), sample i (from 1) is at
--     t0 + ((i - 1 + gap_i) * p + jit_i) * u
-- gap_i counts the missing (or extra) grid steps before sample i: constant for a regular
-- series, so lz4 reduces it to nothing; jit_i is the jitter around the grid (0-19 ms fits a
-- byte).  Values: when every value v of the block is finite and v * div (div = 1, 10, 100
-- or 1000) is an integer x that gives v back bit for bit (so -0.0 is excluded), x is stored
-- as its residual from the straight line between the first and the last x; otherwise the
-- block keeps its float8 values as they are (NaN, infinities, -0.0, NULL).  Each integer
-- stream is stored in the narrowest of "char", int2, int4, int8 that holds it.
--
-- Compaction of a partition is one transaction (atomic: a crash leaves either the raw rows
-- or the blocks), locks out writers of that partition only, and readers see the raw rows or
-- the blocks, never both.  Late rows written into a compacted range land in the (emptied)
-- raw partition, are read from there, and the next maintenance merges them into the blocks.

-- An integer sequence in the narrowest array type that holds it (exactly one field is set).
DO $$
BEGIN
    IF to_regtype('kwollect.int_stream') IS NULL THEN
        CREATE TYPE kwollect.int_stream AS (c "char"[], s smallint[], i integer[], l bigint[]);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION kwollect.pack_ints(p bigint[], lo bigint, hi bigint)
RETURNS kwollect.int_stream LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN lo >= -128 AND hi <= 127
                THEN ROW(p::integer[]::"char"[], NULL, NULL, NULL)::kwollect.int_stream
                WHEN lo >= -32768 AND hi <= 32767
                THEN ROW(NULL, p::smallint[], NULL, NULL)::kwollect.int_stream
                WHEN lo >= -2147483648 AND hi <= 2147483647
                THEN ROW(NULL, NULL, p::integer[], NULL)::kwollect.int_stream
                ELSE ROW(NULL, NULL, NULL, p)::kwollect.int_stream END
$$;

-- (Streams were widened to bigint[] by kwollect.unpack_ints before block_decode read
-- each stored field as it is.)
DROP FUNCTION IF EXISTS kwollect.unpack_ints(kwollect.int_stream);

-- The blocks are range-partitioned on block_start, on the bounds of the raw partitions
-- (kwollect.compact_partition creates kwollect_partitions.compact_<start> beside
-- samples_<start>), so that old blocks move to the archive tablespace and are dropped by the
-- retention with their raw partition.  A database made before that had one table: it is set
-- aside here, and its blocks move into the partitions at the end of this file.
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('kwollect.samples_compact')) = 'r' THEN
        ALTER TABLE kwollect.samples_compact RENAME TO samples_compact_unpartitioned;
        ALTER INDEX kwollect.samples_compact_series_block_idx RENAME TO samples_compact_unpartitioned_idx1;
        ALTER INDEX kwollect.samples_compact_block_idx RENAME TO samples_compact_unpartitioned_idx2;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS kwollect.samples_compact (
    series_id   integer NOT NULL,
    block_start timestamptz NOT NULL,   -- the hour the block covers
    n           integer NOT NULL,
    t0          timestamptz NOT NULL,
    t_unit      bigint NOT NULL,
    t_period    bigint NOT NULL,
    t_gap       kwollect.int_stream NOT NULL,
    t_jit       kwollect.int_stream NOT NULL,
    v_div       double precision,
    v_first     bigint,
    v_last      bigint,
    v_off       kwollect.int_stream,
    v_raw       double precision[]
) PARTITION BY RANGE (block_start);
CREATE INDEX IF NOT EXISTS samples_compact_series_block_idx
    ON kwollect.samples_compact (series_id, block_start);
CREATE INDEX IF NOT EXISTS samples_compact_block_idx ON kwollect.samples_compact (block_start);
-- (Once: Citus would send this whole file to the workers to alter a distributed table.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'kwollect.samples_compact'::regclass
                 AND attname IN ('t_gap', 't_jit', 'v_off', 'v_raw') AND attcompression <> 'l') THEN
        ALTER TABLE kwollect.samples_compact
            ALTER COLUMN t_gap SET COMPRESSION lz4, ALTER COLUMN t_jit SET COMPRESSION lz4,
            ALTER COLUMN v_off SET COMPRESSION lz4, ALTER COLUMN v_raw SET COMPRESSION lz4;
    END IF;
END $$;
SELECT kwollect.distribute('kwollect.samples_compact', 'series_id');
-- Blocks of a range without its partition (none is written there; a safety net).
CREATE TABLE IF NOT EXISTS kwollect_partitions.samples_compact_default
    PARTITION OF kwollect.samples_compact DEFAULT;

ALTER TABLE kwollect.partitions ADD COLUMN IF NOT EXISTS compacted_at timestamptz;

-- The samples of one block, in time order (ties in their stored order), from its columns.
-- The streams are unnested in the select list (one ProjectSet, in lockstep, a missing
-- stream read as NULLs) rather than by ROWS FROM, which stores each stream in a tuplestore
-- first: measured 0.64 s against 1.6 s for the streams of 1.44 M samples.  Each field of
-- a stream is unnested as it is stored (the three empty ones cost nothing) and widened per
-- sample, rather than cast array to array first (array_map per element).  OFFSET 0 keeps
-- the decoded timestamp a column: without it, a caller's time bounds were pushed into the
-- body and the timestamp expression computed once per bound and once more for the output.
-- Callers pass the columns, not the block row (block_samples): from a whole-row variable
-- every parameter became a field selection per sample (walking the row's variable-width
-- columns).  Both together: server CPU of get_metrics over 1.44 M compacted samples 1.31-1.38
-- us per row against 1.50-1.60 (docs/performance.md).
CREATE OR REPLACE FUNCTION kwollect.block_decode(
    p_n integer, p_t0 timestamptz, p_unit bigint, p_period bigint,
    p_gap kwollect.int_stream, p_jit kwollect.int_stream, p_div double precision,
    p_first bigint, p_last bigint, p_off kwollect.int_stream, p_raw double precision[])
RETURNS TABLE (ts timestamptz, value double precision)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_t0 + ((u.i - 1 + coalesce(u.gc::integer, u.gs, u.gi, u.gl)) * p_period
                   + coalesce(u.rc::integer, u.rs, u.ri, u.rl)) * p_unit * interval '1 microsecond',
           coalesce(u.raw, (p_first + coalesce(u.oc::integer, u.os, u.oi, u.ol)
                            + round((u.i - 1)::double precision * (p_last - p_first)
                                    / greatest(p_n - 1, 1))::bigint)::double precision / p_div)
    FROM (SELECT unnest((p_gap).c) AS gc, unnest((p_gap).s) AS gs, unnest((p_gap).i) AS gi,
                 unnest((p_gap).l) AS gl,
                 unnest((p_jit).c) AS rc, unnest((p_jit).s) AS rs, unnest((p_jit).i) AS ri,
                 unnest((p_jit).l) AS rl,
                 unnest((p_off).c) AS oc, unnest((p_off).s) AS os, unnest((p_off).i) AS oi,
                 unnest((p_off).l) AS ol,
                 unnest(p_raw) AS raw,
                 generate_series(1::bigint, p_n) AS i) u
    OFFSET 0
$$;

-- The same, from a block row.  Views call block_decode with the columns: on Citus, a view
-- over the distributed blocks that passed their row to a function of their row type would
-- be a dependency cycle Citus 13 refuses.
CREATE OR REPLACE FUNCTION kwollect.block_samples(c kwollect.samples_compact)
RETURNS TABLE (ts timestamptz, value double precision)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT * FROM kwollect.block_decode(c.n, c.t0, c.t_unit, c.t_period, c.t_gap, c.t_jit,
                                        c.v_div, c.v_first, c.v_last, c.v_off, c.v_raw)
$$;

-- Every sample, raw or compacted (no time bound reaches the blocks: readers with a time
-- window use kwollect.samples_between).
CREATE OR REPLACE VIEW kwollect.samples_all AS
SELECT s.ts, s.value, s.series_id FROM kwollect.samples s
UNION ALL
SELECT d.ts, d.value, c.series_id
FROM kwollect.samples_compact c
CROSS JOIN LATERAL kwollect.block_decode(c.n, c.t0, c.t_unit, c.t_period, c.t_gap, c.t_jit,
                                         c.v_div, c.v_first, c.v_last, c.v_off, c.v_raw) d;

-- Every sample in [p_lo, p_hi), raw or compacted, of the series p_series (all when NULL).
CREATE OR REPLACE FUNCTION kwollect.samples_between(p_lo timestamptz, p_hi timestamptz,
                                                    p_series integer[] DEFAULT NULL)
RETURNS TABLE (ts timestamptz, value double precision, series_id integer)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT s.ts, s.value, s.series_id FROM kwollect.samples s
    WHERE s.ts >= p_lo AND s.ts < p_hi
      AND (p_series IS NULL OR s.series_id = ANY (p_series))
    UNION ALL
    SELECT d.ts, d.value, c.series_id
    FROM kwollect.samples_compact c
    CROSS JOIN LATERAL kwollect.block_decode(c.n, c.t0, c.t_unit, c.t_period, c.t_gap, c.t_jit,
                                             c.v_div, c.v_first, c.v_last, c.v_off, c.v_raw) d
    WHERE c.block_start > p_lo - interval '1 hour' AND c.block_start < p_hi
      AND (p_series IS NULL OR c.series_id = ANY (p_series))
      AND d.ts >= p_lo AND d.ts < p_hi
$$;

-- Encode rows (ts, value, series_id) into blocks: one row of samples_compact per series
-- and hour.  Set-wise: one window pass numbers the samples of each block, one aggregate
-- gathers them, and each block's streams are packed from its arrays.
CREATE OR REPLACE FUNCTION kwollect.encode_blocks(p_rows regclass) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format($q$
    INSERT INTO kwollect.samples_compact
    WITH r AS (
        SELECT series_id, block, ts, value, row_number() OVER w AS i,
               round(date_part('epoch', ts - first_value(ts) OVER w) * 1000000)::bigint AS us
        FROM (SELECT series_id, date_bin('1 hour', ts, timestamptz '1970-01-01 00:00:00+00') AS block,
                     ts, value FROM %s) x
        WINDOW w AS (PARTITION BY series_id, block ORDER BY ts)
    ), d AS (
        SELECT r.*, us - lag(us) OVER (PARTITION BY series_id, block ORDER BY i) AS step FROM r
    ), g AS (
        SELECT series_id, block, count(*)::integer AS n, min(ts) AS t0,
               CASE WHEN bool_and(us %% 1000000 = 0) THEN 1000000
                    WHEN bool_and(us %% 1000 = 0) THEN 1000 ELSE 1 END AS unit,
               percentile_disc(0.5) WITHIN GROUP (ORDER BY step) AS median_step,
               array_agg(us ORDER BY i) AS us, array_agg(value ORDER BY i) AS vals,
               CASE WHEN bool_and(value IS NOT NULL AND value <> 'NaN' AND abs(value) < 4.5e15
                                  AND (value <> 0 OR float8send(value) = '\x0000000000000000'))
               THEN CASE WHEN bool_and(round(value) = value) THEN 1::double precision
                         WHEN bool_and(abs(value) < 4.5e14 AND round(value * 10) / 10 = value) THEN 10
                         WHEN bool_and(abs(value) < 4.5e13 AND round(value * 100) / 100 = value) THEN 100
                         WHEN bool_and(abs(value) < 4.5e12 AND round(value * 1000) / 1000 = value) THEN 1000
                    END
               END AS div
        FROM d GROUP BY series_id, block
    ), t AS (
        SELECT g.*, greatest(coalesce(g.median_step / g.unit, 1), 1) AS p,
               round(g.vals[1] * g.div)::bigint AS x1, round(g.vals[g.n] * g.div)::bigint AS xn
        FROM g
    )
    SELECT t.series_id, t.block, t.n, t.t0, t.unit, t.p,
           (SELECT kwollect.pack_ints(array_agg(q.gap ORDER BY q.i), min(q.gap), max(q.gap))
            FROM (SELECT u.i, (u.k / t.unit + t.p / 2) / t.p - (u.i - 1) AS gap
                  FROM unnest(t.us) WITH ORDINALITY AS u(k, i)) q),
           (SELECT kwollect.pack_ints(array_agg(q.jit ORDER BY q.i), min(q.jit), max(q.jit))
            FROM (SELECT u.i, u.k / t.unit - ((u.k / t.unit + t.p / 2) / t.p) * t.p AS jit
                  FROM unnest(t.us) WITH ORDINALITY AS u(k, i)) q),
           t.div, t.x1, t.xn,
           CASE WHEN t.div IS NOT NULL THEN
               (SELECT kwollect.pack_ints(array_agg(q.o ORDER BY q.i), min(q.o), max(q.o))
                FROM (SELECT u.i, round(u.v * t.div)::bigint
                                  - (t.x1 + round((u.i - 1)::double precision * (t.xn - t.x1)
                                                  / greatest(t.n - 1, 1))::bigint) AS o
                      FROM unnest(t.vals) WITH ORDINALITY AS u(v, i)) q)
           END,
           CASE WHEN t.div IS NULL THEN t.vals END
    FROM t
    $q$, p_rows);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- The partition of samples_compact beside the raw partition p_name (same bounds; named
-- compact_<start>), created when missing in the raw partition's tablespace, with the blocks
-- of its range the default partition held.  Returns its name.
CREATE OR REPLACE FUNCTION kwollect.ensure_compact_partition(p_name text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    part  text := kwollect.compact_partition_name(p_name);
    lo    timestamptz;
    hi    timestamptz;
    space text;
BEGIN
    IF to_regclass(format('kwollect_partitions.%I', part)) IS NOT NULL THEN
        RETURN part;
    END IF;
    SELECT range_start, range_end INTO lo, hi FROM kwollect.partitions WHERE name = p_name;
    SELECT t.spcname INTO space FROM pg_class c JOIN pg_tablespace t ON t.oid = c.reltablespace
    WHERE c.oid = to_regclass(format('kwollect_partitions.%I', p_name));
    EXECUTE format('CREATE TABLE kwollect_partitions.%I (LIKE kwollect.samples_compact '
                   'INCLUDING DEFAULTS INCLUDING COMPRESSION) %s', part,
                   CASE WHEN space IS NULL THEN '' ELSE format('TABLESPACE %I', space) END);
    EXECUTE format('WITH moved AS (DELETE FROM kwollect_partitions.samples_compact_default
                                   WHERE block_start >= $1 AND block_start < $2 RETURNING *)
                    INSERT INTO kwollect_partitions.%I SELECT * FROM moved', part)
        USING lo, hi;
    EXECUTE format('ALTER TABLE kwollect.samples_compact ATTACH PARTITION kwollect_partitions.%I
                    FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    RETURN part;
END $$;

-- Compact one partition: its raw rows, merged with the blocks they fall into (late rows
-- after an earlier compaction), become blocks.  One transaction; returns the rows encoded.
CREATE OR REPLACE FUNCTION kwollect.compact_partition(p_name text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lo timestamptz;
    hi timestamptz;
    n  bigint;
BEGIN
    SELECT range_start, range_end INTO lo, hi FROM kwollect.partitions WHERE name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'compact_partition: no partition named %', p_name;
    END IF;
    -- Writers of this partition wait until the end; readers go on (they see the raw rows
    -- until this transaction commits, then the blocks).
    EXECUTE format('LOCK TABLE kwollect_partitions.%I IN SHARE ROW EXCLUSIVE MODE', p_name);
    PERFORM kwollect.ensure_compact_partition(p_name);
    DROP TABLE IF EXISTS pg_temp.kwollect_compacting;
    CREATE TEMPORARY TABLE kwollect_compacting (
        ts timestamptz, value double precision, series_id integer) ON COMMIT DROP;
    EXECUTE format('WITH moved AS (DELETE FROM kwollect_partitions.%I
                                   RETURNING ts, value, series_id)
                    INSERT INTO pg_temp.kwollect_compacting SELECT * FROM moved', p_name);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        WITH touched AS (
            SELECT DISTINCT series_id,
                   date_bin('1 hour', ts, timestamptz '1970-01-01 00:00:00+00') AS block
            FROM pg_temp.kwollect_compacting
        ), old AS (
            DELETE FROM kwollect.samples_compact c USING touched t
            WHERE c.series_id = t.series_id AND c.block_start = t.block
              AND c.block_start >= lo AND c.block_start < hi
            RETURNING c.*
        )
        INSERT INTO pg_temp.kwollect_compacting (ts, value, series_id)
        SELECT d.ts, d.value, old.series_id
        FROM old CROSS JOIN LATERAL kwollect.block_samples(ROW(old.*)::kwollect.samples_compact) d;
        PERFORM kwollect.encode_blocks('pg_temp.kwollect_compacting');
    END IF;
    UPDATE kwollect.partitions SET compacted_at = now() WHERE name = p_name;
    DROP TABLE pg_temp.kwollect_compacting;
    RETURN n;
END $$;

-- Partitions due: their range ended chunk_compress_hour ago, and they were never
-- compacted or received rows since.  Compacts them oldest first for at most p_budget.
-- On a TimescaleDB hypertable, its native compression of the chunks due instead (022).
CREATE OR REPLACE FUNCTION kwollect.compact_partitions(p_budget interval DEFAULT '30 seconds')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    after   interval := make_interval(hours => coalesce(kwollect.setting('chunk_compress_hour'), '24')::int);
    started timestamptz := clock_timestamp();
    part    record;
    has_raw boolean;
    total   bigint := 0;
BEGIN
    IF kwollect.storage() = 'timescaledb' THEN
        RETURN kwollect.compress_chunks(p_budget);
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('kwollect.compact_partitions')) THEN
        RETURN 0;
    END IF;
    FOR part IN SELECT name, compacted_at FROM kwollect.partitions
                WHERE range_end <= now() - after ORDER BY range_start
    LOOP
        EXIT WHEN clock_timestamp() - started > p_budget;
        IF part.compacted_at IS NOT NULL THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM kwollect_partitions.%I)', part.name)
               INTO has_raw;
            CONTINUE WHEN NOT has_raw;
        END IF;
        total := total + kwollect.compact_partition(part.name);
    END LOOP;
    RETURN total;
END $$;

-- Give the space of compacted partitions back: their raw rows were deleted (readers went on
-- meanwhile), but the heap and the index keep their size until VACUUM, and the index keeps
-- it for good.  An empty compacted partition is truncated, when its lock is free at once
-- (NOWAIT: a reader in the way only postpones it to the next maintenance).  Called last by
-- kwollect.maintain(), so the exclusive lock lasts only until that commits.
CREATE OR REPLACE FUNCTION kwollect.release_compacted() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    part    text;
    has_raw boolean;
    n       integer := 0;
BEGIN
    FOR part IN SELECT p.name FROM kwollect.partitions p
                WHERE p.compacted_at IS NOT NULL
                  AND pg_total_relation_size(
                          to_regclass(format('kwollect_partitions.%I', p.name))) > 16384
                ORDER BY p.range_start
    LOOP
        BEGIN
            EXECUTE format('LOCK TABLE kwollect_partitions.%I IN ACCESS EXCLUSIVE MODE NOWAIT',
                           part);
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM kwollect_partitions.%I)', part)
               INTO has_raw;
            IF NOT has_raw THEN
                EXECUTE format('TRUNCATE kwollect_partitions.%I', part);
                n := n + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
    RETURN n;
END $$;

-- The blocks of a database made before samples_compact was partitioned, into its partitions.
DO $$
BEGIN
    IF to_regclass('kwollect.samples_compact_unpartitioned') IS NOT NULL THEN
        INSERT INTO kwollect.samples_compact SELECT * FROM kwollect.samples_compact_unpartitioned;
        PERFORM kwollect.ensure_compact_partition(p.name) FROM kwollect.partitions p
        WHERE p.compacted_at IS NOT NULL ORDER BY p.range_start;
        DROP FUNCTION kwollect.block_samples(kwollect.samples_compact_unpartitioned);
        DROP TABLE kwollect.samples_compact_unpartitioned;
    END IF;
END $$;
