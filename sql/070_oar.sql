-- kwollect schema, part 7: OAR.  kwollect-setup-db-oar links OAR's database (postgres_fdw
-- server kwollect_oar, foreign tables oar.jobs, oar.job_types, oar.assigned_resources and
-- oar.resources) and sets job_source = 'oar'.  Unlike the reference, no API call reads OAR
-- live: kwollect.sync_jobs() copies job rows into nodetime_per_job incrementally (new
-- jobs, then the jobs still open), from `kwollect maintain` and update_promoted_metrics.
-- An unreachable or slow OAR database only delays that copy.

INSERT INTO kwollect.settings (key, value) VALUES ('job_source', 'none')
ON CONFLICT (key) DO NOTHING;

CREATE TABLE IF NOT EXISTS kwollect.oar_sync_state (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_job_id    bigint NOT NULL DEFAULT 0,
    last_sync     timestamptz,
    last_error    text,
    last_error_at timestamptz
);
INSERT INTO kwollect.oar_sync_state DEFAULT VALUES ON CONFLICT DO NOTHING;
COMMENT ON TABLE kwollect.oar_sync_state IS
    'OAR synchronisation: highest job id read, time of the last success, last error.';

-- OAR jobs read but not finished yet (waiting or running): read again at each sync.
CREATE TABLE IF NOT EXISTS kwollect.oar_open_jobs (
    job_id bigint PRIMARY KEY
);

-- Job types that promote: exactly `monitor` (every optional metric) or `monitor=<regex>`.
CREATE OR REPLACE FUNCTION kwollect.oar_monitor_regex(p_type text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_type = 'monitor' THEN '.*'
                WHEN p_type LIKE 'monitor=_%' THEN substr(p_type, 9) END
$$;

-- One synchronisation pass; raises when OAR cannot be read (sync_jobs catches that).
CREATE OR REPLACE FUNCTION kwollect.oar_sync() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    high      bigint := (SELECT s.max_job_id FROM kwollect.oar_sync_state s);
    open_ids  bigint[] := (SELECT coalesce(array_agg(o.job_id), '{}') FROM kwollect.oar_open_jobs o);
    jobs      jsonb;
    nodes     jsonb;
    types     jsonb;
    upserted  integer;
BEGIN
    -- Three remote queries, each pushed down whole to OAR's database.
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'job_id', j.job_id, 'state', j.state, 'start', j.start_time, 'stop', j.stop_time,
               'moldable', j.assigned_moldable_job)), '[]')
      INTO jobs
      FROM oar.jobs j
     WHERE j.job_id > high OR j.job_id = ANY (open_ids);
    SELECT coalesce(jsonb_agg(jsonb_build_object('moldable', a.moldable_job_id,
                                                 'node', split_part(r.network_address, '.', 1))),
                    '[]')
      INTO nodes
      FROM oar.assigned_resources a
      JOIN oar.resources r ON r.resource_id = a.resource_id
     WHERE r.type = 'default' AND r.network_address <> ''
       AND a.moldable_job_id = ANY (ARRAY(SELECT (x ->> 'moldable')::integer
                                          FROM jsonb_array_elements(jobs) x
                                          WHERE (x ->> 'start')::bigint > 0));
    SELECT coalesce(jsonb_agg(jsonb_build_object('job_id', t.job_id, 'type', t.type)), '[]')
      INTO types
      FROM oar.job_types t
     WHERE (t.type = 'monitor' OR t.type LIKE 'monitor=%')
       AND t.job_id = ANY (ARRAY(SELECT (x ->> 'job_id')::integer
                                 FROM jsonb_array_elements(jobs) x));

    WITH j AS (
        SELECT (x ->> 'job_id')::integer AS job_id, x ->> 'state' AS state,
               to_timestamp((x ->> 'start')::bigint) AS start_time,
               CASE WHEN x ->> 'state' IN ('Terminated', 'Error')
                    THEN to_timestamp(greatest((x ->> 'stop')::bigint, (x ->> 'start')::bigint))
               END AS stop_time,
               (x ->> 'moldable')::integer AS moldable
        FROM jsonb_array_elements(jobs) x
        WHERE (x ->> 'start')::bigint > 0
    ), rows AS (
        SELECT DISTINCT j.job_id, j.start_time, j.stop_time, n ->> 'node' AS node
        FROM j JOIN jsonb_array_elements(nodes) n ON (n ->> 'moldable')::integer = j.moldable
    ), ins AS (
        INSERT INTO public.nodetime_per_job AS t (job_id, start_time, stop_time, node)
        SELECT * FROM rows
        ON CONFLICT ON CONSTRAINT nodetime_per_job_pkey DO UPDATE SET stop_time = excluded.stop_time
        WHERE t.stop_time IS DISTINCT FROM excluded.stop_time
        RETURNING 1
    )
    SELECT count(*) INTO upserted FROM ins;

    -- Promotion: running jobs with monitor types (a bad regex is left out, with a warning).
    DELETE FROM kwollect.job_promote p
    WHERE p.job_id IN (SELECT (x ->> 'job_id')::integer FROM jsonb_array_elements(jobs) x
                       WHERE x ->> 'state' NOT IN ('Launching', 'Running'));
    INSERT INTO kwollect.job_promote (job_id, metric_id)
    SELECT DISTINCT (t ->> 'job_id')::integer, kwollect.oar_monitor_regex(t ->> 'type')
    FROM jsonb_array_elements(types) t
    JOIN jsonb_array_elements(jobs) x ON x ->> 'job_id' = t ->> 'job_id'
    WHERE x ->> 'state' IN ('Launching', 'Running')
      AND kwollect.oar_monitor_regex(t ->> 'type') IS NOT NULL
      AND kwollect.is_regex(kwollect.oar_monitor_regex(t ->> 'type'))
    ON CONFLICT DO NOTHING;

    -- Open jobs: every job read that is not finished.
    DELETE FROM kwollect.oar_open_jobs o
    WHERE o.job_id IN (SELECT (x ->> 'job_id')::bigint FROM jsonb_array_elements(jobs) x
                       WHERE x ->> 'state' IN ('Terminated', 'Error'));
    INSERT INTO kwollect.oar_open_jobs (job_id)
    SELECT (x ->> 'job_id')::bigint FROM jsonb_array_elements(jobs) x
    WHERE x ->> 'state' NOT IN ('Terminated', 'Error')
    ON CONFLICT DO NOTHING;
    UPDATE kwollect.oar_sync_state s
       SET max_job_id = greatest(s.max_job_id, coalesce((SELECT max((x ->> 'job_id')::bigint)
                                                         FROM jsonb_array_elements(jobs) x), 0)),
           last_sync = now();
    RETURN jsonb_build_object('scheduler', 'oar', 'jobs_read', jsonb_array_length(jobs),
                              'rows_written', upserted,
                              'open_jobs', (SELECT count(*) FROM kwollect.oar_open_jobs));
