-- Subscriptions read environments by position: a resume or a heal pages through those changed
-- after a position, a notice reads the rows changed between two, and a reconnect reads the
-- newest. One project's (most subscriptions) and every project's (an operator's). Without
-- these, each of those reads sorted the whole table.
CREATE INDEX environments_project_position ON environments (project_id, position);
CREATE INDEX environments_position ON environments (position);
