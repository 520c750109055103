-- The esrs layout of a log row's payload ({schema_version, meta, event}) was spelled twice: in the
-- views of migration 0012 and in the command path's loads, which ask the log directly so that the
-- version bound uses the index. Both now call this one function; a change to the metadata is
-- made here. A one-SELECT SQL function is inlined by the planner, so it costs nothing per row.

CREATE FUNCTION esrs_payload(e event_log) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'schema_version', e.schema_version,
        'meta', jsonb_build_object('correlation_id', e.correlation_id, 'causation_id', e.causation_id,
                                   'actor', e.actor, 'traceparent', e.traceparent),
        'event', e.payload)
$$;

DO $$
DECLARE aggregate text;
BEGIN
    FOREACH aggregate IN ARRAY ARRAY['account', 'project', 'environment', 'pull_request', 'user'] LOOP
        EXECUTE format(
            'CREATE OR REPLACE VIEW %I AS
             SELECT l.event_id AS id, l.aggregate_id, esrs_payload(l) AS payload,
                    l.recorded_at AS occurred_on, l.aggregate_version::int AS sequence_number, NULL::int AS version
             FROM event_log l WHERE l.aggregate_type = %L',
            aggregate || '_events', aggregate);
    END LOOP;
END $$;
