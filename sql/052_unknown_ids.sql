-- Which of the device and metric ids a request names were never stored: get_metrics answers
-- an empty result for a typo as it does for a quiet device (200 [] through the API, as
-- PostgREST would), and clients (kwollect get, the web view) call this to say which ids do
-- not exist.  Devices are matched as get_metrics matches them: device_id or _device_alias,
-- host names cut at the first dot.
CREATE OR REPLACE FUNCTION api.unknown_ids(devices text DEFAULT NULL, metrics text DEFAULT NULL)
RETURNS TABLE (kind text, id text)
LANGUAGE sql STABLE AS $$
    SELECT 'device', d.id
    FROM (SELECT DISTINCT split_part(trim(x), '.', 1) AS id
          FROM unnest(string_to_array(devices, ',')) x WHERE trim(x) <> '') d
    WHERE NOT EXISTS (SELECT 1 FROM kwollect.series se WHERE se.device_id = d.id)
      AND NOT EXISTS (SELECT 1 FROM kwollect.series se WHERE se.device_alias = d.id)
    UNION ALL
    SELECT 'metric', m.id
    FROM (SELECT DISTINCT trim(x) AS id
          FROM unnest(string_to_array(metrics, ',')) x WHERE trim(x) <> '') m
    WHERE NOT EXISTS (SELECT 1 FROM kwollect.series se WHERE se.metric_id = m.id)
    ORDER BY 1, 2
$$;

COMMENT ON FUNCTION api.unknown_ids IS
    'The device ids (device_id or _device_alias) and metric ids among those given that no '
    'sample was ever stored under: an empty get_metrics result then means a typo, not a '
    'quiet device.';
