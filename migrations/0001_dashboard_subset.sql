-- The subset of the Pinacle dashboard's schema (owned by its Drizzle migrations) that the ingress
-- reads. Names and types match the dashboard's. Against a real Pinacle database the ingress only
-- reads: never run these migrations there. They exist for tests and standalone deployments.

CREATE TABLE IF NOT EXISTS "user" (
    id              text PRIMARY KEY,
    name            text,
    email           text NOT NULL UNIQUE,
    "emailVerified" timestamp,
    image           text,
    github_id       text,
    github_username text,
    created_at      timestamp NOT NULL DEFAULT now(),
    updated_at      timestamp NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS team (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    slug       text NOT NULL UNIQUE,
    owner_id   text NOT NULL REFERENCES "user"(id),
    created_at timestamp NOT NULL DEFAULT now(),
    updated_at timestamp NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS team_member (
    id         text PRIMARY KEY,
    team_id    text NOT NULL REFERENCES team(id) ON DELETE CASCADE,
    -- NULL while an invitation is pending: such a row grants nothing.
    user_id    text REFERENCES "user"(id) ON DELETE CASCADE,
    email      text,
    role       text NOT NULL DEFAULT 'member',
    invited_by text REFERENCES "user"(id),
    invited_at timestamp,
    joined_at  timestamp,
    created_at timestamp NOT NULL DEFAULT now(),
    updated_at timestamp NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS server (
    id                text PRIMARY KEY,
    hostname          text NOT NULL,
    ip_address        varchar(45) NOT NULL,
    status            text NOT NULL DEFAULT 'offline',
    last_heartbeat_at timestamp,
    ssh_host          text,
    ssh_port          integer NOT NULL DEFAULT 22,
    ssh_user          text NOT NULL DEFAULT 'root',
    cpu_cores         real,
    memory_mb         real,
    disk_gb           real,
    created_at        timestamp NOT NULL DEFAULT now(),
    updated_at        timestamp NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS pod (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    slug         varchar(100) NOT NULL,
    description  text,
    team_id      text NOT NULL REFERENCES team(id),
    owner_id     text NOT NULL REFERENCES "user"(id),
    server_id    text REFERENCES server(id),
    config       text NOT NULL DEFAULT '{}',
    ports        text,
    status       text NOT NULL DEFAULT 'creating',
    container_id text,
    internal_ip  text,
    archived_at  timestamp,
    created_at   timestamp NOT NULL DEFAULT now(),
    updated_at   timestamp NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS session (
    "sessionToken" text PRIMARY KEY,
    "userId"       text NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
    expires        timestamp NOT NULL
);

-- The ingress's lookups: pods by slug among live ones, membership by (team, user).
CREATE INDEX IF NOT EXISTS pod_live_slug_idx ON pod (slug, created_at DESC) WHERE archived_at IS NULL;
CREATE INDEX IF NOT EXISTS team_member_team_user_idx ON team_member (team_id, user_id);
