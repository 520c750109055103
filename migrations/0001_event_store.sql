-- The event store. Each aggregate type has its own esrs table ({name}_events, the schema esrs
-- expects; created here so that start-up never races on CREATE TABLE IF NOT EXISTS), and every
-- event is also written, in the same transaction, to the one global log below.

CREATE TABLE account_events (
    id uuid PRIMARY KEY,
    aggregate_id uuid NOT NULL,
    payload jsonb NOT NULL,
    occurred_on timestamptz NOT NULL DEFAULT current_timestamp,
    sequence_number int NOT NULL DEFAULT 1,
    version int
);
CREATE INDEX account_events_aggregate_id ON account_events (aggregate_id);
CREATE UNIQUE INDEX account_events_aggregate_id_sequence_number ON account_events (aggregate_id, sequence_number);

CREATE TABLE project_events (LIKE account_events INCLUDING ALL);
CREATE TABLE environment_events (LIKE account_events INCLUDING ALL);

-- The global log. `id` is insertion order inside the writers' transactions and may commit out of
-- order; `position` is the gap-free global order, assigned by the sequencer (see relay.rs) only to
-- rows whose writing transaction is older than every transaction still running, so a reader that
-- has seen position N can never later find an unseen committed event below N.
CREATE TABLE event_log (
    id bigserial PRIMARY KEY,
    position bigint UNIQUE,
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id uuid NOT NULL UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id uuid NOT NULL,
    aggregate_version bigint NOT NULL,
    event_type text NOT NULL,
    schema_version int NOT NULL,
    payload jsonb NOT NULL,
    recorded_at timestamptz NOT NULL,
    correlation_id uuid NOT NULL,
    causation_id uuid,
    actor text NOT NULL
);
CREATE INDEX event_log_unsequenced ON event_log (transaction_id, id) WHERE position IS NULL;
CREATE INDEX event_log_aggregate ON event_log (aggregate_id, aggregate_version);
CREATE INDEX event_log_correlation ON event_log (correlation_id);

-- Cursors over the global log: how far the sequencer has numbered it, how far the relay has
-- published it to JetStream.
CREATE TABLE log_cursors (
    name text PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0
);
INSERT INTO log_cursors (name, position) VALUES ('sequenced', 0), ('published', 0);

-- Each projector's checkpoint: the last global position applied, written in the same
-- transaction as the read-model change.
CREATE TABLE projector_checkpoints (
    projection text PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
