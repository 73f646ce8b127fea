-- consume: the usual one straight through (usual_consume), else idempotency -> user -> rate limits
-- -> period refresh -> plan gate -> org/team/user levels -> charge (the waterfall: allocated, then
-- the credit layers) -> XADD -> remember the answer.

-- The usual one names its KEYS and ARGV itself, without tables (usual_consume).
local usual, now, meter_read = usual_consume(KEYS, ARGV)
if usual then return usual end
-- Not the usual one: the gate decides, from the server time and the meter usual_consume read.
local k = bind(KEYS, GATE_KEYS)
local a = bind(ARGV, GATE_ARGV)

local idem = replay(k.idem, a.fingerprint)
if idem then return idem end

local req, refusal = gate(k, a, true, now, meter_read)
if refusal then return refuse(req, refusal) end

local m = req.mtr
local from_a, from_p, src = m:take(req.steps, req.cost)
for _, q in ipairs(quotas(req)) do
  q.used = q.used + req.cost; q:save()
end
m:save(req.events, req.user, req.feature)
save_rate_limits(req)
req.events:add({id = req.event_id, kind = 'consume', user = req.user, meter = req.meter, feature = req.feature,
  delta = -(from_a + from_p), dp = -from_p, cost = req.cost, bal = m:balance(), meta = req.metadata, src = src})
m:alerts(req.events, req.user, req.feature, req.alert_thresholds)
-- Nothing is kept for a refund: it reads this event back (refund.lua).
local rep = decision(req, {cost = req.cost, remaining = remaining(req), event_id = req.event_id, sources = src})
remember(k.idem, a.fingerprint, req.idem_ttl_s, rep)
return rep
