-- Agents of servers the ingress cannot dial (pinacle-agent, README "Reverse tunnels"): a server
-- with a row here is reached only through its agent's tunnel. Only the SHA-256 of the secret
-- `pinacle-ingress agent register` printed is kept (the secret is 256 random bits: a fast hash
-- is enough). Not part of the dashboard's schema; owned by the ingress.
CREATE TABLE IF NOT EXISTS pinacle_agent (
    server_id text PRIMARY KEY REFERENCES server (id) ON DELETE CASCADE,
    secret_sha256 text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
