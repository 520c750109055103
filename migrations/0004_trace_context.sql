-- W3C trace context of what caused each row, so one trace follows a webhook through processing,
-- the append, the relay, the projectors and the GitHub writes (adapters/src/telemetry.rs).
ALTER TABLE event_log ADD COLUMN traceparent text;
ALTER TABLE webhook_deliveries ADD COLUMN traceparent text;
ALTER TABLE github_outbox ADD COLUMN traceparent text;
