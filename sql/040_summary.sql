-- kwollect schema, part 4: 5-minute summaries, maintained incrementally.
--
-- kwollect.summary keeps count, avg, min, max and last of the numeric (non-NaN) values of
-- each series and 5-minute bucket, and nan_count, the number of NaN or NULL samples.
-- kwollect.refresh_summary() computes each bucket once, when it is at least
-- summary_lag_seconds old, plus the buckets that late rows touched
-- (kwollect.summary_dirty).  It is called by kwollect.maintain(), which `kwollect maintain`
-- runs every minute (systemd/kwollect-maintain.timer), so summaries are at most
-- 5 min + lag + 1 min behind.
--
-- kwollect.summary_1h (the 1-hour rollup, for ranges of months) is built from the 5-minute
-- summary by kwollect.refresh_rollup(): each hour once the 5-minute summary covers it, and
-- again the hours whose 5-minute buckets late rows made the summary recompute
-- (kwollect.rollup_dirty), never wholesale.

CREATE TABLE IF NOT EXISTS kwollect.summary (
    series_id integer NOT NULL,
    bucket    timestamptz NOT NULL,
    count     integer NOT NULL,
    nan_count integer NOT NULL,
    avg       double precision,
    min       double precision,
    max       double precision,
    last      double precision,
    PRIMARY KEY (series_id, bucket)
);
CREATE INDEX IF NOT EXISTS summary_bucket_idx ON kwollect.summary (bucket);
SELECT kwollect.distribute('kwollect.summary', 'series_id');

CREATE TABLE IF NOT EXISTS kwollect.summary_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    watermark timestamptz
);
INSERT INTO kwollect.summary_state (singleton, watermark) VALUES (true, NULL)
ON CONFLICT DO NOTHING;

-- The 1-hour rollup: the same statistics per series and hour, from the 5-minute rows (avg
-- weighted by their counts).  rollup_watermark: hours before it are rolled up.
CREATE TABLE IF NOT EXISTS kwollect.summary_1h (
    series_id integer NOT NULL,
    bucket    timestamptz NOT NULL,
    count     bigint NOT NULL,
    nan_count bigint NOT NULL,
    avg       double precision,
    min       double precision,
    max       double precision,
    last      double precision,
    PRIMARY KEY (series_id, bucket)
);
CREATE INDEX IF NOT EXISTS summary_1h_bucket_idx ON kwollect.summary_1h (bucket);
-- Not distributed on Citus (12 times smaller than the summary): distributed, get_metrics'
-- per-series lateral read of both levels "cannot push down this subquery".
ALTER TABLE kwollect.summary_state ADD COLUMN IF NOT EXISTS rollup_watermark timestamptz;

-- Retention (kwollect-setup-db --retention_days N, setting retention_days): raw samples
-- before raw_dropped_before were dropped, their summaries and rollups kept; rows_dropped
-- counts the samples dropped so far.
CREATE TABLE IF NOT EXISTS kwollect.retention (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    raw_dropped_before timestamptz,
    rows_dropped       bigint NOT NULL DEFAULT 0
);
INSERT INTO kwollect.retention (singleton) VALUES (true) ON CONFLICT DO NOTHING;

-- Ranges of 5-minute buckets that refresh_summary recomputed below the rollup watermark.
CREATE TABLE IF NOT EXISTS kwollect.rollup_dirty (
    lo timestamptz NOT NULL,
    hi timestamptz NOT NULL
);

