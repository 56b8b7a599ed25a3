-- Removes what sql/pinacle-notify.sql added (idempotent). The gateways keep working: cached
-- answers then expire by their TTLs only.
DROP TRIGGER IF EXISTS pinacle_authz_notify ON team_member;
DROP TRIGGER IF EXISTS pinacle_authz_notify ON pod;
DROP TRIGGER IF EXISTS pinacle_authz_notify ON server;
DROP TRIGGER IF EXISTS pinacle_authz_notify ON "user";
DROP TRIGGER IF EXISTS pinacle_authz_notify ON session;
DROP FUNCTION IF EXISTS pinacle_authz_notify();
