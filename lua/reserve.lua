-- reserve: the gate as for consume, then a hold instead of a charge. The hold counts against
-- every level until commit, release or expiry (ARGV[23] = ttl s). The reservation id is ARGV[1].
local idem = replay(KEYS[7], ARGV[19])
if idem then return idem end

local req, refusal = gate(true)
if refusal then return refuse(req, refusal) end

local m = req.mtr
local ttl = tonumber(req.extra)
local expires = req.now_s + ttl
m.h = m.h + req.cost
for _, q in ipairs(quotas(req)) do
  q.h = q.h + req.cost; q:save()
end
m:save(req.events, req.user, req.feature)
save_rate_limits(req.rl_writes)
local unit_cost = tonumber(ARGV[24]) or req.cost
redis.call('HSET', KEYS[10], req.id, cjson.encode({m = req.meter, held = req.cost, unit = unit_cost,
  u = req.user, f = req.feature, k = req.key, exp = expires,
  ut = req.uq and req.uq.subject or '', tt = req.tq and req.tq.subject or ''}))
redis.call('ZADD', KEYS[11], expires, req.id)
req.events:add({id = req.id, kind = 'reserve', user = req.user, meter = req.meter, feature = req.feature,
  delta = 0, cost = 0, bal = m:balance(),
  meta = cjson.encode({held = req.cost, expires_at = expires, reservation_id = req.id})})
m:alerts(req.events, req.user, req.feature, ARGV[26])
local rep = reply(req, 201, '', '', req.cost, remaining(req), req.id, '', cjson.encode({expires_at = expires}))
remember(KEYS[7], ARGV[19], req.idem_ttl, rep)
return rep
