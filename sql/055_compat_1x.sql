-- Kwollect 1.x compatibility: the reference's Grafana dashboards call
--   api.get_metrics(job_id => .., devices => .., metrics => .., start_time => ..,
--                   end_time => .., summary => <boolean>, as_rate => <boolean>)
-- with a boolean as_rate, which our text as_rate ('true', 'false', 'auto') does not take:
-- PostgreSQL has no implicit cast from boolean to text.  This overload takes exactly those
-- seven arguments, all required, so that it never competes with the main function for a
-- call that leaves one of them out (every HTTP call through PostgREST's or kwollect-api's
-- overload choice that does not send all seven, and every SQL call without a boolean
-- as_rate; an untyped literal such as 'auto' resolves to the text version).
CREATE OR REPLACE FUNCTION api.get_metrics(job_id integer, devices text, metrics text,
                                           start_time text, end_time text, summary boolean,
                                           as_rate boolean)
RETURNS TABLE ("timestamp" timestamptz, device_id text, metric_id text,
               value double precision, labels jsonb)
LANGUAGE sql STABLE AS $$
    SELECT * FROM api.get_metrics(job_id => $1, nodes => NULL, devices => $2, metrics => $3,
                                  start_time => $4, end_time => $5, summary => $6,
                                  as_rate => $7::text)
$$;

COMMENT ON FUNCTION api.get_metrics(integer, text, text, text, text, boolean, boolean) IS
    'Kwollect 1.x form of get_metrics (boolean as_rate, as its Grafana dashboards call it): '
    'the same rows as get_metrics with as_rate true or false.';
