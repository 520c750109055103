-- Each event was written twice: to its aggregate type's esrs table and to the global log, in one
-- statement. The two rows held the same facts (the esrs row's JSON is the log row's schema
-- version, metadata and event), so the append paid two heap rows and seven index entries for one
-- event. From here on the log alone is written, and each esrs table is a view of it with the
-- layout esrs reads (id, aggregate_id, payload, occurred_on, sequence_number, version).
--
-- The optimistic version check moves with it: one event per aggregate and version. A person and
-- their personal account share an id, so the aggregate type is part of the key.

-- Nothing is dropped that the log does not hold.
DO $$
DECLARE
    aggregate text;
    missing bigint;
BEGIN
    FOREACH aggregate IN ARRAY ARRAY['account', 'project', 'environment', 'pull_request', 'user'] LOOP
        EXECUTE format(
            'SELECT count(*) FROM %I e WHERE NOT EXISTS (SELECT 1 FROM event_log l WHERE l.event_id = e.id)',
            aggregate || '_events') INTO missing;
        IF missing > 0 THEN
            RAISE EXCEPTION '% rows of %_events are not in event_log; refusing to replace the table', missing, aggregate;
        END IF;
    END LOOP;
END $$;

DROP INDEX event_log_aggregate;
CREATE UNIQUE INDEX event_log_aggregate ON event_log (aggregate_id, aggregate_type, aggregate_version);

DO $$
DECLARE aggregate text;
BEGIN
    FOREACH aggregate IN ARRAY ARRAY['account', 'project', 'environment', 'pull_request', 'user'] LOOP
        EXECUTE format('DROP TABLE %I', aggregate || '_events');
        EXECUTE format(
            'CREATE VIEW %I AS
             SELECT event_id AS id, aggregate_id,
                    jsonb_build_object(
                        ''schema_version'', schema_version,
                        ''meta'', jsonb_build_object(''correlation_id'', correlation_id, ''causation_id'', causation_id,
                                                   ''actor'', actor, ''traceparent'', traceparent),
                        ''event'', payload) AS payload,
                    recorded_at AS occurred_on, aggregate_version::int AS sequence_number, NULL::int AS version
             FROM event_log WHERE aggregate_type = %L',
            aggregate || '_events', aggregate);
    END LOOP;
END $$;
