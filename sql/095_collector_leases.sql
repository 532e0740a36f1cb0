-- kwollect schema, part 9.5: failover of kwollectors through the database (docs/scaling.md).
-- With `failover_groups: G`, the targets of a shared metrics.d are hashed into G groups and
-- each kwollector polls the groups it holds a lease on.  A kwollector renews its leases
-- every ttl/3; one that dies stops renewing, its leases expire after ttl and the live ones
-- claim them at their next call.  Members (kwollectors that called within their ttl) share
-- the groups: each holds at most ceil(G / members), releasing the rest when one joins.
-- A released group stays held (not renewed, not polled) for `release_s` before anyone may
-- claim it, so the releaser has stopped polling it by then: no group is polled twice.

CREATE TABLE IF NOT EXISTS kwollect.collector_members (
    holder     text PRIMARY KEY CHECK (length(holder) BETWEEN 1 AND 255),
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS kwollect.collector_leases (
    group_no   integer PRIMARY KEY CHECK (group_no >= 0),
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL,
    released   boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE kwollect.collector_leases IS
    'Which kwollector polls which target group (failover_groups), until when.';
COMMENT ON TABLE kwollect.collector_members IS
    'Kwollectors taking part in the leasing of target groups, until when.';

CREATE OR REPLACE FUNCTION kwollect.lease_groups(p_holder text, p_groups integer,
                                                 p_ttl_s double precision,
                                                 p_release_s double precision DEFAULT 2)
RETURNS integer[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ttl      interval := make_interval(secs => p_ttl_s);
    members  integer;
    share    integer;
    held     integer;
    result   integer[];
BEGIN
    IF p_groups IS NULL OR p_groups < 1 OR p_groups > 100000 THEN
        RAISE EXCEPTION 'lease_groups: groups must be between 1 and 100000, got %', p_groups;
    END IF;
    IF p_ttl_s IS NULL OR p_ttl_s < 1 OR p_ttl_s > 3600 THEN
        RAISE EXCEPTION 'lease_groups: ttl must be between 1 and 3600 s, got %', p_ttl_s;
    END IF;
    -- one caller at a time: each sees the others' leases as they are
    PERFORM pg_advisory_xact_lock(hashtext('kwollect.collector_leases'));
    INSERT INTO kwollect.collector_members AS m VALUES (p_holder, now() + ttl)
        ON CONFLICT (holder) DO UPDATE SET expires_at = excluded.expires_at;
    DELETE FROM kwollect.collector_members WHERE expires_at < now() - interval '1 day';
    SELECT count(*) INTO members FROM kwollect.collector_members WHERE expires_at > now();
    share := ceil(p_groups::numeric / greatest(members, 1));
    -- groups past p_groups (fewer groups configured) are let go
    DELETE FROM kwollect.collector_leases WHERE holder = p_holder AND group_no >= p_groups;
    UPDATE kwollect.collector_leases SET expires_at = now() + ttl
        WHERE holder = p_holder AND NOT released AND expires_at > now();
    SELECT count(*) INTO held FROM kwollect.collector_leases
        WHERE holder = p_holder AND NOT released AND expires_at > now();
    IF held > share THEN
        UPDATE kwollect.collector_leases
            SET released = true, expires_at = now() + make_interval(secs => p_release_s)
            WHERE group_no IN (SELECT group_no FROM kwollect.collector_leases
                               WHERE holder = p_holder AND NOT released AND expires_at > now()
                               ORDER BY group_no DESC LIMIT held - share);
    ELSIF held < share THEN
        INSERT INTO kwollect.collector_leases AS l (group_no, holder, expires_at)
            SELECT g, p_holder, now() + ttl FROM generate_series(0, p_groups - 1) g
            WHERE NOT EXISTS (SELECT 1 FROM kwollect.collector_leases x
                              WHERE x.group_no = g AND x.expires_at > now())
            ORDER BY g LIMIT share - held
            ON CONFLICT (group_no) DO UPDATE
                SET holder = excluded.holder, expires_at = excluded.expires_at, released = false;
    END IF;
    SELECT coalesce(array_agg(group_no ORDER BY group_no), '{}') INTO result
        FROM kwollect.collector_leases
        WHERE holder = p_holder AND NOT released AND expires_at > now();
    RETURN result;
END $$;
COMMENT ON FUNCTION kwollect.lease_groups(text, integer, double precision, double precision) IS
    'Renew, claim or release the caller''s target groups; returns the groups it may poll '
    'for p_ttl_s seconds from the call (failover_groups, docs/scaling.md).';

DO $$
DECLARE
    owner  text := kwollect.setting('owner_role');
    writer text := kwollect.setting('writer_role');
BEGIN
    EXECUTE format('ALTER TABLE kwollect.collector_members OWNER TO %I', owner);
    EXECUTE format('ALTER TABLE kwollect.collector_leases OWNER TO %I', owner);
    EXECUTE format('ALTER FUNCTION kwollect.lease_groups(text, integer, double precision, '
                   'double precision) OWNER TO %I', owner);
    REVOKE ALL ON FUNCTION kwollect.lease_groups(text, integer, double precision,
                                                 double precision) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION kwollect.lease_groups(text, integer, '
                   'double precision, double precision) TO %I', writer);
    EXECUTE format('GRANT SELECT ON kwollect.collector_leases, kwollect.collector_members '
                   'TO %I', writer);
END $$;
