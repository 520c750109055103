-- Tiers (dev → staging → production): the access index's project rows carry each project's tiers
-- as the Project aggregate keeps them, {name: {spec, frozen?}}, so that the promoter finds the
-- projects it has work in and the API lists tiers without loading every project.
ALTER TABLE projects ADD COLUMN tiers jsonb NOT NULL DEFAULT '{}';

-- The promoter looks for environments of a tier by project and kind.
CREATE INDEX environments_project_kind ON environments (project_id, target_kind, branch);
