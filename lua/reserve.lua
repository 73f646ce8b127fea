-- reserve: the gate as for consume, then a hold instead of a charge. The hold counts against
-- every level until commit, release or expiry (reservation_ttl_s). The reservation id is the
-- request's event id.

-- The usual one names its KEYS and ARGV itself, without tables (usual_reserve).
local usual, now, meter_read = usual_reserve(KEYS, ARGV)
if usual then return usual end
-- Not the usual one: the gate decides, from the server time and the meter usual_reserve read.
local k = bind(KEYS, GATE_KEYS)
local a = bind(ARGV, GATE_ARGV)

local idem = replay(k.idem, a.fingerprint)
if idem then return idem end

local req, refusal = gate(k, a, true, now, meter_read)
if refusal then return refuse(req, refusal) end

local m = req.mtr
local expires = req.now_s + req.reservation_ttl_s
m.h = m.h + req.cost
for _, q in ipairs(quotas(req)) do
  q.h = q.h + req.cost; q:save()
end
m:save(req.events, req.user, req.feature)
save_rate_limits(req)
call('HSET', k.reservations, req.event_id, json_encode({m = req.meter, held = req.cost,
  unit = req.unit_cost or req.cost, u = req.user, f = req.feature, k = req.key_id, exp = expires,
  co = req.overflow, o = req.credit_order,
  ut = req.uq and req.uq.subject or '', tt = req.tq and req.tq.subject or ''}))
call('ZADD', k.expiries, expires, req.event_id)
-- The earliest hold's expiry, once known (unknown stays unknown until a sweep learns it).
if m.holds_due ~= nil and (m.holds_due == 0 or expires < m.holds_due) then call('HSET', k.bal, HOLDS_DUE, expires) end
req.events:add({id = req.event_id, kind = 'reserve', user = req.user, meter = req.meter, feature = req.feature,
  delta = 0, cost = 0, bal = m:balance(),
  meta = json_encode({held = req.cost, expires_at = expires, reservation_id = req.event_id})})
-- No low-balance alert here: the hold is not spent yet; its commit judges the crossing (commit.lua).
local rep = decision(req, {status = 201, cost = req.cost, remaining = remaining(req), event_id = req.event_id,
  extra = json_encode({expires_at = expires})})
remember(k.idem, a.fingerprint, req.idem_ttl_s, rep)
return rep
