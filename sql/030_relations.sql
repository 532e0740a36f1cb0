-- kwollect schema, part 3: the relations users know from the reference README, in public.

-- metrics: the reference table, now a view over series + samples (raw or compacted).  INSERT and COPY into
-- it keep working (collectors use the faster path of kwollect/store/writer.py: binary COPY
-- straight into kwollect.samples).
CREATE OR REPLACE VIEW public.metrics AS
SELECT s.ts AS "timestamp", se.device_id, se.metric_id, s.value, se.labels
FROM kwollect.samples_all s
JOIN kwollect.series se ON se.series_id = s.series_id;

-- (On Citus the defaults are the coordinator's only: Citus cannot propagate them, and the
-- view is written through the coordinator.)
SET LOCAL citus.enable_ddl_propagation = off;
ALTER VIEW public.metrics ALTER COLUMN "timestamp" SET DEFAULT now();
ALTER VIEW public.metrics ALTER COLUMN value SET DEFAULT 'NaN';
ALTER VIEW public.metrics ALTER COLUMN labels SET DEFAULT '{}';
SET LOCAL citus.enable_ddl_propagation = on;
COMMENT ON VIEW public.metrics IS
    'Every sample: (timestamp, device_id, metric_id, value, labels). INSERT and COPY accepted.';

-- Writing into the view is set-wise: the row trigger only checks a row and parks it in a
-- per-session inbox (a temporary table emptied at commit), and one statement-level trigger
-- then moves the statement's rows into kwollect.samples with a few set-wise statements
-- (series created, partitions created, late range marked).  PostgreSQL offers nothing
-- cheaper per row for a view: COPY into a view needs a row-level INSTEAD OF trigger, and
-- triggers on views cannot have transition tables.  Measured (benchmarks/metrics_view.py,
-- binary COPY, server CPU per row): bare table 1.3 us, kwollect.samples alone 4.4-5.7,
-- a row trigger returning NEW only 1.5-1.9, parking the row 5.8-6.4, the whole path 12-14
-- (90-100 for the earlier row-by-row trigger); docs/performance.md says what else was
-- tried and why half the bare table's rate is out of reach.
--
-- Within one transaction the inbox only grows (nothing is deleted: dead rows would be
-- scanned again by every later statement of the transaction), and each statement takes
-- the rows after the last one the previous statement took (kwollect.inbox_seen, a
-- transaction-local setting): rows of a temporary table without deletions are appended in
-- order, and a TID range scan reads only the new pages.

-- Before each INSERT or COPY into the view: this session's inbox exists.
CREATE OR REPLACE FUNCTION kwollect.metrics_inbox_open() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass('pg_temp.kwollect_metrics_inbox') IS NULL THEN
        CREATE TEMPORARY TABLE kwollect_metrics_inbox (
            "timestamp" timestamptz, device_id text, metric_id text,
            value double precision, labels jsonb
        ) ON COMMIT DELETE ROWS;
        -- The session's other roles (SET ROLE) may write into the view too; the table is
        -- private to this session whatever its privileges.
        GRANT SELECT, INSERT ON pg_temp.kwollect_metrics_inbox TO PUBLIC;
    END IF;
    RETURN NULL;
END $$;

-- Each row: refused when its identity is missing (COPY names the line), else parked.
CREATE OR REPLACE FUNCTION kwollect.metrics_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW."timestamp" IS NULL OR NEW.device_id IS NULL OR NEW.metric_id IS NULL THEN
        RAISE EXCEPTION 'metrics: timestamp, device_id and metric_id must not be null'
            USING ERRCODE = 'not_null_violation',
                  DETAIL = format('device_id=%s metric_id=%s timestamp=%s',
                                  NEW.device_id, NEW.metric_id, NEW."timestamp");
    END IF;
    IF NEW.labels IS NULL THEN
        NEW.labels := '{}';
    END IF;
    INSERT INTO pg_temp.kwollect_metrics_inbox
    VALUES (NEW."timestamp", NEW.device_id, NEW.metric_id, NEW.value, NEW.labels);
    RETURN NEW;
