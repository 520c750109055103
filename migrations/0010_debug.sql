-- Debug sessions on failed deployments. The sessions themselves (who, until when, the token's
-- hash) are events on the environment and live in its state; this table is the running
-- instance of each, like a deployment's lease: which worker holds it, where its tunnel's socket
-- is, what it reached and the listing of its files. Infrastructure data: never replayed.
CREATE TABLE debug_instances (
    session_id uuid PRIMARY KEY,
    environment_id uuid NOT NULL,
    deployment_id uuid NOT NULL,
    worker text NOT NULL,
    expires_at timestamptz NOT NULL,
    -- The tunnel's unix socket while the app runs.
    socket text,
    state text NOT NULL DEFAULT 'building',
    -- [{path, kind, size}] of the instance's work dir, breadth first, at most 5000.
    files jsonb NOT NULL DEFAULT '[]',
    files_truncated boolean NOT NULL DEFAULT false,
    -- The session ended: nobody claims it again.
    done boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Environments with debug sessions open (their state has the key only then).
CREATE INDEX environments_debugged ON environments (environment_id) WHERE state ? 'debug_sessions';
