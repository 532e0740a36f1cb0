-- kwollect schema, part 5: the SQL API (schema api), served over HTTP as /rpc/<function>
-- by kwollect-api or PostgREST.  Every statement is static SQL with bound parameters.

-- Times: epoch seconds (fractional allowed) or any timestamptz literal; a literal without
-- an offset is read as UTC, whatever the session's TimeZone.
CREATE OR REPLACE FUNCTION kwollect.parse_time(p_text text, p_name text DEFAULT 'time')
RETURNS timestamptz LANGUAGE plpgsql STABLE
SET timezone = 'UTC' AS $$
BEGIN
    IF p_text IS NULL OR btrim(p_text) = '' THEN
        RETURN NULL;
    END IF;
    IF p_text ~ '^\s*[+-]?[0-9]+(\.[0-9]*)?\s*$' THEN
        RETURN to_timestamp(p_text::double precision);
    END IF;
    RETURN p_text::timestamptz;
EXCEPTION WHEN data_exception THEN
    RAISE EXCEPTION 'invalid %: %', p_name, p_text
        USING ERRCODE = 'invalid_datetime_format',
              HINT = 'Give epoch seconds (e.g. 1606389005.5) or an ISO 8601 date and time '
                     '(e.g. 2020-01-06T13:35:00 read as UTC, or 2020-01-06T13:35:00+01:00).';
END $$;

-- A comma-separated list as an array: items trimmed, empty ones dropped, and with
-- p_cut_domain, each item cut at its first dot (node-1.site.fr -> node-1).
CREATE OR REPLACE FUNCTION kwollect.split_list(p_text text, p_cut_domain boolean DEFAULT false)
RETURNS text[] LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(DISTINCT item ORDER BY item)
    FROM (SELECT CASE WHEN p_cut_domain THEN split_part(btrim(x), '.', 1) ELSE btrim(x) END AS item
          FROM unnest(string_to_array(p_text, ',')) AS x) s
    WHERE item <> ''
$$;

CREATE OR REPLACE FUNCTION kwollect.parse_as_rate(p_text text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_text IS NULL OR lower(btrim(p_text)) IN ('', 'false', 'f', '0', 'no', 'off') THEN
        RETURN 'no';
    ELSIF lower(btrim(p_text)) IN ('true', 't', '1', 'yes', 'on') THEN
        RETURN 'all';
    ELSIF lower(btrim(p_text)) = 'auto' THEN
        RETURN 'auto';
    END IF;
    RAISE EXCEPTION 'invalid as_rate: %', p_text
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Use true, false, or auto (rates for metric ids ending in _total only).';
END $$;

-- get_metrics' as_rate takes a boolean (Kwollect 1.x Grafana dashboards call
-- api.get_metrics(..., summary => true, as_rate => false)) or a word ('auto', 'true',
-- 'yes'... as text, from the HTTP API or SQL): an enum with implicit casts from boolean and
-- from text.  An overload would do for SQL but would make every HTTP call ambiguous
-- (PostgREST chooses among overloads by parameter names only).  Literals in SQL are read
-- by the enum itself (lower case only); text values, from any case, by parse_as_rate.
DO $$
BEGIN
    IF to_regtype('api.as_rate_mode') IS NULL THEN
        CREATE TYPE api.as_rate_mode AS ENUM ('false', 'true', 'auto', 'f', 't', '0', '1',
                                              'no', 'yes', 'off', 'on');
    END IF;
END $$;
COMMENT ON TYPE api.as_rate_mode IS
    'get_metrics as_rate: true (rates of every metric), false, or auto (rates of *_total '
    'counters only); also a boolean.';

CREATE OR REPLACE FUNCTION kwollect.as_rate_mode(p_flag boolean) RETURNS api.as_rate_mode
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_flag THEN 'true'::api.as_rate_mode ELSE 'false'::api.as_rate_mode END
$$;

CREATE OR REPLACE FUNCTION kwollect.as_rate_mode(p_text text) RETURNS api.as_rate_mode
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE kwollect.parse_as_rate(p_text)
               WHEN 'all' THEN 'true'::api.as_rate_mode
               WHEN 'auto' THEN 'auto'::api.as_rate_mode
               ELSE 'false'::api.as_rate_mode END
$$;

