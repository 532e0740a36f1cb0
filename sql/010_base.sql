-- kwollect schema, part 1: schemas and the settings every later file reads.
-- Every file in sql/ is idempotent and applied in name order by kwollect-setup-db, as the
-- owner role.  Role names are never written in these files: they are read from
-- kwollect.settings, which kwollect-setup-db fills with bound parameters.

CREATE SCHEMA IF NOT EXISTS kwollect;
CREATE SCHEMA IF NOT EXISTS kwollect_partitions;
CREATE SCHEMA IF NOT EXISTS api;

CREATE TABLE IF NOT EXISTS kwollect.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Defaults; kwollect-setup-db overwrites the ones given on its command line.
INSERT INTO kwollect.settings (key, value) VALUES
    ('chunk_interval_hour', '6'),
    ('max_rows', '20000000'),
    ('job_energy_metric', 'bmc_node_power_watt'),
    ('summary_lag_seconds', '60'),
    ('partitions_ahead', '2'),
    ('archive_tablespace', ''),
    ('archive_after_hour', '192'),
    ('retention_days', '0'),
    ('min_timestamp', '1970-01-01 00:00:00+00'),
    ('max_timestamp', '2100-01-01 00:00:00+00')
ON CONFLICT (key) DO NOTHING;

-- Settings come from the table only, never from a session variable: SECURITY DEFINER
-- maintenance runs as the owner, and a caller's `SET kwollect.partitions_ahead = 400`
-- (or summary_lag_seconds, chunk_interval_hour, archive_tablespace) must not steer it.
-- The one per-request override, kwollect.max_rows, is read by check_row_bound itself.
CREATE OR REPLACE FUNCTION kwollect.setting(p_key text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT value FROM kwollect.settings WHERE key = p_key
$$;
COMMENT ON FUNCTION kwollect.setting(text) IS
    'A setting from kwollect.settings (session variables kwollect.<key> are ignored).';

-- Sample timestamps are stored from min_timestamp (inclusive, default 1970-01-01 UTC) to
-- max_timestamp (exclusive, default 2100-01-01 UTC).  A timestamp outside is a broken
-- clock or a typo (a BC date, year 20260): it is refused with this message instead of
-- creating a partition for it.
CREATE OR REPLACE FUNCTION kwollect.timestamp_in_range(p_ts timestamptz) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT p_ts >= kwollect.setting('min_timestamp')::timestamptz
       AND p_ts < kwollect.setting('max_timestamp')::timestamptz
$$;

CREATE OR REPLACE FUNCTION kwollect.check_timestamps(p_ts timestamptz[]) RETURNS void
LANGUAGE plpgsql STABLE
SET timezone = 'UTC' AS $$
DECLARE
    bad timestamptz;
BEGIN
    SELECT t INTO bad FROM unnest(p_ts) t WHERE NOT kwollect.timestamp_in_range(t) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'timestamp % is out of range', bad
            USING ERRCODE = 'datetime_field_overflow',
                  HINT = format('kwollect stores samples from %s (inclusive) to %s (exclusive), '
                                'UTC (settings min_timestamp and max_timestamp).',
                                kwollect.setting('min_timestamp')::timestamptz,
                                kwollect.setting('max_timestamp')::timestamptz);
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS kwollect.schema_version (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Raise an error from a SQL expression (SQL functions cannot RAISE themselves).
CREATE OR REPLACE FUNCTION kwollect.fail(p_message text, p_hint text DEFAULT NULL,
                                         p_errcode text DEFAULT '22023')
RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = p_message, HINT = coalesce(p_hint, ''), ERRCODE = p_errcode;
END $$;

-- Division with IEEE 754 rounding where PostgreSQL's float8 operator raises "value out of
-- range" instead: a quotient below half the smallest subnormal (5e-324 / 5) is a zero, one
-- above the largest double (1e308 / 1e-6) an infinity, of the quotient's sign.  Callers
-- (kwollect.counter_rate) take the plain operator for the usual operands (|a| in [1e-290,
-- 1e290] or 0, non-finite, |b| in [1e-15, 1e15]); only the others reach this exception block.
CREATE OR REPLACE FUNCTION kwollect.float8_div_rounded(a double precision, b double precision)
RETURNS double precision LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN a / b;
EXCEPTION WHEN numeric_value_out_of_range THEN
    RETURN CASE WHEN abs(a) > abs(b) THEN 'Infinity'::double precision ELSE 0 END
           * CASE WHEN (a < 0) <> (b < 0) THEN -1 ELSE 1 END;
END $$;

-- float8_div, the front of float8_div_rounded that kwollect.mean_of (040) used, is gone:
-- mean_of tests its one failing case itself, without an exception block (Citus).
DROP FUNCTION IF EXISTS kwollect.float8_div(double precision, double precision);

-- Addition likewise: a sum beyond the largest double is an infinity (1e308 + 1e308).
CREATE OR REPLACE FUNCTION kwollect.float8_add_rounded(a double precision, b double precision)
RETURNS double precision LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN a + b;
EXCEPTION WHEN numeric_value_out_of_range THEN
    RETURN CASE WHEN a < 0 THEN '-Infinity'::double precision ELSE 'Infinity' END;
END $$;

-- Citus (kwollect-setup-db --citus, setting citus = on): each table that grows with the
-- samples is distributed as soon as it is created, by series_id and co-located with
-- kwollect.samples ('reference': copied to every node; 'coordinator': kept on the
-- coordinator, known to Citus so that views may join it with distributed tables), before
-- any view or function uses its row type (Citus cannot distribute a table that such
-- objects already depend on).
-- Without Citus it does nothing.  A new table that grows with the samples (keyed by
-- series_id) calls it right after its CREATE TABLE and indexes.
CREATE OR REPLACE FUNCTION kwollect.distribute(p_table regclass, p_column text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    done boolean;
BEGIN
    IF coalesce(kwollect.setting('citus'), 'off') <> 'on' THEN
        RETURN;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = $1)'
        INTO done USING p_table;
    IF done THEN
        RETURN;
    ELSIF p_column = 'reference' THEN
        EXECUTE 'SELECT create_reference_table($1)' USING p_table;
    ELSIF p_column = 'coordinator' THEN
        EXECUTE 'SELECT citus_add_local_table_to_metadata($1)' USING p_table;
    ELSE
        EXECUTE format('SELECT create_distributed_table($1, %L, colocate_with => %L%s)',
                       p_column,
                       CASE WHEN p_table = 'kwollect.samples'::regclass THEN 'none'
                            ELSE 'kwollect.samples' END,
                       CASE WHEN p_table = 'kwollect.samples'::regclass
                            THEN format(', shard_count => %s',
                                        coalesce(kwollect.setting('citus_shard_count'), '32')::int)
                            ELSE '' END)
            USING p_table;
    END IF;
END $$;
