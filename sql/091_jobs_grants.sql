-- kwollect schema, part 9b: privileges of the job roles (after 090, which resets function
-- privileges).  Both roles are NOLOGIN; kwollect-api switches to them:
--   scheduler (scheduler_role): the prolog/epilog hooks, with the scheduler's token;
--   node (node_role): insert_user_metrics from a job's node, identified by its address.
-- SECURITY DEFINER functions here are granted by name (090 closed them all).
DO $$
DECLARE
    scheduler text := kwollect.setting('scheduler_role');
    node      text := kwollect.setting('node_role');
BEGIN
    IF scheduler IS NULL OR node IS NULL THEN
        RAISE EXCEPTION 'kwollect.settings lacks scheduler_role or node_role';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA public, kwollect, api TO %I, %I', scheduler, node);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON public.nodetime_per_job, '
                   'public.promoted_metrics, kwollect.job_promote TO %I', scheduler);
    EXECUTE format('GRANT SELECT ON public.promoted_metrics_job, kwollect.settings TO %I',
                   scheduler);
    EXECUTE format('GRANT EXECUTE ON FUNCTION kwollect.setting(text), kwollect.fail(text, text, text), '
                   'kwollect.parse_time(text, text), kwollect.split_list(text, boolean), '
                   'kwollect.check_regex(text), kwollect.require_scheduler(text), '
                   'kwollect.wanted_job_promotions(integer), kwollect.apply_job_promotions(integer), '
                   'kwollect.notify_promotions(), kwollect.sync_jobs() TO %I', scheduler);
    -- Which jobs promote what, and how the OAR copy goes: readable by all.
    EXECUTE format('GRANT SELECT ON kwollect.job_promote, kwollect.oar_sync_state TO %I, %I',
                   kwollect.setting('writer_role'), kwollect.setting('reader_role'));
    -- `kwollect maintain` (the writer) copies the scheduler's jobs; oar_sync() runs inside.
    EXECUTE format('GRANT EXECUTE ON FUNCTION kwollect.sync_jobs() TO %I',
                   kwollect.setting('writer_role'));
    EXECUTE format('REVOKE EXECUTE ON FUNCTION kwollect.oar_sync() FROM %I, %I',
                   kwollect.setting('writer_role'), kwollect.setting('reader_role'));
    EXECUTE format('GRANT EXECUTE ON FUNCTION api.job_start(integer, text, text, text), '
                   'api.job_end(integer, text), api.update_promoted_metrics() TO %I', scheduler);
    -- The node role runs the SECURITY DEFINER functions, nothing else.
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   'api.insert_user_metrics(text, double precision, text, jsonb), '
                   'api.insert_user_metrics(jsonb) TO %I', node);
    -- Only the node role may call insert_user_metrics; the hooks also check their caller's
    -- role themselves (require_scheduler).
    EXECUTE format('REVOKE EXECUTE ON FUNCTION kwollect.insert_user_rows(jsonb) FROM %I, %I',
                   kwollect.setting('writer_role'), kwollect.setting('reader_role'));
END $$;
