-- GitHub: pull requests as an aggregate, webhook deliveries, and the sticky comment's outbox.

CREATE TABLE pull_request_events (LIKE account_events INCLUDING ALL);

-- Every webhook delivery, recorded before it is answered, processed after. The delivery id
-- deduplicates GitHub's redeliveries; `seq` is arrival order (processing is FIFO).
CREATE TABLE webhook_deliveries (
    seq bigserial UNIQUE,
    delivery_id text PRIMARY KEY,
    event text NOT NULL,
    action text,
    payload jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'ignored', 'failed')),
    outcome text,
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (next_attempt_at, seq) WHERE state = 'pending';

-- What must be written to GitHub: `kind` 'comment' (key: project id and PR number) for the sticky
-- PR comment, 'status' (key: environment id) for deployments, their statuses and check runs.
-- Owned by the github_outbox projection (rebuilt by replay, which at worst rewrites each once).
CREATE TABLE github_outbox (
    kind text NOT NULL CHECK (kind IN ('comment', 'status')),
    key text NOT NULL,
    dirty_position bigint NOT NULL,
    written_position bigint NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    attempts int NOT NULL DEFAULT 0,
    last_error text,
    PRIMARY KEY (kind, key)
);
CREATE INDEX github_outbox_due ON github_outbox (next_attempt_at) WHERE dirty_position > written_position;

-- Which pull request each environment belongs to, as the github_outbox projection learns it.
CREATE TABLE pr_environments (
    environment_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    pr_number bigint NOT NULL
);
INSERT INTO projector_checkpoints (projection) VALUES ('github_outbox');

-- The GitHub comment that is each pull request's sticky comment (owned by the comment writer,
-- not by a projection: a replay must not forget it).
CREATE TABLE github_comments (
    project_id uuid NOT NULL,
    pr_number bigint NOT NULL,
    comment_id bigint NOT NULL,
    body_sha256 text,
    PRIMARY KEY (project_id, pr_number)
);

-- The GitHub deployment and check run of each of our deployments (owned by the writer).
CREATE TABLE github_deployments (
    deployment_id uuid PRIMARY KEY,
    environment_id uuid NOT NULL,
    github_deployment_id bigint NOT NULL,
    deployment_state text,
    check_run_id bigint,
    check_sha256 text
);