CREATE OR REPLACE FUNCTION kwollect.bucket_of(p_ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT date_bin('5 minutes', p_ts, timestamptz '1970-01-01 00:00:00+00')
$$;

-- A mean that never fails: p_small is the float8 sum of the terms of magnitude below 1e280
-- (it cannot overflow: fewer than 1e18 of them), p_big the numeric sum of the others
-- (1e308-like values, infinities, NaN averages), exact through float8's shortest text
-- (a plain cast to numeric keeps 15 digits and turns 1.7976931348623157e308 into a number
-- beyond float8); p_n the number of terms.  A quotient below the smallest double is 0.
-- Measured: avg() of float8 failed with "value out of range" on values near 1e160 (its
-- sum of squares overflows) and on subnormal quotients, stopping every summary.
-- p_small / p_n cannot overflow (p_n >= 1) and fails only where IEEE rounds it to a zero,
-- that is where |p_small| / p_n <= 2^-1075, half the smallest double: 2 |p_small| <=
-- p_n * 2^-1074, both sides exact (counts below 2^53), is tested first, without the
-- exception block of kwollect.float8_div_rounded: on Citus, entering one while the
-- summary's INSERT ... SELECT streamed to the workers failed with "another command is
-- already in progress".
CREATE OR REPLACE FUNCTION kwollect.mean_of(p_small double precision, p_big numeric,
                                            p_n numeric)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_n IS NULL OR p_n = 0 THEN NULL
                WHEN p_big IS NULL AND p_small <> 0
                     AND 2 * abs(p_small) <= p_n::double precision * 5e-324 THEN
                    CASE WHEN p_small < 0 THEN '-0'::double precision ELSE 0 END
                WHEN p_big IS NULL THEN p_small / p_n::double precision
                ELSE (SELECT CASE WHEN abs(q) < 1e-300 THEN 0 ELSE q::double precision END
                      FROM (SELECT (coalesce(p_small, 0)::text::numeric + p_big) / p_n AS q) x)
           END
$$;

-- Recompute the summary of [p_lo, p_hi) (bucket-aligned bounds).
DROP FUNCTION IF EXISTS kwollect.summary_rows(timestamptz, timestamptz, boolean);
CREATE OR REPLACE FUNCTION kwollect.summarize_range(p_lo timestamptz, p_hi timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM kwollect.summary WHERE bucket >= p_lo AND bucket < p_hi;
    INSERT INTO kwollect.summary (series_id, bucket, count, nan_count, avg, min, max, last)
    SELECT series_id, kwollect.bucket_of(ts),
           count(value) FILTER (WHERE value <> 'NaN'),
           count(*) FILTER (WHERE value IS NULL OR value = 'NaN'),
           kwollect.mean_of(sum(value) FILTER (WHERE abs(value) < 1e280),
                            sum(value::text::numeric) FILTER (WHERE value <> 'NaN'
                                                                AND NOT abs(value) < 1e280),
                            count(value) FILTER (WHERE value <> 'NaN')),
           min(value) FILTER (WHERE value <> 'NaN'),
           max(value) FILTER (WHERE value <> 'NaN'),
           (max(ARRAY[date_part('epoch', ts), value]) FILTER (WHERE value <> 'NaN'))[2]
    FROM kwollect.samples_between(p_lo, p_hi)
    GROUP BY 1, 2;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Where fresh summarizing starts or resumes: `p_from`, or when no sample lies between
-- p_from and the next partition, that partition's start (so years without data are skipped
-- at the cost of one catalogue lookup).  PL/pgSQL: Citus cannot plan a SQL function's
-- parameters in a query of a distributed table (the default partition).
CREATE OR REPLACE FUNCTION kwollect.next_data_start(p_from timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN CASE
        WHEN p_from IS NULL THEN
            kwollect.bucket_of(least((SELECT min(range_start) FROM kwollect.partitions),
                                     (SELECT min(ts) FROM kwollect_partitions.samples_default)))
        WHEN EXISTS (SELECT 1 FROM kwollect.partitions
                     WHERE range_start <= p_from AND range_end > p_from)
          OR EXISTS (SELECT 1 FROM kwollect_partitions.samples_default WHERE ts >= p_from) THEN
            p_from
        ELSE coalesce((SELECT min(range_start) FROM kwollect.partitions WHERE range_start > p_from),
                      p_from)
    END;
END $$;

-- Bring the summary up to date; returns the number of summary rows written.  Fresh data is
-- summarized a day at a time, for at most p_budget of wall-clock time per call.
CREATE OR REPLACE FUNCTION kwollect.refresh_summary(p_budget interval DEFAULT '30 seconds')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    target  timestamptz := kwollect.bucket_of(
                               now() - make_interval(secs => kwollect.setting('summary_lag_seconds')::int));
    started timestamptz := clock_timestamp();
    wm      timestamptz;
    upto    timestamptz;
    r       record;
    written bigint := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('kwollect.refresh_summary')) THEN
        RETURN 0;
    END IF;
    SELECT watermark INTO wm FROM kwollect.summary_state FOR UPDATE;
    -- Late rows first: ranges already summarized that received rows since.
    FOR r IN
        WITH dirty AS (
            DELETE FROM kwollect.summary_dirty RETURNING lo, hi
        ), wanted AS (
            -- not before the retention's horizon: recomputing from the raw rows left (late
            -- rows only) would overwrite the summaries of the dropped ones
            SELECT greatest(kwollect.bucket_of(lo),
                            (SELECT raw_dropped_before FROM kwollect.retention)) AS lo,
                   least(kwollect.bucket_of(hi) + interval '5 minutes', wm) AS hi
            FROM dirty WHERE lo < wm
        ), ordered AS (
            SELECT lo, hi, max(hi) OVER (ORDER BY lo, hi ROWS BETWEEN UNBOUNDED PRECEDING
                                                            AND 1 PRECEDING) AS prev_hi
            FROM wanted WHERE lo < hi
        ), grouped AS (
            SELECT lo, hi, count(*) FILTER (WHERE prev_hi IS NULL OR lo > prev_hi)
                                    OVER (ORDER BY lo, hi) AS grp
            FROM ordered
        )
        SELECT min(lo) AS lo, max(hi) AS hi FROM grouped GROUP BY grp ORDER BY 1
    LOOP
        written := written + kwollect.summarize_range(r.lo, r.hi);
        INSERT INTO kwollect.rollup_dirty (lo, hi) VALUES (r.lo, r.hi);
    END LOOP;
    -- Then fresh data, up to the buckets that are complete.
    LOOP
        wm := kwollect.next_data_start(wm);
        EXIT WHEN wm IS NULL OR wm >= target OR clock_timestamp() - started > p_budget;
        upto := least(target, wm + interval '1 day');
        written := written + kwollect.summarize_range(wm, upto);
        wm := upto;
        UPDATE kwollect.summary_state SET watermark = wm;
    END LOOP;
    RETURN written;