-- get_metrics' summary takes a boolean (true: 5-minute summaries, as in Kwollect 1.x) or a
-- word: '5min', '1h' (the 1-hour rollup, for ranges of months), or the boolean words; the
-- same enum-with-casts as as_rate.  kwollect.parse_summary gives 'raw', '5min' or '1h'.
CREATE OR REPLACE FUNCTION kwollect.parse_summary(p_text text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_text IS NULL OR lower(btrim(p_text)) IN ('', 'false', 'f', '0', 'no', 'off') THEN
        RETURN 'raw';
    ELSIF lower(btrim(p_text)) IN ('true', 't', '1', 'yes', 'on', '5min') THEN
        RETURN '5min';
    ELSIF lower(btrim(p_text)) = '1h' THEN
        RETURN '1h';
    END IF;
    RAISE EXCEPTION 'invalid summary: %', p_text
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Use false (raw samples), true or 5min (5-minute summaries), or 1h '
                     '(1-hour rollups).';
END $$;

DO $$
BEGIN
    IF to_regtype('api.summary_mode') IS NULL THEN
        CREATE TYPE api.summary_mode AS ENUM ('false', 'true', '5min', '1h', 'f', 't', '0', '1',
                                              'no', 'yes', 'off', 'on');
    END IF;
END $$;
COMMENT ON TYPE api.summary_mode IS
    'get_metrics summary: false (raw samples), true or 5min (5-minute summaries), 1h (1-hour '
    'rollups); also a boolean.';

CREATE OR REPLACE FUNCTION kwollect.summary_mode(p_flag boolean) RETURNS api.summary_mode
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_flag THEN 'true'::api.summary_mode ELSE 'false'::api.summary_mode END
$$;

CREATE OR REPLACE FUNCTION kwollect.summary_mode(p_text text) RETURNS api.summary_mode
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE kwollect.parse_summary(p_text)
               WHEN '5min' THEN '5min'::api.summary_mode
               WHEN '1h' THEN '1h'::api.summary_mode
               ELSE 'false'::api.summary_mode END
$$;

-- Whether a get_metrics call reads raw samples, folded to a constant when the call's
-- summary argument is one (the enum's text output is only stable, so it is not folded
-- inside the call): get_metrics then hands its raw branches a window that PostgreSQL
-- prunes every partition from at plan time, instead of planning each partition of
-- kwollect.samples and kwollect.samples_compact for a summary read.
CREATE OR REPLACE FUNCTION kwollect.reads_raw(p_summary api.summary_mode) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT kwollect.parse_summary(p_summary::text) = 'raw'
$$;

-- The implicit casts of both enums, from boolean and from text.
DO $$
DECLARE
    mode   text;
    source regtype;
BEGIN
    FOREACH mode IN ARRAY ARRAY['as_rate_mode', 'summary_mode'] LOOP
        FOREACH source IN ARRAY ARRAY['boolean'::regtype, 'text'::regtype] LOOP
            IF NOT EXISTS (SELECT FROM pg_cast WHERE castsource = source
                           AND casttarget = format('api.%I', mode)::regtype) THEN
                EXECUTE format('CREATE CAST (%s AS api.%I) '
                               'WITH FUNCTION kwollect.%I(%s) AS IMPLICIT',
                               source, mode, mode, source);
            END IF;
        END LOOP;
    END LOOP;
END $$;

-- What a get_metrics call asks for: its time window and its device and metric lists.
-- One row, and the planner is told so (ROWS 1): with the default estimate of 1,000 rows
-- for a set-returning function, get_metrics' plan expected thousands of requested series
-- and hashed each chunk's rows to join them to the series' text columns, instead of
-- hashing the 200 series once; ROWS 1 flips it (server CPU of the issue's 1.44 M-row read:
-- 0.92-0.97 us per row against 1.03-1.06, docs/performance.md).
CREATE OR REPLACE FUNCTION kwollect.metrics_request(
    p_job_id integer, p_nodes text, p_devices text, p_metrics text,
    p_start text, p_end text)
RETURNS TABLE (start_time timestamptz, end_time timestamptz, devices text[], metrics text[])
LANGUAGE plpgsql STABLE ROWS 1 AS $$
DECLARE
    t0 timestamptz := kwollect.parse_time(p_start, 'start_time');
    t1 timestamptz := kwollect.parse_time(p_end, 'end_time');
    job_start timestamptz;
    job_stop timestamptz;
    job_nodes text[];
BEGIN
    devices := kwollect.split_list(concat_ws(',', p_nodes, p_devices), true);
    metrics := kwollect.split_list(p_metrics);
    IF p_job_id IS NOT NULL THEN
        SELECT min(j.start_time),
               -- a running job ends now, or at its start when the scheduler's clock
               -- (OAR: whole seconds) puts that a little ahead of ours
               CASE WHEN bool_or(j.stop_time IS NULL) THEN greatest(now(), min(j.start_time))
                    ELSE max(j.stop_time) END,
               array_agg(DISTINCT j.node)
          INTO job_start, job_stop, job_nodes
          FROM public.nodetime_by_job j WHERE j.job_id = p_job_id;
        IF job_start IS NULL THEN
            RAISE EXCEPTION 'job % not found', p_job_id
                USING ERRCODE = 'PT404',  -- PostgREST and kwollect-api: HTTP 404
                      HINT = 'The job is unknown to nodetime_by_job (not started yet, or not '
                             'recorded by the scheduler integration).';
        END IF;
        devices := coalesce(devices, job_nodes);
        t0 := coalesce(t0, job_start);
        t1 := coalesce(t1, job_stop);
    ELSIF devices IS NULL THEN
        RAISE EXCEPTION 'Missing ''devices'', ''nodes'' or ''job_id'' argument'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF t0 IS NULL AND t1 IS NULL THEN
        t1 := now();
    END IF;
    start_time := coalesce(t0, t1 - interval '5 minutes');
    end_time := coalesce(t1, t0 + interval '5 minutes');
    IF start_time > end_time THEN
        RAISE EXCEPTION 'start_time (%) is after end_time (%)', start_time, end_time
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEXT;
END $$;

-- The series a request reads: their own rows, and the sources of requested aliases.
-- rank orders series by (device_id, metric_id, labels) for the deterministic output order.
CREATE OR REPLACE FUNCTION kwollect.request_series(p_devices text[], p_metrics text[])
RETURNS TABLE (series_id integer, via_alias boolean, rank bigint, out_device text,
               metric_id text, out_labels jsonb, orig_device text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT s.series_id, s.via_alias,
           dense_rank() OVER (ORDER BY s.out_device COLLATE "C", s.metric_id COLLATE "C",
                              s.out_labels),
           s.out_device, s.metric_id, s.out_labels, s.orig_device
    FROM (
        SELECT se.series_id, false AS via_alias, se.device_id AS out_device, se.metric_id,
               se.labels - '_device_alias' AS out_labels, se.device_id AS orig_device
        FROM kwollect.series se
        WHERE se.device_id = ANY (p_devices)
          AND (p_metrics IS NULL OR se.metric_id = ANY (p_metrics))
        UNION ALL
        SELECT se.series_id, true, se.device_alias, se.metric_id,
               se.labels - '_device_alias', se.device_id
        FROM kwollect.series se
        WHERE se.device_alias = ANY (p_devices)
          AND (p_metrics IS NULL OR se.metric_id = ANY (p_metrics))
    ) s
$$;

-- Refuse requests over max_rows raw rows, before any row is sent.  The count comes from
-- the summary's per-bucket sample counts (whole buckets) plus the raw rows not yet
-- summarized, so it is exact to within one 5-minute bucket at the start.
CREATE OR REPLACE FUNCTION kwollect.check_row_bound(p_series integer[], p_start timestamptz,
                                                    p_end timestamptz)
RETURNS boolean LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    -- kwollect-api sets kwollect.max_rows per request; SQL callers may too (it bounds
    -- their own query, nothing privileged).
    bound     bigint := coalesce(nullif(current_setting('kwollect.max_rows', true), ''),
                                 kwollect.setting('max_rows'))::bigint;
    watermark timestamptz := (SELECT s.watermark FROM kwollect.summary_state s);
    split     timestamptz;
    n         bigint := 0;
BEGIN
    IF bound IS NULL OR bound <= 0 OR p_series IS NULL THEN
        RETURN true;
    END IF;
    split := greatest(p_start, least(coalesce(watermark, p_start), p_end));
    -- Rows written late are not in the summary yet: count the raw rows instead.
    IF EXISTS (SELECT 1 FROM kwollect.summary_dirty d WHERE d.lo <= p_end AND d.hi >= p_start) THEN
        split := p_start;
    END IF;
    IF split > p_start THEN
        SELECT coalesce(sum(su.count + su.nan_count), 0) INTO n
        FROM kwollect.summary su
        WHERE su.series_id = ANY (p_series)
          AND su.bucket >= kwollect.bucket_of(p_start) AND su.bucket < split;
    END IF;
    IF n <= bound THEN
        SELECT n + count(*) INTO n FROM (
            SELECT 1 FROM kwollect.samples s
            WHERE s.series_id = ANY (p_series)
              AND kwollect.minute_key(s.ts) BETWEEN kwollect.minute_key(split)
                                                AND kwollect.minute_key(p_end)
              AND s.ts >= split AND s.ts <= p_end
            LIMIT bound + 1 - n) x;
    END IF;
    IF n <= bound THEN  -- compacted blocks: their sample counts (a block at a bound counts whole)
        SELECT n + coalesce(sum(c.block_n), 0) INTO n FROM kwollect.samples_compact AS c(series_id, block_start, block_n)
        WHERE c.series_id = ANY (p_series)
          AND c.block_start > split - interval '1 hour' AND c.block_start <= p_end;
    END IF;
    IF n > bound THEN
        RAISE EXCEPTION 'request too large: about % rows, over the limit of % rows', n, bound
            USING ERRCODE = 'PT413',  -- PostgREST and kwollect-api: HTTP 413
                  HINT = 'Narrow the request (fewer devices or metrics, a shorter time window), '
                         'or ask for 5-minute summaries with summary=true.';
    END IF;
    RETURN true;
END $$;

-- Rank of each requested series, as an integer array indexed by series_id - base + 1:
-- an O(1) look-up per row, which keeps the rows narrow until they are sorted.
CREATE OR REPLACE FUNCTION kwollect.rank_map(p_series integer[], p_ranks bigint[],
                                             OUT base integer, OUT ranks integer[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT min(u.sid),
           (SELECT array_agg(coalesce(r.rank, 0)::integer ORDER BY g)
            FROM generate_series(min(u.sid), max(u.sid)) g
            LEFT JOIN unnest(p_series, p_ranks) AS r(sid, rank) ON r.sid = g)
    FROM unnest(p_series) AS u(sid)
$$;

-- What get_metrics reads, resolved once: the window in time and in minute keys, the
-- chunk width (at most about 256 chunks), the series read as themselves (own) and as
-- sources of an alias, each with its rank map, and the row bound check.
CREATE OR REPLACE FUNCTION kwollect.metrics_plan(
    p_job_id integer, p_nodes text, p_devices text, p_metrics text,
    p_start text, p_end text, p_summary boolean)
RETURNS TABLE (t0 timestamptz, t1 timestamptz, k0 integer, k1 integer, step integer,
               own_ids integer[], own_base integer, own_ranks integer[],
               alias_ids integer[], alias_base integer, alias_ranks integer[])
LANGUAGE sql STABLE AS $$
    WITH req AS MATERIALIZED (
        SELECT * FROM kwollect.metrics_request(p_job_id, p_nodes, p_devices, p_metrics,
                                               p_start, p_end)
    ), sel AS MATERIALIZED (
        SELECT rs.* FROM req, kwollect.request_series(req.devices, req.metrics) rs
    ), own AS (
        SELECT array_agg(series_id) AS ids,
               kwollect.rank_map(array_agg(series_id), array_agg(rank)) AS map
        FROM sel WHERE NOT via_alias
    ), alias AS (
        SELECT array_agg(series_id) AS ids,
               kwollect.rank_map(array_agg(series_id), array_agg(rank)) AS map
        FROM sel WHERE via_alias
    )
    SELECT req.start_time, req.end_time,
           kwollect.minute_key(req.start_time), kwollect.minute_key(req.end_time),
           -- Chunks of at least an hour where blocks are compacted: a block is decoded
           -- once per chunk it overlaps.
           -- (At most 8 chunks on Citus, where each chunk is a query of every shard.)
           greatest(1, ceil((kwollect.minute_key(req.end_time)
                             - kwollect.minute_key(req.start_time) + 1)
                            / CASE WHEN kwollect.setting('citus') = 'on' THEN 8.0 ELSE 256.0 END),
                    CASE WHEN EXISTS (SELECT 1 FROM kwollect.partitions pa
                                      WHERE pa.compacted_at IS NOT NULL
                                        AND pa.range_start <= req.end_time
                                        AND pa.range_end > req.start_time)
                         THEN 60 ELSE 1 END)::integer,
           own.ids, (own.map).base, (own.map).ranks,
           alias.ids, (alias.map).base, (alias.map).ranks
    FROM req, own, alias
    WHERE coalesce(p_summary, false)
       OR kwollect.check_retention(req.start_time)
          AND kwollect.check_row_bound((SELECT array_agg(series_id) FROM sel),
                                       req.start_time, req.end_time)
$$;

-- The rows of the series read as themselves in one chunk of a plan, narrow and unsorted:
-- (ts, rank of the output series, value, series_id), for minutes [p_k_lo, p_k_hi] and
-- timestamps in [p_lo, p_hi) and not after p_t1, from the raw partitions (one bitmap scan
-- per partition over all requested series: each heap page once) and the compacted blocks.
-- Every column fixed-width and never NULL: sorting a chunk of these compares ties (the
-- metrics of a device share its timestamps) from cached attribute offsets.
CREATE OR REPLACE FUNCTION kwollect.metrics_own_chunk(
    p_ids integer[], p_base integer, p_ranks integer[],
    p_k_lo integer, p_k_hi integer, p_lo timestamptz, p_hi timestamptz, p_t1 timestamptz)
RETURNS TABLE (ts timestamptz, rank integer, value double precision, series_id integer)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT x.ts, p_ranks[x.series_id - p_base + 1], x.value, x.series_id
    FROM kwollect.samples x
    -- Planned as a bitmap scan (each heap page once, in physical order).  An OR whose
    -- second arm matched nothing used to force that plan; the planner takes it unforced
    -- for this narrow chunk (measured: the read 1.07 s of server CPU against 1.22 with the
    -- OR, and 1.37 with an index scan forced).
    WHERE x.series_id = ANY (p_ids) AND kwollect.minute_key(x.ts) BETWEEN p_k_lo AND p_k_hi
      AND x.ts >= p_lo AND x.ts < p_hi AND x.ts <= p_t1
    UNION ALL
    SELECT d.ts, p_ranks[c.series_id - p_base + 1], d.value, c.series_id
    FROM kwollect.samples_compact c
    CROSS JOIN LATERAL kwollect.block_decode(c.n, c.t0, c.t_unit, c.t_period, c.t_gap, c.t_jit,
                                             c.v_div, c.v_first, c.v_last, c.v_off, c.v_raw) d
    WHERE c.series_id = ANY (p_ids)
      AND c.block_start > p_lo - interval '1 hour' AND c.block_start < p_hi
      AND d.ts >= p_lo AND d.ts < p_hi AND d.ts <= p_t1
$$;

-- The rows of one chunk of a plan, narrow and unsorted: (ts, rank of the output series,
-- value, series_id, via_alias, orig), the own rows above and the alias rows, summed per
-- timestamp, with series_id one of their sources and orig the sorted list of sources
-- (_device_orig).
DROP FUNCTION IF EXISTS kwollect.metrics_chunk(integer[], integer, integer[], integer[], integer,
                                              integer[], integer, integer, timestamptz,
                                              timestamptz, timestamptz, boolean);
CREATE OR REPLACE FUNCTION kwollect.metrics_chunk(
    p_own_ids integer[], p_own_base integer, p_own_ranks integer[],
    p_alias_ids integer[], p_alias_base integer, p_alias_ranks integer[],
    p_k_lo integer, p_k_hi integer, p_lo timestamptz, p_hi timestamptz, p_t1 timestamptz)
RETURNS TABLE (ts timestamptz, rank integer, value double precision, series_id integer,
               via_alias boolean, orig jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT o.ts, o.rank, o.value, o.series_id, false, NULL::jsonb
    FROM kwollect.metrics_own_chunk(p_own_ids, p_own_base, p_own_ranks, p_k_lo, p_k_hi,
                                    p_lo, p_hi, p_t1) o
    UNION ALL
    SELECT s.ts, p_alias_ranks[s.series_id - p_alias_base + 1], sum(s.value),
           min(s.series_id), true, jsonb_agg(DISTINCT se.device_id)
    FROM (SELECT a.ts, a.value, a.series_id FROM kwollect.samples a
          WHERE a.series_id = ANY (p_alias_ids)
            AND kwollect.minute_key(a.ts) BETWEEN p_k_lo AND p_k_hi
          UNION ALL
          SELECT d.ts, d.value, c.series_id
          FROM kwollect.samples_compact c
          CROSS JOIN LATERAL kwollect.block_decode(c.n, c.t0, c.t_unit, c.t_period, c.t_gap,
                                                   c.t_jit, c.v_div, c.v_first, c.v_last,
                                                   c.v_off, c.v_raw) d
          WHERE c.series_id = ANY (p_alias_ids)
            AND c.block_start > p_lo - interval '1 hour' AND c.block_start < p_hi) s
    JOIN kwollect.series se ON se.series_id = s.series_id
    WHERE s.ts >= p_lo AND s.ts < p_hi AND s.ts <= p_t1
    GROUP BY 1, 2
$$;

-- Per-second rate of a counter between two samples, with the reference's reset rule:
-- when the value decreases, the increase is running_max - previous + value.  Values that
-- are 0, non-finite or of magnitude in [1e-290, 1e290] cannot make the float8 operators
-- raise (a difference is then 0 or at least 1e-306, the time step between 1e-6 s and
-- 4.1e9 s); others (5e-324 over 5 s, 1e308 per microsecond) take the rounded arithmetic,
-- which gives IEEE's zero or infinity instead of "value out of range".
CREATE OR REPLACE FUNCTION kwollect.counter_rate_rounded(
    p_value double precision, p_prev double precision, p_running_max double precision,
    p_seconds double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT kwollect.float8_div_rounded(
               CASE WHEN p_value < p_prev
                    THEN kwollect.float8_add_rounded(
                             kwollect.float8_add_rounded(p_running_max, -p_prev), p_value)
                    ELSE kwollect.float8_add_rounded(p_value, -p_prev) END,
               p_seconds)
$$;

CREATE OR REPLACE FUNCTION kwollect.counter_rate(p_value double precision, p_prev double precision,
                                                 p_running_max double precision,
                                                 p_ts timestamptz, p_prev_ts timestamptz)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_prev_ts IS NULL OR p_ts = p_prev_ts THEN NULL
                WHEN (p_value IS NULL OR p_value = 0 OR abs(p_value) BETWEEN 1e-290 AND 1e290
                      OR p_value = 'NaN' OR abs(p_value) = 'Infinity')
                 AND (p_prev IS NULL OR p_prev = 0 OR abs(p_prev) BETWEEN 1e-290 AND 1e290
                      OR p_prev = 'NaN' OR abs(p_prev) = 'Infinity')
                 AND (p_running_max IS NULL OR p_running_max = 0 OR abs(p_running_max) BETWEEN 1e-290 AND 1e290
                      OR p_running_max = 'NaN' OR abs(p_running_max) = 'Infinity')
                THEN CASE WHEN p_value < p_prev THEN (p_running_max - p_prev + p_value)
                          ELSE p_value - p_prev
                     END / date_part('epoch', p_ts - p_prev_ts)
                ELSE kwollect.counter_rate_rounded(p_value, p_prev, p_running_max,
                                                   date_part('epoch', p_ts - p_prev_ts))
           END
$$;

-- The text columns of each requested series (own and through an alias), and whether its
-- rate is asked for.
CREATE OR REPLACE FUNCTION kwollect.metrics_out(p_own_ids integer[], p_alias_ids integer[],
                                                p_rate_mode text)
RETURNS TABLE (series_id integer, via_alias boolean, device_id text, metric_id text,
               labels jsonb, rated boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT se.series_id, v.via_alias,
           CASE WHEN v.via_alias THEN se.device_alias ELSE se.device_id END,
           se.metric_id, se.labels - '_device_alias',
           p_rate_mode = 'all' OR (p_rate_mode = 'auto' AND se.metric_id LIKE '%\_total')
    FROM (VALUES (false, p_own_ids), (true, p_alias_ids)) AS v(via_alias, ids)
    JOIN kwollect.series se ON se.series_id = ANY (v.ids)
$$;

-- The text columns by output rank, as jsonb arrays (element rank - 1): a rank is one
-- (device, metric, labels), whether read as itself or through an alias.
CREATE OR REPLACE FUNCTION kwollect.metrics_names(
    p_own_ids integer[], p_own_base integer, p_own_ranks integer[],
    p_alias_ids integer[], p_alias_base integer, p_alias_ranks integer[])
RETURNS TABLE (devices jsonb, metrics jsonb, labels jsonb)
LANGUAGE sql STABLE PARALLEL SAFE ROWS 1 AS $$
    SELECT jsonb_agg(r.device_id ORDER BY r.rank), jsonb_agg(r.metric_id ORDER BY r.rank),
           jsonb_agg(r.labels ORDER BY r.rank)
    FROM (SELECT DISTINCT ON (1) CASE WHEN o.via_alias
                                      THEN p_alias_ranks[o.series_id - p_alias_base + 1]
                                      ELSE p_own_ranks[o.series_id - p_own_base + 1]
                                 END AS rank,
                 o.device_id, o.metric_id, o.labels
          FROM kwollect.metrics_out(p_own_ids, p_alias_ids, 'no') o
          ORDER BY 1) r
$$;

-- The chunks of a window, in ascending order: minute keys [k, k_hi] and their time bounds.
CREATE OR REPLACE FUNCTION kwollect.metrics_chunks(p_t0 timestamptz, p_k0 integer,
                                                   p_k1 integer, p_step integer)
RETURNS TABLE (k integer, k_hi integer, lo timestamptz, hi timestamptz)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT k, k_hi, greatest(p_t0, to_timestamp(k::double precision * 60)),
           to_timestamp((k_hi + 1)::double precision * 60)
    FROM generate_series(p_k0, p_k1, p_step) AS k,
         LATERAL (SELECT least(k + p_step - 1, p_k1) AS k_hi) b
$$;

-- The labels of an output row, with the sources of a row summed through an alias.
CREATE OR REPLACE FUNCTION kwollect.with_orig(p_labels jsonb, p_orig jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_orig IS NULL THEN p_labels
                ELSE p_labels || jsonb_build_object('_device_orig', p_orig) END
$$;

-- The reads of get_metrics that are not its own rows' stream: rows summed through an alias
-- (raw), and rates (raw or summaries: each series in time order first, so the whole window
-- is sorted).  Never inlined (a function with a SET clause is not): the planner lays out
-- the partitions these scans read when such a read runs, instead of at every get_metrics
-- call.  Inlined, their four scans of kwollect.samples and kwollect.samples_compact made
-- every call plan every partition five times: 300-340 ms with a year of 6-hour partitions
-- (1,465), against 68-72 ms for the own rows' two scans alone (docs/storage.md).  Its rows
-- are materialized before they are sent (rates sorted the whole window already): 5.1 s for
-- the rates of the 1.44 M-row read against 4.9 inlined; a set-returning function of the
-- select list would stream them, but one executor call per row made that read 7.3 s.
CREATE OR REPLACE FUNCTION kwollect.metrics_general(
    p_t0 timestamptz, p_t1 timestamptz, p_k0 integer, p_k1 integer, p_step integer,
    p_own_ids integer[], p_own_base integer, p_own_ranks integer[],
    p_alias_ids integer[], p_alias_base integer, p_alias_ranks integer[],
    p_rate_mode text, p_level text)
RETURNS TABLE ("timestamp" timestamptz, device_id text, metric_id text,
               value double precision, labels jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH win AS (  -- the rows of the whole window, unsorted, for rates
        SELECT m.*
        FROM kwollect.metrics_chunk(p_own_ids, p_own_base, p_own_ranks,
                                    p_alias_ids, p_alias_base, p_alias_ranks,
                                    p_k0, p_k1, p_t0, 'infinity', p_t1) m
        WHERE p_level = 'raw'
        UNION ALL
        SELECT m.*
        FROM kwollect.summary_window(p_own_ids, p_own_base, p_own_ranks,
                                     p_alias_ids, p_alias_base, p_alias_ranks,
                                     p_t0, p_t1, p_level) m
        WHERE p_level <> 'raw'
    ), out AS MATERIALIZED (
        SELECT o.* FROM kwollect.metrics_out(p_own_ids, p_alias_ids, p_rate_mode) o
    ), names AS MATERIALIZED (
        SELECT n.* FROM kwollect.metrics_names(p_own_ids, p_own_base, p_own_ranks,
                                               p_alias_ids, p_alias_base, p_alias_ranks) n
    )
    SELECT c.ts, names.devices ->> (c.rank - 1), names.metrics ->> (c.rank - 1), c.value,
           kwollect.with_orig(names.labels -> (c.rank - 1), c.orig)
    FROM names
    -- OFFSET 0 keeps the chunk bounds computed once per chunk, not once per row
    CROSS JOIN LATERAL (SELECT * FROM kwollect.metrics_chunks(p_t0, p_k0, p_k1, p_step)
                        OFFSET 0) chunk
    CROSS JOIN LATERAL (
        SELECT m.ts, m.rank, m.value, m.orig
        FROM kwollect.metrics_chunk(p_own_ids, p_own_base, p_own_ranks,
                                    p_alias_ids, p_alias_base, p_alias_ranks,
                                    chunk.k, chunk.k_hi, chunk.lo, chunk.hi, p_t1) m
        ORDER BY m.ts, m.rank
    ) c
    WHERE p_rate_mode = 'no' AND p_level = 'raw'
    UNION ALL
    (SELECT w.ts, o.device_id, o.metric_id,
            CASE WHEN o.rated
                 THEN kwollect.counter_rate(w.value, w.prev, w.running_max, w.ts, w.prev_ts)
                 ELSE w.value END,
            kwollect.with_orig(o.labels, w.orig)
     FROM (
         SELECT m.*,
                lag(m.value) OVER series AS prev,
                lag(m.ts) OVER series AS prev_ts,
                max(m.value) OVER (series ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                    AS running_max
         FROM win m
         WHERE p_rate_mode <> 'no'
         WINDOW series AS (PARTITION BY m.rank ORDER BY m.ts)
     ) w
     JOIN out o ON o.series_id = w.series_id AND o.via_alias = w.via_alias
     ORDER BY w.ts, w.rank)
$$;

DROP FUNCTION IF EXISTS api.get_metrics(integer, text, text, text, text, text, boolean, boolean);
DROP FUNCTION IF EXISTS api.get_metrics(integer, text, text, text, text, text, boolean, text);
DROP FUNCTION IF EXISTS api.get_metrics(integer, text, text, text, text, text, boolean,
                                        api.as_rate_mode);
-- Rows come in (timestamp, series rank) order by construction: the window is read chunk
-- by chunk (a lateral join on ascending minute keys, so a nested loop), and each chunk's
-- rows are sorted in memory.  No sort of the whole result, so the first rows stream at
-- once.  Summaries (a few rows per series and hour) are read and sorted in one piece.
-- The raw rows of a chunk are sorted narrow and named after the sort from jsonb arrays
-- indexed by rank (kwollect.metrics_names; an output rank is one (device, metric, labels),
-- whether read as itself or through an alias): no join, so the order is the sort's by
-- construction, and the sort moves a third of the bytes.  Server CPU of the issue's
-- 1.44 M-row read: raw 0.90 us per row against 0.97 with a hash join of the series' names
-- before each sort, compacted 1.22 against 1.41 (the hour's sort no longer spills at
-- work_mem 64 MB).  A look-up per row (an index scan of kwollect.series) had cost 29 % of
-- the time.  A request with no series read through an alias and no rate (the common one)
-- is read here (kwollect.metrics_own_chunk): its sorted rows are (ts, rank, value,
-- series_id), fixed-width and never NULL, so ties on the timestamp (a device's metrics
-- share it) are compared at cached offsets, and its labels are taken as stored; server
-- CPU of the 1.44 M-row raw read 1.22-1.29 s against 1.40 (docs/performance.md).  Rates
-- and rows through an alias are read by kwollect.metrics_general, planned only when such
-- a read runs.
CREATE OR REPLACE FUNCTION api.get_metrics(
    job_id integer DEFAULT NULL,
    nodes text DEFAULT NULL,
    devices text DEFAULT NULL,
    metrics text DEFAULT NULL,
    start_time text DEFAULT NULL,
    end_time text DEFAULT NULL,
    summary api.summary_mode DEFAULT 'false',
    as_rate api.as_rate_mode DEFAULT 'false')
RETURNS TABLE ("timestamp" timestamptz, device_id text, metric_id text,
               value double precision, labels jsonb)
LANGUAGE sql STABLE AS $$
    WITH plan AS MATERIALIZED (
        SELECT p.*, kwollect.parse_as_rate(as_rate::text) AS rate_mode,
               kwollect.parse_summary(summary::text) AS level
        FROM kwollect.metrics_plan(job_id, nodes, devices, metrics, start_time, end_time,
                                   kwollect.parse_summary(summary::text) <> 'raw') p
    ), names AS MATERIALIZED (
        SELECT n.* FROM plan, kwollect.metrics_names(plan.own_ids, plan.own_base,
                                                     plan.own_ranks, plan.alias_ids,
                                                     plan.alias_base, plan.alias_ranks) n
    )
    -- No series read through an alias and no rate (the common request): the own rows only,
    -- whose sorted tuples are four fixed-width columns, none NULL, and their labels as
    -- stored.  OFFSET 0 keeps the chunk bounds computed once per chunk, not once per row.
    SELECT c.ts, names.devices ->> (c.rank - 1), names.metrics ->> (c.rank - 1), c.value,
           names.labels -> (c.rank - 1)
    FROM plan
    CROSS JOIN names
    CROSS JOIN LATERAL (SELECT * FROM kwollect.metrics_chunks(plan.t0, plan.k0, plan.k1,
                                                              plan.step) OFFSET 0) chunk
    CROSS JOIN LATERAL (
        SELECT o.ts, o.rank, o.value
        FROM kwollect.metrics_own_chunk(
            plan.own_ids, plan.own_base, plan.own_ranks, chunk.k, chunk.k_hi,
            -- a summary read: no partition planned (kwollect.reads_raw)
            CASE WHEN kwollect.reads_raw(summary) THEN chunk.lo ELSE 'infinity' END,
            chunk.hi, plan.t1) o
        ORDER BY o.ts, o.rank
    ) c
    WHERE plan.rate_mode = 'no' AND plan.level = 'raw' AND plan.alias_ids IS NULL
    UNION ALL
    (SELECT m.ts, o.device_id, o.metric_id, m.value, kwollect.with_orig(o.labels, m.orig)
     FROM plan
     CROSS JOIN LATERAL kwollect.summary_window(
         plan.own_ids, plan.own_base, plan.own_ranks,
         plan.alias_ids, plan.alias_base, plan.alias_ranks, plan.t0, plan.t1, plan.level) m
     JOIN kwollect.metrics_out(plan.own_ids, plan.alias_ids, 'no') o
       ON o.series_id = m.series_id AND o.via_alias = m.via_alias
     WHERE plan.rate_mode = 'no' AND plan.level <> 'raw'
     ORDER BY m.ts, m.rank)
    UNION ALL
    SELECT g.*
    FROM plan
    CROSS JOIN LATERAL kwollect.metrics_general(plan.t0, plan.t1, plan.k0, plan.k1, plan.step,
                                                plan.own_ids, plan.own_base, plan.own_ranks,
                                                plan.alias_ids, plan.alias_base,
                                                plan.alias_ranks, plan.rate_mode, plan.level) g
    WHERE plan.rate_mode <> 'no' OR (plan.level = 'raw' AND plan.alias_ids IS NOT NULL)
$$;
COMMENT ON FUNCTION api.get_metrics(integer, text, text, text, text, text, api.summary_mode,
                                   api.as_rate_mode) IS
    'Samples of devices (or of a job''s nodes) between start_time and end_time, both '
    'inclusive, ordered by timestamp, device_id, metric_id and labels. '
    'summary=true (or 5min): 5-minute summaries; summary=1h: 1-hour rollups, for ranges of '
    'months; a summary row is a bucket that overlaps the window, from the one start_time '
    'falls in (a job''s first, partial bucket included, as in metrics_by_job_summary), '
    'timestamped at its start. as_rate=true|auto: per-second rate of counters.';

-- Devices and metrics with data in the minute before `at` (for Grafana's variables).
-- params: {"devices": [...]} and/or {"job_id": "1234"} (the reference's form), or the plain
-- parameters devices (comma-separated, as get_metrics takes them) and job_id.
DROP FUNCTION IF EXISTS api.available_metrics(timestamptz, jsonb);
CREATE OR REPLACE FUNCTION api.available_metrics(at timestamptz DEFAULT now(),
                                                 params jsonb DEFAULT '{}',
                                                 devices text DEFAULT NULL,
                                                 job_id integer DEFAULT NULL)
RETURNS TABLE (device_id text, metric_id text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    wanted     text[];
    job        integer;
    candidates integer[];
    live       integer[];
BEGIN
    params := coalesce(params, '{}');
    IF devices IS NOT NULL THEN
        params := params || jsonb_build_object('devices', to_jsonb(ARRAY(
            SELECT split_part(trim(d), '.', 1) FROM unnest(string_to_array(devices, ',')) d
            WHERE trim(d) <> '')));
    END IF;
    IF available_metrics.job_id IS NOT NULL THEN
        params := params || jsonb_build_object('job_id', available_metrics.job_id::text);
    END IF;
    IF params ? 'devices' THEN
        IF jsonb_typeof(params -> 'devices') <> 'array' THEN
            RAISE EXCEPTION 'Cannot parse params->devices, should be JSON array'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT array_agg(x) INTO wanted FROM jsonb_array_elements_text(params -> 'devices') x;
        wanted := coalesce(wanted, '{}');
    END IF;
    IF (params ->> 'job_id') ~ '^\s*[0-9]{1,9}\s*$' THEN
        job := (params ->> 'job_id')::integer;
        SELECT coalesce(wanted, array_agg(DISTINCT j.node)),
               least(at, CASE WHEN bool_or(j.stop_time IS NULL) THEN now() ELSE max(j.stop_time) END)
          INTO wanted, at
          FROM public.nodetime_by_job j WHERE j.job_id = job;
        wanted := coalesce(wanted, '{}');
    END IF;
    -- Three steps (the candidate series, those with samples, their names), each a query of
    -- one kind of table: Citus cannot plan correlated EXISTS on the distributed samples
    -- from the series' reference table; on stock PostgreSQL the plan is the same index
    -- probes on (series_id, minute).
    SELECT array_agg(se.series_id) INTO candidates FROM kwollect.series se
    WHERE wanted IS NULL OR se.device_id = ANY (wanted) OR se.device_alias = ANY (wanted);
    SELECT array_agg(DISTINCT r.series_id) INTO live FROM (
        SELECT s.series_id FROM kwollect.samples s
        WHERE s.series_id = ANY (candidates)
          AND kwollect.minute_key(s.ts) BETWEEN kwollect.minute_key(at - interval '1 minute')
                                            AND kwollect.minute_key(at)
          AND s.ts > at - interval '1 minute' AND s.ts < at
        UNION ALL
        SELECT c.series_id FROM kwollect.samples_compact c
        CROSS JOIN LATERAL kwollect.block_decode(c.n, c.t0, c.t_unit, c.t_period, c.t_gap,
                                                 c.t_jit, c.v_div, c.v_first, c.v_last,
                                                 c.v_off, c.v_raw) d
        WHERE c.series_id = ANY (candidates)
          AND c.block_start > at - interval '61 minutes' AND c.block_start < at
          AND d.ts > at - interval '1 minute' AND d.ts < at) r;
    RETURN QUERY
    SELECT a.device_id, a.metric_id
    FROM (
        SELECT DISTINCT CASE WHEN v.via_alias THEN se.device_alias ELSE se.device_id END AS device_id,
                        se.metric_id
        FROM kwollect.series se
        CROSS JOIN LATERAL (VALUES (false), (true)) AS v(via_alias)
        WHERE (NOT v.via_alias OR se.device_alias IS NOT NULL)
          AND (wanted IS NULL
               OR CASE WHEN v.via_alias THEN se.device_alias ELSE se.device_id END = ANY (wanted))
          AND se.series_id = ANY (live)
    ) a
    ORDER BY CASE WHEN a.device_id ~ '^[a-z]+-\d+$' THEN 1 ELSE 2 END,
             split_part(a.device_id, '-', 1) COLLATE "C",
             coalesce((substring(split_part(a.device_id, '-', 2) FROM '^\d{1,9}'))::integer, 0),
             a.device_id COLLATE "C", a.metric_id COLLATE "C";
END $$;
COMMENT ON FUNCTION api.available_metrics(timestamptz, jsonb, text, integer) IS
    'Devices and metrics with samples in the minute before `at` (default: now; for a job '
    'that ended, its end), for Grafana''s variables. Narrow them with devices '
    '(comma-separated, as get_metrics takes them) and/or job_id, or with the reference''s '
    'params {"devices": [...], "job_id": "1234"}. Devices are also listed by their alias.';

-- Insert rows given as a JSON array of objects {device_id, metric_id[, timestamp][, value]
-- [, labels]}, all in the caller's transaction; returns them as stored.
CREATE OR REPLACE FUNCTION kwollect.insert_rows(p_rows jsonb)
RETURNS SETOF public.metrics LANGUAGE plpgsql AS $$
DECLARE
    bad      record;
    v_ts     timestamptz[];
    v_device text[];
    v_metric text[];
    v_value  double precision[];
    v_labels jsonb[];
    v_series integer[];
BEGIN
    IF jsonb_typeof(p_rows) <> 'array' THEN
        RAISE EXCEPTION 'insert_metrics expects an object or an array of objects, got %',
            jsonb_typeof(p_rows) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT ord, elem INTO bad
    FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(elem, ord)
    WHERE jsonb_typeof(elem) <> 'object'
       OR coalesce(jsonb_typeof(elem -> 'device_id'), '') <> 'string' OR elem ->> 'device_id' = ''
       OR coalesce(jsonb_typeof(elem -> 'metric_id'), '') <> 'string' OR elem ->> 'metric_id' = ''
       OR coalesce(jsonb_typeof(elem -> 'value'), 'null') NOT IN ('number', 'null', 'string')
       OR coalesce(jsonb_typeof(elem -> 'labels'), 'object') NOT IN ('object', 'null')
       OR (jsonb_typeof(elem -> 'value') = 'string'
           AND lower(elem ->> 'value') NOT IN ('nan', 'infinity', '-infinity'))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert_metrics: row % is invalid: %', bad.ord, left(bad.elem::text, 200)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Each row needs non-empty string device_id and metric_id; value is a '
                         'number, null or "NaN"; labels is an object; timestamp is epoch '
                         'seconds or an ISO 8601 date (UTC when it has no offset).';
    END IF;
    SELECT array_agg(coalesce(kwollect.parse_time(e.elem ->> 'timestamp',
                                                  format('timestamp of row %s', e.ord)), now())
                     ORDER BY e.ord),
           array_agg(e.elem ->> 'device_id' ORDER BY e.ord),
           array_agg(e.elem ->> 'metric_id' ORDER BY e.ord),
           array_agg(CASE WHEN e.elem ? 'value' THEN (e.elem ->> 'value')::double precision
                          ELSE 'NaN' END ORDER BY e.ord),
           array_agg(coalesce(nullif(e.elem -> 'labels', 'null'), '{}') ORDER BY e.ord)
      INTO v_ts, v_device, v_metric, v_value, v_labels
      FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(elem, ord);
    IF v_ts IS NULL THEN
        RETURN;
    END IF;
    PERFORM kwollect.check_timestamps(v_ts);
    v_series := kwollect.series_ids(v_device, v_metric, v_labels);
    -- Partitions are created by a statement of their own: a statement cannot attach a
    -- partition to the table it inserts into.  (Not on Citus: see metrics_insert_statement.)
    PERFORM kwollect.ensure_partitions(array_agg(t))
       FROM unnest(v_ts) t
       WHERE NOT kwollect.partition_exists(t) AND kwollect.setting('citus') IS DISTINCT FROM 'on';
    PERFORM kwollect.mark_late(min(t), max(t)) FROM unnest(v_ts) t;
    INSERT INTO kwollect.samples (ts, value, series_id)
    SELECT * FROM unnest(v_ts, v_value, v_series);
    RETURN QUERY SELECT * FROM unnest(v_ts, v_device, v_metric, v_value, v_labels);
END $$;

DROP FUNCTION IF EXISTS api.insert_metrics(text, text, timestamptz, double precision, jsonb);
CREATE OR REPLACE FUNCTION api.insert_metrics(
    device_id text,
    metric_id text,
    "timestamp" text DEFAULT NULL,
    value double precision DEFAULT 'NaN',
    labels jsonb DEFAULT '{}')
RETURNS SETOF public.metrics LANGUAGE sql AS $$
    SELECT * FROM kwollect.insert_rows(jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
        'device_id', device_id, 'metric_id', metric_id, 'timestamp', "timestamp",
        'labels', labels)) || jsonb_build_object('value', value)))
$$;
COMMENT ON FUNCTION api.insert_metrics(text, text, text, double precision, jsonb) IS
    'Insert one sample (timestamp defaults to now, value to NaN, labels to {}).';

CREATE OR REPLACE FUNCTION api.insert_metrics(jsonb)
RETURNS SETOF public.metrics LANGUAGE sql AS $$
    SELECT * FROM kwollect.insert_rows(CASE WHEN jsonb_typeof($1) = 'object'
                                            THEN jsonb_build_array($1) ELSE $1 END)
$$;
COMMENT ON FUNCTION api.insert_metrics(jsonb) IS
    'Insert one sample given as a JSON object, or many given as a JSON array, atomically.';