END $$;

-- After each INSERT or COPY into the view: its rows, set-wise, into kwollect.samples.
CREATE OR REPLACE FUNCTION kwollect.metrics_insert_statement() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    seen       tid := coalesce(nullif(current_setting('kwollect.inbox_seen', true), ''),
                               '(0,0)')::tid;
    last_row   tid;
    bad        record;
    bad_row    bigint;
    missing    timestamptz[];
    ts_min     timestamptz := kwollect.setting('min_timestamp')::timestamptz;
    ts_max     timestamptz := kwollect.setting('max_timestamp')::timestamptz;
    late_limit timestamptz := now() - make_interval(
                                  secs => kwollect.setting('summary_lag_seconds')::int / 2);
BEGIN
    SELECT max(ctid) INTO last_row FROM pg_temp.kwollect_metrics_inbox WHERE ctid > seen;
    IF last_row IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT ctid, * INTO bad FROM pg_temp.kwollect_metrics_inbox i
    WHERE i.ctid > seen
      AND (NOT (i."timestamp" >= ts_min AND i."timestamp" < ts_max)
           OR jsonb_typeof(i.labels) <> 'object'
           OR (pg_column_compression(i.labels) IS NOT NULL  -- only large labels get compressed
               AND pg_column_size(i.labels::text::jsonb) > 2000))
    LIMIT 1;
    IF FOUND THEN
        SELECT count(*) INTO bad_row FROM pg_temp.kwollect_metrics_inbox
        WHERE ctid > seen AND ctid <= bad.ctid;
        RAISE EXCEPTION 'metrics: row % of the statement is invalid: %', bad_row,
            CASE WHEN NOT (bad."timestamp" >= ts_min AND bad."timestamp" < ts_max)
                 THEN format('timestamp %s is out of range', bad."timestamp")
                 WHEN jsonb_typeof(bad.labels) <> 'object' THEN 'labels is not a JSON object'
                 ELSE 'labels are larger than 2000 bytes' END
            USING ERRCODE = CASE WHEN NOT (bad."timestamp" >= ts_min AND bad."timestamp" < ts_max)
                                 THEN 'datetime_field_overflow'
                                 ELSE 'invalid_parameter_value' END,
                  DETAIL = format('timestamp=%s device_id=%s metric_id=%s value=%s labels=%s',
                                  bad."timestamp", bad.device_id, bad.metric_id, bad.value,
                                  left(bad.labels::text, 200)),
                  HINT = format('kwollect stores samples from %s (inclusive) to %s (exclusive); '
                                'labels are a JSON object of at most 2000 bytes.', ts_min, ts_max);
    END IF;
    PERFORM kwollect.series_ids(array_agg(n.device_id), array_agg(n.metric_id),
                                array_agg(n.labels))
    FROM (SELECT DISTINCT i.device_id, i.metric_id, i.labels
          FROM pg_temp.kwollect_metrics_inbox i
          WHERE i.ctid > seen
            AND NOT EXISTS (SELECT 1 FROM kwollect.series s
                            WHERE s.device_id = i.device_id AND s.metric_id = i.metric_id
                              AND s.labels = i.labels)) n
    HAVING count(*) > 0;
    -- Partitions are aligned on whole hours: checking each hour's start is enough.  (The
    -- CTE is materialized so that the check runs once per hour, not once per row.)
    WITH hours AS MATERIALIZED (
        SELECT DISTINCT date_bin('1 hour', "timestamp", 'epoch') AS hour
        FROM pg_temp.kwollect_metrics_inbox WHERE ctid > seen)
    SELECT array_agg(hour) INTO missing FROM hours WHERE NOT kwollect.partition_exists(hour);
    -- (Not on Citus: a partition the owner makes in this transaction could not be written
    -- by the writer in it; the rows wait in the default partition for kwollect.maintain().)
    IF missing IS NOT NULL AND kwollect.setting('citus') IS DISTINCT FROM 'on' THEN
        PERFORM kwollect.ensure_partitions(missing);
    END IF;
    INSERT INTO kwollect.samples (ts, value, series_id)
    SELECT i."timestamp", i.value, s.series_id
    FROM pg_temp.kwollect_metrics_inbox i
    JOIN kwollect.series s
      ON s.device_id = i.device_id AND s.metric_id = i.metric_id AND s.labels = i.labels
    WHERE i.ctid > seen;
    PERFORM kwollect.mark_late(min("timestamp"), max("timestamp"))
    FROM pg_temp.kwollect_metrics_inbox WHERE ctid > seen AND "timestamp" < late_limit;
    PERFORM set_config('kwollect.inbox_seen', last_row::text, true);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER metrics_inbox_open BEFORE INSERT ON public.metrics
    FOR EACH STATEMENT EXECUTE FUNCTION kwollect.metrics_inbox_open();
