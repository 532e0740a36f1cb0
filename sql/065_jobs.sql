-- kwollect schema, part 6: jobs.  Where job rows come from (scheduler hooks, the OAR
-- synchronisation of 070_oar.sql, or a site's own nodetime_by_job view), promotion of
-- optional metrics that follows a job, user metrics inserted from a job's nodes, and
-- job-wide metrics.  Privileges for the scheduler and node roles are in 091_jobs_grants.sql.

-- Promotion asked by a running job: one metric regex per row (NULL never: '.*' = all).
-- Rows live from the job's start to its end; promoted_metrics rows are derived from them.
CREATE TABLE IF NOT EXISTS kwollect.job_promote (
    job_id    integer NOT NULL,
    metric_id text NOT NULL,
    PRIMARY KEY (job_id, metric_id)
);
COMMENT ON TABLE kwollect.job_promote IS
    'Metric regexes a job promotes on its nodes while it runs (api.job_start, OAR monitor types).';

-- Promotion by jobs: promoted_metrics rows with a job_id are managed here; rows without a
-- job_id (added by an operator) are never touched.
ALTER TABLE public.promoted_metrics ADD COLUMN IF NOT EXISTS job_id integer;
CREATE INDEX IF NOT EXISTS promoted_metrics_job_idx ON public.promoted_metrics (job_id);
COMMENT ON TABLE public.promoted_metrics IS
    'Optional metrics to collect: (device_id, metric_id regex, NULL = all). Rows with a '
    'job_id follow that job (added at its start, removed at its end); others are an operator''s.';

-- A site's extra source of job promotions (reference name); empty unless replaced.
DO $$
BEGIN
    IF to_regclass('public.promoted_metrics_job') IS NULL THEN
        CREATE VIEW public.promoted_metrics_job AS
        SELECT NULL::integer AS job_id, NULL::text AS node, NULL::text AS metric_id
        WHERE false;
    END IF;
END $$;

-- What job promotion wants now, for one job or (NULL) for all: running jobs' regexes on
-- their nodes, plus the rows of the site's promoted_metrics_job view.
CREATE OR REPLACE FUNCTION kwollect.wanted_job_promotions(p_job_id integer)
RETURNS TABLE (job_id integer, device_id text, metric_id text)
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT n.job_id, n.node, p.metric_id
    FROM kwollect.job_promote p
    JOIN public.nodetime_per_job n ON n.job_id = p.job_id AND n.stop_time IS NULL
    WHERE p_job_id IS NULL OR p.job_id = p_job_id
    UNION
    SELECT v.job_id, v.node, coalesce(v.metric_id, '.*')
    FROM public.promoted_metrics_job v
    WHERE v.job_id IS NOT NULL AND v.node IS NOT NULL
      AND (p_job_id IS NULL OR v.job_id = p_job_id)
$$;

-- Bring promoted_metrics in line with what jobs want, for one job (its rows only) or for
-- all jobs (rows of every job); returns how many rows were added and removed.
CREATE OR REPLACE FUNCTION kwollect.apply_job_promotions(p_job_id integer,
                                                         OUT added bigint, OUT removed bigint)
LANGUAGE sql AS $$
    WITH wanted AS MATERIALIZED (
        SELECT * FROM kwollect.wanted_job_promotions(p_job_id)
    ), gone AS (
        DELETE FROM public.promoted_metrics p
        WHERE p.job_id IS NOT NULL AND (p_job_id IS NULL OR p.job_id = p_job_id)
          AND NOT EXISTS (SELECT 1 FROM wanted w WHERE w.job_id = p.job_id
                          AND w.device_id = p.device_id AND w.metric_id = p.metric_id)
        RETURNING 1
    ), new AS (
        INSERT INTO public.promoted_metrics (device_id, metric_id, job_id)
        SELECT w.device_id, w.metric_id, w.job_id FROM wanted w
        WHERE NOT EXISTS (SELECT 1 FROM public.promoted_metrics p WHERE p.job_id = w.job_id
                          AND p.device_id = w.device_id AND p.metric_id = w.metric_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM gone)
$$;

-- Collectors LISTEN on kwollect_promotions: a change reaches them at once, not at their
-- next poll of the table.
CREATE OR REPLACE FUNCTION kwollect.notify_promotions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kwollect_promotions', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER promoted_metrics_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.promoted_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION kwollect.notify_promotions();

-- Reference API (OAR calls it at job start and end): synchronise jobs, then promoted rows.
DROP FUNCTION IF EXISTS api.update_promoted_metrics();
CREATE OR REPLACE FUNCTION api.update_promoted_metrics()
RETURNS SETOF public.promoted_metrics LANGUAGE plpgsql AS $$
BEGIN
    PERFORM kwollect.sync_jobs();
    PERFORM kwollect.apply_job_promotions(NULL);
    RETURN QUERY SELECT * FROM public.promoted_metrics
                 ORDER BY device_id COLLATE "C", metric_id COLLATE "C", job_id;
END $$;
COMMENT ON FUNCTION api.update_promoted_metrics() IS
    'Synchronise jobs from the scheduler (OAR) and the promoted_metrics rows of jobs with '
    'them; rows without a job_id are kept. Returns every promoted_metrics row.';

-- The scheduler hooks run as the scheduler role only (kwollect-setup-db prints its token):
-- the writer role, although a member of it (to switch to it), is refused.
CREATE OR REPLACE FUNCTION kwollect.require_scheduler(p_what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF current_user IS DISTINCT FROM kwollect.setting('scheduler_role') THEN
        RAISE EXCEPTION '% is for the scheduler''s hooks: role % may not call it', p_what,
            current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Use the scheduler token printed by kwollect-setup-db.';
    END IF;
END $$;

-- A metric regex to promote, checked: NULL or '' means none.
CREATE OR REPLACE FUNCTION kwollect.check_regex(p_regex text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF nullif(btrim(p_regex), '') IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM '' ~ p_regex;
    RETURN btrim(p_regex);
EXCEPTION WHEN invalid_regular_expression THEN
    RAISE EXCEPTION 'invalid promote regex %: %', p_regex, SQLERRM
        USING ERRCODE = 'invalid_parameter_value';
END $$;

CREATE OR REPLACE FUNCTION api.job_start(job_id integer, nodes text, start_time text DEFAULT NULL,
                                         promote text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    j       integer := job_id;
    t0      timestamptz := coalesce(kwollect.parse_time(start_time, 'start_time'), now());
    wanted  text[] := kwollect.split_list(nodes, true);
    regex   text := kwollect.check_regex(promote);
    changes record;
BEGIN
    PERFORM kwollect.require_scheduler('job_start');
    IF j IS NULL OR wanted IS NULL THEN
        RAISE EXCEPTION 'job_start needs job_id and nodes (comma-separated host names)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A job started again (requeued) ends its previous run where the new one starts.
    UPDATE public.nodetime_per_job n SET stop_time = greatest(n.start_time, t0)
    WHERE n.job_id = j AND n.stop_time IS NULL AND n.start_time <> t0;
    INSERT INTO public.nodetime_per_job (job_id, start_time, stop_time, node)
    SELECT j, t0, NULL, x FROM unnest(wanted) x
    ON CONFLICT ON CONSTRAINT nodetime_per_job_pkey DO UPDATE SET stop_time = NULL;
    DELETE FROM kwollect.job_promote p WHERE p.job_id = j;
    IF regex IS NOT NULL THEN
        INSERT INTO kwollect.job_promote (job_id, metric_id) VALUES (j, regex);
    END IF;
    changes := kwollect.apply_job_promotions(j);
    RETURN jsonb_build_object('job_id', j, 'nodes', to_jsonb(wanted), 'start_time', t0,
                              'promote', regex, 'promoted_rows_added', changes.added,
                              'promoted_rows_removed', changes.removed);
END $$;
COMMENT ON FUNCTION api.job_start(integer, text, text, text) IS
    'Scheduler hook (scheduler token only): job job_id started on nodes (comma-separated, '
    'cut at the first dot) at start_time (default now); promote, a regex over metric names '
    '(e.g. bmc_.*), promotes those optional metrics on its nodes until job_end.';

CREATE OR REPLACE FUNCTION api.job_end(job_id integer, stop_time text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    j       integer := job_id;
    t1      timestamptz := coalesce(kwollect.parse_time(stop_time, 'stop_time'), now());
    ended   integer;
    changes record;
BEGIN
    PERFORM kwollect.require_scheduler('job_end');
    IF NOT EXISTS (SELECT 1 FROM public.nodetime_per_job n WHERE n.job_id = j) THEN
        RAISE EXCEPTION 'job % not found', j
            USING ERRCODE = 'PT404', HINT = 'job_start was never called for this job.';
    END IF;
    IF EXISTS (SELECT 1 FROM public.nodetime_per_job n
               WHERE n.job_id = j AND n.stop_time IS NULL AND n.start_time > t1) THEN
        RAISE EXCEPTION 'job %: stop_time % is before its start', j, t1
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE public.nodetime_per_job n SET stop_time = t1
    WHERE n.job_id = j AND n.stop_time IS NULL;
    GET DIAGNOSTICS ended = ROW_COUNT;
    DELETE FROM kwollect.job_promote p WHERE p.job_id = j;
    changes := kwollect.apply_job_promotions(j);
    RETURN jsonb_build_object('job_id', j, 'stop_time', t1, 'nodes_ended', ended,
                              'promoted_rows_removed', changes.removed);
END $$;
COMMENT ON FUNCTION api.job_end(integer, text) IS
    'Scheduler hook (scheduler token only): job job_id ended at stop_time (default now); '
    'its promotions are removed. Calling it again changes nothing.';

-- User metrics: rows a job's node posts about itself (kwollect-api identifies the node by
-- its address and sets kwollect.caller_node; see docs/jobs.md).  Bounded per job.
INSERT INTO kwollect.settings (key, value) VALUES
    ('user_metrics_max_rows_per_call', '1000'),
    ('user_metrics_max_rows_per_minute', '6000'),
    ('user_metrics_max_rows_per_job', '1000000'),
    ('user_metrics_max_labels_bytes', '1024')
ON CONFLICT (key) DO NOTHING;

CREATE TABLE IF NOT EXISTS kwollect.user_metrics_usage (
    job_id      integer PRIMARY KEY,
    total_rows  bigint NOT NULL DEFAULT 0,
    minute      timestamptz NOT NULL,
    minute_rows integer NOT NULL DEFAULT 0
);

CREATE OR REPLACE FUNCTION kwollect.insert_user_rows(p_rows jsonb)
RETURNS SETOF public.metrics LANGUAGE plpgsql AS $$
DECLARE
    caller    text := nullif(current_setting('kwollect.caller_node', true), '');
    job       record;
    nrows     integer;
    bad       record;
    usage     kwollect.user_metrics_usage;
    per_call  integer := kwollect.setting('user_metrics_max_rows_per_call')::integer;
    per_min   integer := kwollect.setting('user_metrics_max_rows_per_minute')::integer;
    per_job   bigint := kwollect.setting('user_metrics_max_rows_per_job')::bigint;
    max_label integer := kwollect.setting('user_metrics_max_labels_bytes')::integer;
BEGIN
    IF caller IS NULL THEN
        RAISE EXCEPTION 'insert_user_metrics: the caller is not identified as a node'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call it from a node of a running job, through kwollect-api.';
    END IF;
    SELECT n.job_id, n.start_time INTO job FROM public.nodetime_per_job n
    WHERE n.node = caller AND n.stop_time IS NULL ORDER BY n.start_time DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'insert_user_metrics: node % is not in a running job', caller
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only the nodes of a running job may insert user metrics.';
    END IF;
    IF jsonb_typeof(p_rows) <> 'array' THEN
        RAISE EXCEPTION 'insert_user_metrics expects an object or an array of objects'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    nrows := jsonb_array_length(p_rows);
    IF nrows > per_call THEN
        RAISE EXCEPTION 'insert_user_metrics: % rows in one call, over the limit of %', nrows, per_call
            USING ERRCODE = 'PT413';
    END IF;
    SELECT e.ord, e.elem INTO bad
    FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(elem, ord)
    WHERE jsonb_typeof(e.elem) <> 'object'
       OR (e.elem ? 'device_id' AND e.elem ->> 'device_id' IS DISTINCT FROM caller)
    LIMIT 1;
    IF FOUND AND jsonb_typeof(bad.elem) = 'object' THEN
        RAISE EXCEPTION 'insert_user_metrics: row % names device_id %, but the caller is node %',
            bad.ord, bad.elem ->> 'device_id', caller
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Leave device_id out: rows are stored under the calling node.';
    END IF;
    SELECT e.ord, e.elem INTO bad
    FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(elem, ord)
    WHERE jsonb_typeof(e.elem) <> 'object'
       OR coalesce(e.elem ->> 'metric_id', '') !~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$'
       OR octet_length(coalesce(e.elem -> 'labels', '{}')::text) > max_label
       OR coalesce(e.elem -> 'labels', '{}') ?| ARRAY['_job_id', '_device_alias']
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert_user_metrics: row % is invalid: %', bad.ord, left(bad.elem::text, 200)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('metric_id: letters, digits, _.:- (at most 100, not starting '
                                'with a digit); labels: an object of at most %s bytes without '
                                '_job_id or _device_alias.', max_label);
    END IF;
    -- Rate and size per job, counted under a row lock (concurrent calls queue here).
    INSERT INTO kwollect.user_metrics_usage AS u (job_id, minute)
    VALUES (job.job_id, date_trunc('minute', now()))
    ON CONFLICT (job_id) DO NOTHING;
    SELECT * INTO usage FROM kwollect.user_metrics_usage u WHERE u.job_id = job.job_id FOR UPDATE;
    IF usage.minute <> date_trunc('minute', now()) THEN
        usage.minute := date_trunc('minute', now());
        usage.minute_rows := 0;
    END IF;
    IF usage.total_rows + nrows > per_job THEN
        RAISE EXCEPTION 'insert_user_metrics: job % reached its limit of % rows', job.job_id, per_job
            USING ERRCODE = 'PT429';
    END IF;
    IF usage.minute_rows + nrows > per_min THEN
        RAISE EXCEPTION 'insert_user_metrics: job % sends more than % rows per minute',
            job.job_id, per_min
            USING ERRCODE = 'PT429', HINT = 'Retry in the next minute, or send fewer rows.';
    END IF;
    UPDATE kwollect.user_metrics_usage u
    SET total_rows = usage.total_rows + nrows, minute = usage.minute,
        minute_rows = usage.minute_rows + nrows
    WHERE u.job_id = job.job_id;
    -- Timestamps within the job: from its start to a minute from now.
    SELECT e.ord, e.elem INTO bad
    FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(elem, ord)
    WHERE kwollect.parse_time(e.elem ->> 'timestamp', format('timestamp of row %s', e.ord))
          NOT BETWEEN job.start_time AND now() + interval '1 minute'
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert_user_metrics: row % has a timestamp outside job % (from %)',
            bad.ord, job.job_id, job.start_time USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY SELECT * FROM kwollect.insert_rows((
        SELECT coalesce(jsonb_agg(e.elem || jsonb_build_object(
                   'device_id', caller,
                   'labels', coalesce(nullif(e.elem -> 'labels', 'null'), '{}')
                             || jsonb_build_object('_job_id', job.job_id))
                   ORDER BY e.ord), '[]')
        FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(elem, ord)));
END $$;

-- SECURITY DEFINER: the node role can do nothing else (no INSERT on any table).
CREATE OR REPLACE FUNCTION api.insert_user_metrics(
    metric_id text,
    value double precision DEFAULT 'NaN',
    "timestamp" text DEFAULT NULL,
    labels jsonb DEFAULT '{}')
RETURNS SETOF public.metrics LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM kwollect.insert_user_rows(jsonb_build_array(jsonb_strip_nulls(
        jsonb_build_object('metric_id', metric_id, 'timestamp', "timestamp", 'labels', labels))
        || jsonb_build_object('value', value)))
$$;
COMMENT ON FUNCTION api.insert_user_metrics(text, double precision, text, jsonb) IS
    'From a node of a running job, without a token: store one sample under the calling '
    'node''s device_id, labelled with _job_id. Bounded per job (rows per call, per minute, '
    'in total).';

CREATE OR REPLACE FUNCTION api.insert_user_metrics(jsonb)
RETURNS SETOF public.metrics LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM kwollect.insert_user_rows(CASE WHEN jsonb_typeof($1) = 'object'
                                                 THEN jsonb_build_array($1) ELSE $1 END)
$$;
COMMENT ON FUNCTION api.insert_user_metrics(jsonb) IS
    'insert_user_metrics for one JSON object or an array of them, atomically.';

-- Job-wide metrics.  The operator's requests (kwollect-setup-db --jobmetrics_requests_path,
-- one SELECT per line over the relation `jobmetrics`) run with `jobmetrics` showing the
-- job's rows only; each request's columns become keys of the result.
CREATE TABLE IF NOT EXISTS kwollect.jobmetrics_requests (
    position integer PRIMARY KEY,
    request  text NOT NULL
);

CREATE OR REPLACE VIEW public.jobmetrics AS
SELECT m.*
FROM public.metrics_by_job m
WHERE m.job_id = nullif(current_setting('kwollect.job_id', true), '')::integer;

DROP FUNCTION IF EXISTS kwollect.job_energy(integer, text);

-- Built in, from the job's rows as get_metrics returns them (aliases summed): per node,
-- the energy (trapezoidal integration of the job_energy_metric power, in Wh), the mean
-- power over the time covered and the peak; and per node and metric, the completeness:
-- samples stored against samples expected over the job's window at the series' period
-- (the median interval between its samples), and the longest gap.
--
-- p_summary false ('raw'): every raw row of the job, through get_metrics(job_id), under
-- its row bound.  p_summary true ('summary'): the whole 5-minute buckets [p_lo, p_hi)
-- except p_dirty (late rows not summarized yet) from kwollect.summary, the rest of the
-- window (the partial buckets at its edges, the buckets after the watermark, the dirty
-- ones) from raw rows, each range through get_metrics under the row bound.  The power
-- is then integrated over the raw samples and one point per bucket (its avg, at the
-- bucket's middle), peaks are the buckets' max, samples stored their count + nan_count;
-- a source series of an alias counts for the alias as its sources are summed per
-- timestamp: stored and period from the source with the most samples, power and peak
-- from the sum of the sources' avg and max (docs/jobs.md).
CREATE OR REPLACE FUNCTION kwollect.job_builtin_figures(
    p_job_id integer, p_metric text, p_summary boolean, p_lo timestamptz, p_hi timestamptz,
    p_dirty timestamptz[], p_series integer[])
RETURNS jsonb LANGUAGE sql STABLE AS $$
    WITH win AS MATERIALIZED (
        SELECT r.start_time AS t0, r.end_time AS t1, r.devices
        FROM kwollect.metrics_request(p_job_id, NULL, NULL, NULL, NULL, NULL) r
    ), req_series AS MATERIALIZED (
        SELECT rs.* FROM win, kwollect.request_series(win.devices, NULL) rs
        WHERE p_summary AND NOT rs.out_labels ? '_job_id'
    ), origs AS (  -- an alias's sources, as get_metrics labels its rows (_device_orig)
        SELECT r.out_device, r.metric_id, r.out_labels, jsonb_agg(DISTINCT r.orig_device) AS orig
        FROM req_series r WHERE r.via_alias GROUP BY 1, 2, 3
    ), sel AS MATERIALIZED (  -- summary: the output series (device, metric, labels) of each series
        SELECT r.series_id, r.out_device AS device_id, r.metric_id,
               CASE WHEN r.via_alias
                    THEN r.out_labels || jsonb_build_object('_device_orig', o.orig)
                    ELSE r.out_labels END AS labels
        FROM req_series r
        LEFT JOIN origs o ON r.via_alias AND o.out_device = r.out_device
                         AND o.metric_id = r.metric_id AND o.out_labels = r.out_labels
    ), used AS MATERIALIZED (  -- summary: the buckets read from kwollect.summary
        SELECT b FROM generate_series(p_lo, p_hi - interval '5 minutes', interval '5 minutes') b
        WHERE p_summary AND b <> ALL (coalesce(p_dirty, '{}'))
    ), islands AS (
        SELECT min(b) AS s, max(b) + interval '5 minutes' AS e
        FROM (SELECT b, b - interval '5 minutes' * row_number() OVER (ORDER BY b) AS grp
              FROM used) u
        GROUP BY grp
    ), raw_ranges AS (  -- summary: the rest of the window, [lo, hi) and the last [lo, t1]
        SELECT coalesce(lag(i.e) OVER (ORDER BY i.s), win.t0) AS lo,
               i.s - interval '1 microsecond' AS hi
        FROM win, islands i
        UNION ALL
        SELECT coalesce((SELECT max(e) FROM islands), win.t0), win.t1 FROM win
    ), raw AS (  -- part: the raw range a row comes from (intervals are taken within one)
        SELECT m."timestamp" AS ts, m.device_id, m.metric_id, m.value, m.labels,
               NULL::timestamptz AS part
        FROM api.get_metrics(job_id => p_job_id) m
        WHERE NOT p_summary
        UNION ALL
        SELECT m."timestamp", m.device_id, m.metric_id, m.value, m.labels, r.lo
        FROM raw_ranges r
        CROSS JOIN LATERAL api.get_metrics(
            job_id => p_job_id,
            start_time => to_char(r.lo AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00"'),
            end_time => to_char(r.hi AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00"')) m
        WHERE p_summary AND r.lo <= r.hi
    ), rows AS MATERIALIZED (
        SELECT r.ts, r.device_id, r.metric_id, r.value, r.labels,
               lag(r.ts) OVER s AS prev_ts
        FROM raw r
        WHERE NOT r.labels ? '_job_id'
        WINDOW s AS (PARTITION BY r.device_id, r.metric_id, r.labels, r.part ORDER BY r.ts)
    ), buckets AS MATERIALIZED (  -- summary: per series and bucket (Citus: one pushed-down query)
        SELECT su.series_id, su.bucket, su.count, su.nan_count, su.avg, su.max,
               lag(su.bucket) OVER (PARTITION BY su.series_id ORDER BY su.bucket) AS prev_bucket
        FROM kwollect.summary su
        WHERE p_summary AND su.series_id = ANY (p_series)
          AND su.bucket >= p_lo AND su.bucket < p_hi
          AND su.bucket <> ALL (coalesce(p_dirty, '{}'))
    ), bucket_series AS (
        SELECT b.series_id, sum(b.count + b.nan_count) AS stored,
               percentile_disc(0.5) WITHIN GROUP (ORDER BY b.count + b.nan_count) AS median_n,
               -- the buckets read raw in between (dirty) do not count
               max(date_part('epoch', b.bucket - b.prev_bucket)
                   - 300 * (SELECT count(*) FROM unnest(p_dirty) d
                            WHERE d > b.prev_bucket AND d < b.bucket)) AS max_step_s
        FROM buckets b GROUP BY 1
    ), summary_series AS (
        -- the period: 5 minutes over the mean samples per bucket, of the buckets within one
        -- sample of the median (not those of a gap): 7 s from buckets of 42 and 43 samples
        SELECT s.device_id, s.metric_id, s.labels, max(x.stored) AS stored,
               min(x.period_s) AS period_s, max(x.max_step_s) AS max_step_s
        FROM (SELECT bs.series_id, bs.stored, bs.max_step_s,
                     300.0 * count(*) / nullif(sum(b.count + b.nan_count), 0) AS period_s
              FROM bucket_series bs
              JOIN buckets b ON b.series_id = bs.series_id
                            AND b.count + b.nan_count BETWEEN bs.median_n - 1 AND bs.median_n + 1
              GROUP BY 1, 2, 3) x
        JOIN sel s ON s.series_id = x.series_id
        GROUP BY 1, 2, 3
    ), raw_series AS (
        SELECT r.device_id, r.metric_id, r.labels, count(*) AS stored,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY date_part('epoch', r.ts - r.prev_ts))
                   FILTER (WHERE r.prev_ts IS NOT NULL AND r.ts > r.prev_ts) AS period_s,
               max(date_part('epoch', r.ts - r.prev_ts)) AS max_gap_s
        FROM rows r GROUP BY 1, 2, 3
    ), series AS (
        SELECT device_id, metric_id, stored, period_s, max_gap_s FROM raw_series
        WHERE NOT p_summary
        UNION ALL
        -- the period: the summaries' (above), else the raw rows' median interval; a gap
        -- between buckets is seen to within a bucket (a run of missing buckets, plus one
        -- period)
        SELECT x.device_id, x.metric_id, x.stored, x.period_s,
               greatest(x.raw_gap_s, CASE WHEN x.max_step_s > 300
                                          THEN x.max_step_s - 300 + x.period_s
                                          ELSE x.period_s END)
        FROM (SELECT coalesce(r.device_id, s.device_id) AS device_id,
                     coalesce(r.metric_id, s.metric_id) AS metric_id,
                     coalesce(r.stored, 0) + coalesce(s.stored, 0) AS stored,
                     coalesce(s.period_s, r.period_s) AS period_s,
                     r.max_gap_s AS raw_gap_s, s.max_step_s
              FROM raw_series r
              FULL JOIN summary_series s ON s.device_id = r.device_id
                                        AND s.metric_id = r.metric_id AND s.labels = r.labels
              WHERE p_summary) x
    ), completeness AS (
        SELECT s.device_id, s.metric_id, sum(s.stored) AS stored,
               sum(CASE WHEN s.period_s > 0
                        THEN floor(date_part('epoch', win.t1 - win.t0) / s.period_s) + 1
                        ELSE s.stored END) AS expected,
               min(s.period_s) AS period_s, max(s.max_gap_s) AS max_gap_s
        FROM series s, win GROUP BY 1, 2
    ), points AS (  -- the power: raw samples, and (summary) each bucket's avg at its start
        -- and its end (ord: at one timestamp, a bucket's end before a raw sample before a
        -- bucket's start), so that a whole bucket counts avg x 5 minutes
        SELECT r.ts, 1 AS ord, r.device_id, r.labels, r.value, r.value AS peak
        FROM rows r WHERE r.metric_id = p_metric
        UNION ALL
        SELECT b.bucket + e.shift, e.ord, s.device_id, s.labels,
               coalesce(sum(b.avg), 'NaN'), sum(b.max)
        FROM buckets b
        JOIN sel s ON s.series_id = b.series_id
        CROSS JOIN (VALUES (interval '0', 2), (interval '5 minutes', 0)) AS e(shift, ord)
        WHERE s.metric_id = p_metric
        GROUP BY b.bucket, e.shift, e.ord, s.device_id, s.labels
    ), lagged AS (
        SELECT p.*, lag(p.ts) OVER s AS prev_ts, lag(p.value) OVER s AS prev
        FROM points p
        WINDOW s AS (PARTITION BY p.device_id, p.labels ORDER BY p.ts, p.ord)
    ), power AS (
        SELECT r.device_id,
               sum((r.value + r.prev) / 2 * date_part('epoch', r.ts - r.prev_ts))
                   FILTER (WHERE r.prev IS NOT NULL AND r.prev <> 'NaN') / 3600 AS energy_wh,
               sum(date_part('epoch', r.ts - r.prev_ts))
                   FILTER (WHERE r.prev IS NOT NULL AND r.prev <> 'NaN') AS covered_s,
               max(r.peak) AS peak_w
        FROM lagged r
        WHERE r.value <> 'NaN'
        GROUP BY 1
    )
    SELECT jsonb_build_object(
        'job_id', p_job_id,
        'start_time', win.t0,
        'end_time', win.t1,
        'method', CASE WHEN p_summary THEN 'summary' ELSE 'raw' END,
        'energy_metric', p_metric,
        -- NULL (not 0 Wh) where no power was stored: a missing figure, with a hint
        'job_energy_watthour', (SELECT sum(energy_wh) FROM power),
        'node_energy_watthour', coalesce((
            SELECT jsonb_object_agg(n.node, p.energy_wh ORDER BY n.node)
            FROM (SELECT DISTINCT j.node FROM public.nodetime_by_job j
                  WHERE j.job_id = p_job_id) n
            LEFT JOIN power p ON p.device_id = n.node), '{}'),
        'energy_hint', CASE
            WHEN NOT EXISTS (SELECT 1 FROM power WHERE energy_wh IS NOT NULL) THEN
                format('no %s samples for this job''s nodes in its window: the energy is '
                       'unknown. Check the nodes'' power collection, or set job_energy_metric '
                       '(kwollect.settings) to the power metric this site collects', p_metric)
            WHEN EXISTS (SELECT 1 FROM public.nodetime_by_job j
                         WHERE j.job_id = p_job_id AND NOT EXISTS (
                             SELECT 1 FROM power p WHERE p.device_id = j.node
                             AND p.energy_wh IS NOT NULL)) THEN
                format('some nodes have no %s samples: their energy is null and the job''s '
                       'total covers the others only', p_metric)
        END,
        'job_mean_power_watt', (SELECT sum(energy_wh * 3600 / covered_s) FROM power
                                WHERE covered_s > 0),
        'node_mean_power_watt', coalesce((SELECT jsonb_object_agg(device_id,
                                                                  energy_wh * 3600 / covered_s)
                                          FROM power WHERE covered_s > 0), '{}'),
        'job_peak_power_watt', (SELECT max(peak_w) FROM power),
        'node_peak_power_watt', coalesce((SELECT jsonb_object_agg(device_id, peak_w)
                                          FROM power), '{}'),
        'completeness', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'device_id', c.device_id, 'metric_id', c.metric_id,
                       'stored', c.stored, 'expected', c.expected,
                       'ratio', round((c.stored / greatest(c.expected, 1))::numeric, 4),
                       'period_s', c.period_s, 'max_gap_s', c.max_gap_s)
                   ORDER BY c.device_id COLLATE "C", c.metric_id COLLATE "C")
            FROM completeness c), '[]'))
    FROM win
$$;
COMMENT ON FUNCTION kwollect.job_builtin_figures(integer, text, boolean, timestamptz,
                                                 timestamptz, timestamptz[], integer[]) IS
    'A job''s built-in figures (get_job_metrics) from its raw rows (p_summary false), or from '
    'the 5-minute summaries of the whole buckets [p_lo, p_hi) but p_dirty, of series p_series, '
    'and raw rows for the rest of the window (p_summary true).';

-- The built-in figures of a job: from its raw rows (method 'raw', the figures exactly)
-- while they fit in the row bound (kwollect.max_rows or the setting max_rows, as
-- get_metrics), else (get_metrics refused them: HTTP 413) from the 5-minute summaries for
-- the whole buckets below the watermark that no late row made dirty, and raw rows for the
-- rest (method 'summary').  Measured differences of the summary method against the raw
-- figures are in docs/jobs.md.
CREATE OR REPLACE FUNCTION kwollect.job_builtin_metrics(p_job_id integer, p_metric text)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    req   record;
    w_lo    timestamptz;
    w_hi    timestamptz;
    dirty timestamptz[];
    ids   integer[];
BEGIN
    BEGIN
        RETURN kwollect.job_builtin_figures(p_job_id, p_metric, false, NULL, NULL, NULL, NULL);
    EXCEPTION WHEN SQLSTATE 'PT413' THEN
        NULL;  -- too many raw rows: on to the summaries
    END;
    SELECT * INTO req FROM kwollect.metrics_request(p_job_id, NULL, NULL, NULL, NULL, NULL);
    -- whole buckets: from the first that starts in the window to the one of its end
    -- (partial: the samples after the end are in it), not past the watermark
    w_lo := kwollect.bucket_of(req.start_time);
    IF w_lo < req.start_time THEN
        w_lo := w_lo + interval '5 minutes';
    END IF;
    w_hi := least(kwollect.bucket_of(req.end_time),
                coalesce((SELECT s.watermark FROM kwollect.summary_state s), '-infinity'));
    w_hi := greatest(w_lo, w_hi);
    SELECT array_agg(DISTINCT b) INTO dirty
    FROM kwollect.summary_dirty d,
         generate_series(greatest(kwollect.bucket_of(d.lo), w_lo),
                         least(kwollect.bucket_of(d.hi), w_hi - interval '5 minutes'),
                         interval '5 minutes') b
    WHERE d.lo < w_hi AND d.hi >= w_lo;
    SELECT array_agg(rs.series_id) INTO ids
    FROM kwollect.request_series(req.devices, NULL) rs
    WHERE NOT rs.out_labels ? '_job_id';
    RETURN kwollect.job_builtin_figures(p_job_id, p_metric, true, w_lo, w_hi, dirty, ids);
END $$;
COMMENT ON FUNCTION kwollect.job_builtin_metrics(integer, text) IS
    'get_job_metrics'' built-in figures: from the raw rows (method raw) under the row bound, '
    'else from the 5-minute summaries plus raw rows at the edges (method summary).';

CREATE OR REPLACE FUNCTION api.get_job_metrics(job_id integer)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    result   jsonb;
    req      record;
    row_json jsonb;
BEGIN
    result := kwollect.job_builtin_metrics(job_id, kwollect.setting('job_energy_metric'));
    PERFORM set_config('kwollect.job_id', job_id::text, true);
    FOR req IN SELECT position, request FROM kwollect.jobmetrics_requests ORDER BY position LOOP
        BEGIN
            EXECUTE format('SELECT to_jsonb(q) FROM (%s) q LIMIT 1', req.request) INTO row_json;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION 'job metrics request % failed: %', req.position, SQLERRM
                USING HINT = 'Fix the line in the file given to --jobmetrics_requests_path '
                             'and re-run kwollect-setup-db.';
        END;
        result := result || coalesce(row_json, '{}');
    END LOOP;
    PERFORM set_config('kwollect.job_id', '', true);
    RETURN result;
END $$;
COMMENT ON FUNCTION api.get_job_metrics(integer) IS
    'Job-wide metrics: energy (Wh), mean and peak power per node and for the job, data '
    'completeness per node and metric, plus the site''s configured requests. method: raw '
    '(from every raw sample, exact) or, for a job over the row bound, summary (5-minute '
    'summaries with raw samples at the edges: energy within 0.1 %, peaks and counts exact; '
    'docs/jobs.md).';

-- A job's window, as get_metrics(job_id => ...) reads it (kwollect.metrics_request: from
-- its first node's start to its last node's stop, or to now while a node still runs), for
-- clients that choose a summary level by the job's length before reading (the web view:
-- raw samples up to 30 minutes, 5-minute summaries up to 7 days, the 1-hour rollup
-- beyond).  get_job_metrics has the window too.
CREATE OR REPLACE FUNCTION api.job_window(job_id integer)
RETURNS TABLE (start_time timestamptz, end_time timestamptz, running boolean)
LANGUAGE sql STABLE AS $$
    SELECT r.start_time, r.end_time,
           EXISTS (SELECT 1 FROM public.nodetime_by_job j
                   WHERE j.job_id = job_window.job_id AND j.stop_time IS NULL)
    FROM kwollect.metrics_request(job_window.job_id, NULL, NULL, NULL, NULL, NULL) r
$$;
COMMENT ON FUNCTION api.job_window(integer) IS
    'A job''s time window, as get_metrics(job_id) reads it: start_time (its first node''s '
    'start), end_time (its last node''s stop, or now while running) and running. HTTP 404 '
    'for an unknown job.';
