-- Read models. Each is owned by one projection (projections/src/...) and can be rebuilt from
-- the global log alone with `understudy replay --projection NAME`.

-- Current status of every environment: project × branch or PR × entrypoint.
CREATE TABLE environments (
    environment_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    target_kind text NOT NULL,
    branch text NOT NULL,
    pull_request bigint,
    entrypoint text NOT NULL,
    status text NOT NULL,
    latest_deployment_id uuid,
    latest_commit text,
    latest_deployment_status text,
    preview_url text,
    failure text,
    tests_passed int NOT NULL DEFAULT 0,
    tests_failed int NOT NULL DEFAULT 0,
    tests jsonb NOT NULL DEFAULT '[]',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    -- The aggregate state folded by the domain's own `apply`, so the read model and the
    -- command side can never disagree on a transition.
    state jsonb NOT NULL,
    position bigint NOT NULL
);
CREATE INDEX environments_project ON environments (project_id, updated_at DESC);
INSERT INTO projector_checkpoints (projection) VALUES ('environments');

-- Every event of every entity, for audit.
CREATE TABLE entity_history (
    position bigint PRIMARY KEY,
    event_id uuid NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id uuid NOT NULL,
    aggregate_version bigint NOT NULL,
    event_type text NOT NULL,
    schema_version int NOT NULL,
    payload jsonb NOT NULL,
    recorded_at timestamptz NOT NULL,
    correlation_id uuid NOT NULL,
    causation_id uuid,
    actor text NOT NULL
);
CREATE INDEX entity_history_aggregate ON entity_history (aggregate_id, position);
INSERT INTO projector_checkpoints (projection) VALUES ('entity_history');
