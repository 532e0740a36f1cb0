-- kwollect schema, part 1: schemas and the settings every later file reads.
-- Every file in sql/ is idempotent and applied in name order by kwollect-setup-db, as the
-- owner role.  Role names are never written in these files: they are read from
-- kwollect.settings, which kwollect-setup-db fills with bound parameters.

CREATE SCHEMA IF NOT EXISTS kwollect;
CREATE SCHEMA IF NOT EXISTS kwollect_partitions;
CREATE SCHEMA IF NOT EXISTS api;

CREATE TABLE IF NOT EXISTS kwollect.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Defaults; kwollect-setup-db overwrites the ones given on its command line.
INSERT INTO kwollect.settings (key, value) VALUES
    ('chunk_interval_hour', '6'),
    ('max_rows', '20000000'),
    ('job_energy_metric', 'bmc_node_power_watt'),
    ('summary_lag_seconds', '60'),
    ('partitions_ahead', '2'),
    ('archive_tablespace', ''),
    ('archive_after_hour', '192')
ON CONFLICT (key) DO NOTHING;

CREATE OR REPLACE FUNCTION kwollect.setting(p_key text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('kwollect.' || p_key, true), ''),
                    (SELECT value FROM kwollect.settings WHERE key = p_key))
$$;
COMMENT ON FUNCTION kwollect.setting(text) IS
    'A setting: the transaction/session GUC kwollect.<key> when set, else kwollect.settings.';

CREATE TABLE IF NOT EXISTS kwollect.schema_version (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Raise an error from a SQL expression (SQL functions cannot RAISE themselves).
CREATE OR REPLACE FUNCTION kwollect.fail(p_message text, p_hint text DEFAULT NULL,
                                         p_errcode text DEFAULT '22023')
RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = p_message, HINT = coalesce(p_hint, ''), ERRCODE = p_errcode;
END $$;
