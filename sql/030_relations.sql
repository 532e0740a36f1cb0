-- kwollect schema, part 3: the relations users know from the reference README, in public.

-- metrics: the reference table, now a view over series + samples.  INSERT and COPY into
-- it keep working through an INSTEAD OF trigger (collectors use the faster path of
-- kwollect/store/writer.py: binary COPY straight into kwollect.samples).
CREATE OR REPLACE VIEW public.metrics AS
SELECT s.ts AS "timestamp", se.device_id, se.metric_id, s.value, se.labels
FROM kwollect.samples s
JOIN kwollect.series se ON se.series_id = s.series_id;

ALTER VIEW public.metrics ALTER COLUMN "timestamp" SET DEFAULT now();
ALTER VIEW public.metrics ALTER COLUMN value SET DEFAULT 'NaN';
ALTER VIEW public.metrics ALTER COLUMN labels SET DEFAULT '{}';
COMMENT ON VIEW public.metrics IS
    'Every sample: (timestamp, device_id, metric_id, value, labels). INSERT and COPY accepted.';

CREATE OR REPLACE FUNCTION kwollect.metrics_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    sid integer;
    late_before timestamptz;
BEGIN
    IF NEW."timestamp" IS NULL OR NEW.device_id IS NULL OR NEW.metric_id IS NULL THEN
        RAISE EXCEPTION 'metrics: timestamp, device_id and metric_id must not be null'
            USING ERRCODE = 'not_null_violation',
                  DETAIL = format('device_id=%s metric_id=%s timestamp=%s',
                                  NEW.device_id, NEW.metric_id, NEW."timestamp");
    END IF;
    NEW.labels := coalesce(NEW.labels, '{}');
    SELECT series_id INTO sid FROM kwollect.series
    WHERE device_id = NEW.device_id AND metric_id = NEW.metric_id AND labels = NEW.labels;
    IF NOT FOUND THEN
        sid := (kwollect.series_ids(ARRAY[NEW.device_id], ARRAY[NEW.metric_id],
                                    ARRAY[NEW.labels]))[1];
    END IF;
    -- The bounds of the last partition this transaction saw, to skip the look-up.
    IF NOT (NEW."timestamp" >= nullif(current_setting('kwollect.part_lo', true), '')::timestamptz
            AND NEW."timestamp" < nullif(current_setting('kwollect.part_hi', true), '')::timestamptz)
       IS TRUE THEN
        IF NOT kwollect.timestamp_in_range(NEW."timestamp") THEN
            PERFORM kwollect.check_timestamps(ARRAY[NEW."timestamp"]);
        END IF;
        IF NOT kwollect.partition_exists(NEW."timestamp") THEN
            PERFORM kwollect.ensure_partitions(ARRAY[NEW."timestamp"]);
        END IF;
        PERFORM set_config('kwollect.part_lo', range_start::text, true),
                set_config('kwollect.part_hi', range_end::text, true)
        FROM kwollect.partitions WHERE range_start <= NEW."timestamp" AND range_end > NEW."timestamp";
    END IF;
    INSERT INTO kwollect.samples (ts, value, series_id) VALUES (NEW."timestamp", NEW.value, sid);
    late_before := nullif(current_setting('kwollect.late_before', true), '')::timestamptz;
    IF late_before IS NULL THEN
        late_before := now() - make_interval(secs => kwollect.setting('summary_lag_seconds')::int / 2);
        PERFORM set_config('kwollect.late_before', late_before::text, true);
    END IF;
    IF NEW."timestamp" < late_before THEN
        PERFORM set_config('kwollect.late_lo',
                           least(nullif(current_setting('kwollect.late_lo', true), '')::timestamptz,
                                 NEW."timestamp")::text, true);
        PERFORM set_config('kwollect.late_hi',
                           greatest(nullif(current_setting('kwollect.late_hi', true), '')::timestamptz,
                                    NEW."timestamp")::text, true);
    END IF;
    RETURN NEW;
END $$;

-- Once per statement: record the late range the row trigger accumulated.
CREATE OR REPLACE FUNCTION kwollect.metrics_insert_statement() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM kwollect.mark_late(nullif(current_setting('kwollect.late_lo', true), '')::timestamptz,
                               nullif(current_setting('kwollect.late_hi', true), '')::timestamptz);
    PERFORM set_config('kwollect.late_lo', '', true), set_config('kwollect.late_hi', '', true),
            set_config('kwollect.late_before', '', true);
    RETURN NULL;
END $$;

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
FROM kwollect.samples s
JOIN kwollect.series se ON se.series_id = s.series_id
UNION ALL
SELECT s.ts, se.device_alias, se.metric_id, sum(s.value),
       (se.labels - '_device_alias')
           || jsonb_build_object('_device_orig', jsonb_agg(DISTINCT se.device_id))
FROM kwollect.samples s
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