CREATE OR REPLACE TRIGGER metrics_insert_row INSTEAD OF INSERT ON public.metrics
    FOR EACH ROW EXECUTE FUNCTION kwollect.metrics_insert_row();
CREATE OR REPLACE TRIGGER metrics_insert_statement AFTER INSERT ON public.metrics
    FOR EACH STATEMENT EXECUTE FUNCTION kwollect.metrics_insert_statement();

-- Optional metrics are collected for (device_id, metric_id regex) rows of this table.
CREATE TABLE IF NOT EXISTS public.promoted_metrics (
    device_id text NOT NULL,
    metric_id text DEFAULT NULL
);

-- Jobs: scheduler integrations fill this table (stop_time NULL while the job runs) ...
CREATE TABLE IF NOT EXISTS public.nodetime_per_job (
    job_id     integer NOT NULL,
    start_time timestamp with time zone NOT NULL,
    stop_time  timestamp with time zone,
    node       text NOT NULL,
    PRIMARY KEY (job_id, node, start_time)
);
CREATE INDEX IF NOT EXISTS nodetime_per_job_node_idx ON public.nodetime_per_job (node, start_time);

-- ... and the API reads jobs through this view, which a site may replace with
-- CREATE OR REPLACE VIEW nodetime_by_job AS ... over its own scheduler data.  It is
-- created only when absent, so re-running setup never undoes a site's integration.
DO $$
BEGIN
    IF to_regclass('public.nodetime_by_job') IS NULL THEN
        CREATE VIEW public.nodetime_by_job AS
        SELECT job_id, start_time, stop_time, node FROM public.nodetime_per_job;
    END IF;
END $$;

-- Per-device view: every row under its own device_id (without its _device_alias label),
-- plus, for each alias, the rows of its source devices summed per timestamp, with
-- _device_orig listing the sources (reference semantics).
CREATE OR REPLACE VIEW public.metrics_by_device AS
SELECT s.ts AS "timestamp", se.device_id, se.metric_id, s.value,
       se.labels - '_device_alias' AS labels
FROM kwollect.samples_all s
JOIN kwollect.series se ON se.series_id = s.series_id
UNION ALL
SELECT s.ts, se.device_alias, se.metric_id, sum(s.value),
       (se.labels - '_device_alias')
           || jsonb_build_object('_device_orig', jsonb_agg(DISTINCT se.device_id))
FROM kwollect.samples_all s
JOIN kwollect.series se ON se.series_id = s.series_id
WHERE se.device_alias IS NOT NULL
GROUP BY s.ts, se.device_alias, se.metric_id, se.labels - '_device_alias';

CREATE OR REPLACE VIEW public.metrics_by_job AS
SELECT m."timestamp", m.device_id, m.metric_id, m.value, m.labels,
       j.start_time, j.stop_time, j.job_id
FROM public.nodetime_by_job j
CROSS JOIN LATERAL (
    SELECT * FROM public.metrics_by_device d
    WHERE d.device_id = j.node
      AND d."timestamp" >= j.start_time
      AND (j.stop_time IS NULL OR d."timestamp" <= j.stop_time)
) m;
