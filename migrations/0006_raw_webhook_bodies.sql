-- Keep each delivery's body exactly as GitHub sent it (the bytes its signature covers), without
-- parsing it into jsonb on the hot path.
ALTER TABLE webhook_deliveries ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8');