END $$;

-- Recompute the rollup of hours [p_lo, p_hi) from the 5-minute summary: avg is the mean
-- of the 5-minute averages weighted by their counts (kwollect.mean_of).
DROP FUNCTION IF EXISTS kwollect.rollup_rows(timestamptz, timestamptz, boolean);
CREATE OR REPLACE FUNCTION kwollect.rollup_range(p_lo timestamptz, p_hi timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM kwollect.summary_1h WHERE bucket >= p_lo AND bucket < p_hi;
    INSERT INTO kwollect.summary_1h (series_id, bucket, count, nan_count, avg, min, max, last)
    SELECT series_id, date_bin('1 hour', bucket, timestamptz '1970-01-01 00:00:00+00'),
           sum(count), sum(nan_count),
           kwollect.mean_of(sum(avg * count) FILTER (WHERE abs(avg) < 1e280),
                            sum(avg::text::numeric * count) FILTER (WHERE NOT abs(avg) < 1e280),
                            sum(count) FILTER (WHERE avg IS NOT NULL)),
           min(min), max(max),
           (max(ARRAY[date_part('epoch', bucket), last]) FILTER (WHERE last IS NOT NULL))[2]
    FROM kwollect.summary
    WHERE bucket >= p_lo AND bucket < p_hi
    GROUP BY 1, 2;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Bring the rollup up to the 5-minute summary's watermark (whole hours); returns the rows
-- written.  Dirty hours first, then fresh hours a day at a time, within p_budget; empty
-- stretches are skipped by one index look-up.
CREATE OR REPLACE FUNCTION kwollect.refresh_rollup(p_budget interval DEFAULT '30 seconds')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    epoch   constant timestamptz := '1970-01-01 00:00:00+00';
    started timestamptz := clock_timestamp();
    target  timestamptz;
    wm      timestamptz;
    upto    timestamptz;
    r       record;
    written bigint := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('kwollect.refresh_rollup')) THEN
        RETURN 0;
    END IF;
    SELECT date_bin('1 hour', watermark, epoch), rollup_watermark INTO target, wm
    FROM kwollect.summary_state FOR UPDATE;
    FOR r IN
        WITH dirty AS (
            DELETE FROM kwollect.rollup_dirty RETURNING lo, hi
        ), hours AS (
            SELECT DISTINCT h
            FROM dirty, generate_series(date_bin('1 hour', lo, epoch),
                                        least(hi - interval '1 microsecond', wm - interval '1 hour'),
                                        interval '1 hour') AS h
            WHERE lo < wm
        ), runs AS (
            SELECT h, h - interval '1 hour' * row_number() OVER (ORDER BY h) AS run FROM hours
        )
        SELECT min(h) AS lo, max(h) + interval '1 hour' AS hi FROM runs GROUP BY run ORDER BY 1
    LOOP
        written := written + kwollect.rollup_range(r.lo, r.hi);
    END LOOP;
    LOOP
        EXIT WHEN target IS NULL OR wm >= target OR clock_timestamp() - started > p_budget;
        IF wm IS NULL OR NOT EXISTS (SELECT 1 FROM kwollect.summary
                                     WHERE bucket >= wm AND bucket < wm + interval '1 day') THEN
            -- nothing in the next day: on to the hour of the next 5-minute row
            wm := least(target, coalesce(date_bin('1 hour', (SELECT min(bucket) FROM kwollect.summary
                                                             WHERE wm IS NULL OR bucket >= wm),
                                                  epoch),
                                         target));
        END IF;
        upto := least(target, wm + interval '1 day');
        written := written + kwollect.rollup_range(wm, upto);
        wm := upto;
        UPDATE kwollect.summary_state SET rollup_watermark = wm;
    END LOOP;
    RETURN written;