END $$;

-- Whether a text compiles as a regular expression.
CREATE OR REPLACE FUNCTION kwollect.is_regex(p_regex text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM '' ~ p_regex;
    RETURN true;
EXCEPTION WHEN invalid_regular_expression THEN
    RAISE WARNING 'OAR job type monitor=%: invalid regex, ignored', p_regex;
    RETURN false;
END $$;

-- Job rows from the scheduler's database, when one is linked; never raises: a failure is
-- recorded in oar_sync_state, logged as a warning, and returned.  Runs as the owner (the
-- postgres_fdw user mapping is the owner's), one pass at a time.
CREATE OR REPLACE FUNCTION kwollect.sync_jobs() RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    result jsonb;
BEGIN
    IF kwollect.setting('job_source') IS DISTINCT FROM 'oar' THEN
        RETURN jsonb_build_object('scheduler', kwollect.setting('job_source'));
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('kwollect.sync_jobs')) THEN
        RETURN '{"scheduler": "oar", "skipped": "another synchronisation is running"}';
    END IF;
    BEGIN
        result := kwollect.oar_sync();
        UPDATE kwollect.oar_sync_state SET last_error = NULL;
    -- query_canceled too: OAR's statement_timeout (a slow OAR) cancels the remote query
    EXCEPTION WHEN others OR query_canceled THEN
        UPDATE kwollect.oar_sync_state SET last_error = SQLERRM, last_error_at = now();
        RAISE WARNING 'kwollect: cannot read OAR''s jobs (job rows kept as they are): %', SQLERRM;
        result := jsonb_build_object('scheduler', 'oar', 'error', SQLERRM);
    END;
    RETURN result;
END $$;
COMMENT ON FUNCTION kwollect.sync_jobs() IS
    'Copy new and changed jobs of the linked scheduler (OAR) into nodetime_per_job and '
    'kwollect.job_promote; never raises (errors go to kwollect.oar_sync_state).';
