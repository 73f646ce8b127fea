-- Where every charge's tokens came from: the decision waterfall's split, written by the Lua with
-- the event (Events:add `src`) and copied by the worker with the rest of the row, in the same
-- transaction. Stored as the compact text the event carries ('allocated:2,grant:<lot>:2,
-- purchased:1'); the view makes it rows a query can sum. `delta` has the event's sign (a charge
-- takes, a refund puts back), so per event the rows add up to the event's delta
-- (`quota-gw reconcile` checks that they do).

ALTER TABLE usage_events ADD COLUMN sources text;

CREATE VIEW usage_event_sources AS
SELECT e.event_id, e.org_id, e.meter, e.kind, e.feature, e.user_id, e.ts, s.ord AS position,
       regexp_replace(s.part, ':[0-9]+$', '') AS layer,
       (CASE WHEN e.delta < 0 THEN -1 ELSE 1 END) * substring(s.part FROM ':([0-9]+)$')::bigint AS delta
  FROM usage_events e
 CROSS JOIN LATERAL unnest(string_to_array(e.sources, ',')) WITH ORDINALITY AS s(part, ord)
 WHERE e.sources IS NOT NULL AND e.sources <> '';
