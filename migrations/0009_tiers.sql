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
