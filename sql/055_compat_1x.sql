-- Kwollect 1.x compatibility: the reference's Grafana dashboards call
--   api.get_metrics(job_id => .., devices => .., metrics => .., start_time => ..,
--                   end_time => .., summary => <boolean>, as_rate => <boolean>)
-- with a boolean as_rate.  get_metrics itself takes it (api.as_rate_mode has implicit casts
-- from boolean and from text, 050_api.sql), for any subset of its arguments.  An earlier
-- overload with a boolean as_rate made calls with an untyped as_rate ('auto') ambiguous
-- next to the enum: it is dropped.
DROP FUNCTION IF EXISTS api.get_metrics(integer, text, text, text, text, boolean, boolean);
