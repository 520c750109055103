-- The environments list (the dashboard, `environments`, `environmentsConnection`) is most
-- recently updated first across every project an operator or a member of many projects sees:
-- without this, each page sorted the whole table. One project's list has environments_project.
CREATE INDEX environments_recent ON environments (updated_at DESC, environment_id DESC);
