-- The preview runtime's own tables. None of them is a read model: they are the workers'
-- coordination state (leases, routes) and the logs of what ran. Events remain the truth of what
-- happened to a deployment; these say who is doing the work and what it printed.

-- Who builds and serves a deployment. A worker claims a deployment by inserting or taking over an
-- expired row, and keeps it by moving `expires_at` forward (the heartbeat). A worker that dies
-- stops heartbeating; once the lease expires another worker (or the same one, restarted) takes
-- the deployment over, so nothing stays Building forever.
CREATE TABLE deployment_leases (
    deployment_id uuid PRIMARY KEY,
    environment_id uuid NOT NULL,
    worker text NOT NULL,
    expires_at timestamptz NOT NULL,
    -- Claims so far; an infrastructure fault on every one of `max_attempts` fails the deployment.
    attempts int NOT NULL DEFAULT 1,
    -- The work is over (failed, superseded, stopped): nobody claims it again.
    released boolean NOT NULL DEFAULT false,
    last_error text
);
CREATE INDEX deployment_leases_environment ON deployment_leases (environment_id);

-- Where the proxy finds a running preview: the unix socket its sandbox bridges to the app's port.
-- One row per environment, pointing at the deployment that serves it now; a new deployment takes
-- the row over only once it is Ready, so the old one serves until then.
CREATE TABLE preview_routes (
    environment_id uuid PRIMARY KEY,
    deployment_id uuid NOT NULL,
    socket text NOT NULL,
    worker text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Build, run and per-test output, one row per line. `nano` is unix nanoseconds, strictly
-- increasing within (deployment, stream) because one writer task numbers and inserts a
-- deployment's lines in order: a reader paging with `nano > from` never sees a line twice and
-- never skips one. Secrets are redacted before a line gets here.
CREATE TABLE deployment_logs (
    deployment_id uuid NOT NULL,
    stream text NOT NULL,
    nano bigint NOT NULL,
    line text NOT NULL,
    PRIMARY KEY (deployment_id, stream, nano)
);

-- The last time someone opened each preview (written by the proxy, at most once a minute per
-- environment): the stale sweep deactivates environments with neither a commit nor a visit for
-- the idle period.
CREATE TABLE preview_visits (
    environment_id uuid PRIMARY KEY,
    visited_at timestamptz NOT NULL
);
