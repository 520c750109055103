-- Each esrs table kept an index on aggregate_id beside the unique index on (aggregate_id,
-- sequence_number). The unique one serves every read by aggregate, so the other only cost each
-- append one more index write. (Tables made with LIKE … INCLUDING ALL have generated index
-- names, hence the lookup.)
DO $$
DECLARE index_name regclass;
BEGIN
    FOR index_name IN
        SELECT i.indexrelid::regclass
        FROM pg_index i
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0]
        WHERE t.relname IN ('account_events', 'project_events', 'environment_events', 'pull_request_events', 'user_events')
          AND t.relnamespace = current_schema()::regnamespace
          AND NOT i.indisunique AND i.indnatts = 1 AND a.attname = 'aggregate_id'
    LOOP
        EXECUTE format('DROP INDEX %s', index_name);
    END LOOP;
END $$;

-- The global log's position is NULL until the sequencer numbers the row: index only numbered
-- rows, so an append does not write a NULL entry that the numbering then replaces.
ALTER TABLE event_log DROP CONSTRAINT event_log_position_key;
CREATE UNIQUE INDEX event_log_position ON event_log (position) WHERE position IS NOT NULL;