END $$;

-- Both levels of summaries in one relation, `level` '5min' or '1h': the views and
-- get_metrics select a level with a constant or a parameter, and the planner reads only
-- the table of that level.
CREATE OR REPLACE VIEW kwollect.summaries AS
SELECT '5min'::text AS level, series_id, bucket, count::bigint AS count,
       nan_count::bigint AS nan_count, avg, min, max, last
FROM kwollect.summary
UNION ALL
SELECT '1h', series_id, bucket, count, nan_count, avg, min, max, last
FROM kwollect.summary_1h;

-- All summary statistics, by series identity.
CREATE OR REPLACE VIEW public.metrics_summary AS
SELECT su.bucket AS "timestamp", se.device_id, se.metric_id, se.labels,
       su.count, su.avg, su.min, su.max, su.last
FROM kwollect.summary su
JOIN kwollect.series se ON se.series_id = su.series_id;

CREATE OR REPLACE VIEW public.metrics_summary_1h AS
SELECT su.bucket AS "timestamp", se.device_id, se.metric_id, se.labels,
       su.count, su.nan_count, su.avg, su.min, su.max, su.last
FROM kwollect.summary_1h su
JOIN kwollect.series se ON se.series_id = su.series_id;

-- The summary in the shape of metrics_by_device: value = avg, or max for counters
-- (metric ids ending in _total), as in the reference; NaN where a bucket had no number.
CREATE OR REPLACE FUNCTION kwollect.summary_value(p_metric_id text, p_avg double precision,
                                                  p_max double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(CASE WHEN p_metric_id LIKE '%\_total' THEN p_max ELSE p_avg END, 'NaN')
$$;

-- metrics_by_device's shape of either level (aliases summed, as metrics_by_device does).
CREATE OR REPLACE VIEW kwollect.summaries_by_device AS
SELECT su.level, su.bucket AS "timestamp", se.device_id, se.metric_id,
       kwollect.summary_value(se.metric_id, su.avg, su.max) AS value,
       se.labels - '_device_alias' AS labels
FROM kwollect.summaries su
JOIN kwollect.series se ON se.series_id = su.series_id
UNION ALL
SELECT su.level, su.bucket, se.device_alias, se.metric_id,
       sum(kwollect.summary_value(se.metric_id, su.avg, su.max)),
       (se.labels - '_device_alias')
           || jsonb_build_object('_device_orig', jsonb_agg(DISTINCT se.device_id))
FROM kwollect.summaries su
JOIN kwollect.series se ON se.series_id = su.series_id
WHERE se.device_alias IS NOT NULL
GROUP BY su.level, su.bucket, se.device_alias, se.metric_id, se.labels - '_device_alias';

CREATE OR REPLACE VIEW public.metrics_by_device_summary AS
SELECT "timestamp", device_id, metric_id, value, labels
FROM kwollect.summaries_by_device WHERE level = '5min';

CREATE OR REPLACE VIEW public.metrics_by_device_summary_1h AS
SELECT "timestamp", device_id, metric_id, value, labels
FROM kwollect.summaries_by_device WHERE level = '1h';

-- The bucket of a summary level ('5min' or '1h') that p_ts falls in: the first bucket that
-- overlaps a window starting at p_ts.  get_metrics' summaries (kwollect.summary_window)
-- and the metrics_by_job_summary views both start there, so a job's first, partial bucket
-- is in both (the reference's view and get_metrics both left it out: the job's first
-- minutes were in no summary row).
CREATE OR REPLACE FUNCTION kwollect.level_bucket(p_level text, p_ts timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_bin(CASE p_level WHEN '1h' THEN interval '1 hour' ELSE interval '5 minutes' END,
                    p_ts, timestamptz '1970-01-01 00:00:00+00')
$$;

-- get_metrics' rows of a summary level (5min or 1h) for the series of a plan (own series
-- and sources of aliases, with their rank maps, as kwollect.metrics_plan gives them):
-- the buckets that overlap [p_lo, p_hi] (from the one p_lo falls in), unsorted.  One index range scan per series (the
-- lateral join on the ids, kept by OFFSET 0): with the ids a run-time parameter, the
-- planner otherwise scanned
-- the bucket index of every series (72 ms instead of 5 for 200 series x 6 h, next to a
-- month of other summaries).
CREATE OR REPLACE FUNCTION kwollect.summary_window(
    p_own_ids integer[], p_own_base integer, p_own_ranks integer[],
    p_alias_ids integer[], p_alias_base integer, p_alias_ranks integer[],
    p_lo timestamptz, p_hi timestamptz, p_level text)
RETURNS TABLE (ts timestamptz, rank integer, value double precision, series_id integer,
               via_alias boolean, orig jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT su.bucket, p_own_ranks[se.series_id - p_own_base + 1],
           kwollect.summary_value(se.metric_id, su.avg, su.max), se.series_id, false, NULL
    FROM unnest(p_own_ids) AS ids(series_id)
    JOIN kwollect.series se ON se.series_id = ids.series_id
    CROSS JOIN LATERAL (
        SELECT s.bucket, s.avg, s.max FROM kwollect.summaries s
        WHERE s.level = p_level AND s.series_id = ids.series_id
          AND s.bucket >= kwollect.level_bucket(p_level, p_lo) AND s.bucket <= p_hi
        OFFSET 0) su
    UNION ALL
    SELECT su.bucket, p_alias_ranks[se.series_id - p_alias_base + 1],
           sum(kwollect.summary_value(se.metric_id, su.avg, su.max)), min(se.series_id), true,
           jsonb_agg(DISTINCT se.device_id)
    FROM unnest(p_alias_ids) AS ids(series_id)
    JOIN kwollect.series se ON se.series_id = ids.series_id
    CROSS JOIN LATERAL (
        SELECT s.bucket, s.avg, s.max FROM kwollect.summaries s
        WHERE s.level = p_level AND s.series_id = ids.series_id
          AND s.bucket >= kwollect.level_bucket(p_level, p_lo) AND s.bucket <= p_hi
        OFFSET 0) su
    GROUP BY 1, 2
$$;

CREATE OR REPLACE VIEW public.metrics_by_job_summary AS
SELECT m."timestamp", m.device_id, m.metric_id, m.value, m.labels,
       j.start_time, j.stop_time, j.job_id
FROM public.nodetime_by_job j
CROSS JOIN LATERAL (
    SELECT * FROM public.metrics_by_device_summary d
    WHERE d.device_id = j.node
      AND d."timestamp" >= kwollect.level_bucket('5min', j.start_time)
      AND (j.stop_time IS NULL OR d."timestamp" <= j.stop_time)
) m;
COMMENT ON VIEW public.metrics_by_job_summary IS
    'metrics_by_job of the 5-minute summaries (kwollect.summary): one row per node, metric '
    'and 5-minute bucket that overlaps the job (from the bucket it started in, partial, as '
    'get_metrics(job_id => ..., summary => true) gives them), value = avg, or max for metric '
    'ids ending in _total; NaN for a bucket without numbers.';

-- metrics_by_job_summary of the 1-hour rollup: the hours a job overlaps, from the hour it
-- started in (its first hour is partial, as its first 5-minute bucket is above).
CREATE OR REPLACE VIEW public.metrics_by_job_summary_1h AS
SELECT m."timestamp", m.device_id, m.metric_id, m.value, m.labels,
       j.start_time, j.stop_time, j.job_id
FROM public.nodetime_by_job j
CROSS JOIN LATERAL (
    SELECT * FROM public.metrics_by_device_summary_1h d
    WHERE d.device_id = j.node
      AND d."timestamp" >= kwollect.level_bucket('1h', j.start_time)
      AND (j.stop_time IS NULL OR d."timestamp" <= j.stop_time)
) m;
COMMENT ON VIEW public.metrics_by_job_summary_1h IS
    'metrics_by_job of the 1-hour rollup (kwollect.summary_1h): one row per node, metric and '
    'hour that overlaps the job (from the hour it started in, partial, as '
    'get_metrics(job_id => ..., summary => ''1h'') gives them), value = avg, or max for '
    'metric ids ending in _total; NaN for an hour without numbers.';

-- Retention: partitions (chunks of a hypertable) whose range ended retention_days ago are
-- dropped with their blocks (compact_<start>; a chunk with its compressed chunk,
-- kwollect.drop_chunk in 022), oldest first, once the 5-minute summary and the rollup cover
-- them.  The first range where late rows still wait to be summarized stops the run: the
-- horizon (raw_dropped_before) never passes a range whose summaries are not final, since
-- refresh_summary does not recompute before it.  Dropping a partition locks
-- kwollect.samples exclusively until the transaction ends (maintain() calls this last), a
-- chunk only itself: a lock not granted within 1 s (a long export) leaves the rest to the
-- next run.  Late rows that arrive for a dropped range later are not summarized (the
-- summaries of the dropped rows would be lost) and are dropped by the next run, counted in
-- rows_dropped.  Returns what was done, NULL without retention.
CREATE OR REPLACE FUNCTION kwollect.apply_retention() RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET lock_timeout = '1s' AS $$
DECLARE
    days    integer := nullif(kwollect.setting('retention_days'), '')::integer;
    hyper   boolean := kwollect.storage() = 'timescaledb';
    covered timestamptz;
    old     refcursor;
    part    record;
    compact text;
    raw     bigint;
    blocks  bigint;
    rows    bigint := 0;
    dropped integer := 0;
BEGIN
    IF days IS NULL OR days <= 0 THEN
        RETURN NULL;
    END IF;
    SELECT least(now() - make_interval(days => days), coalesce(watermark, '-infinity'),
                 coalesce(rollup_watermark, '-infinity'))
      INTO covered FROM kwollect.summary_state;
    IF hyper THEN
        OPEN old FOR SELECT c.name, c.range_start, c.range_end
                     FROM kwollect.chunks_before(covered) c;
    ELSE
        OPEN old FOR SELECT p.name, p.range_start, p.range_end FROM kwollect.partitions p
                     WHERE p.range_end <= covered ORDER BY p.range_start;
    END IF;
    LOOP
        FETCH old INTO part;
        EXIT WHEN NOT FOUND
               OR EXISTS (SELECT 1 FROM kwollect.summary_dirty d
                          WHERE d.lo < part.range_end AND d.hi >= part.range_start)
               OR EXISTS (SELECT 1 FROM kwollect.rollup_dirty d
                          WHERE d.lo < part.range_end AND d.hi >= part.range_start);
        BEGIN
            blocks := 0;
            IF hyper THEN
                raw := kwollect.drop_chunk(part.name, part.range_start, part.range_end);
            ELSE
                compact := kwollect.compact_partition_name(part.name);
                EXECUTE format('SELECT count(*) FROM kwollect_partitions.%I', part.name) INTO raw;
                IF to_regclass(format('kwollect_partitions.%I', compact)) IS NOT NULL THEN
                    EXECUTE format('SELECT coalesce(sum(n), 0) FROM kwollect_partitions.%I',
                                   compact) INTO blocks;
                    EXECUTE format('DROP TABLE kwollect_partitions.%I', compact);
                END IF;
                EXECUTE format('DROP TABLE kwollect_partitions.%I', part.name);
                DELETE FROM kwollect.partitions WHERE name = part.name;
            END IF;
            UPDATE kwollect.retention
               SET raw_dropped_before = greatest(raw_dropped_before, part.range_end),
                   rows_dropped = rows_dropped + raw + blocks;
            rows := rows + raw + blocks;
            dropped := dropped + 1;
        EXCEPTION WHEN lock_not_available THEN
            EXIT;
        END;
    END LOOP;
    CLOSE old;
    RETURN jsonb_build_object('partitions', dropped, 'rows', rows);
END $$;

-- get_metrics of raw rows before the retention's horizon: refused, saying why (HTTP 410),
-- rather than answering the part that is left as if it were all.
CREATE OR REPLACE FUNCTION kwollect.check_retention(p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_start < r.raw_dropped_before
                THEN kwollect.fail(
                         format('raw samples before %s were dropped (retention of %s days); '
                                'their 5-minute summaries and 1-hour rollups are kept',
                                r.raw_dropped_before, kwollect.setting('retention_days')),
                         'Ask for summary=true (5 minutes) or summary=1h, or start at or '
                         'after that time.', 'PT410')
                ELSE true END
    FROM kwollect.retention r
$$;

-- Periodic maintenance: partitions ahead of time, stray rows out of the default
-- partition, summaries up to date.  Safe to run concurrently (the second caller waits or
-- skips).  Runs as the owner; the writer role may call it (`kwollect maintain`).
CREATE OR REPLACE FUNCTION kwollect.maintain() RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    step     interval := make_interval(hours => kwollect.setting('chunk_interval_hour')::int);
    ahead    integer := kwollect.setting('partitions_ahead')::int;
    created  integer;
    moved    integer;
    written  bigint;
    rolled   bigint;
    retained jsonb;
    archived text;
    compacted bigint;
BEGIN
    SELECT kwollect.ensure_partitions(array_agg(now() + step * i))
      INTO created FROM generate_series(-1, ahead) AS i;
    moved := kwollect.relocate_default_rows();
    DELETE FROM kwollect.written_batches WHERE written_at < now() - interval '7 days';
    written := kwollect.refresh_summary();
    rolled := kwollect.refresh_rollup();
    -- After the summaries: a late row is summarized before it is compacted.
    compacted := kwollect.compact_partitions();
    -- After the summaries (a range is dropped once they cover it) and near the end: on
    -- stock PostgreSQL, dropping a partition locks kwollect.samples exclusively
    -- until maintain() commits, and before the compaction (up to 30 s) every reader and
    -- writer waited for that too.
    retained := kwollect.apply_retention();
    -- Last too, after the retention (a range about to be dropped is not moved first):
    -- moving a partition to the archive tablespace locks it exclusively until maintain()
    -- commits, and before the compaction its readers waited for that too.
    archived := kwollect.archive_partitions();
    RETURN jsonb_build_object('partitions_created', created + coalesce(moved, 0),
                              'summary_rows', written, 'rollup_rows', rolled,
                              'retention_dropped', retained,
                              'archived', archived,
                              'compacted_rows', compacted,
                              'partitions_released', kwollect.release_compacted());
END $$;
