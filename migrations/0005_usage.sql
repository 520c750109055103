-- Usage of previews, per project and UTC day: counts and durations only, never code, logs or
-- secrets. Owned by the usage projection.
CREATE TABLE preview_usage (
    project_id uuid NOT NULL,
    day date NOT NULL,
    environments_created int NOT NULL DEFAULT 0,
    deployments_requested int NOT NULL DEFAULT 0,
    deployments_ready int NOT NULL DEFAULT 0,
    deployments_failed int NOT NULL DEFAULT 0,
    seconds_to_ready_sum double precision NOT NULL DEFAULT 0,
    tests_passed int NOT NULL DEFAULT 0,
    tests_failed int NOT NULL DEFAULT 0,
    environments_terminated int NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, day)
);

-- What the usage projection remembers to attribute later events: environment → project, and
-- when each deployment was requested.
CREATE TABLE usage_deployments (
    deployment_id uuid PRIMARY KEY,
    environment_id uuid NOT NULL,
    requested_at timestamptz NOT NULL
);
CREATE TABLE usage_environments (
    environment_id uuid PRIMARY KEY,
    project_id uuid NOT NULL
);
INSERT INTO projector_checkpoints (projection) VALUES ('usage');
