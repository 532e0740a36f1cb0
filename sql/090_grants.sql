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
                   'public.metrics_by_device_summary, public.metrics_by_job, '
                   'public.metrics_by_job_summary, public.metrics_summary, public.jobmetrics, '
                   'public.promoted_metrics, public.nodetime_per_job, public.nodetime_by_job, '
                   'public.promoted_metrics_job TO %I, %I', writer, reader);
    EXECUTE format('GRANT SELECT ON kwollect.series, kwollect.samples, kwollect.summary, '
                   'kwollect.summary_state, kwollect.summary_dirty, kwollect.settings, '
                   'kwollect.partitions, kwollect.jobmetrics_requests TO %I, %I', writer, reader);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA kwollect TO %I, %I', writer, reader);
    EXECUTE format('GRANT EXECUTE ON FUNCTION api.get_metrics, api.available_metrics, '
                   'api.get_job_metrics TO %I, %I', writer, reader);

    -- Writing: samples (through the view, the API or binary COPY), series, promotion.
    EXECUTE format('GRANT INSERT ON public.metrics, kwollect.samples, kwollect.series, '
                   'kwollect.summary_dirty, kwollect.written_batches TO %I', writer);
    EXECUTE format('GRANT SELECT ON kwollect.written_batches TO %I', writer);
    EXECUTE format('GRANT INSERT, UPDATE, DELETE ON public.promoted_metrics, '
                   'public.nodetime_per_job TO %I', writer);
    EXECUTE format('GRANT EXECUTE ON FUNCTION api.insert_metrics(text, text, text, double precision, jsonb), '
                   'api.insert_metrics(jsonb), api.update_promoted_metrics() TO %I', writer);
    -- Partition management runs as the owner (SECURITY DEFINER) and only for the writer.
    EXECUTE format('REVOKE EXECUTE ON FUNCTION kwollect.ensure_partitions(timestamptz[]), '
                   'kwollect.relocate_default_rows(), kwollect.maintain() FROM %I', reader);
END $$;
