-- consume: idempotency -> rate limits -> period refresh -> plan gate -> org/team/user levels
-- -> charge (allocated, then purchased) -> XADD -> remember the answer. KEYS/ARGV: see gate().
local idem = replay(KEYS[7], ARGV[19])
if idem then return idem end

local req, refusal = gate(true)
if refusal then return refuse(req, refusal) end

local m = req.mtr
local from_a, from_p = m:charge(req.cost)
for _, q in ipairs(quotas(req)) do
  q.used = q.used + req.cost; q:save()
end
m:save(req.events, req.user, req.feature)
save_rate_limits(req.rl_writes)
local delta = -(from_a + from_p)
req.events:add({id = req.id, kind = 'consume', user = req.user, meter = req.meter, feature = req.feature,
  delta = delta, dp = -from_p, cost = req.cost, bal = m:balance(), meta = req.meta})
m:alerts(req.events, req.user, req.feature, ARGV[26])
-- Nothing is kept for a refund: it reads this event back (refund.lua).
local rep = reply(req, 200, '', '', req.cost, remaining(req), req.id)
remember(KEYS[7], ARGV[19], req.idem_ttl, rep)
return rep
