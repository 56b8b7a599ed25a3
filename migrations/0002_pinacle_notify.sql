-- Live authorization for pinacle-ingress: every change to the rows the ingress reads is announced
-- on the channel `pinacle_authz`, so that every gateway forgets exactly the cached answers it
-- affects within a second of the commit (NOTIFY is delivered at commit; nothing is sent for a
-- rolled-back transaction). The payload names ids only (never a session token):
--   {"table": "<table>", "users": ["<user id>", ...], "slugs": ["<pod slug>", ...]}
--
-- Apply it to the dashboard's database (PostgreSQL 11 or later) as its owner:
--   psql "$DATABASE_URL" -f sql/pinacle-notify.sql
-- It is idempotent (run it again after a dashboard migration that recreated a table) and is
-- removed by sql/pinacle-notify-remove.sql. Standalone databases get it as migration 0002.
-- The cost: one trigger call and one small NOTIFY per changed row of these five tables.

CREATE OR REPLACE FUNCTION pinacle_authz_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_row jsonb := CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END;
    new_row jsonb := CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END;
    user_key text := CASE TG_TABLE_NAME
        WHEN 'team_member' THEN 'user_id'
        WHEN 'user' THEN 'id'
        WHEN 'session' THEN 'userId'
    END;
    users jsonb := '[]'::jsonb;
    slugs jsonb := '[]'::jsonb;
BEGIN
    IF user_key IS NOT NULL THEN
        users := (SELECT coalesce(jsonb_agg(DISTINCT v), '[]'::jsonb) FROM unnest(ARRAY[
            old_row ->> user_key, new_row ->> user_key]) AS v WHERE v IS NOT NULL);
    END IF;
    IF TG_TABLE_NAME = 'pod' THEN
        slugs := (SELECT coalesce(jsonb_agg(DISTINCT v), '[]'::jsonb) FROM unnest(ARRAY[
            old_row ->> 'slug', new_row ->> 'slug']) AS v WHERE v IS NOT NULL);
    END IF;
    PERFORM pg_notify('pinacle_authz', jsonb_build_object(
        'table', TG_TABLE_NAME, 'users', users, 'slugs', slugs)::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS pinacle_authz_notify ON team_member;
CREATE TRIGGER pinacle_authz_notify AFTER INSERT OR UPDATE OR DELETE ON team_member
    FOR EACH ROW EXECUTE FUNCTION pinacle_authz_notify();
DROP TRIGGER IF EXISTS pinacle_authz_notify ON pod;
CREATE TRIGGER pinacle_authz_notify AFTER INSERT OR UPDATE OR DELETE ON pod
    FOR EACH ROW EXECUTE FUNCTION pinacle_authz_notify();
DROP TRIGGER IF EXISTS pinacle_authz_notify ON server;
CREATE TRIGGER pinacle_authz_notify AFTER INSERT OR UPDATE OR DELETE ON server
    FOR EACH ROW EXECUTE FUNCTION pinacle_authz_notify();
DROP TRIGGER IF EXISTS pinacle_authz_notify ON "user";
CREATE TRIGGER pinacle_authz_notify AFTER INSERT OR UPDATE OR DELETE ON "user"
    FOR EACH ROW EXECUTE FUNCTION pinacle_authz_notify();
DROP TRIGGER IF EXISTS pinacle_authz_notify ON session;
CREATE TRIGGER pinacle_authz_notify AFTER INSERT OR UPDATE OR DELETE ON session
    FOR EACH ROW EXECUTE FUNCTION pinacle_authz_notify();
