-- kwollect schema, part 4: 5-minute summaries, maintained incrementally.
--
-- kwollect.summary keeps count, avg, min, max and last of the numeric (non-NaN) values of
-- each series and 5-minute bucket, and nan_count, the number of NaN or NULL samples.
-- kwollect.refresh_summary() computes each bucket once, when it is at least
-- summary_lag_seconds old, plus the buckets that late rows touched
-- (kwollect.summary_dirty).  It is called by kwollect.maintain(), which `kwollect maintain`
-- runs every minute (systemd/kwollect-maintain.timer), so summaries are at most
-- 5 min + lag + 1 min behind.

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

CREATE TABLE IF NOT EXISTS kwollect.summary_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    watermark timestamptz
);
INSERT INTO kwollect.summary_state (singleton, watermark) VALUES (true, NULL)
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION kwollect.bucket_of(p_ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT date_bin('5 minutes', p_ts, timestamptz '1970-01-01 00:00:00+00')
$$;

-- Recompute the summary of [p_lo, p_hi) (bucket-aligned bounds).  With p_exact, averages
-- are computed in numeric: slower, but a bucket whose sum overflows double precision
-- (values near 1e308) cannot fail.
CREATE OR REPLACE FUNCTION kwollect.summary_rows(p_lo timestamptz, p_hi timestamptz,
                                                 p_exact boolean)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM kwollect.summary WHERE bucket >= p_lo AND bucket < p_hi;
    INSERT INTO kwollect.summary (series_id, bucket, count, nan_count, avg, min, max, last)
    SELECT series_id, kwollect.bucket_of(ts),
           count(value) FILTER (WHERE value <> 'NaN'),
           count(*) FILTER (WHERE value IS NULL OR value = 'NaN'),
           coalesce(avg(value) FILTER (WHERE NOT p_exact AND value <> 'NaN'),
                    avg(value::numeric) FILTER (WHERE p_exact AND value <> 'NaN')::double precision),
           min(value) FILTER (WHERE value <> 'NaN'),
           max(value) FILTER (WHERE value <> 'NaN'),
           (max(ARRAY[date_part('epoch', ts), value]) FILTER (WHERE value <> 'NaN'))[2]
    FROM kwollect.samples_between(p_lo, p_hi)
    GROUP BY 1, 2;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION kwollect.summarize_range(p_lo timestamptz, p_hi timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RETURN kwollect.summary_rows(p_lo, p_hi, false);
EXCEPTION WHEN numeric_value_out_of_range THEN
    RETURN kwollect.summary_rows(p_lo, p_hi, true);
END $$;

-- Where fresh summarizing starts or resumes: `p_from`, or when no sample lies between
-- p_from and the next partition, that partition's start (so years without data are skipped
-- at the cost of one catalogue lookup).
CREATE OR REPLACE FUNCTION kwollect.next_data_start(p_from timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_from IS NULL THEN
            kwollect.bucket_of(least((SELECT min(range_start) FROM kwollect.partitions),
                                     (SELECT min(ts) FROM kwollect_partitions.samples_default)))
        WHEN EXISTS (SELECT 1 FROM kwollect.partitions
                     WHERE range_start <= p_from AND range_end > p_from)
          OR EXISTS (SELECT 1 FROM kwollect_partitions.samples_default WHERE ts >= p_from) THEN
            p_from
        ELSE coalesce((SELECT min(range_start) FROM kwollect.partitions WHERE range_start > p_from),
                      p_from)
    END
$$;

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
            SELECT kwollect.bucket_of(lo) AS lo,
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

-- All summary statistics, by series identity.
CREATE OR REPLACE VIEW public.metrics_summary AS
SELECT su.bucket AS "timestamp", se.device_id, se.metric_id, se.labels,
       su.count, su.avg, su.min, su.max, su.last
FROM kwollect.summary su
JOIN kwollect.series se ON se.series_id = su.series_id;

-- The summary in the shape of metrics_by_device: value = avg, or max for counters
-- (metric ids ending in _total), as in the reference; NaN where a bucket had no number.
CREATE OR REPLACE FUNCTION kwollect.summary_value(p_metric_id text, p_avg double precision,
                                                  p_max double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(CASE WHEN p_metric_id LIKE '%\_total' THEN p_max ELSE p_avg END, 'NaN')
$$;

CREATE OR REPLACE VIEW public.metrics_by_device_summary AS
SELECT su.bucket AS "timestamp", se.device_id, se.metric_id,
       kwollect.summary_value(se.metric_id, su.avg, su.max) AS value,
       se.labels - '_device_alias' AS labels
FROM kwollect.summary su
JOIN kwollect.series se ON se.series_id = su.series_id
UNION ALL
SELECT su.bucket, se.device_alias, se.metric_id,
       sum(kwollect.summary_value(se.metric_id, su.avg, su.max)),
       (se.labels - '_device_alias')
           || jsonb_build_object('_device_orig', jsonb_agg(DISTINCT se.device_id))
FROM kwollect.summary su
JOIN kwollect.series se ON se.series_id = su.series_id
WHERE se.device_alias IS NOT NULL
GROUP BY su.bucket, se.device_alias, se.metric_id, se.labels - '_device_alias';

CREATE OR REPLACE VIEW public.metrics_by_job_summary AS
SELECT m."timestamp", m.device_id, m.metric_id, m.value, m.labels,
       j.start_time, j.stop_time, j.job_id
FROM public.nodetime_by_job j
CROSS JOIN LATERAL (
    SELECT * FROM public.metrics_by_device_summary d
    WHERE d.device_id = j.node
      AND d."timestamp" >= kwollect.bucket_of(j.start_time)
      AND (j.stop_time IS NULL OR d."timestamp" <= j.stop_time)
) m;

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
    archived text;
    compacted bigint;
BEGIN
    SELECT kwollect.ensure_partitions(array_agg(now() + step * i))
      INTO created FROM generate_series(-1, ahead) AS i;
    moved := kwollect.relocate_default_rows();
    archived := kwollect.archive_partitions();
    DELETE FROM kwollect.written_batches WHERE written_at < now() - interval '7 days';
    written := kwollect.refresh_summary();
    -- After the summaries: a late row is summarized before it is compacted.
    compacted := kwollect.compact_partitions();
    RETURN jsonb_build_object('partitions_created', created + coalesce(moved, 0),
                              'summary_rows', written, 'archived', archived,
                              'compacted_rows', compacted,
                              'partitions_released', kwollect.release_compacted());
END $$;
