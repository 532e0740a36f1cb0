-- kwollect schema, last part: on Citus only (setting citus = on), the SQL functions that
-- read distributed or reference tables become PL/pgSQL functions with the same body.
--
-- Citus 13 cannot plan a query of a distributed table inside a SQL-language function that
-- has parameters ("parameterized queries for SQL functions referencing distributed tables
-- are not supported"), and the SQL functions that return sets are not inlined under it:
-- get_metrics, samples_between, request_series and the others failed on the coordinator.
-- A PL/pgSQL function hands Citus its queries with the parameter values bound.  The body
-- is kept as it is: `RETURN QUERY body` for a set, `RETURN (body)` for a value (every such
-- function here yields one row), and column names win over parameter names as they do in
-- SQL functions (#variable_conflict use_column).  Compacted blocks are decoded from their
-- columns (block_decode), never from the block row, which a shard's rows are not of the
-- table's type for (sql/025_compaction.sql).  On stock PostgreSQL nothing changes: the SQL
-- functions stay inlinable there.
--
-- Files before this one re-create the SQL versions at each setup; this one converts them
-- again, so re-running setup is safe.

CREATE OR REPLACE FUNCTION kwollect.citus_plpgsql_functions() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    f         record;
    def       text;
    body      text;
    converted integer := 0;
BEGIN
    IF coalesce(kwollect.setting('citus'), 'off') <> 'on' THEN
        RETURN 0;
    END IF;
    FOR f IN
        SELECT p.oid, p.proretset, p.prosrc
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname IN ('kwollect', 'api', 'public')
          AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'sql')
          AND p.prokind = 'f' AND p.provolatile <> 'i'
          AND p.prorettype <> 'void'::regtype
          -- A distributed or reference table, or a view over them, read by name.
          AND p.prosrc ~ '\.(samples\w*|series|summary\w*|metrics\w*)\y'
    LOOP
        body := regexp_replace(f.prosrc, ';\s*$', '');
        body := E'\n#variable_conflict use_column\nBEGIN\n'
                || CASE WHEN f.proretset THEN 'RETURN QUERY ' || body || E';\n'
                        ELSE 'RETURN (' || body || E');\n' END
                || 'END';
        def := pg_get_functiondef(f.oid);
        def := regexp_replace(def, '\n LANGUAGE sql\n', E'\n LANGUAGE plpgsql\n');
        def := substr(def, 1, strpos(def, 'AS $function$') - 1)
               || format('AS %L', body);
        EXECUTE def;
        converted := converted + 1;
    END LOOP;
    RETURN converted;
END $$;

REVOKE ALL ON FUNCTION kwollect.citus_plpgsql_functions() FROM PUBLIC;
SELECT kwollect.citus_plpgsql_functions();
