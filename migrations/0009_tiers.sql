-- Tiers (dev → staging → production): the access index's project rows carry each project's tiers
-- as the Project aggregate keeps them, {name: {spec, frozen?}}, so that the promoter finds the
-- projects it has work in and the API lists tiers without loading every project.
ALTER TABLE projects ADD COLUMN tiers jsonb NOT NULL DEFAULT '{}';

-- The promoter looks for environments of a tier by project and kind.
CREATE INDEX environments_project_kind ON environments (project_id, target_kind, branch);

-- What a smoke test kept (screenshots, logs), per deployment. Infrastructure data like the logs:
-- not an event, never replayed.
CREATE TABLE deployment_artifacts (
    deployment_id uuid NOT NULL,
    name text NOT NULL,
    content bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deployment_id, name)
);

-- Notifications (outgoing webhooks). The notifier reads the global log from its cursor and
-- enqueues one delivery per event and target in the same transaction that moves the cursor, so
-- every notification is enqueued exactly once; a sender then delivers them with retries. It
-- starts at the log's head: history from before the upgrade is not announced.
CREATE TABLE notification_cursor (
    name text PRIMARY KEY,
    position bigint NOT NULL
);
INSERT INTO notification_cursor (name, position) SELECT 'notifier', COALESCE(max(position), 0) FROM event_log;

CREATE TABLE notification_deliveries (
    -- UUID v5 of the event and the target: the same notification is never enqueued twice.
    delivery_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    target_id uuid NOT NULL,
    kind text NOT NULL,
    payload jsonb NOT NULL,
    state text NOT NULL DEFAULT 'pending',       -- pending | delivered | failed
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    delivered_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_deliveries_due ON notification_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX notification_deliveries_project ON notification_deliveries (project_id, created_at DESC);
