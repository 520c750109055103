-- Who may see and do what. `user_events` is the User aggregate's esrs table. The tables below are
-- the access index: written by the event store in the same transaction as the events that change
-- them (adapters/src/access_index.rs), because a signed-out session or a removed member must lose
-- access at once, not when a projector catches up. They can be rebuilt from the log
-- (`understudy replay --projection access`).

CREATE TABLE user_events (LIKE account_events INCLUDING ALL);

CREATE TABLE users (
    user_id uuid PRIMARY KEY,
    github_id bigint NOT NULL UNIQUE,
    login text NOT NULL,
    name text,
    created_at timestamptz NOT NULL
);
CREATE INDEX users_login ON users (lower(login));

CREATE TABLE user_sessions (
    session_id uuid PRIMARY KEY,
    user_id uuid NOT NULL,
    -- The user's GitHub token, sealed (a SealedValue as JSON).
    github_token jsonb NOT NULL,
    started_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    ended_at timestamptz
);
CREATE INDEX user_sessions_user ON user_sessions (user_id);

CREATE TABLE api_tokens (
    token_id uuid PRIMARY KEY,
    user_id uuid NOT NULL,
    name text NOT NULL,
    -- Hex SHA-256 of the token; the token itself is shown once and kept nowhere.
    hash text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE accounts (
    account_id uuid PRIMARY KEY,
    -- `personal` or `team`
    kind text NOT NULL,
    -- The GitHub login of a personal account, the team's name otherwise.
    name text NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL
);

CREATE TABLE account_members (
    account_id uuid NOT NULL,
    user_id uuid NOT NULL,
    role text NOT NULL,
    PRIMARY KEY (account_id, user_id)
);
CREATE INDEX account_members_user ON account_members (user_id);

CREATE TABLE account_invitations (
    account_id uuid NOT NULL,
    login text NOT NULL,
    role text NOT NULL,
    invited_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, login)
);
CREATE INDEX account_invitations_login ON account_invitations (login);

CREATE TABLE projects (
    project_id uuid PRIMARY KEY,
    account_id uuid NOT NULL,
    name text NOT NULL,
    repository text NOT NULL,
    production_branch text NOT NULL,
    active boolean NOT NULL,
    -- Where a project not on GitHub is fetched from.
    git_url text,
    -- Previews open to anyone with the link.
    public_previews boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL
);
CREATE INDEX projects_account ON projects (account_id);

-- Which environment a deployment belongs to (for checking access to its logs).
CREATE INDEX event_log_deployment_requested ON event_log ((payload->>'deployment_id')) WHERE event_type = 'DeploymentRequested';
