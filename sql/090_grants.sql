-- kwollect schema, part 9: privileges.  Three roles, named in kwollect.settings:
--   owner  (owns every object; nobody logs in as it),
--   writer (the collectors, the scheduler hooks and API token holders: insert, promote),
--   reader (anonymous API users, Grafana: read only).
-- kwollect-setup-db also makes the writer a member of the reader, so that an API gateway
-- logged in as the writer can switch to the anonymous role (PostgREST's model).
-- PostgreSQL 15 no longer lets everyone create in schema public: privileges are explicit.
DO $$
DECLARE
    owner  text := kwollect.setting('owner_role');
    writer text := kwollect.setting('writer_role');
    reader text := kwollect.setting('reader_role');
    fn     regprocedure;
BEGIN
    IF owner IS NULL OR writer IS NULL OR reader IS NULL THEN
        RAISE EXCEPTION 'kwollect.settings lacks owner_role, writer_role or reader_role';
    END IF;
    -- Functions are executable by PUBLIC by default; take that back for everything.
    EXECUTE 'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA kwollect, api FROM PUBLIC';
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA kwollect, kwollect_partitions FROM %I, %I',
                   writer, reader);

    EXECUTE format('GRANT USAGE ON SCHEMA public, kwollect, api TO %I, %I', writer, reader);
    EXECUTE format('GRANT SELECT ON public.metrics, public.metrics_by_device, '
                   'public.metrics_by_device_summary, public.metrics_by_device_summary_1h, '
                   'public.metrics_summary_1h, public.metrics_by_job, '
                   'public.metrics_by_job_summary, public.metrics_by_job_summary_1h, '
                   'public.metrics_summary, public.jobmetrics, '
                   'public.promoted_metrics, public.nodetime_per_job, public.nodetime_by_job, '
                   'public.promoted_metrics_job TO %I, %I', writer, reader);
    EXECUTE format('GRANT SELECT ON kwollect.series, kwollect.samples, kwollect.summary, '
                   'kwollect.summary_1h, kwollect.summaries, kwollect.summaries_by_device, '
                   'kwollect.retention, '
                   'kwollect.summary_state, kwollect.summary_dirty, kwollect.settings, '
                   'kwollect.partitions, kwollect.samples_compact, kwollect.jobmetrics_requests TO %I, %I', writer, reader);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA kwollect TO %I, %I', writer, reader);
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   'api.get_metrics(integer, text, text, text, text, text, api.summary_mode, '
                   'api.as_rate_mode), '
                   'api.available_metrics, api.get_job_metrics, api.job_window, api.unknown_ids '
                   'TO %I, %I',
                   writer, reader);

    -- Writing: samples (through the view, the API or binary COPY), series, promotion.
    EXECUTE format('GRANT INSERT ON public.metrics, kwollect.samples, kwollect.series, '
                   'kwollect.summary_dirty, kwollect.written_batches TO %I', writer);
    EXECUTE format('GRANT SELECT ON kwollect.written_batches TO %I', writer);
    EXECUTE format('GRANT SELECT, INSERT ON kwollect.migrated_ranges TO %I', writer);
    -- INSERT and COPY into public.metrics park rows in a per-session temporary table.
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), writer);
    EXECUTE format('GRANT INSERT, UPDATE, DELETE ON public.promoted_metrics, '
                   'public.nodetime_per_job TO %I', writer);
    EXECUTE format('GRANT EXECUTE ON FUNCTION api.insert_metrics(text, text, text, double precision, jsonb), '
                   'api.insert_metrics(jsonb), api.update_promoted_metrics() TO %I', writer);
    -- SECURITY DEFINER functions run as the owner: nobody may call one unless granted
    -- below by name.  Every such function in any schema of the database loses EXECUTE for
    -- PUBLIC, the writer and the reader first, so a function added later is closed until
    -- this list opens it (tests/test_security_sql.py checks the list).
    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p
              JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND p.proowner = (SELECT oid FROM pg_roles WHERE rolname = owner)
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, %I, %I', fn, writer, reader);
    END LOOP;
    -- The writer creates partitions for the rows it copies, and runs `kwollect maintain`
    -- (which archives and relocates as the owner: those two stay closed to everyone).
    -- The reader calls none: archive_partitions() in a reader's open transaction held an
    -- ACCESS EXCLUSIVE lock that blocked every read.
    EXECUTE format('GRANT EXECUTE ON FUNCTION kwollect.ensure_partitions(timestamptz[]), '
                   'kwollect.maintain() TO %I', writer);
END $$;
